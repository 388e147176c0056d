"""The comparison's outputs: one table per group (printed and as Markdown), mean ± std over the seeds present, the
rankings and how they compare with a longer run of the same settings, the results as JSON, and a PNG with the
validation curves, perplexity against the share read per token, and the usage entropy over training."""

from __future__ import annotations

import json
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

from .comparison import COMPUTE, GROUPS, PARAMS, Result, Run

# the long run the default's ranking is checked against (docs/results/lm.md: its pieces and table live in
# docs/results/lm/), when its settings match
REFERENCE = Path(__file__).resolve().parents[3] / "docs" / "results" / "lm" / "comparison.json"


@dataclass
class Stat:
    mean: float
    std: Optional[float]  # sample standard deviation; None with one seed
    lo: float
    hi: float

    @classmethod
    def of(cls, values: list[float]) -> Stat:
        return cls(statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None,
                   min(values), max(values))

    def text(self, fmt: str = ".2f") -> str:
        return format(self.mean, fmt) + ("" if self.std is None else f" ± {self.std:{fmt}}")


@dataclass
class Summary:
    """One model over its seeds."""

    label: str
    description: str
    groups: tuple[str, ...]
    seeds: list[int]
    params: int
    ff_params: int
    ff_percent_used: float
    leaf_share: Optional[float]  # trees without a master leaf: the share of leaves a token reads, 1 / 2^depth
    valid: Stat
    best: Stat
    test: Stat
    train_tokens_per_s: float
    ff_infer_tokens_per_s: float
    usage_entropy: Optional[float]
    max_entropy: Optional[float]
    unused: Optional[float]
    wall_s: float
    curve: list[dict[str, float]] = field(default_factory=list)  # per update: mean, lo, hi ppl; usage entropy
    gradients: list[dict[str, float]] = field(default_factory=list)  # trees, per logged update: the mean gradient
    # norms of the nodes and of the leaves


def summarise(found: dict[str, list[Result]], runs: list[Run]) -> list[Summary]:
    """The models of ``runs`` that have finished pieces, in the order of ``runs``."""
    out = []
    for run in runs:
        pieces = found.get(run.label)
        if not pieces:
            continue
        depth = None if getattr(run.block, "master_leaf", False) else getattr(run.block, "depth", None)
        updates = sorted(set.intersection(*[{int(p["update"]) for p in r.curve} for r in pieces]))
        curve = []
        for u in updates:
            points = [next(p for p in r.curve if int(p["update"]) == u) for r in pieces]
            ppl = [p["ppl"] for p in points]
            routing = {k: statistics.fmean(p[k] for p in points) for k in points[0]
                       if (k == "usage_entropy" or k.startswith("imbalance_l")) and all(k in p for p in points)}
            curve.append({"update": u, "ppl": statistics.fmean(ppl), "lo": min(ppl), "hi": max(ppl), **routing})

        logged = [{int(p["update"]): p for p in r.train_curve if "gnorm_nodes" in p} for r in pieces]
        gradients = [{"update": u, **{k: statistics.fmean(g[u][k] for g in logged) for k in ("gnorm_nodes",
                                                                                          "gnorm_leaves")}}
                     for u in sorted(set.intersection(*[set(g) for g in logged]))]
        out.append(Summary(
            label=run.label, description=run.description, groups=run.groups, seeds=[r.seed for r in pieces],
            params=round(statistics.fmean(r.params for r in pieces)), ff_params=pieces[0].ff_params,
            ff_percent_used=pieces[0].ff_percent_used, leaf_share=None if depth is None else 2.0 ** -depth,
            valid=Stat.of([r.valid_ppl for r in pieces]), best=Stat.of([r.best_valid_ppl for r in pieces]),
            test=Stat.of([r.test_ppl for r in pieces]),
            train_tokens_per_s=statistics.fmean(r.train_tokens_per_s for r in pieces),
            ff_infer_tokens_per_s=statistics.fmean(r.ff_infer_tokens_per_s for r in pieces),
            usage_entropy=_mean_of(pieces, "usage_entropy"), max_entropy=pieces[0].max_entropy,
            unused=_mean_of(pieces, "unused"),
            wall_s=sum(r.wall_s for r in pieces), curve=curve, gradients=gradients,
        ))
    return out


def _mean_of(pieces: list[Result], name: str) -> Optional[float]:
    values = [getattr(r, name) for r in pieces if getattr(r, name) is not None]
    return statistics.fmean(values) if values else None


