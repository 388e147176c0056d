"""The block models without block flags: each block is sized to the parameters of the dense feedforward block
``transformer_lm`` would have; and float flags that are not finite numbers are refused before any work."""

import json
import math
import re
import subprocess

import pytest

pytest.importorskip("fairseq", reason="needs fairseq: pip install 'fff-moe-plugin[fairseq]'")

from fairseq import options, tasks  # noqa: E402
from helpers import FAIRSEQ_TINY, FAIRSEQ_TRAIN  # noqa: E402

from fff_moe_plugin.config import DenseConfig, FFFConfig, SigmaMoEConfig  # noqa: E402
from fff_moe_plugin.experiments.lm.data_bin import fairseq_command  # noqa: E402
from fff_moe_plugin.integrations.fairseq import user_dir  # noqa: E402
from fff_moe_plugin.integrations.fairseq.flags import FAMILIES, float_flag_types  # noqa: E402

ARCHS = ("transformer_lm_fff", "transformer_lm_sigma_moe", "transformer_lm_pkm")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("dict")
    (d / "dict.txt").write_text("".join(f"w{i} {100 - i}\n" for i in range(20)))
    return d


def build(data_dir, arch, d, d_ff, *flags):
    parser = options.get_training_parser()
    args = options.parse_args_and_arch(parser, [
        str(data_dir), "--user-dir", user_dir(), "--task", "language_modeling", "--arch", arch, "--cpu",
        "--decoder-embed-dim", str(d), "--decoder-ffn-embed-dim", str(d_ff), "--decoder-layers", "1",
        "--decoder-attention-heads", "2", *flags,
    ])
    return tasks.setup_task(args).build_model(args)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("d,d_ff,tolerance", [(64, 256, 0.05), (512, 2048, 0.01)])
def test_without_size_flags_the_block_has_the_dense_blocks_parameters(data_dir, arch, d, d_ff, tolerance):
    model = build(data_dir, arch, d, d_ff)
    (layer,) = model.decoder.block_layers()
    dense = 2 * d * d_ff + d_ff + d  # fc1 and fc2 of transformer_lm, with biases
    assert DenseConfig(d_model=d, d_ff=d_ff).num_parameters() == dense
    built = sum(p.numel() for p in layer.ffn.parameters())
    assert built == layer.ffn.config.num_parameters()
    assert abs(built - dense) / dense < tolerance, (layer.ffn.config, built, dense)


def test_the_defaults_follow_the_sigma_moe_paper_at_its_sizes(data_dir):
    # d_ff 2048: leaves of about 128 units (depth 4), 16 experts of 128 with top-4, 4 PKM heads
    fff, moe, pkm = (build(data_dir, arch, 512, 2048).decoder.block_layers()[0].ffn.config for arch in ARCHS)
    assert (fff.depth, fff.leaf_width) == (4, 127)
    assert (moe.n_experts, moe.expert_size, moe.top_k) == (16, 128, 4)
    assert (pkm.n_heads, pkm.knn) == (4, 128)


def test_a_given_size_flag_is_kept_and_the_other_is_matched(data_dir):
    dense = DenseConfig(d_model=64, d_ff=256).num_parameters()
    fff = build(data_dir, "transformer_lm_fff", 64, 256, "--fff-depth", "3").decoder.block_layers()[0].ffn.config
    assert fff.depth == 3
    widths = {w: FFFConfig(d_model=64, leaf_width=w, depth=3).num_parameters() for w in range(1, 200)}
    assert fff.leaf_width == min(widths, key=lambda w: abs(widths[w] - dense))  # the best width at depth 3
    fff = build(data_dir, "transformer_lm_fff", 64, 256, "--fff-leaf-width", "32").decoder.block_layers()[0].ffn.config
    depths = {D: FFFConfig(d_model=64, leaf_width=32, depth=D).num_parameters() for D in range(8)}
    assert fff.leaf_width == 32 and fff.depth == min(depths, key=lambda D: abs(depths[D] - dense))
    moe = build(data_dir, "transformer_lm_sigma_moe", 64, 256, "--moe-n-experts", "8").decoder.block_layers()[0]
    sizes = {g: SigmaMoEConfig(d_model=64, n_experts=8, expert_size=g).num_parameters() for g in range(1, 100)}
    best = min(sizes, key=lambda g: abs(sizes[g] - dense))
    assert (moe.ffn.config.n_experts, moe.ffn.config.expert_size) == (8, best)
    # every size flag given: used as it is
    given = build(data_dir, "transformer_lm_pkm", 64, 256, "--pkm-n-keys", "5", "--pkm-knn", "7")
    assert (given.decoder.block_layers()[0].ffn.config.n_keys, given.decoder.block_layers()[0].ffn.config.knn) == (5, 7)


