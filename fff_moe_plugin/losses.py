"""Auxiliary losses: hardening entropy, load balancing over leaves and nodes, the sigma-MoE entropy.

All are computed in float32 whatever the activations' dtype, and all are pure functions of their inputs.
Axes: S tokens, N nodes, L leaves, D depth, E experts.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from . import tree
from .config import FFFConfig
from .tree import bernoulli_entropy


def counts_of(index: Tensor, n: int) -> Tensor:
    """How often each of ``0 .. n-1`` occurs in ``index`` (float32 [n]). Unlike ``torch.bincount`` the shape is
    known before the values, so ``torch.compile`` traces it without a graph break."""
    index = index.detach().reshape(-1)
    return torch.zeros(n, dtype=torch.float32, device=index.device).index_add_(
        0, index, torch.ones(index.shape[0], dtype=torch.float32, device=index.device))


def tree_of_row(rows: int, n_trees: int, device: torch.device) -> Tensor:
    """The tree of each row of a forest's routing record (rows ``s * K + k``): [rows] long."""
    return torch.arange(n_trees, device=device).repeat(rows // n_trees)


def forest_index(leaf: Tensor, n_trees: int, n_leaves: int) -> Tensor:
    """A forest's leaves numbered over all its trees (tree k's leaf j is ``k * L + j``), from each row's leaf."""
    return leaf + tree_of_row(leaf.shape[0], n_trees, leaf.device) * n_leaves


def hardening_loss(logits: Tensor) -> Tensor:
    """Mean Bernoulli entropy of the node decisions (FFF paper's hardening term); 0 for no decisions."""
    if logits.numel() == 0:
        return logits.new_zeros((), dtype=torch.float32)
    return bernoulli_entropy(logits.float()).mean()


def leaf_balance_loss(leaf_probs: Tensor, leaf: Tensor) -> Tensor:
    """Switch-style balancing with leaves as experts (eFFF): ``L * sum_i f_i * P_i``.

    leaf_probs: [S, L] soft path probabilities (differentiable); leaf: [S] hard-routed leaf (no gradient).
    Exactly 1 when routing is uniform and the soft probabilities agree with it; larger when unbalanced.
    """
    S, L = leaf_probs.shape
    if S == 0:
        return leaf_probs.new_zeros((), dtype=torch.float32)
    f = counts_of(leaf, L) / S  # [L], no gradient
    P = leaf_probs.float().mean(0)  # [L]
    return L * (f * P).sum()


def node_balance_loss(path_nodes: Tensor, path_logits: Tensor, n_nodes: int, right: Tensor | None = None) -> Tensor:
    """Left/right balancing at every node a token visits: O(D) per token, for trees too deep for ``L``.

    path_nodes, path_logits: [S, D] (heap index and logit of the node visited on each level); ``right`` [S, D]: the
    turns taken, when they are not the logits' signs (decisions shifted by bias balancing).
    For node n reached by T_n of S tokens, with f_R the fraction of them going right and P_R their mean
    probability of going right, the term is ``(T_n / S) * 2 * (f_R P_R + (1 - f_R)(1 - P_R))``; the terms of
    a level add up to 1 at balance, and the loss is their mean over levels. It is exactly 1 at balance.
    """
    S, D = path_nodes.shape
    if S == 0 or D == 0:
        return path_logits.new_zeros((), dtype=torch.float32)
    nodes = path_nodes.reshape(-1)
    p = torch.sigmoid(path_logits.float()).reshape(-1)
    right = (path_logits >= 0 if right is None else right).float().reshape(-1)
    T = counts_of(nodes, n_nodes)  # [N] tokens reaching each node
    R = torch.zeros(n_nodes, device=p.device).index_add_(0, nodes, right)  # [N] of those going right
    Psum = torch.zeros(n_nodes, device=p.device).index_add(0, nodes, p)  # [N] sum of P(right)
    # (T/S) * 2 * (R/T * Psum/T + (T-R)/T * (T-Psum)/T); nodes no token reached add 0 (masked, not indexed,
    # so that the shapes do not depend on the values)
    per_node = 2.0 * (R * Psum + (T - R) * (T - Psum)) / (S * T.clamp_min(1.0))
    return torch.where(T > 0, per_node, torch.zeros_like(per_node)).sum() / D


def sigma_moe_entropy_loss(selection_logits: Tensor) -> Tensor:
    """sigma-MoE regulariser ``sum_e p_bar_e log p_bar_e``, p_bar = batch mean of softmax(logits)."""
    if selection_logits.shape[0] == 0:
        return selection_logits.new_zeros((), dtype=torch.float32)
    p_bar = torch.softmax(selection_logits.float(), dim=-1).mean(0)  # [E]
    return (p_bar * torch.log(p_bar.clamp_min(1e-30))).sum()


def usage_entropy(counts: Tensor) -> Tensor:
    """Entropy (nats) of the empirical usage distribution given per-expert counts; 0 for no tokens."""
    total = counts.sum()
    if total <= 0:
        return counts.new_zeros(())
    q = counts / total
    return -(q * torch.log(q.clamp_min(1e-30))).sum()


def tree_losses(
    config: FFFConfig,
    path_nodes: Tensor,
    path_logits: Tensor,
    leaf: Tensor,
    *,
    harden_on: Tensor | None = None,
    leaf_probs: Tensor | None = None,
    all_logits: Tensor | None = None,
    right: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The auxiliary loss of an FFF tree's training forward: ``(weighted aux_loss, unweighted terms)``.

    Shared by the core layer and every dispatch backend, so that all train the same objective.
    path_nodes, path_logits: [S, D]; leaf: [S]. ``harden_on``: the logits whose decisions the hardening
    term averages (default: the path's). For ``load_balance="leaf"`` the leaf distribution is needed:
    ``leaf_probs`` [S, L], or ``all_logits`` [S, N] to compute it from. ``right`` [S, D]: the turns taken, for the
    node balancing loss, when they are not the path logits' signs.
    """
    zero = path_logits.new_zeros((), dtype=torch.float32)
    harden = hardening_loss(path_logits if harden_on is None else harden_on)
    K = config.n_trees
    if config.load_balance == "leaf":
        if leaf_probs is None:
            if all_logits is None:
                raise ValueError("load_balance='leaf' needs the leaf distribution: pass leaf_probs or all_logits")
            leaf_probs = tree.leaf_probs(all_logits.float(), config.depth)
        if K == 1:
            balance = leaf_balance_loss(leaf_probs, leaf)
        else:  # each tree's Switch loss L * sum_i f_ki P_ki, averaged over the trees: over the forest's K * L
            # leaves the function gives K * L * sum f P, so the mean over the trees is that / K**2
            S, L = leaf.shape[0] // K, config.n_leaves
            balance = leaf_balance_loss(leaf_probs.reshape(S, K * L), forest_index(leaf, K, L)) / K**2
    elif config.load_balance == "node":
        # a forest's nodes numbered over all its trees: each level's terms then add up to 1 over the trees together
        nodes = path_nodes
        if K > 1:
            nodes = nodes + tree_of_row(nodes.shape[0], K, nodes.device)[:, None] * config.n_nodes
        balance = node_balance_loss(nodes, path_logits, config.total_nodes, right)
    else:
        balance = zero
    aux = config.hardening * harden + (config.load_balance_coef * balance if config.load_balance != "none" else zero)
    return aux, {"hardening": harden, "load_balance": balance}


def tree_stats(config: FFFConfig, leaf: Tensor, path_logits: Tensor) -> dict[str, Tensor]:
    """Detached routing statistics of a tree: tokens per leaf, unused leaves, mean decision entropy, the tokens
    whose node logits are not finite (NaN or inf inputs: their descent goes left at a NaN decision, so they are
    routed, and counted, but their routing means nothing), and ``node_counts`` [2, N] ([2, K, N] for a forest):
    the tokens that reached each node and those of them that went right (:func:`level_imbalance` reads a collapse
    from them)."""
    K = config.n_trees
    leaf = leaf.detach().reshape(-1)
    counts = counts_of(leaf if K == 1 else forest_index(leaf, K, config.n_leaves), config.total_leaves)  # [K*L]
    nodes, right = tree.path_nodes_of_leaf(leaf, config.depth)  # [S*K, D]
    if K > 1:
        nodes = nodes + tree_of_row(nodes.shape[0], K, nodes.device)[:, None] * config.n_nodes
    node_counts = torch.stack((counts_of(nodes, config.total_nodes),
                               torch.zeros(config.total_nodes, dtype=torch.float32, device=leaf.device).index_add_(
                                   0, nodes.reshape(-1), right.reshape(-1).float())))  # [2, K*N]
    if K > 1:
        node_counts = node_counts.reshape(2, K, config.n_nodes)  # [2, K, N]: level_imbalance pools each level
    logits = path_logits.detach().float()
    finite = torch.isfinite(logits).all(-1, keepdim=True)  # [S, 1]
    n_finite = finite.sum() * logits.shape[-1]
    # the mean decision entropy over the finite tokens (masked, so that the shapes do not depend on the values)
    entropy = torch.where(finite, bernoulli_entropy(torch.where(finite, logits, 0.0)), 0.0).sum()
    return {
        "counts": counts,
        "unused_leaves": (counts == 0).sum().float(),
        "decision_entropy": entropy / n_finite.clamp_min(1),
        "nonfinite_tokens": (~finite).sum().float(),
        "node_counts": node_counts,
    }


def level_imbalance(node_counts: Tensor) -> Tensor:
    """Per level of a tree, how one-sided its decisions are: ``sum_n |2 R_n - T_n| / sum_n T_n`` over the level's
    nodes, from ``node_counts`` [2, N] (T_n tokens reaching node n, R_n of them going right). 0 when every node
    splits its tokens evenly, 1 when every node sends all of them one way (a collapse). Returns [D] (float64);
    a level no token reached gives 0."""
    counts = node_counts.double()
    if counts.dim() == 3:  # [2, K, N] of a forest: its trees' nodes of one level together
        counts = counts.transpose(0, 1)
    depth = int(counts.shape[-1] + 1).bit_length() - 1
    out = []
    for level in range(depth):
        sl = tree.level_slice(level)
        reached, right = counts[..., 0, sl], counts[..., 1, sl]
        out.append((2 * right - reached).abs().sum() / reached.sum().clamp_min(1.0))
    return torch.stack(out) if out else counts.new_zeros(0)


def warn_nonfinite(owner: object, stats: dict[str, Tensor], name: str) -> None:
    """Warn once per ``owner`` when a call routed tokens with non-finite node logits.

    Reading the count is a host sync, so it is done for CPU tensors only; on accelerators the count is in
    ``stats["nonfinite_tokens"]`` (the fairseq criterion logs it)."""
    count = stats["nonfinite_tokens"]
    if getattr(owner, "_warned_nonfinite", False) or count.device.type != "cpu" or torch.compiler.is_compiling():
        return
    n = int(count.item())
    if n:
        warnings.warn(
            f"{name}: {n} token(s) reached the tree with non-finite node logits (NaN or inf in the input or the "
            f"weights); they were routed by a meaningless comparison. stats['nonfinite_tokens'] counts them in "
            f"every call; this warning is given once per layer", RuntimeWarning, stacklevel=3,
        )
        object.__setattr__(owner, "_warned_nonfinite", True)
