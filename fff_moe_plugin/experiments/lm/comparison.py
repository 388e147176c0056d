"""The side-by-side comparison: dense, FFF variants, sigma-MoE and PKM language models, in two groups.

- **Equal parameters**: every feedforward block holds the dense block's parameters (within about 1%): dense, the
  FFF at the setting's depth (plain, with the leaf balancing loss, with bias balancing), a forest, a deeper tree
  that reads half as much, sigma-MoE and PKM.
- **Equal active compute**: a tree and a forest deep enough that a token reads the same share of the
  feedforward parameters as sigma-MoE does, beside sigma-MoE.

Every run is a real fairseq subprocess with the plugin's ``--user-dir``; this module only chooses the flags,
follows the logs (printing progress and recording the validation curve) and reads the numbers back. A run is
one (model, seed) piece in ``out/<model>/seed<k>/``: a finished piece is reused, an interrupted one resumes
from its last checkpoint, and pieces run separately (``--only``, ``--seed``) fold into one table as long as
they share the comparison's settings (``context.json``).
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Optional

from ...config import BlockConfig
from ...integrations.fairseq import user_dir
from ...integrations.fairseq.presets import MODEL_OF_KIND, SETTINGS, Setting, arch_name, fairseq_args
from ...matching import match_fff
from .data_bin import fairseq_command

PARAMS, COMPUTE = "equal parameters", "equal active compute"
GROUPS = (PARAMS, COMPUTE)


@dataclass(frozen=True)
class Run:
    """One model of the comparison: its label, the preset kind, its block and the groups it is shown in."""

    label: str
    kind: str  # dense | fff | sigma_moe | pkm
    block: BlockConfig
    description: str
    groups: tuple[str, ...] = (PARAMS,)


@dataclass
class Result:
    """One trained (model, seed) piece."""

    label: str
    description: str
    seed: int
    params: int  # whole model, as fairseq counts it
    ff_params: int  # feedforward blocks of all layers
    ff_percent_used: float  # % of feedforward parameters one token reads
    valid_ppl: float  # fairseq's validation at the last update
    best_valid_ppl: float  # the lowest of the validation curve
    best_update: int
    test_ppl: float  # fairseq-eval-lm on the last checkpoint
    train_tokens_per_s: float
    ff_infer_tokens_per_s: float
    usage_entropy: Optional[float] = None  # validation, nats, mean over block layers
    max_entropy: Optional[float] = None  # ln(leaves / experts / slots)
    unused: Optional[float] = None
    wall_s: float = 0.0  # this piece's training and evaluation, summed over its sittings
    curve: list[dict[str, float]] = field(default_factory=list)  # fairseq's validation stats, one per point
    train_curve: list[dict[str, float]] = field(default_factory=list)  # its train_inner stats (loss, gradient
    # norms, routing diagnostics), one per --log-interval
    counts: list[list[float]] = field(default_factory=list)  # per block layer, tokens per leaf/expert/slot


def _fff(setting: Setting, depth: int, **fields_: Any) -> BlockConfig:
    return match_fff(setting.d_model, setting.ff_target(), depth, **{**setting.fff, **fields_})


def compute_equal_depth(setting: Setting) -> int:
    """The tree depth whose share read per token (1 / 2^depth) is closest to sigma-MoE's."""
    share = setting.blocks()["sigma_moe"].fraction_used_per_token()
    return max(1, round(-math.log2(share)))


