"""The fairseq models ``transformer_lm_fff``, ``transformer_lm_sigma_moe`` and ``transformer_lm_pkm``.

Each is fairseq's ``transformer_lm`` (every option of it unchanged, including its defaults under
``--arch <name>``) with the feedforward block of every layer, or of every n-th, replaced by the package's
block. The flags map one-to-one onto the block config's fields (see ``flags``). Size flags left unset are
chosen so that each block has the parameters of the dense feedforward block it replaces (``flags.resolve``); the
resolved block is logged at start-up, and each block's state dict records its config (``_extra_state``). A
float flag that is out of range (NaN and +-inf included) fails while the command line is parsed; any other bad
value fails when the model is built, before training starts; either way the message names the flag.

Importing this module registers the models with fairseq; the plugin's ``--user-dir`` folder does it.
No ``from __future__ import annotations`` here: fairseq reads the dataclass field types at run time.
"""

import logging
from dataclasses import dataclass, field
from typing import Callable, Optional

from fairseq.dataclass import ChoiceEnum
from fairseq.models import register_model
from fairseq.models.transformer_lm import (
    DEFAULT_MAX_TARGET_POSITIONS,
    TransformerLanguageModel,
    TransformerLanguageModelConfig,
)
from fairseq.modules import AdaptiveInput, CharacterTokenEmbedder
from fairseq.utils import eval_str_list, safe_getattr

from .flags import FAMILIES, Family, float_flag_types, layer_plan, resolve, shard_spec
from .layer import BlockDecoder
from .sharded import check_spec, world

logger = logging.getLogger(__name__)

_UNSET = "unset: the block config's default"
_MATCHED = "unset: matched to the parameters of the dense block --decoder-embed-dim / --decoder-ffn-embed-dim"


def _help(text: str) -> dict:
    return {"help": text}


@dataclass
class FFFLanguageModelConfig(TransformerLanguageModelConfig):
    fff_variant: ChoiceEnum(["leaf_mlp", "path_neuron"]) = field(
        default="leaf_mlp", metadata=_help("leaf_mlp: FFF tree of leaf MLPs (FFFConfig); path_neuron: "
                                           "UltraFastBERT path-neuron tree (UltraFastConfig)"))
    fff_every: int = field(default=1, metadata=_help("put the tree in every n-th decoder layer (1: all)"))
    fff_depth: Optional[int] = field(
        default=None, metadata=_help(f"tree depth D: 2^D leaves ({_MATCHED}: the depth whose leaves come closest to "
                                     f"128 units, at least 1; with --fff-leaf-width, the depth that matches best)"))
    fff_leaf_width: Optional[int] = field(
        default=None, metadata=_help(f"hidden units of each leaf MLP (leaf_mlp; {_MATCHED} at the tree's depth)"))
    fff_activation: Optional[str] = field(
        default=None, metadata=_help(f"activation of the leaves / neurons: relu, gelu, silu, tanh, sigmoid, "
                                     f"identity ({_UNSET}: relu for leaf_mlp, gelu for path_neuron)"))
    fff_no_bias: bool = field(default=False, metadata=_help("no biases in nodes and leaves"))
    fff_trees: Optional[int] = field(
        default=None, metadata=_help(f"a forest of K trees: each token reads one leaf in each, the outputs are "
                                     f"summed (leaf_mlp; {_UNSET}: 1)"))
    fff_output_bias: bool = field(default=False, metadata=_help("an output bias (path_neuron only)"))
    fff_train_mode: Optional[str] = field(
        default=None, metadata=_help(f"leaf_mlp: soft (mixture of all leaves) or hard (one leaf per token, "
                                     f"same function as inference); path_neuron: masked or sparse ({_UNSET})"))
    fff_soft_updates: Optional[int] = field(
        default=None, metadata=_help(f"with --fff-train-mode hard: train soft for the first N updates, then hard "
                                     f"(leaf_mlp; {_UNSET}: 0)"))
    fff_hardening: Optional[float] = field(
        default=None, metadata=_help(f"weight of the mean node-decision entropy in the loss ({_UNSET}: 0)"))
    fff_region_leak: Optional[float] = field(
        default=None, metadata=_help(f"probability of flipping a node decision in training ({_UNSET}: 0)"))
    fff_leaf_dropout: Optional[float] = field(
        default=None, metadata=_help(f"dropout on the leaf hidden units in training ({_UNSET}: 0)"))
    fff_load_balance: Optional[str] = field(
        default=None, metadata=_help(f"none, leaf (Switch loss with leaves as experts), node (left/right "
                                     f"balance at each visited node) or bias (no loss: each node's decision "
                                     f"shift moves after every update, DeepSeek-V3's rule) ({_UNSET}: none)"))
    fff_load_balance_coef: Optional[float] = field(
        default=None, metadata=_help(f"weight of the load-balancing loss ({_UNSET}: 0.01)"))
    fff_bias_update_rate: Optional[float] = field(
        default=None, metadata=_help(f"rate of the bias balancing's shift updates; > 0 adds it to a leaf or node "
                                     f"loss ({_UNSET}: 1e-3 with --fff-load-balance bias, else 0 = off)"))
    fff_bias_gate: Optional[str] = field(
        default=None, metadata=_help(f"with bias balancing, the gate of the leaf reached: its path probability "
                                     f"under the unshifted logits (unshifted, DeepSeek-V3's choice) or under the "
                                     f"shifted logits the decisions saw (shifted) ({_UNSET}: unshifted)"))
    fff_master_leaf: bool = field(
        default=False, metadata=_help("blend the tree with an always-on master leaf MLP (eFFF)"))
    fff_master_leaf_width: Optional[int] = field(
        default=None, metadata=_help(f"hidden units of the master leaf ({_UNSET}: the leaf width)"))
    fff_backend: ChoiceEnum(["core", "deepspeed", "tutel"]) = field(
        default="core", metadata=_help("core: the whole tree on every rank (data parallel); deepspeed / tutel: the "
                                       "leaves sharded over --fff-ep-size ranks through DeepSpeed's or Tutel's MoE "
                                       "dispatch (needs --ddp-backend legacy_ddp; leaf_mlp only)"))
    fff_ep_size: Optional[int] = field(
        default=None, metadata=_help("ranks sharing the leaves of one tree with --fff-backend deepspeed / tutel "
                                     "(default: all ranks)"))
    fff_capacity_factor: float = field(
        default=0.0, metadata=_help("with --fff-backend deepspeed / tutel: 0 is dropless (the core layer's "
                                    "function); c > 0 caps each leaf at about c * tokens / leaves tokens per rank "
                                    "and drops the rest"))


