"""The path-neuron FFF of UltraFastBERT (Belcak & Wattenhofer, arXiv 2311.10770).

A different design under the FFF name: every tree node is an activation neuron that contributes to the
output; there are no leaf MLPs and no sigmoid router. docs/methods.md §2 gives the formula.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import tree
from .activations import activation_fn
from .block import BlockOutput, FeedForwardBlock
from .config import UltraFastConfig
from .losses import counts_of
from .ops import inference


class UltraFastFFF(FeedForwardBlock):
    """Path-neuron tree of ``2**(depth+1) - 1`` neurons; each token visits ``depth + 1`` of them.

    For a token, start at the root; at each visited neuron n compute ``a_n = w_n . x + b_n``, add
    ``act(a_n) * u_n`` to the output and move to ``2n + 1 + [a_n > 0]``.

    With ``n_trees`` K > 1 the layer is a forest (UltraFastBERT's ``parallel_size``): K such trees, each token
    walking one path in each, the outputs summed.

    Contract: ``forward(x [..., d_model]) -> BlockOutput``; there is no auxiliary loss (``aux_loss`` is
    zero; routing is hard from the start). Training computes, by ``config.train_mode``, either every
    neuron and masks the unvisited ones (as the reference code does) or only the visited ones; both give
    the same outputs and gradients. Eval computes only the visited ones.
    """

    config_class = UltraFastConfig

    def __init__(self, config: UltraFastConfig):
        super().__init__(config)
        c = config
        N, d, o = c.total_neurons, c.d_model, c.d_out  # a forest's trees one after the other
        self.act = activation_fn(c.activation)
        k_in = 1.0 / math.sqrt(d)
        k_out = 1.0 / math.sqrt(c.depth + 1)  # each output sums depth + 1 neurons
        self.neuron_in = nn.Parameter(torch.empty(N, d).uniform_(-k_in, k_in))  # [N, d]
        self.neuron_bias = nn.Parameter(torch.empty(N).uniform_(-k_in, k_in)) if c.bias else None  # [N]
        self.neuron_out = nn.Parameter(torch.empty(N, o).uniform_(-k_out, k_out))  # [N, o]
        self.output_bias = nn.Parameter(torch.zeros(o)) if c.output_bias else None

    def forward(self, x: Tensor) -> BlockOutput:
        # S tokens, d model width, N neurons, D + 1 visited levels, o output width
        c = self.config
        lead = x.shape[:-1]
        x = self._flatten_input(x)  # [S, d]
        levels = c.depth + 1
        if c.n_trees > 1:
            return self._forest(x, lead)
        if self.training and c.train_mode == "masked":
            a_all = F.linear(x, self.neuron_in, self.neuron_bias)  # [S, N]
            nodes, _ = tree.descend_from_logits(a_all, levels, strict=True)  # [S, D+1]
            mask = torch.zeros_like(a_all).scatter_(1, nodes, 1.0)  # [S, N]
            y = (self.act(a_all) * mask) @ self.neuron_out  # [S, o]
        elif not self.training and inference.kernels_apply(x, *self.parameters()):
            # eval on the compiled path-neuron kernel (ops/inference.py); the statistics need the last node only
            w = (self.neuron_in, self.neuron_bias, self.neuron_out)
            y, last = inference.path_neuron(x, *w, None, levels, c.activation)  # [S, o], [S]
            nodes = last[:, None]  # [S, 1]
        else:
            nodes, a, _ = tree.descend(x, self.neuron_in, self.neuron_bias, levels, strict=True)  # [S, D+1]
            u = self.neuron_out[nodes]  # [S, D+1, o]
            y = torch.einsum("sk,sko->so", self.act(a), u)  # [S, o]
        if self.output_bias is not None:
            y = y + self.output_bias
        counts = counts_of(nodes[:, -1] - tree.num_nodes(c.depth), 2**c.depth)
        zero = self.zero()
        stats = {"counts": counts}
        return BlockOutput(y.reshape(*lead, c.d_out), zero, {}, stats)

    def _forest(self, x: Tensor, lead: tuple[int, ...]) -> BlockOutput:
        """K trees: each token walks one path in each (rows ``s * K + k``), the K paths' outputs summed."""
        c = self.config
        S, K, N, levels = x.shape[0], c.n_trees, c.n_neurons, c.depth + 1
        offset = torch.arange(K, device=x.device).repeat(S) * N  # [S*K]: the first neuron of each row's tree
        if self.training and c.train_mode == "masked":
            a_all = F.linear(x, self.neuron_in, self.neuron_bias)  # [S, K*N]
            nodes, _ = tree.descend_from_logits(a_all.reshape(S * K, N), levels, strict=True)  # [S*K, D+1]
            mask = torch.zeros_like(a_all).scatter_(1, (nodes + offset[:, None]).reshape(S, K * levels), 1.0)
            y = (self.act(a_all) * mask) @ self.neuron_out  # [S, o]
        else:
            rows = x.repeat_interleave(K, dim=0)  # [S*K, d]
            nodes, a, _ = tree.descend(rows, self.neuron_in, self.neuron_bias, levels, strict=True, offset=offset)
            u = self.neuron_out[nodes + offset[:, None]]  # [S*K, D+1, o]
            y = torch.einsum("rk,rko->ro", self.act(a), u).reshape(S, K, c.d_out).sum(1)  # [S, o]
        if self.output_bias is not None:
            y = y + self.output_bias
        leaves = 2**c.depth
        last = nodes[:, -1] - tree.num_nodes(c.depth) + offset // N * leaves  # [S*K] over the forest's leaves
        stats = {"counts": counts_of(last, K * leaves)}
        return BlockOutput(y.reshape(*lead, c.d_out), self.zero(), {}, stats)
