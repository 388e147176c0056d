"""Bias balancing without an auxiliary loss (fff_moe_plugin.balancing): the shift moves the hard decision only,
moves by DeepSeek-V3's sign rule, un-collapses a collapsed tree, travels with the weights, and is the same on every
rank after an update (2 ranks: plain torch.distributed, and DeepSpeed's engine with both backends).

Run as a script, this file is the rank-side worker of the 2-rank checks."""

from __future__ import annotations

import sys

import pytest
import torch
from helpers import assert_ok, run_rank_checks, run_rank_scripts

from fff_moe_plugin import FFF, FFFConfig, tree
from fff_moe_plugin.balancing import balanced_routers, update_balance_biases
from fff_moe_plugin.fast_eval import to_fast_eval


def _config(**kw) -> FFFConfig:
    values = dict(d_model=6, leaf_width=4, depth=3, train_mode="hard", load_balance="bias")
    values.update(kw)
    return FFFConfig(**values)


def _layer(seed: int = 0, **kw) -> FFF:
    torch.manual_seed(seed)
    return FFF(_config(**kw)).double()


def _leaf_out(layer: FFF, x: torch.Tensor, j: int) -> torch.Tensor:
    w = layer.leaves
    return torch.relu(x @ w.w1[j] + w.b1[j]) @ w.w2[j] + w.b2[j]


def test_load_balance_bias_turns_on_the_shifts_at_deepseeks_rate_and_refuses_region_leak_and_soft_trees():
    c = _config()
    assert c.bias_balancing and c.bias_update_rate == 1e-3
    assert _config(load_balance="leaf", bias_update_rate=0.01).bias_balancing
    assert not _config(load_balance="leaf").bias_balancing
    with pytest.raises(ValueError, match="region_leak = 0.1 is not allowed: must be 0 with bias balancing"):
        _config(region_leak=0.1)
    with pytest.raises(ValueError, match="bias_update_rate = -0.1 is not allowed"):
        _config(bias_update_rate=-0.1)
    # a soft tree makes no hard decision in training, so its shifts would never move
    with pytest.raises(ValueError, match="train_mode = 'soft' is not allowed: must be 'hard' with bias balancing"):
        _config(train_mode="soft")
    assert _config(soft_updates=10).bias_balancing  # a soft start, then hard decisions that move the shifts


def test_zero_shifts_compute_the_plain_hard_layer_bit_for_bit():
    plain, biased = _layer(load_balance="none").train(), _layer().train()
    x = torch.randn(40, 6, dtype=torch.float64)
    assert torch.equal(biased(x).output, plain(x).output)
    assert torch.equal(biased.eval()(x).output, plain.eval()(x).output)


def test_the_shift_moves_the_decision_and_the_gate_is_the_unshifted_path_probability():
    layer = _layer().eval()
    x = torch.randn(60, 6, dtype=torch.float64)
    with torch.no_grad():
        layer.router.balance_bias[0] = 1e3  # every token goes right at the root
    r = layer.router(x)
    assert (r.path_nodes[:, 1] == 2).all()
    logits = layer.router.node_logits(x)  # unshifted
    torch.testing.assert_close(r.path_logits, logits.gather(1, r.path_nodes))
    right = tree.path_nodes_of_leaf(r.leaf, 3)[1]
    gate = tree.path_log_prob(logits.gather(1, r.path_nodes), right).exp()
    torch.testing.assert_close(r.gate, gate)
    sent_right = logits[:, 0] < 0  # the tokens the shift sent the other way: weighted below one half there
    assert sent_right.any() and (torch.sigmoid(logits[sent_right, 0]) < 0.5).all()
    out = layer(x).output
    expected = torch.stack([gate[t] * _leaf_out(layer, x[t], int(r.leaf[t])) for t in range(60)])
    torch.testing.assert_close(out, expected)


