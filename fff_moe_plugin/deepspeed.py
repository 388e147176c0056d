"""The DeepSpeed door: ``initialize`` reads the ``"fff_moe"`` block of a DeepSpeed config, swaps the model's
feedforward blocks for expert-parallel FFF layers, and hands the rest to ``deepspeed.initialize``.

    engine, optimizer, _, scheduler = fff_moe_plugin.deepspeed.initialize(model=model, config="ds.json")
    out = engine(batch)
    loss = task_loss + fff_moe_plugin.deepspeed.aux_loss(engine)
    engine.backward(loss); engine.step()

Launch as usual: ``deepspeed --num_gpus N train.py --deepspeed_config ds.json`` (on CPU: ``DS_ACCELERATOR=cpu``).
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Mapping
from typing import Any, Optional, Union

import torch
from torch import Tensor, nn

from .integrations.deepspeed.config import BLOCK_KEY, DeepSpeedFFFConfig


def read_config(
    config: Union[str, os.PathLike, Mapping[str, Any]],
) -> tuple[dict[str, Any], Optional[DeepSpeedFFFConfig]]:
    """Split a DeepSpeed config (dict or JSON path) into DeepSpeed's part and the validated ``"fff_moe"`` block
    (None when absent or ``"enabled": false``). Raises ValueError naming the bad key; touches no process group."""
    if isinstance(config, (str, os.PathLike)):
        with open(config, encoding="utf-8") as f:
            config = json.load(f)
    if not isinstance(config, Mapping):
        raise ValueError(f"a DeepSpeed config must be a JSON object or a path to one, got {type(config).__name__}")
    ds_config = copy.deepcopy(dict(config))
    raw = ds_config.pop(BLOCK_KEY, None)
    if raw is None:
        return ds_config, None
    block = DeepSpeedFFFConfig.from_dict(raw)
    return ds_config, (block if block.enabled else None)


def initialize(
    model: nn.Module,
    config: Union[str, os.PathLike, Mapping[str, Any], None] = None,
    args: Any = None,
    dist_backend: Optional[str] = None,
    verbose: bool = True,
    **kwargs: Any,
):
    """``deepspeed.initialize`` with the ``"fff_moe"`` block applied first; returns DeepSpeed's 4-tuple
    ``(engine, optimizer, training_dataloader, lr_scheduler)``.

    The config comes from ``config`` or ``args.deepspeed_config``. Order: the block is validated and the
    modules its ``replace`` pattern names are checked (all before any process group work); then
    ``deepspeed.init_distributed`` (backend: ``dist_backend`` or the accelerator's), the replacement (printed
    on rank 0 when ``verbose``), and ``deepspeed.initialize(model=model, config=<config without the block>,
    **kwargs)``. Pass no ``model_parameters`` or optimizer instance built before the call: they would hold
    the replaced modules' parameters (a callable optimizer factory is fine).
    """
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    from .integrations.deepspeed.replace import apply_replacements, plan_replacements

    if config is None:
        path = getattr(args, "deepspeed_config", None) or getattr(args, "deepscale_config", None)
        if path is None:
            raise ValueError("no DeepSpeed config: pass config=<dict or path> or args.deepspeed_config")
        config = path
        args = copy.copy(args)
        for name in ("deepspeed_config", "deepscale_config"):
            if hasattr(args, name):
                setattr(args, name, None)
    ds_config, block = read_config(config)
    plan = []
    if block is not None:
        plan = plan_replacements(model, block)
        if isinstance(kwargs.get("optimizer"), torch.optim.Optimizer) or kwargs.get("model_parameters") is not None:
            raise ValueError(
                '"fff_moe" replaces modules, so model_parameters / an optimizer instance built beforehand would '
                "hold stale parameters; leave model_parameters out and give the optimizer in the JSON config or as "
                "a callable taking the parameters"
            )
    deepspeed.init_distributed(
        dist_backend=dist_backend or get_accelerator().communication_backend_name(),
        distributed_port=kwargs.get("distributed_port", 29500),
        dist_init_required=kwargs.get("dist_init_required"),
        verbose=False,
    )
    if block is not None:
        apply_replacements(model, block, plan)
        if verbose and torch.distributed.get_rank() == 0:
            print(f"fff_moe: replaced {len(plan)} module(s)", flush=True)
            for r in plan:
                print("  " + r.describe(block), flush=True)
    return deepspeed.initialize(args=args, model=model, config=ds_config, **kwargs)


def _moe_layers(model: nn.Module):
    """(name, module) of the adapters and of FFF / DeepSpeed MoE layers not inside an adapter."""
    from deepspeed.moe.layer import MoE

    from .integrations.deepspeed.adapter import MoEFeedForward

    inside: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(p + ".") for p in inside):
            continue
        if isinstance(module, (MoEFeedForward, MoE)):
            inside.append(name)
            yield name, module


def aux_loss(model: nn.Module, native_coef: float = 0.01) -> Tensor:
    """Sum of the auxiliary losses of every MoE layer's last forward, to add to the training loss.

    Layers installed by :func:`initialize` contribute their weighted ``aux_loss``; a bare :class:`FFFMoE` or
    ``TutelFFFMoE`` its ``l_aux`` (already weighted); a bare DeepSpeed ``MoE`` its ``l_aux`` times
    ``native_coef``. Works on the model or on the DeepSpeed engine wrapping it. Zero when there is none.
    """
    from .integrations.deepspeed.adapter import MoEFeedForward
    from .integrations.deepspeed.layer import FFFMoE
    from .integrations.deepspeed.tutel_moe import TutelFFFMoE

    total = None
    for name, m in _moe_layers(model):
        if isinstance(m, (MoEFeedForward, TutelFFFMoE)):
            if m.last is None:
                raise ValueError(f"{name} has not run a forward yet; call aux_loss after the model's forward")
            term = m.last.aux_loss
        else:
            term = m.deepspeed_moe.l_aux.float() * (1.0 if isinstance(m, FFFMoE) else native_coef)
        total = term if total is None else total + term
    if total is None:
        p = next(model.parameters(), None)
        return torch.zeros((), device=p.device if p is not None else None)
    return total


def routing_stats(model: nn.Module) -> dict[str, dict[str, Tensor]]:
    """Per MoE layer, the routing statistics of its last forward (``counts`` per leaf / expert, ``dropped``...)."""
    out = {}
    for name, m in _moe_layers(model):
        if hasattr(m, "last"):
            if m.last is not None:
                out[name] = m.last.stats
        else:
            out[name] = {"counts": m.deepspeed_moe.exp_counts.detach().float()}
    return out
