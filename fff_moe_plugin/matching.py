"""Parameter matching: configs of each block with (as nearly as integers allow) the parameters of a dense
feedforward block, as the sigma-MoE paper's parameter-equal protocol asks (docs/methods.md §4).

Counts come from the configs' exact formulas (``num_parameters``), which the tests hold equal to
``sum(p.numel())`` of the built modules.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .config import BlockConfig, DenseConfig, FFFConfig, PKMConfig, SigmaMoEConfig, UltraFastConfig

KINDS = ("dense", "fff", "path_neuron", "sigma_moe", "pkm")


@dataclass
class Match:
    kind: str
    config: BlockConfig
    params: int
    params_per_token: int
    rel_diff: float  # (params - target) / target

    @property
    def percent_used(self) -> float:
        return 100.0 * self.params_per_token / self.params


def _positive(minimum: int = 1, **values: int) -> None:
    """Refuse sizes below ``minimum`` (and non-integers) before any config is built, naming the argument."""
    for name, v in values.items():
        if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
            raise ValueError(f"{name} = {v!r} is not allowed: must be an integer >= {minimum}")


def _closest(candidates: list[BlockConfig], target: int) -> BlockConfig:
    return min(candidates, key=lambda c: abs(c.num_parameters() - target))


def match_fff(
    d_model: int, target: int, depth: int | None = None, leaf_target: int = 128, **fields
) -> FFFConfig:
    """The FFF of ``depth`` whose leaf width best matches ``target``.

    Without a depth, the one whose leaves come closest to ``leaf_target`` units (by default the sigma-MoE
    paper's expert size, so that leaves and experts are alike).
    """
    _positive(leaf_target=leaf_target)
    if depth is None:
        per_unit = 2 * d_model + 2  # one unit of leaf width costs about d_in + d_out + 2 parameters
        per_tree = target / fields.get("n_trees", 1)  # a forest shares the parameters among its trees
        depth = max(0, round(math.log2(max(1.0, per_tree / per_unit / leaf_target))))
    probe = FFFConfig(d_model=d_model, leaf_width=1, depth=depth, **fields)
    fixed = probe.num_parameters() - FFFConfig(d_model=d_model, leaf_width=2, depth=depth, **fields).num_parameters()
    step = -fixed  # parameters per unit of leaf width
    base = probe.num_parameters() - step
    width = max(1, round((target - base) / step))
    return _closest([FFFConfig(d_model=d_model, leaf_width=w, depth=depth, **fields)
                     for w in {max(1, width - 1), width, width + 1}], target)


def match_path_neuron(d_model: int, target: int, **fields) -> UltraFastConfig:
    """The path-neuron tree depth whose neuron count best matches ``target``."""
    return _closest([UltraFastConfig(d_model=d_model, depth=D, **fields) for D in range(0, 25)
                     if UltraFastConfig(d_model=d_model, depth=0, **fields).num_parameters() * 2 ** (D + 1)
                     < 4 * target + 1e9], target)


def match_sigma_moe(d_model: int, target: int, expert_size: int = 128, top_k: int = 4, **fields) -> SigmaMoEConfig:
    """The number of experts of ``expert_size`` that best matches ``target`` (at least ``top_k``)."""
    one = SigmaMoEConfig(d_model=d_model, n_experts=max(1, top_k), expert_size=expert_size, top_k=top_k, **fields)
    per_expert = one.num_parameters() // one.n_experts
    n = max(top_k, round(target / per_expert))
    return _closest([SigmaMoEConfig(d_model=d_model, n_experts=e, expert_size=expert_size, top_k=top_k, **fields)
                     for e in {max(top_k, n - 1), n, n + 1}], target)


def match_pkm(d_model: int, target: int, n_heads: int = 4, knn: int = 32, **fields) -> PKMConfig:
    """The number of sub-keys whose ``n_keys**2`` value slots best match ``target``."""
    d_out = fields.get("d_out") or d_model
    # n^2 d_out + n_heads n d_model = target
    a, b = d_out, n_heads * d_model
    n = max(1, round((-b + math.sqrt(b * b + 4 * a * target)) / (2 * a)))
    candidates = [PKMConfig(d_model=d_model, n_keys=k, n_heads=n_heads, knn=min(knn, k * k), **fields)
                  for k in {max(1, n - 1), n, n + 1}]
    return _closest(candidates, target)


def match(d_model: int, dense_ffn: int, kinds: tuple[str, ...] | list[str] = KINDS, *, fff_depth: int | None = None,
          fff_trees: int = 1, expert_size: int = 128, top_k: int = 4, pkm_heads: int = 4, pkm_knn: int = 32,
          activation: str = "relu") -> list[Match]:
    """Parameter-equal configs of ``kinds`` for a dense block ``d_model -> dense_ffn -> d_model``."""
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        raise ValueError(f"unknown block kind(s) {', '.join(unknown)}; allowed: {', '.join(KINDS)}")
    _positive(expert_size=expert_size, top_k=top_k, pkm_heads=pkm_heads, pkm_knn=pkm_knn, fff_trees=fff_trees)
    if fff_depth is not None:
        _positive(minimum=0, fff_depth=fff_depth)
    dense = DenseConfig(d_model=d_model, d_ff=dense_ffn, activation=activation)
    target = dense.num_parameters()
    builders = {
        "dense": lambda: dense,
        "fff": lambda: match_fff(d_model, target, fff_depth, expert_size, activation=activation, n_trees=fff_trees),
        "path_neuron": lambda: match_path_neuron(d_model, target),
        "sigma_moe": lambda: match_sigma_moe(d_model, target, expert_size, top_k, activation=activation),
        "pkm": lambda: match_pkm(d_model, target, pkm_heads, pkm_knn),
    }
    out = []
    for kind in kinds:
        c = builders[kind]()
        n = c.num_parameters()
        out.append(Match(kind, c, n, c.num_parameters_per_token(), (n - target) / target))
    return out


def describe(config: BlockConfig) -> str:
    """The fields that set a block's size, as ``key=value`` text."""
    keys = {
        "dense": ("d_ff",),
        "fff": ("depth", "leaf_width"),
        "path_neuron": ("depth",),
        "sigma_moe": ("n_experts", "expert_size", "top_k"),
        "pkm": ("n_keys", "n_heads", "knn"),
    }[config.kind]
    if config.kind == "fff" and config.n_trees > 1:
        keys = ("n_trees", *keys)
    return " ".join(f"{k}={getattr(config, k)}" for k in keys)
