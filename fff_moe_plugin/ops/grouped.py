"""Run a bank of small MLPs on the tokens routed to each of them.

Shared by the FFF hard path (one leaf per token) and sigma-MoE (top-K experts per token). Tokens are
grouped by expert with one sort, and each expert runs one pair of matmuls on its group: the cost is that of
the selected experts only, and it is differentiable with respect to inputs, weights and gates.

Axes: S tokens, A assignments (token, expert, gate), E experts, d input, h hidden, o output.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor


def grouped_mlp(
    x: Tensor,
    token: Tensor,
    expert: Tensor,
    gate: Tensor | None,
    w1: Tensor,
    b1: Tensor | None,
    w2: Tensor,
    b2: Tensor | None,
    act: Callable[[Tensor], Tensor],
    dropout: float = 0.0,
    training: bool = False,
) -> Tensor:
    """``out[t] = sum over assignments a with token[a] = t of gate[a] * MLP_{expert[a]}(x[t])``.

    x: [S, d]; token, expert: [A] long; gate: [A] or None (all ones); w1: [E, d, h]; b1: [E, h];
    w2: [E, h, o]; b2: [E, o].  Returns [S, o]; tokens without an assignment get zeros.
    """
    S, o = x.shape[0], w2.shape[-1]
    out = x.new_zeros(S, o)
    if token.numel() == 0:
        # keep the graph connected to the weights so that backward still runs with zero gradients
        return out + 0.0 * (w1.sum() + w2.sum())
    order = torch.argsort(expert, stable=True)  # [A]
    counts = torch.bincount(expert, minlength=w1.shape[0]).tolist()
    tok_sorted = token[order]
    gate_sorted = gate[order] if gate is not None else None
    start = 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        idx = tok_sorted[start : start + n]  # [n]
        xe = x.index_select(0, idx)  # [n, d]
        h = xe @ w1[e]
        if b1 is not None:
            h = h + b1[e]
        h = F.dropout(act(h), dropout, training)  # [n, h]
        ye = h @ w2[e]
        if b2 is not None:
            ye = ye + b2[e]
        if gate_sorted is not None:
            ye = ye * gate_sorted[start : start + n, None].to(ye.dtype)
        out = out.index_add(0, idx, ye)  # [S, o]
        start += n
    return out


def grouped_mlp_reference(
    x: Tensor,
    token: Tensor,
    expert: Tensor,
    gate: Tensor | None,
    w1: Tensor,
    b1: Tensor | None,
    w2: Tensor,
    b2: Tensor | None,
    act: Callable[[Tensor], Tensor],
) -> Tensor:
    """One assignment at a time: the definition :func:`grouped_mlp` must equal (no dropout)."""
    rows = [x.new_zeros(w2.shape[-1]) for _ in range(x.shape[0])]
    for a in range(token.numel()):
        t, e = int(token[a]), int(expert[a])
        h = x[t] @ w1[e] + (b1[e] if b1 is not None else 0)
        y = act(h) @ w2[e] + (b2[e] if b2 is not None else 0)
        rows[t] = rows[t] + (gate[a] * y if gate is not None else y)
    if not rows:
        return x.new_zeros(0, w2.shape[-1])
    return torch.stack(rows)
