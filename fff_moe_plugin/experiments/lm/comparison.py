"""The side-by-side comparison: dense, FFF (plain, load-balanced, load-balanced with master leaf), sigma-MoE and
PKM language models at equal parameters, trained with ``fairseq-train`` and scored with ``fairseq-eval-lm``.

Every run is a real fairseq subprocess with the plugin's ``--user-dir``; this module only chooses the flags,
follows the logs (printing progress) and reads the numbers back. The feedforward blocks' inference speed is
measured in this process on the trained weights, on the inputs the blocks see on validation text.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from ...config import BlockConfig
from ...integrations.fairseq import user_dir
from ...integrations.fairseq.presets import Setting, arch_name, fairseq_args
from .data_bin import fairseq_command


@dataclass
class Run:
    """One model of the comparison: its label, the preset kind and the block it uses."""

    label: str
    kind: str  # dense | fff | sigma_moe | pkm
    block: BlockConfig
    description: str


@dataclass
class Result:
    label: str
    description: str
    params: int  # whole model, as fairseq counts it
    ff_params: int  # feedforward blocks of all layers
    ff_percent_used: float  # % of feedforward parameters one token reads
    valid_ppl: float
    test_ppl: float
    train_tokens_per_s: float
    ff_infer_tokens_per_s: float
    usage_entropy: Optional[float] = None  # validation, nats, mean over block layers
    unused: Optional[float] = None
    counts: list[list[float]] = field(default_factory=list)  # per block layer, tokens per leaf/expert/slot


def default_runs(setting: Setting, fff_train_mode: str = "hard", balance_coef: float = 0.01) -> list[Run]:
    """The six models of the comparison, parameter-equal through the package's matching."""
    base = {"train_mode": fff_train_mode}
    lb = {**base, "load_balance": "leaf", "load_balance_coef": balance_coef}
    blocks = setting.blocks(**base)
    return [
        Run("dense", "dense", blocks["dense"], "fairseq transformer_lm feedforward"),
        Run("fff", "fff", blocks["fff"], f"FFF, {fff_train_mode} training"),
        Run("fff+lb", "fff", setting.blocks(**lb)["fff"], f"FFF + leaf load balancing {balance_coef}"),
        Run("fff+lb+master", "fff", setting.blocks(**lb, master_leaf=True)["fff"], "FFF + balancing + master leaf"),
        Run("sigma_moe", "sigma_moe", blocks["sigma_moe"], "sigma-MoE"),
        Run("pkm", "pkm", blocks["pkm"], "product-key memory"),
    ]


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


