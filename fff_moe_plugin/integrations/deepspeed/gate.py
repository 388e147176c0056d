"""The FFF tree as a gate of DeepSpeed's ``MOELayer``: hard descent to one leaf, path probability as weight.

The tree is the core's :class:`~fff_moe_plugin.router.TreeRouter`: it routes, gives the combine weight (the path
probability) and the auxiliary loss. What this file adds is DeepSpeed's gate contract around it: capacity, token
dropping, and the two return shapes DeepSpeed has used.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, NamedTuple, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...config import FFFConfig
from ...dispatch import DispatchConfig
from ...router import Routing, TreeRouter, move_legacy_keys

if TYPE_CHECKING:
    from torch.distributed import Work


class RoutingRecord(NamedTuple):
    """What one gate call decided, beyond DeepSpeed's tuple (read by :meth:`FFFMoE.forward_block`).

    losses: unweighted ``hardening`` and ``load_balance`` (float32 scalars, zeros in eval; ``hardening`` is
            detached when its weight in the config is 0).
    stats:  ``counts`` [L] tokens routed to each leaf before capacity, ``dropped`` tokens over capacity,
            ``capacity`` slots per leaf, ``unused_leaves``, ``decision_entropy``, ``nonfinite_tokens`` (all
            detached float32), as a :class:`LazyStats` mapping: computed when first read.
    """

    losses: dict[str, Tensor]
    stats: Mapping[str, Tensor]


class LazyStats(Mapping[str, Tensor]):
    """A read-only mapping of routing statistics, computed on first read (none are computed for a call whose
    statistics nobody reads): ``compute()`` returns the dict, once."""

    __slots__ = ("_compute", "_values")

    def __init__(self, compute: Callable[[], dict[str, Tensor]]) -> None:
        self._compute: Optional[Callable[[], dict[str, Tensor]]] = compute
        self._values: Optional[dict[str, Tensor]] = None

    def _get(self) -> dict[str, Tensor]:
        if self._values is None:
            self._values = self._compute()
            self._compute = None
        return self._values

    def __getitem__(self, key: str) -> Tensor:
        return self._get()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._get())

    def __len__(self) -> int:
        return len(self._get())

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._get()!r})"


def _routing_stats(router: TreeRouter, routing: Routing, used: Optional[Tensor], kept: Tensor,
                   capacity: Tensor) -> dict[str, Tensor]:
    """The router's statistics of the routed tokens, plus ``dropped`` and ``capacity``."""
    stats = router.stats(routing if used is None else routing.select(used))
    stats["dropped"] = ((~kept).sum() if used is None else (used & ~kept).sum()).float()
    stats["capacity"] = capacity.detach().float()
    return stats


