"""``fff-moe bench``: inference speed of FFF layers against the fastest dense block of the same training width.

The measurement, its contenders and its options are :mod:`fff_moe_plugin.experiments.inference_bench`; this
module is its place on the command line.
"""

from __future__ import annotations

from ..experiments.inference_bench import add_arguments, run

__all__ = ["add_arguments", "run"]
