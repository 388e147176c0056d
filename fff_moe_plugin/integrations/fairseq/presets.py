"""Preset sizes: a CPU-sized Penn Treebank model and the sigma-MoE paper's settings, parameter-equal.

docs/methods.md §4: WikiText-103 small (d 412, 16 layers, 10 heads, MoE 16 x 128 K=4, PKM 62^2), WikiText-103
big (d 1024, 18 layers, 16 heads, dropout 0.2, MoE 32 x 128 K=4, expert dropout 0.1, PKM 89^2) and enwik8
(d 512, 12 layers, 8 heads, MoE 16 x 128 K=4, gamma 1e-4, expert dropout 0.05, PKM 62^2), whose dense
baselines have d_ff = 4.985 d, 4.014 d and 4.01 d. Every feedforward block comes from the package's
parameter matching (``fff_moe_plugin.matching``): sigma-MoE and PKM against that dense block, the FFF
against the mean of the three, so the presets of one setting have feedforward parameter counts within 1%
of each other. No fairseq import here (``architectures`` does
the registering).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from ...config import BlockConfig, DenseConfig
from ...matching import match, match_fff

KINDS = ("dense", "fff", "sigma_moe", "pkm")
# the fairseq model each kind belongs to: its architecture without a preset's sizes
MODEL_OF_KIND = {"dense": "transformer_lm", "fff": "transformer_lm_fff", "sigma_moe": "transformer_lm_sigma_moe",
                 "pkm": "transformer_lm_pkm"}


@dataclass(frozen=True)
class Setting:
    """A transformer size and its blocks' sizes; the block fields not set here keep their config defaults."""

    name: str
    d_model: int
    layers: int
    heads: int
    dense_ffn: int
    dropout: float
    context: int  # tokens per sample the setting was trained with (a task flag, given on the command line)
    fff_depth: int
    expert_size: int
    top_k: int
    pkm_heads: int
    pkm_knn: int
    tied_embeddings: bool = False  # the output layer shares the input embedding (fairseq's
    # --share-decoder-input-output-embed): with a small vocabulary, the feedforward blocks hold most parameters
    fff: dict[str, Any] = field(default_factory=dict)
    sigma_moe: dict[str, Any] = field(default_factory=dict)
    pkm: dict[str, Any] = field(default_factory=dict)

    def blocks(self, **fff_fields: Any) -> dict[str, BlockConfig]:
        """Parameter-equal dense, FFF, sigma-MoE and PKM configs; ``fff_fields`` change the FFF (e.g.
        ``master_leaf=True``) before its leaf width is matched."""
        rows = self._matched()
        out = {"dense": rows["dense"], "sigma_moe": _with(rows["sigma_moe"], self.sigma_moe),
               "pkm": _with(rows["pkm"], self.pkm)}
        out["fff"] = match_fff(self.d_model, _mean_size(rows), self.fff_depth, **{**self.fff, **fff_fields})
        return {k: out[k] for k in KINDS}

    def ff_target(self) -> int:
        """The parameter count every FFF of this setting is matched to: the mean of the dense, sigma-MoE and PKM
        blocks' (the FFF is the finest-grained; PKM's n_keys^2 steps are coarse)."""
        return _mean_size(self._matched())

    def _matched(self) -> dict[str, BlockConfig]:
        return {r.kind: r.config for r in match(
            self.d_model, self.dense_ffn, ("dense", "sigma_moe", "pkm"), expert_size=self.expert_size,
            top_k=self.top_k, pkm_heads=self.pkm_heads, pkm_knn=self.pkm_knn,
        )}


def _mean_size(rows: dict[str, BlockConfig]) -> int:
    return round(sum(c.num_parameters() for c in rows.values()) / len(rows))


def _with(config: BlockConfig, fields: dict[str, Any]) -> BlockConfig:
    return type(config).from_dict({**config.to_dict(), **fields})