@dataclass
class SigmaMoELanguageModelConfig(TransformerLanguageModelConfig):
    moe_every: int = field(default=1, metadata=_help("put the sigma-MoE in every n-th decoder layer (1: all)"))
    moe_n_experts: Optional[int] = field(
        default=None, metadata=_help(f"number of experts E ({_MATCHED}, at the expert size)"))
    moe_expert_size: Optional[int] = field(
        default=None, metadata=_help(f"hidden units G per expert ({_MATCHED} with --moe-n-experts; else 128, the "
                                     f"sigma-MoE paper's, or d_ff / (4 top_k) when that is smaller)"))
    moe_top_k: Optional[int] = field(default=None, metadata=_help(f"experts per token K ({_UNSET}: 4)"))
    moe_activation: Optional[str] = field(
        default=None, metadata=_help(f"expert activation: relu, gelu, silu, tanh, sigmoid, identity "
                                     f"({_UNSET}: relu)"))
    moe_expert_dropout: Optional[float] = field(
        default=None, metadata=_help(f"probability of removing an expert before selection ({_UNSET}: 0)"))
    moe_entropy_coef: Optional[float] = field(
        default=None, metadata=_help(f"gamma, weight of the selection entropy regulariser ({_UNSET}: 1e-3)"))
    moe_weight_scale: Optional[float] = field(
        default=None, metadata=_help(f"w of the initialisation, sqrt(2 / layers) in the paper for pre-LN "
                                     f"({_UNSET}: 1)"))


@dataclass
class PKMLanguageModelConfig(TransformerLanguageModelConfig):
    pkm_every: int = field(default=1, metadata=_help("put the PKM in every n-th decoder layer (1: all)"))
    pkm_n_keys: Optional[int] = field(
        default=None, metadata=_help(f"sub-keys per half: n_keys^2 value slots ({_MATCHED})"))
    pkm_n_heads: Optional[int] = field(default=None, metadata=_help(f"heads ({_UNSET}: 4)"))
    pkm_knn: Optional[int] = field(
        default=None, metadata=_help(f"value slots read per head ({_UNSET}: 128, or n_keys^2 if fewer)"))
    pkm_score_activation: Optional[str] = field(
        default=None, metadata=_help(f"relu or softmax over the selected scores ({_UNSET}: relu)"))


