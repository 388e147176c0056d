"""fairseq-train with FFF leaves sharded over ranks: start-up checks, gathered checkpoints, per-rank optimizer state.

fairseq's ``Trainer`` writes a checkpoint from data-parallel rank 0 alone and, on resume, loads rank 0's
optimizer state into every rank. With the leaves of an FFF sharded over ranks (``--fff-backend deepspeed|tutel``
with ``--fff-ep-size > 1``) the first would keep rank 0's leaves only and the second would give every rank rank
0's Adam moments; and fairseq's gradient clipping leaves the sharded leaves (tagged ``expert``) out of the norm.
:func:`install` (called when fairseq imports the plugin's ``--user-dir``) wraps five ``Trainer`` members; each
wrapper runs fairseq's own code unchanged when the model holds no sharded FFF block:

- ``always_call_state_dict_during_save_checkpoint`` (fairseq's switch for FSDP, whose state dict is also a
  collective) is true, so every rank takes the state dict at each save;
- ``state_dict`` gathers the leaves into the core FFF's format (:func:`.sharded.gathering`) and every rank's
  leaf optimizer state into ``extra_state["fff_moe"]``; the saved model config says ``fff_backend = core``,
  because the weights written are the core layer's: ``fairseq-eval-lm``, sampling and the hub load the
  checkpoint in one process;
- ``load_checkpoint`` first refuses set-ups that would train wrongly (c10d DDP, BMUF, a flat fp16 copy of the
  parameters, ``--no-last-checkpoints``), then loads as fairseq does, then gives each rank its own leaves'
  optimizer state;
- ``clip_grad_norm`` computes the norm of the data-parallel run: fairseq's norm of the replicated parameters
  together with the sharded leaves' gradients, each global leaf counted once (see :func:`leaf_norm`).
  Parameters tagged ``expert`` by anything other than the plugin stay out of the norm, as fairseq has it;
- ``train_step`` then logs the trees' gradient norms (``gnorm_nodes``, ``gnorm_leaves``), tells the trees the
  updates done (``--fff-soft-updates``) and moves the decision shifts of bias-balanced trees
  (``--fff-load-balance bias``, :mod:`fff_moe_plugin.balancing`) by their counts summed over the data-parallel
  ranks, for any model.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import torch
import torch.distributed as dist

from ...balancing import after_optimizer_step
from ...router import current_key
from .criterion import log_tree_gradient_norms
from .sharded import ShardedFFF, gathering

LEGACY_DDP = ("legacy_ddp", "no_c10d")

logger = logging.getLogger(__name__)


def install() -> None:
    """Wrap fairseq's Trainer for sharded FFF blocks (idempotent)."""
    from fairseq.trainer import Trainer

    if getattr(Trainer, "_fff_moe_expert_parallel", False):
        return
    Trainer._fff_moe_expert_parallel = True

    always = Trainer.always_call_state_dict_during_save_checkpoint

    def always_call(self) -> bool:
        return always.fget(self) or bool(sharded_blocks(self, gathered_only=True))

    Trainer.always_call_state_dict_during_save_checkpoint = property(always_call, doc=always.__doc__)

    state_dict = Trainer.state_dict

    @functools.wraps(state_dict)
    def state_dict_with_leaves(self):
        blocks = sharded_blocks(self)
        if not blocks:
            return state_dict(self)
        with gathering():
            state = state_dict(self)
        spec = blocks[0][1].spec
        extra: dict[str, Any] = {"backend": spec.backend, "ep_size": spec.ep_size}
        if not self.cfg.checkpoint.no_save_optimizer_state:
            extra["expert_optimizer_state"] = _gather_optimizer_state(self, blocks)
        state["extra_state"]["fff_moe"] = extra
        _as_core_model(state["cfg"])
        return state

    Trainer.state_dict = state_dict_with_leaves

    load_checkpoint = Trainer.load_checkpoint

    @functools.wraps(load_checkpoint)
    def load_checkpoint_with_leaves(self, filename, reset_optimizer=False, reset_lr_scheduler=False,
                                    optimizer_overrides=None, reset_meters=False):
        blocks = sharded_blocks(self)
        if blocks:
            check_training_setup(self, blocks)
            _load_on_every_rank(self)
            if not reset_optimizer:
                _check_saved_ep_size(filename, blocks)
        extra = load_checkpoint(self, filename, reset_optimizer=reset_optimizer,
                                reset_lr_scheduler=reset_lr_scheduler, optimizer_overrides=optimizer_overrides,
                                reset_meters=reset_meters)
        if blocks and extra is not None and not reset_optimizer:
            _restore_optimizer_state(self, blocks, extra)
        return extra

    Trainer.load_checkpoint = load_checkpoint_with_leaves

    clip_grad_norm = Trainer.clip_grad_norm

    @functools.wraps(clip_grad_norm)
    def clip_grad_norm_with_leaves(self, clip_norm):
        blocks = sharded_blocks(self)
        if not blocks:
            return clip_grad_norm(self, clip_norm)
        # every optimizer wrapper (fp32, FP16Optimizer, memory-efficient fp16, AMP) ends in fairseq's
        # utils.clip_grad_norm_, which computes the norm of the parameters not tagged ``expert``, passes it
        # through aggregate_norm_fn, and scales every gradient (expert ones included) by the clip factor
        tensors = _optimizer_params(self, blocks)
        leaves = [tensors[id(p)] for _, block in blocks for p in block.expert_parameters()]
        return self.optimizer.clip_grad_norm(
            clip_norm, aggregate_norm_fn=functools.partial(leaf_norm, leaves, blocks[0][1]))

    Trainer.clip_grad_norm = clip_grad_norm_with_leaves

    train_step = Trainer.train_step

    @functools.wraps(train_step)
    def train_step_and_balance(self, samples, raise_oom=False):
        out = train_step(self, samples, raise_oom=raise_oom)
        log_tree_gradient_norms(self.model)  # before the shifts move: the gradients of this update
        # the trees learn the updates done (the soft-to-hard schedule), and bias-balanced ones move their decision
        # shifts by counts summed over the data-parallel ranks, so that every rank keeps routing identically
        after_optimizer_step(self.model, self.get_num_updates(), group=_data_parallel_group(self))
        return out

    Trainer.train_step = train_step_and_balance


