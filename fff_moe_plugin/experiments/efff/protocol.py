"""Training, model selection and evaluation of one eFFF run, with the test set out of every choice.

The schedule is the paper's (docs/methods.md §3), minus its two protocol flaws:
- phase 1: AdamW, cross-entropy + ``aux_loss`` of the FFF (hardening h, and load balancing alpha for the
  balanced variants), soft routing; after each epoch the model is scored on the VALIDATION split with hard
  routing; the best state is kept; training stops after ``patience`` epochs without improvement;
- phase 2: reload the best state, fresh optimizer, cross-entropy + 3 * hardening; same validation scoring,
  the best state over both phases is the selected model.
:func:`train_and_select` only ever receives a :class:`SelectionData` (fit + validation rows of the training
set). The test split is opened once, in :func:`run_one`, after selection is over. Train and test accuracy
are both measured with hard routing (eval mode: the deployed function); the soft-routing accuracy on the
training data is reported beside it and labelled as such.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from ...losses import usage_entropy
from .datasets import SealedTestSet, SelectionData
from .model import EFFFClassifier, Setting, classifier_config


@dataclass(frozen=True)
class Schedule:
    """Optimisation and selection settings shared by all runs of a reproduction."""

    phase1_epochs: int = 20  # at most; early stopping on validation accuracy
    phase2_epochs: int = 10  # at most
    patience: int = 5  # epochs without a new best validation accuracy before a phase stops
    batch_size: int = 256
    lr: float = 1e-3
    hardening: float = 1.0  # h in phase 1 (the paper's code default)
    balance: float = 1.0  # alpha of the leaf load-balancing loss in phase 1 (balanced variants)
    phase2_hardening: float = 3.0
    val_fraction: float = 0.1
    split_seed: int = 0
    # an "epoch" (the period between validations) covers at least this many training images; a smaller fit
    # split is cycled, so the 3,600-image MNIST subset gets as many optimizer steps as Fashion-MNIST (54,000)
    min_epoch_images: int = 54000
    max_steps: int = 0  # > 0: cap on optimizer steps per epoch (tiny test runs only)
    eval_batch: int = 10000

    def __post_init__(self) -> None:
        for name in ("phase1_epochs", "batch_size", "eval_batch"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"Schedule.{name} = {getattr(self, name)!r} is not allowed: must be an integer >= 1")
        for name in ("phase2_epochs", "patience", "min_epoch_images", "max_steps", "split_seed"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise ValueError(f"Schedule.{name} = {getattr(self, name)!r} is not allowed: must be an integer >= 0")
        for name in ("lr", "hardening", "balance", "phase2_hardening"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ValueError(f"Schedule.{name} = {v!r} is not allowed: must be a finite number >= 0")
        if self.lr == 0:
            raise ValueError("Schedule.lr = 0 is not allowed: must be > 0")
        if not isinstance(self.val_fraction, (int, float)) or not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"Schedule.val_fraction = {self.val_fraction!r} is not allowed: must be in (0, 1)")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class SelectionResult:
    """What selection chose: the phase and epoch of the best validation accuracy, and the curve behind it."""

    best_val_acc: float
    best_phase: int
    best_epoch: int
    epochs_run: tuple[int, int]
    steps: int
    history: list[dict]


@torch.no_grad()
def evaluate(model: EFFFClassifier, x: Tensor, y: Tensor, batch: int = 10000, soft: bool = False):
    """(accuracy, leaf counts [L]) of ``model`` on (x, y); hard routing unless ``soft`` (training forward).

    ``soft=True`` runs the training-mode forward (all leaves mixed by their path probabilities) without
    gradients; the classifier has no dropout or region leak, so it is deterministic.
    """
    was_training = model.training
    model.train(soft)
    correct, counts = 0, torch.zeros(model.config.n_leaves)
    for i in range(0, x.shape[0], batch):
        out = model(x[i:i + batch])
        correct += int((out.output.argmax(-1) == y[i:i + batch]).sum())
        counts += out.stats["counts"]
    model.train(was_training)
    return correct / max(1, x.shape[0]), counts


def _train_epoch(model, opt, data: SelectionData, schedule: Schedule, gen: torch.Generator, hardening: float | None):
    """One pass over the fit split; ``hardening`` None: CE + the FFF's aux_loss, else CE + hardening * H."""
    model.train()
    n = data.fit_y.shape[0]
    # one shuffled pass, or as many as it takes to reach min_epoch_images (the last one cut short)
    passes = [torch.randperm(n, generator=gen) for _ in range(max(1, -(-schedule.min_epoch_images // n)))]
    want = max(n, schedule.min_epoch_images)
    perm = torch.cat(passes)[:want]
    steps, total = 0, 0.0
    for i in range(0, want, schedule.batch_size):
        if schedule.max_steps and steps >= schedule.max_steps:
            break
        idx = perm[i:i + schedule.batch_size]
        out = model(data.fit_x[idx])
        ce = F.cross_entropy(out.output, data.fit_y[idx])
        loss = ce + (out.aux_loss if hardening is None else hardening * out.losses["hardening"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        steps += 1
        value = float(loss.detach())
        if not math.isfinite(value):
            # a diverged run is not a result: stop before it is recorded (and then skipped on resume)
            raise ValueError(f"the training loss became {value} at step {steps} (lr {schedule.lr:g}, hardening "
                             f"{hardening if hardening is not None else schedule.hardening:g}); this run is not "
                             "recorded: lower --lr or the loss weights")
        total += value
    return steps, total / max(1, steps)


def train_and_select(
    model: EFFFClassifier,
    data: SelectionData,
    schedule: Schedule,
    seed: int,
    log: Callable[[str], None] | None = None,
) -> SelectionResult:
    """Train ``model`` in the two phases; leave it in eval mode holding the best state on validation.

    Receives only training-set data (``SelectionData``): every choice (early stopping, the kept
    checkpoint, the state phase 2 starts from) is made on ``data.val_*``.
    """
    if not isinstance(data, SelectionData):
        raise TypeError(f"train_and_select takes SelectionData (training-set rows only), got {type(data).__name__}")
    gen = torch.Generator().manual_seed(seed)
    best = {"acc": -1.0, "phase": 0, "epoch": 0, "state": None}
    history: list[dict] = []
    steps_total = 0
    epochs_run = [0, 0]
    # phase 1: the variant's own objective; phase 2: CE + phase2_hardening * hardening, from the best state
    for phase, epochs, hardening in ((1, schedule.phase1_epochs, None),
                                     (2, schedule.phase2_epochs, schedule.phase2_hardening)):
        if epochs == 0:
            continue
        if phase == 2:
            model.load_state_dict(best["state"])
        opt = torch.optim.AdamW(model.parameters(), lr=schedule.lr)
        since_best = 0
        for epoch in range(1, epochs + 1):
            steps, loss = _train_epoch(model, opt, data, schedule, gen, hardening)
            steps_total += steps
            epochs_run[phase - 1] = epoch
            val_acc, _ = evaluate(model, data.val_x, data.val_y, schedule.eval_batch)
            history.append({"phase": phase, "epoch": epoch, "loss": loss, "val_acc": val_acc})
            if log is not None:
                log(f"    phase {phase} epoch {epoch:3d}  loss {loss:.4f}  val acc (hard) {val_acc:.4f}")
            if val_acc > best["acc"]:
                best.update(acc=val_acc, phase=phase, epoch=epoch, state=copy.deepcopy(model.state_dict()))
                since_best = 0
            else:
                since_best += 1
                if schedule.patience and since_best >= schedule.patience:
                    break
    model.load_state_dict(best["state"])
    model.eval()  # the selected model is the deployed function: hard routing
    return SelectionResult(best["acc"], best["phase"], best["epoch"], tuple(epochs_run), steps_total, history)


def run_one(
    variant: str,
    setting: Setting,
    seed: int,
    data: SelectionData,
    test: SealedTestSet,
    schedule: Schedule,
    log: Callable[[str], None] | None = None,
) -> dict:
    """Build, train and select one model, then measure it: a JSON-ready record of the run.

    The same ``seed`` gives every variant the same initial tree (the master leaf is created after it).
    """
    start = time.perf_counter()
    torch.manual_seed(seed)
    config = classifier_config(variant, setting, schedule.hardening, schedule.balance)
    model = EFFFClassifier(config)
    sel = train_and_select(model, data, schedule, seed, log)
    # selection is over: measure the chosen model
    train_acc, train_counts = evaluate(model, data.fit_x, data.fit_y, schedule.eval_batch)
    soft_train_acc, _ = evaluate(model, data.fit_x, data.fit_y, schedule.eval_batch, soft=True)
    test_x, test_y = test.open()
    test_acc, test_counts = evaluate(model, test_x, test_y, schedule.eval_batch)
    L = config.n_leaves
    return {
        "variant": variant, "leaf_width": setting.leaf_width, "depth": setting.depth, "seed": seed,
        "train_acc_hard": train_acc, "train_acc_soft": soft_train_acc, "test_acc": test_acc,
        "val_acc": sel.best_val_acc, "best_phase": sel.best_phase, "best_epoch": sel.best_epoch,
        "epochs_run": list(sel.epochs_run), "steps": sel.steps,
        "leaves": L,
        "leaves_used_train": int((train_counts > 0).sum()),
        "usage_entropy_bits_train": max(0.0, float(usage_entropy(train_counts)) / math.log(2)),
        "leaf_counts_train": [int(c) for c in train_counts],
        "leaf_counts_test": [int(c) for c in test_counts],
        "master_gate": float(model.fff.master.share()) if config.master_leaf else None,
        "parameters": config.num_parameters(), "parameters_per_image": config.num_parameters_per_token(),
        "history": sel.history, "seconds": time.perf_counter() - start,
    }
