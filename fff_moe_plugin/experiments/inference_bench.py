"""The benchmark behind ``fff-moe bench``: FFF inference against the fastest dense block of the same width.

Contenders, d_model 768 -> width -> 768 with GELU, float32, eval, no gradients:
- the dense block three ways, all with the same weights: plain ``nn.Linear`` (MKL), ``torch.addmm`` with the
  weights transposed once beforehand into contiguous [in, out] matrices, and oneDNN (weights converted with
  ``torch.utils.mkldnn.to_mkldnn``; the input conversion and the output ``to_dense`` are timed too). In each
  (threads, width, batch) group the one with the fastest median is the baseline; every speedup, and the ideal
  beside it, is quoted against it, and its name is printed with the table and stored in the JSON;
- leaf-MLP FFF trees of the same training width, depths 3/5/7 (leaf width = width / 2**depth), in their fast
  eval form (``to_fast_eval(layer).infer``: compiled descent + grouped leaf kernels);
- the path-neuron tree of depth 11 (4095 neurons, the UltraFastBERT layer) beside the 4096-wide block;
- ``fastfeedforward`` 0.2.1's eval path for the leaf-MLP trees, when that package is installed.

Measurement: every contender of one (threads, width, batch) group is timed in interleaved rounds (each
round times a block of calls of every contender in turn, so that load from other processes spreads over
all of them), cycling through a pool of distinct inputs; the table gives medians over rounds with the
min-max range. Next to each measured speedup stands the ideal one: the baseline's measured time over the
layer's roofline time, max(FLOPs / peak, bytes / bandwidth), from the distinct weights a batch touches plus
its input and output, with this machine's measured peak matmul rate (the faster of oneDNN and MKL) and
memory bandwidth (large copy) at the same thread count. The table and JSON also give the roofline ratio
(the dense block's roofline time over the layer's), which no dense implementation's speed enters.
"""

from __future__ import annotations

import argparse
import copy
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
DENSE_NN_LINEAR, DENSE_ADDMM, DENSE_ONEDNN = "dense nn.Linear", "dense addmm (W^T)", "dense oneDNN"


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
    """Peak matmul GFLOP/s (the faster of oneDNN and MKL, the dense baselines' engines) and copy bandwidth
    GB/s at ``threads``."""
    import torch
    import torch.utils.mkldnn

    torch.set_num_threads(threads)
    n = 1024
    lin = torch.utils.mkldnn.to_mkldnn(torch.nn.Linear(n, n, bias=False))
    a_mkldnn = torch.randn(n, n).to_mkldnn()
    a, b = torch.randn(n, n), torch.randn(n, n)
    rates = {}
    with torch.no_grad():
        for engine, fn in (("onednn", lambda: lin(a_mkldnn)), ("mkl", lambda: torch.mm(a, b))):
            fn()
            best = math.inf
            for _ in range(3 if quick else 6):
                t0 = time.perf_counter()
                fn()
                best = min(best, time.perf_counter() - t0)
            rates[engine] = 2 * n**3 / best / 1e9
    src = torch.ones(64 * 2**20 // (4 if quick else 1))  # 64 MiB (quick) or 256 MiB of float32
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = math.inf
    for _ in range(3 if quick else 5):
        t0 = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t0)
    return {"peak_gflops": max(rates.values()), "onednn_gflops": rates["onednn"], "mkl_gflops": rates["mkl"],
            "bandwidth_gbs": 2 * src.numel() * 4 / best / 1e9}


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