def _data_parallel_group(trainer):
    """fairseq's data-parallel process group, or None (the whole world, or one process)."""
    if trainer.data_parallel_world_size <= 1:
        return None
    group = trainer.data_parallel_process_group
    return group if isinstance(group, dist.ProcessGroup) else None


def sharded_blocks(trainer, gathered_only: bool = False) -> list[tuple[str, ShardedFFF]]:
    """(name, block) of every sharded FFF block of the trainer's model (with ``gathered_only``: ep_size > 1)."""
    return [(name, m) for name, m in trainer.get_model().named_modules()
            if isinstance(m, ShardedFFF) and (m.spec.ep_size > 1 or not gathered_only)]


def check_training_setup(trainer, blocks: list[tuple[str, ShardedFFF]]) -> None:
    """Refuse, before training, what would silently train or save sharded leaves wrongly."""
    cfg = trainer.cfg
    backend = blocks[0][1].spec.backend
    if trainer.data_parallel_world_size > 1:
        ddp = cfg.distributed_training.ddp_backend
        if ddp not in LEGACY_DDP:
            raise ValueError(
                f"--ddp-backend {ddp} is not allowed with --fff-backend {backend}: it would average the sharded "
                "leaves' gradients with other ranks' different leaves; use --ddp-backend legacy_ddp, which leaves "
                "parameters tagged param.expert out of its all-reduce")
        if cfg.optimization.use_bmuf:
            raise ValueError(f"--use-bmuf is not allowed with --fff-backend {backend}: BMUF averages every "
                             "parameter over the ranks, the sharded leaves included")
    if any(b.spec.ep_size > 1 for _, b in blocks) and cfg.checkpoint.no_last_checkpoints and not cfg.checkpoint.no_save:
        raise ValueError(f"--no-last-checkpoints is not allowed with --fff-backend {backend} and --fff-ep-size > 1: "
                         "every rank joins the gathering of the leaves at each save, which needs rank 0 to write "
                         "at least checkpoint_last.pt")
    _optimizer_params(trainer, blocks)  # raises if the optimizer does not hold each leaf as its own tensor


def _load_on_every_rank(trainer) -> None:
    """Each rank reads the checkpoint file itself (``--load-checkpoint-on-all-dp-ranks``): fairseq's broadcast
    of the state rank 0 loaded unpickles it with ``torch.load``'s weights-only default (torch >= 2.6), which
    refuses the DictConfig in it, so a multi-rank resume would fail."""
    from omegaconf import open_dict

    ckpt = trainer.cfg.checkpoint
    if trainer.data_parallel_world_size > 1 and not ckpt.load_checkpoint_on_all_dp_ranks:
        logger.info("fff_moe: every rank reads the checkpoint itself (--load-checkpoint-on-all-dp-ranks)")
        with open_dict(ckpt):
            ckpt.load_checkpoint_on_all_dp_ranks = True


def _optimizer_params(trainer, blocks) -> dict[int, torch.nn.Parameter]:
    """{id(model leaf parameter): the tensor the optimizer keeps its state under}."""
    opt = trainer.optimizer
    held = {id(p) for group in opt.optimizer.param_groups for p in group["params"]}
    fp16, fp32 = getattr(opt, "fp16_params", None), getattr(opt, "fp32_params", None)
    copies = {id(p): q for p, q in zip(fp16, fp32)} if isinstance(fp32, list) and fp16 is not None else {}
    out: dict[int, torch.nn.Parameter] = {}
    for name, block in blocks:
        for p in block.expert_parameters():
            if id(p) in held:
                out[id(p)] = p
            elif id(p) in copies:
                out[id(p)] = copies[id(p)]
            else:
                raise ValueError(
                    f"the optimizer ({type(opt).__name__}) does not keep the sharded leaves of {name} as tensors of "
                    "their own (--fp16 / --bf16 flatten all parameters into one fp32 copy, mixing them with the "
                    "replicated weights): add --fp16-no-flatten-grads, or use --memory-efficient-fp16 / "
                    "--memory-efficient-bf16")
    return out


