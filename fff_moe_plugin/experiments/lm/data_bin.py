"""Text splits -> a fairseq data-bin with ``fairseq-preprocess``, word-level or sentencepiece-tokenised.

Word level is the standard for Penn Treebank perplexity (its text is already tokenised, 10k words with
``<unk>``); sentencepiece suits raw text such as WikiText-103 or enwik8 given as the user's own files.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from ...data import SPLITS, encode_file, train_sentencepiece, write_splits

TOKENIZERS = ("word", "sentencepiece")


def fairseq_command(tool: str) -> list[str]:
    """The command that runs a fairseq tool (``preprocess``, ``train``, ``eval_lm``, ...) in this Python."""
    return [sys.executable, "-m", f"fairseq_cli.{tool}"]


def make_data_bin(
    text: dict[str, str], out_dir: str | os.PathLike, tokenizer: str = "word", vocab_size: int = 8000,
    workers: int = 1,
) -> Path:
    """Write ``out_dir/data-bin`` (dict.txt and binarised splits) for ``text`` = {train, valid, test: str}.

    Returns the data-bin path. Raises ValueError for an unknown tokenizer or missing/empty splits before any
    work is done.
    """
    if tokenizer not in TOKENIZERS:
        raise ValueError(f"tokenizer {tokenizer!r} is not allowed: must be one of {', '.join(TOKENIZERS)}")
    if set(text) != set(SPLITS):
        raise ValueError(f"expected the splits {', '.join(SPLITS)}; got {', '.join(sorted(text))}")
    empty = [s for s in SPLITS if not text[s].strip()]
    if empty:
        raise ValueError(f"split(s) {', '.join(empty)} contain no text")
    if tokenizer == "sentencepiece" and vocab_size < 8:
        raise ValueError(f"vocab_size = {vocab_size} is not allowed: at least 8 is needed")
    out = Path(out_dir)
    raw = write_splits(text, out / "raw")
    if tokenizer == "sentencepiece":
        model = train_sentencepiece(raw["train"], out / "spm", vocab_size)
        pref = {s: encode_file(model, raw[s], out / "raw" / f"{s}.spm") for s in SPLITS}
    else:
        pref = raw
    dest = out / "data-bin"
    # with --only-source and no language suffix, fairseq-preprocess reads each prefix as the file itself
    cmd = fairseq_command("preprocess") + [
        "--only-source", "--destdir", str(dest), "--workers", str(workers),
        "--trainpref", str(pref["train"]), "--validpref", str(pref["valid"]), "--testpref", str(pref["test"]),
    ]
    done = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"fairseq-preprocess failed ({' '.join(cmd)}):\n{done.stderr[-3000:]}")
    return dest
