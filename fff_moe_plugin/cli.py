"""The ``fff-moe`` command: chores around the layers (parameter matching, data, benchmarks, comparison).

Each sub-command lives in its own module under ``fff_moe_plugin.commands`` with two functions,
``add_arguments(parser)`` and ``run(args) -> int``; heavy imports happen inside ``run``.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# sub-command name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "match": ("match", "print parameter-equal dense, FFF, sigma-MoE and PKM configs and their counts"),
    "bench": ("bench", "inference speed of FFF layers against a dense block of the same training width"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fff-moe", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        importlib.import_module(f"fff_moe_plugin.commands.{module}").add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    module = importlib.import_module(f"fff_moe_plugin.commands.{COMMANDS[args.command][0]}")
    return int(module.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
