"""sigma-MoE (Csordas, Irie & Schmidhuber, "Approximating Two-Layer Feedforward Networks for Efficient
Transformers", EMNLP 2023 Findings, arXiv 2310.10837). docs/methods.md §4 gives the formulas."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .. import tree
from ..activations import activation_fn
from ..block import BlockOutput, FeedForwardBlock
from ..config import SigmaMoEConfig
from ..losses import counts_of, sigma_moe_entropy_loss
from ..ops.gather import take_along
from ..ops.grouped import grouped_mlp


class SigmaMoE(FeedForwardBlock):
    """E experts of size G selected top-K by a sigmoid gate; no biases.

    ``s = sigmoid(x W_sel^T)``; in training, expert dropout removes each (token, expert) pair with probability
    ``expert_dropout``; ``y = sum over the top-K e of s_e * (act(x K_e) V_e)``. A removed expert is not
    selected while K others survive, and never contributes (the paper's reference code selects it anyway when
    fewer than K survive, which makes the dropout a no-op at ``top_k = n_experts``).

    Contract: ``forward(x [..., d_model]) -> BlockOutput``. ``aux_loss`` is ``entropy_coef *
    sum_e p_bar_e log p_bar_e`` with p_bar the batch mean of softmax(selection logits) over this call's
    tokens (per rank: data-parallel training averages the gradient, not p_bar).
    """

    config_class = SigmaMoEConfig

    def __init__(self, config: SigmaMoEConfig):
        super().__init__(config)
        c = config
        E, G, d, o, w = c.n_experts, c.expert_size, c.d_model, c.d_out, c.weight_scale
        self.act = activation_fn(c.activation)
        # init as if a dense FFN of width E * G (paper §4)
        self.keys = nn.Parameter(torch.randn(E, d, G) * (w / math.sqrt(d)))  # [E, d, G]
        self.values = nn.Parameter(torch.randn(E, G, o) * (w / math.sqrt(E * G)))  # [E, G, o]
        sel = torch.randn(E, d) * (w / math.sqrt(d))
        # selector rows rescaled to one common norm (their mean), so that no expert starts favoured
        norms = sel.norm(dim=1, keepdim=True)
        self.selection = nn.Parameter(sel / norms * norms.mean())  # [E, d]

    def forward(self, x: Tensor) -> BlockOutput:
        # S tokens, d model width, E experts, K selected per token, G expert size, o output width
        c = self.config
        lead = x.shape[:-1]
        x = self._flatten_input(x)  # [S, d]
        S = x.shape[0]
        logits = tree.decision_linear(x, self.selection, None)  # [S, E], float32 at least: it selects experts
        choose_on = logits
        dropped = None
        if self.training and c.expert_dropout > 0:
            dropped = torch.rand_like(logits, dtype=torch.float32) < c.expert_dropout  # [S, E]
            choose_on = logits.masked_fill(dropped, float("-inf"))
        _, idx = choose_on.topk(c.top_k, dim=-1)  # [S, K]
        gate = torch.sigmoid(take_along(logits, idx))  # [S, K]
        if dropped is not None:
            # a dropped expert contributes nothing, also when fewer than K experts survive (with top_k =
            # n_experts every expert is selected, so without this the dropout would have no effect)
            gate = gate.masked_fill(dropped.gather(1, idx), 0.0)
        token = torch.arange(S, device=x.device)[:, None].expand(S, c.top_k)
        y = grouped_mlp(
            x, token.reshape(-1), idx.reshape(-1), gate.reshape(-1), self.keys, None, self.values, None, self.act
        )  # [S, o]
        used = idx if dropped is None else idx.masked_fill(dropped.gather(1, idx), c.n_experts)
        counts = counts_of(used, c.n_experts + 1)[: c.n_experts]
        stats = {"counts": counts}
        if not self.training:
            zero = self.zero()
            return BlockOutput(y.reshape(*lead, c.d_out), zero, {"entropy": zero}, stats)
        entropy = sigma_moe_entropy_loss(logits)
        return BlockOutput(y.reshape(*lead, c.d_out), c.entropy_coef * entropy, {"entropy": entropy}, stats)
