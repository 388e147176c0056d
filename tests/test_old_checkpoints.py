"""Checkpoints written by main d1bb29b keep loading, and compute the same function, in the current code.

tests/data/checkpoints/ holds files saved by fff_moe_plugin at d1bb29b (its write.py, run on that commit, says how):
state dicts of the core blocks (one FFF's without the ``_extra_state`` config record, as state dicts written before
the config travelled are), of the DeepSpeed FFFMoE layer, a DeepSpeed engine checkpoint and a fairseq checkpoint,
each with inputs and the outputs that version computed on them. Each test builds the module with the current code,
loads the old file and compares outputs; the round-trip tests then save the loaded module's state dict in the
current format and load it into a freshly built module.

The engine check runs in a process of its own (DeepSpeed's process group): this file run as a script is the worker.
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import os
import sys
from pathlib import Path

import pytest
import torch
from helpers import assert_ok, run_rank_checks, run_rank_scripts
from torch import nn

import fff_moe_plugin
from fff_moe_plugin import DenseConfig, FFFConfig, PKMConfig, SigmaMoEConfig, UltraFastConfig, build_block

DATA = Path(__file__).resolve().parent / "data" / "checkpoints"
CORE = torch.load(DATA / "core.pt", weights_only=True)["layers"]
DEEPSPEED_LAYERS = torch.load(DATA / "deepspeed_layer.pt", weights_only=True)["layers"]
ENGINE = DATA / "deepspeed_engine"
FAIRSEQ = DATA / "fairseq"
CONFIGS = {c.kind: c for c in (FFFConfig, UltraFastConfig, SigmaMoEConfig, PKMConfig, DenseConfig)}
TOL = {"rtol": 1e-6, "atol": 1e-6}


def _round_trip(state: dict) -> dict:
    """``state`` through torch.save and torch.load(weights_only=True), as a checkpoint file takes it."""
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def _need_deepspeed() -> None:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    pytest.importorskip("deepspeed", reason='needs DeepSpeed: pip install "fff-moe-plugin[deepspeed]"')


def _toy_model():
    """tests/data/checkpoints/model.py, the engine checkpoint's network."""
    spec = importlib.util.spec_from_file_location("old_checkpoints_model", DATA / "model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ------------------------------------------------------------------------------------------------- core blocks
def _core_block(case: dict, seed: int = 1234) -> nn.Module:
    """The block of a core fixture, built from its config by the current code, freshly initialised."""
    torch.manual_seed(seed)  # not the fixture's seed: a load that does nothing cannot pass
    return build_block(CONFIGS[case["kind"]].from_dict(case["config"]))


def _assert_computes_the_fixture(block: nn.Module, case: dict) -> None:
    torch.testing.assert_close(block.eval()(case["x"]).output, case["eval_output"], **TOL)
    out = block.train()(case["x"])
    torch.testing.assert_close(out.output, case["train_output"], **TOL)
    torch.testing.assert_close(out.aux_loss, case["train_aux_loss"], **TOL)


@pytest.mark.parametrize("name", list(CORE))
def test_old_core_state_dict_loads_strictly_and_computes_the_same_function(name):
    case = CORE[name]
    block = _core_block(case)
    block.load_state_dict(dict(case["state_dict"]), strict=True)
    _assert_computes_the_fixture(block, case)


@pytest.mark.parametrize("name", list(CORE))
def test_old_core_state_dict_loads_under_a_prefix_inside_a_model(name):
    case = CORE[name]
    model = nn.ModuleDict({"inp": nn.Linear(case["x"].shape[-1], case["x"].shape[-1]), "ffn": _core_block(case)})
    state = {**{f"inp.{k}": v for k, v in model["inp"].state_dict().items()},
             **{f"ffn.{k}": v for k, v in case["state_dict"].items()}}
    model.load_state_dict(state, strict=True)
    _assert_computes_the_fixture(model["ffn"], case)


@pytest.mark.parametrize("name", list(CORE))
def test_old_core_state_dict_builds_its_block_with_from_state_dict(name):
    case = CORE[name]
    cls = type(_core_block(case))
    if "_extra_state" not in case["state_dict"]:
        with pytest.raises(ValueError):  # no saved config to build from
            cls.from_state_dict(dict(case["state_dict"]))
        return
    block = cls.from_state_dict(dict(case["state_dict"]))
    assert block.config.to_dict() == CONFIGS[case["kind"]].from_dict(case["config"]).to_dict()
    _assert_computes_the_fixture(block, case)


@pytest.mark.parametrize("name", list(CORE))
def test_old_core_state_dict_round_trips_in_the_current_format(name):
    case = CORE[name]
    loaded = _core_block(case)
    loaded.load_state_dict(dict(case["state_dict"]), strict=True)
    state = _round_trip(loaded.state_dict())
    assert "_extra_state" in state  # the current format carries the config, also for a state dict that had none
    fresh = _core_block(case, seed=4321)
    fresh.load_state_dict(state, strict=True)
    _assert_computes_the_fixture(fresh, case)
    _assert_computes_the_fixture(type(fresh).from_state_dict(state), case)


# ----------------------------------------------------------------------------------------- DeepSpeed FFFMoE layer
def _deepspeed_layer(case: dict, seed: int = 1234) -> nn.Module:
    from fff_moe_plugin.integrations.deepspeed import FFFMoE

    torch.manual_seed(seed)
    return FFFMoE(FFFConfig.from_dict(case["config"]), **case["kwargs"])


def _assert_layer_computes_the_fixture(layer: nn.Module, case: dict) -> None:
    torch.testing.assert_close(layer.eval()(case["x"])[0], case["eval_output"], **TOL)
    out, l_aux, _ = layer.train()(case["x"])
    torch.testing.assert_close(out, case["train_output"], **TOL)
    torch.testing.assert_close(l_aux, case["train_l_aux"], **TOL)


@pytest.mark.parametrize("name", list(DEEPSPEED_LAYERS))
def test_old_deepspeed_layer_state_dict_loads_strictly_and_computes_the_same_function(name):
    _need_deepspeed()
    case = DEEPSPEED_LAYERS[name]
    layer = _deepspeed_layer(case)
    layer.load_state_dict(dict(case["state_dict"]), strict=True)
    _assert_layer_computes_the_fixture(layer, case)
    # nothing is dropped at these capacities, so the core FFF with the same weights computes the same function
    torch.testing.assert_close(layer.to_fff().eval()(case["x"]).output, case["eval_output"], **TOL)


@pytest.mark.parametrize("name", list(DEEPSPEED_LAYERS))
def test_old_deepspeed_layer_state_dict_round_trips_in_the_current_format(name):
    _need_deepspeed()
    case = DEEPSPEED_LAYERS[name]
    loaded = _deepspeed_layer(case)
    loaded.load_state_dict(dict(case["state_dict"]), strict=True)
    fresh = _deepspeed_layer(case, seed=4321)
    fresh.load_state_dict(_round_trip(loaded.state_dict()), strict=True)
    _assert_layer_computes_the_fixture(fresh, case)


# ------------------------------------------------------------------------------------------- DeepSpeed engine
def check_engine_checkpoint(rank: int) -> None:
    """Rebuild the toy network and its engine, load the old checkpoint (weights and optimizer state): the same
    output, and one more training step gives the output the old run had after that step."""
    from fff_moe_plugin.deepspeed import initialize

    toy = _toy_model()
    expected = torch.load(ENGINE / "expected.pt", weights_only=True)
    torch.manual_seed(expected["model_seed"] + 1)  # another init, so that a load that does nothing cannot pass
    engine, *_ = initialize(model=toy.ToyNet(**expected["model"]), config=expected["ds_config"], verbose=False)
    assert not torch.allclose(toy.eval_output(engine, expected["x"]), expected["eval_output"])
    path, _ = engine.load_checkpoint(str(ENGINE), tag=expected["tag"])
    assert path is not None and engine.global_steps == 2
    torch.testing.assert_close(toy.eval_output(engine, expected["x"]), expected["eval_output"], **TOL)
    toy.train_step(engine, tuple(expected["batch"]))
    torch.testing.assert_close(toy.eval_output(engine, expected["x"]), expected["eval_output_after_step"], **TOL)


@pytest.mark.slow
def test_old_deepspeed_engine_checkpoint_loads_and_resumes_training(tmp_path):
    _need_deepspeed()
    assert_ok(run_rank_scripts(__file__, tmp_path, ["engine"], world=1), "engine")


# ---------------------------------------------------------------------------------------------------- fairseq
def test_old_fairseq_checkpoint_loads_and_computes_the_same_logits():
    pytest.importorskip("fairseq", reason="needs fairseq: pip install 'fff-moe-plugin[fairseq]'")
    from fairseq import checkpoint_utils, utils

    from fff_moe_plugin.integrations.fairseq import user_dir

    utils.import_user_module(argparse.Namespace(user_dir=user_dir()))
    models, cfg, task = checkpoint_utils.load_model_ensemble_and_task([str(FAIRSEQ / "checkpoint_last.pt")],
                                                                      arg_overrides={"data": str(FAIRSEQ)})
    model = models[0].eval()
    package = Path(fff_moe_plugin.__file__).resolve().parent
    assert package in Path(sys.modules[type(model).__module__].__file__).resolve().parents  # today's classes
    expected = torch.load(FAIRSEQ / "expected.pt", weights_only=True)
    with torch.no_grad():
        logits, _ = model(expected["tokens"])
    torch.testing.assert_close(logits, expected["logits"], **TOL)

    torch.manual_seed(1234)
    fresh = task.build_model(cfg.model).eval()
    fresh.load_state_dict(_round_trip(model.state_dict()), strict=True)
    with torch.no_grad():
        logits, _ = fresh(expected["tokens"])
    torch.testing.assert_close(logits, expected["logits"], **TOL)


if __name__ == "__main__":
    checks = {"engine": check_engine_checkpoint}
    run_rank_checks(sys.argv[1], {name: checks[name] for name in sys.argv[2:]})
