"""Sub-commands of the ``fff-moe`` tool, one module each (see ``fff_moe_plugin.cli``)."""
