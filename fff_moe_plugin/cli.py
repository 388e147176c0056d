"""The ``fff-moe`` command: chores around the layers (parameter matching, data, benchmarks, comparison).

Each sub-command lives in its own module under ``fff_moe_plugin.commands`` with two functions,
``add_arguments(parser)`` and ``run(args) -> int``; heavy imports happen inside ``run``.
Bad input ends with one line naming the problem and exit code 2 (FFF_MOE_TRACEBACK=1 shows the traceback).
"""

from __future__ import annotations

import argparse
import importlib
import math
import os
import sys

# sub-command name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "match": ("match", "print parameter-equal dense, FFF, sigma-MoE and PKM configs and their counts"),
    "user-dir": ("user_dir", "print the fairseq --user-dir folder of the plugin"),
    "prepare-ptb": ("prepare_ptb", "Penn Treebank (or your own text files) as a fairseq data-bin"),
    "compare": ("compare", "train and evaluate dense, FFF, sigma-MoE and PKM language models side by side"),
    "cpu-ranks": ("cpu_ranks", "start N local CPU ranks of fairseq-train (gloo)"),
    "bench": ("bench", "inference speed of FFF layers against a dense block of the same training width"),
    "repro-efff": ("repro_efff", "reproduce the eFFF load-balancing and master-leaf tables (Fashion-MNIST, MNIST)"),
}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The parser; with ``only``, just that sub-command's module is imported for its arguments."""
    parser = argparse.ArgumentParser(prog="fff-moe", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if only is None or only == name:
            importlib.import_module(f"fff_moe_plugin.commands.{module}").add_arguments(p)
    return parser


def check_finite(args: argparse.Namespace) -> None:
    """Refuse NaN and +-inf in every float option of every sub-command (argparse's ``type=float`` takes them)."""
    for dest, value in vars(args).items():
        values = value if isinstance(value, (list, tuple)) else [value]
        bad = [v for v in values if isinstance(v, float) and not math.isfinite(v)]
        if bad:
            flag = "--" + dest.replace("_", "-")
            raise ValueError(f"{flag} {bad[0]} is not allowed: must be a finite number")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    chosen = next((a for a in argv if not a.startswith("-")), None)
    # import only the chosen sub-command (none for --help): one broken optional extra cannot break the rest
    args = build_parser(chosen if chosen in COMMANDS else "").parse_args(argv)
    module = importlib.import_module(f"fff_moe_plugin.commands.{COMMANDS[args.command][0]}")
    try:
        check_finite(args)
        return int(module.run(args) or 0)
    except (ValueError, FileNotFoundError, ImportError) as e:
        # bad input and missing extras: the message says what was wrong and what to do
        if os.environ.get("FFF_MOE_TRACEBACK"):
            raise
        print(f"fff-moe {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
