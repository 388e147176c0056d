"""Experiments around the layers, kept apart from the framework adapters under ``integrations/``:

- :mod:`.lm`: the side-by-side language-model comparison (``fff-moe compare``), driving fairseq's command-line tools
  as subprocesses (data preparation, training, evaluation, local CPU ranks);
- :mod:`.efff`: the eFFF reproduction (``fff-moe repro-efff``).

Nothing here is imported by the layers or the integrations.
"""
