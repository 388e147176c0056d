"""The FFF tree as a gate of DeepSpeed's ``MOELayer``: hard descent to one leaf, path probability as weight.

The tree math is the core's: :func:`fff_moe_plugin.tree.descend` and :func:`~fff_moe_plugin.tree.leaf_probs`
route, :meth:`fff_moe_plugin.fff.FFF.leaf_gate` (the very same function, bound to this class) gives the
combine weight, and :mod:`fff_moe_plugin.losses` the auxiliary loss. What this file adds is DeepSpeed's gate
contract around them: capacity, token dropping, and the two return shapes DeepSpeed has used.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ... import tree
from ...config import FFFConfig
from ...fff import FFF
from ...losses import tree_losses, tree_stats


class RoutingRecord(NamedTuple):
    """What one gate call decided, beyond DeepSpeed's tuple (read by :meth:`FFFMoE.forward_block`).

    losses: unweighted ``hardening`` and ``load_balance`` (float32 scalars, zeros in eval).
    stats:  ``counts`` [L] tokens routed to each leaf before capacity, ``dropped`` tokens over capacity,
            ``capacity`` slots per leaf, ``unused_leaves``, ``decision_entropy`` (all detached float32).
    """

    losses: dict[str, Tensor]
    stats: dict[str, Tensor]


class TreeGate(nn.Module):
    """FFF tree gate for ``deepspeed.moe.sharded_moe.MOELayer`` (Belcak & Wattenhofer, arXiv 2308.14711).

    Each token descends the tree of ``config.depth`` single-neuron nodes to one leaf (expert), computing only
    the ``depth`` nodes on its path; the leaf's output is weighted by the path probability, exactly as the
    core FFF layer in hard mode. Capacity follows DeepSpeed: ``ceil(S / L * capacity_factor)`` slots per leaf
    (``eval_capacity_factor`` in eval), at least ``min_capacity``; tokens beyond it are dropped in arrival
    order (their tree output is zero). With ``drop_tokens=False`` the capacity is the largest leaf load. In
    both cases the capacity is agreed (max) over the expert-parallel group, as the all-to-all needs.

    ``forward(x [S, d], used_token [S] | None, sparse_routes, use_tutel)`` returns
    - ``sparse_routes=True`` (DeepSpeed 0.19): ``(l_aux, capacity, L, indices int32 [1, S] (-1 = dropped),
      locations int32 [1, S], gates [1, S], exp_counts [L])``;
    - ``sparse_routes=False`` (older releases): ``(l_aux, combine_weights [S, L, C], dispatch_mask [S, L, C],
      exp_counts [L])``.
    ``l_aux`` is ``hardening * entropy + load_balance_coef * balance`` (the config's weights already applied;
    zero in eval), so the caller adds it to the loss as it is. Parameter names never contain "expert"
    (DeepSpeed's checkpointing treats such names as expert weights).
    """

    def __init__(
        self,
        config: FFFConfig,
        capacity_factor: float = 1.0,
        eval_capacity_factor: float = 1.0,
        min_capacity: int = 4,
        drop_tokens: bool = True,
        ep_group: Optional[torch.distributed.ProcessGroup] = None,
    ) -> None:
        super().__init__()
        self.config = config
        self.k = 1  # one leaf per token; DeepSpeed reads this attribute
        self.capacity_factor = capacity_factor
        self.eval_capacity_factor = eval_capacity_factor
        self.min_capacity = min_capacity
        self.drop_tokens = drop_tokens
        self.ep_group = ep_group
        N, d = config.n_nodes, config.d_model
        k = 1.0 / math.sqrt(d)
        self.node_weight = nn.Parameter(torch.empty(N, d).uniform_(-k, k))  # [N, d]
        self.node_bias = nn.Parameter(torch.empty(N).uniform_(-k, k)) if config.bias else None  # [N]
        self.last_record: Optional[RoutingRecord] = None

    # the core layer's combine weight (path probability) and balancing-loss logits: the functions, not copies
    leaf_gate = FFF.leaf_gate
    needs_every_logit = FFF.needs_every_logit
    balance_logits = FFF.balance_logits

    def node_logits(self, x: Tensor) -> Tensor:
        """Every node's logit [S, N], on node weights cast to the (promoted) dtype of ``x``."""
        b = self.node_bias.to(x.dtype) if self.node_bias is not None else None
        return F.linear(x, self.node_weight.to(x.dtype), b)

    def _set_ep_group(self, ep_group: torch.distributed.ProcessGroup) -> None:
        if self.ep_group is not None and self.ep_group is not ep_group:
            raise ValueError("TreeGate already has an expert-parallel group; it is set once per layer")
        self.ep_group = ep_group

    def forward(
        self,
        input: Tensor,
        used_token: Optional[Tensor] = None,
        sparse_routes: bool = False,
        use_tutel: bool = False,
    ) -> Union[tuple[Tensor, Tensor, int, Tensor, Tensor, Tensor, Tensor], tuple[Tensor, Tensor, Tensor, Tensor]]:
        # S tokens, d model width, N nodes, L leaves, D depth, C capacity per leaf
        c = self.config
        S, L = input.shape[0], c.n_leaves
        # routing runs in float32 at least (float64 stays float64), as DeepSpeed's gates do
        dtype = torch.promote_types(input.dtype, torch.float32)
        x = input.to(dtype)  # [S, d]
        w = self.node_weight.to(dtype)  # [N, d]
        b = self.node_bias.to(dtype) if self.node_bias is not None else None  # [N]
        leak = c.region_leak if self.training else 0.0
        # the core layer's descent on the (promoted) node weights: the same routing, to the last bit
        path_nodes, path_logits, end, routed = tree.route(  # [S, D], [S, D], [S], [S, N] or None
            x, w, b, c.depth, leak_rate=leak, every_logit=self.needs_every_logit())
        leaf = end - c.n_nodes  # [S]
        gate = self.leaf_gate(path_logits)  # [S]

        used = torch.ones(S, dtype=torch.bool, device=x.device) if used_token is None else used_token.reshape(S) > 0
        route = torch.where(used, leaf, torch.full_like(leaf, L))  # [S]; L = not routed
        counts = torch.bincount(route, minlength=L + 1)[:L]  # [L] before capacity, like DeepSpeed's exp_counts
        capacity = self._capacity(S, counts)
        location = _arrival_rank(route, L)  # [S]: position of each token among those sent to its leaf
        kept = used & (location < capacity)  # [S]
        dropped = (used & ~kept).sum()

        all_logits = self.balance_logits(x, routed, leak) if self.training else None  # [S, N] or None
        l_aux, losses = self._losses(path_nodes[used], path_logits[used], leaf[used],
                                     None if all_logits is None else all_logits[used])
        stats = {
            **tree_stats(c, leaf[used], path_logits),
            "dropped": dropped.detach().float(),
            "capacity": capacity.detach().float(),
        }
        self.last_record = RoutingRecord(losses, stats)

        gates = torch.where(kept, gate, torch.zeros_like(gate))  # [S]
        if sparse_routes:
            indices = torch.where(kept, leaf, torch.full_like(leaf, -1)).to(torch.int32)  # [S]
            locations = torch.where(kept, location, torch.zeros_like(location)).to(torch.int32)  # [S]
            return l_aux, capacity, L, indices[None], locations[None], gates[None], counts

        # dense contract: one-hot (leaf, slot) per kept token
        C = int(capacity)
        slot = torch.where(kept, leaf * C + location, torch.full_like(leaf, L * C))  # [S]; L*C = nowhere
        combine = torch.zeros(S, L * C + 1, dtype=gates.dtype, device=x.device)
        combine = combine.scatter(1, slot[:, None], gates[:, None])  # [S, L*C + 1]
        dispatch = F.one_hot(slot, L * C + 1).bool()
        return l_aux, combine[:, : L * C].view(S, L, C), dispatch[:, : L * C].view(S, L, C), counts

    def _capacity(self, S: int, counts: Tensor) -> Tensor:
        """Slots per leaf (int64 scalar), the same on every rank of the expert-parallel group."""
        if self.drop_tokens:
            factor = self.capacity_factor if self.training else self.eval_capacity_factor
            capacity = max(math.ceil(S / self.config.n_leaves * factor), self.min_capacity)
            capacity = torch.tensor(capacity, dtype=torch.int64, device=counts.device)
        else:
            capacity = counts.max().to(torch.int64)
        if self.ep_group is not None and torch.distributed.get_world_size(self.ep_group) > 1:
            torch.distributed.all_reduce(capacity, op=torch.distributed.ReduceOp.MAX, group=self.ep_group)
        return capacity

    def _losses(self, path_nodes: Tensor, path_logits: Tensor, leaf: Tensor,
                all_logits: Optional[Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        """The core layer's weighted aux loss and unweighted terms for the routed tokens; zeros in eval."""
        if not self.training:
            zero = torch.zeros((), dtype=torch.float32, device=path_logits.device)
            return zero, {"hardening": zero, "load_balance": zero}
        return tree_losses(self.config, path_nodes, path_logits, leaf, all_logits=all_logits)


def _arrival_rank(route: Tensor, n_groups: int) -> Tensor:
    """Rank of each token among the tokens of its group, in token order: [S] long -> [S] long."""
    S = route.shape[0]
    order = torch.argsort(route, stable=True)  # [S]
    counts = torch.bincount(route, minlength=n_groups + 1)
    start = torch.cumsum(counts, 0) - counts  # first sorted position of each group
    rank_sorted = torch.arange(S, device=route.device) - start[route[order]]
    return torch.empty_like(route).scatter(0, order, rank_sorted)
