"""Tables, JSON and plots of an eFFF reproduction, with the paper's figures beside ours.

Input: the run records of :mod:`.protocol` (one per dataset grid, setting, variant, seed). Output:
``efff.md`` (tables), ``efff.json`` (the aggregates and every record), ``efff_accuracy.png`` (accuracy per
setting, mean +- std over seeds) and ``efff_leaf_usage.png`` (leaf-usage histograms for one seed).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from .model import VARIANT_LABELS

# docs/methods.md §3: the paper's claims and the figures readable from its released checkpoints and logs. Its
# best checkpoints were selected on the TEST set (our protocol selects on validation), and the file names
# do not say which variant they are.
PAPER_CLAIMS = {"train_gain_points": 16.3, "test_gain_points": 3.0, "runs_per_setting": 10}
PAPER_BEST_TEST = {
    ("mnist-16", 8, 1): 0.9346,
    ("fashion-mnist-16", 1, 4): 0.803,
    ("fashion-mnist-128", 16, 3): 0.8738,
    ("fashion-mnist-128", 64, 1): 0.8884,
}
GRID_TITLES = {
    "fashion-mnist-16": "Fashion-MNIST, training width 16",
    "fashion-mnist-128": "Fashion-MNIST, training width 128",
    "mnist-16": "MNIST, training width 16",
}


def _grid_order(grids: set[str]) -> list[str]:
    """The paper's order (Fashion-MNIST 16, 128, MNIST 16), then any others by name."""
    known = [g for g in GRID_TITLES if g in grids]
    return known + sorted(grids - set(known))


def _mean_std(values: list[float]) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return mean, std


def aggregate(records: list[dict]) -> list[dict]:
    """One row per (grid, setting, variant): mean and std over seeds, and the gain over plain FFF."""
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault((r["grid"], r["leaf_width"], r["depth"], r["variant"]), []).append(r)
    rows = []
    for (grid, l, D, variant), rs in groups.items():
        row = {"grid": grid, "leaf_width": l, "depth": D, "variant": variant, "seeds": sorted(r["seed"] for r in rs),
               "dataset_label": rs[0]["dataset_label"]}
        for k in ("train_acc_hard", "train_acc_soft", "test_acc", "val_acc", "leaves_used_train",
                  "usage_entropy_bits_train"):
            row[k], row[k + "_std"] = _mean_std([r[k] for r in rs])
        row["epochs_mean"] = sum(sum(r["epochs_run"]) for r in rs) / len(rs)
        row["paper_best_test"] = PAPER_BEST_TEST.get((grid, l, D))
        rows.append(row)
    by_key = {(r["grid"], r["leaf_width"], r["depth"], r["variant"]): r for r in rows}
    for r in rows:
        base = by_key.get((r["grid"], r["leaf_width"], r["depth"], "fff"))
        for k in ("train_acc_hard", "train_acc_soft", "test_acc"):
            r[k + "_gain"] = None if base is None or r["variant"] == "fff" else r[k] - base[k]
    order = {"fff": 0, "fff+lb": 1, "fff+lb+ml": 2}
    rank = {g: i for i, g in enumerate(_grid_order({r["grid"] for r in rows}))}
    rows.sort(key=lambda r: (rank[r["grid"]], -r["depth"], r["leaf_width"], order.get(r["variant"], 9)))
    return rows


