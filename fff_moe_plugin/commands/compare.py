"""``fff-moe compare``: dense, FFF, sigma-MoE and PKM language models at equal parameters, side by side.

Trains each with fairseq-train on Penn Treebank (word level by default), scores it with fairseq-eval-lm and
prints one table; writes it as Markdown and JSON, and a PNG plot, under ``--out``.
"""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="runs/compare", help="output folder (default runs/compare)")
    p.add_argument("--data", help="an existing fairseq data-bin (default: Penn Treebank, prepared under --out)")
    p.add_argument("--tokenizer", default="word", choices=("word", "sentencepiece"),
                   help="tokens of the prepared PTB data-bin (default word, the standard for PTB perplexity)")
    p.add_argument("--setting", default="ptb_tiny",
                   help="preset size: ptb_tiny (default, CPU minutes), wt103_small, wt103_big, enwik8")
    p.add_argument("--max-update", type=int, default=150,
                   help="training updates per model (default 150: about 12 minutes for all six on 2 CPU cores)")
    p.add_argument("--scale", type=float, default=1.0,
                   help="multiply the training updates (e.g. 10 for a longer, more telling run)")
    p.add_argument("--max-tokens", type=int, default=4096, help="tokens per batch (default 4096)")
    p.add_argument("--tokens-per-sample", type=int, default=128, help="context length (default 128)")
    p.add_argument("--lr", type=float, default=2e-3, help="peak Adam learning rate (default 2e-3)")
    p.add_argument("--fff-train-mode", default="hard", choices=("soft", "hard"),
                   help="FFF training forward (default hard: training computes exactly what inference does)")
    p.add_argument("--only", nargs="+", metavar="MODEL",
                   help="run only these of dense fff fff+lb fff+lb+master sigma_moe pkm")
    p.add_argument("--seed", type=int, default=1)


def run(args: argparse.Namespace) -> int:
    import time
    from pathlib import Path

    from ..integrations.fairseq import require_fairseq

    require_fairseq()
    from ..experiments.lm import comparison, report
    from ..integrations.fairseq.presets import SETTINGS

    if args.setting not in SETTINGS:
        raise ValueError(f"--setting {args.setting!r} is not allowed: must be one of {', '.join(SETTINGS)}")
    updates = round(args.max_update * args.scale)
    if updates < 1:
        raise ValueError(f"--max-update x --scale = {updates} is not allowed: at least 1 update is needed")
    setting = SETTINGS[args.setting]
    runs = comparison.default_runs(setting, args.fff_train_mode)
    if args.only:
        labels = [r.label for r in runs]
        unknown = [m for m in args.only if m not in labels]
        if unknown:
            raise ValueError(f"--only {' '.join(unknown)} is not allowed: choose from {' '.join(labels)}")
        runs = [r for r in runs if r.label in args.only]
    out = Path(args.out)
    start = time.time()
    if args.data:
        data = Path(args.data)
        if not (data / "dict.txt").is_file():
            raise ValueError(f"--data {data} is not a fairseq data-bin (no dict.txt)")
    else:
        data = out / f"ptb-{args.tokenizer}" / "data-bin"
        if not (data / "dict.txt").is_file():
            from ..data import penn_treebank
            from ..experiments.lm.data_bin import make_data_bin

            print(f"preparing Penn Treebank ({args.tokenizer} level) with fairseq-preprocess ...", flush=True)
            make_data_bin(penn_treebank(), data.parent, args.tokenizer)

    def say(line: str) -> None:
        print(line, flush=True)

    results = comparison.compare(runs, setting, data, out, updates, args.max_tokens, args.tokens_per_sample,
                                 args.lr, args.seed, say)
    context = {"setting": args.setting, "data": str(data), "updates per model": updates,
               "tokens per batch": args.max_tokens, "context": args.tokens_per_sample,
               "FFF training": args.fff_train_mode, "wall time (s)": round(time.time() - start)}
    paths = report.write(results, out, context)
    print()
    print(report.text_table(results))
    print()
    print("written: " + ", ".join(str(p) for p in paths.values()))
    return 0