def test_the_shifted_gate_is_the_path_probability_the_decisions_saw_in_training_and_eval():
    x = torch.randn(60, 6, dtype=torch.float64)
    shifts = torch.tensor([0.9, -0.6, 0.5, 0.4, -0.7, 0.3, -0.2], dtype=torch.float64)
    for forest in (1, 2):
        layer = _layer(bias_gate="shifted", n_trees=forest)
        unshifted = _layer(n_trees=forest)  # same seed: the same weights
        with torch.no_grad():
            layer.router.balance_bias.copy_(shifts.repeat(forest))
            unshifted.router.balance_bias.copy_(shifts.repeat(forest))
        for mode in (True, False):
            r, u = layer.train(mode).router(x), unshifted.train(mode).router(x)
            assert torch.equal(r.leaf, u.leaf) and torch.equal(r.path_logits, u.path_logits)  # same decisions
            right = tree.path_nodes_of_leaf(r.leaf, 3)[1]
            trees = torch.arange(forest).repeat(60)[:, None] * 7  # row s * K + k is token s in tree k
            shifted_logits = r.path_logits + layer.router.balance_bias[r.path_nodes + trees]
            torch.testing.assert_close(r.gate, tree.path_log_prob(shifted_logits, right).exp())
            # every factor is at least 1/2, also where the shift sent the token against its logit's sign (where
            # the unshifted gate has a factor below 1/2)
            factors = torch.sigmoid(torch.where(right.bool(), shifted_logits, -shifted_logits))
            against = right.bool() != (r.path_logits >= 0)
            assert against.any() and (factors >= 0.5).all()
            unshifted_factors = torch.sigmoid(torch.where(right.bool(), r.path_logits, -r.path_logits))
            assert (unshifted_factors[against] < 0.5).all()
        torch.testing.assert_close(to_fast_eval(layer)(x).output, layer.eval()(x).output)
    # the gradient reaches the nodes through the shifted gate
    layer = _layer(bias_gate="shifted").train()
    with torch.no_grad():
        layer.router.balance_bias.copy_(shifts)
    layer(x).output.sum().backward()
    assert layer.router.node_weight.grad.abs().sum() > 0


def test_the_shifted_gate_needs_bias_balancing_and_a_layer_refuses_weights_of_the_other_gate():
    with pytest.raises(ValueError, match="bias_gate = 'shifted' is not allowed: sets the gate of a leaf chosen"):
        _config(load_balance="leaf", bias_gate="shifted")
    with pytest.raises(ValueError, match="bias_gate = 'both' is not allowed"):
        _config(bias_gate="both")
    trained = _layer(bias_gate="shifted")
    with pytest.raises(ValueError, match=r"FFFConfig.bias_gate.*trained with bias_gate = 'shifted'"):
        _layer().load_state_dict(trained.state_dict())
    # weights saved before the field existed were gated on the unshifted logits
    state = _layer().state_dict()
    del state["_extra_state"]["config"]["bias_gate"]
    _layer().load_state_dict(state)
    with pytest.raises(ValueError, match=r"trained with bias_gate = 'unshifted', this layer has bias_gate = 'shif"):
        trained.load_state_dict(state)


def test_shift_stats_count_the_decisions_turned_against_their_logits_and_their_gates():
    from fff_moe_plugin.router import shift_stats

    layer = _layer().eval()
    x = torch.randn(80, 6, dtype=torch.float64)
    plain = shift_stats(layer.router, [layer.router(x)])
    assert plain["against"] == [0.0, 0.0, 0.0] and plain["against_any"] == 0.0 and plain["gate_against"] is None
    with torch.no_grad():
        layer.router.balance_bias[0] = 1e3  # every token right at the root
    r = layer.router(x)
    got = shift_stats(layer.router, [r.select(torch.arange(80) < 30), r.select(torch.arange(80) >= 30)])
    z = layer.router.node_logits(x)
    turned = z[:, 0] < 0  # exactly the tokens whose root logit says left (the lower levels have no shift)
    assert got["paths"] == 80 and got["against"] == [round(float(turned.double().mean()), 4), 0.0, 0.0]
    assert got["against_any"] == pytest.approx(float(turned.double().mean()))
    assert got["gate_against"] == pytest.approx(float(r.gate[turned].mean()))
    assert got["gate_rest"] == pytest.approx(float(r.gate[~turned].mean()))
    assert got["gate_against"] < 0.5 and got["shift_max"] == 1e3
    with pytest.raises(ValueError, match="needs the records of hard routings"):
        shift_stats(layer.router, [])


