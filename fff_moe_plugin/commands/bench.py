"""``fff-moe bench``: inference speed of FFF layers against the dense block of the same training width.

Contenders, d_model 768 -> width -> 768 with GELU, float32, eval, no gradients:
- dense block through oneDNN (weights converted with ``torch.utils.mkldnn.to_mkldnn``; the input conversion
  and the output ``to_dense`` are timed too): THE baseline every speedup is quoted against;
- the same dense block through plain ``nn.Linear`` (MKL);
- leaf-MLP FFF trees of the same training width, depths 3/5/7 (leaf width = width / 2**depth), in their fast
  eval form (``to_fast_eval(layer).infer``: compiled descent + grouped leaf kernels);
- the path-neuron tree of depth 11 (4095 neurons, the UltraFastBERT layer) beside the 4096-wide block;
- ``fastfeedforward`` 0.2.1's eval path for the leaf-MLP trees, when that package is installed.

Measurement: every contender of one (threads, width, batch) group is timed in interleaved rounds (each
round times a block of calls of every contender in turn, so that load from other processes spreads over
all of them), cycling through a pool of distinct inputs; the table gives medians over rounds with the
min-max range. Next to each measured speedup stands the ideal one, a roofline from FLOPs and bytes moved
(the distinct weights a batch touches plus its input and output) with this machine's measured peak
matmul rate (oneDNN) and memory bandwidth (large copy) at the same thread count.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable

D_MODEL = 768
# (layer, depth, width): the targets at 1 thread, width 4096, speedup over oneDNN at batch 1 / 4096
TARGETS = {("path-neuron", 11): (250.0, 100.0), ("leaf-MLP", 7): (110.0, 40.0), ("leaf-MLP", 5): (55.0, 15.0)}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true",
                        help="a few minutes: 1 thread, width 4096, depths 5/7 and path-neuron 11, batches 1/64/4096")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 64, 512, 4096])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--widths", type=int, nargs="+", default=[3072, 4096])
    parser.add_argument("--depths", type=int, nargs="+", default=[3, 5, 7], help="leaf-MLP tree depths")
    parser.add_argument("--path-neuron-depth", type=int, default=11, help="0 to leave the path-neuron tree out")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds per group (median taken)")
    parser.add_argument("--block-seconds", type=float, default=0.15, help="time per contender per round")
    parser.add_argument("--no-fastfeedforward", action="store_true", help="leave fastfeedforward 0.2.1 out")
    parser.add_argument("--fastfeedforward-max-batch", type=int, default=4096,
                        help="largest batch to run fastfeedforward's per-token Python loop on")
    parser.add_argument("--no-malloc-tuning", action="store_true",
                        help="keep glibc's default of returning large buffers to the OS after every call")
    parser.add_argument("--json", default="results/bench_inference.json", help="where to write the results")
    parser.add_argument("--seed", type=int, default=0)


def _validate(args: argparse.Namespace) -> None:
    for name in ("batches", "threads", "widths", "depths"):
        bad = [v for v in getattr(args, name) if v < (0 if name == "depths" else 1)]
        if bad:
            raise ValueError(f"--{name} must be positive, got {bad}")
    for w in args.widths:
        for depth in args.depths:
            if w % 2**depth:
                raise ValueError(f"--widths {w} is not divisible by 2**depth = {2**depth} (--depths {depth})")
    if args.rounds < 1 or args.block_seconds <= 0:
        raise ValueError(f"--rounds must be >= 1 and --block-seconds > 0, got {args.rounds}, {args.block_seconds}")
    if not 0 <= args.path_neuron_depth <= 16:
        raise ValueError(f"--path-neuron-depth must be in [0, 16], got {args.path_neuron_depth}")


def _tune_malloc() -> bool:
    """Keep freed large buffers in the heap instead of unmapping them, so that a call's output and scratch
    buffers do not page-fault anew on every call (glibc; applied to every contender alike)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        return bool(libc.mallopt(m_mmap_threshold, 1 << 30)) and bool(libc.mallopt(m_trim_threshold, 1 << 30))
    except OSError:
        return False


