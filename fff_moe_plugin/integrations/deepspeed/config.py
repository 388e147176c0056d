"""The ``"fff_moe"`` block of a DeepSpeed JSON config, as one validated dataclass.

Example (every key but ``depth``, ``leaf_width`` and ``replace`` has a default)::

    "fff_moe": {"enabled": true, "depth": 4, "leaf_width": 128, "ep_size": 2, "master_leaf": true,
                "load_balance_coef": 0.01, "replace": "blocks.*.mlp"}

The tree's keys are :class:`~fff_moe_plugin.config.FFFConfig` fields with the same names and meanings
(``d_model`` and ``d_out`` come from the module being replaced); the rest are DeepSpeed's MoE knobs and the
replacement itself. Everything is checked in ``__post_init__``, before any process group exists: unknown
keys, bad values (a float key that is NaN or infinite, ``master_leaf_width`` without ``master_leaf``),
``ep_size`` not dividing the number of leaves or the world size, and ``"backend": "tutel"`` without Tutel
installed all raise ``ValueError`` naming the key.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from ...config import FFFConfig

BLOCK_KEY = "fff_moe"


def _fail(key: str, value: Any, allowed: str) -> None:
    raise ValueError(f'"{BLOCK_KEY}" block: {key} = {value!r} is not allowed: {allowed}')


@dataclass
class DeepSpeedFFFConfig:
    """What the ``"fff_moe"`` block says: which modules become FFF layers, their tree, and how it is sharded."""

    # -- the replacement ------------------------------------------------------------------------------
    depth: int
    leaf_width: int
    replace: str  # fnmatch pattern over dotted module names, e.g. "blocks.*.mlp"
    enabled: bool = True
    backend: str = "deepspeed"  # deepspeed: FFFMoE on deepspeed.moe; tutel: TutelFFFMoE, Tutel's dispatch (optional)
    router: str = "tree"  # tree: the FFF tree gate; topk: DeepSpeed's own top-1 gate over the same leaves
    # -- DeepSpeed MoE knobs ----------------------------------------------------------------------------
    ep_size: int = 1
    capacity_factor: float = 1.0
    eval_capacity_factor: float = 1.0
    min_capacity: int = 4
    drop_tokens: bool = True
    # -- the tree (FFFConfig fields of the same names) ------------------------------------------------
    activation: str | None = None  # None: read from the replaced module's activation
    bias: bool = True
    train_mode: str = "hard"
    hardening: float = 0.0
    region_leak: float = 0.0
    leaf_dropout: float = 0.0
    load_balance: str = "leaf"
    load_balance_coef: float = 0.01
    master_leaf: bool = False
    master_leaf_width: int | None = None

    BACKENDS: ClassVar[tuple[str, ...]] = ("deepspeed", "tutel")
    ROUTERS: ClassVar[tuple[str, ...]] = ("tree", "topk")
    TREE_KEYS: ClassVar[tuple[str, ...]] = (
        "depth", "leaf_width", "activation", "bias", "train_mode", "hardening", "region_leak", "leaf_dropout",
        "load_balance", "load_balance_coef", "master_leaf", "master_leaf_width",
    )

    def __post_init__(self) -> None:
        if not isinstance(self.enabled, bool):
            _fail("enabled", self.enabled, "must be true or false")
        if not isinstance(self.replace, str) or not self.replace.strip():
            _fail("replace", self.replace, "a non-empty module-name pattern is required, e.g. \"blocks.*.mlp\"")
        if self.backend not in self.BACKENDS:
            _fail("backend", self.backend, f"must be one of {', '.join(self.BACKENDS)}")
        if self.router not in self.ROUTERS:
            _fail("router", self.router, f"must be one of {', '.join(self.ROUTERS)}")
        if self.backend == "tutel" and self.router != "tree":
            _fail("router", self.router, 'the tutel backend only has the "tree" router')
        # NaN and +-inf pass ordinary range checks (and json.load reads the literals NaN, Infinity): every float
        # key must be a finite number, whatever its range
        for key in self.float_keys():
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v):
                _fail(key, v, "must be a finite number")
        if self.master_leaf is False and self.master_leaf_width is not None:
            _fail("master_leaf_width", self.master_leaf_width,
                  'sets the width of the master leaf, so it needs "master_leaf": true (leave it out without one)')
        if isinstance(self.ep_size, bool) or not isinstance(self.ep_size, int) or self.ep_size < 1:
            _fail("ep_size", self.ep_size, "must be an integer >= 1")
        for key in ("capacity_factor", "eval_capacity_factor"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                _fail(key, v, "must be a number > 0")
            setattr(self, key, float(v))
        if isinstance(self.min_capacity, bool) or not isinstance(self.min_capacity, int) or self.min_capacity < 0:
            _fail("min_capacity", self.min_capacity, "must be an integer >= 0")
        if not isinstance(self.drop_tokens, bool):
            _fail("drop_tokens", self.drop_tokens, "must be true or false")
        if self.train_mode != "hard":
            _fail("train_mode", self.train_mode,
                  'must be "hard": an expert-parallel tree sends each token to one leaf (soft training runs '
                  "every leaf for every token; use the core FFF layer for it)")
        # the tree's own checks, with a stand-in width (d_model comes from the module being replaced)
        try:
            self.fff_config(d_model=1, activation=self.activation or "relu")
        except ValueError as e:
            raise ValueError(f'"{BLOCK_KEY}" block: {e}'.replace("FFFConfig.", "")) from None
        n_leaves = 2**self.depth
        if n_leaves % self.ep_size:
            _fail("ep_size", self.ep_size, f"must divide the number of leaves 2**depth = {n_leaves}")
        world = _world_size()
        if world % self.ep_size:
            _fail("ep_size", self.ep_size, f"must divide the world size ({world} processes)")
        if self.backend == "tutel" and self.ep_size not in (1, world):
            _fail("ep_size", self.ep_size, f'must be 1 or the world size ({world}) with backend "tutel": Tutel runs '
                  "the backward of its all-to-all on the whole world, so its expert-parallel group cannot be a part "
                  "of it")
        if self.backend == "tutel" and self.enabled:
            _check_tutel()  # a disabled block builds nothing, so it needs no Tutel

    @classmethod
    def float_keys(cls) -> tuple[str, ...]:
        """The keys whose values are floats (each must be finite)."""
        return tuple(f.name for f in dataclasses.fields(cls) if f.type in (float, "float"))

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> DeepSpeedFFFConfig:
        """Build from the JSON block; unknown keys raise ``ValueError`` listing the known ones."""
        if not isinstance(values, Mapping):
            raise ValueError(f'"{BLOCK_KEY}" block must be a JSON object, got {type(values).__name__}')
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(values) - set(names))
        if unknown:
            raise ValueError(
                f'"{BLOCK_KEY}" block: unknown key(s) {", ".join(unknown)}; known keys: {", ".join(names)}'
            )
        missing = [n for n in ("depth", "leaf_width", "replace") if n not in values]
        if missing:
            raise ValueError(f'"{BLOCK_KEY}" block: missing required key(s) {", ".join(missing)}')
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def fff_config(self, d_model: int, activation: str | None = None) -> FFFConfig:
        """The FFFConfig of one replaced module of width ``d_model`` (``activation`` fills a None)."""
        values = {k: getattr(self, k) for k in self.TREE_KEYS}
        values["activation"] = self.activation or activation
        if values["activation"] is None:
            raise ValueError(f'"{BLOCK_KEY}" block: activation could not be read from the module; set "activation"')
        return FFFConfig.from_dict({"d_model": d_model, **values})


def _check_tutel() -> None:
    """Refuse ``"backend": "tutel"`` when Tutel cannot be imported, with the commands that build it."""
    import importlib

    try:  # the integration's import raises an ImportError that says how to build Tutel
        importlib.import_module("..tutel", __package__)
    except ImportError as e:
        _fail("backend", "tutel", f"Tutel is not installed (or does not import).\n{e}")


def _world_size() -> int:
    """The world size, from torch.distributed when it is up, else from the launcher's WORLD_SIZE."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    value = os.environ.get("WORLD_SIZE", "1")
    try:
        return max(int(value), 1)
    except ValueError:
        raise ValueError(f"WORLD_SIZE = {value!r} in the environment is not an integer") from None
