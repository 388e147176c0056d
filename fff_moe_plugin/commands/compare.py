"""``fff-moe compare``: dense, FFF, sigma-MoE and PKM language models side by side, at equal parameters and at
equal active compute.

Trains each model with fairseq-train on Penn Treebank (a 1k sentencepiece vocabulary by default, so that the
feedforward blocks are half the model), records its validation curve, scores it with fairseq-eval-lm, and prints
one table per group with mean ± std over the seeds, the rankings and what they say; writes them as Markdown and
JSON, and a PNG of the curves, under ``--out``. Every (model, seed) piece is resumable, and pieces run
separately into one ``--out`` fold into one table.
"""

from __future__ import annotations

import argparse

DEFAULT_UPDATES = 160


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="runs/compare", help="output folder (default runs/compare)")
    p.add_argument("--data", help="an existing fairseq data-bin (default: Penn Treebank, prepared under --out)")
    p.add_argument("--tokenizer", choices=("word", "sentencepiece"),
                   help="tokens of the prepared PTB data-bin (default sentencepiece: with word-level PTB's 10k "
                        "words the embeddings hold most parameters and the feedforward blocks hardly matter)")
    p.add_argument("--vocab-size", type=int, help="sentencepiece vocabulary size (default 1024)")
    p.add_argument("--setting", default="ptb_small",
                   help="preset size: ptb_small (default, CPU minutes, tied embeddings), ptb_tiny, wt103_small, "
                        "wt103_big, enwik8")
    p.add_argument("--max-update", type=int, default=DEFAULT_UPDATES,
                   help=f"training updates per model (default {DEFAULT_UPDATES}: about 12 minutes for the ten "
                        "models on 2 CPU cores)")
    p.add_argument("--scale", type=float, default=1.0,
                   help="multiply the training updates (e.g. 10 for the longer run that checks the ranking)")
    p.add_argument("--seeds", type=int, default=1, help="run seeds 1..N and report mean ± std (default 1)")
    p.add_argument("--seed", type=int, help="run only this seed (a piece of a --seeds run)")
    p.add_argument("--only", nargs="+", metavar="MODEL",
                   help="run only these models, in this order (see --list); the table still shows every finished "
                        "piece in --out")
    p.add_argument("--list", action="store_true", help="list the models and their blocks, and exit")
    p.add_argument("--valid-points", type=int, default=10,
                   help="validations per run, evenly spaced, each with a checkpoint to resume from (default 10)")
    p.add_argument("--max-tokens", type=int, default=4096, help="tokens per batch (default 4096)")
    p.add_argument("--tokens-per-sample", type=int, default=128, help="context length (default 128)")
    p.add_argument("--lr", type=float, default=2e-3, help="peak Adam learning rate (default 2e-3)")
    p.add_argument("--fff-train-mode", default="hard", choices=("soft", "hard"),
                   help="FFF training forward (default hard: training computes exactly what inference does)")
    p.add_argument("--balance-coef", type=float, default=0.01,
                   help="weight of the leaf balancing loss in the +lb models (default 0.01)")
    p.add_argument("--bias-update-rate", type=float, default=0.01,
                   help="bias balancing's update rate in fff+bias (default 0.01)")
    p.add_argument("--forest-trees", type=int, default=4, help="trees of the forest models (default 4)")


def _positive(**values: int) -> None:
    for name, v in values.items():
        if v < 1:
            raise ValueError(f"--{name.replace('_', '-')} {v} is not allowed: at least 1")


