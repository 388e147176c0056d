"""Helpers shared by the test modules (not a test module): the repository's paths, the toy language-model corpus
and the fairseq flag tables that train on it, and DeepSpeed-style ranks started as separate processes. The toy
network the DeepSpeed tests replace blocks of is ``fff_moe_plugin.experiments.toy.ToyNet``."""

from __future__ import annotations

import contextlib
import json
import os
import random
import socket
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent  # the repository

# fairseq-train on the toy corpus: a 2-layer transformer of width 16, and each architecture family at that size
FAIRSEQ_TINY = ["--decoder-embed-dim", "16", "--decoder-layers", "2", "--decoder-attention-heads", "2",
                "--decoder-ffn-embed-dim", "32", "--decoder-normalize-before"]
FAIRSEQ_TRAIN = ["--task", "language_modeling", "--criterion", "cross_entropy_fff", "--optimizer", "adam", "--lr",
                 "0.01", "--tokens-per-sample", "16", "--sample-break-mode", "none", "--max-tokens", "256", "--seed",
                 "3", "--log-format", "json", "--log-interval", "1", "--num-workers", "0", "--disable-validation",
                 "--no-epoch-checkpoints"]
FAIRSEQ_ARCHS = {
    "fff": ["--arch", "transformer_lm_fff", "--fff-depth", "2", "--fff-leaf-width", "8", "--fff-hardening", "0.1",
            "--fff-load-balance", "leaf", "--fff-master-leaf"],
    "sigma_moe": ["--arch", "transformer_lm_sigma_moe", "--moe-n-experts", "4", "--moe-expert-size", "8",
                  "--moe-top-k", "2"],
    "pkm": ["--arch", "transformer_lm_pkm", "--pkm-n-keys", "4", "--pkm-knn", "4"],
}


def lm_text(n_lines: int, seed: int) -> str:
    """Sentences of a 13-word language ("the cat sees fish ."), one per line, drawn with ``seed``."""
    rng = random.Random(seed)
    subjects, verbs, objects = ["the cat", "a dog", "my bird"], ["sees", "likes", "eats"], ["fish", "a ball", "rice"]
    return "".join(f"{rng.choice(subjects)} {rng.choice(verbs)} {rng.choice(objects)} .\n" for _ in range(n_lines))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_rank_scripts(script: str, out: Path, args: list[str], world: int = 2, timeout: float = 400) -> list[dict]:
    """Run ``python script out *args`` as ``world`` ranks with the environment DeepSpeed's launcher gives (one
    thread each); each rank writes ``out/rank<r>.json``. Returns those, in rank order; fails the test with a
    rank's log when it wrote nothing."""
    port = free_port()
    procs = []
    for rank in range(world):
        env = dict(os.environ, DS_ACCELERATOR="cpu", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                   LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_SIZE=str(world), OMP_NUM_THREADS="1",
                   PYTHONPATH=os.pathsep.join([str(TESTS), *filter(None, [os.environ.get("PYTHONPATH")])]))
        log = open(out / f"rank{rank}.log", "w")
        procs.append((subprocess.Popen([sys.executable, script, str(out), *args], env=env, stdout=log,
                                       stderr=subprocess.STDOUT), log))
    try:
        for p, _ in procs:
            p.wait(timeout=timeout)
    finally:
        for p, log in procs:
            if p.poll() is None:
                p.kill()
            log.close()
    per_rank = []
    for rank in range(world):
        path = out / f"rank{rank}.json"
        if not path.exists():
            pytest.fail(f"rank {rank} wrote no results; log:\n{(out / f'rank{rank}.log').read_text()[-4000:]}")
        per_rank.append(json.loads(path.read_text()))
    return per_rank


def assert_ok(results: list[dict], name: str) -> None:
    """Every rank reported check ``name`` as "ok" (else its traceback is the message)."""
    for rank, r in enumerate(results):
        assert r.get(name) == "ok", f"rank {rank}, {name}:\n{r.get(name)}"


def assert_same_state(actual: dict, expected: dict, **tolerance) -> None:
    """Two state dicts hold the same keys, tensors equal within ``tolerance`` (torch.testing.assert_close's rtol and
    atol) and every other entry (a block's ``_extra_state`` config record) equal."""
    import torch

    assert actual.keys() == expected.keys(), sorted(set(actual) ^ set(expected))
    for key, value in expected.items():
        if torch.is_tensor(value):
            torch.testing.assert_close(actual[key], value, msg=key, **tolerance)
        else:
            assert actual[key] == value, key


def why_no_kernels() -> str | None:
    """Why the compiled CPU kernels cannot run here (switched off, or no compiler or ninja), else None. With the
    toolchain present a failing build fails the kernel tests instead of skipping them."""
    from fff_moe_plugin.ops import extension

    if extension.disabled():
        return f"{extension.DISABLE_ENV} is set: the compiled kernels are switched off"
    missing = extension._toolchain_missing()
    return f"the compiled kernels cannot be built here: {missing}" if missing else None


@contextlib.contextmanager
def kernel_calls():
    """Record the names of the compiled kernels run inside the block: every kernel call goes through
    ``inference._kernel``, and a function that declines the kernels runs its torch reference and records nothing."""
    from fff_moe_plugin.ops import inference

    calls: list[str] = []
    original = inference._kernel

    def counting(name):
        calls.append(name)
        return original(name)

    inference._kernel = counting
    try:
        yield calls
    finally:
        inference._kernel = original


def run_rank_checks(out_dir: str, checks: dict) -> None:
    """The rank side of :func:`run_rank_scripts`: on a gloo group made by ``deepspeed.init_distributed``, run each
    ``name -> callable(rank)`` (a callable may return a "skip: ..." string; other return values are ignored),
    record "ok", that string or the traceback, and write ``out_dir/rank<r>.json``; then end the process group."""
    import traceback

    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before deepspeed is imported
    import deepspeed
    import torch

    torch.set_num_threads(1)
    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    rank = torch.distributed.get_rank()
    results = {}
    for name, check in checks.items():
        try:
            out = check(rank)
            results[name] = out if isinstance(out, str) else "ok"
        except Exception:
            results[name] = traceback.format_exc()
        torch.distributed.barrier()
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()  # a gloo group alive at interpreter exit can abort the process
