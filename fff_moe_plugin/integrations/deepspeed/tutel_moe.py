"""TutelFFFMoE: the Tutel-dispatched FFF tree as a ``deepspeed.moe.layer.MoE``, so that DeepSpeed's engine
treats its leaves as experts.

DeepSpeed's engine gives expert parameters their own treatment only inside modules that are
``deepspeed.moe.layer.MoE`` (``has_moe_layers``, ``num_experts``, per-expert checkpoint files, the optimizer's
MoE parameter groups) and only for parameters tagged ``allreduce = False`` with a ``group_name``: those are
left out of the data-parallel all-reduce and reduced over the expert-data-parallel group instead. This module
puts a :class:`~fff_moe_plugin.integrations.tutel.TutelFFF` inside such a module, with Tutel's all-to-all on
DeepSpeed's own expert-parallel group and its leaves tagged through Tutel's ``scan_expert_func``. Nothing of
DeepSpeed's dispatch runs; the engine only sees an MoE layer with experts.

The state dict is translated to :class:`~fff_moe_plugin.integrations.deepspeed.layer.FFFMoE`'s layout (one
``deepspeed_moe.experts.deepspeed_experts.<i>`` entry per leaf, which DeepSpeed's checkpointing writes to one
file per global leaf), so checkpoints of the two backends have the same keys and load into each other.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.distributed as dist
from deepspeed.moe.layer import MoE
from deepspeed.utils import groups
from torch import Tensor, nn

from ...block import BlockOutput
from ...config import FFFConfig
from ...dispatch import DispatchConfig, ExpertParallelFFF
from ...fff import FFF
from ...router import move_legacy_keys

# FFFMoE's name for each of TutelFFF's replicated parameters
_SHARED_NAMES = {
    "tutel.moe.gates.0.router.node_weight": "deepspeed_moe.gate.router.node_weight",
    "tutel.moe.gates.0.router.node_bias": "deepspeed_moe.gate.router.node_bias",
    **{f"tutel.master.{p}": f"master.{p}" for p in ("w1", "b1", "w2", "b2", "gate")},
}
# Tutel's batched leaf tensor -> (LeafMLP's name, transposed): Tutel keeps fc1 as [E, l, d], LeafMLP w1 as [d, l]
_LEAF_NAMES = {
    "tutel.moe.experts.batched_fc1_w": ("w1", True),
    "tutel.moe.experts.batched_fc1_bias": ("b1", False),
    "tutel.moe.experts.batched_fc2_w": ("w2", False),
    "tutel.moe.experts.batched_fc2_bias": ("b2", False),
}
_LEAF_PREFIX = "deepspeed_moe.experts.deepspeed_experts."
# Tutel's record of the global leaf count; its name holds "expert", which DeepSpeed's checkpointing would take
# for an expert weight, so it stays out of the state dict (it follows from the config)
_COUNT_BUFFER = "tutel.moe._num_global_experts"
# the config record TutelFFF keeps in its state dict; FFFMoE's layout has none (the config is the layer's), so it
# is left out, and on a load TutelFFF takes the state dict as one without a record (nothing to check)
_CONFIG_RECORD = "tutel._extra_state"


class TutelFFFMoE(MoE, ExpertParallelFFF):
    """Fast feedforward tree (Belcak & Wattenhofer, arXiv 2308.14711) on Tutel's dispatch (arXiv 2206.03382),
    registered with DeepSpeed as an MoE layer whose experts are the tree's leaves.

    Contract, like DeepSpeed's MoE and :class:`FFFMoE`: ``forward(x [..., d_model]) -> (output [..., d_model],
    l_aux, counts [L])``; ``forward_block(x)`` returns the package's :class:`~fff_moe_plugin.block.BlockOutput`
    (``stats`` adds ``dropped``) and keeps it in ``.last``. ``l_aux`` already carries the config's weights: add
    it to the loss as it is. With nothing dropped the function equals :class:`FFFMoE` and the core
    :class:`~fff_moe_plugin.FFF` in hard mode on the same weights (``from_fff`` / ``to_fff``).

    Layout: Tutel's group is DeepSpeed's expert-parallel group ``"ep_size_<ep_size>"`` (created here when
    missing, DeepSpeed's default layout: consecutive ranks), so rank r of it holds leaves ``r * L/ep_size ...``
    as DeepSpeed's MoE does. Leaf parameters carry ``allreduce = False`` and ``group_name``: the engine sums
    their gradients over the expert-data-parallel group and divides by the data-parallel world size, exactly
    as for DeepSpeed's own experts. ``dispatch`` is a :class:`~fff_moe_plugin.dispatch.DispatchConfig` (default:
    dropless; Tutel's capacity has no minimum, so a capped one needs ``min_capacity=0``).

    Build it after ``deepspeed.init_distributed`` when ``ep_size > 1`` (every rank of the world, same order:
    process groups are created collectively). The module's path in a model must not contain "expert".
    """

    def __init__(self, config: FFFConfig, dispatch: Optional[DispatchConfig] = None, *,
                 init_from: Optional[FFF] = None) -> None:
        from ..tutel import TutelFFF  # needs Tutel; the ImportError says how to build it

        if not isinstance(config, FFFConfig):
            raise TypeError(f"TutelFFFMoE takes an FFFConfig, got {type(config).__name__}")
        dispatch = DispatchConfig(dropless=True, min_capacity=0) if dispatch is None else dispatch
        if not isinstance(dispatch, DispatchConfig):
            raise TypeError(f"TutelFFFMoE: dispatch must be a DispatchConfig, got {type(dispatch).__name__}")
        ep_size = dispatch.ep_size
        if config.total_leaves % ep_size:
            raise ValueError(f"TutelFFFMoE: ep_size = {ep_size!r} is not allowed: must divide the "
                             f"{config.total_leaves} leaves")
        if config.d_out != config.d_model:
            raise ValueError(f"TutelFFFMoE: d_out = {config.d_out} must equal d_model = {config.d_model} "
                             "(a DeepSpeed MoE layer maps d_model to d_model)")
        # NOTE: nn.Module's __init__ instead of MoE's: MoE's builds DeepSpeed's top-k gate and expert copies,
        # parameters this layer would carry unused. What DeepSpeed reads of an MoE layer is set here.
        nn.Module.__init__(self)
        self.ep_size = ep_size
        self.expert_group_name = f"ep_size_{ep_size}"
        self.num_experts = config.total_leaves
        self.num_local_experts = config.total_leaves // ep_size
        self.use_residual = False
        self.enable_expert_tensor_parallelism = False
        self.config = config
        self.dispatch = dispatch

        name = self.expert_group_name

        def tag(_: str, param: nn.Parameter) -> None:
            param.allreduce = False  # deepspeed.moe.utils.is_moe_param
            param.group_name = name

        self.tutel = TutelFFF(config, dispatch, _expert_parallel_group(ep_size), scan_expert_func=tag,
                              init_from=init_from)
        if config.master_leaf:
            # DeepSpeed's engine broadcasts every parameter as bytes (p.view(torch.uint8)), which a 0-dim tensor
            # cannot do: the blend logit is kept as [1], as FFFMoE keeps it
            self.tutel.master.gate = nn.Parameter(self.tutel.master.gate.detach().reshape(1))
        self.register_state_dict_post_hook(_to_deepspeed_layout)
        self.register_load_state_dict_pre_hook(_from_deepspeed_layout)

    # -- DeepSpeed plumbing ---------------------------------------------------------------------------
    def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
        """Called by DeepSpeed's engine: checks that Tutel dispatches over the group the engine reduces with."""
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        if use_data_before_expert_parallel_ and 1 < self.ep_size < world:
            raise ValueError("TutelFFFMoE: use_data_before_expert_parallel_ is not supported: the Tutel layer was "
                             "built on DeepSpeed's default expert-parallel layout (consecutive ranks)")
        if groups.mpu is not None:
            raise ValueError("TutelFFFMoE: model parallelism (an mpu given to deepspeed.initialize) is not supported; "
                             'use backend "deepspeed"')
        if world == 1:
            return
        group = _expert_parallel_group(self.ep_size)
        if self.tutel.moe.group is not group:
            raise ValueError(f"TutelFFFMoE: Tutel dispatches over another process group than DeepSpeed's "
                             f"{self.expert_group_name!r}; build the layer after deepspeed.init_distributed(...)")

    # -- the expert-parallel interface (dispatch.ExpertParallelFFF) ----------------------------------------
    @property
    def local_leaves(self) -> range:
        """Global indices of the leaves this rank holds."""
        return self.tutel.local_leaves

    @property
    def ep_group(self) -> Optional[dist.ProcessGroup]:
        return self.tutel.ep_group

    @property
    def last(self) -> Optional[BlockOutput]:
        """The BlockOutput of the last forward."""
        return self.tutel.last

    def expert_parameters(self) -> list[nn.Parameter]:
        return self.tutel.expert_parameters()

    # -- forward --------------------------------------------------------------------------------------
    def forward(self, hidden_states: Tensor, used_token: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor]:
        if used_token is not None:
            raise ValueError("TutelFFFMoE: used_token is not supported (Tutel's dispatch routes every token)")
        out = self.forward_block(hidden_states)
        return out.output, out.aux_loss, out.stats["counts"]

    def forward_block(self, x: Tensor) -> BlockOutput:
        """The forward in the package's call shape: ``BlockOutput(output, aux_loss, losses, stats)``."""
        # S tokens, d model width; gate -> dispatch -> leaves -> combine are Tutel's, see TutelFFF.forward
        return self.tutel.forward_block(x)  # output [..., d]

    # -- conversion to and from the core layer -------------------------------------------------------
    @classmethod
    def from_fff(cls, fff: FFF, dispatch: Optional[DispatchConfig] = None) -> TutelFFFMoE:
        """A TutelFFFMoE with the weights of a core ``FFF`` (this rank's leaves when ``ep_size > 1``)."""
        if not isinstance(fff, FFF):
            raise TypeError(f"from_fff takes a fff_moe_plugin.FFF, got {type(fff).__name__}")
        layer = cls(fff.config, dispatch, init_from=fff).to(fff.router.node_weight.dtype)
        return layer.train(fff.training)

    def load_fff(self, fff: FFF) -> None:
        """Copy a core FFF's weights (nodes, this rank's leaves, master leaf) into this layer."""
        self.tutel.load_fff(fff)

    def to_fff(self) -> FFF:
        """The core FFF with this layer's weights, leaves gathered over the expert-parallel group (a collective:
        call it on every rank of the group)."""
        return self.tutel.to_fff().train(self.training)

    def extra_repr(self) -> str:
        return f"ep_size={self.ep_size}, group_name={self.expert_group_name!r}"


def _expert_parallel_group(ep_size: int) -> Optional[dist.ProcessGroup]:
    """DeepSpeed's expert-parallel group for ``ep_size`` (created on first use); None without torch.distributed."""
    if not (dist.is_available() and dist.is_initialized()):
        if ep_size > 1:
            raise ValueError(f"TutelFFFMoE: ep_size = {ep_size} needs torch.distributed initialised first "
                             "(deepspeed.init_distributed(...)), so that each rank knows which leaves it holds")
        return None  # one process: Tutel's world is this process
    name = f"ep_size_{ep_size}"
    if name not in groups._get_expert_parallel_group_dict():
        if dist.get_world_size() % ep_size:
            raise ValueError(f"TutelFFFMoE: ep_size = {ep_size} must divide the world size ({dist.get_world_size()})")
        groups._create_expert_and_data_parallel(ep_size)
    return groups._get_expert_parallel_group(name)


# -- the state dict in FFFMoE's layout ----------------------------------------------------------------------
def _to_deepspeed_layout(module: TutelFFFMoE, state: dict[str, Any], prefix: str, _metadata: Any) -> None:
    """state_dict post-hook: Tutel's names -> FFFMoE's, one entry per leaf (local index)."""
    state.pop(prefix + _COUNT_BUFFER, None)
    state.pop(prefix + _CONFIG_RECORD, None)
    for tutel_name, ds_name in _SHARED_NAMES.items():
        if prefix + tutel_name in state:
            state[prefix + ds_name] = state.pop(prefix + tutel_name)
    for tutel_name, (leaf_name, transposed) in _LEAF_NAMES.items():
        batched = state.pop(prefix + tutel_name, None)  # [L / ep_size, ...]
        if batched is None:
            continue
        for i in range(batched.shape[0]):
            leaf = batched[i].t() if transposed else batched[i]
            state[f"{prefix}{_LEAF_PREFIX}{i}.{leaf_name}"] = leaf


def _from_deepspeed_layout(module: TutelFFFMoE, state: dict[str, Any], prefix: str, _metadata: Any, strict: bool,
                           _missing: list[str], _unexpected: list[str], error_msgs: list[str]) -> None:
    """load_state_dict pre-hook: FFFMoE's names -> Tutel's (the inverse of :func:`_to_deepspeed_layout`)."""
    move_legacy_keys(state, prefix + "deepspeed_moe.gate.")  # FFFMoE's layout before the gate held a router
    move_legacy_keys(state, prefix)  # and before MasterLeaf
    for tutel_name, ds_name in _SHARED_NAMES.items():
        if prefix + ds_name in state:
            state[prefix + tutel_name] = state.pop(prefix + ds_name)
    n = module.num_local_experts
    own = dict(module.named_parameters())
    for tutel_name, (leaf_name, transposed) in _LEAF_NAMES.items():
        keys = [f"{prefix}{_LEAF_PREFIX}{i}.{leaf_name}" for i in range(n)]
        present = [k for k in keys if k in state]
        if not present:
            if strict and prefix + tutel_name not in state and tutel_name in own:
                # Tutel would fill a missing leaf tensor with zeros; a strict load reports it instead
                error_msgs.append(f"missing leaf weights: {keys[0]} ... {keys[-1]}")
            continue
        if len(present) < n:
            error_msgs.append(f"incomplete leaf weights: {', '.join(k for k in keys if k not in state)} missing")
            continue
        leaves = [state.pop(k) for k in keys]
        state[prefix + tutel_name] = torch.stack([t.t() if transposed else t for t in leaves])  # [L / ep_size, ...]
    state.setdefault(prefix + _COUNT_BUFFER, module.get_buffer(_COUNT_BUFFER))
