"""fairseq flags <-> block configs: which layers get which block, validated by the core config dataclasses.

Each block family has a flag prefix (``--fff-*``, ``--moe-*``, ``--pkm-*``) and one flag per config field,
named ``--<prefix>-<field>`` (``--fff-leaf-width`` -> ``FFFConfig.leaf_width``). A boolean field whose
config default is true gets ``--<prefix>-no-<field>`` instead (``--fff-no-bias``), since a fairseq flag can
only switch a default. ``d_model`` comes from ``--decoder-embed-dim`` and ``d_out`` equals it.

A flag left unset (``None``) takes the config's own default, so defaults are written once, in
``fff_moe_plugin.config``. Every error names the flag, not the dataclass field. This module does not import
fairseq: ``args`` is anything with attributes (an argparse Namespace or an omegaconf DictConfig).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any

from ...config import BlockConfig, FFFConfig, PKMConfig, SigmaMoEConfig, UltraFastConfig
from .sharded import BACKENDS, ShardSpec, world

# fields every family takes from the transformer, never from a flag of its own
SHARED_FIELDS = ("d_model", "d_out")
# flags of the FFF family that choose how the blocks are dispatched, not what they compute (``shard_spec``)
DISPATCH_ATTRS = ("fff_backend", "fff_ep_size", "fff_capacity_factor")


@dataclass(frozen=True)
class Family:
    """A block family as fairseq sees it: its flag prefix and its config class per variant."""

    name: str
    prefix: str
    variants: dict[str, type[BlockConfig]]
    default_variant: str

    def config_class(self, variant: str) -> type[BlockConfig]:
        return self.variants[variant]

    def fields(self) -> list[str]:
        """Every config field of every variant that has a flag, in declaration order, without repeats."""
        out: list[str] = []
        for cls in self.variants.values():
            out += [f.name for f in dataclasses.fields(cls) if f.name not in SHARED_FIELDS and f.name not in out]
        return out

    def attr(self, field: str) -> str:
        """The args attribute (and, with dashes, the flag) of a config field."""
        if _default_true(self, field):
            return f"{self.prefix}_no_{field}"
        return f"{self.prefix}_{field}"

    def flag(self, field: str) -> str:
        return "--" + self.attr(field).replace("_", "-")

    @property
    def every_attr(self) -> str:
        return f"{self.prefix}_every"

    @property
    def variant_attr(self) -> str:
        return f"{self.prefix}_variant"


def _default_true(family: Family, field: str) -> bool:
    for cls in family.variants.values():
        for f in dataclasses.fields(cls):
            if f.name == field and f.default is True:
                return True
    return False


FAMILIES: dict[str, Family] = {
    "fff": Family("fff", "fff", {"leaf_mlp": FFFConfig, "path_neuron": UltraFastConfig}, "leaf_mlp"),
    "sigma_moe": Family("sigma_moe", "moe", {"sigma_moe": SigmaMoEConfig}, "sigma_moe"),
    "pkm": Family("pkm", "pkm", {"pkm": PKMConfig}, "pkm"),
}


def _get(args: Any, name: str, default: Any = None) -> Any:
    # argparse's Namespace and omegaconf's DictConfig (whose missing keys raise an AttributeError subclass)
    return getattr(args, name, default)


def variant(args: Any, family: Family) -> str:
    value = _get(args, family.variant_attr) or family.default_variant
    if value not in family.variants:
        raise ValueError(
            f"--{family.variant_attr.replace('_', '-')} = {value!r} is not allowed: "
            f"must be one of {', '.join(family.variants)}"
        )
    return value


def block_config(args: Any, family: Family) -> BlockConfig:
    """The validated config the flags describe; ``ValueError`` naming the flag if a value is bad or missing."""
    var = variant(args, family)
    cls = family.config_class(var)
    own = {f.name: f for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {"d_model": _get(args, "decoder_embed_dim")}
    for field in family.fields():
        raw = _get(args, family.attr(field))
        if field not in own:
            if raw not in (None, False):
                raise ValueError(f"{family.flag(field)} does not apply to --{family.variant_attr.replace('_', '-')} "
                                 f"{var} ({cls.__name__} has no field {field})")
            continue
        if _default_true(family, field):
            if raw:  # --<prefix>-no-<field> given
                values[field] = False
            continue
        if raw is None:
            if own[field].default is dataclasses.MISSING:
                raise ValueError(f"{family.flag(field)} is required ({cls.__name__}.{field} has no default)")
            continue
        values[field] = raw
    try:
        return cls.from_dict(values)
    except ValueError as e:
        raise ValueError(_name_flags(str(e), family)) from e


_FIELD_ERROR = re.compile(r"^(\w+)\.(\w+) = ")


def _name_flags(message: str, family: Family) -> str:
    """Rewrite ``FFFConfig.depth = -1 is not allowed: ...`` as ``--fff-depth -1 is not allowed: ...``."""
    m = _FIELD_ERROR.match(message)
    if not m:
        return f"{family.prefix} flags: {message}"
    cls_name, field = m.group(1), m.group(2)
    flag = "--decoder-embed-dim" if field == "d_model" else family.flag(field)
    return f"{flag} {message[m.end():]} ({cls_name}.{field})"


def every(args: Any, family: Family, n_layers: int) -> int:
    value = _get(args, family.every_attr)
    value = 1 if value is None else value
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= max(1, n_layers):
        raise ValueError(
            f"--{family.every_attr.replace('_', '-')} {value!r} is not allowed: must be an integer in "
            f"[1, {max(1, n_layers)}] (--decoder-layers {n_layers})"
        )
    return value


def layer_plan(args: Any, family: Family) -> list[BlockConfig | None]:
    """Per decoder layer, the config of its feedforward block, or None where the layer stays dense.

    With ``--<prefix>-every n`` the layers 0-based ``n-1, 2n-1, ...`` get the block (every layer for n = 1).
    """
    n_layers = _get(args, "decoder_layers")
    keep = _get(args, "decoder_layers_to_keep")
    if keep:
        n_layers = len(str(keep).split(","))
    config = block_config(args, family)
    n = every(args, family, n_layers)
    return [config if (i + 1) % n == 0 else None for i in range(n_layers)]


def shard_spec(args: Any, family: Family) -> ShardSpec | None:
    """How the FFF blocks are dispatched (``--fff-backend``, ``--fff-ep-size``, ``--fff-capacity-factor``);
    None for the core layer (the whole tree on every rank) and for the other families."""
    if family.name != "fff":
        return None
    backend = _get(args, "fff_backend") or "core"
    if backend not in BACKENDS:
        raise ValueError(f"--fff-backend {backend!r} is not allowed: must be one of {', '.join(BACKENDS)}")
    ep_size = _get(args, "fff_ep_size")
    capacity = _get(args, "fff_capacity_factor")
    capacity = 0.0 if capacity is None else capacity
    if backend == "core":
        if ep_size not in (None, 1) or capacity != 0:
            raise ValueError("--fff-ep-size and --fff-capacity-factor apply to --fff-backend deepspeed or tutel; "
                             "the core backend keeps the whole tree on every rank")
        return None
    if variant(args, family) != "leaf_mlp":
        raise ValueError(f"--fff-backend {backend} is not allowed with --fff-variant {variant(args, family)}: the "
                         "sharded backends dispatch leaf MLPs (leaf_mlp); path_neuron trains with --fff-backend core")
    if ep_size is None:
        ep_size = world()[0]
    return ShardSpec(str(backend), ep_size, capacity)


def counts_size(config: BlockConfig) -> int:
    """Length of ``stats["counts"]`` for a block: its leaves, experts or value slots."""
    if isinstance(config, FFFConfig):
        return config.n_leaves
    if isinstance(config, UltraFastConfig):
        return 2**config.depth
    if isinstance(config, SigmaMoEConfig):
        return config.n_experts
    if isinstance(config, PKMConfig):
        return config.n_keys**2
    return 1
