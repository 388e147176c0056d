"""The comparison's outputs: one table (printed and as Markdown), the results as JSON, and a PNG plot of
perplexity against the share of feedforward parameters used per token, with leaf/expert-usage histograms."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from .comparison import Result

COLUMNS = ("model", "params", "FF params", "% FF used/token", "valid ppl", "test ppl", "train tok/s",
           "FF infer tok/s", "usage entropy", "unused")


def rows(results: list[Result]) -> list[list[str]]:
    def opt(v, fmt):
        return "-" if v is None else format(v, fmt)

    return [[r.label, f"{r.params:,}", f"{r.ff_params:,}", f"{r.ff_percent_used:.1f}", f"{r.valid_ppl:.1f}",
             f"{r.test_ppl:.1f}", f"{r.train_tokens_per_s:,.0f}", f"{r.ff_infer_tokens_per_s:,.0f}",
             opt(r.usage_entropy, ".2f"), opt(r.unused, ".1f")] for r in results]


def markdown(results: list[Result]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "|".join("---" for _ in COLUMNS) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows(results)]
    return "\n".join(lines) + "\n"


def text_table(results: list[Result]) -> str:
    table = [list(COLUMNS)] + rows(results)
    widths = [max(len(row[i]) for row in table) for i in range(len(COLUMNS))]
    fmt = [row[0].ljust(widths[0]) + "  " + "  ".join(c.rjust(w) for c, w in zip(row[1:], widths[1:]))
           for row in table]
    return "\n".join([fmt[0], "-" * len(fmt[0]), *fmt[1:]])


def write(results: list[Result], out: Path, context: dict) -> dict[str, Path]:
    """Write ``comparison.md``, ``comparison.json`` and (with matplotlib) ``comparison.png`` under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {"markdown": out / "comparison.md", "json": out / "comparison.json"}
    header = "".join(f"- {k}: {v}\n" for k, v in context.items())
    paths["markdown"].write_text(header + "\n" + markdown(results))
    paths["json"].write_text(json.dumps({"context": context, "results": [asdict(r) for r in results]}, indent=1))
    import logging

    logging.getLogger("matplotlib").setLevel(logging.WARNING)  # fairseq's logging set-up leaves DEBUG on
    try:
        import matplotlib
    except ImportError:
        print("note: no plot written (pip install matplotlib)")
        return paths
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with_counts = [r for r in results if r.counts]
    fig, axes = plt.subplots(1, 1 + len(with_counts), figsize=(4.2 * (1 + len(with_counts)), 3.6), squeeze=False)
    ax = axes[0][0]
    for r in results:
        ax.scatter(r.ff_percent_used, r.valid_ppl)
        ax.annotate(r.label, (r.ff_percent_used, r.valid_ppl), fontsize=8)
    ax.set_xscale("log")
    # plain-number ticks (1, 2, 5, 10, ...) within the data's range: the default log labels overlap on a narrow range
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

    used = [r.ff_percent_used for r in results]
    lo, hi = min(used) / 1.4, max(used) * 1.6
    ax.set_xlim(lo, hi)
    ax.xaxis.set_major_locator(FixedLocator([t for t in (0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50, 100) if lo <= t <= hi]))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.set_xlabel("% of feedforward parameters used per token")
    ax.set_ylabel("validation perplexity")
    ax.set_title("equal parameters")
    for ax, r in zip(axes[0][1:], with_counts):
        counts = r.counts[0]
        total = sum(counts) or 1
        ax.bar(range(len(counts)), [c / total for c in counts], width=1.0)
        ax.set_title(f"{r.label}: layer 0 usage")
        ax.set_xlabel("leaf / expert / slot")
        ax.set_ylabel("share of tokens")
    fig.tight_layout()
    paths["plot"] = out / "comparison.png"
    fig.savefig(paths["plot"], dpi=110)
    plt.close(fig)
    return paths
