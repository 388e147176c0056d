"""The tree's parts as modules: TreeRouter and its Routing record, the leaf modules, DispatchConfig, the legacy keys."""

import copy
import dataclasses
import math

import pytest
import torch

from fff_moe_plugin import FFF, DispatchConfig, FFFConfig, Routing, TreeRouter, tree
from fff_moe_plugin.leaves import LeafBank, LeafMLP, MasterLeaf
from fff_moe_plugin.router import LEGACY_NAMES, current_key, move_legacy_keys


def _config(**kw) -> FFFConfig:
    values = dict(d_model=6, leaf_width=4, depth=3, train_mode="hard", load_balance="leaf", hardening=0.1)
    values.update(kw)
    return FFFConfig(**values)


# ------------------------------------------------------------------------------------------------- TreeRouter
def test_hard_routing_is_the_tree_descent_with_the_path_probability_as_gate():
    router = TreeRouter(_config()).double().train()
    x = torch.randn(50, 6, dtype=torch.float64)
    r = router(x)
    nodes, logits, end = tree.descend(x, router.node_weight, router.node_bias, 3)
    assert torch.equal(r.path_nodes, nodes) and torch.equal(r.leaf, end - 7)
    torch.testing.assert_close(r.path_logits, logits)
    p = tree.leaf_probs(router.node_logits(x), 3)  # [S, L]
    torch.testing.assert_close(r.gate, p.gather(1, r.leaf[:, None])[:, 0])
    assert not r.soft and r.leaf_log_probs is None
    # leaf balancing needs every node's logit: the descent's own, without leak
    torch.testing.assert_close(r.balance_logits, router.node_logits(x))


def test_soft_routing_returns_the_leaf_distribution_and_eval_of_a_soft_tree_is_unscaled():
    router = TreeRouter(_config(train_mode="soft")).double().train()
    x = torch.randn(40, 6, dtype=torch.float64)
    r = router(x)
    assert r.soft
    torch.testing.assert_close(r.leaf_log_probs.exp().sum(1), torch.ones(40, dtype=torch.float64))
    torch.testing.assert_close(r.leaf_log_probs.exp(), tree.leaf_probs(r.all_logits, 3))
    assert torch.equal(router.eval()(x).gate, torch.ones(40, dtype=torch.float64))


def test_losses_are_the_configs_weighted_terms_in_training_and_zeros_in_eval():
    c = _config()
    router = TreeRouter(c).train()
    x = torch.randn(64, 6)
    r = router(x)
    aux, losses = router.losses(r)
    expected = c.hardening * losses["hardening"] + c.load_balance_coef * losses["load_balance"]
    torch.testing.assert_close(aux, expected)
    assert losses["load_balance"] >= 1.0 - 1e-6  # the Switch-style loss is 1 at balance, larger otherwise
    aux, losses = router.eval().losses(router(x))
    assert aux == 0 and all(v == 0 for v in losses.values())


def test_routing_select_keeps_the_rows_of_every_field():
    router = TreeRouter(_config()).train()
    r = router(torch.randn(10, 6))
    mask = torch.arange(10) % 3 == 0
    s = r.select(mask)
    assert isinstance(s, Routing) and s.leaf.shape == (4,) and s.balance_logits.shape == (4, 7)
    assert torch.equal(s.path_nodes, r.path_nodes[mask]) and s.leaf_log_probs is None


def test_every_layer_that_routes_holds_the_same_router():
    fff = FFF(_config())
    assert isinstance(fff.router, TreeRouter)
    assert [n for n, _ in fff.named_parameters()][:2] == ["router.node_weight", "router.node_bias"]


# ------------------------------------------------------------------------------------------------- leaves
def test_master_leaf_blends_with_the_sigmoid_of_its_gate():
    torch.manual_seed(1)
    m = MasterLeaf(6, 5, 4, "gelu").double()
    with torch.no_grad():
        m.gate.fill_(-0.4)
    x, tree_out = torch.randn(7, 6, dtype=torch.float64), torch.randn(7, 4, dtype=torch.float64)
    g = torch.sigmoid(torch.tensor(-0.4, dtype=torch.float64))
    mlp = torch.nn.functional.gelu(x @ m.w1 + m.b1) @ m.w2 + m.b2
    torch.testing.assert_close(m.blend(x, tree_out), g * tree_out + (1 - g) * mlp)
    assert m.share() == pytest.approx(float(g))


def test_leaf_modules_register_their_parameters_in_the_order_checkpoints_hold_them():
    assert [n for n, _ in LeafMLP(4, 3, 4, "relu").named_parameters()] == ["w1", "w2", "b1", "b2"]
    assert [n for n, _ in MasterLeaf(4, 3, 4, "relu").named_parameters()] == ["w1", "b1", "w2", "b2", "gate"]
    order = LeafMLP.PARAMETER_ORDER
    assert [n for n, _ in MasterLeaf(4, 3, 4, "relu", parameter_order=order).named_parameters()] == [*order, "gate"]
    assert [n for n, _ in LeafMLP(4, 3, 4, "relu", bias=False).named_parameters()] == ["w1", "w2"]
    with pytest.raises(ValueError, match="parameter_order"):
        LeafMLP(4, 3, 4, "relu", parameter_order=("w1", "w2"))


