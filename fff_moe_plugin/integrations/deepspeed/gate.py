"""The FFF tree as a gate of DeepSpeed's ``MOELayer``: hard descent to one leaf, path probability as weight.

The tree math is the core's: :func:`fff_moe_plugin.tree.descend` and :func:`~fff_moe_plugin.tree.leaf_probs`
route, :meth:`fff_moe_plugin.fff.FFF.leaf_gate` (the very same function, bound to this class) gives the
combine weight, and :mod:`fff_moe_plugin.losses` the auxiliary loss. What this file adds is DeepSpeed's gate
contract around them: capacity, token dropping, and the two return shapes DeepSpeed has used.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, NamedTuple, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ... import tree
from ...config import FFFConfig
from ...fff import FFF
from ...losses import tree_losses, tree_stats

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


def _routing_stats(config: FFFConfig, leaf: Tensor, path_logits: Tensor, used: Optional[Tensor], kept: Tensor,
                   capacity: Tensor) -> dict[str, Tensor]:
    """:func:`~fff_moe_plugin.losses.tree_stats` of the routed tokens, plus ``dropped`` and ``capacity``."""
    stats = tree_stats(config, leaf if used is None else leaf[used], path_logits)
    stats["dropped"] = ((~kept).sum() if used is None else (used & ~kept).sum()).float()
    stats["capacity"] = capacity.detach().float()
    return stats


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
        self._ep_world: Optional[int] = None  # the group's size, read once
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
        return tree.decision_linear(x, self.node_weight, b)

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
        # S tokens, d model width, N nodes, L leaves, D depth, C capacity per leaf
        c = self.config
        S, L = input.shape[0], c.n_leaves
        # with token dropping the capacity follows from S alone: its agreement over the group runs while routing
        agreed = self._fixed_capacity(S, input.device) if self.drop_tokens else None
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

        if used_token is None:  # every token routed: no masking, no copies
            used = None
            group_counts = torch.bincount(leaf, minlength=L)  # [L]
            counts = group_counts  # [L] before capacity, like DeepSpeed's exp_counts
            location = _arrival_rank(leaf, group_counts)  # [S]: position of each token among those sent to its leaf
        else:
            used = used_token.reshape(S) > 0
            route = torch.where(used, leaf, L)  # [S]; L = not routed
            group_counts = torch.bincount(route, minlength=L + 1)  # [L + 1]
            counts = group_counts[:L]
            location = _arrival_rank(route, group_counts)
        capacity = self._agree(*agreed) if agreed is not None else self._dropless_capacity(counts)
        kept = location < capacity if used is None else used & (location < capacity)  # [S]

        all_logits = self.balance_logits(x, routed, leak) if self.training else None  # [S, N] or None
        if used is None:
            l_aux, losses = self._losses(path_nodes, path_logits, leaf, all_logits)
        else:
            l_aux, losses = self._losses(path_nodes[used], path_logits[used], leaf[used],
                                         None if all_logits is None else all_logits[used])
        self.last_record = RoutingRecord(losses, LazyStats(functools.partial(
            _routing_stats, c, leaf, path_logits.detach(), used, kept, capacity)))

        gates = torch.where(kept, gate, 0.0)  # [S]
        if sparse_routes:
            indices = torch.where(kept, leaf, -1).to(torch.int32)  # [S]
            locations = torch.where(kept, location, 0).to(torch.int32)  # [S]
            return l_aux, capacity, L, indices[None], locations[None], gates[None], counts

        # dense contract: one-hot (leaf, slot) per kept token
        C = int(capacity)
        slot = torch.where(kept, leaf * C + location, torch.full_like(leaf, L * C))  # [S]; L*C = nowhere
        combine = torch.zeros(S, L * C + 1, dtype=gates.dtype, device=x.device)
        combine = combine.scatter(1, slot[:, None], gates[:, None])  # [S, L*C + 1]
        dispatch = F.one_hot(slot, L * C + 1).bool()
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
        factor = self.capacity_factor if self.training else self.eval_capacity_factor
        capacity = max(math.ceil(S / self.config.n_leaves * factor), self.min_capacity)
        capacity = torch.tensor(capacity, dtype=torch.int64, device=device)
        if self._ep_world_size() == 1:
            return capacity, None
        return capacity, torch.distributed.all_reduce(capacity, op=torch.distributed.ReduceOp.MAX,
                                                      group=self.ep_group, async_op=True)

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

    def _losses(self, path_nodes: Tensor, path_logits: Tensor, leaf: Tensor,
                all_logits: Optional[Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        """The core layer's weighted aux loss and unweighted terms for the routed tokens; zeros in eval."""
        if not self.training:
            zero = torch.zeros((), dtype=torch.float32, device=path_logits.device)
            return zero, {"hardening": zero, "load_balance": zero}
        # with weight 0 the hardening term only reports: the same value, off the autograd graph
        harden_on = path_logits.detach() if self.config.hardening == 0 else None
        return tree_losses(self.config, path_nodes, path_logits, leaf, harden_on=harden_on, all_logits=all_logits)


def _arrival_rank(route: Tensor, counts: Tensor) -> Tensor:
    """Rank of each token among the tokens of its group, in token order: route [S] long (groups ``0 ..
    G-1``), counts [G] (the groups' sizes, ``bincount(route, minlength=G)``) -> [S] long."""
    grouped, order = torch.sort(route, stable=True)  # [S]: the groups in order, tokens in arrival order within
    start = counts.cumsum(0) - counts  # first sorted position of each group
    rank_sorted = torch.arange(route.shape[0], device=route.device) - start[grouped]
    return torch.empty_like(route).scatter_(0, order, rank_sorted)