def dense_blocks(width: int) -> dict[str, Callable]:
    """The dense block 768 -> width -> 768 (GELU) three ways with the same weights: name -> fn(x)."""
    import torch
    import torch.nn.functional as F
    import torch.utils.mkldnn
    from torch import nn

    dense = nn.Sequential(nn.Linear(D_MODEL, width), nn.GELU(), nn.Linear(width, D_MODEL)).eval()
    onednn = torch.utils.mkldnn.to_mkldnn(copy.deepcopy(dense))  # converts the copy's children in place
    w1t, w2t = (dense[i].weight.detach().t().contiguous() for i in (0, 2))  # [768, width], [width, 768]
    b1, b2 = dense[0].bias.detach(), dense[2].bias.detach()

    def addmm(x):
        return torch.addmm(b2, F.gelu(torch.addmm(b1, x, w1t)), w2t)

    return {
        DENSE_NN_LINEAR: dense,
        DENSE_ADDMM: addmm,
        DENSE_ONEDNN: lambda x: onednn(x.to_mkldnn()).to_dense(),
    }


def build_contenders(width: int, args: argparse.Namespace) -> list[Contender]:
    import torch
    from torch import nn

    from fff_moe_plugin import FFF, FFFConfig, UltraFastConfig, UltraFastFFF
    from fff_moe_plugin.fast_eval import to_fast_eval

    dense = dense_blocks(width)
    with torch.no_grad():  # the three dense forms compute the same function
        x = torch.randn(4, D_MODEL)
        ref = dense[DENSE_NN_LINEAR](x)
        for name, fn in dense.items():
            if not torch.allclose(fn(x), ref, atol=1e-4, rtol=1e-4):
                raise RuntimeError(f"{name} disagrees with {DENSE_NN_LINEAR}")
    out = [Contender(name, "dense", 0, width, fn) for name, fn in dense.items()]
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
def fastest_dense(times: dict[str, list[float]], dense_names: list[str]) -> str:
    """The dense implementation with the smallest median time: the baseline of its group."""
    return min((n for n in dense_names if n in times), key=lambda n: statistics.median(times[n]))


def group_records(contenders: list[Contender], times: dict[str, list[float]], threads: int, width: int, S: int,
                  machine: dict[str, float]) -> list[dict]:
    """One record per timed contender, speedups against the fastest dense median of the group."""
    dense_names = [c.name for c in contenders if c.kind == "dense"]
    base = fastest_dense(times, dense_names)
    t_base = statistics.median(times[base])
    dense_roof = roofline_seconds("dense", S, width, 0, machine)
    records = []
    for c in contenders:
        if c.name not in times:
            continue
        ts = times[c.name]
        med = statistics.median(ts)
        roof = roofline_seconds(c.kind, S, width, c.depth, machine)
        records.append({
            "threads": threads, "width": width, "batch": S, "layer": c.name, "kind": c.kind, "depth": c.depth,
            "seconds_median": med, "seconds_min": min(ts), "seconds_max": max(ts), "rounds": len(ts),
            "tokens_per_second": S / med,
            "baseline": base, "baseline_seconds_median": t_base,
            "speedup_vs_baseline": t_base / med,
            "speedup_vs_baseline_range": [min(times[base]) / max(ts), max(times[base]) / min(ts)],
            "speedup_vs_dense": {n: statistics.median(times[n]) / med for n in dense_names if n in times},
            "roofline_seconds": roof,
            "ideal_speedup": t_base / roof,
            "roofline_ratio": dense_roof / roof,
        })
    return records


def _fmt_time(s: float) -> str:
    return f"{s * 1e6:.1f}us" if s < 1e-3 else f"{s * 1e3:.2f}ms" if s < 1 else f"{s:.2f}s"


