"""The comparison (``fff-moe compare``) end to end with the real fairseq tools on the toy corpus: validation
curves, test perplexity equal to fairseq-eval-lm's, pieces folding into one table, an interrupted piece
resuming to the uninterrupted result, and settings that cannot mix refused before any work."""

import json
import math
import re
import statistics
import subprocess

import pytest

pytest.importorskip("fairseq", reason="needs fairseq: pip install 'fff-moe-plugin[fairseq]'")

from fff_moe_plugin.cli import main  # noqa: E402
from fff_moe_plugin.experiments.lm import comparison, report  # noqa: E402
from fff_moe_plugin.experiments.lm.comparison import COMPUTE, PARAMS, Schedule  # noqa: E402
from fff_moe_plugin.experiments.lm.data_bin import fairseq_command  # noqa: E402
from fff_moe_plugin.integrations.fairseq import user_dir  # noqa: E402
from fff_moe_plugin.integrations.fairseq.presets import SETTINGS, Setting  # noqa: E402

pytestmark = pytest.mark.slow

# a setting the package does not register: its runs use the models' own architectures with every size as a flag
TINY = Setting("test_tiny", d_model=16, layers=2, heads=2, dense_ffn=64, dropout=0.0, context=16, fff_depth=2,
               expert_size=8, top_k=2, pkm_heads=1, pkm_knn=4, tied_embeddings=True)
SCHEDULE = Schedule(max_update=40, max_tokens=256, tokens_per_sample=16, lr=0.01, valid_points=2)


def runs_named(*labels):
    by = {r.label: r for r in comparison.default_runs(TINY)}
    return [by[label] for label in labels]


def test_the_default_models_are_parameter_equal_in_two_groups():
    setting = SETTINGS["ptb_small"]
    runs = comparison.default_runs(setting)
    ff = [r.block.num_parameters() for r in runs]
    assert (max(ff) - min(ff)) / max(ff) < 0.01
    moe = next(r for r in runs if r.label == "sigma_moe")
    assert moe.groups == (PARAMS, COMPUTE)
    compute = [r for r in runs if COMPUTE in r.groups and r.kind == "fff"]
    assert {r.block.n_trees for r in compute} == {1, 4}  # a tree and a forest
    share = moe.block.fraction_used_per_token()
    for r in compute:  # the share read is sigma-MoE's, as close as a whole depth allows
        assert abs(r.block.fraction_used_per_token() - share) < 0.01
    deep = [r for r in runs if r.kind == "fff" and 2.0 ** -r.block.depth <= 1 / 16]
    assert deep, "a tree reading at most 1/16 of its leaves is in the default set"
    # the default setting's feedforward blocks hold at least a third of the model (1k vocabulary, tied embeddings)
    embeddings = 1028 * setting.d_model
    attention = setting.layers * 4 * (setting.d_model ** 2 + setting.d_model)
    assert setting.layers * ff[0] / (setting.layers * ff[0] + attention + embeddings) > 1 / 3
    # the ablation's models are parameter-equal too, each with its one mechanism
    extra = {r.label: r.block for r in comparison.extra_runs(setting, 1600, bias_rate=0.02)}
    assert all(abs(b.num_parameters() - ff[0]) / ff[0] < 0.01 for b in extra.values())
    shifted = extra["fff+bias-shifted"]
    assert (shifted.bias_gate, shifted.load_balance, shifted.bias_update_rate) == ("shifted", "bias", 0.02)
    assert extra["fff+softstart"].soft_updates == 400 and extra["fff+master"].master_leaf


@pytest.fixture(scope="module")
def folded(lm_data_bin, tmp_path_factory):
    """Pieces run separately into one folder: dense with seeds 1 and 2, sigma-MoE and a depth-2 tree with seed 1."""
    out = tmp_path_factory.mktemp("compare")
    runs = runs_named("dense", "sigma_moe", "fff-d2+lb")
    comparison.compare(runs[:2], TINY, lm_data_bin, out, SCHEDULE, [1], say=lambda s: None)
    comparison.compare(runs[:1], TINY, lm_data_bin, out, SCHEDULE, [2], say=lambda s: None)
    comparison.compare(runs[2:], TINY, lm_data_bin, out, SCHEDULE, [1], say=lambda s: None)
    return out, runs


