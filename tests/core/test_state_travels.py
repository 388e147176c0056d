"""A block's config travels with its weights: the state dict carries it, a load that would change the layer's
function is refused naming the field, training-only settings may differ, and older state dicts still load."""

from __future__ import annotations

import dataclasses
import io
import warnings

import pytest
import torch

from fff_moe_plugin import (
    FFF,
    PKM,
    DenseConfig,
    DenseFFN,
    FFFConfig,
    PKMConfig,
    SigmaMoE,
    SigmaMoEConfig,
    UltraFastConfig,
    UltraFastFFF,
    build_block,
)

CONFIGS = [
    FFFConfig(d_model=16, leaf_width=8, depth=3, train_mode="hard", master_leaf=True),
    UltraFastConfig(d_model=16, depth=3),
    SigmaMoEConfig(d_model=16, n_experts=4, expert_size=4, top_k=2),
    PKMConfig(d_model=16, n_keys=4, knn=4),
    DenseConfig(d_model=16, d_ff=32),
]


def _round_trip(state: dict) -> dict:
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)  # the saved config is plain data


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: type(c).__name__)
def test_state_dict_carries_the_resolved_config(config):
    block = build_block(config)
    state = _round_trip(block.state_dict())
    assert state["_extra_state"] == {"kind": config.kind, "config": config.to_dict()}
    rebuilt = type(block).from_state_dict(state).eval()
    x = torch.randn(5, 16)
    torch.testing.assert_close(rebuilt(x).output, block.eval()(x).output, rtol=0, atol=0)


def test_hard_trained_weights_refuse_a_soft_layer():
    hard = FFF(FFFConfig(d_model=16, leaf_width=8, depth=3, train_mode="hard"))
    soft = FFF(FFFConfig(d_model=16, leaf_width=8, depth=3))
    with pytest.raises(ValueError, match=r"FFFConfig.train_mode.*trained with train_mode = 'hard'.*'soft'"):
        soft.load_state_dict(hard.state_dict())


@pytest.mark.parametrize("field,value", [("activation", "gelu"), ("train_mode", "soft")])
def test_a_refused_load_inside_a_model_names_the_module(field, value):
    trained = torch.nn.Sequential(torch.nn.Linear(16, 16),
                                  FFF(FFFConfig(d_model=16, leaf_width=8, depth=2, train_mode="hard")))
    other = torch.nn.Sequential(torch.nn.Linear(16, 16), FFF(dataclasses.replace(trained[1].config, **{field: value})))
    with pytest.raises(ValueError, match=rf"FFFConfig.{field} \(at '1'\)"):
        other.load_state_dict(trained.state_dict())


@pytest.mark.parametrize("block,field,value", [
    (SigmaMoE(SigmaMoEConfig(d_model=16, n_experts=4, expert_size=4, top_k=2)), "top_k", 3),
    (PKM(PKMConfig(d_model=16, n_keys=4, knn=4)), "knn", 8),
    (UltraFastFFF(UltraFastConfig(d_model=16, depth=3)), "activation", "relu"),
    (DenseFFN(DenseConfig(d_model=16, d_ff=32)), "activation", "gelu"),
], ids=["sigma_moe", "pkm", "path_neuron", "dense"])
def test_every_block_refuses_a_function_changing_load(block, field, value):
    other = type(block)(dataclasses.replace(block.config, **{field: value}))
    with pytest.raises(ValueError, match=rf"\.{field}"):
        other.load_state_dict(block.state_dict())


def test_training_only_settings_may_differ():
    base = FFFConfig(d_model=16, leaf_width=8, depth=3, train_mode="hard")
    trained = FFF(base)
    finetune = FFF(dataclasses.replace(base, hardening=3.0, region_leak=0.1, load_balance="leaf", leaf_dropout=0.1))
    finetune.load_state_dict(trained.state_dict())
    torch.testing.assert_close(finetune.router.node_weight, trained.router.node_weight)


def test_another_blocks_weights_are_refused_by_kind():
    dense = DenseFFN(DenseConfig(d_model=16, d_ff=32))
    state = dense.state_dict()
    fff = FFF(FFFConfig(d_model=16, leaf_width=8, depth=2))
    with pytest.raises(ValueError, match="saved by a 'dense' block, this is a 'fff' block"):
        fff.load_state_dict({**fff.state_dict(), "_extra_state": state["_extra_state"]})


def test_state_dicts_without_a_config_still_load():
    # the form written before configs travelled with the weights: tensors only
    old = FFF(FFFConfig(d_model=16, leaf_width=8, depth=3, train_mode="hard"))
    state = {k: v for k, v in old.state_dict().items() if k != "_extra_state"}
    new = FFF(FFFConfig(d_model=16, leaf_width=8, depth=3, train_mode="hard"))
    assert new.load_state_dict(state).missing_keys == []
    torch.testing.assert_close(new.leaves.w1, old.leaves.w1)
    with pytest.raises(ValueError, match="holds no saved config"):
        FFF.from_state_dict(state)


def test_nonfinite_tokens_are_counted_and_warned_once():
    layer = FFF(FFFConfig(d_model=8, leaf_width=4, depth=2)).eval()
    x = torch.randn(6, 8)
    x[1, 3] = float("nan")
    x[4, 0] = float("inf")
    with pytest.warns(RuntimeWarning, match="2 token\\(s\\) reached the tree with non-finite node logits"):
        out = layer(x)
    assert out.stats["nonfinite_tokens"].item() == 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = layer(x)  # once per layer
    assert again.stats["nonfinite_tokens"].item() == 2
    assert layer(torch.randn(3, 8)).stats["nonfinite_tokens"].item() == 0