def _fmt_x(v: float) -> str:
    return f"{v:.0f}x" if v >= 100 else f"{v:.1f}x"


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
    load_before = os.getloadavg()
    print(f"kernels: {what} ({time.perf_counter() - t_build:.1f}s to load); torch {torch.__version__}, "
          f"CPU capability {torch.backends.cpu.get_cpu_capability()}, load average {load_before[0]:.2f}",
          flush=True)
    records, machine = [], {}
    started = time.perf_counter()
    for threads in args.threads:
        machine[threads] = measure_machine(threads, args.quick)
        m = machine[threads]
        print(f"{threads} thread(s): peak matmul {m['peak_gflops']:.0f} GFLOP/s (oneDNN {m['onednn_gflops']:.0f}, "
              f"MKL {m['mkl_gflops']:.0f}), copy bandwidth {m['bandwidth_gbs']:.1f} GB/s", flush=True)
        for width in args.widths:
            torch.set_num_threads(threads)
            contenders = build_contenders(width, args)
            for S in args.batches:
                times = run_group(contenders, S, args)
                group = group_records(contenders, times, threads, width, S, m)
                records.extend(group)
                _print_group(group, threads, width, S)
    load_after = os.getloadavg()
    print(f"\ntotal {time.perf_counter() - started:.0f}s; load average {load_after[0]:.2f}")
    _print_summary(records)
    result = {
        "machine": {"cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
                    "cpu_capability": torch.backends.cpu.get_cpu_capability(), "kernels_compiled": kernels,
                    "simd_bits": extension.simd_width_bytes() * 8, "malloc_tuned": malloc_tuned,
                    "load_average_before": list(load_before), "load_average_after": list(load_after),
                    "roofline": {str(k): v for k, v in machine.items()}},
        "settings": {k: v for k, v in vars(args).items() if k not in ("func",)},
        "baseline": "per (threads, width, batch): the fastest median of the dense 768->width->768 GELU block as "
                    f"{DENSE_NN_LINEAR}, {DENSE_ADDMM} and {DENSE_ONEDNN}; named in each record's 'baseline'",
        "results": records,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {args.json}")
    return 0


def _print_group(rows: list[dict], threads: int, width: int, S: int) -> None:
    base = rows[0]["baseline"]
    print(f"\n[{threads} thread(s), width {width}, batch {S}]  baseline: {base} (fastest dense median); "
          f"speedup and ideal against it")
    print(f"  {'layer':30s} {'median':>10s} {'range':>21s} {'tokens/s':>11s} {'speedup':>9s} {'ideal':>8s} "
          f"{'roofline ratio':>15s}")
    for r in rows:
        rng = f"{_fmt_time(r['seconds_min'])}-{_fmt_time(r['seconds_max'])}"
        mark = "  <- baseline" if r["layer"] == base else ""
        print(f"  {r['layer']:30s} {_fmt_time(r['seconds_median']):>10s} {rng:>21s} {r['tokens_per_second']:>11.0f} "
              f"{r['speedup_vs_baseline']:>8.2f}x {r['ideal_speedup']:>7.1f}x {r['roofline_ratio']:>14.1f}x{mark}",
              flush=True)
    print("  ideal: the baseline's median over the layer's roofline time; roofline ratio: the dense block's "
          "roofline time over the layer's")


def _print_summary(records: list[dict]) -> None:
    """Speedup (ideal) against the fastest dense, one line per layer, one column per batch."""
    groups = sorted({(r["threads"], r["width"]) for r in records})
    for threads, width in groups:
        rows = [r for r in records if (r["threads"], r["width"]) == (threads, width)]
        batches = sorted({r["batch"] for r in rows})
        print(f"\nSummary, {threads} thread(s), width {width}: speedup against the fastest dense "
              f"(ideal; roofline ratio)")
        print(f"  {'batch':30s}" + "".join(f"{S:>24d}" for S in batches))
        base = {r["batch"]: r for r in rows if r["layer"] == r["baseline"]}
        print(f"  {'baseline':30s}" + "".join(
            f"{base[S]['layer'].removeprefix('dense '):>24s}" for S in batches))
        print(f"  {'baseline time':30s}" + "".join(f"{_fmt_time(base[S]['seconds_median']):>24s}" for S in batches))
        for layer in dict.fromkeys(r["layer"] for r in rows if r["kind"] != "dense"):
            by_batch = {r["batch"]: r for r in rows if r["layer"] == layer}
            cells = [f"{_fmt_x(by_batch[S]['speedup_vs_baseline'])} ({_fmt_x(by_batch[S]['ideal_speedup'])}; "
                     f"{_fmt_x(by_batch[S]['roofline_ratio'])})" if S in by_batch else "-" for S in batches]
            print(f"  {layer:30s}" + "".join(f"{c:>24s}" for c in cells))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