# -- roofline --------------------------------------------------------------------------------------------------
def measure_machine(threads: int, quick: bool) -> dict[str, float]:
    """Peak matmul GFLOP/s (oneDNN, the dense baseline's engine) and copy bandwidth GB/s at ``threads``."""
    import torch
    import torch.utils.mkldnn

    torch.set_num_threads(threads)
    n = 1024
    lin = torch.utils.mkldnn.to_mkldnn(torch.nn.Linear(n, n, bias=False))
    a = torch.randn(n, n).to_mkldnn()
    best = math.inf
    with torch.no_grad():
        lin(a)
        for _ in range(3 if quick else 6):
            t0 = time.perf_counter()
            lin(a)
            best = min(best, time.perf_counter() - t0)
    gflops = 2 * n**3 / best / 1e9
    src = torch.ones(64 * 2**20 // (4 if quick else 1))  # 64 MiB (quick) or 256 MiB of float32
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = math.inf
    for _ in range(3 if quick else 5):
        t0 = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t0)
    return {"peak_gflops": gflops, "bandwidth_gbs": 2 * src.numel() * 4 / best / 1e9}


def _distinct(count: int, S: int) -> float:
    """Expected number of distinct items among ``count`` equally likely ones hit by S uniform draws."""
    return count * (1.0 - (1.0 - 1.0 / count) ** S) if S else 0.0


def roofline_seconds(kind: str, S: int, width: int, depth: int, machine: dict[str, float]) -> float:
    """max(FLOPs / peak, bytes / bandwidth) for one call: weights a batch touches, plus input and output."""
    d = o = D_MODEL
    f = 4  # bytes per float32
    io = S * (d + o) * f
    if kind == "dense":
        flops = 2 * S * (d * width + width * o)
        weight_bytes = (d * width + width + width * o + o) * f
    elif kind in ("leaf-MLP", "fastfeedforward"):
        l = width // 2**depth
        flops = 2 * S * (depth * d + d * l + l * o)
        nodes = sum(_distinct(2**k, S) for k in range(depth))
        weight_bytes = (nodes * (d + 1) + _distinct(2**depth, S) * (d * l + l + l * o + o)) * f
    elif kind == "path-neuron":
        flops = 2 * S * (depth + 1) * (d + o)
        weight_bytes = sum(_distinct(2**k, S) for k in range(depth + 1)) * (d + 1 + o) * f
    else:
        raise ValueError(f"unknown layer kind {kind!r}")
    return max(flops / (machine["peak_gflops"] * 1e9), (weight_bytes + io) / (machine["bandwidth_gbs"] * 1e9))


# -- contenders ------------------------------------------------------------------------------------------------
@dataclass
class Contender:
    name: str  # shown in the table
    kind: str  # dense / leaf-MLP / path-neuron / fastfeedforward
    depth: int
    width: int
    fn: Callable  # fn(x) for one call
    max_batch: int = 1 << 30


