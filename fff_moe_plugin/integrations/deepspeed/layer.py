"""FFFMoE: an FFF tree as a DeepSpeed MoE layer, its leaves sharded by DeepSpeed's expert parallelism."""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from typing import Optional

import torch
from deepspeed.moe.layer import MoE
from deepspeed.utils import groups
from torch import Tensor, nn

from ...block import BlockOutput
from ...config import FFFConfig
from ...fff import FFF
from .gate import LazyStats, TreeGate
from .leaf import FFFLeaf


class FFFMoE(MoE):
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

    Use with ``deepspeed.initialize`` (which finds it by ``isinstance(..., MoE)``: parameter groups, ZeRO 0-2,
    per-expert checkpoint files), or standalone::

        deepspeed.init_distributed(dist_backend="gloo")
        layer = FFFMoE(FFFConfig(d_model=64, leaf_width=32, depth=3, train_mode="hard"), ep_size=2)
        layer.set_deepspeed_parallelism()  # creates / joins DeepSpeed's expert-parallel groups

    Expert parallelism needs torch.distributed up at construction when ``ep_size > 1`` (the rank picks the
    leaves to hold) and DeepSpeed's default group layout (consecutive ranks form an expert-parallel group).
    The module's path in a model must not contain "expert": DeepSpeed's checkpointing would take the tree's
    nodes for expert weights.
    """

    def __init__(
        self,
        config: FFFConfig,
        ep_size: int = 1,
        capacity_factor: float = 1.0,
        eval_capacity_factor: float = 1.0,
        min_capacity: int = 4,
        drop_tokens: bool = True,
    ) -> None:
        _check_arguments(config, ep_size, capacity_factor, eval_capacity_factor, min_capacity, drop_tokens)
        ep_rank = _expected_ep_rank(ep_size)
        # the weights are the core layer's draws (same RNG stream), so FFFMoE(config) == FFF(config) under one
        # seed at any ep_size; the full tree exists only for the time of the copy
        core = FFF(config)
        c = config
        leaf = FFFLeaf(c.d_model, c.leaf_width, c.d_out, c.activation, c.bias, c.leaf_dropout)
        super().__init__(
            hidden_size=c.d_model, expert=leaf, num_experts=c.n_leaves, ep_size=ep_size, k=1,
            capacity_factor=capacity_factor, eval_capacity_factor=eval_capacity_factor, min_capacity=min_capacity,
            use_residual=False, drop_tokens=drop_tokens, use_rts=False,
        )
        self.config = config
        self.ep_rank = ep_rank
        self.deepspeed_moe.gate = TreeGate(config, capacity_factor, eval_capacity_factor, min_capacity, drop_tokens)
        if c.master_leaf:
            self.master = FFFLeaf(c.d_model, c.master_leaf_width, c.d_out, c.activation, c.bias, c.leaf_dropout)
            # the blend logit k, shape [1] rather than the core's [] (DeepSpeed's broadcast cannot take 0-dim tensors)
            self.master_gate = nn.Parameter(torch.zeros(1))
        self.load_fff(core)

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
    def local_leaves(self) -> range:
        """Global indices of the leaves this rank holds."""
        n = self.num_local_experts
        return range(self.ep_rank * n, (self.ep_rank + 1) * n)

    # -- forward --------------------------------------------------------------------------------------
    def forward(self, hidden_states: Tensor, used_token: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor]:
        # S tokens, d model width, L leaves; the tree part is DeepSpeed's dispatch -> leaves -> combine
        d = self.config.d_model
        if hidden_states.dim() == 0 or hidden_states.shape[-1] != d:
            raise ValueError(
                f"FFFMoE expects inputs of shape [..., {d}] (d_model={d}), got {tuple(hidden_states.shape)}"
            )
        tree_out = self.deepspeed_moe(hidden_states, used_token)  # [..., d]
        out = self._blend(hidden_states, tree_out)  # [..., d]
        return out, self.deepspeed_moe.l_aux, self.deepspeed_moe.exp_counts

    def forward_block(self, x: Tensor, used_token: Optional[Tensor] = None) -> BlockOutput:
        """The same forward in the package's call shape: ``BlockOutput(output, aux_loss, losses, stats)``;
        ``stats`` is a read-only mapping, computed when first read (:class:`~.gate.LazyStats`)."""
        out, l_aux, _ = self.forward(x, used_token)
        record = self.gate.last_record
        # the blend weight now (the parameter changes at the next step); the rest is computed when first read
        share = torch.sigmoid(self.master_gate.detach().float())[0] if self.config.master_leaf else None
        stats = LazyStats(functools.partial(_block_stats, record.stats, share, out.device))
        return BlockOutput(out, l_aux.float(), dict(record.losses), stats)

    def _blend(self, x: Tensor, tree_out: Tensor) -> Tensor:
        if not self.config.master_leaf:
            return tree_out
        m = self.master(x)
        g = torch.sigmoid(self.master_gate).to(m.dtype)
        return g * tree_out + (1 - g) * m

    # -- conversion to and from the core layer -------------------------------------------------------
    @classmethod
    def from_fff(cls, fff: FFF, ep_size: int = 1, capacity_factor: float = 1.0, eval_capacity_factor: float = 1.0,
                 min_capacity: int = 4, drop_tokens: bool = True) -> FFFMoE:
        """An FFFMoE with the weights of a core ``FFF`` (this rank's leaves when ``ep_size > 1``)."""
        if not isinstance(fff, FFF):
            raise TypeError(f"from_fff takes a fff_moe_plugin.FFF, got {type(fff).__name__}")
        layer = cls(fff.config, ep_size, capacity_factor, eval_capacity_factor, min_capacity, drop_tokens)
        # on the tree's device and dtype first: a float64 tree is copied exactly, a CUDA tree stays on its GPU
        layer.to(device=fff.node_weight.device, dtype=fff.node_weight.dtype).load_fff(fff)
        return layer.train(fff.training)

    @torch.no_grad()
    def load_fff(self, fff: FFF) -> None:
        """Copy a core FFF's weights (nodes, this rank's leaves, master leaf) into this layer."""
        if fff.config != self.config:
            raise ValueError(f"configs differ: this layer has {self.config}, the FFF has {fff.config}")
        for mine, theirs in self._shared_pairs(fff):
            mine.copy_(theirs.reshape(mine.shape))
        for local, j in enumerate(self.local_leaves):
            self._copy_leaf(self.deepspeed_moe.experts.deepspeed_experts[local], fff, j)

    def _shared_pairs(self, fff: FFF) -> list[tuple[Tensor, Tensor]]:
        """(this layer's, the core FFF's) parameter for everything but the leaves: nodes and master leaf."""
        g = self.gate
        pairs = [(g.node_weight, fff.node_weight)]
        if g.node_bias is not None:
            pairs.append((g.node_bias, fff.node_bias))
        if self.config.master_leaf:
            m = self.master
            pairs += [(m.w1, fff.master_w1), (m.w2, fff.master_w2), (self.master_gate, fff.master_gate)]
            if m.b1 is not None:
                pairs += [(m.b1, fff.master_b1), (m.b2, fff.master_b2)]
        return pairs

    @staticmethod
    def _copy_leaf(leaf: FFFLeaf, fff: FFF, j: int) -> None:
        leaf.w1.copy_(fff.leaf_w1[j])
        leaf.w2.copy_(fff.leaf_w2[j])
        if leaf.b1 is not None:
            leaf.b1.copy_(fff.leaf_b1[j])
            leaf.b2.copy_(fff.leaf_b2[j])

    @torch.no_grad()
    def to_fff(self) -> FFF:
        """The core FFF with this layer's weights; with ``ep_size > 1`` the leaves are gathered over the
        expert-parallel group (a collective: call it on every rank of the group)."""
        w = self.gate.node_weight
        fff = FFF(self.config).to(device=w.device, dtype=w.dtype)
        for mine, theirs in self._shared_pairs(fff):
            theirs.copy_(mine.reshape(theirs.shape))
        names = ["w1", "b1", "w2", "b2"] if self.config.bias else ["w1", "w2"]
        leaves = self.deepspeed_moe.experts.deepspeed_experts
        for name in names:
            local = torch.stack([getattr(leaf, name) for leaf in leaves])  # [L / ep_size, ...]
            if self.ep_size > 1:
                parts = [torch.empty_like(local) for _ in range(self.ep_size)]
                torch.distributed.all_gather(parts, local.contiguous(), group=self.deepspeed_moe.ep_group)
                local = torch.cat(parts)
            getattr(fff, f"leaf_{name}").copy_(local)
        return fff.train(self.training)


def _block_stats(stats: Mapping[str, Tensor], master_share: Optional[Tensor],
                 device: torch.device) -> dict[str, Tensor]:
    """The gate's statistics plus ``master_gate``, the tree's share of the output (1 without a master leaf)."""
    share = master_share if master_share is not None else torch.ones((), device=device)
    return {**stats, "master_gate": share}


def _check_arguments(config, ep_size, capacity_factor, eval_capacity_factor, min_capacity, drop_tokens) -> None:
    if not isinstance(config, FFFConfig):
        raise TypeError(f"FFFMoE takes an FFFConfig, got {type(config).__name__}")
    if config.train_mode != "hard":
        raise ValueError(
            f"FFFMoE: train_mode = {config.train_mode!r} is not allowed: must be 'hard' (each token is dispatched to "
            "one leaf; soft training runs every leaf for every token, which the core FFF layer does)"
        )
    if config.d_out != config.d_model:
        raise ValueError(f"FFFMoE: d_out = {config.d_out} must equal d_model = {config.d_model} (DeepSpeed's MoE "
                         "maps d_model to d_model)")
    if isinstance(ep_size, bool) or not isinstance(ep_size, int) or ep_size < 1 or config.n_leaves % ep_size:
        raise ValueError(f"FFFMoE: ep_size = {ep_size!r} is not allowed: must be an integer >= 1 dividing the "
                         f"{config.n_leaves} leaves")
    for name, v in (("capacity_factor", capacity_factor), ("eval_capacity_factor", eval_capacity_factor)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not v > 0:
            raise ValueError(f"FFFMoE: {name} = {v!r} is not allowed: must be a finite number > 0")
    if isinstance(min_capacity, bool) or not isinstance(min_capacity, int) or min_capacity < 0:
        raise ValueError(f"FFFMoE: min_capacity = {min_capacity!r} is not allowed: must be an integer >= 0")
    if not isinstance(drop_tokens, bool):
        raise ValueError(f"FFFMoE: drop_tokens = {drop_tokens!r} is not allowed: must be True or False")


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
