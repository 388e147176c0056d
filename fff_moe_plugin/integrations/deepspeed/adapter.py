"""The module that stands where a replaced feedforward block stood: tensor in, tensor out.

Models call their feedforward block as ``y = self.mlp(x)``; DeepSpeed's MoE returns a triple. This adapter
keeps the model's call shape and keeps the layer's full :class:`~fff_moe_plugin.block.BlockOutput` of the
last call in ``.last`` (the same per-call pattern as DeepSpeed's own ``MOELayer.l_aux``), which
:func:`fff_moe_plugin.deepspeed.aux_loss` sums.
"""

from __future__ import annotations

import functools
from typing import Optional

from deepspeed.moe.layer import MoE
from torch import Tensor, nn

from ...block import BlockOutput
from ...dispatch import ExpertParallelFFF
from .gate import LazyStats


class MoEFeedForward(nn.Module):
    """Wraps an :class:`FFFMoE`, a ``TutelFFFMoE``, a DeepSpeed ``MoE`` (top-1 baseline) or a ``TutelFFF`` as a
    feedforward block.

    ``forward(x [..., d]) -> [..., d]``. After each call ``self.last`` is the layer's BlockOutput; its
    ``aux_loss`` is what the training loss must add: FFFMoE's ``l_aux`` as is (already weighted), a plain
    DeepSpeed MoE's ``l_aux`` times ``aux_coef``. Its ``stats`` of FFFMoE and of a plain DeepSpeed MoE are
    computed when first read (:class:`~.gate.LazyStats`).
    """

    def __init__(self, layer: nn.Module, aux_coef: float = 1.0) -> None:
        super().__init__()
        if not isinstance(layer, (ExpertParallelFFF, MoE)):
            raise TypeError(f"MoEFeedForward wraps an expert-parallel FFF layer or a DeepSpeed MoE, got "
                            f"{type(layer).__name__}")
        self.moe = layer
        self.aux_coef = aux_coef
        self.last: Optional[BlockOutput] = None

    def forward(self, x: Tensor) -> Tensor:
        if isinstance(self.moe, ExpertParallelFFF):  # FFFMoE, TutelFFFMoE, TutelFFF: the package's BlockOutput
            out = self.moe.forward_block(x)
        else:  # DeepSpeed's own MoE (the top-1 baseline)
            y, l_aux, counts = self.moe(x)
            l_aux = l_aux.float()
            out = BlockOutput(y, self.aux_coef * l_aux, {"load_balance": l_aux},
                              LazyStats(functools.partial(_expert_stats, counts.detach())))
        self.last = out
        return out.output

    def extra_repr(self) -> str:
        return f"aux_coef={self.aux_coef}"


def _expert_stats(counts: Tensor) -> dict[str, Tensor]:
    """A DeepSpeed MoE's statistics: tokens per expert before capacity and the experts that got none."""
    counts = counts.float()
    return {"counts": counts, "unused_leaves": (counts == 0).sum().float()}
