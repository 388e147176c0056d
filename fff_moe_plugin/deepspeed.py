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
    the replaced modules' parameters (a callable optimizer factory is fine). When the model has MoE layers and
    DeepSpeed would clip at ZeRO stage 0 in fp32, the engine clips by the true global gradient norm
    (:func:`install_global_norm_clipping`), so that training is the same at every ``ep_size``.
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
    moe_model = block is not None or _has_moe_layers(model)
    if moe_model and kwargs.get("mpu") is not None and _stage0_fp32_clipping(ds_config):
        raise ValueError(
            f"gradient_clipping = {ds_config.get('gradient_clipping', 1.0)!r} with an mpu is not allowed for a model "
            "with MoE layers at ZeRO stage 0 in fp32: the gradient norm would leave out the experts held by other "
            'ranks; use "gradient_clipping": 0, or ZeRO stage 1 or 2 ("zero_optimization": {"stage": 1})'
        )
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
    out = deepspeed.initialize(args=args, model=model, config=ds_config, **kwargs)
    install_global_norm_clipping(out[0])
    install_legacy_checkpoint_loading(out[0])
    install_bias_balancing(out[0])
    return out


def install_bias_balancing(engine) -> bool:
    """After each optimizer step of ``engine`` (``engine.step()`` at a gradient-accumulation boundary), move the
    decision shifts of the model's bias-balanced trees by their counts summed over all ranks
    (:func:`fff_moe_plugin.balancing.update_balance_biases`). ``initialize`` calls it; returns whether the model
    has such trees."""
    import functools

    from .balancing import balanced_routers, update_balance_biases

    if not balanced_routers(engine.module):
        return False
    step = engine.step

    @functools.wraps(step)
    def step_and_balance(*args, **kwargs):
        before = engine.global_steps
        out = step(*args, **kwargs)
        if engine.global_steps != before:  # the optimizer stepped (not a micro-step inside accumulation)
            update_balance_biases(engine.module)
        return out

    engine.step = step_and_balance
    return True


# -- checkpoints written before the tree's router, leaves and master leaf were modules -------------------------
# Their weights load through the layers' key-remap hooks (router.move_legacy_keys). Their optimizer states hold the
# parameters by position, and FFFMoE's master-leaf blend logit, once a parameter of the layer itself, now comes
# after the tree's nodes: the saved parameter groups are put in today's order before the optimizer reads them.

def install_legacy_checkpoint_loading(engine) -> None:
    """Make ``engine.load_checkpoint`` read the optimizer state of checkpoints written before the tree's parts were
    modules (``initialize`` calls it): at ZeRO stage 0 in fp32 the saved parameter groups are reordered by the
    parameters' names; elsewhere (flattened ZeRO or fp16 / bf16 states) such a checkpoint is refused unless it is
    loaded with ``load_optimizer_states=False`` or ``load_module_only=True`` (the weights load in every case)."""
    import functools
    import inspect

    load = engine.load_checkpoint
    signature = inspect.signature(load)

    @functools.wraps(load)
    def load_checkpoint(*args, **kwargs):
        given = signature.bind(*args, **kwargs)
        given.apply_defaults()
        a = given.arguments
        old_order = _legacy_parameter_order(a["load_dir"], a["tag"])
        if old_order is None or not a["load_optimizer_states"] or a["load_module_only"]:
            return load(*args, **kwargs)
        if engine.zero_optimization() or engine.fp16_enabled() or engine.bfloat16_enabled():
            raise ValueError(
                f"{a['load_dir']}: this checkpoint was written before the tree's router and master leaf were modules, "
                "and its optimizer state (ZeRO-partitioned or fp16/bf16) holds the parameters in their old order; "
                "load it with load_optimizer_states=False (the weights load, the optimizer starts afresh)")
        optimizer = engine.optimizer
        read = optimizer.load_state_dict
        names = {id(p): n for n, p in engine.module.named_parameters()}

        def load_state_dict(state):
            return read(_reorder_parameter_groups(state, optimizer.param_groups, names, old_order))

        optimizer.load_state_dict = load_state_dict
        try:
            return load(*args, **kwargs)
        finally:
            del optimizer.load_state_dict

    engine.load_checkpoint = load_checkpoint


