"""Start N local CPU ranks of ``fairseq-train`` (one process per rank, gloo).

fairseq's own spawning and the torchrun path assume CUDA devices on a CPU machine, so each rank is started
as its own process with ``--distributed-no-spawn`` and an explicit rank, as FACTS.md records; ``legacy_ddp``
is used because PyTorch's DDP refuses ``device_ids`` on CPU modules (and it skips parameters tagged
``param.expert = True`` in its all-reduce). ``--load-checkpoint-on-all-dp-ranks`` is added unless given: fairseq
0.12 otherwise broadcasts the checkpoint rank 0 read and unpickles it with ``torch.load``'s weights-only default
(torch >= 2.6), which refuses the DictConfig in it, so a resumed multi-rank run would fail. Unless the
environment sets ``OMP_NUM_THREADS``, each rank gets ``cores // ranks`` threads (as torchrun does): every rank
using every core makes the ranks fight over the cores and slows training down several-fold.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
from pathlib import Path

from .data_bin import fairseq_command

# flags this launcher sets itself; giving them as well would contradict it
OWN_FLAGS = ("--distributed-world-size", "--distributed-rank", "--distributed-init-method", "--distributed-no-spawn",
             "--distributed-backend", "--device-id", "--ddp-backend", "--cpu")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_commands(train_args: list[str], nprocs: int, port: int) -> list[list[str]]:
    """The ``fairseq-train`` command line of each rank."""
    if nprocs < 1:
        raise ValueError(f"nprocs = {nprocs} is not allowed: at least 1 process is needed")
    clash = [a.split("=")[0] for a in train_args if a.split("=")[0] in OWN_FLAGS]
    if clash:
        raise ValueError(f"{', '.join(clash)} are set by the launcher: leave them out of the fairseq-train arguments")
    common = ["--cpu", "--distributed-world-size", str(nprocs), "--distributed-backend", "gloo",
              "--distributed-init-method", f"tcp://127.0.0.1:{port}", "--distributed-no-spawn", "--device-id", "0",
              "--ddp-backend", "legacy_ddp"]
    if "--load-checkpoint-on-all-dp-ranks" not in train_args:
        common.append("--load-checkpoint-on-all-dp-ranks")
    return [fairseq_command("train") + list(train_args) + common + ["--distributed-rank", str(r)]
            for r in range(nprocs)]


def rank_environment(nprocs: int) -> dict[str, str]:
    """This process's environment, with ``OMP_NUM_THREADS`` = cores // ranks (at least 1) unless it is set."""
    env = dict(os.environ)
    if "OMP_NUM_THREADS" not in env:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        env["OMP_NUM_THREADS"] = str(max(1, cores // max(1, nprocs)))
    return env


def run_ranks(train_args: list[str], nprocs: int, log_dir: str | None = None, port: int | None = None) -> int:
    """Run the ranks to completion; rank 0 writes to this process's output, rank r > 0 to ``log_dir/rank<r>.log``
    (discarded without ``log_dir``). Returns the first non-zero exit code, else 0; if one rank fails the others
    are stopped."""
    cmds = rank_commands(train_args, nprocs, port or free_port())
    env = rank_environment(nprocs)
    logs = []
    procs = []
    try:
        for r, cmd in enumerate(cmds):
            if r == 0:
                out = None
            elif log_dir is not None:
                Path(log_dir).mkdir(parents=True, exist_ok=True)
                out = open(Path(log_dir) / f"rank{r}.log", "w")
                logs.append(out)
            else:
                out = subprocess.DEVNULL
            procs.append(subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT if r else None, env=env))
        codes = _wait_all(procs)
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
        for f in logs:
            f.close()
    return next((c for c in codes if c != 0), 0)


def _wait_all(procs: list[subprocess.Popen]) -> list[int]:
    while True:
        codes = [p.poll() for p in procs]
        failed = [c for c in codes if c not in (None, 0)]
        if failed:  # a dead rank leaves the others waiting in a collective forever
            for p in procs:
                if p.poll() is None:
                    p.terminate()
            return [p.wait() for p in procs]
        if all(c is not None for c in codes):
            return codes
        time.sleep(0.5)
