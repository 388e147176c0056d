"""``fff-moe bench``: the dense baselines, the choice of the fastest as the baseline, and the targets that live
in benchmarks/ rather than in the shipped command. Times are never asserted, only the report's structure."""

import importlib.util
import json

import pytest
import torch
from helpers import ROOT

from fff_moe_plugin.experiments import inference_bench as bench

BENCH_SCRIPT = ROOT / "benchmarks" / "bench_inference.py"
DENSE = [bench.DENSE_NN_LINEAR, bench.DENSE_ADDMM, bench.DENSE_ONEDNN]


def _script():
    spec = importlib.util.spec_from_file_location("bench_inference_script", BENCH_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_three_dense_blocks_compute_the_same_function():
    blocks = bench.dense_blocks(64)
    assert list(blocks) == DENSE
    x = torch.randn(5, bench.D_MODEL)
    with torch.no_grad():
        ref = blocks[bench.DENSE_NN_LINEAR](x)
        for fn in blocks.values():
            torch.testing.assert_close(fn(x), ref, atol=1e-4, rtol=1e-4)


def test_the_baseline_is_the_fastest_dense_median_and_every_speedup_is_quoted_against_it():
    machine = {"peak_gflops": 100.0, "bandwidth_gbs": 10.0}
    contenders = [bench.Contender(n, "dense", 0, 256, None) for n in DENSE]
    contenders.append(bench.Contender("FFF leaf-MLP D2 x64", "leaf-MLP", 2, 256, None))
    times = {  # medians 3, 2, 4 and 0.5: addmm is the fastest dense although its minimum is not the smallest
        bench.DENSE_NN_LINEAR: [1.0, 3.0, 5.0],
        bench.DENSE_ADDMM: [2.0, 2.0, 9.0],
        bench.DENSE_ONEDNN: [4.0, 4.0, 4.0],
        "FFF leaf-MLP D2 x64": [0.5, 0.5, 0.5],
    }
    assert bench.fastest_dense(times, DENSE) == bench.DENSE_ADDMM
    rows = {r["layer"]: r for r in bench.group_records(contenders, times, 1, 256, 8, machine)}
    assert {r["baseline"] for r in rows.values()} == {bench.DENSE_ADDMM}
    assert rows[bench.DENSE_ADDMM]["speedup_vs_baseline"] == 1.0
    assert rows[bench.DENSE_NN_LINEAR]["speedup_vs_baseline"] == pytest.approx(2 / 3)
    fff = rows["FFF leaf-MLP D2 x64"]
    assert fff["speedup_vs_baseline"] == pytest.approx(4.0)
    assert fff["speedup_vs_dense"] == pytest.approx({bench.DENSE_NN_LINEAR: 6.0, bench.DENSE_ADDMM: 4.0,
                                                     bench.DENSE_ONEDNN: 8.0})
    assert fff["ideal_speedup"] == pytest.approx(2.0 / fff["roofline_seconds"])


def test_the_command_reports_measurements_and_ideals_without_targets(tmp_path, capsys):
    out = tmp_path / "bench.json"
    argv = ["--threads", "1", "--widths", "256", "--depths", "2", "--batches", "1", "3", "--rounds", "1",
            "--block-seconds", "0.001", "--path-neuron-depth", "7", "--no-fastfeedforward", "--json", str(out)]
    assert bench.main(argv) == 0
    printed = capsys.readouterr().out
    assert "target" not in printed.lower() and not hasattr(bench, "TARGETS")
    result = json.loads(out.read_text())
    for S in (1, 3):
        rows = [r for r in result["results"] if r["batch"] == S]
        assert [r["layer"] for r in rows] == [*DENSE, "FFF leaf-MLP D2 x64", "FFF path-neuron D7"]
        base = {r["baseline"] for r in rows}
        assert len(base) == 1 and base <= set(DENSE)
        assert max(r["speedup_vs_baseline"] for r in rows if r["kind"] == "dense") == 1.0
        assert f"baseline: {base.pop()}" in printed
        assert all(r["ideal_speedup"] > 0 and "target" not in r for r in rows)


def test_the_benchmark_script_checks_the_json_against_its_targets(tmp_path, capsys):
    script = _script()

    def rec(kind, depth, batch, speedup, threads=1, width=4096):
        return {"kind": kind, "depth": depth, "batch": batch, "threads": threads, "width": width, "layer": kind,
                "baseline": bench.DENSE_ADDMM, "speedup_vs_baseline": speedup, "ideal_speedup": 300.0}

    result = {"results": [rec("path-neuron", 11, 1, 260.0), rec("path-neuron", 11, 4096, 40.0),
                          rec("leaf-MLP", 7, 64, 1.0), rec("leaf-MLP", 7, 1, 500.0, threads=2),
                          rec("dense", 0, 1, 1.0)]}
    rows = script.check_targets(result)
    assert [(r["batch"], r["target"], r["target_met"]) for r in rows] == [(1, 250.0, True), (4096, 100.0, False)]
    path = tmp_path / "r.json"
    path.write_text(json.dumps(result))
    assert script.main(["--check", str(path)]) == 0
    assert script.main(["--check", str(path), "--strict"]) == 1
    assert "NOT met" in capsys.readouterr().out
