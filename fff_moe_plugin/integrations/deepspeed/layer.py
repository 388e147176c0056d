"""FFFMoE: an FFF tree as a DeepSpeed MoE layer, its leaves sharded by DeepSpeed's expert parallelism."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Optional

import torch
from deepspeed.moe.layer import MoE
from deepspeed.utils import groups
from torch import Tensor, nn

from ...block import BlockOutput
from ...config import FFFConfig
from ...dispatch import DispatchConfig, ExpertParallelFFF
from ...fff import FFF
from ...leaves import LeafMLP, MasterLeaf
from ...router import TreeRouter, move_legacy_keys
from .gate import LazyStats, TreeGate


class FFFMoE(MoE, ExpertParallelFFF):
    """Fast feedforward tree as a ``deepspeed.moe.layer.MoE`` (Belcak & Wattenhofer, arXiv 2308.14711; master
    leaf and load balancing from eFFF, arXiv 2405.16836).

    The tree's nodes are a :class:`TreeGate` (replicated, data-parallel); its ``2**depth`` leaves are the
    experts, held under ``.deepspeed_moe.experts.deepspeed_experts.<i>`` and sharded over ``ep_size`` ranks by
    DeepSpeed itself (``L / ep_size`` leaves per rank, rank r of an expert-parallel group holding global
    leaves ``r * L / ep_size ...``). The master leaf, when configured, is an always-on MLP outside the experts,
    blended as ``sigmoid(k) * tree(x) + (1 - sigmoid(k)) * M(x)``.

    Contract, like DeepSpeed's MoE: ``forward(x [..., d_model], used_token=None) -> (output [..., d_model],
    l_aux, exp_counts [L])``. ``l_aux`` already carries the config's weights (``hardening``,
    ``load_balance_coef``): add it to the loss as it is. ``forward_block(x)`` returns the package's
    :class:`~fff_moe_plugin.block.BlockOutput` instead (``stats`` adds ``dropped`` and ``capacity``).
    With capacity enough that nothing is dropped, the function equals the core :class:`FFF` in hard mode
    on the same weights (:meth:`from_fff`, :meth:`to_fff`), in training and eval.

    Dispatch: a :class:`~fff_moe_plugin.dispatch.DispatchConfig`, or DeepSpeed's MoE keywords (``ep_size``,
    ``capacity_factor``, ``eval_capacity_factor``, ``min_capacity``, ``drop_tokens``), converted to one. Parts:
    ``gate`` (the :class:`TreeGate`, whose ``router`` holds the nodes), the leaves (DeepSpeed's experts, each a
    :class:`~fff_moe_plugin.leaves.LeafMLP`) and ``master`` (a :class:`~fff_moe_plugin.leaves.MasterLeaf` or
    None). ``uniform_tokens``: every rank routes the same number of tokens to the layer (fixed-shape batches), so
    that with token dropping the capacity is agreed over the expert-parallel group once, not in every call
    (:class:`TreeGate`). It implements :class:`~fff_moe_plugin.dispatch.ExpertParallelFFF`.

    Use with ``deepspeed.initialize`` (which finds it by ``isinstance(..., MoE)``: parameter groups, ZeRO 0-2,
    per-expert checkpoint files), or standalone::

        deepspeed.init_distributed(dist_backend="gloo")
        layer = FFFMoE(FFFConfig(d_model=64, leaf_width=32, depth=3, train_mode="hard"), DispatchConfig(ep_size=2))
        layer.set_deepspeed_parallelism()  # creates / joins DeepSpeed's expert-parallel groups

    Expert parallelism needs torch.distributed up at construction when ``ep_size > 1`` (the rank picks the
    leaves to hold) and DeepSpeed's default group layout (consecutive ranks form an expert-parallel group).
    The module's path in a model must not contain "expert": DeepSpeed's checkpointing would take the tree's
    nodes for expert weights.
    """

    def __init__(self, config: FFFConfig, dispatch: Optional[DispatchConfig] = None, uniform_tokens: bool = False,
                 **deepspeed_kwargs) -> None:
        dispatch = DispatchConfig.resolve(dispatch, "FFFMoE", **deepspeed_kwargs)
        _check_arguments(config, dispatch)
        ep_rank = _expected_ep_rank(dispatch.ep_size)
        # the weights are the core layer's draws (same RNG stream), so FFFMoE(config) == FFF(config) under one
        # seed at any ep_size; the full tree exists only for the time of the copy
        core = FFF(config)
        c, d = config, dispatch
        leaf = LeafMLP(c.d_model, c.leaf_width, c.d_out, c.activation, c.bias, c.leaf_dropout)
        super().__init__(
            hidden_size=c.d_model, expert=leaf, num_experts=c.total_leaves, ep_size=d.ep_size, k=c.n_trees,
            capacity_factor=d.capacity_factor, eval_capacity_factor=d.eval_capacity_factor,
            min_capacity=d.min_capacity, use_residual=False, drop_tokens=not d.dropless, use_rts=False,
        )
        self.config = config
        self.dispatch = dispatch
        self.ep_rank = ep_rank
        self.deepspeed_moe.gate = TreeGate(config, dispatch, uniform_tokens=uniform_tokens)
        # the master leaf's parameters in the order of DeepSpeed's experts and its blend logit of shape [1] (the
        # engine's byte broadcast), as FFFMoE's checkpoints, optimizer states included, were written
        self.master = (MasterLeaf(c.d_model, c.master_leaf_width, c.d_out, c.activation, c.bias, c.leaf_dropout,
                                  parameter_order=LeafMLP.PARAMETER_ORDER, gate_shape=(1,)) if c.master_leaf else None)
        self.last: Optional[BlockOutput] = None
        self.load_fff(core)
        self.register_load_state_dict_pre_hook(_move_legacy_keys)

    # -- DeepSpeed plumbing ---------------------------------------------------------------------------
    def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
        super().set_deepspeed_parallelism(use_data_before_expert_parallel_)
        actual = groups._get_expert_parallel_rank(self.expert_group_name)
        if actual != self.ep_rank:
            raise ValueError(
                f"FFFMoE holds the leaves of expert-parallel rank {self.ep_rank} (global rank % ep_size) but "
                f"DeepSpeed placed this process at rank {actual}; use_data_before_expert_parallel_ is not supported"
            )

    @property
    def gate(self) -> TreeGate:
        return self.deepspeed_moe.gate

    @property
    def router(self) -> TreeRouter:
        return self.deepspeed_moe.gate.router

    # -- the expert-parallel interface (dispatch.ExpertParallelFFF) ----------------------------------------
    @property
    def local_leaves(self) -> range:
        """Global indices of the leaves this rank holds."""
        n = self.num_local_experts
        return range(self.ep_rank * n, (self.ep_rank + 1) * n)

    @property
    def ep_group(self) -> Optional[torch.distributed.ProcessGroup]:
        """DeepSpeed's expert-parallel group of this layer (None before ``set_deepspeed_parallelism``)."""
        return self.deepspeed_moe.ep_group

    def expert_parameters(self) -> list[nn.Parameter]:
        return list(self.deepspeed_moe.experts.parameters())

    # -- forward --------------------------------------------------------------------------------------
    def forward(self, hidden_states: Tensor, used_token: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor]:
        out = self.forward_block(hidden_states, used_token)
        return out.output, self.deepspeed_moe.l_aux, self.deepspeed_moe.exp_counts

    def forward_block(self, x: Tensor, used_token: Optional[Tensor] = None) -> BlockOutput:
        """The forward in the package's call shape: ``BlockOutput(output, aux_loss, losses, stats)``, also kept in
        ``.last``; ``stats`` is a read-only mapping, computed when first read (:class:`~.gate.LazyStats`)."""
        # S tokens, d model width, L leaves; the tree part is DeepSpeed's dispatch -> leaves -> combine
        d = self.config.d_model
        if x.dim() == 0 or x.shape[-1] != d:
            raise ValueError(f"FFFMoE expects inputs of shape [..., {d}] (d_model={d}), got {tuple(x.shape)}")
        tree_out = self.deepspeed_moe(x, used_token)  # [..., d]
        out = self._blend(x, tree_out)  # [..., d]
        record = self.gate.last_record
        # the blend weight now (the parameter changes at the next step); the rest is computed when first read
        share = self.master.share() if self.master is not None else None
        stats = LazyStats(functools.partial(_block_stats, record.stats, share, out.device))
        self.last = BlockOutput(out, self.deepspeed_moe.l_aux.float(), dict(record.losses), stats)
        return self.last

    def _blend(self, x: Tensor, tree_out: Tensor) -> Tensor:
        return tree_out if self.master is None else self.master.blend(x, tree_out)

    # -- conversion to and from the core layer -------------------------------------------------------
    @classmethod
    def from_fff(cls, fff: FFF, dispatch: Optional[DispatchConfig] = None, uniform_tokens: bool = False,
                 **deepspeed_kwargs) -> FFFMoE:
        """An FFFMoE with the weights of a core ``FFF`` (this rank's leaves when ``ep_size > 1``)."""
        if not isinstance(fff, FFF):
            raise TypeError(f"from_fff takes a fff_moe_plugin.FFF, got {type(fff).__name__}")
        layer = cls(fff.config, dispatch, uniform_tokens, **deepspeed_kwargs)
        # on the tree's device and dtype first: a float64 tree is copied exactly, a CUDA tree stays on its GPU
        w = fff.router.node_weight
        layer.to(device=w.device, dtype=w.dtype).load_fff(fff)
        return layer.train(fff.training)

    @torch.no_grad()
    def load_fff(self, fff: FFF) -> None:
        """Copy a core FFF's weights (nodes, this rank's leaves, master leaf) into this layer."""
        if fff.config != self.config:
            raise ValueError(f"configs differ: this layer has {self.config}, the FFF has {fff.config}")
        self.router.load_state_dict(fff.router.state_dict())  # nodes, decision shifts, the schedule's count
        for mine, theirs in self._shared_pairs(fff):
            mine.copy_(theirs.reshape(mine.shape))
        for local, j in enumerate(self.local_leaves):
            self._copy_leaf(self.deepspeed_moe.experts.deepspeed_experts[local], fff, j)

    def _shared_pairs(self, fff: FFF) -> list[tuple[Tensor, Tensor]]:
        """(this layer's, the core FFF's) master-leaf parameters (the router is copied whole, by state)."""
        if self.master is None:
            return []
        theirs = dict(fff.master.named_parameters())
        return [(p, theirs[name]) for name, p in self.master.named_parameters()]

    @staticmethod
    def _copy_leaf(leaf: LeafMLP, fff: FFF, j: int) -> None:
        leaf.w1.copy_(fff.leaves.w1[j])
        leaf.w2.copy_(fff.leaves.w2[j])
        if leaf.b1 is not None:
            leaf.b1.copy_(fff.leaves.b1[j])
            leaf.b2.copy_(fff.leaves.b2[j])

    @torch.no_grad()
    def to_fff(self) -> FFF:
        """The core FFF with this layer's weights; with ``ep_size > 1`` the leaves are gathered over the
        expert-parallel group (a collective: call it on every rank of the group)."""
        w = self.router.node_weight
        fff = FFF(self.config).to(device=w.device, dtype=w.dtype)
        fff.router.load_state_dict(self.router.state_dict())
        for mine, theirs in self._shared_pairs(fff):
            theirs.copy_(mine.reshape(theirs.shape))
        names = ["w1", "b1", "w2", "b2"] if self.config.bias else ["w1", "w2"]
        leaves = self.deepspeed_moe.experts.deepspeed_experts
        for name in names:
            local = torch.stack([getattr(leaf, name) for leaf in leaves])  # [L / ep_size, ...]
            if self.ep_size > 1:
                parts = [torch.empty_like(local) for _ in range(self.ep_size)]
                torch.distributed.all_gather(parts, local.contiguous(), group=self.ep_group)
                local = torch.cat(parts)
            getattr(fff.leaves, name).copy_(local)
        return fff.train(self.training)


