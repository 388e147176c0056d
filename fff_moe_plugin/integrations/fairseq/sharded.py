"""An FFF block for fairseq whose leaves are sharded over ranks by DeepSpeed's or Tutel's MoE dispatch.

``--fff-backend deepspeed`` holds the tree as :class:`~fff_moe_plugin.integrations.deepspeed.FFFMoE` (DeepSpeed's
``MoE`` layer, its all-to-all and expert-parallel groups), ``--fff-backend tutel`` as
:class:`~fff_moe_plugin.integrations.tutel.TutelFFF` (Tutel's ``moe_layer``). Either way:

- **Layout.** Consecutive ranks form an expert-parallel group of ``ep_size`` ranks sharing the ``2**depth``
  leaves (DeepSpeed's default layout); ranks with the same position in their groups form the leaves'
  expert-data-parallel group. With Tutel, ``ep_size`` is 1 or the world size (see :func:`tutel_groups`).
  The nodes and the master leaf are replicated like any dense parameter.
- **Gradients.** fairseq's ``legacy_ddp`` all-reduces every gradient except those of parameters tagged
  ``param.expert = True``, and the trainer then multiplies all gradients by ``world_size / sample_size``.
  The leaves are tagged; a gradient hook divides a leaf's gradient by the data-parallel world size (the
  average ``legacy_ddp`` would have taken) and sums it over the expert-data-parallel group when that has more
  than one rank. The result is the gradient of the data-parallel run with the whole tree on every rank.
  fairseq's gradient clipping would leave the tagged leaves out of the norm; the plugin's trainer hook
  (``expert_parallel``) counts them, so clipping too acts as in the data-parallel run.
- **Checkpoints.** The state dict is the core :class:`~fff_moe_plugin.fff.FFF`'s (``router.node_weight``,
  ``leaves.w1`` ``[L, d, l]``, ...), the leaves gathered from the expert-parallel group, so a checkpoint does not
  depend on the backend or ``ep_size``: ``fairseq-eval-lm``, sampling and the hub load it in one process.
  Gathering is a collective: with ``ep_size > 1`` the state dict must be taken on every rank of the group
  inside :func:`gathering` (the plugin's trainer hooks do it, see ``expert_parallel``). Loading takes the
  core format and keeps this rank's leaves.
- **Initial weights.** The core FFF's draws, taken from the global RNG exactly as ``--fff-backend core``
  takes them, so under one seed every backend starts from the same function.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ...block import BlockOutput, FeedForwardBlock
from ...config import FFFConfig
from ...dispatch import DispatchConfig
from ...fff import FFF
from ...router import move_legacy_keys

BACKENDS = ("core", "deepspeed", "tutel")

_GATHERING = False


@contextlib.contextmanager
def gathering() -> Iterator[None]:
    """Within this context the sharded blocks' state dicts gather their leaves (a collective on every rank)."""
    global _GATHERING
    before, _GATHERING = _GATHERING, True
    try:
        yield
    finally:
        _GATHERING = before


@dataclass(frozen=True)
class ShardSpec:
    """How the FFF blocks of a model are dispatched: the backend, and its
    :class:`~fff_moe_plugin.dispatch.DispatchConfig` (``--fff-ep-size`` and ``--fff-capacity-factor``, converted
    once by ``flags.shard_spec``)."""

    backend: str
    dispatch: DispatchConfig

    @property
    def ep_size(self) -> int:
        return self.dispatch.ep_size


def world() -> tuple[int, int]:
    """(size, rank) of torch.distributed's world; (1, 0) when it is not initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


_GROUPS: dict[int, tuple[Optional[dist.ProcessGroup], Optional[dist.ProcessGroup]]] = {}


def tutel_groups(ep_size: int) -> tuple[Optional[dist.ProcessGroup], Optional[dist.ProcessGroup]]:
    """(expert-parallel group, expert-data-parallel group) of this rank for the tutel backend, ``None`` standing
    for the whole world (or for no group at all in one process). ``ep_size`` is 1 (every rank holds all leaves:
    a group of one) or the world size (the whole world shares them); ``check_spec`` refuses anything between,
    because Tutel runs its all-to-all's backward on the whole world whatever the group."""
    if ep_size in _GROUPS:
        return _GROUPS[ep_size]
    size, rank = world()
    if size == 1 or ep_size == size:
        _GROUPS[ep_size] = (None, None)
    else:
        alone = [dist.new_group([r]) for r in range(size)]  # every rank creates every group, in the same order
        _GROUPS[ep_size] = (alone[rank], None)
    return _GROUPS[ep_size]


