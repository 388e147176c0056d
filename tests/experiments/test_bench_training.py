"""benchmarks/bench_training.py: argument checks, the parameter-matched dense width, the FLOP counts, and a
tiny run's JSON (its records, baselines and ratios, and equal first losses of the forms of one block)."""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest
from helpers import ROOT

from fff_moe_plugin import FFFConfig
from fff_moe_plugin.config import DenseConfig

_PATH = ROOT / "benchmarks" / "bench_training.py"
_spec = importlib.util.spec_from_file_location("bench_training", _PATH)
bench = importlib.util.module_from_spec(_spec)
sys.modules["bench_training"] = bench  # dataclasses look their module up while the file runs
_spec.loader.exec_module(bench)


@pytest.mark.parametrize("argv, message", [
    (["--threads", "0"], "--threads"),
    (["--widths", "1000", "--depths", "5"], "not divisible"),
    (["--rounds", "0"], "--rounds"),
    (["--tokens", "0"], "--tokens"),
    (["--lr", "nan"], "--lr"),
    (["--forms", "jit"], "invalid choice"),
])
def test_bad_arguments_fail_before_any_work(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        bench.parse_args(argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_quick_sets_its_group():
    args = bench.parse_args(["--quick"])
    assert (args.threads, args.widths, args.depths, args.rounds) == ([1], [4096], [5, 7], 3)


@pytest.mark.parametrize("depth", [3, 5, 7])
def test_params_matched_width_is_nearest(depth):
    cfg = FFFConfig(d_model=768, leaf_width=4096 // 2**depth, depth=depth, train_mode="hard", load_balance="leaf")
    f = bench.params_matched_width(cfg)
    target = cfg.num_parameters_per_token()
    def gap(w):
        return abs(DenseConfig(d_model=768, d_ff=w).num_parameters() - target)
    assert gap(f) <= min(gap(f - 1), gap(f + 1))
    assert cfg.leaf_width < f <= cfg.leaf_width + depth


def test_flops_of_a_one_leaf_tree_without_nodes_equal_dense():
    assert bench.fff_flops(16, 8, 1, 16) - 2 * 2 * 16 * 1 == bench.dense_flops(16, 8, 16)
    assert bench.fff_flops(768, 32, 7, 768) > bench.fff_flops(768, 32, 7, 768, every_node=False)


def test_tiny_run_records(tmp_path):
    out = tmp_path / "r.json"
    argv = ["--threads", "1", "--widths", "32", "--depths", "1", "2", "--tokens", "48", "--d-model", "16",
            "--forms", "loop", "grouped", "--rounds", "2", "--block-seconds", "0.001", "--warmup", "1",
            "--json", str(out)]
    assert bench.main(argv) == 0
    result = json.loads(out.read_text())
    rows = result["results"]
    names = [r["name"] for r in rows]
    assert names == [
        "dense d_ff=32 eager",
        "dense d_ff=17 (=params D1) eager", "FFF D1 x16 loop", "FFF D1 x16 grouped",
        "dense d_ff=9 (=params D2) eager", "FFF D2 x8 loop", "FFF D2 x8 grouped",
    ]
    assert result["loss_disagreements"] == []
    by = {r["name"]: r for r in rows}
    for depth, leaf in ((1, 16), (2, 8)):
        loop, grouped = by[f"FFF D{depth} x{leaf} loop"], by[f"FFF D{depth} x{leaf} grouped"]
        # same weights and inputs: the same first loss, on the implementation each form names
        assert loop["first_loss"] == pytest.approx(grouped["first_loss"], rel=1e-5)
        assert (loop["grouped_path"], grouped["grouped_path"]) == ("loop", "grouped")
        assert "goal_met" not in grouped  # goals exist for depths 3, 5 and 7 only
        for r in (loop, grouped):
            assert r["error"] is None and len(r["step_ms_rounds"]) == 2
            assert r["baseline_width"] == "dense d_ff=32 eager"
            assert r["baseline_params"].endswith(f"(=params D{depth}) eager")
            assert r["tree_overhead"] > 0 and r["speedup_vs_dense_width"] > 0
            assert r["ideal_tree_overhead"] == pytest.approx(
                r["flops_per_token"] / by[r["baseline_params"]]["flops_per_token"])
    assert by["dense d_ff=32 eager"]["speedup_vs_dense_width"] == 1.0
    assert len(result["tables"]) == 1 and "FFF D2 x8 grouped" in result["tables"][0]
