"""The Python parts of benchmarks/gpu_check.sh: what the shell script cannot measure itself. Every part writes JSON.

    python benchmarks/gpu_check.py env --json env.json                    # torch, CUDA, GPUs, grouped_mm, frameworks
    python benchmarks/gpu_check.py grouped --device cuda --json g.json    # grouped_mm: runs? equals a loop? speed
    python benchmarks/gpu_check.py deepspeed --device cuda --out DIR      # FFFMoE at ep_size 2 on 2 ranks

``grouped`` checks, per dtype (float32, bfloat16): that grouped_mm runs in both forms the package calls it in
(``[A, k] x [E, k, n]`` for the forward and ``[k, A] x [A, n] -> [E, k, n]`` for the weight gradient), on group
sizes that are multiples of 16 and on ragged ones with empty groups, and equals a per-group loop; that the
package's ``grouped_mlp`` takes the grouped path and equals ``grouped_mlp_loop`` in outputs and gradients; and
times, for 4096 tokens, the grouped expert MLP (one expert per token) against the per-expert loop and the dense
MLP of the same total width, and an FFF layer against the dense block. Exit status 1 when a check fails.

``deepspeed`` starts 2 ranks (NCCL on CUDA, gloo on the CPU) that check FFFMoE at ep_size 2 against the core FFF
with the same weights and train a small model through ``fff_moe_plugin.deepspeed.initialize`` for a few steps.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2}


# -- env ------------------------------------------------------------------------------------------------------
def grouped_mm_function() -> tuple[str | None, object]:
    """The grouped_mm entry point this torch has, found by feature: the public name, then the private one."""
    fn = getattr(F, "grouped_mm", None)
    if fn is not None:
        return "torch.nn.functional.grouped_mm", fn
    fn = getattr(torch, "_grouped_mm", None)
    return ("torch._grouped_mm", fn) if fn is not None else (None, None)


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def env_info() -> dict:
    name, _ = grouped_mm_function()
    gpus = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            gpus.append({"name": p.name, "capability": f"{p.major}.{p.minor}", "memory_gib": p.total_memory / 2**30})
    return {
        "python": sys.version.split()[0], "torch": torch.__version__, "cuda_runtime": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(), "gpus": gpus, "grouped_mm": name,
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
        "frameworks": {m: _importable(m) for m in ("deepspeed", "fairseq", "fastfeedforward", "tutel", "triton")},
    }


# -- grouped ----------------------------------------------------------------------------------------------------
def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def median_ms(fn, device: str, reps: int, warmup: int) -> float:
    """Median wall time of ``fn()`` in milliseconds, the device synchronised around each call."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        _sync(device)
        t = time.perf_counter()
        fn()
        _sync(device)
        times.append(1000 * (time.perf_counter() - t))
    return statistics.median(times)


