"""The FFF tree on Tutel's dispatch: nodes as a Tutel gate, leaves as Tutel experts sharded over ranks.

Tutel's ``moe_layer`` does the routing bookkeeping, capacity, dispatch (``fast_encode``), all-to-all, the
leaf MLPs (its built-in ``ffn`` experts) and the combine (``fast_decode``). This module adds what is the
tree's: the gate (:mod:`.gate`), the path-probability scale, the master leaf, and the auxiliary losses and
statistics of the core :class:`fff_moe_plugin.FFF`.
"""

from __future__ import annotations

import functools
import math
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from tutel import moe as tutel_moe

from ...activations import activation_fn
from ...block import BlockOutput, FeedForwardBlock
from ...config import FFFConfig
from ...dispatch import DispatchConfig, ExpertParallelFFF
from ...fff import FFF
from ...leaves import MasterLeaf
from ...router import TreeRouter, move_legacy_keys
from .gate import TutelTreeGate


def _leaf_hidden(activation: str, dropout: float, h: Tensor, experts: nn.Module) -> Tensor:
    """The leaves' hidden activation for Tutel's ``ffn`` experts (``activation_fn_with_self``)."""
    return F.dropout(activation_fn(activation)(h), dropout, experts.training)


def _tag_leaf(name: str, param: nn.Parameter) -> None:
    # data-parallel wrappers that know expert parallelism (fairseq's legacy_ddp) leave these out of the
    # gradient all-reduce: each rank owns its leaves
    param.expert = True


def _dispatch(dispatch: DispatchConfig | None, capacity_factor: float | None, W: int) -> DispatchConfig:
    """The layer's DispatchConfig: given, or from Tutel's capacity factor (0 dropless, c > 0 capped, c < 0 dropless up
    to |c|; neither given: dropless), on a group of W ranks."""
    if dispatch is None:
        c = 0.0 if capacity_factor is None else capacity_factor
        try:
            return DispatchConfig.from_capacity(c, ep_size=W, min_capacity=0)
        except ValueError:
            raise ValueError(f"TutelFFF: capacity_factor = {c!r} is not allowed: a finite number is required "
                             "(0 = dropless, > 0 = capped, < 0 = dropless up to that cap)") from None
    if capacity_factor is not None:
        raise TypeError("TutelFFF: give either a DispatchConfig or Tutel's capacity_factor, not both")
    if not isinstance(dispatch, DispatchConfig):
        raise TypeError(f"TutelFFF: dispatch must be a DispatchConfig or Tutel's capacity factor (a number), got "
                        f"{type(dispatch).__name__}")
    if dispatch.ep_size != W:
        raise ValueError(f"TutelFFF: the DispatchConfig's ep_size = {dispatch.ep_size} differs from the size of the "
                         f"process group ({W})")
    return dispatch


def _move_legacy_keys(module: nn.Module, state_dict: dict, prefix: str, *args) -> None:
    move_legacy_keys(state_dict, prefix)  # written before MasterLeaf: master_w1 -> master.w1, ...


def _world(group) -> tuple[int, int]:
    """(size, rank) of the expert-parallel group; (1, 0) without torch.distributed."""
    if not dist.is_available() or not dist.is_initialized():
        return 1, 0
    return dist.get_world_size(group), dist.get_rank(group)


