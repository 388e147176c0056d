"""The dense two-layer feedforward block, with the call shape of the conditional blocks."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from ..activations import activation_fn
from ..block import BlockOutput, FeedForwardBlock
from ..config import DenseConfig


class DenseFFN(FeedForwardBlock):
    """``W2 act(W1 x + b1) + b2``: the transformer feedforward every conditional block replaces.

    Contract: ``forward(x [..., d_model]) -> BlockOutput``; no auxiliary loss; ``stats["counts"]`` is
    the token count on its one "expert".
    """

    config_class = DenseConfig

    def __init__(self, config: DenseConfig):
        super().__init__(config)
        self.act = activation_fn(config.activation)
        self.fc1 = nn.Linear(config.d_model, config.d_ff, bias=config.bias)
        self.fc2 = nn.Linear(config.d_ff, config.d_out, bias=config.bias)

    def forward(self, x: Tensor) -> BlockOutput:
        lead = x.shape[:-1]
        x = self._flatten_input(x)  # [S, d]
        h = F.dropout(self.act(self.fc1(x)), self.config.dropout, self.training)  # [S, f]
        y = self.fc2(h)  # [S, o]
        zero = self.zero()
        return BlockOutput(y.reshape(*lead, self.config.d_out), zero, {}, {"counts": zero.new_full((1,), x.shape[0])})
