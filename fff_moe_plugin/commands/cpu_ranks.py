"""``fff-moe cpu-ranks``: start N local CPU ranks of fairseq-train (gloo, one process per rank)."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("-n", "--nprocs", type=int, default=2, help="number of ranks (default 2)")
    p.add_argument("--log-dir", help="folder for the logs of ranks 1..N-1 (rank 0 prints here)")
    p.add_argument("train_args", nargs=argparse.REMAINDER,
                   help="fairseq-train arguments after '--' (data-bin, --user-dir, --arch, ...)")


def run(args: argparse.Namespace) -> int:
    from ..experiments.lm.launch import run_ranks
    from ..integrations.fairseq import require_fairseq

    train_args = args.train_args[1:] if args.train_args[:1] == ["--"] else args.train_args
    if not train_args:
        raise ValueError("give the fairseq-train arguments after '--'")
    require_fairseq()
    return run_ranks(train_args, args.nprocs, args.log_dir)
