"""A tree's leaves as modules: all of them batched, one of them alone, and the master leaf with its blend.

Every leaf computes ``act(x W1 + b1) W2 + b2`` with dropout on the hidden units (docs/methods.md §1).
:class:`LeafBank` holds a tree's 2**D leaves batched, ``[L, ...]``, and runs each token's leaf with the grouped
kernels (hard) or all of them as one dense layer (soft): the core FFF's leaves. :class:`LeafMLP` is one leaf on
its own: what DeepSpeed's ``Experts`` holds and shards. :class:`MasterLeaf` is the always-on MLP of the eFFF
paper (arXiv 2405.16836, docs/methods.md §3) with its learned blend; every layer with a master leaf (the core
FFF, DeepSpeed's FFFMoE, Tutel's TutelFFF) holds one.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .activations import activation_fn
from .ops.grouped import grouped_mlp


class LeafBank(nn.Module):
    """The L leaf MLPs of a tree, batched: ``w1`` [L, d, l], ``b1`` [L, l], ``w2`` [L, l, o], ``b2`` [L, o].

    ``forward(x [S, d], leaf [A], gate [A], token [A] | None) -> [S, o]`` runs each token's leaf (its leaves, summed,
    for a forest), its output scaled by ``gate``
    (the grouped kernels of ``ops/grouped.py``); :meth:`mixture` runs every leaf and mixes them (soft training).
    Initialised as ``fastfeedforward`` and nn.Linear do, U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
    """

    def __init__(self, n_leaves: int, d_model: int, width: int, d_out: int, activation: str, bias: bool = True,
                 dropout: float = 0.0):
        super().__init__()
        L, d, l, o = n_leaves, d_model, width, d_out
        self.activation = activation
        self.act = activation_fn(activation)
        self.dropout = dropout
        k1, k2 = 1.0 / math.sqrt(d), 1.0 / math.sqrt(l)
        self.w1 = nn.Parameter(torch.empty(L, d, l).uniform_(-k1, k1))  # [L, d, l]
        self.b1 = nn.Parameter(torch.empty(L, l).uniform_(-k1, k1)) if bias else None  # [L, l]
        self.w2 = nn.Parameter(torch.empty(L, l, o).uniform_(-k2, k2))  # [L, l, o]
        self.b2 = nn.Parameter(torch.empty(L, o).uniform_(-k2, k2)) if bias else None  # [L, o]

    def forward(self, x: Tensor, leaf: Tensor, gate: Tensor, token: Tensor | None = None) -> Tensor:
        """With ``token`` [A], assignment a sends token ``token[a]`` to leaf ``leaf[a]`` and the outputs of a token's
        assignments are summed (a forest); without it, one assignment per token, in order."""
        return grouped_mlp(x, token, leaf, gate, self.w1, self.b1, self.w2, self.b2, self.act, self.dropout,
                           self.training)

    def mixture(self, x: Tensor, leaf_p: Tensor) -> Tensor:
        """Every leaf at once, as one dense layer of the training width L * l, mixed by the leaves' probabilities
        ``leaf_p`` [S, L]: [S, d] -> [S, o]."""
        L, d, l = self.w1.shape
        S, o = x.shape[0], self.w2.shape[-1]
        h = x @ self.w1.permute(1, 0, 2).reshape(d, L * l)  # [S, L*l]
        if self.b1 is not None:
            h = h + self.b1.reshape(L * l).to(h.dtype)  # .to: under autocast h is bfloat16
        h = F.dropout(self.act(h), self.dropout, self.training).view(S, L, l)
        # fold the mixture weights into the hidden units: sum_j c_j (h_j W2_j + b2_j)
        mixed = (h * leaf_p.to(h.dtype)[:, :, None]).reshape(S, L * l)  # [S, L*l]
        y = mixed @ self.w2.reshape(L * l, o)  # [S, o]
        if self.b2 is not None:
            y = y + leaf_p.to(h.dtype) @ self.b2
        return y

    def extra_repr(self) -> str:
        L, d, l = self.w1.shape
        return f"{L} leaves, {d} -> {l} -> {self.w2.shape[-1]}, activation={self.activation}"


class LeafMLP(nn.Module):
    """``y = act(x @ w1 + b1) @ w2 + b2``: [..., d] -> [..., o]. Parameters w1 [d, l], b1 [l], w2 [l, o], b2 [o].

    Initialised as the core FFF's leaves, U(-1/sqrt(fan_in), 1/sqrt(fan_in)), drawn in the order w1, b1, w2,
    b2. Under ``torch.autocast`` the biases are cast to the activations' dtype, as the core layer does.

    ``parameter_order`` is the order the parameters are registered in, which optimizer state dicts follow (they
    hold the state by position): by default the one DeepSpeed's experts were checkpointed with.
    """

    PARAMETER_ORDER: tuple[str, ...] = ("w1", "w2", "b1", "b2")

    def __init__(self, d_model: int, width: int, d_out: int, activation: str, bias: bool = True,
                 dropout: float = 0.0, parameter_order: tuple[str, ...] | None = None):
        super().__init__()
        self.activation = activation
        self.act = activation_fn(activation)
        self.dropout = dropout
        shapes = {"w1": (d_model, width), "b1": (width,), "w2": (width, d_out), "b2": (d_out,)}
        order = self.PARAMETER_ORDER if parameter_order is None else parameter_order
        if sorted(order) != sorted(shapes):
            raise ValueError(f"parameter_order = {order!r} is not allowed: must order w1, b1, w2, b2")
        for name in order:
            has = bias or name.startswith("w")
            self.register_parameter(name, nn.Parameter(torch.empty(shapes[name])) if has else None)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        k1, k2 = 1.0 / math.sqrt(self.w1.shape[0]), 1.0 / math.sqrt(self.w2.shape[0])
        self.w1.uniform_(-k1, k1)
        if self.b1 is not None:
            self.b1.uniform_(-k1, k1)
        self.w2.uniform_(-k2, k2)
        if self.b2 is not None:
            self.b2.uniform_(-k2, k2)

    def forward(self, x: Tensor) -> Tensor:
        # [..., d] -> [..., l] -> [..., o]
        h = x @ self.w1
        if self.b1 is not None:
            h = h + self.b1.to(h.dtype)  # .to: under autocast h is bfloat16
        y = F.dropout(self.act(h), self.dropout, self.training) @ self.w2
        if self.b2 is not None:
            y = y + self.b2.to(y.dtype)
        return y

    def extra_repr(self) -> str:
        return f"{self.w1.shape[0]} -> {self.w1.shape[1]} -> {self.w2.shape[1]}, activation={self.activation}"


class MasterLeaf(LeafMLP):
    """The master leaf: an always-on MLP M and a learned blend logit ``gate`` (eFFF, docs/methods.md §3).

    ``blend(x, tree_out) = sigmoid(gate) * tree_out + (1 - sigmoid(gate)) * M(x)``. ``gate`` starts at 0, so tree
    and master leaf start on an equal footing. Its shape is ``gate_shape``: [] in the core and Tutel layers, [1]
    in DeepSpeed's (its engine broadcasts parameters as bytes, which a 0-dim tensor cannot be viewed as); each
    layer keeps the shape its checkpoints, optimizer states included, were written with.
    """

    # the core FFF's and Tutel's order (DeepSpeed's FFFMoE passes LeafMLP's)
    PARAMETER_ORDER = ("w1", "b1", "w2", "b2")

    def __init__(self, d_model: int, width: int, d_out: int, activation: str, bias: bool = True,
                 dropout: float = 0.0, parameter_order: tuple[str, ...] | None = None,
                 gate_shape: tuple[int, ...] = ()):
        super().__init__(d_model, width, d_out, activation, bias, dropout, parameter_order)
        self.gate = nn.Parameter(torch.zeros(gate_shape))

    def blend(self, x: Tensor, tree_out: Tensor) -> Tensor:
        """[..., d], [..., o] -> [..., o]."""
        m = self(x)
        g = torch.sigmoid(self.gate).to(m.dtype)
        return g * tree_out + (1 - g) * m

    def share(self) -> Tensor:
        """The tree's share of the output, ``sigmoid(gate)``, detached (float32 scalar)."""
        return torch.sigmoid(self.gate.detach().float()).reshape(())
