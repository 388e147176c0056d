"""Find a model's two-layer feedforward modules by name pattern and put FFF MoE layers in their place.

Planning (:func:`plan_replacements`) only reads the model and checks everything, so a bad ``"fff_moe"``
block fails before any process group exists; applying (:func:`apply_replacements`) builds the layers, which
for ``ep_size > 1`` needs torch.distributed up.

A module converts when its direct children are exactly two ``nn.Linear`` (``d -> h`` then ``h -> d``, in
registration order) plus optional activation and dropout modules, e.g. ``nn.Sequential(Linear, GELU,
Linear)`` or a GPT-style MLP with ``c_fc`` / ``c_proj`` children. The new layer is freshly initialised (a
dense block has no tree to copy) with the core FFF's draws, the same for both backends under one seed; only
the width and, when a child module names it, the activation are taken over.
"""

from __future__ import annotations

import copy
import fnmatch
from dataclasses import dataclass
from typing import Optional

from torch import nn

from ...config import FFFConfig
from ...fff import FFF
from .config import DeepSpeedFFFConfig

_ACTIVATION_MODULES = {nn.ReLU: "relu", nn.SiLU: "silu", nn.Tanh: "tanh", nn.Sigmoid: "sigmoid", nn.Identity: None}
_PASSIVE = (nn.Dropout,)


@dataclass
class Replacement:
    """One planned (then done) replacement: where, how wide, what it becomes."""

    name: str
    d_model: int
    hidden: int
    activation: str
    fff: FFFConfig

    def describe(self, block: DeepSpeedFFFConfig) -> str:
        c = self.fff
        what = ("DeepSpeed top-1 MoE" if block.router == "topk" else f"FFF ({block.backend})")
        return (f"{self.name}: Linear({self.d_model}->{self.hidden})+{self.activation}+Linear -> {what}, depth "
                f"{c.depth}, {c.n_leaves} leaves x {c.leaf_width}"
                f"{f' in each of {c.n_trees} trees' if c.n_trees > 1 else ''}, ep_size {block.ep_size}"
                f"{', master leaf' if c.master_leaf else ''}")


def feedforward_shape(module: nn.Module) -> tuple[int, int, Optional[str]]:
    """``(d_model, hidden, activation or None)`` of a two-layer feedforward module; ValueError saying why not."""
    linears, activation, others = [], None, []
    for child_name, child in module.named_children():
        if isinstance(child, nn.Linear):
            linears.append((child_name, child))
        elif isinstance(child, nn.GELU):
            activation = "gelu" if child.approximate == "none" else None
        elif type(child) in _ACTIVATION_MODULES:
            activation = _ACTIVATION_MODULES[type(child)] or activation
        elif not isinstance(child, _PASSIVE):
            others.append(f"{child_name} ({type(child).__name__})")
    if len(linears) != 2:
        raise ValueError(f"has {len(linears)} nn.Linear children; a two-layer feedforward block has exactly 2")
    if others:
        raise ValueError(f"has children besides two Linear layers, an activation and dropout: {', '.join(others)}")
    (n1, fc1), (n2, fc2) = linears
    if fc1.out_features != fc2.in_features or fc1.in_features != fc2.out_features:
        raise ValueError(f"its Linear layers {n1} ({fc1.in_features}->{fc1.out_features}) and {n2} "
                         f"({fc2.in_features}->{fc2.out_features}) do not form d -> h -> d")
    return fc1.in_features, fc1.out_features, activation


