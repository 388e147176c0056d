"""Tutel dispatch against DeepSpeed dispatch for the same FFF tree, on CPU processes with gloo.

Each rank builds one core FFF (the same weights everywhere), and from it the DeepSpeed-backed layer
(``FFFMoE``, DeepSpeed's MOELayer with the tree gate) and the Tutel-backed one (``TutelFFF``, Tutel's
moe_layer with the tree gate), leaves sharded over the ranks in both. It times a training step (forward +
backward) and an eval forward of each on this rank's tokens, with and without capacity limits, and takes
the slowest rank; the layers take turns step by step. The core FFF on the rank's tokens, which needs no
dispatch, is the reference line.

    python benchmarks/bench_tutel.py                      # 2 processes, the default sizes (about a minute)
    python benchmarks/bench_tutel.py --depths 2 4 6 --tokens 4096 --json out.json

Prints a table and writes JSON. Needs Tutel (built from source) and DeepSpeed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fff_moe_plugin import FFF, FFFConfig

BACKENDS = ("core", "deepspeed", "tutel")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--world", type=int, default=2, help="processes (expert-parallel ranks)")
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--leaf-width", type=int, default=64)
    p.add_argument("--depths", type=int, nargs="+", default=[3, 5])
    p.add_argument("--tokens", type=int, default=2048, help="tokens per rank per step")
    p.add_argument("--capacity-factor", type=float, default=1.0, help="the capped setting (dropless is also run)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per measurement")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--json", default="benchmarks/results/bench_tutel.json")
    args = p.parse_args(argv)
    for name in ("world", "d_model", "leaf_width", "tokens", "steps", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} = {getattr(args, name)} is not allowed: must be >= 1")
    if args.warmup < 0:
        p.error(f"--warmup = {args.warmup} is not allowed: must be >= 0")
    if args.capacity_factor <= 0:
        p.error(f"--capacity-factor = {args.capacity_factor} is not allowed: must be > 0 (dropless is run anyway)")
    if args.d_model % 2:
        p.error(f"--d-model = {args.d_model} is not allowed: Tutel's dispatch needs an even width")
    for depth in args.depths:
        if depth < 0 or 2**depth % args.world:
            p.error(f"--depths {depth} is not allowed: 2**depth leaves must be a multiple of --world {args.world}")
    return args


def check_frameworks() -> None:
    try:
        import deepspeed  # noqa: F401

        import fff_moe_plugin.integrations.tutel  # noqa: F401
    except ImportError as e:
        sys.exit(f"bench_tutel needs Tutel and DeepSpeed: {e}")


def timed(fns: dict, steps: int, warmup: int) -> dict:
    """Median seconds of each ``fns[name]()`` over ``steps`` calls, the slowest rank's (ranks start together).

    The functions take turns step by step, so that a change in the machine's load hits all of them alike.
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {name: [] for name in fns}
    for _ in range(steps):
        for name, fn in fns.items():
            dist.barrier()
            t0 = time.perf_counter()
            fn()
            t = torch.tensor(time.perf_counter() - t0, dtype=torch.float64)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            times[name].append(t.item())
    return {name: statistics.median(ts) for name, ts in times.items()}