class TutelFFF(FeedForwardBlock, ExpertParallelFFF):
    """Fast feedforward tree (Belcak & Wattenhofer, arXiv 2308.14711; master leaf and load balancing of eFFF,
    arXiv 2405.16836) whose dispatch, all-to-all and combine are Tutel's (arXiv 2206.03382).

    Contract: ``forward(x [..., d_model], adaptive_r=None) -> BlockOutput(output [..., d_out], aux_loss,
    losses, stats)``, the call shape of every block of the package. The caller adds ``aux_loss`` (hardening
    and load balancing, weighted by the config) to its loss. With nothing dropped, the output, losses and
    gradients are those of the core ``FFF`` with the same weights (``from_fff`` / ``to_fff`` convert).

    Layout over the W ranks of ``group`` (the whole world when None): leaf ``r * L/W + i`` lives on rank r as
    Tutel's local expert i, so ``n_leaves`` must be a multiple of W; the nodes and the master leaf are
    replicated, and their gradients must be all-reduced over data-parallel ranks as for any dense
    parameter (leaf parameters carry ``expert = True`` and Tutel's ``_tutel_expert`` to be left out).
    Each rank routes its own tokens; every rank of the group must call forward (the all-to-all is collective).
    Under DeepSpeed's engine, ``integrations.deepspeed.tutel_moe.TutelFFFMoE`` holds this layer on DeepSpeed's
    expert-parallel group and tags the leaves so that the engine reduces them as experts.

    ``capacity_factor`` is Tutel's: 0 is dropless (capacity = the largest leaf load over the group);
    c > 0 gives each leaf ``k * int(c * ceil(S / L))`` slots per rank (k leaves per token: 1, or L in soft
    training) and drops the tokens beyond them; c < 0 is dropless up to ``|c|`` times that. A dropped token's
    tree output is zero (the master leaf, if any, still runs); ``stats["dropped"]`` counts this rank's
    dropped (token, leaf) assignments. ``adaptive_r`` is passed to Tutel per call (0: every rank gathers all
    leaves and runs its own tokens; 1: leaves stay put and tokens travel by all-to-all); as in Tutel, the
    value stays in force for later calls.

    Soft training dispatches every token to every leaf (top-L) and mixes by P(leaf): correct, but the cost of
    a dense layer plus an all-to-all of L copies; hard training (``train_mode="hard"``) is what this backend
    is for. Tutel's dispatch computes in float32 for float32 and float64 inputs.
    """

    config_class = FFFConfig

    def __init__(
        self,
        config: FFFConfig,
        dispatch: DispatchConfig | None = None,
        group: dist.ProcessGroup | None = None,
        *,
        capacity_factor: float | None = None,
        scan_expert_func: Callable[[str, nn.Parameter], None] | None = None,
        init_from: FFF | None = None,
    ):
        super().__init__(config)
        c = config
        if c.d_model % 2:
            raise ValueError(f"TutelFFF: d_model = {c.d_model} is not allowed: Tutel's dispatch needs an even width")
        W, rank = _world(group)
        world, _ = _world(None)
        if 1 < W < world:
            raise ValueError(
                f"TutelFFF: a group of {W} of the {world} ranks is not allowed: Tutel's all-to-all runs its backward "
                "on the whole world whatever the group (tutel/impls/communicate.py: RestoreBackward is applied "
                "without the group), which mismatches the other groups' collectives; shard the leaves over all "
                "ranks (group=None), or keep them all on each rank (a group of one)"
            )
        if c.total_leaves % W:
            raise ValueError(
                f"TutelFFF: depth = {c.depth} ({c.total_leaves} leaves) is not allowed on {W} ranks: the leaves are "
                f"sharded over the ranks, so the number of leaves must be a multiple of the group size "
                f"(use depth >= {math.ceil(math.log2(W))} with a power-of-two group)"
            )
        self.dispatch = _dispatch(dispatch, capacity_factor, W)
        self.dispatch.check(c.total_leaves, world, "tutel")
        if init_from is not None and (not isinstance(init_from, FFF) or init_from.config != config):
            raise ValueError("TutelFFF: init_from must be an FFF with the same config")
        # NOTE: the initial values are a core FFF's, so that TutelFFF(config) under a seed equals FFF(config)
        # under that seed on every rank: they are drawn first, and the modules built below draw on a fork of the
        # RNG; the full tree exists for a moment on each rank while it is sliced.
        core = init_from if init_from is not None else FFF(config)
        self.world_size, self.rank = W, rank

        def scan(name: str, param: nn.Parameter) -> None:
            _tag_leaf(name, param)
            if scan_expert_func is not None:
                scan_expert_func(name, param)

        with torch.random.fork_rng(devices=[]):
            # the master leaf first: its parameters come first, as in checkpoints (optimizer states by position)
            # written before it was a module
            self.master = (MasterLeaf(c.d_model, c.master_leaf_width, c.d_out, c.activation, c.bias, c.leaf_dropout)
                           if c.master_leaf else None)
            self.moe = tutel_moe.moe_layer(
                gate_type={"type": "custom", "module": TutelTreeGate, "config": c, "dispatch": self.dispatch},
                model_dim=c.d_model,
                experts={
                    "type": "ffn",
                    "num_experts_per_device": c.total_leaves // W,
                    "hidden_size_per_expert": c.leaf_width,
                    "output_dim": c.d_out,
                    "activation_fn_with_self": functools.partial(_leaf_hidden, c.activation, c.leaf_dropout),
                    "has_fc1_bias": c.bias,
                    "has_fc2_bias": c.bias,
                },
                scan_expert_func=scan,
                group=group,
            )
        self.last: BlockOutput | None = None
        self.load_fff(core)
        self.register_load_state_dict_pre_hook(_move_legacy_keys)

    # -- parts and the expert-parallel interface (dispatch.ExpertParallelFFF) ----------------------------
    @property
    def gate(self) -> TutelTreeGate:
        return self.moe.gates[0]

    @property
    def router(self) -> TreeRouter:
        return self.moe.gates[0].router

    @property
    def local_leaves(self) -> range:
        """Global indices of the leaves this rank holds."""
        n = self.config.total_leaves // self.world_size
        return range(self.rank * n, (self.rank + 1) * n)

    @property
    def ep_group(self) -> dist.ProcessGroup | None:
        """Tutel's process group (None: the whole world, or one process)."""
        return self.moe.group

    def expert_parameters(self) -> list[nn.Parameter]:
        return list(self.moe.experts.parameters())

    def forward_block(self, x: Tensor) -> BlockOutput:
        """:meth:`forward`, its output also kept in ``.last``."""
        self.last = self(x)
        return self.last

    # -- conversion ---------------------------------------------------------------------------------------
    @classmethod
    def from_fff(
        cls, fff: FFF, dispatch: DispatchConfig | None = None, group: dist.ProcessGroup | None = None, **kwargs
    ) -> TutelFFF:
        """A TutelFFF with the weights of a core FFF (this rank keeps its share of the leaves)."""
        dtype = fff.router.node_weight.dtype
        return cls(fff.config, dispatch, group, init_from=fff, **kwargs).to(dtype)

    def _shared_pairs(self, fff: FFF) -> list[tuple[Tensor, Tensor]]:
        """(this layer's, the core FFF's) master-leaf parameters (the router is copied whole, by state)."""
        return [] if self.master is None else list(zip(self.master.parameters(), fff.master.parameters()))

    @torch.no_grad()
    def load_fff(self, fff: FFF) -> None:
        """Copy a core FFF's weights in: nodes and master leaf whole, the leaves of this rank."""
        if not isinstance(fff, FFF) or fff.config != self.config:
            raise ValueError("TutelFFF.load_fff needs an FFF with the same config")
        self.router.load_state_dict(fff.router.state_dict())  # nodes, decision shifts, the schedule's count
        for mine, theirs in self._shared_pairs(fff):
            mine.copy_(theirs.reshape(mine.shape))  # the blend logit: [1] under DeepSpeed (TutelFFFMoE), else []
        mine = slice(self.local_leaves.start, self.local_leaves.stop)
        e = self.moe.experts
        e.batched_fc1_w.copy_(fff.leaves.w1[mine].transpose(1, 2))  # Tutel keeps fc1 as [E, l, d]
        e.batched_fc2_w.copy_(fff.leaves.w2[mine])  # [E, l, o]
        if fff.leaves.b1 is not None:
            e.batched_fc1_bias.copy_(fff.leaves.b1[mine])  # [E, l]
            e.batched_fc2_bias.copy_(fff.leaves.b2[mine])  # [E, o]

    @torch.no_grad()
    def to_fff(self) -> FFF:
        """The core FFF with this layer's weights, leaves gathered from every rank (collective: all ranks call)."""
        out = FFF(self.config).to(self.router.node_weight.dtype)
        out.router.load_state_dict(self.router.state_dict())
        for mine, theirs in self._shared_pairs(out):
            theirs.copy_(mine.reshape(theirs.shape))
        e = self.moe.experts
        out.leaves.w1.copy_(self._gather(e.batched_fc1_w).transpose(1, 2))
        out.leaves.w2.copy_(self._gather(e.batched_fc2_w))
        if out.leaves.b1 is not None:
            out.leaves.b1.copy_(self._gather(e.batched_fc1_bias))
            out.leaves.b2.copy_(self._gather(e.batched_fc2_bias))
        return out

    def _gather(self, local: Tensor) -> Tensor:
        """Concatenate every rank's [L/W, ...] share along the leaf axis."""
        if self.world_size == 1:
            return local.detach().clone()
        parts = [torch.empty_like(local) for _ in range(self.world_size)]
        dist.all_gather(parts, local.detach().contiguous(), group=self.moe.group)
        return torch.cat(parts, 0)

    # -- forward ------------------------------------------------------------------------------------------
    def forward(self, x: Tensor, adaptive_r: int | None = None) -> BlockOutput:
        # S tokens (this rank's), d model width, o output width, N nodes, L leaves (all ranks), D depth,
        # k leaves a token is dispatched to (1 when descending, L in soft training)
        if adaptive_r is not None and adaptive_r not in self.moe.valid_rs:
            raise ValueError(
                f"TutelFFF: adaptive_r = {adaptive_r!r} is not allowed: must be one of {self.moe.valid_rs} "
                f"for {self.config.n_leaves} leaves on {self.world_size} rank(s)"
            )
        lead = x.shape[:-1]
        x = self._flatten_input(x)  # [S, d]
        c = self.config
        soft = self.router.trains_soft()  # soft training, or the soft phase of the schedule
        k = c.total_leaves if soft else c.n_trees
        # NOTE: unequal token counts over ranks would give capped capacities that differ between ranks and
        # hang the all-to-all; Tutel then agrees on the largest count first (dropless agrees on its own)
        unequal = self.world_size > 1 and not self.dispatch.dropless
        # gate -> capacity -> fast_encode -> all-to-all -> leaves -> all-to-all -> fast_decode, all Tutel's
        tree_out = self.moe(x, top_k=k, adaptive_r=adaptive_r, inequivalent_tokens=unequal)  # [S, o]
        route = self.gate.take_route()
        S, K = x.shape[0], c.n_trees
        if not soft:
            # Tutel combined one tree's leaf with weight 1, or a forest's with g_k / sum_j g_j (see gate.py): the
            # path probability, or the sum of the trees' ones, scales here
            scale = route.gate if K == 1 else route.gate.view(S, K).sum(1)
            tree_out = tree_out * scale.to(tree_out.dtype)[:, None]
        elif K > 1:  # Tutel's softmax over the K trees' leaf probabilities gave p / K
            tree_out = tree_out * K
        y = tree_out if self.master is None else self.master.blend(x, tree_out)  # [S, o]

        stats = {
            **self.router.stats(route),
            "master_gate": self.master.share() if self.master is not None else self.zero() + 1.0,
            "dropped": self._dropped(route, k, unequal),
        }
        aux, losses = self.router.losses(route)  # the same terms as the core FFF's training forward
        return BlockOutput(y.reshape(*lead, c.d_out), aux, losses, stats)

    @torch.no_grad()
    def _dropped(self, route, k: int, unequal: bool) -> Tensor:
        """How many of this rank's (token, leaf) assignments Tutel's capacity dropped in this call."""
        zero = self.zero()
        factor = self.gate.capacity_factor
        if factor == 0:
            return zero  # dropless: Tutel's capacity is the largest load over the group
        # Tutel's own routing on the scores it saw (softmax of the gate's logits) gives its capacity and each
        # assignment's slot; an assignment is dropped when its slot is beyond the capacity
        scores = F.softmax(self.gate.last_logits.float(), dim=1)  # [S, L]
        crit, _ = tutel_moe.top_k_routing(
            scores, top_k=k, loss_fn=None, capacity_factor=factor, group=self.moe.group,
            alignment=self.moe.sharded_count * self.moe.a2a_ffn_overlap_degree, inequivalent_tokens=unequal,
        )
        _, _, locations, _, capacity, _ = crit
        return sum((loc >= capacity).sum() for loc in locations).float().to(zero.device)

    def extra_repr(self) -> str:
        return (
            f"leaves {self.local_leaves.start}..{self.local_leaves.stop - 1} of {self.config.n_leaves} on rank "
            f"{self.rank}/{self.world_size}, {self.dispatch}"
        )
