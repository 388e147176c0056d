"""The fairseq plugin in-process: registration, flags, the criterion's aux loss and statistics, presets.

Models are built through fairseq's own argument parsing and task (``options.parse_args_and_arch``,
``task.build_model``), on a dictionary written to a temporary folder.
"""

import argparse
import dataclasses
import importlib
import math

import pytest
import torch

fairseq = pytest.importorskip("fairseq", reason="needs fairseq: pip install 'fff-moe-plugin[fairseq]'")

from fairseq import options, tasks, utils  # noqa: E402
from fairseq.logging import metrics  # noqa: E402

from fff_moe_plugin.integrations.fairseq import user_dir  # noqa: E402
from fff_moe_plugin.integrations.fairseq.flags import DISPATCH_ATTRS, FAMILIES  # noqa: E402
from fff_moe_plugin.losses import usage_entropy  # noqa: E402

TINY = ["--decoder-embed-dim", "16", "--decoder-layers", "2", "--decoder-attention-heads", "2",
        "--decoder-ffn-embed-dim", "32", "--dropout", "0", "--tokens-per-sample", "8"]
BLOCK_FLAGS = {
    "transformer_lm_fff": ["--fff-depth", "2", "--fff-leaf-width", "8"],
    "transformer_lm_sigma_moe": ["--moe-n-experts", "4", "--moe-expert-size", "8", "--moe-top-k", "2"],
    "transformer_lm_pkm": ["--pkm-n-keys", "4", "--pkm-knn", "4"],
}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("dict")
    (d / "dict.txt").write_text("".join(f"w{i} {100 - i}\n" for i in range(20)))
    return d


def build(data_dir, arch, *extra, criterion="cross_entropy_fff", tiny=True):
    parser = options.get_training_parser()
    size = [*TINY, *BLOCK_FLAGS.get(arch, [])] if tiny else []
    args = options.parse_args_and_arch(parser, [
        str(data_dir), "--user-dir", user_dir(), "--task", "language_modeling", "--arch", arch,
        "--criterion", criterion, "--cpu", *size, *extra,
    ])
    task = tasks.setup_task(args)
    return task, task.build_model(args), task.build_criterion(args)