def _legacy_parameter_order(load_dir, tag) -> Optional[dict[str, int]]:
    """{today's parameter name: position in the checkpoint's module state} for a DeepSpeed checkpoint written
    before the tree's router and master leaf were modules; None for any other checkpoint."""
    from .router import LEGACY_NAMES, current_key

    if tag is None:
        latest = os.path.join(load_dir, "latest")
        if not os.path.isfile(latest):
            return None
        with open(latest, encoding="utf-8") as f:
            tag = f.read().strip()
    path = os.path.join(load_dir, str(tag), "mp_rank_00_model_states.pt")
    if not os.path.isfile(path):
        return None
    keys = list(torch.load(path, map_location="cpu", weights_only=False, mmap=True).get("module", {}))
    if not any(current_key(k) != k for k in keys if k.rpartition(".")[2] in LEGACY_NAMES):
        return None
    return {current_key(k): i for i, k in enumerate(keys)}


def _reorder_parameter_groups(state: dict, groups: list[dict], names: dict[int, str],
                              old_order: dict[str, int]) -> dict:
    """An optimizer state dict whose groups list the saved parameter ids in today's parameter order. Groups of
    parameters the module state does not hold (experts, saved in files of their own, in unchanged order) stay."""
    saved_groups = []
    for saved, group in zip(state["param_groups"], groups):
        now = [names[id(p)] for p in group["params"]]
        if len(now) != len(saved["params"]) or not all(n in old_order for n in now):
            saved_groups.append(saved)
            continue
        by_name = dict(zip(sorted(now, key=old_order.__getitem__), saved["params"]))
        saved_groups.append({**saved, "params": [by_name[n] for n in now]})
    return {**state, "param_groups": saved_groups}


def _has_moe_layers(model: nn.Module) -> bool:
    from deepspeed.moe.layer import MoE

    return any(isinstance(m, MoE) for m in model.modules())


def _stage0_fp32_clipping(ds_config: Mapping[str, Any]) -> bool:
    """Whether DeepSpeed clips in ``DeepSpeedEngine.clip_fp32_gradients`` (ZeRO stage 0, neither fp16 nor bf16,
    ``gradient_clipping`` > 0), read with DeepSpeed's own config parsers and defaults."""
    from deepspeed.runtime.config import get_gradient_clipping
    from deepspeed.runtime.precision_config import get_bfloat16_config, get_float16_config
    from deepspeed.runtime.zero.config import get_zero_config

    return (get_gradient_clipping(ds_config) > 0 and get_zero_config(ds_config).stage == 0
            and not get_float16_config(ds_config).enabled and not get_bfloat16_config(ds_config).enabled)


# -- gradient clipping at ZeRO stage 0 -----------------------------------------------------------------------
# At ZeRO stage 0 in fp32, DeepSpeed 0.19's engine clips in DeepSpeedEngine.clip_fp32_gradients, which calls
# deepspeed.runtime.utils.clip_grad_norm_. That function takes each rank's norm of the gradients it holds and
# averages those norms over the data-parallel group. With ep_size > 1 a rank holds only its own experts, so the
# average is not the norm of the model's gradient: the experts held by other ranks drop out, the clipping factor
# depends on ep_size, and a run at ep_size 2 trains differently from the same run at ep_size 1. The engines built
# here compute the true global norm instead and scale as clip_grad_norm_ does. (ZeRO 1 and 2 compute the norm
# in their optimizer, with experts counted once, and fp16 / bf16 at stage 0 use their optimizer's norm; neither
# goes through clip_fp32_gradients.)

def global_grad_norm(parameters) -> Tensor:
    """The 2-norm of the whole model's gradient (float32 scalar), the same on every rank; a collective.

    Replicated (non-expert) gradients are counted once: after DeepSpeed's all-reduce every rank holds the same
    ones. Expert gradients (``allreduce = False``) are counted once per global expert: the sum of squares over
    this rank's experts is all-reduced over the expert-parallel group of their ``group_name`` (``"ep_size_N"``),
    which holds each expert once; the expert-data-parallel replicas hold copies and are not added.
    """
    import torch.distributed as dist
    from deepspeed.accelerator import get_accelerator
    from deepspeed.moe.utils import is_moe_param
    from deepspeed.utils import groups

    dense: list[Tensor] = []
    experts: dict[str, list[Tensor]] = {}
    for p in parameters:
        if is_moe_param(p):
            experts.setdefault(p.group_name, []).append(p)
        else:
            dense.append(p)

    def square_sum(params: list[Tensor], device) -> Tensor:
        norms = [p.grad.detach().float().norm(2) for p in params if p.grad is not None]
        return torch.stack(norms).square().sum() if norms else torch.zeros((), device=device)

    device = next((p.grad.device for p in [*dense, *sum(experts.values(), [])] if p.grad is not None),
                  get_accelerator().current_device_name())
    total = square_sum(dense, device)
    ep_groups = groups._get_expert_parallel_group_dict()
    for name in sorted(experts):  # the same order on every rank: these are collectives
        part = square_sum(experts[name], total.device)
        if name in ep_groups:
            if dist.get_world_size(group=ep_groups[name]) > 1:
                dist.all_reduce(part, group=ep_groups[name])
        elif dist.is_initialized() and dist.get_world_size() > 1:
            raise ValueError(f"expert parameters name the expert-parallel group {name!r}, which DeepSpeed has not "
                             "created; build the MoE layers after deepspeed.init_distributed(...)")
        total = total + part
    return total.sqrt()


