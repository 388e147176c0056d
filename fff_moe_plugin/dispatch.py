"""How a tree's leaves are dispatched over ranks: one :class:`DispatchConfig`, and the interface of the layers that
do it (:class:`ExpertParallelFFF`).

The expert-parallel backends (DeepSpeed's ``MoE`` in ``integrations/deepspeed``, Tutel's ``moe_layer`` in
``integrations/tutel``) and every door that builds them (the DeepSpeed JSON block, fairseq's ``--fff-*`` flags)
take a :class:`DispatchConfig` whole. It is validated here, once, with one convention: ``dropless`` says whether
tokens may be dropped; the capacity factors only act when they may. Each door converts its own spelling once
(DeepSpeed's ``drop_tokens``, fairseq's and Tutel's "capacity factor 0 = dropless").

The layers implement :class:`ExpertParallelFFF`, so that fairseq's sharded block, ``fff_moe_plugin.deepspeed``
and the checkpoint code use one interface and never a backend's internals.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

if TYPE_CHECKING:
    import torch.distributed as dist
    from torch import Tensor, nn

    from .block import BlockOutput
    from .fff import FFF


# The default minimum capacity per leaf of each backend: DeepSpeed's MoE default; Tutel's capacity has no minimum.
MIN_CAPACITY = {"deepspeed": 4, "tutel": 0}


def _fail(field: str, value: Any, allowed: str) -> None:
    raise ValueError(f"DispatchConfig.{field} = {value!r} is not allowed: {allowed}")


@dataclass(frozen=True)
class DispatchConfig:
    """Expert parallelism and capacity of a tree's leaves (DeepSpeed's defaults).

    ep_size:              ranks that share one tree's leaves (an expert-parallel group of consecutive ranks);
                          it must divide the number of leaves and the world size.
    capacity_factor:      with token dropping, each leaf takes ``max(ceil(S / L * capacity_factor), min_capacity)``
                          tokens of a rank's S in training (DeepSpeed) or ``capacity_factor * ceil(S / L)``
                          (Tutel, which has no minimum); the tokens beyond are dropped in arrival order (their
                          tree output is zero; the master leaf, if any, still runs).
    eval_capacity_factor: the same in eval.
    min_capacity:         the smallest capacity per leaf (DeepSpeed's backend; Tutel's needs 0).
    dropless:             no token is dropped: the capacity is the largest leaf load over the expert-parallel
                          group, and the function is the core layer's.
    dropless_cap:         with ``dropless``, Tutel's backend may cap the capacity at ``dropless_cap`` times the even
                          share (Tutel's negative capacity factor); None for no cap. DeepSpeed's has no such cap.
    """

    ep_size: int = 1
    capacity_factor: float = 1.0
    eval_capacity_factor: float = 1.0
    min_capacity: int = 4
    dropless: bool = False
    dropless_cap: Optional[float] = None

    def __post_init__(self) -> None:
        if isinstance(self.ep_size, bool) or not isinstance(self.ep_size, numbers.Integral) or self.ep_size < 1:
            _fail("ep_size", self.ep_size, "must be an integer >= 1")
        object.__setattr__(self, "ep_size", int(self.ep_size))
        for name in ("capacity_factor", "eval_capacity_factor"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v) or not v > 0:
                _fail(name, v, "must be a finite number > 0")
            object.__setattr__(self, name, float(v))
        v = self.min_capacity
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 0:
            _fail("min_capacity", v, "must be an integer >= 0")
        object.__setattr__(self, "min_capacity", int(v))
        if not isinstance(self.dropless, bool):
            _fail("dropless", self.dropless, "must be True or False")
        v = self.dropless_cap
        if v is not None:
            if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v) or not v > 0:
                _fail("dropless_cap", v, "must be None or a finite number > 0")
            if not self.dropless:
                _fail("dropless_cap", v, "caps a dropless dispatch, so it needs dropless=True")
            object.__setattr__(self, "dropless_cap", float(v))

    # -- the doors' conventions, converted once -----------------------------------------------------------
    @classmethod
    def from_capacity(cls, capacity_factor: float, ep_size: int = 1, min_capacity: int = 4) -> DispatchConfig:
        """From Tutel's and fairseq's single number: 0 is dropless, c > 0 capped at c (training and eval), c < 0
        dropless up to |c| (Tutel only)."""
        c = capacity_factor
        if isinstance(c, bool) or not isinstance(c, numbers.Real) or not math.isfinite(c):
            _fail("capacity_factor", c, "must be a finite number (0 = dropless, > 0 = capped, < 0 = dropless up to "
                  "|c|)")
        if c == 0:
            return cls(ep_size=ep_size, min_capacity=min_capacity, dropless=True)
        if c < 0:
            return cls(ep_size=ep_size, min_capacity=min_capacity, dropless=True, dropless_cap=-float(c))
        return cls(ep_size=ep_size, capacity_factor=c, eval_capacity_factor=c, min_capacity=min_capacity)

    @classmethod
    def from_deepspeed(cls, ep_size: int = 1, capacity_factor: float = 1.0, eval_capacity_factor: float = 1.0,
                       min_capacity: int = 4, drop_tokens: bool = True) -> DispatchConfig:
        """From the keywords of ``deepspeed.moe.layer.MoE`` (``drop_tokens=False`` is dropless)."""
        if not isinstance(drop_tokens, bool):
            raise ValueError(f"drop_tokens = {drop_tokens!r} is not allowed: must be True or False")
        return cls(ep_size=ep_size, capacity_factor=capacity_factor, eval_capacity_factor=eval_capacity_factor,
                   min_capacity=min_capacity, dropless=not drop_tokens)

    @classmethod
    def resolve(cls, dispatch: Optional[DispatchConfig], owner: str, **deepspeed_kwargs: Any) -> DispatchConfig:
        """``dispatch``, or the one DeepSpeed's MoE keywords describe (not both); TypeError naming ``owner`` for
        anything else."""
        if dispatch is not None:
            if not isinstance(dispatch, DispatchConfig):
                raise TypeError(f"{owner}: dispatch must be a DispatchConfig, got {type(dispatch).__name__}")
            if deepspeed_kwargs:
                raise TypeError(f"{owner}: give either a DispatchConfig or DeepSpeed's MoE keywords "
                                f"({', '.join(sorted(deepspeed_kwargs))}), not both")
            return dispatch
        try:
            return cls.from_deepspeed(**deepspeed_kwargs)
        except TypeError as e:
            raise TypeError(f"{owner}: {e}; DeepSpeed's MoE keywords are ep_size, capacity_factor, "
                            "eval_capacity_factor, min_capacity and drop_tokens") from None

    def replace(self, **changes: Any) -> DispatchConfig:
        """A validated copy with ``changes``."""
        return dataclasses.replace(self, **changes)

    # -- what the backends read ----------------------------------------------------------------------------
    def factor(self, training: bool) -> float:
        """The capacity factor in force (training or eval)."""
        return self.capacity_factor if training else self.eval_capacity_factor

    def tutel_capacity_factor(self, training: bool) -> float:
        """The number Tutel's ``moe_layer`` takes: 0 dropless, c > 0 capped, c < 0 dropless up to |c|."""
        if self.dropless:
            return 0.0 if self.dropless_cap is None else -self.dropless_cap
        return self.factor(training)

    def check(self, n_leaves: int, world_size: int, backend: str) -> None:
        """Refuse what ``backend`` ("deepspeed" or "tutel") cannot do with ``n_leaves`` leaves on ``world_size``
        ranks, before any weight is allocated."""
        if n_leaves % self.ep_size:
            _fail("ep_size", self.ep_size, f"must divide the {n_leaves} leaves")
        if world_size % self.ep_size:
            _fail("ep_size", self.ep_size, f"must divide the number of ranks, the world size ({world_size})")
        if backend == "deepspeed" and self.dropless_cap is not None:
            _fail("dropless_cap", self.dropless_cap, "only the tutel backend caps a dropless dispatch")
        if backend == "tutel":
            if self.ep_size not in (1, world_size):
                _fail("ep_size", self.ep_size, f"must be 1 or the number of ranks, the world size ({world_size}), "
                      "with the tutel backend: Tutel runs the backward of its all-to-all on the whole world whatever "
                      "the group, so the leaves cannot be shared by a part of it (the deepspeed backend can)")
            if not self.dropless and self.min_capacity:
                _fail("min_capacity", self.min_capacity, "must be 0 with the tutel backend, whose capacity has no "
                      "minimum")


class ExpertParallelFFF:
    """What an FFF layer with its leaves sharded over an expert-parallel group offers (DeepSpeed's
    :class:`~fff_moe_plugin.integrations.deepspeed.FFFMoE` and ``TutelFFFMoE``, Tutel's ``TutelFFF``).

    - ``forward_block(x [..., d_model]) -> BlockOutput``: the package's call shape;
    - ``expert_parameters()``: this rank's leaf parameters (every other parameter is replicated);
    - ``ep_group``: the expert-parallel process group (None: the whole world, or one process);
    - ``local_leaves``: the global indices of the leaves this rank holds;
    - ``load_fff(fff)`` / ``to_fff()``: conversion from and to the core :class:`~fff_moe_plugin.FFF` (``to_fff``
      gathers the leaves, a collective over the group).
    """

    config: Any
    dispatch: DispatchConfig

    def forward_block(self, x: Tensor) -> BlockOutput:
        raise NotImplementedError

    def expert_parameters(self) -> list[nn.Parameter]:
        raise NotImplementedError

    @property
    def ep_group(self) -> Optional[dist.ProcessGroup]:
        raise NotImplementedError

    @property
    def local_leaves(self) -> range:
        raise NotImplementedError

    def load_fff(self, fff: FFF) -> None:
        raise NotImplementedError

    def to_fff(self) -> FFF:
        raise NotImplementedError