def _group_sizes(kind: str, A: int, E: int, g: torch.Generator) -> list[int]:
    if kind == "aligned":  # multiples of 16, one group empty
        sizes = [16 * int(v) for v in torch.randint(1, 6, (E,), generator=g)]
        sizes[E // 2] = 0
        return sizes
    # ragged: random sizes summing to A, the first and another group empty
    cuts = sorted(torch.randint(0, A + 1, (E - 1,), generator=g).tolist())
    sizes = [b - a for a, b in zip([0] + cuts, cuts + [A])]
    sizes[0], sizes[-1] = 0, sizes[-1] + sizes[0]
    return sizes


def check_raw(fn, device: str, dtype: torch.dtype, kind: str) -> list[dict]:
    """grouped_mm in the two forms the package calls, against a per-group loop in float64."""
    g = torch.Generator().manual_seed(0)
    E, k, n = 8, 64, 48
    sizes = _group_sizes(kind, 203, E, g)
    A = sum(sizes)
    offs = torch.tensor(sizes, dtype=torch.long).cumsum(0).to(device, torch.int32)
    a = torch.randn(A, k, generator=g).to(device, dtype)
    b = torch.randn(E, k, n, generator=g).to(device, dtype)
    grad = torch.randn(A, n, generator=g).to(device, dtype)
    rows = []
    spans = _spans(sizes)
    forms = {
        "2d x 3d (forward)": (
            lambda: fn(a, b, offs=offs),
            lambda: torch.cat([a[s:e].double() @ b[i].double() for i, (s, e) in enumerate(spans)])),
        "2d x 2d, transposed a (weight gradient)": (
            lambda: fn(a.t(), grad, offs=offs),
            lambda: torch.stack([a[s:e].double().t() @ grad[s:e].double() for s, e in spans])),
    }
    for form, (run, loop) in forms.items():
        row = {"form": form, "dtype": str(dtype).replace("torch.", ""), "groups": kind, "sizes": sizes}
        try:
            out = run()
            _sync(device)
            ref = loop()
            err = (out.double() - ref).abs().max().item() / max(1.0, ref.abs().max().item())
            row.update(runs=True, max_rel_err=err, ok=bool(err <= TOL[dtype]))
        except Exception as e:  # a missing kernel or a refused layout is a result, not a crash
            row.update(runs=False, error=f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300]}", ok=False)
        rows.append(row)
    return rows


def _spans(sizes: list[int]) -> list[tuple[int, int]]:
    out, s = [], 0
    for n in sizes:
        out.append((s, s + n))
        s += n
    return out


def check_package(device: str, dtype: torch.dtype) -> dict:
    """The package's grouped_mlp (forward and backward) against its per-expert loop, on ragged groups."""
    from fff_moe_plugin.ops import grouped

    g = torch.Generator().manual_seed(1)
    S, E, d, h, o = 333, 8, 40, 24, 40  # 40 and 24 bfloat16 columns are padded to 16-byte rows
    x = torch.randn(S, d, generator=g)
    w1, b1 = torch.randn(E, d, h, generator=g) / d**0.5, torch.randn(E, h, generator=g)
    w2, b2 = torch.randn(E, h, o, generator=g) / h**0.5, torch.randn(E, o, generator=g)
    gate = torch.rand(S, generator=g)
    expert = torch.randint(0, E - 1, (S,), generator=g)  # the last expert empty
    up = torch.randn(S, o, generator=g)
    token = torch.arange(S)
    results = {}
    for name, fn in (("grouped_mlp", grouped.grouped_mlp), ("loop", grouped.grouped_mlp_loop)):
        leaves = [t.to(device, dtype).requires_grad_() for t in (x, gate, w1, b1, w2, b2)]
        xd, gd, w1d, b1d, w2d, b2d = leaves
        grouped.last_path = None
        out = fn(xd, token.to(device), expert.to(device), gd, w1d, b1d, w2d, b2d, F.gelu)
        path = grouped.last_path
        grads = torch.autograd.grad(out, leaves, up.to(device, dtype))
        results[name] = (out.detach().double().cpu(), [t.double().cpu() for t in grads], path)
    (out, grads, path), (ref, ref_grads, _) = results["grouped_mlp"], results["loop"]
    err = (out - ref).abs().max().item() / max(1.0, ref.abs().max().item())
    grad_err = max((a - b).abs().max().item() / max(1.0, b.abs().max().item()) for a, b in zip(grads, ref_grads))
    tol = TOL[dtype] * (2 if dtype == torch.bfloat16 else 1)
    return {"dtype": str(dtype).replace("torch.", ""), "path": path, "max_rel_err_output": err,
            "max_rel_err_gradients": grad_err, "ok": bool(path == "grouped" and err <= tol and grad_err <= tol)}


