"""Training benchmark: tokens/s of one feedforward block's full training step on CPU, FFF tree against dense.

    python benchmarks/bench_training.py            # the full set: 1 and 2 threads, widths 1024/4096, depths 3/5/7
    python benchmarks/bench_training.py --quick    # a few minutes: 1 thread, width 4096, depths 5/7, 3 rounds
    python benchmarks/bench_training.py --help     # every option

One step is forward, loss, backward and an SGD update (``torch.optim.SGD``, gradients set to None before each
step, as training does), on a fixed batch of tokens (default 4096) with d_model 768, float32. The loss is the
mean squared error against a fixed random target plus the block's ``aux_loss``.

Contenders, per (threads, training width W):
- the FFF tree ``FFF(FFFConfig(d_model, leaf_width=W / 2**depth, depth, train_mode="hard",
  load_balance="leaf", activation="gelu"))`` (leaf outputs scaled by the path probability, no master leaf)
  at each depth, in three forms that start from the same weights:
  ``loop``: the per-leaf Python loop (``grouped_mlp_loop``, selected with ``FFF_MOE_NO_GROUPED_MM=1`` during
  the forward call); ``grouped``: the default eager path (``F.grouped_mm``); ``compiled``:
  ``torch.compile(loss_fn, fullgraph=True, dynamic=False)`` of forward and loss, whose backward runs the
  compiled backward graph; the optimizer step stays eager;
- the dense block of equal training width, ``DenseFFN(DenseConfig(d_model, d_ff=W, activation="gelu"))``;
- per depth, the dense block with the tree's parameters per token: ``d_ff`` is the integer nearest to
  ``(FFFConfig.num_parameters_per_token() - d_out) / (d_model + 1 + d_out)``, the width at which
  ``DenseConfig.num_parameters()`` equals it (about leaf width + depth / 2);
- both dense blocks in eager and compiled form; the faster median of the two forms is the baseline (named).

Measurement: the compiled forms compile on their first call (timed and reported, not counted) and every
contender then runs warm-up steps; the timed part is interleaved rounds, each timing a block of steps of
every contender in turn so that load from other processes spreads over all of them. The table gives the
median step time over rounds with the min-max range, tokens/s, the speedup over the dense block of equal
training width, and the tree overhead: FFF step time / step time of the dense block with the same
parameters per token. Beside each ratio stands its ideal, the ratio of training FLOPs per token (matmuls
only; a multiply-add is 2 FLOPs; the input needs no gradient, so a first-layer matrix costs forward plus
weight gradient and a second-layer one forward plus input and weight gradient):

    dense(f) = 2*2*d*f + 3*2*f*o
    FFF      = 2*2*d*n + 2*2*d*l + 3*2*l*o,   n = 2**depth - 1 nodes (the leaf balancing loss needs every
                                               node's logit, so the descent computes them in one GEMM)

Goals (for the grouped and compiled forms; the package itself sets none): tree overhead at most 1.5 at
depths 3 and 5 and at most 2.0 at depth 7. At depth 7 the FLOP ideal itself is above 2 (the 127 node
logits cost more than the 32-wide leaf).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback
from dataclasses import dataclass, field
from typing import Callable, Optional

D_MODEL = 768
FORMS = ("loop", "grouped", "compiled")
GOALS = {3: 1.5, 5: 1.5, 7: 2.0}  # depth -> largest tree overhead the grouped and compiled forms should reach
GOAL_FORMS = ("grouped", "compiled")
DENSE_WIDTH, DENSE_PARAMS = "dense (equal width)", "dense (equal params/token)"


# -- arguments -------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Training-step speed (forward + backward + SGD) of FFF trees against dense blocks on CPU.",
        epilog="--quick: 1 thread, width 4096, depths 5 and 7, 3 rounds (a few minutes). "
               "JSON goes to --json; the tables go to stdout.",
    )
    parser.add_argument("--quick", action="store_true",
                        help="1 thread, width 4096, depths 5/7, 3 rounds (overrides those four options)")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="torch thread counts (default 1 2)")
    parser.add_argument("--widths", type=int, nargs="+", default=[1024, 4096],
                        help="training widths W: dense d_ff, and 2**depth * leaf width of the tree (default 1024 4096)")
    parser.add_argument("--depths", type=int, nargs="+", default=[3, 5, 7], help="tree depths (default 3 5 7)")
    parser.add_argument("--forms", nargs="+", default=list(FORMS), choices=FORMS,
                        help="FFF forms to time; the dense blocks run eager, and compiled too when "
                             "'compiled' is among them (default: all)")
    parser.add_argument("--tokens", type=int, default=4096, help="tokens per step (default 4096)")
    parser.add_argument("--d-model", type=int, default=D_MODEL, help=f"model width (default {D_MODEL})")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds per group (default 5)")
    parser.add_argument("--block-seconds", type=float, default=0.25,
                        help="time per contender per round; at least one step (default 0.25)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per contender after building (default 2)")
    parser.add_argument("--lr", type=float, default=1e-3, help="SGD learning rate (default 1e-3)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default="benchmarks/results/bench_training.json",
                        help="where to write the results (default benchmarks/results/bench_training.json)")
    return parser


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    """Parse and validate; every bad value is reported here, before any work."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.quick:
        args.threads, args.widths, args.depths, args.rounds = [1], [4096], [5, 7], 3
    problems = []
    for name in ("threads", "widths", "depths"):
        bad = [v for v in getattr(args, name) if v < 1]
        if bad:
            problems.append(f"--{name} must be positive integers, got {bad}")
    if args.threads and max(args.threads) > (os.cpu_count() or 1):
        problems.append(f"--threads {max(args.threads)} is more than this machine's {os.cpu_count()} CPUs")
    for w in args.widths:
        for depth in args.depths:
            if w >= 1 and depth >= 1 and (w % 2**depth or w // 2**depth < 1):
                problems.append(f"--widths {w} is not divisible into 2**{depth} = {2**depth} leaves (--depths {depth})")
    if args.tokens < 1 or args.d_model < 1:
        problems.append(f"--tokens and --d-model must be positive, got {args.tokens}, {args.d_model}")
    if args.rounds < 1 or args.block_seconds <= 0 or args.warmup < 0:
        problems.append(f"--rounds must be >= 1, --block-seconds > 0 and --warmup >= 0, "
                        f"got {args.rounds}, {args.block_seconds}, {args.warmup}")
    if not (args.lr > 0 and math.isfinite(args.lr)):
        problems.append(f"--lr must be a positive number, got {args.lr}")
    json_dir = os.path.dirname(os.path.abspath(args.json))
    if os.path.exists(json_dir) and not os.path.isdir(json_dir):
        problems.append(f"--json {args.json}: {json_dir} is not a directory")
    if problems:
        parser.error("; ".join(problems))
    args.depths = sorted(set(args.depths))
    args.forms = [f for f in FORMS if f in args.forms]
    return args


# -- FLOPs and parameter matching ------------------------------------------------------------------------------
def dense_flops(d: int, f: int, o: int) -> int:
    """Training matmul FLOPs per token of the dense block d -> f -> o (input without gradient)."""
    return 2 * 2 * d * f + 3 * 2 * f * o


def fff_flops(d: int, leaf_width: int, depth: int, o: int, every_node: bool = True) -> int:
    """Training matmul FLOPs per token of the hard FFF: node logits (all of them, or the path's), one leaf."""
    n = 2**depth - 1 if every_node else depth
    return 2 * 2 * d * n + 2 * 2 * d * leaf_width + 3 * 2 * leaf_width * o


def params_matched_width(cfg) -> int:
    """d_ff at which DenseConfig(d_model, d_ff).num_parameters() is nearest to cfg.num_parameters_per_token()."""
    d, o = cfg.d_model, cfg.d_out
    return max(1, round((cfg.num_parameters_per_token() - o) / (d + 1 + o)))


# -- contenders ------------------------------------------------------------------------------------------------
@dataclass
class Contender:
    name: str  # shown in the table
    kind: str  # "fff", DENSE_WIDTH or DENSE_PARAMS
    form: str  # loop / grouped / compiled / eager
    depth: int  # tree depth; for DENSE_PARAMS the depth it matches; 0 for DENSE_WIDTH
    d_ff: int  # dense width, or leaf width of the tree
    params: int
    params_per_token: int
    flops_per_token: int
    model: object = None
    step: Optional[Callable[[], float]] = None  # one training step; returns the loss
    compile_s: Optional[float] = None
    error: Optional[str] = None
    path: Optional[str] = None  # grouped_mlp's implementation in the FFF forms
    first_loss: Optional[float] = None
    times: list = field(default_factory=list)  # seconds per step, one per round


@contextlib.contextmanager
def _env(name: str, value: Optional[str]):
    old = os.environ.get(name)
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def make_step(model, form: str, x, target, lr: float) -> Callable[[], float]:
    """One training step of ``model`` in ``form``: zero grads, forward + loss, backward, SGD update."""
    import torch
    import torch.nn.functional as F

    opt = torch.optim.SGD(model.parameters(), lr=lr)

    def loss_fn(x, target):
        out = model(x)
        return F.mse_loss(out.output, target) + out.aux_loss

    if form == "compiled":
        fn = torch.compile(loss_fn, fullgraph=True, dynamic=False)
    else:
        fn = loss_fn
    # the loop form: grouped_mm_available reads FFF_MOE_NO_GROUPED_MM on every call, so the variable is set
    # only around this contender's forward (the backward follows the graph the forward recorded)
    env_value = "1" if form == "loop" else None

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        with _env("FFF_MOE_NO_GROUPED_MM", env_value):
            loss = fn(x, target)
        loss.backward()
        opt.step()
        return loss.detach()

    return step


def build_contenders(width: int, args: argparse.Namespace, x, target) -> list[Contender]:
    """Every contender of one (threads, width) group, each FFF form from the same initial weights."""
    import torch

    from fff_moe_plugin import FFF, FFFConfig
    from fff_moe_plugin.baselines.dense import DenseFFN
    from fff_moe_plugin.config import DenseConfig

    d = o = args.d_model
    dense_forms = ["eager"] + (["compiled"] if "compiled" in args.forms else [])
    out: list[Contender] = []

    def dense(kind: str, d_ff: int, depth: int, label: str) -> None:
        cfg = DenseConfig(d_model=d, d_ff=d_ff, activation="gelu")
        torch.manual_seed(args.seed)
        base = DenseFFN(cfg).train()
        for form in dense_forms:
            out.append(Contender(f"{label} {form}", kind, form, depth, d_ff, cfg.num_parameters(),
                                 cfg.num_parameters_per_token(), dense_flops(d, d_ff, o), copy.deepcopy(base)))

    dense(DENSE_WIDTH, width, 0, f"dense d_ff={width}")
    for depth in args.depths:
        cfg = FFFConfig(d_model=d, leaf_width=width // 2**depth, depth=depth, train_mode="hard",
                        load_balance="leaf", activation="gelu")
        f = params_matched_width(cfg)
        dense(DENSE_PARAMS, f, depth, f"dense d_ff={f} (=params D{depth})")
        torch.manual_seed(args.seed)
        base = FFF(cfg).train()
        for form in args.forms:
            out.append(Contender(f"FFF D{depth} x{cfg.leaf_width} {form}", "fff", form, depth, cfg.leaf_width,
                                 cfg.num_parameters(), cfg.num_parameters_per_token(),
                                 fff_flops(d, cfg.leaf_width, depth, o), copy.deepcopy(base)))
    for c in out:
        c.step = make_step(c.model, c.form, x, target, args.lr)
    return out


def prepare(contenders: list[Contender], args: argparse.Namespace) -> None:
    """First step (compiling the compiled forms, timed), then the warm-up steps. A contender that fails gets
    ``error`` set and is left out of the timing; the others go on."""
    import torch

    from fff_moe_plugin.ops import grouped

    for c in contenders:
        try:
            if c.kind == "fff" and c.form == "compiled":
                # an eager forward first, as training does: it probes grouped_mm once outside the graph
                with torch.no_grad():
                    c.model(torch.zeros(8, args.d_model))
            grouped.last_path = None
            t0 = time.perf_counter()
            c.first_loss = float(c.step())
            if c.form == "compiled":
                c.compile_s = time.perf_counter() - t0
            if c.kind == "fff":
                c.path = grouped.last_path
            for _ in range(args.warmup):
                c.step()
        except Exception as e:  # noqa: BLE001 - reported in the table and the JSON, the other contenders go on
            c.error = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
            print(f"  {c.name}: FAILED on its first steps: {c.error}", file=sys.stderr)
            traceback.print_exc(limit=3)
        extra = f" (compile + first step {c.compile_s:.1f} s)" if c.compile_s is not None else ""
        if c.error is None:
            print(f"  ready: {c.name}{extra}", flush=True)


def check_same_loss(contenders: list[Contender]) -> list[str]:
    """The forms of one block start from the same weights: their first losses must agree. Returns the
    disagreements (empty when all agree)."""
    problems = []
    groups: dict[tuple, list[Contender]] = {}
    for c in contenders:
        if c.error is None and c.first_loss is not None:
            groups.setdefault((c.kind, c.depth, c.d_ff), []).append(c)
    for members in groups.values():
        ref = members[0].first_loss
        for c in members[1:]:
            if not math.isclose(c.first_loss, ref, rel_tol=1e-4, abs_tol=1e-6):
                problems.append(f"{c.name}: first loss {c.first_loss:.6g} differs from {members[0].name}: {ref:.6g}")
    return problems


def _time_block(step: Callable, n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        step()
    return (time.perf_counter() - t0) / n


def run_group(contenders: list[Contender], args: argparse.Namespace) -> None:
    live = [c for c in contenders if c.error is None]
    steps = {}
    for c in live:  # how many steps fill a block, from one timed step
        steps[c.name] = max(1, min(50, round(args.block_seconds / max(_time_block(c.step, 1), 1e-6))))
    for r in range(args.rounds):
        for c in live:
            if c.error is not None:
                continue
            try:
                c.times.append(_time_block(c.step, steps[c.name]))
            except Exception as e:  # noqa: BLE001
                c.error = f"{type(e).__name__}: {e}"
        print(f"  round {r + 1}/{args.rounds} done", flush=True)


# -- records and tables ----------------------------------------------------------------------------------------
def _median(c: Contender) -> float:
    return statistics.median(c.times) if c.times else math.inf


def fastest(contenders: list[Contender], kind: str, depth: int) -> Optional[Contender]:
    pool = [c for c in contenders if c.kind == kind and c.depth == depth and c.times]
    return min(pool, key=_median) if pool else None


def group_records(contenders: list[Contender], threads: int, width: int, args: argparse.Namespace) -> list[dict]:
    base_w = fastest(contenders, DENSE_WIDTH, 0)
    rows = []
    for c in contenders:
        rec = {
            "threads": threads, "width": width, "tokens": args.tokens, "d_model": args.d_model,
            "name": c.name, "kind": c.kind, "form": c.form, "depth": c.depth,
            "d_ff" if c.kind != "fff" else "leaf_width": c.d_ff,
            "params": c.params, "params_per_token": c.params_per_token, "flops_per_token": c.flops_per_token,
            "compile_s": c.compile_s, "error": c.error, "first_loss": c.first_loss,
        }
        if c.kind == "fff":
            rec["grouped_path"] = c.path
        if c.times:
            med = _median(c)
            rec.update(step_ms=med * 1e3, step_ms_min=min(c.times) * 1e3, step_ms_max=max(c.times) * 1e3,
                       step_ms_rounds=[t * 1e3 for t in c.times], tokens_per_s=args.tokens / med)
            if base_w is not None:
                rec.update(baseline_width=base_w.name, speedup_vs_dense_width=_median(base_w) / med,
                           ideal_speedup_vs_dense_width=base_w.flops_per_token / c.flops_per_token)
            if c.kind in ("fff", DENSE_PARAMS):
                base_p = fastest(contenders, DENSE_PARAMS, c.depth)
                if base_p is not None:
                    rec.update(baseline_params=base_p.name, tree_overhead=med / _median(base_p),
                               ideal_tree_overhead=c.flops_per_token / base_p.flops_per_token)
            if c.kind == "fff" and c.form in GOAL_FORMS and c.depth in GOALS and "tree_overhead" in rec:
                rec["goal_tree_overhead"] = GOALS[c.depth]
                rec["goal_met"] = rec["tree_overhead"] <= GOALS[c.depth]
        rows.append(rec)
    return rows


def _fmt_ms(v: float) -> str:
    return f"{v:.1f}" if v < 100 else f"{v:.0f}"


def format_group(rows: list[dict]) -> str:
    r0 = rows[0]
    base = next((r["baseline_width"] for r in rows if "baseline_width" in r), "none")
    lines = [f"\n== {r0['threads']} thread(s), training width {r0['width']}, {r0['tokens']} tokens/step, "
             f"d_model {r0['d_model']}; baseline for speedup: {base}",
             f"{'contender':34s} {'step ms':>8s} {'(min-max)':>15s} {'tokens/s':>9s} {'speedup':>8s} {'ideal':>7s} "
             f"{'overhead':>8s} {'ideal':>6s}  goal"]
    for r in rows:
        if "step_ms" not in r:
            lines.append(f"{r['name']:34s} FAILED: {r['error']}")
            continue
        rng = f"({_fmt_ms(r['step_ms_min'])}-{_fmt_ms(r['step_ms_max'])})"
        sp = f"{r['speedup_vs_dense_width']:7.2f}x" if "speedup_vs_dense_width" in r else f"{'-':>8s}"
        isp = f"{r['ideal_speedup_vs_dense_width']:6.1f}x" if "ideal_speedup_vs_dense_width" in r else f"{'-':>7s}"
        ov = f"{r['tree_overhead']:8.2f}" if "tree_overhead" in r else f"{'-':>8s}"
        iov = f"{r['ideal_tree_overhead']:6.2f}" if "ideal_tree_overhead" in r else f"{'-':>6s}"
        goal = ""
        if "goal_met" in r:
            goal = f"<= {r['goal_tree_overhead']:.1f}: {'goal met' if r['goal_met'] else 'not met'}"
        lines.append(f"{r['name']:34s} {_fmt_ms(r['step_ms']):>8s} {rng:>15s} {r['tokens_per_s']:9.0f} {sp} {isp} "
                     f"{ov} {iov}  {goal}")
    bases = sorted({r["baseline_params"] for r in rows if r["kind"] == "fff" and "baseline_params" in r})
    if bases:
        lines.append("overhead baselines (the faster form of the dense block with the tree's params/token): "
                     + ", ".join(bases))
    compiled = [f"{r['name']} {r['compile_s']:.1f} s" for r in rows if r.get("compile_s") is not None]
    if compiled:
        lines.append("compile + first step (excluded): " + "; ".join(compiled))
    return "\n".join(lines)


def _uptime() -> Optional[list[float]]:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def run(args: argparse.Namespace) -> dict:
    import torch

    torch._dynamo.config.recompile_limit = 64  # every compiled contender of a group is one entry of one code object
    torch._dynamo.config.fail_on_recompile_limit_hit = True  # never fall back to eager silently
    started = time.time()
    meta = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"), "command": " ".join(sys.argv),
        "torch": torch.__version__, "python": platform.python_version(), "machine": platform.processor() or
        platform.machine(), "cpus": os.cpu_count(), "load_before": _uptime(), "args": vars(args),
        "goals": {str(k): v for k, v in GOALS.items()}, "goal_forms": list(GOAL_FORMS),
        "flops_formula": "dense(f) = 4*d*f + 6*f*o; FFF = 4*d*(2**depth - 1) + 4*d*l + 6*l*o (per token)",
    }
    records, problems, tables = [], [], []
    for threads in args.threads:
        torch.set_num_threads(threads)
        for width in args.widths:
            torch._dynamo.reset()
            torch.manual_seed(args.seed)
            x = torch.randn(args.tokens, args.d_model)
            target = torch.randn(args.tokens, args.d_model)
            print(f"\n-- {threads} thread(s), width {width}: building and compiling", flush=True)
            contenders = build_contenders(width, args, x, target)
            prepare(contenders, args)
            problems += check_same_loss(contenders)
            run_group(contenders, args)
            rows = group_records(contenders, threads, width, args)
            records += rows
            tables.append(format_group(rows))
            print(tables[-1], flush=True)
            del contenders
            meta.update(load_after=_uptime(), wall_s=round(time.time() - started, 1))
            # written after every group, so that an interrupted run keeps what it measured
            write_json(args.json, {"meta": meta, "results": records, "loss_disagreements": problems,
                                   "tables": tables})
    return {"meta": meta, "results": records, "loss_disagreements": problems, "tables": tables}


def write_json(path: str, result: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=1)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    result = run(args)
    for p in result["loss_disagreements"]:
        print(f"WARNING: {p}", file=sys.stderr)
    goals = [r for r in result["results"] if "goal_met" in r]
    if goals:
        print("\nGoals (tree overhead of the grouped and compiled forms):")
        for r in goals:
            print(f"  {r['threads']} thr W{r['width']} {r['name']:28s} {r['tree_overhead']:5.2f} "
                  f"(ideal {r['ideal_tree_overhead']:.2f}) <= {r['goal_tree_overhead']:.1f}: "
                  f"{'goal met' if r['goal_met'] else 'not met'}")
    write_json(args.json, result)
    m = result["meta"]
    print(f"\nload average before {m['load_before']}, after {m['load_after']}; {m['wall_s']} s; JSON: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
