"""DeepSpeed integration: the FFF tree as a DeepSpeed MoE gate, its leaves sharded by expert parallelism.

- :class:`TreeGate` — the tree as a ``deepspeed.moe.sharded_moe.MOELayer`` gate (0.19 and older contracts).
- :class:`FFFMoE` — a ``deepspeed.moe.layer.MoE`` whose experts are the tree's leaves.
- :class:`DeepSpeedFFFConfig` — the ``"fff_moe"`` block of a DeepSpeed JSON config.
- :func:`plan_replacements` / :func:`apply_replacements` — swap a model's feedforward blocks for FFF layers.

The public entry point is :func:`fff_moe_plugin.deepspeed.initialize`. Needs ``pip install
"fff-moe-plugin[deepspeed]"``; importing this package without DeepSpeed raises an ImportError saying so.
"""

try:
    import deepspeed  # noqa: F401
except ImportError as e:
    raise ImportError(
        'the DeepSpeed integration needs DeepSpeed 0.19: pip install "fff-moe-plugin[deepspeed]" '
        '(or pip install "deepspeed>=0.19.8,<0.20")'
    ) from e

from .adapter import MoEFeedForward  # noqa: E402
from .config import DeepSpeedFFFConfig  # noqa: E402
from .gate import RoutingRecord, TreeGate  # noqa: E402
from .layer import FFFMoE  # noqa: E402
from .replace import Replacement, apply_replacements, feedforward_shape, plan_replacements  # noqa: E402

__all__ = [
    "TreeGate", "RoutingRecord", "FFFMoE", "MoEFeedForward", "DeepSpeedFFFConfig", "Replacement",
    "plan_replacements", "apply_replacements", "feedforward_shape",
]
