"""fairseq-train with the FFF's leaves on every rank (data parallel) against leaves sharded over the ranks by
DeepSpeed's or Tutel's dispatch, on local CPU ranks (gloo, legacy_ddp), Penn Treebank, the ptb_tiny preset.

Each backend trains the same model from the same seed for ``--updates`` updates with ``fff-moe cpu-ranks``'
launcher. The table gives the median training words per second over the updates after the first
``--warmup`` (fairseq's ``wps``, all ranks together), the last update's loss, and the largest difference of
the final parameters from the data-parallel run (the runs are dropless, so it is float rounding).

    python benchmarks/bench_fairseq_ep.py                       # 2 ranks, 30 updates per backend (a few minutes)
    python benchmarks/bench_fairseq_ep.py --backends core deepspeed --updates 60 --json out.json

Prints a table and writes JSON. Needs fairseq and DeepSpeed; the tutel row needs Tutel (built from source) and
is skipped with a message without it. Without ``--data-bin``, PTB is prepared under ``--work``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from fff_moe_plugin.integrations.fairseq import user_dir

BACKENDS = ("core", "deepspeed", "tutel")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=BACKENDS)
    p.add_argument("--nprocs", type=int, default=2, help="local CPU ranks (the expert-parallel size)")
    p.add_argument("--updates", type=int, default=30, help="updates per backend")
    p.add_argument("--warmup", type=int, default=5, help="updates left out of the median")
    p.add_argument("--max-tokens", type=int, default=2048, help="tokens per rank and update")
    p.add_argument("--data-bin", type=Path, default=None, help="a fairseq data-bin (default: PTB under --work)")
    p.add_argument("--work", type=Path, default=Path("runs/bench_fairseq_ep"), help="data, checkpoints and logs")
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    args = p.parse_args(argv)
    if args.nprocs < 1 or args.updates < 1 or not 0 <= args.warmup < args.updates:
        p.error(f"--nprocs {args.nprocs}, --updates {args.updates}, --warmup {args.warmup}: need nprocs >= 1, "
                "updates >= 1 and 0 <= warmup < updates")
    return args


def data_bin(args) -> Path:
    if args.data_bin is not None:
        if not (args.data_bin / "dict.txt").is_file():
            raise SystemExit(f"--data-bin {args.data_bin}: no dict.txt there; give a fairseq data-bin")
        return args.data_bin
    out = args.work / "ptb"
    if not (out / "data-bin" / "dict.txt").is_file():
        print(f"preparing Penn Treebank in {out} ...", flush=True)
        subprocess.run([sys.executable, "-m", "fff_moe_plugin.cli", "prepare-ptb", "--out", str(out)], check=True)
    return out / "data-bin"


def train(args, data: Path, backend: str) -> dict:
    save = args.work / backend
    for old in save.glob("*.pt"):
        old.unlink()  # a fresh run each time, never a resume
    flags = [str(data), "--user-dir", user_dir(), "--task", "language_modeling", "--arch",
             "transformer_lm_fff_ptb_tiny", "--fff-train-mode", "hard", "--fff-load-balance", "leaf",
             "--dropout", "0", "--criterion", "cross_entropy_fff", "--tokens-per-sample", "128", "--max-tokens",
             str(args.max_tokens), "--optimizer", "adam", "--lr", "2e-3", "--max-update", str(args.updates),
             "--seed", "1", "--log-format", "json", "--log-interval", "1", "--disable-validation",
             "--no-epoch-checkpoints", "--num-workers", "0", "--save-dir", str(save)]
    if backend != "core":
        flags += ["--fff-backend", backend, "--fff-ep-size", str(args.nprocs)]
    logs = args.work / f"{backend}-logs"
    logs.mkdir(parents=True, exist_ok=True)
    script = ("import sys; from fff_moe_plugin.experiments.lm.launch import run_ranks; "
              f"sys.exit(run_ranks({flags!r}, {args.nprocs}, log_dir={str(logs)!r}))")
    start = time.perf_counter()
    with open(logs / "rank0.log", "w") as out:
        code = subprocess.run([sys.executable, "-c", script], stdout=out, stderr=subprocess.STDOUT).returncode
    seconds = time.perf_counter() - start
    text = (logs / "rank0.log").read_text()
    if code != 0:
        raise SystemExit(f"{backend}: fairseq-train failed ({code}); see {logs}\n{text[-2000:]}")
    inner = [json.loads(m.group(1)) for m in re.finditer(r"\| train_inner \| (\{.*\})", text)]
    wps = [float(entry["wps"]) for entry in inner[args.warmup:]]
    return {"backend": backend, "wps_median": statistics.median(wps), "wps": wps,
            "loss_last": float(inner[-1]["loss"]), "seconds": seconds,
            "checkpoint": str(save / "checkpoint_last.pt")}


def max_difference(a: str, b: str) -> float:
    ma = torch.load(a, map_location="cpu", weights_only=False)["model"]
    mb = torch.load(b, map_location="cpu", weights_only=False)["model"]
    return max((ma[k].float() - mb[k].float()).abs().max().item() for k in ma)


def main(argv=None) -> int:
    args = parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    data = data_bin(args)
    rows = []
    for backend in args.backends:
        if backend == "tutel" and importlib.util.find_spec("tutel") is None:
            print("tutel: skipped, Tutel is not installed (NO_CUDA=1 pip install --no-build-isolation <tutel source>)")
            continue
        print(f"{backend}: {args.updates} updates on {args.nprocs} ranks ...", flush=True)
        rows.append(train(args, data, backend))
    reference = next((r for r in rows if r["backend"] == "core"), None)
    for r in rows:
        r["max_diff_vs_core"] = (max_difference(r["checkpoint"], reference["checkpoint"])
                                 if reference is not None and r is not reference else None)
    print(f"\n{'backend':<10} {'words/s':>9} {'vs core':>8} {'last loss':>10} {'max |dp - ep|':>14} {'wall s':>7}")
    for r in rows:
        ratio = f"{r['wps_median'] / reference['wps_median']:.2f}x" if reference else "-"
        diff = "-" if r["max_diff_vs_core"] is None else f"{r['max_diff_vs_core']:.1e}"
        print(f"{r['backend']:<10} {r['wps_median']:>9,.0f} {ratio:>8} {r['loss_last']:>10.3f} {diff:>14} "
              f"{r['seconds']:>7.0f}")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        meta = {"nprocs": args.nprocs, "updates": args.updates, "warmup": args.warmup, "max_tokens": args.max_tokens,
                "torch": torch.__version__, "machine": platform.platform(), "data_bin": str(data)}
        args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