def default_runs(setting: Setting, fff_train_mode: str = "hard", balance_coef: float = 0.01,
                 bias_rate: float = 0.01, forest_trees: int = 4) -> list[Run]:
    """The comparison's models in table order, parameter-equal through the package's matching. Soft-trained
    trees have no ``fff+bias`` (bias balancing moves with hard decisions; :data:`SOFT_NOTE`)."""
    mode = {"train_mode": fff_train_mode}
    lb = {**mode, "load_balance": "leaf", "load_balance_coef": balance_coef}
    bias = {**mode, "load_balance": "bias", "bias_update_rate": bias_rate}
    d, dc = setting.fff_depth, compute_equal_depth(setting)
    blocks = setting.blocks(**mode)
    k = forest_trees
    return [
        Run("dense", "dense", blocks["dense"], "fairseq transformer_lm feedforward"),
        Run("fff", "fff", blocks["fff"], f"FFF depth {d}, {fff_train_mode} training, no balancing"),
        Run("fff+lb", "fff", _fff(setting, d, **lb), f"FFF depth {d} + leaf balancing loss {balance_coef}"),
        *([Run("fff+bias", "fff", _fff(setting, d, **bias), f"FFF depth {d} + bias balancing (rate {bias_rate})")]
          if fff_train_mode == "hard" else []),
        Run(f"forest{k}+lb", "fff", _fff(setting, d, n_trees=k, **lb),
            f"{k} trees of depth {d} + leaf balancing loss {balance_coef}"),
        Run(f"fff-d{d + 1}+lb", "fff", _fff(setting, d + 1, **lb),
            f"FFF depth {d + 1} (half the share read) + leaf balancing loss {balance_coef}"),
        Run("sigma_moe", "sigma_moe", blocks["sigma_moe"], "sigma-MoE", (PARAMS, COMPUTE)),
        Run("pkm", "pkm", blocks["pkm"], "product-key memory"),
        Run(f"fff-d{dc}+lb", "fff", _fff(setting, dc, **lb),
            f"FFF depth {dc} (sigma-MoE's share read) + leaf balancing loss {balance_coef}", (COMPUTE,)),
        Run(f"forest{k}-d{dc}+lb", "fff", _fff(setting, dc, n_trees=k, **lb),
            f"{k} trees of depth {dc} (sigma-MoE's share read) + leaf balancing loss {balance_coef}", (COMPUTE,)),
    ]


SOFT_NOTE = ("no fff+bias, fff+bias-shifted and fff+softstart with soft-trained trees: bias balancing's shifts move "
             "with the hard decisions of training, and a soft start needs a hard tree to switch to")