def _pre_ln_scale(layers: int) -> float:
    return math.sqrt(2.0 / layers)


SETTINGS: dict[str, Setting] = {
    # CPU-sized: 2 layers of width 128 on Penn Treebank; trains in minutes on 2 cores. Two PKM heads, because
    # with four the n_keys^2 steps land no closer than 1.2% to the sigma-MoE's 8 x 64 experts.
    "ptb_tiny": Setting(
        "ptb_tiny", d_model=128, layers=2, heads=4, dense_ffn=512, dropout=0.1, context=128, fff_depth=3,
        expert_size=64, top_k=2, pkm_heads=2, pkm_knn=32,
        sigma_moe={"weight_scale": _pre_ln_scale(2)},
    ),
    # the comparison's default (``fff-moe compare``): ptb_tiny's transformer with tied embeddings, for Penn
    # Treebank in a 1k sentencepiece vocabulary. Its feedforward blocks are half the model's parameters (word-level
    # PTB's 10k-word embeddings leave them 9%), so the blocks compared decide the result.
    "ptb_small": Setting(
        "ptb_small", d_model=128, layers=2, heads=4, dense_ffn=512, dropout=0.1, context=128, fff_depth=3,
        expert_size=64, top_k=2, pkm_heads=2, pkm_knn=32, tied_embeddings=True,
        sigma_moe={"weight_scale": _pre_ln_scale(2)},
    ),
    "wt103_small": Setting(
        "wt103_small", d_model=412, layers=16, heads=10, dense_ffn=2054, dropout=0.1, context=256, fff_depth=4,
        expert_size=128, top_k=4, pkm_heads=4, pkm_knn=128,
        sigma_moe={"entropy_coef": 1e-3, "weight_scale": _pre_ln_scale(16)},
    ),
    "wt103_big": Setting(
        "wt103_big", d_model=1024, layers=18, heads=16, dense_ffn=4110, dropout=0.2, context=512, fff_depth=5,
        expert_size=128, top_k=4, pkm_heads=4, pkm_knn=128,
        sigma_moe={"entropy_coef": 1e-3, "expert_dropout": 0.1, "weight_scale": _pre_ln_scale(18)},
    ),
    "enwik8": Setting(
        "enwik8", d_model=512, layers=12, heads=8, dense_ffn=2053, dropout=0.1, context=512, fff_depth=4,
        expert_size=128, top_k=4, pkm_heads=4, pkm_knn=128,
        sigma_moe={"entropy_coef": 1e-4, "expert_dropout": 0.05, "weight_scale": _pre_ln_scale(12)},
    ),
}


def arch_name(kind: str, setting: str) -> str:
    return f"transformer_lm_{kind}_{setting}"


def fairseq_args(setting: Setting, kind: str, block: BlockConfig | None = None) -> dict[str, Any]:
    """The fairseq args (attribute name -> value) of one preset: transformer size plus block flags."""
    from .flags import FAMILIES

    args: dict[str, Any] = {
        "decoder_embed_dim": setting.d_model, "decoder_layers": setting.layers,
        "decoder_attention_heads": setting.heads, "dropout": setting.dropout,
    }
    if setting.tied_embeddings:
        args["share_decoder_input_output_embed"] = True
    block = block if block is not None else setting.blocks()[kind]
    if isinstance(block, DenseConfig):
        args["decoder_ffn_embed_dim"] = block.d_ff
        return args
    family = FAMILIES[kind]
    required = {f.name for f in dataclasses.fields(block) if f.default is dataclasses.MISSING}
    defaults = type(block)(**{k: getattr(block, k) for k in required})
    for name, value in block.to_dict().items():
        if name in ("d_model", "d_out"):
            continue
        attr = family.attr(name)
        if attr.startswith(f"{family.prefix}_no_"):
            if not value:
                args[attr] = True
        elif name in required or value != getattr(defaults, name):
            args[attr] = value
    return args
