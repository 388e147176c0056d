"""fairseq flags <-> block configs: which layers get which block, validated by the core config dataclasses.

Each block family has a flag prefix (``--fff-*``, ``--moe-*``, ``--pkm-*``) and one flag per config field,
named ``--<prefix>-<field>`` (``--fff-leaf-width`` -> ``FFFConfig.leaf_width``). A boolean field whose
config default is true gets ``--<prefix>-no-<field>`` instead (``--fff-no-bias``), since a fairseq flag can
only switch a default. ``d_model`` comes from ``--decoder-embed-dim`` and ``d_out`` equals it.

A flag left unset (``None``) takes the config's own default, so defaults are written once, in
``fff_moe_plugin.config``, except the block's size: size flags left unset are chosen so that the block has
the parameters of the dense feedforward block ``transformer_lm`` would have (``--decoder-embed-dim``,
``--decoder-ffn-embed-dim``), by the package's parameter matching (:func:`resolve`, :data:`SIZE_FIELDS`).
Every error names the flag, not the dataclass field. This module does not import fairseq: ``args`` is
anything with attributes (an argparse Namespace or an omegaconf DictConfig).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Any, Callable

from ...config import MAX_DEPTH, BlockConfig, DenseConfig, FFFConfig, PKMConfig, SigmaMoEConfig, UltraFastConfig
from ...dispatch import MIN_CAPACITY, DispatchConfig
from ...matching import match_fff, match_path_neuron, match_pkm, match_sigma_moe
from .sharded import BACKENDS, ShardSpec, world

# config fields whose flag says it shorter: --fff-trees for FFFConfig.n_trees
FLAG_NAMES = {"n_trees": "trees"}
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
        return f"{self.prefix}_{FLAG_NAMES.get(field, field)}"

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


# The fields that set a block's size. Those left unset are chosen by parameter matching against the dense block.
SIZE_FIELDS: dict[type[BlockConfig], tuple[str, ...]] = {
    FFFConfig: ("depth", "leaf_width"),
    UltraFastConfig: ("depth",),
    SigmaMoEConfig: ("n_experts", "expert_size"),
    PKMConfig: ("n_keys",),
}
# Leaves of about this many units when neither --fff-depth nor --fff-leaf-width is given: the sigma-MoE paper's
# expert size, so that leaves and experts are alike. The tree gets at least one node (depth >= 1).
FFF_LEAF_TARGET = 128
# sigma-MoE experts of this size when neither --moe-n-experts nor --moe-expert-size is given (the paper's
# 128, with its top-k of 4, the config default); a dense block narrower than 4 * top_k experts of 128
# gets experts of d_ff / (4 * top_k) units, so that a token always reads about a quarter of the experts.
MOE_EXPERT_SIZE = 128


@dataclass(frozen=True)
class Resolved:
    """The block config the flags describe, and how its size was found.

    ``chosen``: the fields set by matching or by a size default, not by a flag ({} when every size flag was
    given); ``dense``: the dense block the size was matched against (None when nothing was matched).
    """

    config: BlockConfig
    chosen: dict[str, Any]
    dense: DenseConfig | None

    def describe(self) -> str:
        """One line: the config, its parameters and how they compare with the dense block."""
        n = self.config.num_parameters()
        text = f"{self.config!r}: {n:,} parameters"
        if self.dense is not None:
            target = self.dense.num_parameters()
            text += (f", matched to the dense block of transformer_lm (d_model {self.dense.d_model}, d_ff "
                     f"{self.dense.d_ff}: {target:,} parameters, {100 * (n - target) / target:+.2f}%) by choosing "
                     + ", ".join(f"{k}={v}" for k, v in self.chosen.items()))
        return text


def dense_block(args: Any) -> DenseConfig:
    """The feedforward block ``transformer_lm`` would have: ``--decoder-embed-dim`` -> ``--decoder-ffn-embed-dim``
    -> ``--decoder-embed-dim``, with biases."""
    d, d_ff = _get(args, "decoder_embed_dim"), _get(args, "decoder_ffn_embed_dim")
    try:
        return DenseConfig(d_model=d, d_ff=d_ff)
    except ValueError as e:
        flag = "--decoder-ffn-embed-dim" if "d_ff" in str(e) else "--decoder-embed-dim"
        raise ValueError(f"{flag}: {e} (the block's size is matched to this dense feedforward block)") from e


def block_config(args: Any, family: Family) -> BlockConfig:
    """The validated config the flags describe; ``ValueError`` naming the flag if a value is bad."""
    return resolve(args, family).config


def resolve(args: Any, family: Family) -> Resolved:
    """The validated config the flags describe, its unset size fields matched to the dense block (see
    :data:`SIZE_FIELDS`); ``ValueError`` naming the flag if a value is bad."""
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
            if own[field].default is dataclasses.MISSING and field not in SIZE_FIELDS.get(cls, ()):
                raise ValueError(f"{family.flag(field)} is required ({cls.__name__}.{field} has no default)")
            continue
        values[field] = raw
    if cls is FFFConfig and values.get("master_leaf_width") is not None and not values.get("master_leaf"):
        raise ValueError(f"{family.flag('master_leaf_width')} {values['master_leaf_width']} is not allowed without "
                         f"{family.flag('master_leaf')}: it sets the width of the master leaf; add "
                         f"{family.flag('master_leaf')} or drop {family.flag('master_leaf_width')}")
    missing = [f for f in SIZE_FIELDS.get(cls, ()) if f not in values]
    dense = dense_block(args) if missing else None
    try:
        if dense is None:
            return Resolved(cls.from_dict(values), {}, None)
        config = _MATCHERS[cls](dense, values, missing, family)
    except ValueError as e:
        raise ValueError(_name_flags(str(e), family)) from e
    chosen = {f: getattr(config, f) for f in own if f != "d_out" and f not in values and
              getattr(config, f) != _field_default(own[f])}
    return Resolved(config, chosen, dense)


def _field_default(f: dataclasses.Field) -> Any:
    return None if f.default is dataclasses.MISSING else f.default


def _match_fff(dense: DenseConfig, values: dict[str, Any], missing: list[str], family: Family) -> FFFConfig:
    target, d = dense.num_parameters(), values["d_model"]
    rest = {k: v for k, v in values.items() if k not in ("d_model", "depth", "leaf_width")}
    if "leaf_width" in missing:
        depth = values.get("depth")
        config = match_fff(d, target, depth, FFF_LEAF_TARGET, **rest)
        if depth is None and config.depth == 0:  # a tree, not one leaf: at least one node
            config = match_fff(d, target, 1, FFF_LEAF_TARGET, **rest)
        return config
    # --fff-leaf-width given: the depth whose 2^depth leaves of that width come closest
    candidates = []
    for depth in range(MAX_DEPTH + 1):
        config = FFFConfig(d_model=d, leaf_width=values["leaf_width"], depth=depth, **rest)
        candidates.append(config)
        if config.num_parameters() >= target:
            break
    return min(candidates, key=lambda c: abs(c.num_parameters() - target))


def _match_path_neuron(dense: DenseConfig, values: dict[str, Any], missing: list[str],
                       family: Family) -> UltraFastConfig:
    rest = {k: v for k, v in values.items() if k not in ("d_model", "depth")}
    return match_path_neuron(values["d_model"], dense.num_parameters(), **rest)


def _match_sigma_moe(dense: DenseConfig, values: dict[str, Any], missing: list[str],
                     family: Family) -> SigmaMoEConfig:
    target, d = dense.num_parameters(), values["d_model"]
    rest = {k: v for k, v in values.items() if k not in ("d_model", "n_experts", "expert_size", "top_k")}
    top_k = values.get("top_k", _field_default(SigmaMoEConfig.__dataclass_fields__["top_k"]))
    if "n_experts" in values:  # the expert size whose n_experts experts come closest
        n = values["n_experts"]
        d_out = rest.get("d_out") or d
        size = max(1, round((target / n - d) / (d + d_out)))
        return min((SigmaMoEConfig(d_model=d, n_experts=n, expert_size=g, top_k=top_k, **rest)
                    for g in {max(1, size - 1), size, size + 1}), key=lambda c: abs(c.num_parameters() - target))
    size = values.get("expert_size")
    if size is None:
        size = min(MOE_EXPERT_SIZE, max(1, dense.d_ff // (4 * top_k)))
    return match_sigma_moe(d, target, size, top_k, **rest)


def _match_pkm(dense: DenseConfig, values: dict[str, Any], missing: list[str], family: Family) -> PKMConfig:
    fields = PKMConfig.__dataclass_fields__
    heads = values.get("n_heads", _field_default(fields["n_heads"]))
    knn = values.get("knn", _field_default(fields["knn"]))
    rest = {k: v for k, v in values.items() if k not in ("d_model", "n_keys", "n_heads", "knn")}
    config = match_pkm(values["d_model"], dense.num_parameters(), heads, knn, **rest)
    if "knn" in values and config.knn != knn:
        raise ValueError(f"PKMConfig.knn = {knn!r} is not allowed: must be <= n_keys**2 ({config.n_keys**2}) of the "
                         f"matched n_keys = {config.n_keys}; give {family.flag('n_keys')} or a smaller value")
    return config  # without --pkm-knn, the default is capped at the n_keys**2 value slots


_MATCHERS: dict[type[BlockConfig], Callable[..., BlockConfig]] = {
    FFFConfig: _match_fff, UltraFastConfig: _match_path_neuron, SigmaMoEConfig: _match_sigma_moe, PKMConfig: _match_pkm,
}


_FIELD_ERROR = re.compile(r"^(\w+)\.(\w+) = ")


def _name_flags(message: str, family: Family) -> str:
    """Rewrite ``FFFConfig.depth = -1 is not allowed: ...`` as ``--fff-depth -1 is not allowed: ...``."""
    m = _FIELD_ERROR.match(message)
    if not m:
        return f"{family.prefix} flags: {message}"
    cls_name, field = m.group(1), m.group(2)
    flag = "--decoder-embed-dim" if field == "d_model" else family.flag(field)
    return f"{flag} {message[m.end():]} ({cls_name}.{field})"


def float_flag_types(family: Family) -> dict[str, Callable[[str], float]]:
    """{flag: argparse ``type``} for the family's float flags: each refuses, while the command line is parsed, a
    value its config field refuses (NaN and +-inf always), naming the flag and what is allowed."""
    out: dict[str, Callable[[str], float]] = {}
    for cls in family.variants.values():
        for f in dataclasses.fields(cls):
            if f.type in (float, "float") and f.name not in SHARED_FIELDS:
                out[family.flag(f.name)] = _checked_float(family, cls, f.name)
    if family.name == "fff":
        out["--fff-capacity-factor"] = _checked_float(family, None, "capacity_factor")
    return out


def _checked_float(family: Family, cls: type[BlockConfig] | None, field: str) -> Callable[[str], float]:
    flag = "--" + f"{family.prefix}_{field}".replace("_", "-")
    # the smallest valid config of the class, to check one field against the class's own rules
    probe = {} if cls is None else {f.name: 4 for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING}

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} {text!r} is not allowed: a number is required") from None
        if cls is not None:
            try:
                cls(**probe, **{field: value})
            except ValueError as e:
                if str(e).startswith(f"{cls.__name__}.{field} = "):
                    raise argparse.ArgumentTypeError(_name_flags(str(e), family)) from None
        if not math.isfinite(value):
            allowed = "a finite number" + (" (0: dropless)" if field == "capacity_factor" else "")
            raise argparse.ArgumentTypeError(f"{flag} {value} is not allowed: must be {allowed}")
        return value

    parse.__name__ = "float"  # argparse names the type in some messages
    return parse


def every(args: Any, family: Family, n_layers: int) -> int:
    value = _get(args, family.every_attr)
    value = 1 if value is None else value
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= max(1, n_layers):
        raise ValueError(
            f"--{family.every_attr.replace('_', '-')} {value!r} is not allowed: must be an integer in "
            f"[1, {max(1, n_layers)}] (--decoder-layers {n_layers})"
        )
    return value


def layer_plan(args: Any, family: Family, config: BlockConfig | None = None) -> list[BlockConfig | None]:
    """Per decoder layer, the config of its feedforward block (``config``, or the one the flags describe), or None
    where the layer stays dense.

    With ``--<prefix>-every n`` the layers 0-based ``n-1, 2n-1, ...`` get the block (every layer for n = 1).
    """
    n_layers = _get(args, "decoder_layers")
    keep = _get(args, "decoder_layers_to_keep")
    if keep:
        n_layers = len(str(keep).split(","))
    config = block_config(args, family) if config is None else config
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
    if backend == "deepspeed" and capacity < 0:
        raise ValueError(f"--fff-capacity-factor {capacity} is not allowed with --fff-backend deepspeed: must be 0 "
                         "(dropless) or > 0 (capped); a negative value is Tutel's dropless-up-to-|c|")
    if isinstance(ep_size, bool) or not isinstance(ep_size, int) or ep_size < 1:
        raise ValueError(f"--fff-ep-size {ep_size!r} is not allowed: must be an integer >= 1")
    # the flags' convention (0 = dropless), converted once; Tutel's capacity has no minimum
    dispatch = DispatchConfig.from_capacity(capacity, ep_size, min_capacity=MIN_CAPACITY[str(backend)])
    return ShardSpec(str(backend), dispatch)


def counts_size(config: BlockConfig) -> int:
    """Length of ``stats["counts"]`` for a block: its leaves, experts or value slots."""
    if isinstance(config, FFFConfig):
        return config.total_leaves
    if isinstance(config, UltraFastConfig):
        return config.n_trees * 2**config.depth
    if isinstance(config, SigmaMoEConfig):
        return config.n_experts
    if isinstance(config, PKMConfig):
        return config.n_keys**2
    return 1
