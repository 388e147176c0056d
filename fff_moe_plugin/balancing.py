"""Balancing without an auxiliary loss: each node's decision shift, moved after every optimizer step.

DeepSeek-V3 (arXiv 2412.19437, §2.1.2) gives every expert a bias that is added to its affinity for the top-K
choice only, and after each step moves it by a fixed rate against the expert's excess load. In a tree the choice
is made at the nodes (docs/methods.md §3): with ``FFFConfig.bias_update_rate`` u > 0 (or ``load_balance="bias"``)
node n holds a shift ``balance_bias[n]`` (a buffer of :class:`~fff_moe_plugin.router.TreeRouter`, saved with the
weights) that is added to its logit for the hard decision only: a token goes right when ``z_n + shift_n >= 0``.
The gradient path is unchanged: the leaf's weight is the path probability of the path taken under the unshifted
logits, as DeepSeek-V3 weights a chosen expert by its unbiased affinity, so a token the shift sent the other way
is weighted by ``sigmoid(-|z_n|) < 1/2`` at that node; every loss uses the unshifted logits.

After each optimizer step, with ``T_n`` the tokens that reached node n since the last update and ``R_n`` those
that went right, the shift moves against the right-hand excess relative to the share of leaves under the right
child (one half: uniform leaf load)::

    shift_n -= u * sign(R_n / T_n - 1/2)        (a node no token reached keeps its shift)

:func:`update_balance_biases` sums the counts over the data-parallel ranks first, so every rank holds the same
shifts and routes identically. fairseq (the plugin's trainer hook) and DeepSpeed (the engine of
``fff_moe_plugin.deepspeed.initialize``) call it after each optimizer step; a plain PyTorch loop calls it after
``optimizer.step()``.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from .router import TreeRouter


def balanced_routers(model: nn.Module) -> list[TreeRouter]:
    """The routers of ``model`` (any nesting, any wrapper) that balance by decision shifts, in module order."""
    return [m for m in model.modules() if isinstance(m, TreeRouter) and m.balance_bias is not None]


@torch.no_grad()
def update_balance_biases(model: nn.Module, group: Optional[dist.ProcessGroup] = None) -> int:
    """Move the decision shifts of every bias-balanced router of ``model`` by the counts since the last update,
    summed over the ranks of ``group`` (the whole world when None and torch.distributed is up): one all-reduce,
    on every rank in the same order. Returns the number of routers updated."""
    routers = balanced_routers(model)
    if not routers:
        return 0
    counts = torch.cat([r.balance_counts.reshape(-1) for r in routers])  # int64
    if dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(counts, group=group)
    offset = 0
    for r in routers:
        n = r.balance_counts.numel()
        r.apply_balance_counts(counts[offset:offset + n].view_as(r.balance_counts))
        offset += n
    return len(routers)


def after_optimizer_step(model: nn.Module, num_updates: int, group: Optional[dist.ProcessGroup] = None) -> None:
    """What a training loop calls after each optimizer step, ``num_updates`` being the updates done: the routers
    learn the update count (the soft-to-hard schedule, ``FFFConfig.soft_updates``) and the bias-balanced ones move
    their shifts (:func:`update_balance_biases`). fairseq and the DeepSpeed engine of
    ``fff_moe_plugin.deepspeed.initialize`` do this themselves."""
    for m in model.modules():
        if isinstance(m, TreeRouter):
            m.set_num_updates(num_updates)
    update_balance_biases(model, group)