def _block_stats(stats: Mapping[str, Tensor], master_share: Optional[Tensor],
                 device: torch.device) -> dict[str, Tensor]:
    """The gate's statistics plus ``master_gate``, the tree's share of the output (1 without a master leaf)."""
    share = master_share if master_share is not None else torch.ones((), device=device)
    return {**stats, "master_gate": share}


def _check_arguments(config: FFFConfig, dispatch: DispatchConfig) -> None:
    if not isinstance(config, FFFConfig):
        raise TypeError(f"FFFMoE takes an FFFConfig, got {type(config).__name__}")
    if config.train_mode != "hard":
        raise ValueError(
            f"FFFMoE: train_mode = {config.train_mode!r} is not allowed: must be 'hard' (each token is dispatched to "
            "one leaf; soft training runs every leaf for every token, which the core FFF layer does)"
        )
    if config.soft_updates:
        raise ValueError(f"FFFMoE: soft_updates = {config.soft_updates} is not allowed: must be 0 (a soft phase runs "
                         "every leaf for every token, which DeepSpeed's one-leaf dispatch does not; the core FFF and "
                         "the Tutel backend can)")
    if config.d_out != config.d_model:
        raise ValueError(f"FFFMoE: d_out = {config.d_out} must equal d_model = {config.d_model} (DeepSpeed's MoE "
                         "maps d_model to d_model)")
    if config.total_leaves % dispatch.ep_size:
        raise ValueError(f"FFFMoE: ep_size = {dispatch.ep_size} is not allowed: must divide the "
                         f"{config.total_leaves} leaves")
    if dispatch.dropless_cap is not None:
        raise ValueError(f"FFFMoE: dropless_cap = {dispatch.dropless_cap} is not allowed: DeepSpeed's dispatch has "
                         "no capped dropless mode (the tutel backend has)")


def _move_legacy_keys(module: nn.Module, state_dict: dict, prefix: str, *args) -> None:
    move_legacy_keys(state_dict, prefix)  # written before MasterLeaf: master_gate -> master.gate


def _expected_ep_rank(ep_size: int) -> int:
    """This process's rank in its expert-parallel group under DeepSpeed's default layout."""
    if ep_size == 1:
        return 0
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError(f"FFFMoE: ep_size = {ep_size} needs torch.distributed initialised first "
                         "(deepspeed.init_distributed(...)), so that each rank knows which leaves it holds")
    world = dist.get_world_size()
    if world % ep_size:
        raise ValueError(f"FFFMoE: ep_size = {ep_size} must divide the world size ({world})")
    return dist.get_rank() % ep_size
