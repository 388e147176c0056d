"""Heap-order binary-tree math, as pure functions.

Every layer and integration of the package (the FFF layer, the path-neuron layer, the DeepSpeed and Tutel
gates, the fast kernels' references) calls these; none re-derives node indices or path probabilities.

Conventions (docs/methods.md §1):
- A tree of depth D has ``2**D - 1`` nodes in heap order and ``2**D`` leaves; the children of node n are
  ``2n + 1`` (left) and ``2n + 2`` (right). Level k holds nodes ``2**k - 1 .. 2**(k+1) - 2``.
- A node's logit z gives the probability of going RIGHT, sigmoid(z). Hard descent goes right when
  ``z >= 0`` (the FFF paper and ``fastfeedforward``) or, with ``strict=True``, when ``z > 0``
  (UltraFastBERT).
- Leaf j is the node ``2**D - 1 + j``; the bits of j, most significant first, are its turns (1 = right).

Axes: S tokens, d input width, N nodes, L leaves, D depth.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .ops.gather import take_along


def num_nodes(depth: int) -> int:
    return 2**depth - 1


def level_slice(level: int) -> slice:
    """Heap indices of the nodes on ``level`` (the root is level 0)."""
    return slice(2**level - 1, 2 ** (level + 1) - 1)


def decision_linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``x @ weight.T + bias`` in at least float32, whatever autocast says.

    Routing decisions, and the losses computed from them, are made in float32 also when the experts run in
    bfloat16 under ``torch.autocast``: a bfloat16 logit (8 bits of mantissa) sends tokens near a boundary the other
    way and makes the path probabilities coarse. Float64 stays float64.
    """
    dtype = torch.promote_types(x.dtype, torch.float32)
    x, weight, bias = x.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype)
    if not torch.is_autocast_enabled(x.device.type):
        return F.linear(x, weight, bias)
    with torch.autocast(x.device.type, enabled=False):
        return F.linear(x, weight, bias)


def leaf_log_probs(logits: Tensor, depth: int) -> Tensor:
    """Log path probability of every leaf, computed in log space so that deep trees do not underflow.

    logits: [S, N] node logits (log-odds of going right).  Returns [S, L]; ``exp`` of each row sums to 1.
    """
    if logits.shape[-1] != num_nodes(depth):
        raise ValueError(f"expected {num_nodes(depth)} node logits for depth {depth}, got {logits.shape[-1]}")
    # one split per side, not a slice per level: a slice's backward zero-fills an [S, N] tensor, a split's is one cat
    sizes = [2**level for level in range(depth)]
    log_right = F.logsigmoid(logits).split(sizes, dim=-1)  # [S, 2**k] per level
    log_left = F.logsigmoid(-logits).split(sizes, dim=-1)
    out = logits.new_zeros(logits.shape[0], 1)  # [S, 1]: the root's region holds all the mass
    for left, right in zip(log_left, log_right):
        # children of level-local node i are 2i (left) and 2i + 1 (right) on the next level
        out = torch.stack((out + left, out + right), dim=-1).flatten(1)  # [S, 2**(k+1)]
    return out


def leaf_probs(logits: Tensor, depth: int) -> Tensor:
    """Path probabilities of every leaf ([S, L]); rows sum to 1."""
    return leaf_log_probs(logits, depth).exp()


