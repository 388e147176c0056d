"""Nothing silently wrong: every float field refuses NaN and +-inf, configs are immutable once validated, settings
that would do nothing are refused, messages point at the field, and the command line refuses bad values with
exit code 2 before it writes anything."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from fff_moe_plugin import DenseConfig, FFFConfig, PKMConfig, SigmaMoE, SigmaMoEConfig, UltraFastConfig
from fff_moe_plugin.cli import main

BASE = {
    FFFConfig: dict(d_model=8, leaf_width=4, depth=2, master_leaf=True),
    UltraFastConfig: dict(d_model=8, depth=2),
    SigmaMoEConfig: dict(d_model=8, n_experts=4, expert_size=2, top_k=2),
    PKMConfig: dict(d_model=8, n_keys=4, knn=4),
    DenseConfig: dict(d_model=8, d_ff=16),
}


def _float_fields(cls) -> list[str]:
    return [f.name for f in dataclasses.fields(cls) if f.type in ("float", float)]


FLOAT_CASES = [(cls, name, bad) for cls in BASE for name in _float_fields(cls)
               for bad in (math.inf, -math.inf, math.nan)]


def test_every_config_has_float_fields_to_check():
    # the parametrisation below must not be empty for the blocks that have float knobs
    assert {cls for cls, _, _ in FLOAT_CASES} == {FFFConfig, SigmaMoEConfig, DenseConfig}
    assert "weight_scale" in _float_fields(SigmaMoEConfig) and "hardening" in _float_fields(FFFConfig)


@pytest.mark.parametrize("cls,name,bad", FLOAT_CASES, ids=[f"{c.__name__}.{n}={b}" for c, n, b in FLOAT_CASES])
def test_every_float_field_refuses_nan_and_infinity(cls, name, bad):
    with pytest.raises(ValueError, match=rf"{cls.__name__}\.{name} = .*(inf|nan).*finite"):
        cls.from_dict({**BASE[cls], name: bad})


@pytest.mark.parametrize("cls", list(BASE), ids=lambda c: c.__name__)
def test_configs_are_immutable_once_validated(cls):
    config = cls.from_dict(BASE[cls])
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.d_model = 4096
    # a changed copy goes through validation again
    with pytest.raises(ValueError, match="d_model"):
        dataclasses.replace(config, d_model=0)


def test_a_changed_depth_cannot_reach_the_layer():
    c = FFFConfig(d_model=8, leaf_width=4, depth=2)
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.depth = 40
    with pytest.raises(ValueError, match="depth = 40"):
        dataclasses.replace(c, depth=40)


def test_numpy_and_torch_integers_are_sizes():
    c = FFFConfig(d_model=np.int64(8), leaf_width=np.int32(4), depth=torch.tensor(3).item())
    assert (c.d_model, c.leaf_width, c.depth) == (8, 4, 3)
    assert type(c.d_model) is int and type(c.leaf_width) is int
    c = FFFConfig(d_model=8, leaf_width=4, depth=np.int64(3), hardening=np.float32(0.5))
    assert c.depth == 3 and type(c.depth) is int and c.hardening == 0.5 and type(c.hardening) is float


def test_an_integer_field_names_the_type_it_got():
    with pytest.raises(ValueError, match=r"FFFConfig.depth = '3'.*integer is required, got str"):
        FFFConfig(d_model=8, leaf_width=4, depth="3")


def test_from_dict_refuses_a_non_mapping_naming_what_it_takes():
    with pytest.raises(ValueError, match=r"FFFConfig.from_dict takes a mapping .* got list; fields: d_model"):
        FFFConfig.from_dict([("d_model", 8)])


def test_master_leaf_width_without_master_leaf_is_refused():
    with pytest.raises(ValueError, match="master_leaf_width = 16.*needs master_leaf = true"):
        FFFConfig(d_model=8, leaf_width=4, depth=2, master_leaf_width=16)
    plain = FFFConfig(d_model=8, leaf_width=4, depth=2)
    assert plain.master_leaf_width is None
    assert FFFConfig.from_dict(plain.to_dict()) == plain  # the resolved config round-trips
    assert FFFConfig(d_model=8, leaf_width=4, depth=2, master_leaf=True).master_leaf_width == 4


def test_sigma_moe_expert_dropout_acts_when_every_expert_is_selected():
    torch.manual_seed(0)
    config = SigmaMoEConfig(d_model=8, n_experts=4, expert_size=3, top_k=4, expert_dropout=0.5)
    layer = SigmaMoE(config).train()
    no_dropout = SigmaMoE(dataclasses.replace(config, expert_dropout=0.0)).train()
    no_dropout.load_state_dict(layer.state_dict(), strict=False)
    x = torch.randn(64, 8)
    torch.manual_seed(1)
    out = layer(x)
    # every token sees about half of its experts removed: the outputs and the counts change
    assert not torch.allclose(out.output, no_dropout(x).output)
    assert 0.3 * 4 * 64 < out.stats["counts"].sum() < 0.7 * 4 * 64
    # the reference: the same draw, each dropped expert contributing nothing
    torch.manual_seed(1)
    dropped = torch.rand(64, 4) < 0.5
    logits = x @ layer.selection.t()
    gate = torch.sigmoid(logits).masked_fill(dropped, 0.0)
    ref = sum(gate[:, e:e + 1] * (torch.relu(x @ layer.keys[e]) @ layer.values[e]) for e in range(4))
    torch.testing.assert_close(out.output, ref, rtol=1e-5, atol=1e-6)


# -- the command line -------------------------------------------------------------------------------------
def test_compare_refuses_nan_scale_naming_the_flag(capsys, tmp_path):
    assert main(["compare", "--scale", "nan", "--out", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err
    assert "--scale nan is not allowed: must be a finite number" in err
    assert not (tmp_path / "c").exists()


def test_compare_refusals_exit_with_2(capsys, tmp_path):
    assert main(["compare", "--setting", "huge", "--out", str(tmp_path / "c")]) == 2
    assert "--setting 'huge' is not allowed" in capsys.readouterr().err
    assert main(["compare", "--only", "nothing", "--out", str(tmp_path / "c")]) == 2
    assert "--only nothing is not allowed" in capsys.readouterr().err
    for flags, said in ((["--seeds", "0"], "--seeds 0 is not allowed: at least 1"),
                        (["--seed", "0"], "--seed 0 is not allowed: seeds count from 1"),
                        (["--valid-points", "0"], "--valid-points 0 is not allowed"),
                        (["--forest-trees", "0"], "--forest-trees 0 is not allowed"),
                        (["--bias-update-rate", "0"], "--bias-update-rate 0.0 is not allowed: must be > 0"),
                        (["--balance-coef=-inf"], "--balance-coef -inf is not allowed: must be a finite number"),
                        (["--seed", "2", "--seeds", "3"], "--seed 2 and --seeds 3 cannot go together"),
                        (["--tokenizer", "word", "--vocab-size", "100"], "--vocab-size 100 is not allowed with"),
                        (["--data", str(tmp_path), "--vocab-size", "100"], "cannot go with --data")):
        assert main(["compare", *flags, "--out", str(tmp_path / "c")]) == 2
        assert said in capsys.readouterr().err
    assert not (tmp_path / "c").exists()
    assert main(["cpu-ranks", "-n", "2"]) == 2
    assert "after '--'" in capsys.readouterr().err


@pytest.mark.parametrize("flag,value", [("--expert-size", "0"), ("--top-k", "0"), ("--pkm-knn", "0"),
                                        ("--pkm-heads", "-1"), ("--fff-depth", "-1")])
def test_match_refuses_bad_sizes_without_traceback(capsys, flag, value):
    assert main(["match", "--d-model", "16", "--dense-ffn", "64", flag, value]) == 2
    err = capsys.readouterr().err
    assert f"{flag[2:].replace('-', '_')} = {value} is not allowed" in err and "Traceback" not in err


def test_repro_efff_refuses_infinite_lr_before_writing(capsys, tmp_path):
    out = tmp_path / "x"
    assert main(["repro-efff", "--grids", "mnist-16", "--lr", "inf", "--out", str(out)]) == 2
    assert "--lr inf is not allowed" in capsys.readouterr().err
    assert not out.exists()


def test_repro_efff_refuses_a_missing_data_directory_before_writing(capsys, tmp_path):
    out = tmp_path / "x"
    assert main(["repro-efff", "--grids", "mnist-16", "--seeds", "1", "--mnist", str(tmp_path / "nonexistent"),
                 "--out", str(out)]) == 2
    assert "is not a directory" in capsys.readouterr().err
    assert not out.exists()


def test_a_diverged_run_is_not_recorded(tmp_path):
    from fff_moe_plugin.experiments.efff.protocol import Schedule

    with pytest.raises(ValueError, match="lr = inf is not allowed"):
        Schedule(lr=math.inf)
    # a finite but absurd learning rate that makes the loss overflow: the run stops, nothing is written
    assert main(["repro-efff", "--grids", "mnist-16", "--seeds", "1", "--settings", "8x1", "--variants", "fff",
                 "--phase1-epochs", "1", "--phase2-epochs", "0", "--max-steps", "5", "--lr", "1e30",
                 "--no-plots", "--out", str(tmp_path)]) == 2
    runs = tmp_path / "runs.jsonl"
    assert not runs.exists() or runs.read_text().strip() == ""
