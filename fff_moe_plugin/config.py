"""One validated configuration dataclass per block.

Every block takes its config whole. Adapters at the edges (fairseq flags, the DeepSpeed JSON block, the
command line) copy values by field name through :meth:`BlockConfig.from_dict`, which rejects unknown keys.
Every bad value raises ``ValueError`` naming the field, the value and what is allowed, before any tensor
is allocated.

Configs are frozen: once validated they cannot be changed (``dataclasses.replace`` makes a changed, validated
copy), so a layer always computes what its config says. ``FUNCTION_FIELDS`` names the fields that change the
function a layer's weights compute (shapes, activation, how eval scales the leaves); a layer's state_dict
carries its config, and a load that would change one of those fields is refused (see
:meth:`BlockConfig.check_loadable`). The other fields (regularisers, dropout, initialisation scale) only act
in training and may differ, e.g. to fine-tune with another hardening weight.

Each config also knows its exact parameter count and how many of those parameters one token reads, so
that parameter matching needs no model to be built (the tests check both against the built modules).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from .activations import NAMES as ACTIVATIONS

# The largest tree depth accepted at all, and the largest layer (in parameters) a config may describe.
# 2**34 float32 parameters are 64 GiB: anything bigger is a typo, not an experiment.
MAX_DEPTH = 30
MAX_PARAMETERS = 2**34


def _fail(cls_name: str, field: str, value: Any, allowed: str) -> None:
    raise ValueError(f"{cls_name}.{field} = {value!r} is not allowed: {allowed}")


class BlockConfig:
    """Shared validation and (de)serialisation for the block configs."""

    kind: ClassVar[str] = ""

    # -- validation helpers -------------------------------------------------------------------------
    def _set(self, field: str, value: Any) -> None:
        """Normalise a field during validation (the dataclass is frozen afterwards)."""
        object.__setattr__(self, field, value)

    def _int(self, field: str, minimum: int, maximum: int | None = None) -> None:
        value = getattr(self, field)
        # numbers.Integral admits numpy and torch integer scalars; bool is an int subclass but never a size
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            _fail(type(self).__name__, field, value, f"an integer is required, got {type(value).__name__}")
        value = int(value)
        if value < minimum or (maximum is not None and value > maximum):
            rng = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
            _fail(type(self).__name__, field, value, f"must be an integer {rng}")
        self._set(field, value)

    def _float(self, field: str, low: float, high: float | None = None, high_open: bool = False) -> None:
        value = getattr(self, field)
        hi = "inf)" if high is None else (f"{high})" if high_open else f"{high}]")
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            _fail(type(self).__name__, field, value, f"a finite number in [{low}, {hi} is required")
        value = float(value)
        # NaN and +-inf are refused for every float field: they pass ordinary comparisons or poison training
        too_high = high is not None and (value >= high if high_open else value > high)
        if not math.isfinite(value) or value < low or too_high:
            _fail(type(self).__name__, field, value, f"must be a finite number in [{low}, {hi}")
        self._set(field, value)

    def _choice(self, field: str, choices: tuple[str, ...]) -> None:
        value = getattr(self, field)
        if value not in choices:
            _fail(type(self).__name__, field, value, f"must be one of {', '.join(choices)}")

    def _bool(self, field: str) -> None:
        value = getattr(self, field)
        if not isinstance(value, bool):
            _fail(type(self).__name__, field, value, "must be true or false")

    def _size_limit(self) -> None:
        n = self.num_parameters()
        if n > MAX_PARAMETERS:
            raise ValueError(
                f"{type(self).__name__} describes a layer of {n:,} parameters, more than can be allocated "
                f"(limit {MAX_PARAMETERS:,}); reduce depth or widths"
            )

    # -- (de)serialisation --------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, values: Mapping[str, Any]):
        """Build from a mapping; unknown keys raise ``ValueError`` listing the known ones."""
        names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
        if not isinstance(values, Mapping):
            raise ValueError(
                f"{cls.__name__}.from_dict takes a mapping of field names to values (a dict), got "
                f"{type(values).__name__}; fields: {', '.join(names)}"
            )
        unknown = sorted(set(values) - set(names))
        if unknown:
            raise ValueError(
                f"{cls.__name__}: unknown key(s) {', '.join(unknown)}; known keys: {', '.join(names)}"
            )
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    # -- the config that travels with the weights ----------------------------------------------------
    FUNCTION_FIELDS: ClassVar[tuple[str, ...]] = ()
    BLOCK_NAME: ClassVar[str] = "the block class"

    def kind_class_hint(self) -> str:
        return self.BLOCK_NAME

    def check_loadable(self, saved: Any, where: str = "") -> None:
        """Refuse weights saved under a config that computes another function than this one.

        ``saved`` is the ``{"kind": ..., "config": {...}}`` record a block keeps in its state_dict. Fields in
        ``FUNCTION_FIELDS`` must be equal; training-only fields may differ. Raises ``ValueError`` naming the
        first field that differs, with both values.
        """
        name = type(self).__name__
        at = f" (at {where!r})" if where else ""
        if not isinstance(saved, Mapping) or not isinstance(saved.get("config"), Mapping):
            raise ValueError(f"{name}{at}: the saved block config is not a record of the expected form: {saved!r}")
        if saved.get("kind") != self.kind:
            raise ValueError(
                f"{name}{at}: the weights were saved by a {saved.get('kind')!r} block, this is a {self.kind!r} block"
            )
        config = saved["config"]
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        for field in self.FUNCTION_FIELDS:
            # a field the record lacks was added after it was saved: the weights were trained with its default
            # (a default of None is resolved from other fields, so the layer's own value stands in for it)
            default = defaults[field]
            unsaved = getattr(self, field) if default is None or default is dataclasses.MISSING else default
            mine, theirs = getattr(self, field), config.get(field, unsaved)
            if mine != theirs:
                raise ValueError(
                    f"{name}.{field}{at}: the weights were trained with {field} = {theirs!r}, this layer has "
                    f"{field} = {mine!r}, which computes another function with them; build the layer from the "
                    f"saved config instead (e.g. {self.kind_class_hint()}.from_state_dict(state_dict))"
                )

    # -- counting -----------------------------------------------------------------------------------
    def num_parameters(self) -> int:
        raise NotImplementedError

    def num_parameters_per_token(self) -> int:
        """Parameters one token reads in the inference forward."""
        raise NotImplementedError

    def fraction_used_per_token(self) -> float:
        return self.num_parameters_per_token() / self.num_parameters()


@dataclass(frozen=True)
class FFFConfig(BlockConfig):
    """Leaf-MLP fast feedforward tree (Belcak & Wattenhofer 2023, arXiv 2308.14711; eFFF 2405.16836)."""

    kind: ClassVar[str] = "fff"
    BLOCK_NAME: ClassVar[str] = "FFF"

    # shape
    d_model: int
    leaf_width: int
    depth: int
    d_out: int | None = None  # None: same as d_model
    activation: str = "relu"
    bias: bool = True
    n_trees: int = 1  # a forest of K independent trees: each token reads one leaf in each, the outputs are summed
    # training
    train_mode: str = "soft"  # soft: mixture over all leaves; hard: each token runs only its leaf
    soft_updates: int = 0  # with train_mode hard: the first soft_updates optimizer updates train soft, then hard
    hardening: float = 0.0  # coefficient of the mean Bernoulli entropy of the node decisions
    region_leak: float = 0.0  # probability of swapping a node decision, per (token, node), training only
    leaf_dropout: float = 0.0  # dropout on the leaf hidden activations, training only
    # load balancing over leaves
    load_balance: str = "none"  # none | leaf (Switch loss over leaves) | node (left/right at every node) | bias
    load_balance_coef: float = 0.01
    # bias balancing without a loss (DeepSeek-V3's rule at the nodes): the rate each node's decision shift moves by
    # after every optimizer step; 0 = off. load_balance="bias" turns it on alone (rate 1e-3 unless given); with
    # "leaf" or "node" it adds to that loss.
    bias_update_rate: float = 0.0
    # the gate of the leaf a shifted decision chose: its path probability under the unshifted logits (DeepSeek-V3
    # weights a chosen expert by its unbiased affinity), or under the shifted logits, on which the decisions were
    # made (a token the shift sent against its logit's sign then keeps a factor of at least 1/2 there)
    bias_gate: str = "unshifted"
    # master leaf (eFFF): an always-on MLP blended with the tree by a learned sigmoid gate
    master_leaf: bool = False
    master_leaf_width: int | None = None  # None: same as leaf_width

    TRAIN_MODES: ClassVar[tuple[str, ...]] = ("soft", "hard")
    # train_mode is among them: eval scales the chosen leaf by its path probability only for hard-trained trees
    FUNCTION_FIELDS: ClassVar[tuple[str, ...]] = (
        "d_model", "leaf_width", "depth", "d_out", "activation", "bias", "n_trees", "train_mode", "bias_gate",
        "master_leaf", "master_leaf_width",
    )
    LOAD_BALANCE: ClassVar[tuple[str, ...]] = ("none", "leaf", "node", "bias")
    DEFAULT_BIAS_UPDATE_RATE: ClassVar[float] = 1e-3  # DeepSeek-V3's gamma
    BIAS_GATES: ClassVar[tuple[str, ...]] = ("unshifted", "shifted")

    def __post_init__(self) -> None:
        self._int("d_model", 1)
        self._int("leaf_width", 1)
        self._int("depth", 0, MAX_DEPTH)
        if self.d_out is None:
            self._set("d_out", self.d_model)
        self._int("d_out", 1)
        self._choice("activation", ACTIVATIONS)
        self._bool("bias")
        self._int("n_trees", 1)
        self._choice("train_mode", self.TRAIN_MODES)
        self._int("soft_updates", 0)
        if self.soft_updates and self.train_mode != "hard":
            _fail(type(self).__name__, "soft_updates", self.soft_updates,
                  "sets when soft training switches to hard, so it needs train_mode = 'hard' (soft trees train soft "
                  "throughout)")
        self._float("hardening", 0.0)
        self._float("region_leak", 0.0, 1.0)
        self._float("leaf_dropout", 0.0, 1.0, high_open=True)
        self._choice("load_balance", self.LOAD_BALANCE)
        self._float("load_balance_coef", 0.0)
        self._float("bias_update_rate", 0.0)
        if self.load_balance == "bias" and self.bias_update_rate == 0:
            self._set("bias_update_rate", self.DEFAULT_BIAS_UPDATE_RATE)
        if self.bias_balancing and self.train_mode == "soft":
            _fail(type(self).__name__, "train_mode", self.train_mode,
                  "must be 'hard' with bias balancing: its decision shifts move with the hard decisions of training, "
                  "and a soft tree makes none (it trains on every leaf); soft_updates gives a hard tree a soft start")
        if self.bias_balancing and self.region_leak > 0:
            _fail(type(self).__name__, "region_leak", self.region_leak,
                  "must be 0 with bias balancing (a leaked decision and a shifted one cannot both be undone); use "
                  "one of them")
        self._choice("bias_gate", self.BIAS_GATES)
        if self.bias_gate != "unshifted" and not self.bias_balancing:
            _fail(type(self).__name__, "bias_gate", self.bias_gate,
                  "sets the gate of a leaf chosen under decision shifts, so it needs bias balancing "
                  "(load_balance = 'bias' or bias_update_rate > 0); leave it 'unshifted' without")
        self._bool("master_leaf")
        if self.master_leaf:
            if self.master_leaf_width is None:
                self._set("master_leaf_width", self.leaf_width)
            self._int("master_leaf_width", 1)
        elif self.master_leaf_width is not None:
            _fail(type(self).__name__, "master_leaf_width", self.master_leaf_width,
                  "sets the width of the master leaf, so it needs master_leaf = true (leave it unset without one)")
        self._size_limit()

    @property
    def bias_balancing(self) -> bool:
        """Whether the nodes carry decision shifts moved after every step (``bias_update_rate`` > 0)."""
        return self.bias_update_rate > 0

    @property
    def n_nodes(self) -> int:
        return 2**self.depth - 1

    @property
    def n_leaves(self) -> int:
        return 2**self.depth

    @property
    def total_nodes(self) -> int:
        """Nodes of all the trees (``n_trees * n_nodes``)."""
        return self.n_trees * self.n_nodes

    @property
    def total_leaves(self) -> int:
        """Leaves of all the trees (``n_trees * n_leaves``)."""
        return self.n_trees * self.n_leaves

    @property
    def training_width(self) -> int:
        return self.total_leaves * self.leaf_width

    def _leaf_params(self, width: int) -> int:
        b = int(self.bias)
        return self.d_model * width + b * width + width * self.d_out + b * self.d_out

    def _master_params(self) -> int:
        # the master leaf MLP plus its one gate logit
        return self._leaf_params(self.master_leaf_width) + 1 if self.master_leaf else 0

    def num_parameters(self) -> int:
        nodes = self.n_nodes * (self.d_model + int(self.bias))
        tree = nodes + self.n_leaves * self._leaf_params(self.leaf_width)
        return self.n_trees * tree + self._master_params()

    def num_parameters_per_token(self) -> int:
        nodes = self.depth * (self.d_model + int(self.bias))
        return self.n_trees * (nodes + self._leaf_params(self.leaf_width)) + self._master_params()


@dataclass(frozen=True)
class UltraFastConfig(BlockConfig):
    """Path-neuron FFF of UltraFastBERT (Belcak & Wattenhofer 2023, arXiv 2311.10770).

    A tree of ``2**(depth + 1) - 1`` neurons; a token visits ``depth + 1`` of them.
    """

    kind: ClassVar[str] = "path_neuron"
    BLOCK_NAME: ClassVar[str] = "UltraFastFFF"

    d_model: int
    depth: int
    d_out: int | None = None
    activation: str = "gelu"
    bias: bool = True  # neuron biases
    output_bias: bool = False
    n_trees: int = 1  # a forest of K trees (UltraFastBERT's parallel_size): one path in each, the outputs summed
    train_mode: str = "masked"  # masked: all neurons computed, unvisited ones zeroed; sparse: visited only

    TRAIN_MODES: ClassVar[tuple[str, ...]] = ("masked", "sparse")  # the same function, computed two ways
    FUNCTION_FIELDS: ClassVar[tuple[str, ...]] = ("d_model", "depth", "d_out", "activation", "bias", "output_bias",
                                                  "n_trees")

    def __post_init__(self) -> None:
        self._int("d_model", 1)
        self._int("depth", 0, MAX_DEPTH - 1)
        if self.d_out is None:
            self._set("d_out", self.d_model)
        self._int("d_out", 1)
        self._choice("activation", ACTIVATIONS)
        self._bool("bias")
        self._bool("output_bias")
        self._int("n_trees", 1)
        self._choice("train_mode", self.TRAIN_MODES)
        self._size_limit()

    @property
    def n_neurons(self) -> int:
        """Neurons of one tree."""
        return 2 ** (self.depth + 1) - 1

    @property
    def total_neurons(self) -> int:
        """Neurons of all the trees (``n_trees * n_neurons``)."""
        return self.n_trees * self.n_neurons

    def _neuron_params(self) -> int:
        return self.d_model + int(self.bias) + self.d_out

    def num_parameters(self) -> int:
        return self.total_neurons * self._neuron_params() + int(self.output_bias) * self.d_out

    def num_parameters_per_token(self) -> int:
        return self.n_trees * (self.depth + 1) * self._neuron_params() + int(self.output_bias) * self.d_out


@dataclass(frozen=True)
class SigmaMoEConfig(BlockConfig):
    """sigma-MoE (Csordas, Irie & Schmidhuber 2023, arXiv 2310.10837)."""

    kind: ClassVar[str] = "sigma_moe"
    BLOCK_NAME: ClassVar[str] = "SigmaMoE"

    d_model: int
    n_experts: int
    expert_size: int
    top_k: int = 4
    d_out: int | None = None
    activation: str = "relu"
    expert_dropout: float = 0.0  # probability of removing an expert before selection, training only
    entropy_coef: float = 1e-3  # gamma: weight of sum(p_bar * log p_bar)
    weight_scale: float = 1.0  # w in the paper's init; sqrt(2 / n_layers) for pre-LN stacks

    FUNCTION_FIELDS: ClassVar[tuple[str, ...]] = ("d_model", "n_experts", "expert_size", "top_k", "d_out", "activation")

    def __post_init__(self) -> None:
        self._int("d_model", 1)
        self._int("n_experts", 1)
        self._int("expert_size", 1)
        self._int("top_k", 1)
        if self.top_k > self.n_experts:
            _fail(type(self).__name__, "top_k", self.top_k, f"must be <= n_experts ({self.n_experts})")
        if self.d_out is None:
            self._set("d_out", self.d_model)
        self._int("d_out", 1)
        self._choice("activation", ACTIVATIONS)
        self._float("expert_dropout", 0.0, 1.0, high_open=True)
        self._float("entropy_coef", 0.0)
        self._float("weight_scale", 0.0)
        if self.weight_scale == 0.0:
            _fail(type(self).__name__, "weight_scale", 0.0, "must be > 0")
        self._size_limit()

    def num_parameters(self) -> int:
        return self.n_experts * (self.d_model + self.expert_size * (self.d_model + self.d_out))

    def num_parameters_per_token(self) -> int:
        return self.n_experts * self.d_model + self.top_k * self.expert_size * (self.d_model + self.d_out)


@dataclass(frozen=True)
class PKMConfig(BlockConfig):
    """Product-key memory (Lample et al. 2019) as configured by Csordas et al. 2023 (query = x)."""

    kind: ClassVar[str] = "pkm"
    BLOCK_NAME: ClassVar[str] = "PKM"

    d_model: int
    n_keys: int  # sub-keys per half; n_keys**2 value slots
    n_heads: int = 4
    knn: int = 128  # value slots read per head
    d_out: int | None = None
    score_activation: str = "relu"  # relu | softmax over the knn selected scores

    SCORE_ACTIVATIONS: ClassVar[tuple[str, ...]] = ("relu", "softmax")
    FUNCTION_FIELDS: ClassVar[tuple[str, ...]] = ("d_model", "n_keys", "n_heads", "knn", "d_out", "score_activation")

    def __post_init__(self) -> None:
        self._int("d_model", 2)
        if self.d_model % 2:
            _fail(type(self).__name__, "d_model", self.d_model, "must be even (the query is split in halves)")
        self._int("n_keys", 1)
        self._int("n_heads", 1)
        self._int("knn", 1)
        if self.knn > self.n_keys**2:
            _fail(type(self).__name__, "knn", self.knn, f"must be <= n_keys**2 ({self.n_keys**2})")
        if self.d_out is None:
            self._set("d_out", self.d_model)
        self._int("d_out", 1)
        self._choice("score_activation", self.SCORE_ACTIVATIONS)
        self._size_limit()

    def num_parameters(self) -> int:
        # two halves of d_model / 2 per head: n_heads * n_keys * d_model key parameters
        return self.n_keys**2 * self.d_out + self.n_heads * self.n_keys * self.d_model

    def num_parameters_per_token(self) -> int:
        return self.n_heads * self.n_keys * self.d_model + self.n_heads * self.knn * self.d_out


@dataclass(frozen=True)
class DenseConfig(BlockConfig):
    """The two-layer feedforward block every other block is compared with."""

    kind: ClassVar[str] = "dense"
    BLOCK_NAME: ClassVar[str] = "DenseFFN"

    d_model: int
    d_ff: int
    d_out: int | None = None
    activation: str = "relu"
    bias: bool = True
    dropout: float = 0.0  # on the hidden activations, training only

    FUNCTION_FIELDS: ClassVar[tuple[str, ...]] = ("d_model", "d_ff", "d_out", "activation", "bias")

    def __post_init__(self) -> None:
        self._int("d_model", 1)
        self._int("d_ff", 1)
        if self.d_out is None:
            self._set("d_out", self.d_model)
        self._int("d_out", 1)
        self._choice("activation", ACTIVATIONS)
        self._bool("bias")
        self._float("dropout", 0.0, 1.0, high_open=True)
        self._size_limit()

    def num_parameters(self) -> int:
        b = int(self.bias)
        return self.d_model * self.d_ff + b * self.d_ff + self.d_ff * self.d_out + b * self.d_out

    def num_parameters_per_token(self) -> int:
        return self.num_parameters()