def test_a_piece_records_its_curve_and_scores_test_as_fairseq_eval_lm(folded, lm_data_bin):
    out, runs = folded
    run = runs[2]
    [result] = comparison.collect(out, [run])[run.label]
    assert [p["update"] for p in result.curve] == [20, 40]
    assert result.valid_ppl == result.curve[-1]["ppl"]
    assert result.best_valid_ppl == min(p["ppl"] for p in result.curve)
    assert all("usage_entropy" in p and "imbalance_l0" in p for p in result.curve)
    # the train log's points carry the trees' gradient norms (nodes and leaves) and the routing diagnostics
    assert [p["update"] for p in result.train_curve] == list(range(4, 41, 4))
    assert all(p["gnorm_nodes"] > 0 and p["gnorm_leaves"] > 0 and "imbalance_l1" in p for p in result.train_curve)
    assert result.ff_params == TINY.layers * run.block.num_parameters()
    ckpt = out / run.label / "seed1" / "checkpoints" / "checkpoint_last.pt"
    done = subprocess.run(fairseq_command("eval_lm") + [
        str(lm_data_bin), "--path", str(ckpt), "--user-dir", user_dir(), "--task", "language_modeling",
        "--gen-subset", "test", "--tokens-per-sample", "16", "--sample-break-mode", "none", "--max-tokens", "256",
        "--cpu", "--num-workers", "0"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert done.returncode == 0, done.stdout[-3000:]
    cli = float(re.search(r"Perplexity: ([\d.]+)", done.stdout).group(1))
    assert result.test_ppl == pytest.approx(cli, abs=0.006)  # the CLI prints two decimals
    # the same piece again is reused, not retrained
    said = []
    [again] = comparison.compare([run], TINY, lm_data_bin, out, SCHEDULE, [1], say=said.append)
    assert again == result and any("reusing" in s for s in said)


def test_an_interrupted_piece_resumes_to_the_uninterrupted_result(folded, lm_data_bin, tmp_path):
    out, runs = folded
    run = runs[2]
    [whole] = comparison.collect(out, [run])[run.label]

    def stop_after_the_first_point(line):
        m = re.match(r"\s+update\s+(\d+)/", line)
        if m and int(m.group(1)) > 20:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        comparison.compare([run], TINY, lm_data_bin, tmp_path, SCHEDULE, [1], say=stop_after_the_first_point)
    piece = tmp_path / run.label / "seed1"
    assert not (piece / "result.json").exists()
    assert [p["update"] for p in json.loads((piece / "curve.json").read_text())] == [20]
    said = []
    [resumed] = comparison.compare([run], TINY, lm_data_bin, tmp_path, SCHEDULE, [1], say=said.append)
    assert any("resuming from" in s and "update 20" in s for s in said)
    assert [p["update"] for p in resumed.curve] == [20, 40]
    for p, q in zip(resumed.curve, whole.curve):
        assert p["ppl"] == pytest.approx(q["ppl"], rel=1e-3)
    assert resumed.test_ppl == pytest.approx(whole.test_ppl, rel=1e-4)
    assert resumed.wall_s > 0


def test_pieces_fold_into_one_table_with_mean_and_std(folded):
    out, runs = folded
    found = comparison.collect(out, runs)
    assert [r.seed for r in found["dense"]] == [1, 2] and [r.seed for r in found["sigma_moe"]] == [1]
    summaries = report.summarise(found, runs)
    dense = summaries[0]
    assert not dense.gradients and summaries[2].gradients  # trees only
    values = [r.valid_ppl for r in found["dense"]]
    assert dense.valid.mean == pytest.approx(statistics.fmean(values))
    assert dense.valid.std == pytest.approx(statistics.stdev(values))
    assert dense.curve[-1]["lo"] == min(values) and dense.curve[-1]["hi"] == max(values)
    assert dense.valid.std > 0  # the seeds differ
    assert summaries[1].valid.std is None
    table = report.text_table(summaries)
    params_part, compute_part = table.split("Equal active compute")
    assert "dense" in params_part and "fff-d2+lb" not in params_part
    assert "sigma_moe" in compute_part and "fff-d2+lb" in compute_part
    notes = report.findings(summaries)
    assert any(n.startswith("Ranking, equal parameters") for n in notes)
    assert any(n.startswith("Equal active compute: fff-d2+lb") for n in notes)
    paths = report.write(summaries, out, {"setting": "test_tiny"}, notes)
    saved = json.loads(paths["json"].read_text())
    assert [s["label"] for s in saved["summaries"]] == ["dense", "sigma_moe", "fff-d2+lb"]
    assert paths["plot"].stat().st_size > 0
    # the ablation table: the trees only, with their routing at the last validation and gradients at the last log
    table = report.ablation(saved, base="fff-d2+lb").splitlines()
    assert table[0].startswith("| model | % FF read | valid ppl | vs fff-d2+lb | usage entropy (max) | unused | "
                               "imbalance l0 | imbalance l1 | gnorm nodes | gnorm leaves |")
    [row] = table[2:]
    tree = found["fff-d2+lb"][0]
    assert row.startswith(f"| fff-d2+lb | {tree.ff_percent_used:.1f} | {tree.valid_ppl:.2f} | +0.0% |")
    assert row.endswith(f"| {tree.train_curve[-1]['gnorm_nodes']:.4f} | {tree.train_curve[-1]['gnorm_leaves']:.4f} |")


def test_the_command_runs_both_groups_and_refuses_other_settings_in_the_same_out(lm_data_bin, tmp_path, capsys):
    out = tmp_path / "c"
    common = ["compare", "--data", str(lm_data_bin), "--out", str(out), "--max-tokens", "256",
              "--tokens-per-sample", "16", "--valid-points", "1"]
    assert main(common + ["--max-update", "2", "--only", "sigma_moe"]) == 0  # a model of both groups
    printed = capsys.readouterr().out
    assert "Equal parameters" in printed and "Equal active compute" in printed
    assert "Ranking" not in printed  # one model: nothing to rank
    assert (out / "comparison.png").is_file() and (out / "comparison.md").is_file()
    before = sorted(p.name for p in out.iterdir())
    assert main(common + ["--max-update", "3", "--only", "dense"]) == 2
    err = capsys.readouterr().err
    assert "holds a comparison with other settings" in err and "updates per model: 2 there, 3 now" in err
    assert sorted(p.name for p in out.iterdir()) == before


def test_the_shift_report_reads_a_tree_checkpoint_and_refuses_a_dense_one(folded, lm_data_bin, capsys):
    out, _ = folded
    tree_ckpt = out / "fff-d2+lb" / "seed1" / "checkpoints" / "checkpoint_last.pt"
    rows = comparison.shift_effect(tree_ckpt, lm_data_bin, 16, batches=2)
    assert [r["layer"] for r in rows] == [0, 1]  # one row per tree layer
    for r in rows:  # no bias balancing: every decision follows its logit
        assert r["paths"] > 0 and r["against"] == [0.0, 0.0] and r["against_any"] == 0.0
        assert r["gate_against"] is None and 0.25 < r["gate_rest"] <= 1.0 and r["shift_max"] == 0.0
    assert report.main(["shifts", str(tree_ckpt), "--data", str(lm_data_bin), "--tokens-per-sample", "16",
                        "--batches", "2"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].startswith("| layer | against l0 | against l1 | paths turned |") and len(table) == 4
    assert table[2].startswith("| 0 | 0.0% | 0.0% | 0.0% | - |")
    dense_ckpt = out / "dense" / "seed1" / "checkpoints" / "checkpoint_last.pt"
    with pytest.raises(ValueError, match="holds no tree layer"):
        comparison.shift_effect(dense_ckpt, lm_data_bin, 16, batches=1)
    with pytest.raises(SystemExit):
        report.main(["shifts", str(tree_ckpt), "--data", str(out)])
    assert "holds no dict.txt" in capsys.readouterr().err


def test_the_ranking_is_checked_against_a_longer_run(tmp_path):
    def summary(label, valid, seeds=(1,)):
        r = comparison.Result(label=label, description="", seed=1, params=1, ff_params=1, ff_percent_used=10.0,
                              valid_ppl=valid, best_valid_ppl=valid, best_update=1, test_ppl=valid,
                              train_tokens_per_s=1.0, ff_infer_tokens_per_s=1.0,
                              curve=[{"update": 1, "ppl": valid}])
        return report.summarise({label: [r]}, runs_named(label))[0]

    context = {"setting": "test_tiny", "updates per model": 10}
    short = [summary("dense", 10.0), summary("fff", 12.0), summary("fff+lb", 11.0)]
    ref = tmp_path / "lm.json"
    long = [summary("dense", 5.0), summary("fff", 5.5), summary("fff+lb", 6.0)]
    report.write(long, tmp_path / "long", {**context, "updates per model": 100}, [])
    ref.write_text((tmp_path / "long" / "comparison.json").read_text())
    said = report.against_reference(short, context, ref)
    assert said.startswith("This length is not telling: 1 pair(s)") and "fff+lb ahead of fff here" in said
    assert report.against_reference(long, {**context, "updates per model": 10}, ref).startswith("Every ranking")
    assert "other settings" in report.against_reference(short, {**context, "setting": "x"}, ref)
    assert "absent" in report.against_reference(short, context, tmp_path / "none.json")
    # a pair within the seeds' noise there has no order to hold
    saved = json.loads(ref.read_text())
    for s in saved["summaries"]:
        s["valid"]["std"] = 0.6 if s["label"] != "dense" else 0.1
    ref.write_text(json.dumps(saved))
    assert report.against_reference(short, context, ref).startswith("Every ranking")
    assert math.isclose(report.Stat.of([1.0, 3.0]).std, math.sqrt(2.0))
    # what length did to each gap: fff is 20% behind dense at 10 updates and 10% at 100
    report.write(short, tmp_path / "short", context, [])
    table = report.length_effect(json.loads((tmp_path / "short" / "comparison.json").read_text()),
                                 json.loads(ref.read_text()))
    assert "| fff | 10.0 | 12.00 | 5.50 | +20.0% | +10.0% | - | - |" in table.splitlines()