class BlockLanguageModel(TransformerLanguageModel):
    """fairseq's transformer language model with the package's blocks as feedforward layers.

    The decoder returns the blocks' outputs in ``extra["block_outputs"]``; train with the criterion
    ``cross_entropy_fff``, which adds their auxiliary losses (a plain criterion trains without them).
    """

    family: Family

    @classmethod
    def add_args(cls, parser):
        # fairseq's flags from the model's dataclass, the float flags typed to refuse what their config refuses
        super().add_args(_TypedFlags(parser, float_flag_types(cls.family)))

    @classmethod
    def build_model(cls, args, task):
        # validate the block flags first: a bad value fails here, before any weight is allocated
        resolved = resolve(args, cls.family)
        plan = layer_plan(args, cls.family, resolved.config)
        if world()[1] == 0:
            layers = [i for i, config in enumerate(plan) if config is not None]
            logger.info(f"fff_moe: decoder layers {', '.join(map(str, layers))} of {len(plan)}: {resolved.describe()}")
        shard = shard_spec(args, cls.family)
        if shard is not None:
            for config in plan:
                if config is not None:
                    check_spec(config, shard)
        if safe_getattr(args, "checkpoint_activations", False) or safe_getattr(args, "offload_activations", False):
            raise ValueError("--checkpoint-activations is not supported by the block models: the blocks' "
                             "auxiliary losses are returned beside the layer outputs")
        if args.decoder_layers_to_keep:
            args.decoder_layers = len(args.decoder_layers_to_keep.split(","))
        if safe_getattr(args, "max_target_positions", None) is None:
            args.max_target_positions = safe_getattr(args, "tokens_per_sample", DEFAULT_MAX_TARGET_POSITIONS)
        # token embeddings exactly as TransformerLanguageModel.build_model chooses them
        if args.character_embeddings:
            embed_tokens = CharacterTokenEmbedder(
                task.source_dictionary, eval(args.character_filters), args.character_embedding_dim,
                args.decoder_embed_dim, args.char_embedder_highway_layers,
            )
        elif args.adaptive_input:
            embed_tokens = AdaptiveInput(
                len(task.source_dictionary), task.source_dictionary.pad(), args.decoder_input_dim,
                args.adaptive_input_factor, args.decoder_embed_dim,
                eval_str_list(args.adaptive_input_cutoff, type=int), args.quant_noise_pq,
                args.quant_noise_pq_block_size,
            )
        else:
            embed_tokens = cls.build_embedding(args, task.source_dictionary, args.decoder_input_dim)
        decoder = BlockDecoder(args, task.target_dictionary, embed_tokens, plan, no_encoder_attn=True, shard=shard)
        return cls(decoder)


@register_model("transformer_lm_fff", dataclass=FFFLanguageModelConfig)
class FFFLanguageModel(BlockLanguageModel):
    """Transformer LM with fast feedforward trees (Belcak & Wattenhofer, arXiv 2308.14711 / 2311.10770)."""

    family = FAMILIES["fff"]


@register_model("transformer_lm_sigma_moe", dataclass=SigmaMoELanguageModelConfig)
class SigmaMoELanguageModel(BlockLanguageModel):
    """Transformer LM with sigma-MoE feedforward blocks (Csordas, Irie & Schmidhuber, arXiv 2310.10837)."""

    family = FAMILIES["sigma_moe"]


@register_model("transformer_lm_pkm", dataclass=PKMLanguageModelConfig)
class PKMLanguageModel(BlockLanguageModel):
    """Transformer LM with product-key memories as feedforward blocks (Lample et al. 2019)."""

    family = FAMILIES["pkm"]


class _TypedFlags:
    """A parser (or argument group) whose ``add_argument`` gives the flags in ``types`` their own ``type``."""

    def __init__(self, parser, types: dict[str, Callable[[str], float]]):
        self._parser = parser
        self._types = types

    def add_argument(self, *names, **kwargs):
        for name in names:
            if name in self._types:
                kwargs["type"] = self._types[name]
        return self._parser.add_argument(*names, **kwargs)

    def __getattr__(self, name):
        return getattr(self._parser, name)