def extra_runs(setting: Setting, max_update: int, fff_train_mode: str = "hard", balance_coef: float = 0.01,
               bias_rate: float = 0.01, forest_trees: int = 4) -> list[Run]:
    """Models outside the default set, run by naming them in ``--only``: with ``fff`` and the default ``fff+lb``,
    ``fff+bias`` and ``forest+lb``, each mechanism alone and on top of the leaf loss (the ablation), and bias
    balancing with the gate on the shifted logits (``bias_gate``)."""
    mode = {"train_mode": fff_train_mode}
    lb = {**mode, "load_balance": "leaf", "load_balance_coef": balance_coef}
    d, k = setting.fff_depth, forest_trees
    runs = [Run(f"forest{k}", "fff", _fff(setting, d, n_trees=k, **mode), f"{k} trees of depth {d}, no balancing"),
            Run("fff+master", "fff", _fff(setting, d, **mode, master_leaf=True), f"FFF depth {d} + master leaf"),
            Run("fff+lb+master", "fff", _fff(setting, d, **lb, master_leaf=True),
                f"FFF depth {d} + leaf balancing loss {balance_coef} + master leaf")]
    if fff_train_mode == "hard":
        soft = max(1, max_update // 4)
        runs.append(Run("fff+softstart", "fff", _fff(setting, d, **mode, soft_updates=soft),
                        f"FFF depth {d}, soft for the first {soft} updates, then hard"))
        runs.append(Run("fff+bias-shifted", "fff",
                        _fff(setting, d, **mode, load_balance="bias", bias_update_rate=bias_rate, bias_gate="shifted"),
                        f"FFF depth {d} + bias balancing (rate {bias_rate}), gated on the shifted logits"))
    return runs


def flags_of(args: dict[str, Any]) -> list[str]:
    """fairseq command-line flags for an attribute dict (booleans as switches)."""
    out: list[str] = []
    for name, value in args.items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            if value:
                out.append(flag)
        else:
            out += [flag, str(value)]
    return out


def architecture(kind: str, setting: Setting) -> str:
    """The preset architecture of a registered setting; the kind's model architecture for any other (its sizes
    then all come from the flags)."""
    return arch_name(kind, setting.name) if SETTINGS.get(setting.name) == setting else MODEL_OF_KIND[kind]


def valid_interval(max_update: int, points: int) -> int:
    return max(1, math.ceil(max_update / points))


def train_command(data: Path, run: Run, setting: Setting, save_dir: Path, max_update: int, max_tokens: int,
                  tokens_per_sample: int, lr: float, seed: int, valid_points: int = 10) -> list[str]:
    every = valid_interval(max_update, valid_points)
    # the preset architecture, with the run's own block flags on top (they win over the preset's)
    return fairseq_command("train") + [
        str(data), "--user-dir", user_dir(), "--task", "language_modeling", "--arch", architecture(run.kind, setting),
        *flags_of(fairseq_args(setting, run.kind, run.block)),
        "--criterion", "cross_entropy_fff", "--optimizer", "adam", "--adam-betas", "(0.9, 0.98)",
        "--lr", str(lr), "--lr-scheduler", "polynomial_decay", "--total-num-update", str(max_update),
        "--warmup-updates", str(max(1, max_update // 10)), "--clip-norm", "1.0",
        "--tokens-per-sample", str(tokens_per_sample), "--sample-break-mode", "none",
        "--max-tokens", str(max_tokens), "--max-update", str(max_update), "--seed", str(seed),
        # validation and a checkpoint at every point of the curve: an interrupted run resumes from
        # checkpoint_last.pt and recomputes no point twice; epoch ends add no extra points
        "--save-dir", str(save_dir), "--no-epoch-checkpoints", "--save-interval-updates", str(every),
        "--validate-interval-updates", str(every), "--validate-interval", "1000000", "--save-interval", "1000000",
        "--keep-interval-updates", "1", "--cpu", "--num-workers", "0",
        "--log-format", "json", "--log-interval", str(max(1, max_update // 10)),
    ]


_JSON = re.compile(r"\| (train_inner|train|valid) \| (\{.*\})\s*$")
_PARAMS = re.compile(r"num\. (?:shared )?model params: ([\d,]+)")


def _floats(stats: dict[str, Any], prefix: str) -> dict[str, float]:
    out = {}
    for k, v in stats.items():
        try:
            out[k[len(prefix):] if k.startswith(prefix) else k] = float(v)
        except (TypeError, ValueError):
            pass
    return out


def read_curve(path: Path) -> dict[int, dict[str, float]]:
    if not path.is_file():
        return {}
    return {int(p["update"]): p for p in json.loads(path.read_text())}


def train(cmd: list[str], log_file: Path, curve_file: Path, max_update: int,
          say: Callable[[str], None]) -> dict[str, Any]:
    """Run fairseq-train, echo progress from its JSON log lines and record every validation point in
    ``curve_file`` as it comes (merged with the points of earlier sittings). Returns the train stats and the
    parameter count."""
    out: dict[str, Any] = {}
    curves = {"valid": (read_curve(curve_file), curve_file), "train_inner": (read_curve(train_file(curve_file)),
                                                                           train_file(curve_file))}
    start = time.time()
    with open(log_file, "a") as log, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                                      text=True, bufsize=1) as proc:
        try:
            _follow(proc, log, out, curves, max_update, start, say)
        except BaseException:  # Ctrl-C or a failing callback: stop fairseq too, its last checkpoint stays
            proc.kill()
            raise
    if proc.returncode != 0:
        raise RuntimeError(f"fairseq-train failed (exit {proc.returncode}); see {log_file}")
    return out


def train_file(curve_file: Path) -> Path:
    return curve_file.with_name("train_" + curve_file.name)


def _record(curves: dict[str, tuple[dict[int, dict[str, float]], Path]], tag: str, stats: dict[str, Any],
            prefix: str) -> dict[str, float]:
    point = _floats(stats, prefix)
    point["update"] = int(point.pop("num_updates"))
    curve, path = curves[tag]
    curve[point["update"]] = point
    path.write_text(json.dumps([curve[u] for u in sorted(curve)], indent=0))
    return point


def _follow(proc: subprocess.Popen, log: Any, out: dict[str, Any],
            curves: dict[str, tuple[dict[int, dict[str, float]], Path]], max_update: int, start: float,
            say: Callable[[str], None]) -> None:
    for line in proc.stdout:  # type: ignore[union-attr]
        log.write(line)
        if m := _PARAMS.search(line):
            out["params"] = int(m.group(1).replace(",", ""))
        m = _JSON.search(line)
        if not m:
            continue
        stats = json.loads(m.group(2))
        if m.group(1) == "train_inner":
            say(f"    update {stats['num_updates']:>5}/{max_update}  loss {float(stats['loss']):.3f}  "
                f"ppl {float(stats['ppl']):9.1f}  {float(stats['wps']):7.0f} tok/s  "
                f"({time.time() - start:.0f} s)")
            out.setdefault("wps", []).append(float(stats["wps"]))
            _record(curves, "train_inner", stats, "")
        elif m.group(1) == "valid":
            point = _record(curves, "valid", stats, "valid_")
            say(f"    valid at update {point['update']:>5}: ppl {point['ppl']:.2f}")
        elif m.group(1) == "train":
            out["train"] = stats


def evaluate(data: Path, checkpoint: Path, tokens_per_sample: int, max_tokens: int, batches: int = 4,
             repeats: int = 5) -> dict[str, Any]:
    """The checkpoint's test perplexity by fairseq-eval-lm's own ``eval_lm`` (non-overlapping windows of
    ``tokens_per_sample``, as ``fairseq-eval-lm --gen-subset test`` computes it), the eval-mode routing counts of
    every block layer on validation text, and the feedforward inference speed (tokens/s of the first layer's
    feedforward on the inputs it receives there, median of ``repeats``). In this process: one model load, no
    fairseq start-up."""
    import warnings

    import torch
    from fairseq_cli.eval_lm import eval_lm

    from ...integrations.fairseq.layer import BlockDecoderLayer

    model, task = load_checkpoint(checkpoint, data, tokens_per_sample)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PyTorch's attention-mask deprecation notice, once per batch
        task.load_dataset("test")
        test = task.dataset("test")
        itr = task.eval_lm_dataloader(dataset=test, max_tokens=max_tokens, max_positions=model.max_positions(),
                                      context_window=0, num_workers=0)  # fairseq's default 1 forks a loader
        # process that outlives the call
        scored = eval_lm(models=[model], source_dictionary=task.source_dictionary, batch_iterator=itr,
                         target_dictionary=task.target_dictionary)

    itr = valid_batches(task, tokens_per_sample)
    layer = model.decoder.layers[0]
    captured: list[torch.Tensor] = []
    hook = layer.final_layer_norm.register_forward_hook(lambda m, i, o: captured.append(o.detach()))
    counts: dict[int, torch.Tensor] = {}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for b, sample in enumerate(itr):
            if b >= batches:
                break
            _, extra = model(**sample["net_input"])
            for index, out in extra.get("block_outputs", {}).items():
                counts[index] = counts.get(index, 0) + out.stats["counts"]
    hook.remove()
    x = torch.cat([c.reshape(-1, c.shape[-1]) for c in captured])[:4096].contiguous()  # [S, d]

    if isinstance(layer, BlockDecoderLayer):
        def ff(t):
            return layer.ffn(t).output
    else:
        def ff(t):
            return layer.fc2(layer.activation_fn(layer.fc1(t)))
    times = []
    with torch.no_grad():
        ff(x)
        for _ in range(repeats):
            t0 = time.perf_counter()
            ff(x)
            times.append(time.perf_counter() - t0)
    times.sort()
    return {"test_ppl": float(scored["perplexity"]), "tokens_per_s": x.shape[0] / times[len(times) // 2],
            "counts": [counts[i].tolist() for i in sorted(counts)]}


def load_checkpoint(checkpoint: Path, data: Path, tokens_per_sample: int) -> tuple[Any, Any]:
    """``(model in eval mode, fairseq task)`` of a comparison checkpoint, loaded in this process with the
    plugin's models registered and fairseq's chatter quieted."""
    import argparse
    import logging

    from fairseq import checkpoint_utils, utils

    logging.getLogger("fairseq").setLevel(logging.WARNING)  # the subprocesses' logs hold fairseq's chatter
    logging.getLogger("fairseq_cli").setLevel(logging.WARNING)
    logging.getLogger("fff_moe_plugin").setLevel(logging.WARNING)  # the block summary is in the training log
    utils.import_user_module(argparse.Namespace(user_dir=user_dir()))
    models, _cfg, task = checkpoint_utils.load_model_ensemble_and_task(
        [str(checkpoint)], arg_overrides={"data": str(data), "tokens_per_sample": tokens_per_sample})
    return models[0].eval(), task


def valid_batches(task: Any, tokens_per_sample: int) -> Any:
    """The validation split in fixed order, batches of 4096 tokens."""
    task.load_dataset("valid")
    return task.get_batch_iterator(task.dataset("valid"), max_tokens=4096, max_positions=tokens_per_sample,
                                   ignore_invalid_inputs=True).next_epoch_itr(shuffle=False)


def shift_effect(checkpoint: Path, data: Path, tokens_per_sample: int, batches: int = 8) -> list[dict[str, Any]]:
    """What bias balancing's decision shifts do to a trained model's routing, on ``batches`` validation batches
    in eval: for each tree layer (:func:`fff_moe_plugin.router.shift_stats`), the share of decisions a shift
    sent against its logit's sign, at each level and on any level of a path, and the mean gate of the paths so
    turned and of the others. One dict per layer, with its ``layer`` index."""
    import warnings

    import torch

    from ...router import TreeRouter, shift_stats

    model, task = load_checkpoint(checkpoint, data, tokens_per_sample)
    routers = [m for m in model.modules() if isinstance(m, TreeRouter)]
    if not routers:
        raise ValueError(f"{checkpoint} holds no tree layer: the shift effect is a tree's (fff models)")
    records: list[list[Any]] = [[] for _ in routers]
    hooks = [r.register_forward_hook(lambda m, i, out, k=k: records[k].append(out)) for k, r in enumerate(routers)]
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PyTorch's attention-mask deprecation notice, once per batch
            for b, sample in enumerate(valid_batches(task, tokens_per_sample)):
                if b >= batches:
                    break
                model(**sample["net_input"])
    finally:
        for h in hooks:
            h.remove()
    return [{"layer": k, **shift_stats(r, records[k])} for k, r in enumerate(routers)]


# -- the comparison's settings, shared by every piece in one --out ---------------------------------------------
CONTEXT_FILE = "context.json"


def check_context(out: Path, context: dict[str, Any]) -> None:
    """Refuse an ``--out`` whose pieces were trained with other settings (before any work); record the
    settings in a new one. Pieces fold into one table only when they are comparable."""
    path = out / CONTEXT_FILE
    if path.is_file():
        before = json.loads(path.read_text())
        differ = [f"{k}: {before.get(k)!r} there, {context.get(k)!r} now"
                  for k in sorted(set(before) | set(context)) if before.get(k) != context.get(k)]
        if differ:
            raise ValueError(f"--out {out} holds a comparison with other settings ({'; '.join(differ)}): "
                             "give the same settings to add pieces to it, or another --out")
        return
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(context, indent=1) + "\n")


def piece_dir(out: Path, label: str, seed: int) -> Path:
    return out / label / f"seed{seed}"


def load_result(path: Path) -> Result:
    known = {f.name for f in fields(Result)}
    return Result(**{k: v for k, v in json.loads(path.read_text()).items() if k in known})


def collect(out: Path, runs: list[Run]) -> dict[str, list[Result]]:
    """Every finished piece under ``out`` of the given models, by label (seeds in order)."""
    found: dict[str, list[Result]] = {}
    for run in runs:
        pieces = sorted((out / run.label).glob("seed*/result.json"), key=lambda p: int(p.parent.name[4:]))
        if pieces:
            found[run.label] = [load_result(p) for p in pieces]
    return found


@dataclass(frozen=True)
class Schedule:
    """How every piece of one comparison trains: updates, batch, context, learning rate, validations."""

    max_update: int
    max_tokens: int = 4096
    tokens_per_sample: int = 128
    lr: float = 2e-3
    valid_points: int = 10


def compare(runs: list[Run], setting: Setting, data: Path, out: Path, schedule: Schedule, seeds: list[int],
            say: Callable[[str], None] = print) -> list[Result]:
    """Train, evaluate and measure every (run, seed) piece not yet finished under ``out``, seed by seed;
    returns the pieces' results in that order."""
    out.mkdir(parents=True, exist_ok=True)
    pieces = [(seed, run) for seed in seeds for run in runs]
    results = []
    for i, (seed, run) in enumerate(pieces, 1):
        say(f"[{i}/{len(pieces)}] {run.label}, seed {seed}: {run.description}; {schedule.max_update} updates")
        results.append(run_piece(run, seed, setting, data, piece_dir(out, run.label, seed), schedule, say))
    return results


def run_piece(run: Run, seed: int, setting: Setting, data: Path, run_dir: Path, schedule: Schedule,
              say: Callable[[str], None]) -> Result:
    """One (model, seed) piece in ``run_dir``: reused when finished, resumed from its last checkpoint when
    interrupted, else trained from the start; then evaluated."""
    import torch

    from ...losses import usage_entropy

    run_dir.mkdir(parents=True, exist_ok=True)
    cmd = train_command(data, run, setting, run_dir / "checkpoints", schedule.max_update, schedule.max_tokens,
                        schedule.tokens_per_sample, schedule.lr, seed, schedule.valid_points)
    recorded = run_dir / "train_command.txt"
    if recorded.is_file() and recorded.read_text() != " ".join(cmd) + "\n":
        raise ValueError(f"{run_dir} holds a run of another command (see {recorded}): delete that folder to "
                         "rerun it with this one")
    done = run_dir / "result.json"
    if done.is_file():
        say("    done before: reusing its result (delete its folder to rerun)")
        return load_result(done)
    ckpt = run_dir / "checkpoints" / "checkpoint_last.pt"
    curve_file = run_dir / "curve.json"
    if ckpt.is_file():
        say(f"    resuming from {ckpt} (validated up to update {max(read_curve(curve_file) or [0])})")
    recorded.write_text(" ".join(cmd) + "\n")
    t0 = time.time()
    wall_file = run_dir / "wall_s.txt"  # the piece's wall time so far, kept through interruptions
    before = float(wall_file.read_text()) if wall_file.is_file() else 0.0

    def say_and_clock(line: str) -> None:
        say(line)
        wall_file.write_text(f"{before + time.time() - t0:.1f}\n")

    stats = train(cmd, run_dir / "train.log", curve_file, schedule.max_update, say_and_clock)
    say("    evaluating: test perplexity, routing counts and feedforward speed")
    measured = evaluate(data, ckpt, schedule.tokens_per_sample, schedule.max_tokens)
    curve = [p for _, p in sorted(read_curve(curve_file).items())]
    if not curve or curve[-1]["update"] != schedule.max_update:
        raise RuntimeError(f"{run.label}: fairseq logged no validation at update {schedule.max_update}; see "
                           f"{run_dir / 'train.log'}")
    best = min(curve, key=lambda p: p["ppl"])
    ent = [float(usage_entropy(torch.tensor(c))) for c in measured["counts"]]
    unused = [float(sum(1 for v in c if v == 0)) for c in measured["counts"]]
    inner = stats.get("wps", [])
    wps = stats.get("train", {}).get("train_wps", sum(inner) / max(1, len(inner)))
    result = Result(
        label=run.label, description=run.description, seed=seed, params=int(stats.get("params", 0)),
        ff_params=setting.layers * run.block.num_parameters(),
        ff_percent_used=100.0 * run.block.fraction_used_per_token(),
        valid_ppl=curve[-1]["ppl"], best_valid_ppl=best["ppl"], best_update=int(best["update"]),
        test_ppl=measured["test_ppl"], train_tokens_per_s=float(wps), ff_infer_tokens_per_s=measured["tokens_per_s"],
        usage_entropy=sum(ent) / len(ent) if ent else None,
        max_entropy=math.log(len(measured["counts"][0])) if measured["counts"] else None,
        unused=sum(unused) / len(unused) if unused else None,
        wall_s=round(before + time.time() - t0, 1), curve=curve, counts=measured["counts"],
        train_curve=[p for _, p in sorted(read_curve(train_file(curve_file)).items())],
    )
    done.write_text(json.dumps(asdict(result), indent=1))
    wall_file.write_text(f"{result.wall_s}\n")
    for stale in run_dir.glob("checkpoints/checkpoint_*_*.pt"):  # the interval copy; _last and _best stay
        stale.unlink()
    say(f"    valid ppl {result.valid_ppl:.2f} (best {result.best_valid_ppl:.2f} at update {result.best_update}), "
        f"test ppl {result.test_ppl:.2f} ({result.wall_s:.0f} s)")
    return result