def _expert_grad(world_size: int, dp_group, dp_size: int, grad: Tensor) -> Tensor:
    # the leaf's gradient as legacy_ddp's average over all ranks would give it: summed over the ranks holding
    # the same leaves (the all-to-all already summed over the tokens of the expert-parallel group), / world
    if dp_size > 1:
        grad = grad.contiguous()
        dist.all_reduce(grad, group=dp_group)
    return grad / world_size


class ShardedFFF(FeedForwardBlock):
    """Leaf-MLP FFF (Belcak & Wattenhofer, arXiv 2308.14711; eFFF master leaf and load balancing, arXiv
    2405.16836) with its leaves sharded over an expert-parallel group of fairseq's ranks (module docstring).

    Contract: ``forward(x [..., d_model]) -> BlockOutput(output [..., d_model], aux_loss, losses, stats)``, the
    call shape of every block. Dropless (``capacity_factor`` 0), output, losses and gradients equal the core
    ``FFF`` in hard mode on the same weights; the state dict is the core FFF's. Every rank of the group must
    call forward (the dispatch is collective), so fairseq's iterators pad ranks to equal batch counts.
    """

    config_class = FFFConfig

    def __init__(self, config: FFFConfig, spec: ShardSpec):
        super().__init__(config)
        check_spec(config, spec)
        self.spec = spec
        size, _ = world()
        # the core layer's draws from the global RNG; the backend's own initialisation is forked off it
        core = FFF(config)
        with torch.random.fork_rng(devices=[]):
            self.inner, dp_group = _BUILDERS[spec.backend](config, spec.dispatch, core)
        dp_size = size // spec.ep_size
        for p in self.expert_parameters():
            p.expert = True  # legacy_ddp leaves it out of its all-reduce (the trainer hook counts it in the clip norm)
            if size > 1:
                p.register_hook(functools.partial(_expert_grad, size, dp_group, dp_size))
        self._register_state_dict_hook(_save_core_format)
        self._register_load_state_dict_pre_hook(_load_core_format, with_module=True)

    def expert_parameters(self) -> list[nn.Parameter]:
        """This rank's leaf parameters (sharded; every other parameter is replicated)."""
        return self.inner.expert_parameters()

    @property
    def local_leaves(self) -> range:
        return self.inner.local_leaves

    @property
    def ep_group(self) -> Optional[dist.ProcessGroup]:
        return self.inner.ep_group

    def forward(self, x: Tensor) -> BlockOutput:
        # T time, B batch, d model width: x [T, B, d] (any leading axes) -> output of the same shape
        return self.inner.forward_block(x)

    @torch.no_grad()
    def to_fff(self) -> FFF:
        """The core FFF with this block's weights, leaves gathered (collective when ``ep_size > 1``)."""
        with torch.random.fork_rng(devices=[]):
            return self.inner.to_fff()

    def extra_repr(self) -> str:
        leaves = self.local_leaves
        return (f"backend={self.spec.backend}, {self.spec.dispatch}, leaves {leaves.start}..{leaves.stop - 1} of "
                f"{self.config.total_leaves}")


# the flag that sets each DispatchConfig field, to name it in refusals
_FLAGS = {"ep_size": "--fff-ep-size", "capacity_factor": "--fff-capacity-factor"}


def check_spec(config: FFFConfig, spec: ShardSpec) -> None:
    """Refuse what the sharded backends cannot do, naming the flag (before any weight is allocated)."""
    if spec.backend not in _BUILDERS:
        raise ValueError(f"--fff-backend {spec.backend!r} is not allowed here: ShardedFFF takes deepspeed or tutel")
    size, _ = world()
    try:
        spec.dispatch.check(config.total_leaves, size, spec.backend)
    except ValueError as e:
        message = str(e)
        for field, flag in _FLAGS.items():
            message = message.replace(f"DispatchConfig.{field} = ", f"{flag} ")
        raise ValueError(message) from None
    if spec.backend == "deepspeed":
        if config.soft_updates:
            raise ValueError(f"--fff-soft-updates {config.soft_updates} is not allowed with --fff-backend deepspeed: "
                             "DeepSpeed dispatches one leaf per token (--fff-backend tutel or core can train soft)")
        if config.train_mode != "hard":
            raise ValueError(f"--fff-train-mode {config.train_mode} is not allowed with --fff-backend deepspeed: "
                             "must be hard (one leaf per token); soft training runs every leaf for every token")
        if size == 1 and not (dist.is_available() and dist.is_initialized()):
            raise ValueError("--fff-backend deepspeed needs torch.distributed: train on several ranks "
                             "(fff-moe cpu-ranks, or --distributed-world-size on GPUs), or use --fff-backend core")
    if config.d_out != config.d_model:
        raise ValueError(f"--fff-backend {spec.backend} maps d_model to d_model (d_out = {config.d_out})")


