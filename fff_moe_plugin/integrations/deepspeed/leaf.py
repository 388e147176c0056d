"""One leaf of an FFF tree as a stand-alone MLP module: what DeepSpeed's ``Experts`` holds and shards.

Same function as one leaf of the core :class:`~fff_moe_plugin.fff.FFF` (``act(x W1 + b1) W2 + b2``, with
the same dropout on the hidden units), stored as a module so that DeepSpeed can tag, shard and checkpoint
it per expert. The master leaf of :class:`FFFMoE` is the same module, outside the experts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...activations import activation_fn


class FFFLeaf(nn.Module):
    """``y = act(x @ w1 + b1) @ w2 + b2``: [..., d] -> [..., o]. Parameters w1 [d, l], b1 [l], w2 [l, o], b2 [o]."""

    def __init__(self, d_model: int, width: int, d_out: int, activation: str, bias: bool = True,
                 dropout: float = 0.0):
        super().__init__()
        self.activation = activation
        self.act = activation_fn(activation)
        self.dropout = dropout
        self.w1 = nn.Parameter(torch.empty(d_model, width))
        self.w2 = nn.Parameter(torch.empty(width, d_out))
        self.b1 = nn.Parameter(torch.empty(width)) if bias else None
        self.b2 = nn.Parameter(torch.empty(d_out)) if bias else None
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The core FFF's init, U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (FFFMoE overwrites it with the core's draws)."""
        k1, k2 = self.w1.shape[0] ** -0.5, self.w2.shape[0] ** -0.5
        self.w1.uniform_(-k1, k1)
        self.w2.uniform_(-k2, k2)
        if self.b1 is not None:
            self.b1.uniform_(-k1, k1)
            self.b2.uniform_(-k2, k2)

    def forward(self, x: Tensor) -> Tensor:
        # [..., d] -> [..., l] -> [..., o]
        h = x @ self.w1
        if self.b1 is not None:
            h = h + self.b1
        h = F.dropout(self.act(h), self.dropout, self.training)
        y = h @ self.w2
        if self.b2 is not None:
            y = y + self.b2
        return y