def summarise(rows: list[dict]) -> list[dict]:
    """Per grid and enhancement: largest and mean gain over settings, and the test-accuracy std ratio."""
    out = []
    for grid in _grid_order({r["grid"] for r in rows}):
        base = {(r["leaf_width"], r["depth"]): r for r in rows if r["grid"] == grid and r["variant"] == "fff"}
        for variant in ("fff+lb", "fff+lb+ml"):
            rs = [r for r in rows if r["grid"] == grid and r["variant"] == variant
                  and (r["leaf_width"], r["depth"]) in base]
            if not rs:
                continue
            tr = [r["train_acc_hard_gain"] for r in rs]
            te = [r["test_acc_gain"] for r in rs]
            soft = [r["train_acc_soft_gain"] for r in rs]
            ratios = [r["test_acc_std"] / base[(r["leaf_width"], r["depth"])]["test_acc_std"] for r in rs
                      if base[(r["leaf_width"], r["depth"])]["test_acc_std"] > 0]
            out.append({
                "grid": grid, "variant": variant, "settings": len(rs),
                "train_gain_max": max(tr), "train_gain_mean": sum(tr) / len(tr),
                "test_gain_max": max(te), "test_gain_mean": sum(te) / len(te),
                "soft_train_gain_max": max(soft),
                "test_std_ratio_median": sorted(ratios)[len(ratios) // 2] if ratios else None,
                "lower_test_std_settings": sum(x < 1 for x in ratios), "std_compared_settings": len(ratios),
            })
    return out


def _pct(x: float | None, sd: float | None = None, signed: bool = False) -> str:
    if x is None:
        return "–"
    s = f"{100 * x:+.1f}" if signed else f"{100 * x:.1f}"
    return s + (f" ± {100 * sd:.1f}" if sd is not None else "")


def markdown(rows: list[dict], summary: list[dict], header: str) -> str:
    lines = [header.rstrip(), ""]
    for grid in _grid_order({r["grid"] for r in rows}):
        rs = [r for r in rows if r["grid"] == grid]
        lines += [f"### {GRID_TITLES.get(grid, grid)} — {rs[0]['dataset_label']}", "",
                  "Accuracies in %, mean ± std over seeds; train and test with hard routing (the deployed "
                  "function); 'soft train' is the training-mode forward, for comparison with the paper's "
                  "train figures only. Gains are differences of means against plain FFF at the same setting. "
                  "Leaf usage: leaves that receive at least one training image, and the entropy of the usage "
                  "(bits; the maximum is the depth).", "",
                  "| (l, D) | variant | seeds | train (hard) | test | Δ train | Δ test | soft train | val | "
                  "leaves used | usage entropy | epochs | paper best test* |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in rs:
            lines.append(
                f"| ({r['leaf_width']}, {r['depth']}) | {r['variant']} | {len(r['seeds'])} | "
                f"{_pct(r['train_acc_hard'], r['train_acc_hard_std'])} | {_pct(r['test_acc'], r['test_acc_std'])} | "
                f"{_pct(r['train_acc_hard_gain'], signed=True)} | {_pct(r['test_acc_gain'], signed=True)} | "
                f"{_pct(r['train_acc_soft'], r['train_acc_soft_std'])} | {_pct(r['val_acc'])} | "
                f"{r['leaves_used_train']:.1f}/{2 ** r['depth']} | {abs(r['usage_entropy_bits_train']):.2f} | "
                f"{r['epochs_mean']:.1f} | {_pct(r['paper_best_test'])} |")
        lines.append("")
    lines += ["### Gains of the enhancements over plain FFF (percentage points)", "",
              f"Paper's claim (abstract): up to +{PAPER_CLAIMS['train_gain_points']} training accuracy and up "
              f"to +{PAPER_CLAIMS['test_gain_points']:.0f} test accuracy, with lower variance "
              f"({PAPER_CLAIMS['runs_per_setting']} runs per setting, best model chosen on the test set, train "
              "accuracy with soft routing).", "",
              "| grid | variant | settings | max Δ train | mean Δ train | max Δ test | mean Δ test | "
              "max Δ soft train | test std vs FFF (median ratio) | settings with lower test std |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for s in summary:
        ratio = "–" if s["test_std_ratio_median"] is None else f"{s['test_std_ratio_median']:.2f}"
        lines.append(f"| {s['grid']} | {s['variant']} | {s['settings']} | {_pct(s['train_gain_max'], signed=True)} | "
                     f"{_pct(s['train_gain_mean'], signed=True)} | {_pct(s['test_gain_max'], signed=True)} | "
                     f"{_pct(s['test_gain_mean'], signed=True)} | {_pct(s['soft_train_gain_max'], signed=True)} | "
                     f"{ratio} | "
                     f"{s['lower_test_std_settings']}/{s['std_compared_settings']} |")
    lines += ["", "\\* the paper's best test accuracy at that setting, read from its released checkpoint names "
              "(selected on the test set; variant not stated). Variants: "
              + "; ".join(f"{k} = {v}" for k, v in VARIANT_LABELS.items()) + ".", ""]
    return "\n".join(lines)


def plot(records: list[dict], rows: list[dict], out: Path) -> list[Path]:
    """The accuracy plot and the leaf-usage histograms; needs matplotlib (``pip install matplotlib``)."""
    try:
        import matplotlib
    except ImportError as e:
        raise ImportError("the eFFF plots need matplotlib: pip install -e '.[plot]'") from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    grids = _grid_order({r["grid"] for r in rows})
    variants = [v for v in VARIANT_LABELS if any(r["variant"] == v for r in rows)]
    fig, axes = plt.subplots(1, len(grids), figsize=(5.5 * len(grids), 4.2), squeeze=False)
    for ax, grid in zip(axes[0], grids):
        rs = [r for r in rows if r["grid"] == grid]
        settings = sorted({(r["leaf_width"], r["depth"]) for r in rs}, key=lambda s: (-s[1], s[0]))
        for i, v in enumerate(variants):
            pts = {(r["leaf_width"], r["depth"]): r for r in rs if r["variant"] == v}
            xs = [j + (i - 1) * 0.2 for j, s in enumerate(settings) if s in pts]
            sel = [pts[s] for s in settings if s in pts]
            line = ax.errorbar(xs, [100 * r["test_acc"] for r in sel], [100 * r["test_acc_std"] for r in sel],
                               fmt="o", capsize=3, label=f"{v} test")
            ax.errorbar(xs, [100 * r["train_acc_hard"] for r in sel], [100 * r["train_acc_hard_std"] for r in sel],
                        fmt="^", mfc="none", capsize=3, color=line[0].get_color(), label=f"{v} train (hard)")
        paper = [(j, PAPER_BEST_TEST[(grid, *s)]) for j, s in enumerate(settings) if (grid, *s) in PAPER_BEST_TEST]
        if paper:
            ax.plot([p[0] for p in paper], [100 * p[1] for p in paper], "k*", ms=10, label="paper best test*")
        ax.set_xticks(range(len(settings)), [f"({s[0]},{s[1]})" for s in settings])
        ax.set_xlabel("(leaf width, depth)")
        ax.set_ylabel("accuracy (%), mean ± std over seeds")
        ax.set_title(GRID_TITLES.get(grid, grid), fontsize=10)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    acc_png = out / "efff_accuracy.png"
    fig.savefig(acc_png, dpi=110)
    plt.close(fig)

    # leaf usage for the lowest seed, at the deepest setting of each grid
    fig, axes = plt.subplots(len(grids), len(variants), figsize=(4 * len(variants), 2.6 * len(grids)), squeeze=False)
    for gi, grid in enumerate(grids):
        rs = [r for r in records if r["grid"] == grid]
        depth = max(r["depth"] for r in rs)
        seed = min(r["seed"] for r in rs)
        for vi, v in enumerate(variants):
            ax = axes[gi][vi]
            hit = [r for r in rs if r["depth"] == depth and r["seed"] == seed and r["variant"] == v]
            if hit:
                counts = hit[0]["leaf_counts_train"]
                total = sum(counts) or 1
                ax.bar(range(len(counts)), [c / total for c in counts], width=0.9)
                ax.set_title(f"{grid} (l={hit[0]['leaf_width']}, D={depth}) {v}, seed {seed}\n"
                             f"{hit[0]['leaves_used_train']}/{len(counts)} leaves used", fontsize=8)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_xlabel("leaf")
            ax.set_ylabel("share of training images")
    fig.tight_layout()
    usage_png = out / "efff_leaf_usage.png"
    fig.savefig(usage_png, dpi=110)
    plt.close(fig)
    return [acc_png, usage_png]


def write_report(records: list[dict], out: str | os.PathLike, header: str, meta: dict,
                 plots: bool = True) -> dict[str, Path]:
    """Write efff.md, efff.json and (with ``plots``) the two PNGs into ``out``; return their paths."""
    if not records:
        raise ValueError("write_report: no run records to report")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = aggregate(records)
    summary = summarise(rows)
    paths = {"markdown": out / "efff.md", "json": out / "efff.json"}
    if plots:
        acc, usage = plot(records, rows, out)
        paths.update(accuracy_png=acc, usage_png=usage)
    text = markdown(rows, summary, header)
    if plots:
        text += f"\n![accuracy per setting]({paths['accuracy_png'].name})\n\n![leaf usage]({paths['usage_png'].name})\n"
    paths["markdown"].write_text(text)
    paths["json"].write_text(json.dumps({"meta": meta, "paper": {"claims": PAPER_CLAIMS, "best_test": [
        {"grid": g, "leaf_width": l, "depth": d, "test_acc": a} for (g, l, d), a in PAPER_BEST_TEST.items()]},
        "rows": rows, "summary": summary, "runs": records}, indent=1) + "\n")
    return paths
