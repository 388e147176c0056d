"""FFFMoE and TreeGate in one process: equal to the core FFF, both gate contracts, capacity and dropping,
the "fff_moe" JSON block's validation and the module replacement.

The layer tests take the ``device`` fixture (tests/conftest.py). One process needs no process group and no
DeepSpeed accelerator: the MoE forward only follows its inputs' device, so the cuda cases run whatever
``DS_ACCELERATOR`` says (it defaults to "cpu" here, which needs no GPU build of DeepSpeed's ops)."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

pytest.importorskip("deepspeed", reason='needs DeepSpeed: pip install "fff-moe-plugin[deepspeed]"')
os.environ.setdefault("DS_ACCELERATOR", "cpu")

from deepspeed.moe.sharded_moe import _route_slots, _sparse_decode, _sparse_encode  # noqa: E402

from fff_moe_plugin import FFF, FFFConfig  # noqa: E402
from fff_moe_plugin.deepspeed import aux_loss, initialize, read_config  # noqa: E402
from fff_moe_plugin.integrations.deepspeed import (  # noqa: E402
    DeepSpeedFFFConfig,
    FFFMoE,
    MoEFeedForward,
    apply_replacements,
    plan_replacements,
)


def _cfg(**kw):
    base = dict(d_model=8, leaf_width=4, depth=3, train_mode="hard", hardening=0.1, load_balance="leaf",
                load_balance_coef=0.05, master_leaf=True)
    base.update(kw)
    return FFFConfig(**base)


@pytest.mark.parametrize("load_balance, master_leaf, n_trees", [
    ("leaf", True, 1), ("node", True, 1), ("none", True, 1), ("leaf", False, 1), ("node", False, 1),
    ("none", False, 1), ("leaf", True, 3), ("node", False, 3),  # forests: K assignments per token
    ("bias", True, 1), ("bias", False, 3),  # decision shifts, the gate on the shifted logits
])
def test_fffmoe_equals_core_fff_in_hard_mode_when_nothing_is_dropped(load_balance, master_leaf, n_trees, device):
    shifted = {"bias_gate": "shifted"} if load_balance == "bias" else {}
    core = FFF(_cfg(load_balance=load_balance, master_leaf=master_leaf, n_trees=n_trees, **shifted)).double()
    with torch.no_grad():
        if master_leaf:
            core.master.gate.fill_(0.7)
        if shifted:
            core.router.balance_bias.uniform_(-0.5, 0.5)
    moe = FFFMoE.from_fff(core, capacity_factor=100.0, eval_capacity_factor=100.0).to(device)
    core.to(device)
    x = torch.randn(3, 11, 8, dtype=torch.float64, device=device)
    up = torch.randn(3, 11, 8, dtype=torch.float64, device=device)
    for training in (True, False):
        core.train(training)
        moe.train(training)
        ref = core(x)
        out = moe.forward_block(x)
        torch.testing.assert_close(out.output, ref.output, rtol=0, atol=1e-12)
        torch.testing.assert_close(out.aux_loss, ref.aux_loss, rtol=0, atol=1e-12)
        for k in ("hardening", "load_balance"):
            torch.testing.assert_close(out.losses[k], ref.losses[k], rtol=0, atol=1e-12)
        assert torch.equal(out.stats["counts"], ref.stats["counts"]) and out.stats["dropped"] == 0
    core.train()
    moe.train()
    ((core(x).output * up).sum() + core(x).aux_loss).backward()
    y, l_aux, _ = moe(x)
    ((y * up).sum() + l_aux).backward()
    back = moe.to_fff().to(device)  # same layout as the core layer, to compare gradients by name
    grads = {
        "router.node_weight": moe.gate.router.node_weight.grad, "router.node_bias": moe.gate.router.node_bias.grad,
        "leaves.w1": torch.stack([e.w1.grad for e in moe.deepspeed_moe.experts.deepspeed_experts]),
        "leaves.b2": torch.stack([e.b2.grad for e in moe.deepspeed_moe.experts.deepspeed_experts]),
    }
    for name, g in grads.items():
        torch.testing.assert_close(g, core.get_parameter(name).grad, rtol=0, atol=1e-12, msg=name)
    for name, p in core.named_parameters():
        assert torch.equal(back.get_parameter(name), p)
    for name, b in core.named_buffers():  # the decision shifts travel both ways
        assert torch.equal(back.get_buffer(name), b), name


@pytest.mark.parametrize("depth", [3, 8])
def test_fffmoe_with_region_leak_routes_as_the_core_fff_under_one_seed(depth, device):
    # both descend through tree.route, so the leak's random draws and the routing agree bit for bit
    core = FFF(_cfg(depth=depth, region_leak=0.3, master_leaf=False)).train()
    moe = FFFMoE.from_fff(core, capacity_factor=1000.0).train().to(device)
    core.to(device)
    x = torch.randn(200, 8, device=device)
    torch.manual_seed(11)
    ref = core(x)
    torch.manual_seed(11)
    out = moe.forward_block(x)
    assert torch.equal(out.stats["counts"], ref.stats["counts"])
    torch.testing.assert_close(out.output, ref.output)
    torch.testing.assert_close(out.aux_loss, ref.aux_loss)
    # not vacuous: the leak moved tokens away from their clean leaves
    clean = core.router.eval()(x).leaf
    torch.manual_seed(11)
    leaked = core.router.train()(x).leaf
    assert (clean != leaked).float().mean() > 0.2


def test_fffmoe_init_draws_the_core_layers_weights():
    torch.manual_seed(3)
    core = FFF(_cfg())
    torch.manual_seed(3)
    moe = FFFMoE(_cfg())
    for name, p in core.named_parameters():
        assert torch.equal(moe.to_fff().get_parameter(name), p), name


def test_no_parameter_outside_the_leaves_is_named_expert():
    moe = FFFMoE(_cfg())
    for name, p in list(moe.named_parameters()) + list(moe.named_buffers()):
        inside = name.startswith("deepspeed_moe.experts.deepspeed_experts.")
        assert inside == ("expert" in name), name
        assert inside == (getattr(p, "allreduce", True) is False), name


@pytest.mark.parametrize("n_trees", [1, 3])
def test_sparse_and_dense_gate_contracts_give_the_same_layer_output(n_trees, device):
    # small capacity: some tokens are dropped
    moe = FFFMoE(_cfg(n_trees=n_trees), capacity_factor=0.5, min_capacity=1).to(device)
    gate, experts = moe.gate, moe.deepspeed_moe.experts
    x = torch.randn(40, 8, device=device)
    l1, C, E, idx, loc, gates, counts = gate(x, None, True)
    l2, combine, dispatch, counts2 = gate(x, None, False)
    assert torch.equal(l1, l2) and torch.equal(counts, counts2) and gate.last_record.stats["dropped"] > 0
    C = int(C)
    slots = _route_slots(idx, loc, E, C)
    sparse_in = _sparse_encode(x, slots, E, C)
    dense_in = torch.einsum("sec,sm->ecm", dispatch.float(), x)
    torch.testing.assert_close(dense_in, sparse_in)
    y = experts(sparse_in.reshape(1, E, C, 8)).reshape(E, C, 8)
    sparse_out = _sparse_decode(y.reshape(E * C, 8), slots, gates, 40)
    dense_out = torch.einsum("sec,ecm->sm", combine, y)
    torch.testing.assert_close(dense_out, sparse_out)
    # and the sparse route is what FFFMoE's own forward computes
    moe_out, _, _ = FFFMoE.forward(moe, x)
    g = torch.sigmoid(moe.master.gate)
    torch.testing.assert_close(moe_out, g * sparse_out + (1 - g) * moe.master(x))


def test_dropped_tokens_are_counted_and_only_the_residual_and_master_leaf_carry_them(device):
    moe = FFFMoE(_cfg(), capacity_factor=0.25, eval_capacity_factor=0.25, min_capacity=0).eval().to(device)
    x = torch.randn(64, 8, device=device)
    out = moe.forward_block(x)
    counts, cap, dropped = out.stats["counts"], int(out.stats["capacity"]), int(out.stats["dropped"])
    assert cap == 2  # ceil(64 / 8 * 0.25)
    assert dropped == int((counts - cap).clamp_min(0).sum()) > 0
    # the first `cap` tokens of each leaf (in token order) are kept, the rest get no tree output
    leaf = moe.to_fff().to(device).router(x).leaf.cpu()
    seen = torch.zeros(8, dtype=torch.long)
    kept = torch.zeros(64, dtype=torch.bool)
    for t in range(64):
        kept[t] = seen[leaf[t]] < cap
        seen[leaf[t]] += 1
    kept = kept.to(device)
    assert int((~kept).sum()) == dropped
    g = torch.sigmoid(moe.master.gate)
    with torch.no_grad():
        master_only = (1 - g) * moe.master(x)
        torch.testing.assert_close(out.output[~kept], master_only[~kept])
        ref = moe.to_fff().to(device)(x).output
        torch.testing.assert_close(out.output[kept], ref[kept])
        # in a residual block x + FFN(x) a dropped token goes on as x plus the master leaf's share
        torch.testing.assert_close((x + out.output)[~kept], (x + master_only)[~kept])


def test_used_token_mask_routes_only_the_marked_tokens(device):
    moe = FFFMoE(_cfg(master_leaf=False), capacity_factor=100.0).eval().to(device)
    x = torch.randn(20, 8, device=device)
    used = (torch.arange(20, device=device) % 3 != 0).float()
    y, _, counts = moe(x, used)
    assert int(counts.sum()) == int(used.sum())
    assert torch.equal(y[used == 0], torch.zeros_like(y[used == 0]))
    torch.testing.assert_close(y[used == 1], moe.to_fff().to(device)(x).output[used == 1])


def test_dropless_capacity_is_the_largest_leaf_load(device):
    moe = FFFMoE(_cfg(), drop_tokens=False).to(device)
    out = moe.forward_block(torch.randn(50, 8, device=device))
    assert out.stats["dropped"] == 0 and out.stats["capacity"] == out.stats["counts"].max()


@pytest.mark.parametrize(
    "bad, key",
    [
        ({"depth": 3, "leaf_width": 8, "replace": "m", "colour": 1}, "colour"),
        ({"depth": 3, "leaf_width": 8}, "replace"),
        ({"depth": 3, "leaf_width": 8, "replace": "m", "ep_size": 3}, "ep_size"),
        ({"depth": 1, "leaf_width": 8, "replace": "m", "ep_size": 4}, "ep_size"),
        ({"depth": 3, "leaf_width": 8, "replace": "m", "ep_size": 0}, "ep_size"),
        ({"depth": -1, "leaf_width": 8, "replace": "m"}, "depth"),
        ({"depth": 3, "leaf_width": 0, "replace": "m"}, "leaf_width"),
        ({"depth": 3, "leaf_width": 8, "replace": "m", "capacity_factor": 0}, "capacity_factor"),
        ({"depth": 3, "leaf_width": 8, "replace": "m", "min_capacity": -1}, "min_capacity"),
        ({"depth": 3, "leaf_width": 8, "replace": "m", "drop_tokens": "no"}, "drop_tokens"),
        ({"depth": 3, "leaf_width": 8, "replace": "m", "backend": "megablocks"}, "backend"),
        ({"depth": 3, "leaf_width": 8, "replace": "m", "router": "top2"}, "router"),
        ({"depth": 3, "leaf_width": 8, "replace": "m", "train_mode": "soft"}, "train_mode"),
        ({"depth": 3, "leaf_width": 8, "replace": "m", "soft_updates": 10}, "soft_updates"),
        ({"depth": 3, "leaf_width": 8, "replace": "m", "load_balance": "expert"}, "load_balance"),
        ({"depth": 3, "leaf_width": 8, "replace": "m", "activation": "swish"}, "activation"),
        ({"depth": 3, "leaf_width": 8, "replace": ""}, "replace"),
    ],
)
def test_every_invalid_fff_moe_block_raises_naming_the_key_before_process_groups(bad, key, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match=key):
        initialize(model=nn.Sequential(), config={"train_micro_batch_size_per_gpu": 1, "fff_moe": bad})
    assert not torch.distributed.is_initialized()


_BLOCK = {"depth": 3, "leaf_width": 8, "replace": "m"}


@pytest.mark.parametrize("key", ["capacity_factor", "eval_capacity_factor", "hardening", "region_leak",
                                 "leaf_dropout", "load_balance_coef"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_every_float_key_refuses_nan_and_infinity_before_process_groups(key, value):
    with pytest.raises(ValueError, match=rf'"fff_moe" block: {key} = {value!r} is not allowed: must be a finite'):
        initialize(model=nn.Sequential(), config={"train_micro_batch_size_per_gpu": 1,
                                                  "fff_moe": {**_BLOCK, key: value}})
    assert not torch.distributed.is_initialized()


def test_float_keys_are_every_float_field_of_the_block():
    assert set(DeepSpeedFFFConfig.float_keys()) == {
        "capacity_factor", "eval_capacity_factor", "hardening", "region_leak", "leaf_dropout", "load_balance_coef",
        "bias_update_rate"}


def test_infinity_and_nan_literals_in_a_json_config_file_are_refused(tmp_path):
    # json.load reads the non-standard literals Infinity and NaN as floats
    for literal, shown in (("Infinity", "inf"), ("NaN", "nan"), ("-Infinity", "-inf")):
        path = tmp_path / "ds.json"
        path.write_text('{"train_micro_batch_size_per_gpu": 1, "fff_moe": {"depth": 2, "leaf_width": 8, '
                        f'"replace": "m", "hardening": {literal}}}}}')
        with pytest.raises(ValueError, match=rf"hardening = {shown} is not allowed"):
            initialize(model=nn.Sequential(), config=str(path))
        assert not torch.distributed.is_initialized()


@pytest.mark.parametrize("master_leaf", [None, False])
def test_master_leaf_width_without_master_leaf_is_refused(master_leaf):
    block = {**_BLOCK, "master_leaf_width": 16}
    if master_leaf is not None:
        block["master_leaf"] = master_leaf
    with pytest.raises(ValueError, match=r'master_leaf_width = 16 is not allowed: .*needs "master_leaf": true'):
        initialize(model=nn.Sequential(), config={"train_micro_batch_size_per_gpu": 1, "fff_moe": block})
    assert not torch.distributed.is_initialized()
    # with the master leaf it sets its width
    assert read_config({"fff_moe": {**block, "master_leaf": True}})[1].fff_config(8, "relu").master_leaf_width == 16


def test_stage0_fp32_clipping_with_an_mpu_is_refused_before_process_groups():
    # the global-norm clip at ZeRO 0 has no model-parallel reduction; ZeRO 1/2 or no clipping are the way
    config = {"train_micro_batch_size_per_gpu": 1, "fff_moe": {**_BLOCK, "replace": "0"}}
    with pytest.raises(ValueError, match=r'gradient_clipping = 1.0 with an mpu is not allowed.*"gradient_clipping": 0'):
        initialize(model=nn.Sequential(nn.Linear(8, 32)), config=config, mpu=object())
    assert not torch.distributed.is_initialized()


def _tutel_installed() -> bool:
    try:
        import fff_moe_plugin.integrations.tutel  # noqa: F401
    except ImportError:
        return False
    return True


def _assert_tutel_refused_before_process_groups():
    config = {"train_micro_batch_size_per_gpu": 1, "fff_moe": {**_BLOCK, "replace": "0", "backend": "tutel"}}
    with pytest.raises(ValueError, match=r'backend = \'tutel\' is not allowed: Tutel is not installed(.|\n)*'
                                         r"NO_CUDA=1 pip install --no-build-isolation"):
        initialize(model=nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 8)), config=config)
    assert not torch.distributed.is_initialized()
    # a disabled block builds nothing and needs no Tutel
    assert read_config({"fff_moe": {**config["fff_moe"], "enabled": False}})[1] is None


@pytest.mark.skipif(_tutel_installed(), reason="Tutel is installed; the refusal without it is checked by "
                    "test_tutel_backend_is_refused_with_install_commands_when_tutel_cannot_be_imported")
def test_tutel_backend_without_tutel_is_refused_before_process_groups():
    _assert_tutel_refused_before_process_groups()


def test_tutel_backend_is_refused_with_install_commands_when_tutel_cannot_be_imported(monkeypatch):
    import sys

    # an installed Tutel is hidden: None in sys.modules makes its import raise ImportError
    monkeypatch.setitem(sys.modules, "tutel", None)
    for name in [m for m in sys.modules if m.startswith("fff_moe_plugin.integrations.tutel")]:
        monkeypatch.delitem(sys.modules, name)
    _assert_tutel_refused_before_process_groups()


def test_ep_size_must_divide_the_world_size(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "6")
    with pytest.raises(ValueError, match=r"ep_size = 4 .*world size \(6"):
        read_config({"fff_moe": {"depth": 3, "leaf_width": 8, "replace": "m", "ep_size": 4}})


def test_tutel_backend_takes_ep_size_one_or_the_world_size(monkeypatch):
    if not _tutel_installed():
        pytest.skip("needs Tutel (see README, Tutel backend); without it backend tutel is refused outright")
    # Tutel runs its all-to-all's backward on the whole world, so a part of the world cannot share the leaves
    monkeypatch.setenv("WORLD_SIZE", "4")
    block = {"depth": 3, "leaf_width": 8, "replace": "m", "backend": "tutel"}
    with pytest.raises(ValueError, match=r"ep_size = 2 is not allowed: must be 1 or the number of ranks, the world "
                                         r"size \(4\)"):
        read_config({"fff_moe": {**block, "ep_size": 2}})
    assert [read_config({"fff_moe": {**block, "ep_size": n}})[1].ep_size for n in (1, 4)] == [1, 4]


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.ModuleDict({"mlp": nn.Sequential(nn.Linear(8, 32), nn.SiLU(), nn.Dropout(0.1), nn.Linear(32, 8)),
                           "attn": nn.Linear(8, 8)})
            for _ in range(2)
        )
        self.odd = nn.Sequential(nn.Linear(8, 32), nn.LayerNorm(32), nn.Linear(32, 8))

    def forward(self, x):
        for b in self.blocks:
            x = x + b["mlp"](b["attn"](x))
        return x


def test_replacement_converts_matching_feedforward_blocks_and_reports_them(device):
    model = _Net().to(device)
    block = DeepSpeedFFFConfig.from_dict({"depth": 2, "leaf_width": 8, "replace": "blocks.*.mlp"})
    plan = plan_replacements(model, block)
    assert [r.name for r in plan] == ["blocks.0.mlp", "blocks.1.mlp"]
    assert all(r.activation == "silu" and r.d_model == 8 and r.hidden == 32 for r in plan)
    assert "4 leaves x 8" in plan[0].describe(block)
    apply_replacements(model, block, plan)
    assert isinstance(model.blocks[0]["mlp"], MoEFeedForward) and isinstance(model.blocks[1]["mlp"].moe, FFFMoE)
    assert all(p.device.type == device for p in model.parameters())  # the new blocks land where the old ones were
    y = model(torch.randn(5, 8, device=device))
    assert y.shape == (5, 8)
    total = aux_loss(model)
    assert torch.equal(total, model.blocks[0]["mlp"].last.aux_loss + model.blocks[1]["mlp"].last.aux_loss)
    assert total > 0


def test_replacement_refuses_modules_it_cannot_convert():
    block = DeepSpeedFFFConfig.from_dict({"depth": 2, "leaf_width": 8, "replace": "odd"})
    with pytest.raises(ValueError, match=r"odd: .*LayerNorm"):
        plan_replacements(_Net(), block)
    block = DeepSpeedFFFConfig.from_dict({"depth": 2, "leaf_width": 8, "replace": "blocks.*.attn"})
    with pytest.raises(ValueError, match="has 0 nn.Linear children"):
        plan_replacements(_Net(), block)
    block = DeepSpeedFFFConfig.from_dict({"depth": 2, "leaf_width": 8, "replace": "nothing"})
    with pytest.raises(ValueError, match=r"matches no module; .*blocks.0.mlp, blocks.1.mlp"):
        plan_replacements(_Net(), block)


def test_uniform_tokens_key_reaches_the_tree_gate_and_is_refused_where_it_has_no_meaning():
    model = _Net()
    block = DeepSpeedFFFConfig.from_dict({"depth": 2, "leaf_width": 8, "replace": "blocks.*.mlp",
                                          "uniform_tokens": True})
    assert block.uniform_tokens and block.to_dict()["uniform_tokens"] is True
    apply_replacements(model, block, plan_replacements(model, block))
    assert all(b["mlp"].moe.gate.uniform_tokens for b in model.blocks)
    default = DeepSpeedFFFConfig.from_dict({"depth": 2, "leaf_width": 8, "replace": "blocks.*.mlp"})
    assert default.uniform_tokens is False
    base = {"depth": 2, "leaf_width": 8, "replace": "m", "uniform_tokens": True}
    for extra in ({"router": "topk"}, {"drop_tokens": False}, {"backend": "tutel"}):
        with pytest.raises(ValueError, match=r"uniform_tokens = True is not allowed: applies to the tree gate"):
            DeepSpeedFFFConfig.from_dict({**base, **extra})
    with pytest.raises(ValueError, match=r"uniform_tokens = 1 is not allowed: must be true or false"):
        DeepSpeedFFFConfig.from_dict({**base, "uniform_tokens": 1})
    with pytest.raises(ValueError, match=r"uniform_tokens = True is not allowed with a dropless dispatch"):
        FFFMoE(_cfg(), uniform_tokens=True, drop_tokens=False)


def test_topk_router_builds_deepspeeds_own_moe_over_the_same_leaves(device):
    from deepspeed.moe.layer import MoE

    model = _Net().to(device)
    block = DeepSpeedFFFConfig.from_dict({"depth": 2, "leaf_width": 8, "replace": "blocks.*.mlp", "router": "topk",
                                          "load_balance_coef": 0.1})
    apply_replacements(model, block, plan_replacements(model, block))
    layer = model.blocks[0]["mlp"].moe
    assert type(layer) is MoE and layer.num_experts == 4
    leaves = layer.deepspeed_moe.experts.deepspeed_experts
    assert not torch.equal(leaves[0].w1, leaves[1].w1)  # each expert drawn on its own
    model(torch.randn(16, 8, device=device))
    expected = 0.1 * (model.blocks[0]["mlp"].moe.deepspeed_moe.l_aux + model.blocks[1]["mlp"].moe.deepspeed_moe.l_aux)
    torch.testing.assert_close(aux_loss(model), expected)


def test_tutel_backend_builds_tutel_fff_or_says_how_to_install():
    model = _Net()
    values = {"depth": 2, "leaf_width": 8, "replace": "blocks.*.mlp", "backend": "tutel"}
    if not _tutel_installed():
        with pytest.raises(ValueError, match="pip install"):
            DeepSpeedFFFConfig.from_dict(values)
        return
    block = DeepSpeedFFFConfig.from_dict(values)
    plan = plan_replacements(model, block)
    from fff_moe_plugin.integrations.tutel import TutelFFF

    apply_replacements(model, block, plan)
    layer = model.blocks[0]["mlp"].moe
    assert isinstance(layer, TutelFFF)
    x = torch.randn(6, 8)
    y = model(x)
    assert y.shape == (6, 8)
    torch.testing.assert_close(aux_loss(model), sum(b["mlp"].last.aux_loss for b in model.blocks))
    # backend tutel takes any ep_size that divides the world (2-process runs: test_tutel_deepspeed.py); here 1
    with pytest.raises(ValueError, match=r"ep_size = 2 is not allowed: must divide the number of ranks, the world "
                                         r"size \(1\)"):
        DeepSpeedFFFConfig.from_dict({"depth": 2, "leaf_width": 8, "replace": "m", "backend": "tutel", "ep_size": 2})


def test_fffmoe_rejects_bad_arguments():
    with pytest.raises(ValueError, match="train_mode"):
        FFFMoE(_cfg(train_mode="soft"))
    with pytest.raises(ValueError, match="ep_size"):
        FFFMoE(_cfg(), ep_size=3)
    with pytest.raises(ValueError, match="torch.distributed"):
        FFFMoE(_cfg(), ep_size=2)
    with pytest.raises(ValueError, match="d_out"):
        FFFMoE(_cfg(d_out=4))
    with pytest.raises(ValueError, match="capacity_factor"):
        FFFMoE(_cfg(), capacity_factor=0)
    with pytest.raises(ValueError, match="soft_updates = 2 is not allowed"):
        FFFMoE(_cfg(soft_updates=2))


def test_the_layers_offer_the_expert_parallel_interface_and_the_adapter_takes_only_moe_layers():
    from fff_moe_plugin.dispatch import DispatchConfig, ExpertParallelFFF

    moe = FFFMoE(_cfg(), DispatchConfig(capacity_factor=2.0, min_capacity=1))
    assert isinstance(moe, ExpertParallelFFF) and moe.dispatch.capacity_factor == 2.0
    assert moe.local_leaves == range(8) and moe.ep_group is None  # one process: no group yet
    assert [id(p) for p in moe.expert_parameters()] == [id(p) for p in moe.deepspeed_moe.experts.parameters()]
    out = moe.forward_block(torch.randn(12, 8))
    assert moe.last is out
    with pytest.raises(TypeError, match="either a DispatchConfig or DeepSpeed's MoE keywords"):
        FFFMoE(_cfg(), DispatchConfig(), ep_size=1)
    with pytest.raises(TypeError, match="MoEFeedForward wraps"):
        MoEFeedForward(nn.Linear(8, 8))