def _gather_optimizer_state(trainer, blocks) -> list[dict[str, dict]]:
    """Every expert-parallel rank's leaf optimizer states, indexed by ep rank (a collective over the group)."""
    params = _optimizer_params(trainer, blocks)
    state = trainer.optimizer.optimizer.state
    mine = {}
    for name, block in blocks:
        for i, p in enumerate(block.expert_parameters()):
            entry = state.get(params[id(p)], {})
            mine[f"{name}.{i}"] = {k: (v.detach().cpu().clone() if torch.is_tensor(v) else v) for k, v in entry.items()}
    spec = blocks[0][1].spec
    if spec.ep_size == 1:
        return [mine]
    group = _ep_group(blocks[0][1])
    parts: list[Any] = [None] * spec.ep_size
    dist.all_gather_object(parts, mine, group=group)
    return parts


def _check_saved_ep_size(filename: str, blocks) -> None:
    """Refuse to resume the leaves' optimizer state at another ep size (the number of leaf tensors per rank, and
    so the optimizer's parameter groups, differ), or in an order it was not written in; read before fairseq's own
    load, which would fail obscurely."""
    import os

    if not os.path.isfile(filename):
        return
    state = torch.load(filename, map_location="cpu", mmap=True, weights_only=False)
    legacy = any(current_key(k) != k for k in state.get("model", {}))
    if legacy and state.get("last_optimizer_state") and any(
            b.spec.backend == "deepspeed" and b.config.master_leaf for _, b in blocks):
        raise ValueError(
            f"{filename} was written before the tree's router and master leaf were modules: with --fff-backend "
            "deepspeed and a master leaf the optimizer state holds the parameters in another order; resume it with "
            "--reset-optimizer (the weights load)")
    saved = state.get("extra_state", {}).get("fff_moe")
    ep_size = blocks[0][1].spec.ep_size
    if saved and "expert_optimizer_state" in saved and saved["ep_size"] != ep_size:
        raise ValueError(
            f"{filename}: the leaves' optimizer state was written at --fff-ep-size {saved['ep_size']}, this run has "
            f"--fff-ep-size {ep_size}: resume at --fff-ep-size {saved['ep_size']}, or pass --reset-optimizer "
            "(the weights load at any ep size)")


def _restore_optimizer_state(trainer, blocks, extra: dict) -> None:
    saved = extra.get("fff_moe")
    if not saved or "expert_optimizer_state" not in saved:
        return
    rank = _ep_rank(blocks[0][1])
    shard = saved["expert_optimizer_state"][rank]
    params = _optimizer_params(trainer, blocks)
    state = trainer.optimizer.optimizer.state
    for name, block in blocks:
        for i, p in enumerate(block.expert_parameters()):
            q = params[id(p)]
            entry = shard.get(f"{name}.{i}")
            if entry is None:
                raise ValueError(f"the checkpoint has no optimizer state for leaf parameter {i} of {name}")
            state[q] = {k: (v.to(q.device) if torch.is_tensor(v) else v) for k, v in entry.items()}


def leaf_norm(leaves: list[torch.Tensor], block: ShardedFFF, replicated_norm: torch.Tensor) -> torch.Tensor:
    """The gradient norm of the data-parallel run: ``replicated_norm`` (fairseq's norm of the parameters not tagged
    ``expert``, the same on every rank) together with the leaves (the tensors the optimizer holds for this rank's
    leaves). The sum of squares of this rank's leaf gradients is summed over the expert-parallel group, whose
    ranks hold disjoint leaves that together make the whole tree: each global leaf counts once. A collective
    over that group when ``ep_size > 1``."""
    squares = torch.zeros((), dtype=torch.float32, device=replicated_norm.device)
    for q in leaves:
        if q.grad is not None:
            squares = squares + torch.norm(q.grad.detach(), p=2, dtype=torch.float32).to(squares.device) ** 2
    if block.spec.ep_size > 1:
        dist.all_reduce(squares, group=_ep_group(block))
    return (replicated_norm.float() ** 2 + squares) ** 0.5


def _ep_group(block: ShardedFFF):
    return block.ep_group


def _ep_rank(block: ShardedFFF) -> int:
    if block.spec.ep_size == 1:
        return 0
    return dist.get_rank(_ep_group(block))


def _as_core_model(cfg: Any) -> None:
    """The saved model config of a checkpoint whose FFF weights are in the core layer's format (the core layer
    drops no token, so a capped run's checkpoint evaluates dropless)."""
    model = cfg.get("model") if isinstance(cfg, dict) else getattr(cfg, "model", None)
    if model is None:
        return
    for key, value in (("fff_backend", "core"), ("fff_ep_size", None), ("fff_capacity_factor", 0.0)):
        if isinstance(model, dict):
            if key in model:
                model[key] = value
        elif hasattr(model, key):
            setattr(model, key, value)