COLUMNS = ("model", "% FF read", "valid ppl, last", "valid ppl, best", "test ppl", "seeds", "usage entropy (max)",
           "unused", "train tok/s", "FF infer tok/s", "params")


def _row(s: Summary) -> list[str]:
    ent = "-" if s.usage_entropy is None else f"{s.usage_entropy:.2f} ({s.max_entropy:.2f})"
    return [s.label, f"{s.ff_percent_used:.1f}", s.valid.text(), s.best.text(), s.test.text(),
            ",".join(map(str, s.seeds)), ent, "-" if s.unused is None else f"{s.unused:.1f}",
            f"{s.train_tokens_per_s:,.0f}", f"{s.ff_infer_tokens_per_s:,.0f}", f"{s.params:,}"]


def group_rows(summaries: list[Summary], group: str) -> list[Summary]:
    return [s for s in summaries if group in s.groups]


def _group_title(group: str, rows: list[Summary]) -> str:
    ff = [s.ff_params for s in rows]
    if group == PARAMS and ff:
        spread = 100 * (max(ff) - min(ff)) / max(ff)
        return f"{group} (feedforward blocks {min(ff):,} to {max(ff):,} parameters, {spread:.1f}% apart)"
    used = [s.ff_percent_used for s in rows]
    return f"{group} ({min(used):.1f}% to {max(used):.1f}% of the feedforward parameters read per token)" if used \
        else group


def _groups(summaries: list[Summary]) -> list[tuple[str, list[Summary]]]:
    """Each group that has rows, with them."""
    return [(g, rows) for g in GROUPS if (rows := group_rows(summaries, g))]


def markdown(summaries: list[Summary]) -> str:
    lines = []
    for group, rows in _groups(summaries):
        lines += [f"**{_group_title(group, rows)}**", "", "| " + " | ".join(COLUMNS) + " |",
                  "|" + "|".join("---" for _ in COLUMNS) + "|"]
        lines += ["| " + " | ".join(_row(s)) + " |" for s in rows] + [""]
    return "\n".join(lines)


def text_table(summaries: list[Summary]) -> str:
    out = []
    for group, rows in _groups(summaries):
        table = [list(COLUMNS)] + [_row(s) for s in rows]
        widths = [max(len(row[i]) for row in table) for i in range(len(COLUMNS))]
        fmt = [row[0].ljust(widths[0]) + "  " + "  ".join(c.rjust(w) for c, w in zip(row[1:], widths[1:]))
               for row in table]
        out += [_group_title(group, rows).capitalize(), fmt[0], "-" * len(fmt[0]), *fmt[1:], ""]
    return "\n".join(out).rstrip()


# -- what the table says ---------------------------------------------------------------------------------------
def ranking(rows: list[Summary]) -> str:
    """Models from best to worst last validation perplexity; ``≈`` where two neighbours are within one standard
    deviation of either (with several seeds)."""
    ordered = sorted(rows, key=lambda s: s.valid.mean)
    text = ordered[0].label if ordered else ""
    for a, b in zip(ordered, ordered[1:]):
        noise = max(a.valid.std or 0.0, b.valid.std or 0.0)
        text += (" ≈ " if noise and b.valid.mean - a.valid.mean <= noise else " < ") + b.label
    return text


def _gap(a: Summary, b: Summary) -> str:
    return f"{100 * (a.valid.mean / b.valid.mean - 1):+.1f}%"


def findings(summaries: list[Summary]) -> list[str]:
    """The comparison's answers, in words: the rankings, the best trees against dense at 1/8 and 1/16 of the
    leaves read, and the trees of equal active compute against sigma-MoE."""
    lines = []
    for group in GROUPS:
        rows = group_rows(summaries, group)
        if len(rows) > 1:
            lines.append(f"Ranking, {group} (last valid ppl, best first): {ranking(rows)}")
    by = {s.label: s for s in summaries}
    trees = [s for s in group_rows(summaries, PARAMS) if s.leaf_share is not None]
    if "dense" in by:
        for share, name in ((1 / 8, "1/8"), (1 / 16, "1/16")):
            fit = [s for s in trees if s.leaf_share <= share + 1e-12]
            if fit:
                best = min(fit, key=lambda s: s.valid.mean)
                dense = by["dense"]
                lines.append(f"Best tree reading at most {name} of its leaves: {best.label}, valid ppl "
                             f"{best.valid.text()} against dense {dense.valid.text()} ({_gap(best, dense)})")
    moe = by.get("sigma_moe")
    equal = [s for s in group_rows(summaries, COMPUTE) if s.leaf_share is not None]
    if moe and equal:
        best = min(equal, key=lambda s: s.valid.mean)
        diff = moe.valid.mean - best.valid.mean
        noise = max(best.valid.std or 0.0, moe.valid.std or 0.0)
        verdict = ("one seed, so no noise estimate (--seeds 3 gives one)" if not noise else
                   f"{'more' if abs(diff) > noise else 'less'} than the larger standard deviation, {noise:.2f}")
        lines.append(f"Equal active compute: {best.label} {best.valid.text()} against sigma-MoE {moe.valid.text()}: "
                     f"{'ahead' if diff > 0 else 'behind'} by {abs(diff):.2f}, {verdict}")
    return lines


