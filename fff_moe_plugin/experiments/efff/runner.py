"""The reproduction driver: grids of (dataset, setting, variant, seed) runs, resumable, with progress.

Each finished run is appended as one JSON line to ``<out>/runs.jsonl``; a restarted reproduction with the
same schedule skips the runs already there (a run is the unit of resumption: one takes seconds to a
minute). Seeds are the outer loop (then grids, settings, variants), so an interrupted reproduction has
whole seeds of every grid.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from .datasets import ImageDataset, SealedTestSet, load_dataset, split_for_selection
from .model import VARIANTS, Setting
from .protocol import Schedule, run_one

WIDTH_16 = (Setting(1, 4), Setting(2, 3), Setting(4, 2), Setting(8, 1))
WIDTH_128 = (Setting(1, 7), Setting(2, 6), Setting(4, 5), Setting(8, 4), Setting(16, 3), Setting(32, 2), Setting(64, 1))


@dataclass(frozen=True)
class Grid:
    """One table of the paper: a dataset at one training width."""

    key: str
    dataset: str
    width: int
    settings: tuple[Setting, ...]


GRIDS: dict[str, Grid] = {
    "fashion-mnist-16": Grid("fashion-mnist-16", "fashion-mnist", 16, WIDTH_16),
    "fashion-mnist-128": Grid("fashion-mnist-128", "fashion-mnist", 128, WIDTH_128),
    "mnist-16": Grid("mnist-16", "mnist", 16, WIDTH_16),
}

RUNS_FILE = "runs.jsonl"
SCHEDULE_FILE = "schedule.json"


def parse_settings(text: str) -> tuple[Setting, ...]:
    """``"1x4,8x1"`` -> (Setting(1, 4), Setting(8, 1)); ValueError naming the bad item."""
    out = []
    for item in text.split(","):
        parts = item.strip().lower().split("x")
        if len(parts) != 2 or not all(p.isdigit() for p in parts) or int(parts[0]) < 1:
            raise ValueError(f"setting {item!r} is not allowed: write leaf_width x depth, e.g. 1x4 or 64x1")
        out.append(Setting(int(parts[0]), int(parts[1])))
    return tuple(out)


def _run_key(r: dict) -> tuple:
    return (r["grid"], r["leaf_width"], r["depth"], r["variant"], r["seed"])


def load_runs(out: Path) -> list[dict]:
    path = out / RUNS_FILE
    if not path.is_file():
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def check_schedule(out: Path, schedule: Schedule) -> None:
    """A results directory holds runs of one schedule only: refuse to mix."""
    path = out / SCHEDULE_FILE
    if path.is_file():
        old = json.loads(path.read_text())
        if old != schedule.to_dict():
            diff = {k: (old.get(k), v) for k, v in schedule.to_dict().items() if old.get(k) != v}
            raise ValueError(f"{out} holds runs of another schedule (differences old -> new: {diff}); "
                             "pass a fresh --out directory or the same settings")
    else:
        path.write_text(json.dumps(schedule.to_dict(), indent=1) + "\n")


def reproduce(
    grids: list[Grid],
    variants: list[str],
    seeds: list[int],
    schedule: Schedule,
    out: str | os.PathLike,
    data_dirs: dict[str, str | None] | None = None,
    threads: int = 1,
    verbose: bool = False,
    print_fn: Callable[[str], None] = print,
    datasets: dict[str, ImageDataset] | None = None,
) -> list[dict]:
    """Run every (grid, seed, setting, variant) not yet in ``out``; return all records of the requested runs."""
    for v in variants:
        if v not in VARIANTS:
            raise ValueError(f"variant {v!r} is not known: must be one of {', '.join(VARIANTS)}")
    if not seeds or any(s < 0 for s in seeds):
        raise ValueError(f"seeds {seeds} are not allowed: need at least one seed, all >= 0")
    if threads < 1:
        raise ValueError(f"threads = {threads} is not allowed: must be >= 1")
    out = Path(out)
    datasets = dict(datasets or {})
    # the data the pending runs need is loaded before anything is written, so that a bad data path leaves no
    # results directory behind
    done = {_run_key(r) for r in load_runs(out)}
    for g in grids:
        pending = any((g.key, s.leaf_width, s.depth, v, seed) not in done
                      for s in g.settings for v in variants for seed in seeds)
        if pending and g.dataset not in datasets:
            datasets[g.dataset] = load_dataset(g.dataset, (data_dirs or {}).get(g.dataset))
            print_fn(f"loaded {datasets[g.dataset].label}: {tuple(datasets[g.dataset].train_x.shape)} train, "
                     f"{tuple(datasets[g.dataset].test_x.shape)} test")
    out.mkdir(parents=True, exist_ok=True)
    check_schedule(out, schedule)
    threads_before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _run_pending(grids, variants, seeds, schedule, out, verbose, print_fn, datasets)
    finally:
        torch.set_num_threads(threads_before)


def _run_pending(grids, variants, seeds, schedule, out: Path, verbose, print_fn, datasets) -> list[dict]:
    done = {_run_key(r): r for r in load_runs(out)}
    todo = [(g, seed, s, v) for seed in seeds for g in grids for s in g.settings for v in variants]
    pending = [t for t in todo if (t[0].key, t[2].leaf_width, t[2].depth, t[3], t[1]) not in done]
    print_fn(f"eFFF reproduction: {len(todo)} runs, {len(todo) - len(pending)} already in {out / RUNS_FILE}")
    start, finished = time.perf_counter(), 0
    splits = {}
    log = print_fn if verbose else None
    with open(out / RUNS_FILE, "a") as f:
        for g, seed, s, v in pending:
            ds = datasets[g.dataset]
            if g.dataset not in splits:
                splits[g.dataset], _ = split_for_selection(ds, schedule.val_fraction, schedule.split_seed)
            test = SealedTestSet(ds.test_x, ds.test_y)  # sealed afresh for each run, opened once by it
            record = run_one(v, s, seed, splits[g.dataset], test, schedule, log)
            record.update(grid=g.key, dataset=ds.name, dataset_label=ds.label, width=g.width)
            f.write(json.dumps(record) + "\n")
            f.flush()
            done[_run_key(record)] = record
            finished += 1
            elapsed = time.perf_counter() - start
            eta = elapsed / finished * (len(pending) - finished)
            print_fn(f"[{finished}/{len(pending)}] {g.key} {s.key} {v:10s} seed {seed}: "
                     f"train(hard) {record['train_acc_hard']:.4f} test {record['test_acc']:.4f} "
                     f"val {record['val_acc']:.4f} leaves {record['leaves_used_train']}/{record['leaves']} "
                     f"epochs {record['epochs_run']} {record['seconds']:.0f}s | elapsed {elapsed / 60:.1f} min, "
                     f"eta {eta / 60:.1f} min")
            sys.stdout.flush()
    return [done[(t[0].key, t[2].leaf_width, t[2].depth, t[3], t[1])] for t in todo]