def test_every_float_flag_refuses_nan_and_infinities_while_parsing(data_dir, capsys):
    checked = []
    for family, arch in zip(FAMILIES.values(), ARCHS):
        for flag in float_flag_types(family):
            for value in ("nan", "inf", "-inf"):
                with pytest.raises(SystemExit):
                    build(data_dir, arch, 16, 32, f"{flag}={value}")
                err = capsys.readouterr().err
                assert f"{flag} {float(value)} is not allowed: must be " in err and "finite number" in err, err
                checked.append(flag)
    assert {"--fff-hardening", "--fff-region-leak", "--fff-leaf-dropout", "--fff-load-balance-coef",
            "--fff-capacity-factor", "--moe-expert-dropout", "--moe-entropy-coef", "--moe-weight-scale"} <= set(checked)


def test_a_config_from_elsewhere_with_an_infinite_value_fails_at_build_naming_the_flag():
    # fairseq-hydra-train and the Python API hand the model a config that argparse never saw
    import argparse

    from fff_moe_plugin.integrations.fairseq.flags import block_config

    args = argparse.Namespace(decoder_embed_dim=16, decoder_ffn_embed_dim=32, fff_hardening=math.inf)
    message = r"--fff-hardening inf is not allowed: must be a finite number in \[0.0, inf\)"
    with pytest.raises(ValueError, match=message):
        block_config(args, FAMILIES["fff"])


TINY = FAIRSEQ_TINY
TRAIN = [*FAIRSEQ_TRAIN, "--cpu"]


def fairseq_train(lm_data_bin, save_dir, *flags):
    cmd = fairseq_command("train") + [str(lm_data_bin), "--user-dir", user_dir(), "--save-dir", str(save_dir), *TRAIN,
                                      *TINY, *flags]
    return subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
def test_fairseq_train_fff_without_block_flags_trains_and_logs_the_resolved_block(lm_data_bin, tmp_path):
    done = fairseq_train(lm_data_bin, tmp_path, "--arch", "transformer_lm_fff", "--max-update", "2")
    assert done.returncode == 0, done.stdout[-3000:]
    assert len(re.findall(r"\| train_inner \| (\{.*\})", done.stdout)) == 2
    # one line for the one block config, naming the dense block it was matched to: 2 * 16 * 32 + 32 + 16 parameters
    lines = [line for line in done.stdout.splitlines() if "fff_moe: decoder layers" in line]
    assert len(lines) == 1 and "FFFConfig(d_model=16, leaf_width=" in lines[0], done.stdout[-3000:]
    assert "d_model 16, d_ff 32: 1,072 parameters" in lines[0]
    assert (tmp_path / "checkpoint_last.pt").is_file()
    json.loads(re.findall(r"\| train_inner \| (\{.*\})", done.stdout)[-1])


@pytest.mark.slow
@pytest.mark.parametrize("flags, message", [
    (["--arch", "transformer_lm_fff", "--fff-hardening", "inf"],
     "--fff-hardening inf is not allowed: must be a finite number in [0.0, inf)"),
    (["--arch", "transformer_lm_sigma_moe", "--moe-entropy-coef", "nan"],
     "--moe-entropy-coef nan is not allowed: must be a finite number in [0.0, inf)"),
])
def test_fairseq_train_refuses_a_non_finite_float_flag_before_any_work(lm_data_bin, tmp_path, flags, message):
    done = fairseq_train(lm_data_bin, tmp_path, *flags, "--max-update", "2")
    assert done.returncode != 0
    assert message in done.stdout, done.stdout[-3000:]
    assert "train_inner" not in done.stdout and not list(tmp_path.glob("*.pt"))
