"""The ``"fff_moe"`` block of a DeepSpeed JSON config, as one validated dataclass.

Example (every key but ``depth``, ``leaf_width`` and ``replace`` has a default)::

    "fff_moe": {"enabled": true, "depth": 4, "leaf_width": 128, "ep_size": 2, "master_leaf": true,
                "load_balance_coef": 0.01, "replace": "blocks.*.mlp"}

The tree's keys are :class:`~fff_moe_plugin.config.FFFConfig` fields with the same names and meanings
(``d_model`` and ``d_out`` come from the module being replaced); DeepSpeed's MoE keys (``ep_size``,
``capacity_factor``, ``eval_capacity_factor``, ``min_capacity``, ``drop_tokens``) become one
:class:`~fff_moe_plugin.dispatch.DispatchConfig`; the rest say what is replaced and by which backend.
Everything is checked in :meth:`DeepSpeedFFFConfig.from_dict`, before any process group exists: unknown
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
from ...dispatch import MIN_CAPACITY, DispatchConfig

BLOCK_KEY = "fff_moe"


def _fail(key: str, value: Any, allowed: str) -> None:
    raise ValueError(f'"{BLOCK_KEY}" block: {key} = {value!r} is not allowed: {allowed}')


# The tree's keys are FFFConfig's fields, but for the widths (taken from the module being replaced). Where the
# block's default differs from FFFConfig's, it is written here, once: an expert-parallel tree is hard-routed and
# balanced over its leaves, and its activation is read from the replaced module when the block names none.
TREE_KEYS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(FFFConfig) if f.name not in ("d_model", "d_out"))
TREE_DEFAULTS: dict[str, Any] = {"train_mode": "hard", "load_balance": "leaf", "activation": None}
# DeepSpeed's MoE keys (converted once to a DispatchConfig); min_capacity's default is the backend's (below)
DISPATCH_KEYS: tuple[str, ...] = ("ep_size", "capacity_factor", "eval_capacity_factor", "min_capacity", "drop_tokens")


@dataclass(frozen=True)
class DeepSpeedFFFConfig:
    """What the ``"fff_moe"`` block says: which modules become FFF layers (``replace``, ``backend``, ``router``),
    their tree (``tree``: FFFConfig fields by name, the block's defaults filled in) and how its leaves are
    dispatched (``dispatch``). Tree and dispatch keys read as attributes too (``block.depth``, ``block.ep_size``).
    """

    replace: str  # fnmatch pattern over dotted module names, e.g. "blocks.*.mlp"
    tree: Mapping[str, Any]
    dispatch: DispatchConfig
    enabled: bool = True
    backend: str = "deepspeed"  # deepspeed: FFFMoE on deepspeed.moe; tutel: TutelFFFMoE, Tutel's dispatch (optional)
    router: str = "tree"  # tree: the FFF tree gate; topk: DeepSpeed's own top-1 gate over the same leaves
    uniform_tokens: bool = False  # every rank routes the same number of tokens: capacity agreed once (TreeGate)

    BACKENDS: ClassVar[tuple[str, ...]] = ("deepspeed", "tutel")
    ROUTERS: ClassVar[tuple[str, ...]] = ("tree", "topk")
    BLOCK_KEYS: ClassVar[tuple[str, ...]] = ("enabled", "replace", "backend", "router", "uniform_tokens")

    def __getattr__(self, name: str) -> Any:
        # block.depth, block.ep_size, ...: the tree's and DeepSpeed's keys by their JSON names
        tree = self.__dict__.get("tree", {})
        if name in tree:
            return tree[name]
        if name in DISPATCH_KEYS and "dispatch" in self.__dict__:
            d = self.__dict__["dispatch"]
            return (not d.dropless) if name == "drop_tokens" else getattr(d, name)
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    @classmethod
    def keys(cls) -> tuple[str, ...]:
        return (*cls.BLOCK_KEYS, *DISPATCH_KEYS, *TREE_KEYS)

    @classmethod
    def float_keys(cls) -> tuple[str, ...]:
        """The keys whose values are floats (each must be finite)."""
        tree = tuple(f.name for f in dataclasses.fields(FFFConfig) if f.type in (float, "float"))
        return ("capacity_factor", "eval_capacity_factor", *tree)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> DeepSpeedFFFConfig:
        """Build from the JSON block and check everything, before any process group exists; ValueError naming the
        key for unknown keys and bad values."""
        if not isinstance(values, Mapping):
            raise ValueError(f'"{BLOCK_KEY}" block must be a JSON object, got {type(values).__name__}')
        unknown = sorted(set(values) - set(cls.keys()))
        if unknown:
            raise ValueError(
                f'"{BLOCK_KEY}" block: unknown key(s) {", ".join(unknown)}; known keys: {", ".join(cls.keys())}'
            )
        missing = [n for n in ("depth", "leaf_width", "replace") if n not in values]
        if missing:
            raise ValueError(f'"{BLOCK_KEY}" block: missing required key(s) {", ".join(missing)}')
        enabled, backend, router = values.get("enabled", True), values.get("backend", "deepspeed"), values.get(
            "router", "tree")
        replace = values["replace"]
        if not isinstance(enabled, bool):
            _fail("enabled", enabled, "must be true or false")
        if not isinstance(replace, str) or not replace.strip():
            _fail("replace", replace, "a non-empty module-name pattern is required, e.g. \"blocks.*.mlp\"")
        if backend not in cls.BACKENDS:
            _fail("backend", backend, f"must be one of {', '.join(cls.BACKENDS)}")
        if router not in cls.ROUTERS:
            _fail("router", router, f"must be one of {', '.join(cls.ROUTERS)}")
        if backend == "tutel" and router != "tree":
            _fail("router", router, 'the tutel backend only has the "tree" router')
        uniform = values.get("uniform_tokens", False)
        if not isinstance(uniform, bool):
            _fail("uniform_tokens", uniform, "must be true or false")
        if uniform and (backend != "deepspeed" or router != "tree" or values.get("drop_tokens") is False):
            _fail("uniform_tokens", uniform, 'applies to the tree gate of the "deepspeed" backend with token dropping '
                  "(the capacity agreement it skips); DeepSpeed's top-1 gate and Tutel's capped dispatch never agree "
                  "on the capacity, and a dropless capacity is agreed in every call")
        # NaN and +-inf pass ordinary range checks (and json.load reads the literals NaN, Infinity): every float
        # key must be a finite number, whatever its range
        for key in cls.float_keys():
            v = values.get(key)
            if key in values and (isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v)):
                _fail(key, v, "must be a finite number")
        defaults = {f.name: f.default for f in dataclasses.fields(FFFConfig)
                    if f.name in TREE_KEYS and f.default is not dataclasses.MISSING}
        tree = {**defaults, **TREE_DEFAULTS, **{k: values[k] for k in TREE_KEYS if k in values}}
        if tree.get("master_leaf") is not True and tree.get("master_leaf_width") is not None:
            _fail("master_leaf_width", tree["master_leaf_width"],
                  'sets the width of the master leaf, so it needs "master_leaf": true (leave it out without one)')
        if tree["train_mode"] != "hard":
            _fail("train_mode", tree["train_mode"],
                  'must be "hard": an expert-parallel tree sends each token to one leaf (soft training runs '
                  "every leaf for every token; use the core FFF layer for it)")
        if tree.get("n_trees", 1) != 1 and router == "topk":
            _fail("n_trees", tree["n_trees"], 'must be 1 with "router": "topk" (the top-1 baseline over one tree\'s '
                  "leaves)")
        if tree.get("soft_updates"):
            _fail("soft_updates", tree["soft_updates"], "must be 0: an expert-parallel tree routes each token to one "
                  "leaf from the first step (train the soft phase with the core FFF layer)")
        knobs = {k: values[k] for k in DISPATCH_KEYS if k in values}
        knobs.setdefault("min_capacity", MIN_CAPACITY[backend])
        try:
            dispatch = DispatchConfig.from_deepspeed(**knobs)
            block = cls(replace, tree, dispatch, enabled, backend, router, uniform)
            # the tree's own checks, with a stand-in width (d_model comes from the module being replaced)
            block.fff_config(d_model=1, activation=tree["activation"] or "relu")
            dispatch.check(block.n_trees * 2 ** block.depth, _world_size(), backend)
        except ValueError as e:
            message = str(e).replace("FFFConfig.", "").replace("DispatchConfig.", "")
            raise ValueError(f'"{BLOCK_KEY}" block: {message}') from None
        if backend == "tutel" and enabled:
            _check_tutel()  # a disabled block builds nothing, so it needs no Tutel
        return block

    def to_dict(self) -> dict[str, Any]:
        d = self.dispatch
        return {"replace": self.replace, "enabled": self.enabled, "backend": self.backend, "router": self.router,
                "uniform_tokens": self.uniform_tokens,
                "ep_size": d.ep_size, "capacity_factor": d.capacity_factor,
                "eval_capacity_factor": d.eval_capacity_factor, "min_capacity": d.min_capacity,
                "drop_tokens": not d.dropless, **self.tree}

    def fff_config(self, d_model: int, activation: str | None = None) -> FFFConfig:
        """The FFFConfig of one replaced module of width ``d_model`` (``activation`` fills a None)."""
        values = dict(self.tree)
        values["activation"] = values["activation"] or activation
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
