"""fairseq ``--user-dir`` plugin of fff-moe-plugin.

fairseq imports this folder under its own top-level name (``fff_moe_fairseq``). It only imports the real
modules of ``fff_moe_plugin.integrations.fairseq``, whose decorators register the models, architectures
and criterion once, whichever name this folder was imported under, and installs the trainer hooks that
checkpoint leaves sharded over ranks (``expert_parallel``; inactive unless ``--fff-backend`` shards them).
"""

from fff_moe_plugin.integrations.fairseq import architectures, criterion, expert_parallel, models  # noqa: F401

expert_parallel.install()