def plan_replacements(model: nn.Module, block: DeepSpeedFFFConfig) -> list[Replacement]:
    """Every module the block's ``replace`` pattern names, checked; raises ValueError naming what is wrong."""
    matched: list[str] = []
    for name, _ in model.named_modules():
        if name and fnmatch.fnmatchcase(name, block.replace) and not any(name.startswith(m + ".") for m in matched):
            matched.append(name)
    if not matched:
        candidates = []
        for name, module in model.named_modules():
            try:
                feedforward_shape(module)
                candidates.append(name)
            except ValueError:
                pass
        raise ValueError(f'"fff_moe" block: replace = {block.replace!r} matches no module; two-layer feedforward '
                         f"modules of this model: {', '.join(candidates) or 'none'}")
    modules = dict(model.named_modules())
    plan, problems = [], []
    for name in matched:
        if "expert" in name:
            problems.append(f"{name}: the name contains 'expert', which DeepSpeed's checkpointing takes for expert "
                            "weights (the tree's nodes would be lost); rename the module")
            continue
        try:
            d, h, act = feedforward_shape(modules[name])
            cfg = block.fff_config(d_model=d, activation=act)
        except ValueError as e:
            problems.append(f"{name}: {e}")
            continue
        if block.backend == "tutel" and d % 2:
            problems.append(f"{name}: width {d} is odd; Tutel's dispatch needs an even width "
                            '(use backend "deepspeed")')
            continue
        plan.append(Replacement(name, d, h, cfg.activation, cfg))
    if problems:
        raise ValueError('"fff_moe" block: cannot convert\n  ' + "\n  ".join(problems))
    return plan


def build_layer(block: DeepSpeedFFFConfig, cfg: FFFConfig) -> nn.Module:
    """The MoE layer one replacement puts in place, wrapped as a feedforward block."""
    import torch

    from .adapter import MoEFeedForward

    d = block.dispatch
    if block.router == "topk":
        from deepspeed.moe.layer import MoE

        from ...leaves import LeafMLP

        leaf = LeafMLP(cfg.d_model, cfg.leaf_width, cfg.d_out, cfg.activation, cfg.bias, cfg.leaf_dropout)
        layer = MoE(hidden_size=cfg.d_model, expert=leaf, num_experts=cfg.n_leaves, k=1, use_rts=False,
                    ep_size=d.ep_size, capacity_factor=d.capacity_factor, eval_capacity_factor=d.eval_capacity_factor,
                    min_capacity=d.min_capacity, drop_tokens=not d.dropless)
        for expert_leaf in layer.deepspeed_moe.experts.deepspeed_experts:
            expert_leaf.reset_parameters()  # DeepSpeed deep-copies one expert; give each its own draw
        return MoEFeedForward(layer, aux_coef=block.load_balance_coef)
    # NOTE: a tree's initial weights are the core FFF's draws and nothing else of the global RNG stream is
    # used while the layer is built, so that under one seed both backends build the same model
    core = FFF(cfg)
    with torch.random.fork_rng(devices=[]):
        if block.backend == "tutel":
            return _tutel_layer(block, core)
        from .layer import FFFMoE

        return MoEFeedForward(FFFMoE.from_fff(core, d, uniform_tokens=block.uniform_tokens))


def _tutel_layer(block: DeepSpeedFFFConfig, core: FFF) -> nn.Module:
    try:
        from ..tutel import TutelFFF
    except ImportError as e:
        raise ImportError(
            f'"fff_moe" block: backend "tutel" needs Tutel and fff_moe_plugin.integrations.tutel.\n{e}'
        ) from e
    import torch.distributed as dist

    from .adapter import MoEFeedForward
    from .tutel_moe import TutelFFFMoE

    if not (dist.is_available() and dist.is_initialized()):
        if block.ep_size > 1:
            raise ValueError(f'"fff_moe" block: ep_size = {block.ep_size} needs torch.distributed initialised before '
                             "the replacement (fff_moe_plugin.deepspeed.initialize does it)")
        # one process and no engine to tell apart expert parameters: the plain layer holds all leaves
        return MoEFeedForward(TutelFFF.from_fff(core, block.dispatch))
    # under torch.distributed, as a DeepSpeed MoE layer on DeepSpeed's expert-parallel group, at every ep_size:
    # the engine reduces the leaves' gradients over the expert-data-parallel group and checkpoints them per leaf
    return MoEFeedForward(TutelFFFMoE.from_fff(core, block.dispatch))


def apply_replacements(model: nn.Module, block: DeepSpeedFFFConfig, plan: list[Replacement]) -> list[Replacement]:
    """Put the planned layers in place (in the model, by attribute); returns the plan."""
    for r in plan:
        parent_name, _, attr = r.name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        old = getattr(parent, attr)
        new = build_layer(block, copy.deepcopy(r.fff))
        p = next(old.parameters(), None)
        if p is not None:
            new = new.to(device=p.device, dtype=p.dtype)
        setattr(parent, attr, new)
    return plan
