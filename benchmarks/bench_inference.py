"""Inference benchmark: FFF layers against the fastest dense block of the same training width, checked against
the project's speed targets.

    python benchmarks/bench_inference.py                          # the full table: batches 1..4096, 1 and 2 threads
    python benchmarks/bench_inference.py --quick                  # about a minute
    python benchmarks/bench_inference.py --check results/bench_inference.json   # targets only, measure nothing
    python benchmarks/bench_inference.py --help                   # every option

The measurement is ``fff-moe bench`` (``fff_moe_plugin/experiments/inference_bench.py``, same options): a table per
(threads, width, batch) with medians over interleaved rounds, speedups against the fastest of three dense
implementations (nn.Linear, addmm on pre-transposed weights, oneDNN) and the roofline ideal beside each,
written to JSON (``--json``). This script then compares that JSON with ``TARGETS``; the shipped command
prints measurements and ideals only.
"""

from __future__ import annotations

import argparse
import json
import sys

from fff_moe_plugin.experiments import inference_bench as bench

# (layer kind, depth) -> speedup targets against the fastest dense block at 1 thread, width 4096: (batch 1, batch 4096)
TARGETS = {("path-neuron", 11): (250.0, 100.0), ("leaf-MLP", 7): (110.0, 40.0), ("leaf-MLP", 5): (55.0, 15.0)}
TARGET_THREADS, TARGET_WIDTH, TARGET_BATCHES = 1, 4096, (1, 4096)


def check_targets(result: dict) -> list[dict]:
    """The records of a ``fff-moe bench`` JSON that have a target, each with ``target`` and ``target_met``."""
    rows = []
    for r in result["results"]:
        target = TARGETS.get((r["kind"], r["depth"]))
        if (target is None or r["threads"] != TARGET_THREADS or r["width"] != TARGET_WIDTH
                or r["batch"] not in TARGET_BATCHES):
            continue
        goal = target[TARGET_BATCHES.index(r["batch"])]
        rows.append({**r, "target": goal, "target_met": r["speedup_vs_baseline"] >= goal})
    return rows


def print_targets(rows: list[dict]) -> None:
    if not rows:
        print(f"\nno result at {TARGET_THREADS} thread(s), width {TARGET_WIDTH}, batches {TARGET_BATCHES} to check")
        return
    print(f"\nTargets ({TARGET_THREADS} thread, width {TARGET_WIDTH}, speedup over the fastest dense block):")
    for r in rows:
        met = "met" if r["target_met"] else "NOT met"
        print(f"  {r['layer']:30s} batch {r['batch']:>5d}: {r['speedup_vs_baseline']:6.1f}x against {r['baseline']} "
              f"(ideal {r['ideal_speedup']:.0f}x)  target >= {r['target']:.0f}x  {met}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    bench.add_arguments(parser)
    parser.add_argument("--check", metavar="JSON", help="compare an existing results file with the targets; no run")
    parser.add_argument("--strict", action="store_true", help="exit with status 1 when a target is not met")
    args = parser.parse_args(argv)
    path = args.check
    if path is None:
        rc = bench.run(args)
        if rc:
            return rc
        path = args.json
    with open(path) as f:
        rows = check_targets(json.load(f))
    print_targets(rows)
    return 1 if args.strict and not all(r["target_met"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