def descend(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    levels: int,
    strict: bool = False,
    leak_rate: float = 0.0,
    offset: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Hard descent from the root, computing only the visited nodes' logits.

    x: [S, d]; weight: [N, d]; bias: [N] or None.  Returns ``(nodes, logits, end)``: the heap index of the
    node visited on each level [S, levels], its logit [S, levels] (differentiable with respect to x, weight
    and bias), and the heap index [S] the descent ends on (level ``levels``). For a depth-D FFF,
    ``end - num_nodes(D)`` is the leaf. With ``leak_rate`` > 0 each visited decision is swapped with that
    probability (region leak, see :func:`leak`), and the returned logit is the swapped one. ``offset`` [S]: row s
    descends the tree whose nodes are ``weight[offset[s] + n]`` (a forest's trees one after the other); the
    returned node indices are within that tree.
    """
    S = x.shape[0]
    node = torch.zeros(S, dtype=torch.long, device=x.device)  # [S]
    nodes, logits = [], []
    dtype = torch.promote_types(x.dtype, torch.float32)  # decisions in at least float32 (see decision_linear)
    for _ in range(levels):
        row = node if offset is None else node + offset
        z = (x.to(dtype) * weight.index_select(0, row).to(dtype)).sum(-1)  # [S]
        if bias is not None:
            z = z + bias.index_select(0, row).to(dtype)
        z = leak(z, leak_rate)
        nodes.append(node)
        logits.append(z)
        node = 2 * node + 1 + ((z > 0) if strict else (z >= 0)).long()
    if not nodes:
        return node.new_empty(S, 0), x.new_empty(S, 0), node
    return torch.stack(nodes, 1), torch.stack(logits, 1), node


# Trees of up to this many nodes route with one GEMM over every node, then a gather per level: for small trees
# that beats D gathers of node rows, forward and backward. Every hard router (the core layer, the DeepSpeed and
# Tutel gates) routes through :func:`route`, so they all decide with the same arithmetic, to the last bit.
FULL_LOGITS_MAX_NODES = 255


def route(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    levels: int,
    strict: bool = False,
    leak_rate: float = 0.0,
    every_logit: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """Hard descent as the layers run it: :func:`descend`'s ``(nodes, logits, end)`` plus ``all_logits``.

    Trees of at most ``FULL_LOGITS_MAX_NODES`` nodes, and any tree with ``every_logit`` (the caller needs every
    node's logit anyway, e.g. for the leaf balancing loss), compute every node's logit with one GEMM and descend
    on those (``all_logits`` [S, N], after region leak); otherwise only the visited nodes are computed
    (``all_logits`` None). Both give the same routing and path logits up to float rounding.
    """
    if every_logit or weight.shape[0] <= FULL_LOGITS_MAX_NODES:
        all_logits = leak(decision_linear(x, weight, bias), leak_rate)  # [S, N]
        nodes, end = descend_from_logits(all_logits, levels, strict=strict)  # [S, D], [S]
        return nodes, take_along(all_logits, nodes), end, all_logits
    nodes, logits, end = descend(x, weight, bias, levels, strict=strict, leak_rate=leak_rate)
    return nodes, logits, end, None


def descend_from_logits(logits: Tensor, levels: int, strict: bool = False) -> tuple[Tensor, Tensor]:
    """Hard descent given all node logits [S, N]; returns the visited nodes [S, levels] and the end [S]."""
    S = logits.shape[0]
    node = torch.zeros(S, dtype=torch.long, device=logits.device)
    if levels == 0:
        return node.new_empty(S, 0), node
    # every node's decision at once (no gradient), then one gather a level: child = 2 * node + 1 + turn
    turn = ((logits.detach() > 0) if strict else (logits.detach() >= 0)).long()  # [S, N]
    nodes = node.new_empty(S, levels)  # [S, D]
    for level in range(levels):
        nodes[:, level] = node
        node = turn.gather(1, node[:, None]).squeeze(1).add_(node, alpha=2).add_(1)
    return nodes, node


def path_nodes_of_leaf(leaf: Tensor, depth: int) -> tuple[Tensor, Tensor]:
    """Nodes on the root-to-leaf path of each leaf and the turns taken there.

    leaf: [S] leaf indices.  Returns ``(nodes, right)``, both [S, D]: node heap indices and 1 where the
    path turns right.
    """
    levels = torch.arange(depth, device=leaf.device)  # [D]
    prefix = leaf[:, None] >> (depth - levels)  # [S, D]: level-local index of the node on each level
    nodes = (2**levels - 1) + prefix
    right = (leaf[:, None] >> (depth - 1 - levels)) & 1
    return nodes, right


def path_log_prob(path_logits: Tensor, right: Tensor) -> Tensor:
    """Log probability of a path ([S]) from its node logits [S, D] and turns [S, D] (1 = right)."""
    signed = torch.where(right.bool(), path_logits, -path_logits)
    return F.logsigmoid(signed).sum(-1)


def leak(logits: Tensor, rate: float, generator: torch.Generator | None = None) -> Tensor:
    """Region leak: swap each decision (p -> 1 - p, i.e. z -> -z) with probability ``rate``."""
    if rate <= 0.0:
        return logits
    flip = torch.rand(logits.shape, device=logits.device, generator=generator) < rate
    return torch.where(flip, -logits, logits)


def bernoulli_entropy(logits: Tensor) -> Tensor:
    """Entropy (nats) of the Bernoulli decision sigmoid(z), elementwise and exact for any logit."""
    p = torch.sigmoid(logits)
    return F.softplus(logits) - p * logits