def against_reference(summaries: list[Summary], context: dict[str, Any], reference: Path = REFERENCE) -> str:
    """Whether the rankings hold in a longer run of the same settings (``reference``, as ``write`` saves it),
    in words. Pairs within one standard deviation there (with several seeds) have no order to hold."""
    if not reference.is_file():
        return f"No longer run to check these rankings against ({reference} is absent)."
    ref = json.loads(reference.read_text())
    ref_updates = ref["context"].get("updates per model", 0)
    if any(ref["context"].get(k) != v for k, v in context.items() if k != "updates per model"):
        return (f"The long run in {reference.name} used other settings, so this run's ranking is not checked "
                "against it.")
    if ref_updates <= context["updates per model"]:
        return f"The run in {reference.name} is no longer than this one ({ref_updates} updates per model)."
    theirs = {s["label"]: s for s in ref["summaries"]}
    flips = []
    for group in GROUPS:
        rows = [s for s in group_rows(summaries, group) if s.label in theirs]
        for i, a in enumerate(rows):
            for b in rows[i + 1:]:
                ta, tb = theirs[a.label]["valid"], theirs[b.label]["valid"]
                if abs(ta["mean"] - tb["mean"]) <= max(ta["std"] or 0.0, tb["std"] or 0.0):
                    continue  # a tie there, within the seeds' noise: no order to hold
                here = a.valid.mean < b.valid.mean
                there = ta["mean"] < tb["mean"]
                if here != there:
                    first, second = (a, b) if here else (b, a)
                    flips.append(f"{first.label} ahead of {second.label} here, behind it there")
    seeds = max(len(s["seeds"]) for s in ref["summaries"])
    where = f"the run of {ref_updates} updates per model with {seeds} seed(s) (docs/results/lm.md)"
    if not flips:
        return f"Every ranking here holds in {where}."
    return (f"This length is not telling: {len(flips)} pair(s) rank the other way in {where}: "
            + "; ".join(sorted(set(flips))) + ".")