def build_contenders(width: int, args: argparse.Namespace) -> list[Contender]:
    import torch
    import torch.utils.mkldnn
    from torch import nn

    from fff_moe_plugin import FFF, FFFConfig, UltraFastConfig, UltraFastFFF
    from fff_moe_plugin.ops.fast_eval import to_fast_eval

    dense = nn.Sequential(nn.Linear(D_MODEL, width), nn.GELU(), nn.Linear(width, D_MODEL)).eval()
    onednn = torch.utils.mkldnn.to_mkldnn(
        nn.Sequential(nn.Linear(D_MODEL, width), nn.GELU(), nn.Linear(width, D_MODEL)).eval()
    )
    out = [
        Contender("dense oneDNN (baseline)", "dense", 0, width, lambda x: onednn(x.to_mkldnn()).to_dense()),
        Contender("dense nn.Linear", "dense", 0, width, dense),
    ]
    for depth in args.depths:
        cfg = FFFConfig(d_model=D_MODEL, leaf_width=width // 2**depth, depth=depth, activation="gelu")
        layer = to_fast_eval(FFF(cfg))
        out.append(Contender(f"FFF leaf-MLP D{depth} x{width // 2**depth}", "leaf-MLP", depth, width, layer.infer))
    if args.path_neuron_depth and 2 ** (args.path_neuron_depth + 1) == width:
        pn = to_fast_eval(UltraFastFFF(UltraFastConfig(d_model=D_MODEL, depth=args.path_neuron_depth)))
        out.append(Contender(f"FFF path-neuron D{args.path_neuron_depth}", "path-neuron", args.path_neuron_depth,
                             width, pn.infer))
    if not args.no_fastfeedforward:
        try:
            import fastfeedforward
        except ImportError:
            print("note: fastfeedforward is not installed (pip install fastfeedforward==0.2.1); left out")
        else:
            for depth in args.depths:
                ref = fastfeedforward.FFF(D_MODEL, width // 2**depth, D_MODEL, depth, activation=nn.GELU()).eval()
                out.append(Contender(f"fastfeedforward D{depth} eval", "fastfeedforward", depth, width, ref,
                                     max_batch=args.fastfeedforward_max_batch))
    return out


def _time_block(fn: Callable, pool: list, n: int) -> float:
    k = len(pool)
    t0 = time.perf_counter()
    for i in range(n):
        fn(pool[i % k])
    return (time.perf_counter() - t0) / n


def run_group(contenders: list[Contender], S: int, args: argparse.Namespace) -> dict[str, list[float]]:
    """Seconds per call of each contender, one value per interleaved round."""
    import torch

    pool_size = 64 if S == 1 else 8 if S <= 64 else 2
    pool = [torch.randn(S, D_MODEL) for _ in range(pool_size)]
    active = [c for c in contenders if S <= c.max_batch]
    calls = {}
    with torch.no_grad():
        for c in active:  # warm-up, and the number of calls that fills one block
            c.fn(pool[0])
            t = _time_block(c.fn, pool, 1)
            calls[c.name] = max(1, min(100000, int(args.block_seconds / max(t, 1e-7))))
        times: dict[str, list[float]] = {c.name: [] for c in active}
        for _ in range(args.rounds):
            for c in active:
                times[c.name].append(_time_block(c.fn, pool, calls[c.name]))
    return times


# -- report ----------------------------------------------------------------------------------------------------
def _fmt_time(s: float) -> str:
    return f"{s * 1e6:.1f}us" if s < 1e-3 else f"{s * 1e3:.2f}ms" if s < 1 else f"{s:.2f}s"


def run(args: argparse.Namespace) -> int:
    if args.quick:
        args.threads, args.widths, args.depths, args.batches = [1], [4096], [5, 7], [1, 64, 4096]
        args.rounds, args.block_seconds = min(args.rounds, 5), min(args.block_seconds, 0.1)
        args.fastfeedforward_max_batch = min(args.fastfeedforward_max_batch, 64)
    _validate(args)
    import torch

    from fff_moe_plugin.ops import extension, inference

    malloc_tuned = False if args.no_malloc_tuning else _tune_malloc()
    torch.manual_seed(args.seed)
    t_build = time.perf_counter()
    kernels = inference.ops() is not None
    what = f"compiled, {extension.simd_width_bytes() * 8}-bit vectors" if kernels else "absent (torch reference path)"
    print(f"kernels: {what} ({time.perf_counter() - t_build:.1f}s to load); torch {torch.__version__}, "
          f"CPU capability {torch.backends.cpu.get_cpu_capability()}, load average {os.getloadavg()[0]:.2f}",
          flush=True)
    records, machine = [], {}
    started = time.perf_counter()
    for threads in args.threads:
        machine[threads] = measure_machine(threads, args.quick)
        print(f"{threads} thread(s): peak matmul {machine[threads]['peak_gflops']:.0f} GFLOP/s (oneDNN), "
              f"copy bandwidth {machine[threads]['bandwidth_gbs']:.1f} GB/s", flush=True)
        for width in args.widths:
            torch.set_num_threads(threads)
            contenders = build_contenders(width, args)
            for S in args.batches:
                times = run_group(contenders, S, args)
                t_onednn, t_linear = (statistics.median(times[c.name]) for c in contenders[:2])
                dense_ideal = roofline_seconds("dense", S, width, 0, machine[threads])
                for c in contenders:
                    if c.name not in times:
                        continue
                    ts = times[c.name]
                    med = statistics.median(ts)
                    ideal = dense_ideal / roofline_seconds(c.kind, S, width, c.depth, machine[threads])
                    rec = {
                        "threads": threads, "width": width, "batch": S, "layer": c.name, "kind": c.kind,
                        "depth": c.depth, "seconds_median": med, "seconds_min": min(ts), "seconds_max": max(ts),
                        "rounds": len(ts), "tokens_per_second": S / med,
                        "speedup_vs_onednn": t_onednn / med, "speedup_vs_nn_linear": t_linear / med,
                        "speedup_vs_onednn_range": [min(times[contenders[0].name]) / max(ts),
                                                    max(times[contenders[0].name]) / min(ts)],
                        "ideal_speedup": ideal,
                    }
                    target = TARGETS.get((c.kind, c.depth)) if width == 4096 and threads == 1 else None
                    if target and S in (1, 4096):
                        rec["target"] = target[0] if S == 1 else target[1]
                        rec["target_met"] = rec["speedup_vs_onednn"] >= rec["target"]
                    records.append(rec)
                _print_group(records[-len(times):], threads, width, S)
    print(f"\ntotal {time.perf_counter() - started:.0f}s; load average {os.getloadavg()[0]:.2f}")
    _print_targets(records)
    result = {
        "machine": {"cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
                    "cpu_capability": torch.backends.cpu.get_cpu_capability(), "kernels_compiled": kernels,
                    "simd_bits": extension.simd_width_bytes() * 8, "malloc_tuned": malloc_tuned,
                    "roofline": {str(k): v for k, v in machine.items()}},
        "settings": {k: v for k, v in vars(args).items() if k not in ("func",)},
        "baseline": "dense 768->width->768 GELU through oneDNN (to_mkldnn weights)",
        "results": records,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {args.json}")
    return 0


def _print_group(rows: list[dict], threads: int, width: int, S: int) -> None:
    print(f"\n[{threads} thread(s), width {width}, batch {S}]  speedups against dense oneDNN; ideal = roofline")
    print(f"  {'layer':30s} {'median':>10s} {'range':>21s} {'tokens/s':>11s} {'vs oneDNN':>10s} {'ideal':>7s} "
          f"{'vs nn.Linear':>12s}")
    for r in rows:
        rng = f"{_fmt_time(r['seconds_min'])}-{_fmt_time(r['seconds_max'])}"
        target = f"  target >= {r['target']:.0f}x: {'met' if r['target_met'] else 'NOT met'}" if "target" in r else ""
        print(f"  {r['layer']:30s} {_fmt_time(r['seconds_median']):>10s} {rng:>21s} {r['tokens_per_second']:>11.0f} "
              f"{r['speedup_vs_onednn']:>9.1f}x {r['ideal_speedup']:>6.1f}x {r['speedup_vs_nn_linear']:>11.1f}x"
              f"{target}", flush=True)


def _print_targets(records: list[dict]) -> None:
    rows = [r for r in records if "target" in r]
    if not rows:
        return
    print("\nTargets (1 thread, width 4096, speedup over dense oneDNN):")
    for r in rows:
        met = "met" if r["target_met"] else "NOT met"
        print(f"  {r['layer']:30s} batch {r['batch']:>5d}: {r['speedup_vs_onednn']:6.1f}x "
              f"(ideal {r['ideal_speedup']:.0f}x) target >= {r['target']:.0f}x  {met}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
