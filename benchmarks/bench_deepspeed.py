"""Training tokens/s under DeepSpeed, 2 CPU processes (gloo): FFFMoE vs DeepSpeed's own top-1 MoE with the same
leaves (experts) vs the dense block of the same training width, at ep_size 1 and 2.

    python benchmarks/bench_deepspeed.py [--steps 40] [--json bench_deepspeed.json] [--profile DIR]

Each variant is a stack of pre-LN residual feedforward blocks (d_model 128, dense width 512 = 8 leaves x 64)
trained with Adam on random inputs through ``fff_moe_plugin.deepspeed.initialize``; the time covers forward,
backward (with DeepSpeed's gradient all-reduce) and the optimizer step. Every variant trains the same model
(same seed) on the same batches for the same number of steps. The variants' steps are interleaved (round r
runs one step of each, starting at variant r mod the number of variants), so that load from other processes on the machine falls
on all of them alike; the figure is the median step. Prints a table, writes JSON. With ``--profile DIR``, each
rank then runs ``--profile-steps`` more steps of each variant under ``torch.profiler`` and writes the operators
by self CPU time to ``DIR/<variant>.rank<r>.txt``.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

VARIANTS = {
    "dense": None,
    "deepspeed top-1 MoE, ep 1": {"router": "topk", "ep_size": 1},
    "deepspeed top-1 MoE, ep 2": {"router": "topk", "ep_size": 2},
    "FFFMoE, ep 1": {"ep_size": 1},
    "FFFMoE, ep 2": {"ep_size": 2},
    # the contract of DeepSpeed's top-1 gate: every rank routes the same number of tokens (this benchmark's fixed
    # batches), so the capacity is agreed once instead of in every layer's forward
    "FFFMoE, ep 2, uniform_tokens": {"ep_size": 2, "uniform_tokens": True},
}


def _model(d: int, n_blocks: int):
    """The residual feedforward blocks the engines replace (``*.mlp``), without input and output projections."""
    import torch

    from fff_moe_plugin.experiments.toy import ToyNet

    torch.manual_seed(0)
    return ToyNet(d, 4 * d, n_blocks, activation="gelu", projections=False)


def worker(args) -> None:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    # DeepSpeed's engine probes for fairseq's optimizer class when it is built (``_supported_optims``, inside a
    # try/except ImportError); this benchmark uses no fairseq optimizer, so the probe is answered with an
    # ImportError instead of importing fairseq (and its start-up cost) into the measured processes
    sys.modules["fairseq"] = None
    import deepspeed
    import torch
    import torch.nn.functional as F

    from fff_moe_plugin.deepspeed import aux_loss, initialize

    torch.set_num_threads(1)
    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    d = args.d_model
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(args.batch, args.seq_len, d, generator=g)
    y = torch.randn(args.batch, args.seq_len, d, generator=g)
    engines = []
    for extra in VARIANTS.values():
        config = {"train_micro_batch_size_per_gpu": args.batch, "steps_per_print": 10**9,
                  "optimizer": {"type": "Adam", "params": {"lr": 1e-3, "torch_adam": True}},
                  "zero_optimization": {"stage": 0}}
        if extra is not None:
            config["fff_moe"] = {"depth": 3, "leaf_width": d * 4 // 8, "replace": "*.mlp", "capacity_factor": 1.25,
                                 "master_leaf": False, **extra}
        engines.append(initialize(model=_model(d, args.blocks), config=config, verbose=False)[0])

    def step(engine) -> float:
        torch.distributed.barrier()
        t = time.perf_counter()
        loss = F.mse_loss(engine(x), y) + aux_loss(engine)
        engine.backward(loss)
        engine.step()
        torch.distributed.barrier()
        return time.perf_counter() - t

    times: list[list[float]] = [[] for _ in engines]
    for r in range(args.warmup + args.steps):
        for i in range(len(engines)):
            v = (r + i) % len(engines)
            t = step(engines[v])
            if r >= args.warmup:
                times[v].append(t)
    rows = []
    for name, engine, ts in zip(VARIANTS, engines, times):
        ts.sort()
        median = ts[len(ts) // 2]
        params = sum(p.numel() for p in engine.module.parameters())
        rows.append({"variant": name, "tokens_per_s": args.batch * args.seq_len * world / median,
                     "median_step_s": median, "params_per_rank": params})
    if args.profile:
        os.makedirs(args.profile, exist_ok=True)
        for name, engine in zip(VARIANTS, engines):
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                for _ in range(args.profile_steps):
                    step(engine)
            tag = name.replace(",", "").replace(" ", "_")
            with open(os.path.join(args.profile, f"{tag}.rank{rank}.txt"), "w") as f:
                f.write(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=40))
    if any(m is not None for k, m in sys.modules.items() if k.split(".")[0] == "fairseq"):
        raise RuntimeError("fairseq was imported by the benchmark's processes")
    if rank == 0:
        report(rows, args)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()  # a gloo group alive at interpreter exit can abort the process


def report(rows, args) -> None:
    dense = rows[0]["tokens_per_s"]
    print(f"\nDeepSpeed training, {args.procs} CPU processes (gloo), {args.blocks} blocks, d_model {args.d_model}, "
          f"dense width {4 * args.d_model} = 8 leaves x {args.d_model // 2}, micro-batch {args.batch} x "
          f"{args.seq_len} tokens per rank, median of {args.steps} interleaved steps")
    top1 = {v["ep_size"]: r["tokens_per_s"] for r, v in zip(rows, VARIANTS.values())
            if v is not None and v.get("router") == "topk"}
    for r, v in zip(rows, VARIANTS.values()):  # an FFF tree against DeepSpeed's top-1 MoE at the same ep_size
        if v is not None and v.get("router") != "topk":
            r["vs_top1"] = r["tokens_per_s"] / top1[v["ep_size"]]
    print(f"| {'variant':<30} | {'tokens/s':>9} | {'vs dense':>8} | {'vs top-1':>8} | {'step ms':>8} | "
          f"{'params/rank':>11} |")
    print(f"|{'-' * 32}|{'-' * 11}|{'-' * 10}|{'-' * 10}|{'-' * 10}|{'-' * 13}|")
    for r in rows:
        vs_top1 = f"{r['vs_top1']:>7.2f}x" if "vs_top1" in r else " " * 8
        print(f"| {r['variant']:<30} | {r['tokens_per_s']:>9.0f} | {r['tokens_per_s'] / dense:>7.2f}x | {vs_top1} | "
              f"{1000 * r['median_step_s']:>8.1f} | {r['params_per_rank']:>11,} |")
    with open(args.json, "w") as f:
        json.dump({"settings": {k: v for k, v in vars(args).items() if k != "worker"}, "results": rows}, f, indent=2)
    print(f"wrote {args.json}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--blocks", type=int, default=2)
    p.add_argument("--json", default="bench_deepspeed.json")
    p.add_argument("--profile", metavar="DIR", help="also profile each variant (torch.profiler, per rank) into DIR")
    p.add_argument("--profile-steps", type=int, default=30)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    args.procs = 2
    for name in ("steps", "batch", "seq_len", "d_model", "blocks", "profile_steps"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.d_model % 8:
        p.error("--d-model must be a multiple of 8 (the dense width 4 * d_model is split into 8 leaves)")
    if args.worker:
        worker(args)
        return 0
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in range(args.procs):
        env = dict(os.environ, DS_ACCELERATOR="cpu", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                   LOCAL_RANK=str(rank), WORLD_SIZE=str(args.procs), OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen([sys.executable, __file__, *sys.argv[1:], "--worker"], env=env,
                                      stdout=None if rank == 0 else subprocess.DEVNULL))
    code = max(p.wait() for p in procs)
    # DeepSpeed's CPU all-reduce leaves its shared-memory buffers (67 MB a rank) behind; this run's carry its port
    for leftover in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_127.0.0.1_{port}_*"):
        leftover.unlink(missing_ok=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
