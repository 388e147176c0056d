"""Product-key memory (Lample et al., "Large Memory Layers with Product Keys", NeurIPS 2019), configured
as in Csordas et al. 2023 (arXiv 2310.10837): the query is the input itself, no batch norm."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..block import BlockOutput, FeedForwardBlock
from ..config import PKMConfig
from ..losses import counts_of


class PKM(FeedForwardBlock):
    """``n_keys**2`` value slots addressed by the product of two sets of ``n_keys`` sub-keys, per head.

    For each head, the two halves of x are scored against their sub-keys; the top ``min(knn, n_keys)`` of
    each half are combined (scores add) and the top ``knn`` of the combinations are read, weighted by
    relu (or softmax) of their scores; heads add up.

    Contract: ``forward(x [..., d_model]) -> BlockOutput``; no auxiliary loss.
    """

    config_class = PKMConfig

    def __init__(self, config: PKMConfig):
        super().__init__(config)
        c = config
        half = c.d_model // 2
        k = 1.0 / math.sqrt(half)
        self.keys = nn.Parameter(torch.empty(c.n_heads, 2, c.n_keys, half).uniform_(-k, k))  # [H, 2, n, d/2]
        self.values = nn.Parameter(torch.randn(c.n_keys**2, c.d_out) / math.sqrt(c.d_out))  # [n*n, o]

    def lookup(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Selected slots and their scores for each head: [S, d] -> ([S, H, knn] long, [S, H, knn])."""
        c = self.config
        S = x.shape[0]
        dtype = torch.promote_types(x.dtype, torch.float32)
        q = x.view(S, 2, c.d_model // 2).to(dtype)  # [S, 2, d/2]
        # the scores select the slots: float32 at least, also under autocast (see tree.decision_linear)
        with torch.autocast(x.device.type, enabled=False):
            scores = torch.einsum("sxd,hxnd->shxn", q, self.keys.to(dtype))  # [S, H, 2, n]
        sub_k = min(c.knn, c.n_keys)
        v, i = scores.topk(sub_k, dim=-1)  # [S, H, 2, k']
        combined = v[:, :, 0, :, None] + v[:, :, 1, None, :]  # [S, H, k', k']
        best, flat = combined.flatten(2).topk(c.knn, dim=-1)  # [S, H, knn]
        slot = i[:, :, 0].gather(2, flat // sub_k) * c.n_keys + i[:, :, 1].gather(2, flat % sub_k)
        return slot, best

    def forward(self, x: Tensor) -> BlockOutput:
        # S tokens, d model width, H heads, n sub-keys per half, knn slots read per head, o output width
        c = self.config
        lead = x.shape[:-1]
        x = self._flatten_input(x)  # [S, d]
        S = x.shape[0]
        slot, score = self.lookup(x)  # [S, H, knn]
        weight = F.relu(score) if c.score_activation == "relu" else torch.softmax(score, dim=-1)
        y = F.embedding_bag(
            slot.reshape(S, -1), self.values, per_sample_weights=weight.reshape(S, -1).to(self.values.dtype),
            mode="sum",
        ) if S > 0 else x.new_zeros(0, c.d_out) + 0.0 * self.values.sum()  # [S, o]
        counts = counts_of(slot, c.n_keys**2)
        return BlockOutput(y.reshape(*lead, c.d_out), self.zero(), {}, {"counts": counts})