class TreeGate(nn.Module):
    """FFF tree gate for ``deepspeed.moe.sharded_moe.MOELayer`` (Belcak & Wattenhofer, arXiv 2308.14711); a forest
    of K trees routes each token to one leaf in each, K assignments per token as DeepSpeed's top-K gates make.

    Each token descends the tree of ``config.depth`` single-neuron nodes (``router``, a
    :class:`~fff_moe_plugin.router.TreeRouter`) to one leaf (expert); the leaf's output is weighted by the path
    probability, exactly as the core FFF layer in hard mode. Capacity follows DeepSpeed and the
    :class:`~fff_moe_plugin.dispatch.DispatchConfig`: ``max(ceil(S / L * capacity_factor), min_capacity)``
    slots per leaf (``eval_capacity_factor`` in eval); tokens beyond it are dropped in arrival order (their tree
    output is zero). Dropless, the capacity is the largest leaf load. In both cases the capacity is agreed (max)
    over the expert-parallel group, as the all-to-all needs, in every call: ranks may route different numbers of
    tokens (ragged batches). With token dropping and ``uniform_tokens`` the agreement is made once, on the first
    call, which checks that every rank of the group routes the same number of tokens (ValueError otherwise);
    later calls take each rank's own capacity as the group's, as DeepSpeed's top-1 and top-2 gates always do. A
    later call whose token count differs between ranks then breaks the all-to-all (gloo aborts on the size
    mismatch), so it is for fixed-shape batches only.

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
        dispatch: Optional[DispatchConfig] = None,
        ep_group: Optional[torch.distributed.ProcessGroup] = None,
        uniform_tokens: bool = False,
    ) -> None:
        super().__init__()
        self.config = config
        self.dispatch = DispatchConfig() if dispatch is None else dispatch
        if not isinstance(uniform_tokens, bool):
            raise ValueError(f"TreeGate: uniform_tokens = {uniform_tokens!r} is not allowed: must be True or False")
        if uniform_tokens and self.dispatch.dropless:
            raise ValueError("TreeGate: uniform_tokens = True is not allowed with a dropless dispatch: its capacity is "
                             "the largest leaf load over the expert-parallel group, agreed in every call (it applies "
                             "to token dropping, whose capacity follows from the token count alone)")
        self.uniform_tokens = uniform_tokens
        self._uniform_checked = False  # the first call's check of uniform_tokens has passed
        self.k = config.n_trees  # leaves per token (one per tree); DeepSpeed reads this attribute
        self.ep_group = ep_group
        self._ep_world: Optional[int] = None  # the group's size, read once
        self.router = TreeRouter(config)
        self.last_record: Optional[RoutingRecord] = None
        self.register_load_state_dict_pre_hook(_move_legacy_keys)

    def _set_ep_group(self, ep_group: torch.distributed.ProcessGroup) -> None:
        if self.ep_group is not None and self.ep_group is not ep_group:
            raise ValueError("TreeGate already has an expert-parallel group; it is set once per layer")
        self.ep_group = ep_group
        self._ep_world = None

    def forward(
        self,
        input: Tensor,
        used_token: Optional[Tensor] = None,
        sparse_routes: bool = False,
        use_tutel: bool = False,
    ) -> Union[tuple[Tensor, Tensor, int, Tensor, Tensor, Tensor, Tensor], tuple[Tensor, Tensor, Tensor, Tensor]]:
        # S tokens, d model width, N nodes, L leaves (all the trees'), K trees, A = S * K assignments, C capacity
        c = self.config
        S, K, L = input.shape[0], c.n_trees, c.total_leaves
        # with token dropping the capacity follows from S alone: its agreement over the group runs while routing
        agreed = None if self.dispatch.dropless else self._fixed_capacity(S, input.device)
        # routing in float32 at least (float64 stays float64), as DeepSpeed's gates do: the core layer's router
        routing = self.router(input)
        _, leaf = self.router.assignments(routing)  # [A]: each token's leaf in each tree, over all the trees

        if used_token is None:  # every token routed: no masking, no copies
            used = None
            group_counts = torch.bincount(leaf, minlength=L)  # [L]
            counts = group_counts  # [L] before capacity, like DeepSpeed's exp_counts
            location = _arrival_rank(leaf, group_counts)  # [A]: position of each assignment among its leaf's
        else:
            used = (used_token.reshape(S) > 0).repeat_interleave(K)  # [A]
            route = torch.where(used, leaf, L)  # [A]; L = not routed
            group_counts = torch.bincount(route, minlength=L + 1)  # [L + 1]
            counts = group_counts[:L]
            location = _arrival_rank(route, group_counts)
        capacity = self._agree(*agreed) if agreed is not None else self._dropless_capacity(counts)
        kept = location < capacity if used is None else used & (location < capacity)  # [A]

        l_aux, losses = self.router.losses(routing if used is None else routing.select(used))
        # the statistics read the leaves and path logits only: the record keeps no other tensor alive
        stats_of = Routing(routing.path_nodes, routing.path_logits.detach(), routing.leaf, routing.gate.detach())
        self.last_record = RoutingRecord(losses, LazyStats(functools.partial(
            _routing_stats, self.router, stats_of, used, kept, capacity)))

        gates = torch.where(kept, routing.gate, 0.0)  # [A]
        if sparse_routes:  # one (leaf, slot, gate) per tree and token: [K, S], as DeepSpeed's top-K gates give
            indices = torch.where(kept, leaf, -1).to(torch.int32).view(S, K).t()
            locations = torch.where(kept, location, 0).to(torch.int32).view(S, K).t()
            return l_aux, capacity, L, indices, locations, gates.view(S, K).t(), counts

        # dense contract: one-hot (leaf, slot) per kept assignment, a token's K trees side by side
        C = int(capacity)
        slot = torch.where(kept, leaf * C + location, torch.full_like(leaf, L * C)).view(S, K)  # L*C = nowhere
        combine = torch.zeros(S, L * C + 1, dtype=gates.dtype, device=input.device)
        combine = combine.scatter_add(1, slot, gates.view(S, K))  # [S, L*C + 1]; a forest's trees' leaves differ
        dispatch = F.one_hot(slot, L * C + 1).any(1)
        return l_aux, combine[:, : L * C].view(S, L, C), dispatch[:, : L * C].view(S, L, C), counts

    def _ep_world_size(self) -> int:
        if self.ep_group is None:
            return 1
        if self._ep_world is None:
            self._ep_world = torch.distributed.get_world_size(self.ep_group)
        return self._ep_world

    def _fixed_capacity(self, S: int, device: torch.device) -> tuple[Tensor, Optional[Work]]:
        """Capacity with token dropping, ``max(ceil(S / L * factor), min_capacity)`` (int64 scalar), and the
        pending max over the expert-parallel group (None on one rank): collected by :meth:`_agree`."""
        factor = self.dispatch.factor(self.training)
        capacity = max(math.ceil(S / self.config.n_leaves * factor), self.dispatch.min_capacity)
        capacity = torch.tensor(capacity, dtype=torch.int64, device=device)
        if self._ep_world_size() == 1 or (self.uniform_tokens and self._uniform_checked):
            return capacity, None
        if self.uniform_tokens:
            self._check_uniform(S, device)
            return capacity, None
        return capacity, torch.distributed.all_reduce(capacity, op=torch.distributed.ReduceOp.MAX,
                                                      group=self.ep_group, async_op=True)

    def _check_uniform(self, S: int, device: torch.device) -> None:
        """With ``uniform_tokens``, once: every rank of the group routes ``S`` tokens, or ValueError on every rank."""
        extremes = torch.tensor([S, -S], dtype=torch.int64, device=device)
        torch.distributed.all_reduce(extremes, op=torch.distributed.ReduceOp.MAX, group=self.ep_group)
        most, least = int(extremes[0]), -int(extremes[1])
        if most != least:
            raise ValueError(f"TreeGate: uniform_tokens is set, but the ranks of the expert-parallel group route "
                             f"{least} to {most} tokens to this layer: every rank must route the same number (leave "
                             "uniform_tokens off for batches whose token counts differ: the capacity is then agreed "
                             "over the group in every call)")
        self._uniform_checked = True

    @staticmethod
    def _agree(capacity: Tensor, work: Optional[Work]) -> Tensor:
        """The capacity from :meth:`_fixed_capacity`, once the group's max has arrived."""
        if work is not None:
            work.wait()
        return capacity

    def _dropless_capacity(self, counts: Tensor) -> Tensor:
        """Without token dropping: the largest leaf load (int64 scalar), the max over the expert-parallel group."""
        capacity = counts.max().to(torch.int64)
        if self._ep_world_size() > 1:
            torch.distributed.all_reduce(capacity, op=torch.distributed.ReduceOp.MAX, group=self.ep_group)
        return capacity


def _arrival_rank(route: Tensor, counts: Tensor) -> Tensor:
    """Rank of each token among the tokens of its group, in token order: route [S] long (groups ``0 ..
    G-1``), counts [G] (the groups' sizes, ``bincount(route, minlength=G)``) -> [S] long."""
    grouped, order = torch.sort(route, stable=True)  # [S]: the groups in order, tokens in arrival order within
    start = counts.cumsum(0) - counts  # first sorted position of each group
    rank_sorted = torch.arange(route.shape[0], device=route.device) - start[grouped]
    return torch.empty_like(route).scatter_(0, order, rank_sorted)


def _move_legacy_keys(module: nn.Module, state_dict: dict, prefix: str, *args) -> None:
    move_legacy_keys(state_dict, prefix)  # a gate written before it held a router: node_weight -> router.node_weight