def test_leaf_bank_runs_each_tokens_leaf_as_the_single_leaf_module_does():
    torch.manual_seed(2)
    bank = LeafBank(4, 6, 5, 3, "relu").double()
    x, leaf, gate = torch.randn(20, 6, dtype=torch.float64), torch.randint(0, 4, (20,)), torch.rand(20).double()
    y = bank(x, leaf, gate)
    for j in range(4):
        one = LeafMLP(6, 5, 3, "relu").double()
        with torch.no_grad():
            for name in ("w1", "b1", "w2", "b2"):
                getattr(one, name).copy_(getattr(bank, name)[j])
        rows = leaf == j
        torch.testing.assert_close(y[rows], gate[rows, None] * one(x[rows]))


# ------------------------------------------------------------------------------------------------- DispatchConfig
@pytest.mark.parametrize("field, value", [
    ("ep_size", 0), ("ep_size", 1.5), ("ep_size", True), ("capacity_factor", 0.0), ("capacity_factor", -1.0),
    ("capacity_factor", math.nan), ("capacity_factor", math.inf), ("eval_capacity_factor", -math.inf),
    ("min_capacity", -1), ("min_capacity", 2.0), ("dropless", 1), ("dropless_cap", 2.0),
])
def test_dispatch_config_refuses_bad_values_naming_the_field(field, value):
    with pytest.raises(ValueError, match=rf"DispatchConfig\.{field} = .* is not allowed"):
        DispatchConfig(**{field: value})


def test_dispatch_config_is_frozen_and_replace_validates_again():
    d = DispatchConfig(ep_size=2)
    with pytest.raises(dataclasses.FrozenInstanceError):
        d.ep_size = 4
    assert d.replace(ep_size=4).ep_size == 4
    with pytest.raises(ValueError, match="ep_size"):
        d.replace(ep_size=0)


def test_each_doors_convention_converts_once():
    assert DispatchConfig.from_capacity(0.0) == DispatchConfig(dropless=True)
    assert DispatchConfig.from_capacity(1.5, ep_size=2) == DispatchConfig(ep_size=2, capacity_factor=1.5,
                                                                          eval_capacity_factor=1.5)
    capped = DispatchConfig.from_capacity(-2.0, min_capacity=0)
    assert capped.dropless and capped.dropless_cap == 2.0 and capped.tutel_capacity_factor(True) == -2.0
    assert DispatchConfig.from_deepspeed(drop_tokens=False) == DispatchConfig(dropless=True)
    d = DispatchConfig(capacity_factor=1.25, eval_capacity_factor=3.0)
    assert (d.factor(True), d.factor(False)) == (1.25, 3.0)
    assert (d.tutel_capacity_factor(True), d.tutel_capacity_factor(False)) == (1.25, 3.0)
    with pytest.raises(TypeError, match="not both"):
        DispatchConfig.resolve(d, "FFFMoE", ep_size=2)
    with pytest.raises(TypeError, match="DeepSpeed's MoE keywords are"):
        DispatchConfig.resolve(None, "FFFMoE", ep_sise=2)


def test_dispatch_check_refuses_what_a_backend_cannot_do():
    with pytest.raises(ValueError, match="must divide the 8 leaves"):
        DispatchConfig(ep_size=3).check(8, 3, "deepspeed")
    with pytest.raises(ValueError, match=r"must divide the number of ranks, the world size \(2\)"):
        DispatchConfig(ep_size=4).check(8, 2, "deepspeed")
    with pytest.raises(ValueError, match="must be 1 or the number of ranks"):
        DispatchConfig(ep_size=2, dropless=True).check(8, 4, "tutel")
    with pytest.raises(ValueError, match="min_capacity = 4 is not allowed: must be 0 with the tutel backend"):
        DispatchConfig().check(8, 1, "tutel")
    with pytest.raises(ValueError, match="only the tutel backend caps a dropless dispatch"):
        DispatchConfig.from_capacity(-1.0).check(8, 1, "deepspeed")
    DispatchConfig(ep_size=2).check(8, 4, "deepspeed")  # DeepSpeed's groups can be a part of the world


# ------------------------------------------------------------------------------------------------- legacy keys
def test_legacy_keys_map_to_todays_names_and_todays_stay():
    assert current_key("decoder.layers.0.ffn.node_weight") == "decoder.layers.0.ffn.router.node_weight"
    assert current_key("decoder.layers.0.ffn.router.node_weight") == "decoder.layers.0.ffn.router.node_weight"
    assert current_key("m.deepspeed_moe.gate.node_bias") == "m.deepspeed_moe.gate.router.node_bias"
    assert current_key("master_gate") == "master.gate"
    assert current_key("x.leaf_w2") == "x.leaves.w2" and current_key("x.leaves.w2") == "x.leaves.w2"
    assert current_key("x.master.w1") == "x.master.w1"
    new = {n for n, _ in FFF(_config(master_leaf=True)).named_parameters()}
    assert {current_key(old) for old in LEGACY_NAMES} == new


def test_a_state_dict_in_the_old_layout_loads_into_the_layer():
    torch.manual_seed(3)
    layer = FFF(_config(master_leaf=True)).eval()
    old = {}
    for name, value in layer.state_dict().items():
        key = {v: k for k, v in LEGACY_NAMES.items()}.get(name, name)
        old[key] = value.reshape(()) if key == "master_gate" else value  # the core layer's blend logit was 0-dim
    assert "node_weight" in old and "master_gate" in old and old["master_gate"].dim() == 0
    torch.manual_seed(4)
    fresh = FFF(_config(master_leaf=True)).eval()
    fresh.load_state_dict(copy.deepcopy(old))
    x = torch.randn(9, 6)
    torch.testing.assert_close(fresh(x).output, layer(x).output)
    state = dict(old)
    move_legacy_keys(state, "")
    assert set(state) == set(layer.state_dict())