def _deepspeed_layer(config: FFFConfig, dispatch: DispatchConfig, core: FFF):
    """(DeepSpeed's FFFMoE holding ``core``'s weights, its expert-data-parallel group)."""
    try:
        import deepspeed
    except ImportError as e:
        raise ImportError("--fff-backend deepspeed needs DeepSpeed: pip install 'fff-moe-plugin[deepspeed]'") from e
    from deepspeed.utils import groups

    from ..deepspeed.layer import FFFMoE

    # DeepSpeed's communication layer over the process group fairseq already created
    deepspeed.init_distributed(dist_backend=dist.get_backend(), verbose=False)
    layer = FFFMoE(config, dispatch)
    layer.set_deepspeed_parallelism()
    layer.load_fff(core)
    return layer, groups._get_expert_data_parallel_group(layer.expert_group_name)


def _tutel_layer(config: FFFConfig, dispatch: DispatchConfig, core: FFF):
    """(Tutel's TutelFFF holding ``core``'s weights, its expert-data-parallel group)."""
    from ..tutel import TutelFFF

    ep_group, dp_group = tutel_groups(dispatch.ep_size)
    return TutelFFF(config, dispatch, ep_group, init_from=core), dp_group


# how each backend builds its layer (an ExpertParallelFFF) and finds the leaves' expert-data-parallel group
_BUILDERS = {"deepspeed": _deepspeed_layer, "tutel": _tutel_layer}


def _save_core_format(module: ShardedFFF, state_dict: dict, prefix: str, local_metadata) -> None:
    """State-dict hook: replace the backend's keys (this rank's leaves) by the core FFF's (all leaves)."""
    if module.spec.ep_size > 1 and not _GATHERING:
        raise RuntimeError(
            f"the FFF block at {prefix!r} holds {module.config.total_leaves // module.spec.ep_size} of its "
            f"{module.config.total_leaves} leaves (--fff-ep-size {module.spec.ep_size}): its state dict gathers "
            "the others, a collective; take it on every rank inside "
            "fff_moe_plugin.integrations.fairseq.sharded.gathering()"
        )
    inner = prefix + "inner."
    keep_vars = any(isinstance(v, nn.Parameter) for k, v in state_dict.items() if k.startswith(inner))
    for key in [k for k in state_dict if k.startswith(inner)]:
        del state_dict[key]
    fff = module.to_fff()
    for key, value in fff.state_dict(keep_vars=keep_vars).items():
        # "_extra_state" is the block's config (a dict), the same record this module's own entry holds
        state_dict[prefix + key] = value.detach() if torch.is_tensor(value) and not keep_vars else value


def _load_core_format(module: ShardedFFF, state_dict: dict, prefix: str, local_metadata, strict, missing_keys,
                      unexpected_keys, error_msgs) -> None:
    """Load-state-dict pre-hook: a core-format FFF state (all leaves) is turned into this rank's share.

    The block's config record ``<prefix>_extra_state`` stays: this module checks it against its own config (a
    state dict written before configs travelled with the weights has none and loads unchecked)."""
    move_legacy_keys(state_dict, prefix)  # a core-format state written before the router and master-leaf modules
    if prefix + "router.node_weight" not in state_dict:
        return  # the backend's own keys: loaded as they are
    extra = prefix + "_extra_state"
    with torch.device("meta"):
        fff = FFF(module.config)
    core_keys = [prefix + k for k in fff.state_dict() if prefix + k in state_dict and k != "_extra_state"]
    own = {k[len(prefix):]: state_dict[k] for k in core_keys}
    if extra in state_dict:
        own["_extra_state"] = state_dict[extra]
    result = fff.load_state_dict(own, strict=False, assign=True)
    if result.missing_keys:
        error_msgs.append(f"FFF block {prefix!r}: missing {', '.join(prefix + k for k in result.missing_keys)}")
        return
    for k in core_keys:
        del state_dict[k]
    with torch.no_grad():
        module.inner.load_fff(fff)
    for key, value in module.inner.state_dict(prefix=prefix + "inner.", keep_vars=False).items():
        state_dict[key] = value