def run(args: argparse.Namespace) -> int:
    import time
    from pathlib import Path

    from ..integrations.fairseq import require_fairseq

    require_fairseq()
    from ..experiments.lm import comparison, report
    from ..integrations.fairseq.presets import SETTINGS

    if args.setting not in SETTINGS:
        raise ValueError(f"--setting {args.setting!r} is not allowed: must be one of {', '.join(SETTINGS)}")
    if args.data and (args.tokenizer or args.vocab_size):
        raise ValueError("--tokenizer and --vocab-size prepare Penn Treebank, so they cannot go with --data (an "
                         "existing data-bin keeps its own tokens)")
    if args.tokenizer == "word" and args.vocab_size:
        raise ValueError(f"--vocab-size {args.vocab_size} is not allowed with --tokenizer word: it sizes the "
                         "sentencepiece vocabulary")
    args.tokenizer = args.tokenizer or "sentencepiece"
    args.vocab_size = args.vocab_size or 1024
    _positive(seeds=args.seeds, valid_points=args.valid_points, max_tokens=args.max_tokens,
              tokens_per_sample=args.tokens_per_sample, forest_trees=args.forest_trees, vocab_size=args.vocab_size)
    if args.seed is not None and args.seed < 1:
        raise ValueError(f"--seed {args.seed} is not allowed: seeds count from 1")
    if args.seed is not None and args.seeds != 1:
        raise ValueError(f"--seed {args.seed} and --seeds {args.seeds} cannot go together: --seeds N runs seeds "
                         "1..N, --seed K only seed K")
    for name in ("lr", "balance_coef", "bias_update_rate"):
        if getattr(args, name) <= 0:
            raise ValueError(f"--{name.replace('_', '-')} {getattr(args, name)} is not allowed: must be > 0")
    updates = round(args.max_update * args.scale)
    if updates < 1:
        raise ValueError(f"--max-update x --scale = {updates} is not allowed: at least 1 update is needed")
    setting = SETTINGS[args.setting]
    kw = {"fff_train_mode": args.fff_train_mode, "balance_coef": args.balance_coef}
    runs = comparison.default_runs(setting, bias_rate=args.bias_update_rate, forest_trees=args.forest_trees, **kw)
    everything = runs + comparison.extra_runs(setting, updates, bias_rate=args.bias_update_rate,
                                              forest_trees=args.forest_trees, **kw)
    if args.fff_train_mode == "soft":
        print(f"note: {comparison.SOFT_NOTE}", flush=True)
    if args.list:
        for r in everything:
            extra = "" if r in runs else "  (only with --only)"
            print(f"{r.label:18s} {100 * r.block.fraction_used_per_token():5.1f}% read  {', '.join(r.groups)}: "
                  f"{r.description}{extra}")
        return 0
    chosen = runs
    if args.only:
        labels = [r.label for r in everything]
        unknown = [m for m in args.only if m not in labels]
        if unknown:
            raise ValueError(f"--only {' '.join(unknown)} is not allowed: choose from {' '.join(labels)}")
        by_label = {r.label: r for r in everything}
        chosen = [by_label[m] for m in dict.fromkeys(args.only)]  # in the order given
    seeds = [args.seed] if args.seed is not None else list(range(1, args.seeds + 1))

    out = Path(args.out)
    if args.data:
        data = Path(args.data)
        if not (data / "dict.txt").is_file():
            raise ValueError(f"--data {data} is not a fairseq data-bin (no dict.txt)")
        source = {"data": str(data.resolve())}
    else:
        name = "ptb-word" if args.tokenizer == "word" else f"ptb-sentencepiece{args.vocab_size}"
        data = out / name / "data-bin"
        source = {"data": f"Penn Treebank, {args.tokenizer}" +
                          ("" if args.tokenizer == "word" else f" {args.vocab_size}")}
    context = {"setting": args.setting, **source, "updates per model": updates, "tokens per batch": args.max_tokens,
               "context": args.tokens_per_sample, "peak lr": args.lr, "FFF training": args.fff_train_mode,
               "validations per run": args.valid_points, "balance loss": args.balance_coef,
               "bias update rate": args.bias_update_rate, "forest trees": args.forest_trees}
    comparison.check_context(out, context)  # before any work: pieces of other settings cannot mix
    start = time.time()
    if not args.data and not (data / "dict.txt").is_file():
        from ..data import penn_treebank
        from ..experiments.lm.data_bin import make_data_bin

        print(f"preparing Penn Treebank ({source['data']}) with fairseq-preprocess ...", flush=True)
        make_data_bin(penn_treebank(), data.parent, args.tokenizer, args.vocab_size)

    def say(line: str) -> None:
        print(line, flush=True)

    schedule = comparison.Schedule(updates, args.max_tokens, args.tokens_per_sample, args.lr, args.valid_points)
    comparison.compare(chosen, setting, data, out, schedule, seeds, say)
    summaries = report.summarise(comparison.collect(out, everything), everything)
    shown = {**context, "wall time of the pieces shown (s)": round(sum(s.wall_s for s in summaries)),
             "this call (s)": round(time.time() - start)}
    notes = report.findings(summaries) + [report.against_reference(summaries, context)]
    paths = report.write(summaries, out, shown, notes)
    print()
    print(report.text_table(summaries))
    print()
    for line in notes:
        print(line)
    print()
    print("written: " + ", ".join(str(p) for p in paths.values()))
    return 0