def _worker(rank: int, args: argparse.Namespace, port: int, rows: list | None) -> None:
    os.environ.update(DS_ACCELERATOR="cpu", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE=str(args.world))
    import deepspeed

    from fff_moe_plugin.integrations.deepspeed.layer import FFFMoE
    from fff_moe_plugin.integrations.tutel import TutelFFF

    torch.set_num_threads(args.threads)
    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    W, S = args.world, args.tokens
    out = []
    for depth in args.depths:
        config = FFFConfig(d_model=args.d_model, leaf_width=args.leaf_width, depth=depth, train_mode="hard",
                           load_balance="leaf")
        torch.manual_seed(0)
        core = FFF(config)
        x = torch.randn(S, args.d_model, generator=torch.Generator().manual_seed(1 + rank))
        for capacity in ("dropless", "capped"):
            cf = args.capacity_factor
            layers = {
                "core": core if capacity == "dropless" else None,  # no dispatch, no capacity
                "deepspeed": FFFMoE.from_fff(core, ep_size=W, capacity_factor=cf, eval_capacity_factor=cf,
                                             drop_tokens=capacity == "capped"),
                "tutel": TutelFFF.from_fff(core, capacity_factor=0.0 if capacity == "dropless" else cf),
            }
            layers["deepspeed"].set_deepspeed_parallelism()
            steps, dropped = {"train": {}, "eval": {}}, {}
            for backend in BACKENDS:
                layer = layers[backend]
                if layer is None:
                    continue
                call = layer.forward_block if backend == "deepspeed" else layer

                def train_step(layer=layer, call=call, x=x):
                    layer.train()
                    res = call(x)
                    (res.output.square().mean() + res.aux_loss).backward()
                    layer.zero_grad(set_to_none=True)

                def eval_step(layer=layer, call=call, x=x):
                    layer.eval()
                    with torch.no_grad():
                        call(x)

                steps["train"][backend], steps["eval"][backend] = train_step, eval_step
                layer.eval()
                with torch.no_grad():
                    stats = call(x).stats
                n = torch.tensor(stats["dropped"].item() if "dropped" in stats else 0.0, dtype=torch.float64)
                dist.all_reduce(n)
                dropped[backend] = n.item() / (W * S)
            for mode, fns in steps.items():
                for backend, sec in timed(fns, args.steps, args.warmup).items():
                    out.append(dict(depth=depth, leaves=config.n_leaves, backend=backend, capacity=capacity,
                                    mode=mode, ms=1e3 * sec, tokens_per_s=W * S / sec,
                                    dropped_fraction=dropped[backend]))
                    if rank == 0:
                        print(f"  depth {depth:2d} {backend:9s} {capacity:8s} {mode:5s} {1e3 * sec:9.2f} ms "
                              f"{W * S / sec:12,.0f} tok/s", flush=True)
    if rank == 0 and rows is not None:
        rows.extend(out)
    dist.barrier()
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv=None) -> int:
    args = parse_args(argv)
    check_frameworks()
    print(f"bench_tutel: {args.world} processes x {args.threads} thread(s), d_model {args.d_model}, leaf width "
          f"{args.leaf_width}, {args.tokens} tokens per rank, median of {args.steps} steps", flush=True)
    with mp.Manager() as manager:
        shared = manager.list()
        mp.spawn(_worker, args=(args, free_port(), shared), nprocs=args.world)
        rows = list(shared)

    head = f"{'depth':>5} {'leaves':>6} {'capacity':>9} {'mode':>5} " + "".join(
        f"{b + ' tok/s':>17}" for b in BACKENDS) + f" {'tutel/ds':>8} {'dropped ds/tutel':>17}"
    print("\n" + head)
    print("-" * len(head))
    keys = sorted({(r["depth"], r["capacity"], r["mode"]) for r in rows}, key=lambda k: (k[0], k[1], k[2] != "train"))
    for depth, capacity, mode in keys:
        by = {r["backend"]: r for r in rows if (r["depth"], r["capacity"], r["mode"]) == (depth, capacity, mode)}
        cells = "".join(f"{by[b]['tokens_per_s']:17,.0f}" if b in by else f"{'-':>17}" for b in BACKENDS)
        ratio = by["tutel"]["tokens_per_s"] / by["deepspeed"]["tokens_per_s"]
        drops = f"{by['deepspeed']['dropped_fraction']:.3f}/{by['tutel']['dropped_fraction']:.3f}"
        print(f"{depth:>5} {by['tutel']['leaves']:>6} {capacity:>9} {mode:>5} {cells} {ratio:8.2f} {drops:>17}")

    import deepspeed
    import tutel

    result = dict(
        benchmark="bench_tutel", settings=vars(args),
        versions=dict(torch=torch.__version__, deepspeed=deepspeed.__version__,
                      tutel=getattr(tutel, "__version__", "0.3 (source build)"), python=platform.python_version()),
        machine=dict(cpus=os.cpu_count(), processor=platform.processor() or platform.machine()),
        rows=rows,
    )
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(result, f, indent=1)
    print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