def test_eval_kernels_and_fast_eval_route_with_the_shifts():
    layer = _layer().eval()
    with torch.no_grad():
        layer.router.balance_bias.copy_(torch.tensor([0.3, -0.2, 0.5, 0.1, -0.4, 0.2, 0.0], dtype=torch.float64))
    x = torch.randn(50, 6, dtype=torch.float64)
    reference = layer(x).output  # parameters require grad: the torch path
    fast = to_fast_eval(layer)
    torch.testing.assert_close(fast(x).output, reference)
    torch.testing.assert_close(fast.infer(x), reference)


def test_an_update_moves_each_reached_node_by_the_rate_against_its_excess():
    layer = _layer(bias_update_rate=0.25).train()
    r = layer.router
    torch.manual_seed(1)
    x = torch.randn(64, 6, dtype=torch.float64)
    routing = r(x)
    reached = torch.zeros(7, dtype=torch.long).index_add_(0, routing.path_nodes.reshape(-1),
                                                          torch.ones(64 * 3, dtype=torch.long))
    right = tree.path_nodes_of_leaf(routing.leaf, 3)[1]
    went_right = torch.zeros(7, dtype=torch.long).index_add_(0, routing.path_nodes.reshape(-1), right.reshape(-1))
    assert torch.equal(r.balance_counts, torch.stack([reached, went_right]))
    assert update_balance_biases(layer) == 1
    expected = -0.25 * torch.sign(went_right / reached.clamp_min(1).double() - 0.5) * (reached > 0)
    torch.testing.assert_close(r.balance_bias, expected)
    assert (r.balance_counts == 0).all()
    r.eval()(x)  # eval calls do not count
    assert (r.balance_counts == 0).all()


def test_a_collapsed_tree_is_balanced_by_the_shifts_alone():
    layer = _layer(bias_update_rate=0.05).train()
    with torch.no_grad():
        layer.router.node_bias[0] = -3.0  # the root sends (nearly) every token left
    x = torch.randn(512, 6, dtype=torch.float64)
    share = (layer.router(x).path_nodes[:, 1] == 2).double().mean()
    assert share < 0.05
    layer.router.balance_counts.zero_()
    for _ in range(200):
        layer.router(x)
        update_balance_biases(layer)
    share = (layer.router(x).path_nodes[:, 1] == 2).double().mean()
    assert abs(share - 0.5) < 0.05
    counts = layer.eval()(x).stats["counts"]
    assert (counts > 0).all()


def test_the_shift_stays_float32_when_the_layer_goes_to_bfloat16_and_the_counts_stay_integers():
    layer = FFF(_config()).to(torch.bfloat16)
    assert layer.router.balance_bias.dtype == torch.float32 and layer.router.balance_counts.dtype == torch.long
    assert layer.leaves.w1.dtype == torch.bfloat16
    # the counts are each rank's own: no buffer, so DDP's buffer broadcast leaves them alone
    assert "balance_counts" not in dict(layer.router.named_buffers())


def test_the_shifts_travel_with_the_weights_and_combine_with_a_loss_and_the_master_leaf():
    layer = _layer(load_balance="leaf", bias_update_rate=0.1, master_leaf=True).train()
    x = torch.randn(32, 6, dtype=torch.float64)
    out = layer(x)
    assert out.losses["load_balance"] > 0  # the leaf loss is on beside the shifts
    out.output.sum().add(out.aux_loss).backward()
    update_balance_biases(layer)
    state = layer.state_dict()
    assert "router.balance_bias" in state and "router.balance_counts" not in state
    fresh = _layer(seed=5, load_balance="leaf", bias_update_rate=0.1, master_leaf=True)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.router.balance_bias, layer.router.balance_bias)
    torch.testing.assert_close(fresh.eval()(x).output, layer.eval()(x).output)
    with pytest.raises(RuntimeError, match="balance_bias"):
        _layer(load_balance="leaf", master_leaf=True).load_state_dict(state)


def test_a_compiled_training_step_counts_as_the_eager_one():
    torch.manual_seed(0)
    eager = FFF(_config(d_model=32, leaf_width=16, bias_update_rate=0.1)).train()
    compiled_layer = FFF(eager.config).train()
    compiled_layer.load_state_dict(eager.state_dict())
    with torch.no_grad():
        for layer in (eager, compiled_layer):
            layer.router.balance_bias.copy_(torch.linspace(-0.2, 0.2, 7))
    x = torch.randn(64, 32)

    def step(layer):
        out = layer(x)
        return out.output.square().mean() + out.aux_loss

    compiled = torch.compile(lambda: step(compiled_layer), fullgraph=True)
    torch.testing.assert_close(compiled(), step(eager))
    assert torch.equal(compiled_layer.router.balance_counts, eager.router.balance_counts)
    assert eager.router.balance_counts.sum() > 0


