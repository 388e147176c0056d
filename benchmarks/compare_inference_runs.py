"""Side by side: several ``fff-moe bench`` JSON files of the same settings, as one Markdown table.

    python benchmarks/compare_inference_runs.py run1.json run2.json [...]

One row per (threads, width, batch, layer): each run's median time and speedup against that run's fastest
dense block (named per run), the spread of the speedups (largest over smallest), and the ideal. The rows
follow the first file; a layer missing from a later run shows "-".
"""

from __future__ import annotations

import argparse
import json
import sys


def _fmt_time(s: float) -> str:
    return f"{s * 1e6:.1f} us" if s < 1e-3 else f"{s * 1e3:.2f} ms" if s < 1 else f"{s:.2f} s"


def _fmt_x(v: float) -> str:
    return f"{v:.0f}x" if v >= 100 else f"{v:.1f}x"


def table(results: list[dict]) -> str:
    keyed = [{(r["threads"], r["width"], r["batch"], r["layer"]): r for r in res["results"]} for res in results]
    n = len(results)
    head = (["threads", "width", "batch", "layer"] + [f"run {i + 1}: median" for i in range(n)]
            + [f"run {i + 1}: speedup" for i in range(n)] + ["spread", "ideal (run 1; run 2 ...)", "baseline per run"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key, first in keyed[0].items():
        rows = [k.get(key) for k in keyed]
        if first["kind"] == "dense" and key[3] not in {r["baseline"] for r in rows if r}:
            continue  # a dense implementation that was the baseline in no run: see the JSON
        speedups = [r["speedup_vs_baseline"] for r in rows if r]
        spread = f"{max(speedups) / min(speedups):.2f}" if len(speedups) == n else "-"
        cells = [str(key[0]), str(key[1]), str(key[2]), key[3]]
        cells += [_fmt_time(r["seconds_median"]) if r else "-" for r in rows]
        cells += [_fmt_x(r["speedup_vs_baseline"]) if r else "-" for r in rows]
        cells += [spread, "; ".join(_fmt_x(r["ideal_speedup"]) if r else "-" for r in rows)]
        cells += ["; ".join(r["baseline"].removeprefix("dense ") if r else "-" for r in rows)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", nargs="+", help="fff-moe bench result files")
    args = parser.parse_args(argv)
    results = []
    for path in args.json:
        with open(path) as f:
            results.append(json.load(f))
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