# -- files ------------------------------------------------------------------------------------------------------
def write(summaries: list[Summary], out: Path, context: dict[str, Any], notes: list[str]) -> dict[str, Path]:
    """Write ``comparison.md``, ``comparison.json`` and (with matplotlib) ``comparison.png`` under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {"markdown": out / "comparison.md", "json": out / "comparison.json"}
    header = "".join(f"- {k}: {v}\n" for k, v in context.items())
    paths["markdown"].write_text(header + "\n" + markdown(summaries) + "\n" + "".join(f"- {n}\n" for n in notes))
    paths["json"].write_text(json.dumps({"context": context, "notes": notes,
                                         "summaries": [asdict(s) for s in summaries]}, indent=1))
    import logging

    logging.getLogger("matplotlib").setLevel(logging.WARNING)  # fairseq's logging set-up leaves DEBUG on
    try:
        import matplotlib
    except ImportError:
        print("note: no plot written (pip install matplotlib)")
        return paths
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(20, 4.4))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    ax = axes[0]
    for i, s in enumerate(summaries):
        c = colours[i % len(colours)]
        style = "-" if PARAMS in s.groups else "--"
        x = [p["update"] for p in s.curve]
        ax.plot(x, [p["ppl"] for p in s.curve], style, color=c, label=s.label, lw=1.3)
        if len(s.seeds) > 1:
            ax.fill_between(x, [p["lo"] for p in s.curve], [p["hi"] for p in s.curve], color=c, alpha=0.15)
    ax.set_yscale("log")
    tail = [p["ppl"] for s in summaries for p in s.curve[len(s.curve) // 3:]]
    if tail:
        ax.set_ylim(min(tail) / 1.03, max(tail) * 1.05)
    ax.set_xlabel("update")
    ax.set_ylabel("validation perplexity")
    ax.set_title("validation (dashed: equal active compute only)")
    ax.legend(fontsize=7, ncol=2)

    ax = axes[1]
    for i, s in enumerate(summaries):
        ax.errorbar(s.ff_percent_used, s.valid.mean, yerr=s.valid.std or 0.0, fmt="o",
                    color=colours[i % len(colours)], capsize=3)
        ax.annotate(s.label, (s.ff_percent_used, s.valid.mean), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xscale("log")
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

    used = [s.ff_percent_used for s in summaries] or [1.0]
    lo, hi = min(used) / 1.4, max(used) * 1.6
    ax.set_xlim(lo, hi)
    ax.xaxis.set_major_locator(FixedLocator([t for t in (0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50, 100) if lo <= t <= hi]))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.set_xlabel("% of feedforward parameters read per token")
    ax.set_ylabel("last validation perplexity (mean ± std)")
    ax.set_title("quality against the share read")

    ax = axes[2]
    for i, s in enumerate(summaries):
        points = [p for p in s.curve if "usage_entropy" in p]
        if points and s.max_entropy:
            ax.plot([p["update"] for p in points], [p["usage_entropy"] / s.max_entropy for p in points],
                    "-" if PARAMS in s.groups else "--", color=colours[i % len(colours)], label=s.label, lw=1.3)
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("update")
    ax.set_ylabel("usage entropy / its maximum (validation)")
    ax.set_title("how evenly leaves / experts / slots are used")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)

    ax = axes[3]
    for i, s in enumerate(summaries):
        if s.gradients:
            x = [p["update"] for p in s.gradients]
            c = colours[i % len(colours)]
            ax.plot(x, [p["gnorm_nodes"] for p in s.gradients], "-", color=c, label=f"{s.label} nodes", lw=1.3)
            ax.plot(x, [p["gnorm_leaves"] for p in s.gradients], ":", color=c, lw=1.0)
    ax.set_yscale("log")
    ax.set_xlabel("update")
    ax.set_ylabel("gradient norm (train, after clipping)")
    ax.set_title("trees: nodes (solid) and leaves (dotted)")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    fig.tight_layout()
    paths["plot"] = out / "comparison.png"
    fig.savefig(paths["plot"], dpi=110)
    plt.close(fig)
    return paths


def length_effect(short: dict[str, Any], long: dict[str, Any]) -> str:
    """A Markdown table of every model's last validation perplexity, and its gap to dense and to sigma-MoE, in two
    saved comparisons of the same models at two lengths (``comparison.json`` as :func:`write` saves it): what
    length did to each gap."""
    def by_label(saved: dict[str, Any]) -> dict[str, dict[str, Any]]:
        return {s["label"]: s for s in saved["summaries"]}

    a, b = by_label(short), by_label(long)
    n = [short["context"]["updates per model"], long["context"]["updates per model"]]
    head = (f"| model | % FF read | valid ppl, {n[0]} updates | valid ppl, {n[1]} | gap to dense, {n[0]} | "
            f"gap to dense, {n[1]} | gap to sigma-MoE, {n[0]} | gap to sigma-MoE, {n[1]} |")
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]

    def gap(s: dict[str, dict[str, Any]], label: str, ref: str) -> str:
        if ref not in s:
            return "-"
        return f"{100 * (s[label]['valid']['mean'] / s[ref]['valid']['mean'] - 1):+.1f}%"

    for label in [k for k in a if k in b]:
        lines.append(f"| {label} | {a[label]['ff_percent_used']:.1f} | {a[label]['valid']['mean']:.2f} | "
                     f"{b[label]['valid']['mean']:.2f} | {gap(a, label, 'dense')} | {gap(b, label, 'dense')} | "
                     f"{gap(a, label, 'sigma_moe')} | {gap(b, label, 'sigma_moe')} |")
    return "\n".join(lines) + "\n"


def ablation(saved: dict[str, Any], base: str = "fff") -> str:
    """A Markdown table of the trees of one saved comparison against ``base`` (the plain tree): the last validation
    perplexity and its change, and at the last validation the usage entropy, the unused leaves, each level's
    imbalance and, from the last logged update, the node and leaf gradient norms: what each mechanism did, with the
    evidence of how it routed."""
    rows = [s for s in saved["summaries"] if s["label"] == base or (s["leaf_share"] is not None or
                                                                    s["label"].startswith(base))]
    ref = next((s for s in rows if s["label"] == base), None)
    levels = sorted({k for s in rows for k in (s["curve"][-1] if s["curve"] else {}) if k.startswith("imbalance_l")})
    head = ["model", "% FF read", "valid ppl", f"vs {base}", "usage entropy (max)", "unused",
            *[f"imbalance {k[len('imbalance_'):]}" for k in levels], "gnorm nodes", "gnorm leaves"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in rows:
        last = s["curve"][-1] if s["curve"] else {}
        grads = s["gradients"][-1] if s["gradients"] else {}
        change = "-" if ref is None else f"{100 * (s['valid']['mean'] / ref['valid']['mean'] - 1):+.1f}%"
        ent = "-" if s["usage_entropy"] is None else f"{s['usage_entropy']:.2f} ({s['max_entropy']:.2f})"
        cells = [s["label"], f"{s['ff_percent_used']:.1f}", f"{s['valid']['mean']:.2f}", change, ent,
                 "-" if s["unused"] is None else f"{s['unused']:.1f}",
                 *[f"{last[k]:.2f}" if k in last else "-" for k in levels],
                 *[f"{grads[k]:.4f}" if k in grads else "-" for k in ("gnorm_nodes", "gnorm_leaves")]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def shift_table(rows: list[dict[str, Any]]) -> str:
    """A Markdown table of :func:`~fff_moe_plugin.experiments.lm.comparison.shift_effect`: per tree layer, the
    share of decisions the shifts turned against their logit's sign (per level, and paths with any), and the mean
    gate of the paths so turned and of the others."""
    depth = max(len(r["against"]) for r in rows)
    head = ["layer", *[f"against l{k}" for k in range(depth)], "paths turned", "gate turned", "gate rest",
            "mean shift size", "max shift size"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def num(v: Optional[float]) -> str:
        return "-" if v is None else f"{v:.3f}"

    for r in rows:
        cells = [str(r["layer"]), *[f"{100 * v:.1f}%" for v in r["against"]], f"{100 * r['against_any']:.1f}%",
                 num(r["gate_against"]), num(r["gate_rest"]), num(r["shift_mean"]), num(r["shift_max"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """``python -m fff_moe_plugin.experiments.lm.report lengths SHORT.json LONG.json`` (:func:`length_effect`) or
    ``... ablation SAVED.json`` (:func:`ablation`), from the ``comparison.json`` files ``fff-moe compare`` writes;
    ``... shifts CHECKPOINT --data DATA_BIN`` (:func:`shift_table`), from a tree model's checkpoint."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m fff_moe_plugin.experiments.lm.report", description=main.__doc__)
    sub = p.add_subparsers(dest="table", required=True)
    lengths = sub.add_parser("lengths", help="each model's gaps to dense and sigma-MoE at two lengths")
    lengths.add_argument("short")
    lengths.add_argument("long")
    sub.add_parser("ablation", help="the trees against the plain tree, with their routing").add_argument("saved")
    shifts = sub.add_parser("shifts", help="what bias balancing's decision shifts did to a checkpoint's routing")
    shifts.add_argument("checkpoint", help="a tree model's checkpoint, e.g. <out>/fff+bias/seed1/checkpoints/"
                                           "checkpoint_last.pt")
    shifts.add_argument("--data", required=True, help="the fairseq data-bin it was trained on")
    shifts.add_argument("--tokens-per-sample", type=int, default=128, help="its context (default 128)")
    shifts.add_argument("--batches", type=int, default=8, help="validation batches of 4096 tokens (default 8)")
    args = p.parse_args(argv)
    if args.table == "shifts":
        from .comparison import shift_effect

        if not Path(args.checkpoint).is_file():
            p.error(f"no such file: {args.checkpoint} (a checkpoint fairseq-train wrote)")
        if not (Path(args.data) / "dict.txt").is_file():
            p.error(f"--data {args.data} holds no dict.txt: give the fairseq data-bin the model was trained on")
        for name in ("tokens_per_sample", "batches"):
            if getattr(args, name) < 1:
                p.error(f"--{name.replace('_', '-')} {getattr(args, name)} is not allowed: must be at least 1")
        print(shift_table(shift_effect(Path(args.checkpoint), Path(args.data), args.tokens_per_sample,
                                       args.batches)), end="")
        return 0
    paths = [args.short, args.long] if args.table == "lengths" else [args.saved]
    missing = [q for q in paths if not Path(q).is_file()]
    if missing:
        p.error(f"no such file: {', '.join(missing)} (comparison.json, as fff-moe compare writes it)")
    saved = [json.loads(Path(q).read_text()) for q in paths]
    print(length_effect(*saved) if args.table == "lengths" else ablation(*saved), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