# ------------------------------------------------------------------------------------------ 2 ranks (workers)
def _data(rank: int) -> torch.Tensor:
    torch.manual_seed(100 + rank)
    return torch.randn(48 + 16 * rank, 16) + 0.5 * rank  # other tokens, other counts on each rank


def _rank_layer() -> FFF:
    torch.manual_seed(0)
    return FFF(FFFConfig(d_model=16, leaf_width=4, depth=3, train_mode="hard", load_balance="bias",
                         bias_update_rate=0.1)).train()


def _shifts_of_one_process() -> torch.Tensor:
    """The shifts one process gets from both ranks' tokens after one update."""
    alone = _rank_layer()
    alone(_data(0))
    alone(_data(1))
    alone.router.apply_balance_counts(alone.router.balance_counts.clone())
    return alone.router.balance_bias


def check_core(rank: int) -> None:
    """Each rank routes its own tokens; after one update the shifts are those of the counts of both ranks."""
    import torch.distributed as dist

    layer = _rank_layer()
    layer(_data(rank))
    update_balance_biases(layer)
    assert torch.equal(layer.router.balance_bias, _shifts_of_one_process())
    assert (layer.router.balance_bias != 0).any()
    mine = layer.router.balance_bias.clone()
    dist.broadcast(mine, src=0)
    assert torch.equal(mine, layer.router.balance_bias)


def check_ddp(rank: int) -> None:
    """Under torch's DDP (which broadcasts rank 0's buffers before every forward), two micro-batches per rank still
    count each rank's own tokens: the shifts are those of one process over all four micro-batches."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    layer = _rank_layer()
    model = DDP(layer)
    x = _data(rank)
    with model.no_sync():
        model(x[:24]).output.sum().backward()
    model(x[24:]).output.sum().backward()
    update_balance_biases(model)
    assert torch.equal(layer.router.balance_bias, _shifts_of_one_process())


def _engine_check(backend: str):
    def check(rank: int):
        import torch.distributed as dist

        from fff_moe_plugin.deepspeed import initialize
        from fff_moe_plugin.experiments.toy import ToyNet

        if backend == "tutel":
            try:
                import fff_moe_plugin.integrations.tutel  # noqa: F401
            except ImportError:
                return "skip: needs Tutel (see the README, Tutel backend)"
        torch.manual_seed(0)
        config = {"train_micro_batch_size_per_gpu": 4, "optimizer": {"type": "SGD", "params": {"lr": 0.1}},
                  "steps_per_print": 10**9,
                  "fff_moe": {"depth": 3, "leaf_width": 8, "replace": "blocks.*.mlp", "ep_size": 2, "backend": backend,
                              "load_balance": "bias", "bias_update_rate": 0.05, "drop_tokens": False}}
        engine, *_ = initialize(model=ToyNet(16), config=config, verbose=False)
        routers = balanced_routers(engine.module)
        assert len(routers) == 2
        for _ in range(3):
            x = _data(rank)[:48]
            loss = engine(x).square().mean()
            engine.backward(loss)
            engine.step()
        for r in routers:
            assert (r.balance_bias != 0).any() and (r.balance_counts == 0).all()
            theirs = r.balance_bias.clone()
            dist.broadcast(theirs, src=0)
            assert torch.equal(theirs, r.balance_bias)  # every rank routes with the same shifts

    return check


CHECKS = {"core": check_core, "ddp": check_ddp, "engine_deepspeed": _engine_check("deepspeed"),
          "engine_tutel": _engine_check("tutel")}


@pytest.mark.slow
def test_two_ranks_hold_the_same_shifts_after_an_update(tmp_path):
    pytest.importorskip("deepspeed", reason='needs DeepSpeed: pip install "fff-moe-plugin[deepspeed]"')
    results = run_rank_scripts(__file__, tmp_path, list(CHECKS), world=2)
    for name in CHECKS:
        if all(str(r.get(name, "")).startswith("skip:") for r in results):
            continue
        assert_ok(results, name)


if __name__ == "__main__":
    run_rank_checks(sys.argv[1], {name: CHECKS[name] for name in sys.argv[2:]})