def train_command(data: Path, run: Run, setting: Setting, save_dir: Path, max_update: int, max_tokens: int,
                  tokens_per_sample: int, lr: float, seed: int) -> list[str]:
    # the preset architecture, with the run's own block flags on top (they win over the preset's)
    return fairseq_command("train") + [
        str(data), "--user-dir", user_dir(), "--task", "language_modeling", "--arch", arch_name(run.kind, setting.name),
        *flags_of(fairseq_args(setting, run.kind, run.block)),
        "--criterion", "cross_entropy_fff", "--optimizer", "adam", "--adam-betas", "(0.9, 0.98)",
        "--lr", str(lr), "--lr-scheduler", "polynomial_decay", "--total-num-update", str(max_update),
        "--warmup-updates", str(max(1, max_update // 10)), "--clip-norm", "1.0",
        "--tokens-per-sample", str(tokens_per_sample), "--sample-break-mode", "none",
        "--max-tokens", str(max_tokens), "--max-update", str(max_update), "--seed", str(seed),
        # a checkpoint every fifth of the run: an interrupted run resumes from checkpoint_last.pt
        "--save-dir", str(save_dir), "--no-epoch-checkpoints", "--save-interval-updates", str(max(1, max_update // 5)),
        "--keep-interval-updates", "1", "--disable-validation", "--cpu", "--num-workers", "0",
        "--log-format", "json", "--log-interval", str(max(1, max_update // 10)),
    ]


_JSON = re.compile(r"\| (train_inner|train|valid) \| (\{.*\})\s*$")
_PARAMS = re.compile(r"num\. (?:shared )?model params: ([\d,]+)")
_PPL = re.compile(r"Loss \(base 2\): ([\d.]+), Perplexity: ([\d.]+)")


def train(cmd: list[str], log_file: Path, max_update: int, say: Callable[[str], None]) -> dict[str, Any]:
    """Run fairseq-train, echo progress from its JSON log lines, return the last train stats and the params."""
    out: dict[str, Any] = {}
    start = time.time()
    with open(log_file, "w") as log, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                                      text=True, bufsize=1) as proc:
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
            elif m.group(1) == "train":
                out["train"] = stats
    if proc.returncode != 0:
        raise RuntimeError(f"fairseq-train failed (exit {proc.returncode}); see {log_file}")
    return out


def eval_lm(data: Path, checkpoint: Path, subset: str, tokens_per_sample: int, max_tokens: int,
            log_file: Path) -> float:
    """Perplexity of ``subset`` by ``fairseq-eval-lm`` (non-overlapping windows of ``tokens_per_sample``)."""
    cmd = fairseq_command("eval_lm") + [
        str(data), "--path", str(checkpoint), "--user-dir", user_dir(), "--task", "language_modeling",
        "--gen-subset", subset, "--tokens-per-sample", str(tokens_per_sample), "--sample-break-mode", "none",
        "--max-tokens", str(max_tokens), "--cpu", "--num-workers", "0",
    ]
    done = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log_file.write_text(done.stdout)
    m = _PPL.search(done.stdout)
    if done.returncode != 0 or not m:
        raise RuntimeError(f"fairseq-eval-lm failed (exit {done.returncode}); see {log_file}")
    return float(m.group(2))


def measure_blocks(data: Path, checkpoint: Path, tokens_per_sample: int, batches: int = 4,
                   repeats: int = 5) -> dict[str, Any]:
    """Eval-mode routing counts of every block layer on validation text, and the feedforward inference speed
    (tokens/s of the first layer's feedforward on the inputs it receives there, median of ``repeats``)."""
    import argparse
    import logging
    import warnings

    import torch
    from fairseq import checkpoint_utils, utils

    from ...integrations.fairseq.layer import BlockDecoderLayer

    logging.getLogger("fairseq").setLevel(logging.WARNING)  # the subprocesses' logs hold fairseq's chatter
    utils.import_user_module(argparse.Namespace(user_dir=user_dir()))
    models, _cfg, task = checkpoint_utils.load_model_ensemble_and_task(
        [str(checkpoint)], arg_overrides={"data": str(data), "tokens_per_sample": tokens_per_sample})
    model = models[0].eval()
    task.load_dataset("valid")
    itr = task.get_batch_iterator(task.dataset("valid"), max_tokens=4096, max_positions=tokens_per_sample,
                                  ignore_invalid_inputs=True).next_epoch_itr(shuffle=False)
    layer = model.decoder.layers[0]
    captured: list[torch.Tensor] = []
    hook = layer.final_layer_norm.register_forward_hook(lambda m, i, o: captured.append(o.detach()))
    counts: dict[int, torch.Tensor] = {}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PyTorch's attention-mask deprecation notice, once per batch
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
    return {"tokens_per_s": x.shape[0] / times[len(times) // 2],
            "counts": [counts[i].tolist() for i in sorted(counts)]}


def compare(runs: list[Run], setting: Setting, data: Path, out: Path, max_update: int, max_tokens: int = 4096,
            tokens_per_sample: int = 128, lr: float = 2e-3, seed: int = 1,
            say: Callable[[str], None] = print) -> list[Result]:
    """Train, evaluate and measure every run; results in the order of ``runs``."""
    import torch

    from ...losses import usage_entropy

    out.mkdir(parents=True, exist_ok=True)
    results = []
    for i, run in enumerate(runs, 1):
        t0 = time.time()
        run_dir = out / run.label
        run_dir.mkdir(parents=True, exist_ok=True)
        say(f"[{i}/{len(runs)}] {run.label}: {run.description}; training {max_update} updates")
        cmd = train_command(data, run, setting, run_dir / "checkpoints", max_update, max_tokens, tokens_per_sample,
                            lr, seed)
        done = run_dir / "result.json"
        if done.is_file() and (run_dir / "train_command.txt").read_text() == " ".join(cmd) + "\n":
            say("    already done with the same command: reusing its result (delete the folder to rerun)")
            results.append(Result(**json.loads(done.read_text())))
            continue
        (run_dir / "train_command.txt").write_text(" ".join(cmd) + "\n")
        stats = train(cmd, run_dir / "train.log", max_update, say)
        ckpt = run_dir / "checkpoints" / "checkpoint_last.pt"
        say("    evaluating with fairseq-eval-lm (valid, test)")
        valid = eval_lm(data, ckpt, "valid", tokens_per_sample, max_tokens, run_dir / "eval_valid.log")
        test = eval_lm(data, ckpt, "test", tokens_per_sample, max_tokens, run_dir / "eval_test.log")
        measured = measure_blocks(data, ckpt, tokens_per_sample)
        ent = [float(usage_entropy(torch.tensor(c))) for c in measured["counts"]]
        unused = [float(sum(1 for v in c if v == 0)) for c in measured["counts"]]
        layers = setting.layers
        inner = stats.get("wps", [])
        wps = stats.get("train", {}).get("train_wps", sum(inner) / max(1, len(inner)))
        result = Result(
            label=run.label, description=run.description, params=int(stats.get("params", 0)),
            ff_params=layers * run.block.num_parameters(),
            ff_percent_used=100.0 * run.block.fraction_used_per_token(),
            valid_ppl=valid, test_ppl=test,
            train_tokens_per_s=float(wps),
            ff_infer_tokens_per_s=measured["tokens_per_s"],
            usage_entropy=sum(ent) / len(ent) if ent else None,
            unused=sum(unused) / len(unused) if unused else None,
            counts=measured["counts"],
        )
        done.write_text(json.dumps(asdict(result), indent=1))
        say(f"    valid ppl {valid:.1f}, test ppl {test:.1f} ({time.time() - t0:.0f} s)")
        results.append(result)
    return results