def sample_of(task, batch=4, length=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    d = task.dictionary
    tokens = torch.randint(d.nspecial, len(d), (batch, length + 1), generator=g)
    return {"net_input": {"src_tokens": tokens[:, :-1].contiguous(), "src_lengths": torch.full((batch,), length)},
            "target": tokens[:, 1:].contiguous(), "ntokens": batch * length}


def test_registered_classes_are_the_plugins_and_importing_twice_registers_once():
    from fairseq.criterions import CRITERION_REGISTRY
    from fairseq.models import ARCH_MODEL_REGISTRY, MODEL_REGISTRY

    utils.import_user_module(argparse.Namespace(user_dir=user_dir()))
    # the folder under its package name too: its __init__ only imports the real modules, nothing re-registers
    importlib.import_module("fff_moe_plugin.integrations.fairseq.fairseq_user_dir.fff_moe_fairseq")
    utils.import_user_module(argparse.Namespace(user_dir=user_dir()))
    from fff_moe_plugin.integrations.fairseq import criterion, models
    from fff_moe_plugin.integrations.fairseq import user_dir as still_the_function

    assert still_the_function() == user_dir()  # the folder's package does not shadow the function

    assert MODEL_REGISTRY["transformer_lm_fff"] is models.FFFLanguageModel
    assert MODEL_REGISTRY["transformer_lm_sigma_moe"] is models.SigmaMoELanguageModel
    assert MODEL_REGISTRY["transformer_lm_pkm"] is models.PKMLanguageModel
    assert ARCH_MODEL_REGISTRY["transformer_lm_fff_ptb_tiny"] is models.FFFLanguageModel
    assert CRITERION_REGISTRY["cross_entropy_fff"] is criterion.CrossEntropyFFFCriterion
    import sys

    assert sys.modules["fff_moe_fairseq"].models is models  # the --user-dir name imports the same modules


@pytest.mark.parametrize("family,model", [
    ("fff", "FFFLanguageModelConfig"), ("sigma_moe", "SigmaMoELanguageModelConfig"), ("pkm", "PKMLanguageModelConfig"),
])
def test_every_config_field_has_exactly_one_flag_with_help(family, model):
    from fff_moe_plugin.integrations.fairseq import models

    fam = FAMILIES[family]
    dc = getattr(models, model)
    own = {f.name: f for f in dataclasses.fields(dc) if f.name.startswith(fam.prefix + "_")}
    expected = {fam.attr(name) for name in fam.fields()} | {fam.every_attr}
    if len(fam.variants) > 1:
        expected.add(fam.variant_attr)
    if family == "fff":
        expected |= set(DISPATCH_ATTRS)
    assert set(own) == expected
    assert all(f.metadata.get("help") for f in own.values())


@pytest.mark.parametrize("arch,flags,named", [
    ("transformer_lm_fff", ["--fff-depth", "-1"], "--fff-depth"),
    ("transformer_lm_fff", ["--fff-train-mode", "sideways"], "--fff-train-mode"),
    ("transformer_lm_fff", ["--fff-load-balance", "tree"], "--fff-load-balance"),
    ("transformer_lm_fff", ["--fff-master-leaf-width", "8"], "--fff-master-leaf-width 8 is not allowed without "
                                                             "--fff-master-leaf"),
    ("transformer_lm_fff", ["--fff-variant", "path_neuron", "--fff-leaf-width", "8"], "--fff-leaf-width"),
    ("transformer_lm_fff", ["--fff-every", "3"], "--fff-every"),
    ("transformer_lm_sigma_moe", ["--moe-top-k", "5"], "--moe-top-k"),
    ("transformer_lm_pkm", ["--pkm-knn", "17"], "--pkm-knn"),
])
def test_bad_flag_values_fail_when_the_model_is_built_naming_the_flag(data_dir, arch, flags, named):
    with pytest.raises(ValueError, match=named):
        build(data_dir, arch, *flags)


@pytest.mark.parametrize("arch,flags,message", [
    ("transformer_lm_fff", ["--fff-region-leak", "1.5"], "--fff-region-leak 1.5 is not allowed: must be a finite "
                                                         "number in [0.0, 1.0]"),
    ("transformer_lm_sigma_moe", ["--moe-expert-dropout", "1"], "--moe-expert-dropout 1.0 is not allowed: must be "
                                                                "a finite number in [0.0, 1.0)"),
])
def test_float_flags_out_of_range_fail_while_the_command_line_is_parsed(data_dir, arch, flags, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        build(data_dir, arch, *flags)
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


def test_every_second_layer_gets_the_block_and_counts_match_the_configs(data_dir):
    from fff_moe_plugin.config import DenseConfig, FFFConfig
    from fff_moe_plugin.integrations.fairseq.layer import BlockDecoderLayer

    _, dense, _ = build(data_dir, "transformer_lm")
    _, fff, _ = build(data_dir, "transformer_lm_fff", "--fff-every", "2", "--fff-master-leaf")
    kinds = [isinstance(layer, BlockDecoderLayer) for layer in fff.decoder.layers]
    assert kinds == [False, True]
    n = sum(p.numel() for p in fff.parameters()) - sum(p.numel() for p in dense.parameters())
    block = FFFConfig(d_model=16, depth=2, leaf_width=8, master_leaf=True)
    assert n == block.num_parameters() - DenseConfig(d_model=16, d_ff=32).num_parameters()


def _node_grad(model, criterion, sample):
    model.zero_grad()
    loss, sample_size, log = criterion(model, sample)
    loss.backward()
    grads = [layer.ffn.router.node_weight.grad.flatten() for layer in model.decoder.block_layers()]
    return torch.cat(grads), sample_size


def test_aux_loss_reaches_the_node_gradients_scaled_by_sample_size(data_dir):
    torch.manual_seed(0)
    task, m0, crit = build(data_dir, "transformer_lm_fff", "--fff-load-balance", "leaf",
                           "--fff-load-balance-coef", "0", "--fff-train-mode", "hard")
    _, m1, _ = build(data_dir, "transformer_lm_fff", "--fff-load-balance", "leaf",
                     "--fff-load-balance-coef", "0.5", "--fff-train-mode", "hard")
    _, plain, ce = build(data_dir, "transformer_lm_fff", "--fff-train-mode", "hard", criterion="cross_entropy")
    m1.load_state_dict(m0.state_dict())
    plain.load_state_dict(m0.state_dict())
    sample = sample_of(task)
    g0, sample_size = _node_grad(m0, crit, sample)
    g1, _ = _node_grad(m1, crit, sample)
    g_plain, _ = _node_grad(plain, ce, sample)
    torch.testing.assert_close(g0, g_plain)  # coefficient 0: the cross-entropy gradient alone
    assert not torch.allclose(g1, g0)  # a positive coefficient moves the nodes
    # and by exactly coef * sample_size * d(balance)/d(nodes)
    m1.zero_grad()
    _, extra = m1(**sample["net_input"])
    (sample_size * sum(o.losses["load_balance"] for o in extra["block_outputs"].values())).backward()
    g_bal = torch.cat([layer.ffn.router.node_weight.grad.flatten() for layer in m1.decoder.block_layers()])
    torch.testing.assert_close(g1 - g0, 0.5 * g_bal, rtol=1e-4, atol=1e-6)


def test_usage_entropy_is_taken_over_counts_summed_across_workers():
    from fff_moe_plugin.integrations.fairseq.criterion import CrossEntropyFFFCriterion

    a, b = torch.tensor([4.0, 0.0, 0.0, 0.0]), torch.tensor([0.0, 0.0, 4.0, 4.0])
    logs = [{"loss": 8.0, "nll_loss": 8.0, "aux_loss": 0.0, "ntokens": n, "sample_size": n, "counts_0": c}
            for n, c in ((4, a), (8, b))]
    with metrics.aggregate() as agg:
        CrossEntropyFFFCriterion.reduce_metrics(logs)
    assert agg.get_smoothed_values()["usage_entropy"] == pytest.approx(float(usage_entropy(a + b)), abs=1e-3)
    assert agg.get_smoothed_values()["unused"] == 1.0
    assert agg.get_smoothed_values()["loss"] == pytest.approx(16 / 12 / math.log(2), abs=1e-3)


def test_level_imbalance_is_taken_over_node_counts_summed_across_workers():
    from fff_moe_plugin.integrations.fairseq.criterion import CrossEntropyFFFCriterion

    # a depth-2 tree: each worker's root is one-sided, the two together split evenly; level 1 is one-sided
    a = torch.tensor([[4.0, 4.0, 0.0], [0.0, 0.0, 0.0]])  # 4 tokens: all left, all left again
    b = torch.tensor([[4.0, 0.0, 4.0], [4.0, 0.0, 4.0]])  # 4 tokens: all right, all right again
    logs = [{"loss": 4.0, "nll_loss": 4.0, "aux_loss": 0.0, "ntokens": 4, "sample_size": 4, "counts_0": c,
             "nodes_0": n} for c, n in ((torch.tensor([4.0, 0, 0, 0]), a), (torch.tensor([0, 0, 0, 4.0]), b))]
    with metrics.aggregate() as agg:
        CrossEntropyFFFCriterion.reduce_metrics(logs)
    values = agg.get_smoothed_values()
    assert values["imbalance_l0"] == 0.0 and values["imbalance_l1"] == 1.0


def test_a_tree_layer_logs_its_node_counts(data_dir):
    task, model, criterion = build(data_dir, "transformer_lm_fff", "--fff-train-mode", "hard")
    sample = sample_of(task)
    _, _, log = criterion(model, sample)
    nodes = log["nodes_0"]  # depth 2: 3 nodes
    assert nodes.shape == (2, 3) and nodes[0, 0] == sample["ntokens"]  # every token reaches the root
    assert nodes[0, 1] + nodes[0, 2] == sample["ntokens"] and nodes[1, 0] == nodes[0, 2]
    assert set(k for k in log if k.startswith("nodes_")) == {"nodes_0", "nodes_1"}


def test_presets_are_parameter_equal_and_built_models_match_the_configs(data_dir):
    from fff_moe_plugin.integrations.fairseq.presets import KINDS, SETTINGS

    for setting in SETTINGS.values():
        counts = {k: c.num_parameters() for k, c in setting.blocks().items()}
        assert max(counts.values()) / min(counts.values()) - 1 < 0.01, (setting.name, counts)
    tiny = SETTINGS["ptb_tiny"]
    blocks = tiny.blocks()
    built = {k: build(data_dir, f"transformer_lm_{k}_ptb_tiny", tiny=False)[1] for k in KINDS}
    base = sum(p.numel() for p in built["dense"].parameters()) - tiny.layers * blocks["dense"].num_parameters()
    for kind, model in built.items():
        assert sum(p.numel() for p in model.parameters()) == base + tiny.layers * blocks[kind].num_parameters()


def test_path_neuron_variant_trains_a_step_through_the_criterion(data_dir):
    from fff_moe_plugin.ultrafast import UltraFastFFF

    parser = options.get_training_parser()
    args = options.parse_args_and_arch(parser, [
        str(data_dir), "--user-dir", user_dir(), "--task", "language_modeling", "--arch", "transformer_lm_fff",
        "--criterion", "cross_entropy_fff", "--cpu", *TINY, "--fff-variant", "path_neuron", "--fff-depth", "3",
    ])
    task = tasks.setup_task(args)
    model, crit = task.build_model(args), task.build_criterion(args)
    assert all(isinstance(layer.ffn, UltraFastFFF) for layer in model.decoder.block_layers())
    loss, sample_size, log = crit(model, sample_of(task))
    loss.backward()
    assert sample_size == 32 and torch.isfinite(loss)
    assert model.decoder.block_layers()[0].ffn.neuron_in.grad.abs().sum() > 0
    assert log["counts_0"].sum() == 32  # every token reaches one of the 8 bottom neurons