def install_global_norm_clipping(engine) -> bool:
    """Give a DeepSpeed engine whose model has MoE layers, at ZeRO stage 0 in fp32 with ``gradient_clipping`` >
    0, a ``clip_fp32_gradients`` that clips by the true global norm (:func:`global_grad_norm`), on this engine
    instance only; ``engine.get_global_grad_norm()`` then returns the norm before clipping. Returns whether it
    was installed (``initialize`` calls it; other engines are left as they are)."""
    if not getattr(engine, "has_moe_layers", False) or engine.gradient_clipping() <= 0:
        return False
    if engine.zero_optimization() or engine.fp16_enabled() or engine.bfloat16_enabled():
        return False
    if engine.mpu is not None:
        raise ValueError("gradient clipping with an mpu is not supported for MoE models at ZeRO stage 0 in fp32; "
                         'use "gradient_clipping": 0, or ZeRO stage 1 or 2')

    def clip_fp32_gradients() -> None:
        # DeepSpeed's scaling, as in deepspeed.runtime.utils.clip_grad_norm_, on the global norm
        params = [p for p in engine.module.parameters() if p.grad is not None]
        norm = global_grad_norm(engine.module.parameters())
        max_norm = torch.tensor(float(engine.gradient_clipping()), device=norm.device)
        clip_coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)  # 0-dim: scales 0-dim gradients too
        for p in params:
            p.grad.detach().mul_(clip_coef.to(p.grad.device, p.grad.dtype))
        engine._global_grad_norm = norm.detach()

    engine.clip_fp32_gradients = clip_fp32_gradients
    return True


def _moe_layers(model: nn.Module):
    """(name, module) of the adapters, and of the MoE layers (the package's expert-parallel FFF layers, DeepSpeed's
    own ``MoE``) not inside an adapter."""
    from deepspeed.moe.layer import MoE

    from .dispatch import ExpertParallelFFF
    from .integrations.deepspeed.adapter import MoEFeedForward

    inside: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(p + ".") for p in inside):
            continue
        if isinstance(module, (MoEFeedForward, ExpertParallelFFF, MoE)):
            inside.append(name)
            yield name, module


def _last(name: str, module: nn.Module):
    """The BlockOutput of an adapter's or FFF layer's last forward; None for DeepSpeed's own MoE."""
    if not hasattr(module, "last"):
        return None
    if module.last is None:
        raise ValueError(f"{name} has not run a forward yet; call aux_loss after the model's forward")
    return module.last


def aux_loss(model: nn.Module, native_coef: float = 0.01) -> Tensor:
    """Sum of the auxiliary losses of every MoE layer's last forward, to add to the training loss.

    Layers installed by :func:`initialize` and bare FFF layers (``FFFMoE``, ``TutelFFFMoE``) contribute their
    weighted ``aux_loss``; a bare DeepSpeed ``MoE`` its ``l_aux`` times ``native_coef``. Works on the model or
    on the DeepSpeed engine wrapping it. Zero when there is none.
    """
    total = None
    for name, m in _moe_layers(model):
        last = _last(name, m)
        term = last.aux_loss if last is not None else m.deepspeed_moe.l_aux.float() * native_coef
        total = term if total is None else total + term
    if total is None:
        p = next(model.parameters(), None)
        return torch.zeros((), device=p.device if p is not None else None)
    return total


def routing_stats(model: nn.Module) -> dict[str, dict[str, Tensor]]:
    """Per MoE layer, the routing statistics of its last forward (``counts`` per leaf / expert, ``dropped``...)."""
    out = {}
    for name, m in _moe_layers(model):
        if not hasattr(m, "last"):
            out[name] = {"counts": m.deepspeed_moe.exp_counts.detach().float()}
        elif m.last is not None:
            out[name] = m.last.stats
    return out
