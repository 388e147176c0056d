"""Parameter matching: the tool's counts are the built models' counts, and matches are close."""

import json

import pytest

from fff_moe_plugin import FFFConfig, build_block
from fff_moe_plugin.cli import main
from fff_moe_plugin.matching import KINDS, match


@pytest.mark.parametrize("d_model,dense_ffn", [(412, 2053), (32, 128), (64, 300)])
def test_counts_equal_built_models_and_are_close(d_model, dense_ffn):
    rows = match(d_model, dense_ffn, KINDS, expert_size=16 if d_model < 100 else 128, top_k=2)
    for r in rows:
        block = build_block(r.config)
        assert r.params == sum(p.numel() for p in block.parameters())
        # a path-neuron tree can only double, so it matches to within a third
        assert abs(r.rel_diff) < (0.34 if r.kind == "path_neuron" else 0.05), (r.kind, r.rel_diff)


def test_sigma_moe_paper_wikitext103_small_setting_is_found():
    # docs/methods.md §4: d 412, MoE 16 x 128 K=4, PKM 62^2 slots, dense d_ff 2053 (4.985 * 412)
    rows = {r.kind: r for r in match(412, 2053, ["sigma_moe", "pkm", "fff"])}
    assert (rows["sigma_moe"].config.n_experts, rows["sigma_moe"].config.expert_size) == (16, 128)
    assert rows["pkm"].config.n_keys == 62
    assert abs(rows["fff"].rel_diff) < 0.01 and abs(rows["sigma_moe"].rel_diff) < 0.01


def test_cli_prints_table_and_json(capsys):
    assert main(["match", "--d-model", "412", "--dense-ffn", "2053", "--to", "fff", "sigma_moe", "pkm"]) == 0
    out = capsys.readouterr().out
    assert "n_experts=16 expert_size=128 top_k=4" in out and "1,694,137" in out
    assert main(["match", "--d-model", "32", "--dense-ffn", "128", "--to", "fff", "--json", "--fff-depth", "2"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["kind"] for r in rows] == ["dense", "fff"] and rows[1]["config"]["depth"] == 2
    assert rows[1]["params"] == build_block(FFFConfig(**rows[1]["config"])).num_parameters()


def test_unknown_kind_is_refused():
    with pytest.raises(ValueError, match="unknown block kind.*moe.*allowed"):
        match(32, 128, ["moe"])


def test_cli_reports_bad_values_without_traceback(capsys):
    assert main(["match", "--d-model", "8", "--dense-ffn", "0"]) == 2
    assert "DenseConfig.d_ff = 0 is not allowed" in capsys.readouterr().err