def speed(device: str, dtype: torch.dtype, tokens: int, d: int, experts: int, reps: int, warmup: int) -> list[dict]:
    """Milliseconds of the grouped expert MLP, its loop and the dense MLP of the same total width, forward and
    forward + backward; and of an FFF layer against the dense block (eval forward, training step)."""
    from fff_moe_plugin import FFF, DenseConfig, DenseFFN, FFFConfig
    from fff_moe_plugin.ops import grouped

    h = 4 * d // experts
    g = torch.Generator().manual_seed(2)
    x = torch.randn(tokens, d, generator=g).to(device, dtype)
    w1 = (torch.randn(experts, d, h, generator=g) / d**0.5).to(device, dtype).requires_grad_()
    w2 = (torch.randn(experts, h, d, generator=g) / h**0.5).to(device, dtype).requires_grad_()
    dense1 = w1.detach().permute(1, 0, 2).reshape(d, experts * h).clone().requires_grad_()
    dense2 = w2.detach().reshape(experts * h, d).clone().requires_grad_()
    token = torch.arange(tokens, device=device)
    expert = torch.randint(0, experts, (tokens,), generator=g).to(device)

    def run_grouped():
        return grouped.grouped_mlp(x, token, expert, None, w1, None, w2, None, F.gelu)

    def run_loop():
        return grouped.grouped_mlp_loop(x, token, expert, None, w1, None, w2, None, F.gelu)

    def run_dense():
        return F.gelu(x @ dense1) @ dense2

    rows = []
    dt = str(dtype).replace("torch.", "")
    for name, fn in (("grouped expert MLP", run_grouped), ("per-expert loop", run_loop), ("dense MLP", run_dense)):
        with torch.no_grad():
            fwd = median_ms(fn, device, reps, warmup)
        bwd = median_ms(lambda fn=fn: fn().float().square().mean().backward(), device, reps, warmup)
        rows.append({"what": name, "dtype": dt, "tokens": tokens, "d_model": d, "experts": experts, "expert_width": h,
                     "forward_ms": fwd, "forward_backward_ms": bwd})
    run_grouped()
    rows[0]["path"] = grouped.last_path

    depth = (experts - 1).bit_length()
    fff = FFF(FFFConfig(d_model=d, leaf_width=4 * d // 2**depth, depth=depth, train_mode="hard")).to(device, dtype)
    dense = DenseFFN(DenseConfig(d_model=d, d_ff=4 * d, activation="gelu")).to(device, dtype)
    for name, layer in ((f"FFF depth {depth}", fff), ("DenseFFN", dense)):
        with torch.no_grad():
            ev = median_ms(lambda layer=layer: layer.eval()(x), device, reps, warmup)
        layer.train()

        def step(layer=layer):
            out = layer(x)
            (out.output.float().square().mean() + out.aux_loss).backward()

        tr = median_ms(step, device, reps, warmup)
        rows.append({"what": name, "dtype": dt, "tokens": tokens, "d_model": d, "eval_forward_ms": ev,
                     "train_step_ms": tr})
    return rows


def cmd_grouped(args) -> int:
    from fff_moe_plugin.ops import grouped

    name, fn = grouped_mm_function()
    device = args.device
    report = {"env": env_info(), "device": device, "grouped_mm": name, "raw": [], "package": [], "speed": [],
              "errors": []}
    dtypes = [torch.float32, torch.bfloat16]
    for dtype in dtypes:
        report.setdefault("available", {})[str(dtype).replace("torch.", "")] = grouped.grouped_mm_available(
            torch.device(device), dtype)
        if fn is not None:
            for kind in ("aligned", "ragged"):
                report["raw"] += check_raw(fn, device, dtype, kind)
        try:
            report["package"].append(check_package(device, dtype))
        except Exception:
            report["errors"].append(traceback.format_exc())
    if not args.no_speed:
        for dtype in dtypes:
            try:
                report["speed"] += speed(device, dtype, args.tokens, args.d_model, args.experts, args.reps, args.warmup)
            except Exception:
                report["errors"].append(traceback.format_exc())
    checks = report["raw"] + report["package"]
    report["ok"] = bool(name is not None and checks and all(c["ok"] for c in checks) and not report["errors"])
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=2))
    print(f"grouped_mm: {name or 'absent'} on {device}")
    for c in report["raw"]:
        res = f"max rel err {c['max_rel_err']:.1e}" if c["runs"] else c["error"]
        print(f"  {c['dtype']:8s} {c['form']:40s} {c['groups']:8s} {'ok' if c['ok'] else 'FAIL'}  {res}")
    for c in report["package"]:
        print(f"  grouped_mlp {c['dtype']:8s} path {c['path']}, max rel err output {c['max_rel_err_output']:.1e}, "
              f"gradients {c['max_rel_err_gradients']:.1e}  {'ok' if c['ok'] else 'FAIL'}")
    for r in report["speed"]:
        if "forward_ms" in r:
            print(f"  {r['what']:20s} {r['dtype']:8s} forward {r['forward_ms']:8.3f} ms  forward+backward "
                  f"{r['forward_backward_ms']:8.3f} ms")
        else:
            print(f"  {r['what']:20s} {r['dtype']:8s} eval {r['eval_forward_ms']:8.3f} ms  training step "
                  f"{r['train_step_ms']:8.3f} ms")
    for e in report["errors"]:
        print(e, file=sys.stderr)
    print(f"{'all checks passed' if report['ok'] else 'SOME CHECKS FAILED'}; wrote {args.json}")
    return 0 if report["ok"] else 1


# -- deepspeed ----------------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cmd_deepspeed(args) -> int:
    """Start 2 ranks of this script's ``deepspeed-rank`` part and gather what they wrote."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    port, world, procs = _free_port(), 2, []
    for rank in range(world):
        env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                   WORLD_SIZE=str(world), LOCAL_SIZE=str(world),
                   DS_ACCELERATOR="cuda" if args.device == "cuda" else "cpu", OMP_NUM_THREADS="1")
        log = open(out / f"deepspeed_rank{rank}.log", "w")
        cmd = [sys.executable, __file__, "deepspeed-rank", "--device", args.device, "--out", str(out),
               "--steps", str(args.steps)]
        procs.append((subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT), log))
    try:
        for p, _ in procs:
            p.wait(timeout=args.timeout)
    except subprocess.TimeoutExpired:
        print(f"the ranks did not finish within {args.timeout} s", file=sys.stderr)
    finally:
        for p, log in procs:
            if p.poll() is None:
                p.kill()
            log.close()
    results = []
    for rank in range(world):
        path = out / f"deepspeed_rank{rank}.json"
        results.append(json.loads(path.read_text()) if path.exists() else {"rank": rank, "ok": False,
                                                                           "error": "wrote nothing; see its log"})
    ok = all(r.get("ok") for r in results)
    summary = {"device": args.device, "ep_size": 2, "ok": ok, "ranks": results}
    (out / "deepspeed_ep2.json").write_text(json.dumps(summary, indent=2))
    for r in results:
        print(f"  rank {r.get('rank')}: {'ok' if r.get('ok') else 'FAIL'} "
              + ", ".join(f"{k} {v}" for k, v in r.items() if k not in ("rank", "ok", "traceback")))
        if r.get("traceback"):
            print(r["traceback"], file=sys.stderr)
    print(f"{'ep_size 2 checks passed' if ok else 'ep_size 2 CHECKS FAILED'}; wrote {out / 'deepspeed_ep2.json'}")
    return 0 if ok else 1


def cmd_deepspeed_rank(args) -> int:
    import deepspeed
    from bench_deepspeed import _model as deepspeed_model  # the DeepSpeed benchmark's model, beside this script

    from fff_moe_plugin import FFF, FFFConfig
    from fff_moe_plugin.deepspeed import aux_loss, initialize
    from fff_moe_plugin.integrations.deepspeed import FFFMoE

    rank = int(os.environ["RANK"])
    result: dict = {"rank": rank}
    try:
        cuda = args.device == "cuda"
        if cuda:
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
        deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", verbose=False)
        world = torch.distributed.get_world_size()

        # 1. one FFFMoE layer at ep_size 2 equals the core FFF with the same weights (nothing dropped)
        torch.manual_seed(0)  # the same tree on every rank
        core = FFF(FFFConfig(d_model=64, leaf_width=32, depth=3, train_mode="hard", master_leaf=True)).to(device)
        moe = FFFMoE.from_fff(core, ep_size=2, capacity_factor=100.0, eval_capacity_factor=100.0)
        moe.set_deepspeed_parallelism()
        moe.to(device).eval()
        core.eval()
        x = torch.randn(256, 64, generator=torch.Generator().manual_seed(rank)).to(device)  # each rank its own tokens
        with torch.no_grad():
            err = (moe.forward_block(x).output - core(x).output).abs().max().item()
        result["ep2_vs_core_max_abs_err"] = err

        # 2. a few training steps of a 2-block model whose feedforwards become FFFMoE at ep_size 2
        d = 128
        config = {"train_micro_batch_size_per_gpu": 8, "steps_per_print": 10**9,
                  "optimizer": {"type": "Adam", "params": {"lr": 1e-3, "torch_adam": True}},
                  "zero_optimization": {"stage": 0},
                  "fff_moe": {"depth": 3, "leaf_width": 64, "ep_size": 2, "replace": "*.mlp", "capacity_factor": 1.25}}
        engine, *_ = initialize(model=deepspeed_model(d, 2).to(device), config=config, verbose=False)
        g = torch.Generator().manual_seed(100 + rank)
        xb, yb = torch.randn(8, 64, d, generator=g).to(device), torch.randn(8, 64, d, generator=g).to(device)
        losses, times = [], []
        for _ in range(args.steps):
            if cuda:
                torch.cuda.synchronize()
            t = time.perf_counter()
            loss = F.mse_loss(engine(xb), yb) + aux_loss(engine)
            engine.backward(loss)
            engine.step()
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
            losses.append(loss.item())
        step_s = statistics.median(times[2:] or times)
        result.update(first_loss=losses[0], last_loss=losses[-1], median_step_ms=1000 * step_s,
                      tokens_per_s=8 * 64 * world / step_s)
        result["ok"] = bool(err < 1e-4 and all(map(lambda v: v == v and abs(v) < float("inf"), losses))
                            and losses[-1] < losses[0])
        torch.distributed.barrier()
    except Exception:
        result.update(ok=False, traceback=traceback.format_exc())
    Path(args.out, f"deepspeed_rank{rank}.json").write_text(json.dumps(result, indent=2))
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return 0 if result.get("ok") else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("env", help="torch, CUDA, GPUs, grouped_mm and the optional frameworks, as JSON")
    p.add_argument("--json", default=None, help="write here (default: print)")
    p = sub.add_parser("grouped", help="grouped_mm and the package's grouped path: correctness and speed")
    p.add_argument("--device", default="cuda")
    p.add_argument("--json", default="gpu_check_results/grouped_mm.json")
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--d-model", type=int, default=1024)
    p.add_argument("--experts", type=int, default=16, help="experts (leaves); each is 4 * d_model / experts wide")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--no-speed", action="store_true", help="correctness only")
    for name in ("deepspeed", "deepspeed-rank"):
        p = sub.add_parser(name, help="FFFMoE at ep_size 2 on 2 ranks" if name == "deepspeed" else argparse.SUPPRESS)
        p.add_argument("--device", default="cuda")
        p.add_argument("--out", default="gpu_check_results")
        p.add_argument("--steps", type=int, default=10)
        p.add_argument("--timeout", type=float, default=150.0, help="seconds the ranks get")
    args = parser.parse_args(argv)
    if args.cmd == "env":
        text = json.dumps(env_info(), indent=2)
        if args.json:
            Path(args.json).write_text(text)
        print(text)
        return 0
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(f"no CUDA device here (torch {torch.__version__}); use --device cpu", file=sys.stderr)
        return 2
    return {"grouped": cmd_grouped, "deepspeed": cmd_deepspeed, "deepspeed-rank": cmd_deepspeed_rank}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
