"""FFFMoE across 2 CPU processes (gloo): expert parallelism equals ep_size 1, training with ZeRO 0/1/2 through
the JSON flag, and checkpoints that reload at the same and at a different ep_size.

The checks run in one 2-process job (started once per module: DeepSpeed's import and process groups are the
slow part); each test below asserts the result of its check. The worker is this file run as a script.
"""

from __future__ import annotations

import os
import sys

import pytest
from helpers import assert_ok, run_rank_checks, run_rank_scripts

pytest.importorskip("deepspeed", reason='needs DeepSpeed: pip install "fff-moe-plugin[deepspeed]"')

CHECKS = ("ep_equality", "ep_equality_dropless_uneven", "ep_equality_forest", "uniform_tokens", "uniform_tokens_ragged",
          "zero_training", "engine_ep_equality", "checkpoints")


# ---------------------------------------------------------------------------------------------------- worker
def _model(d: int = 16, n_blocks: int = 2):
    import torch

    from fff_moe_plugin.experiments.toy import ToyNet

    torch.manual_seed(0)
    return ToyNet(d, 4 * d, n_blocks, activation="gelu")


def _ds_config(zero: int, ep_size: int, lr: float = 1e-2, **block) -> dict:
    fff = {"depth": 3, "leaf_width": 8, "ep_size": ep_size, "master_leaf": True, "load_balance_coef": 0.01,
           "hardening": 0.01, "replace": "blocks.*.mlp", "capacity_factor": 8.0, "eval_capacity_factor": 8.0}
    fff.update(block)
    return {
        "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1,
        "optimizer": {"type": "Adam", "params": {"lr": lr, "torch_adam": True}},
        "zero_optimization": {"stage": zero}, "steps_per_print": 10**9, "fff_moe": fff,
    }


def _engine(zero: int, ep_size: int, **block):
    from fff_moe_plugin.deepspeed import initialize

    engine, *_ = initialize(model=_model(), config=_ds_config(zero, ep_size, **block), verbose=False)
    return engine


def _fff_layers(engine):
    from fff_moe_plugin.integrations.deepspeed import FFFMoE

    return [m for m in engine.module.modules() if isinstance(m, FFFMoE)]


def _batch(rank: int, n: int = 4, t: int = 6, d: int = 16):
    import torch

    g = torch.Generator().manual_seed(100 + rank)
    return torch.randn(n, t, d, generator=g), torch.randn(n, t, d, generator=g)


def _train(engine, rank: int, steps: int) -> list[float]:
    import torch.nn.functional as F

    from fff_moe_plugin.deepspeed import aux_loss

    x, y = _batch(rank)
    losses = []
    for _ in range(steps):
        task = F.mse_loss(engine(x), y)
        engine.backward(task + aux_loss(engine))
        engine.step()
        losses.append(float(task))
    return losses


def check_ep_equality(rank: int, dropless: bool = False, uneven: bool = False, n_trees: int = 1) -> None:
    """Same weights, same tokens per rank: ep_size 2 == ep_size 1 in outputs, l_aux, counts and gradients (a forest
    of ``n_trees``: K assignments per token over all the trees' leaves, sharded together)."""
    import torch
    import torch.distributed as dist

    from fff_moe_plugin import FFF, FFFConfig
    from fff_moe_plugin.integrations.deepspeed import FFFMoE

    cfg = FFFConfig(d_model=8, leaf_width=4, depth=3, train_mode="hard", hardening=0.1, load_balance="leaf",
                    load_balance_coef=0.05, master_leaf=True, n_trees=n_trees)
    torch.manual_seed(0)
    core = FFF(cfg).double()
    knobs = dict(capacity_factor=4.0, eval_capacity_factor=4.0, min_capacity=0, drop_tokens=not dropless)
    layers = {ep: FFFMoE.from_fff(core, ep_size=ep, **knobs) for ep in (1, 2)}
    for m in layers.values():
        m.set_deepspeed_parallelism()
    n_tokens = 24 + (16 * rank if uneven else 0)
    g = torch.Generator().manual_seed(7 + rank)
    x = torch.randn(n_tokens, 8, generator=g, dtype=torch.float64)
    up = torch.randn(n_tokens, 8, generator=g, dtype=torch.float64)
    res = {}
    for ep, m in layers.items():
        y, l_aux, counts = m(x)
        ((y * up).sum() + l_aux).backward()
        res[ep] = (y.detach(), l_aux.detach(), counts, m.gate.last_record.stats["dropped"])
    torch.testing.assert_close(res[2][0], res[1][0], rtol=0, atol=1e-12)
    torch.testing.assert_close(res[2][1], res[1][1], rtol=0, atol=1e-12)
    assert torch.equal(res[2][2], res[1][2]), (res[2][2], res[1][2])
    if dropless:
        assert res[1][3] == 0 and res[2][3] == 0
    m1, m2 = layers[1], layers[2]
    # replicated parameters: the same local gradient
    for name in ("deepspeed_moe.gate.router.node_weight", "deepspeed_moe.gate.router.node_bias", "master.w1",
                 "master.gate"):
        a, b = m1.get_parameter(name).grad, m2.get_parameter(name).grad
        torch.testing.assert_close(b, a, rtol=0, atol=1e-12)
    # a leaf's gradient at ep_size 2 holds both ranks' tokens: the sum over ranks of its ep_size-1 gradient
    for pname in ("w1", "b1", "w2", "b2"):
        full = torch.stack([getattr(leaf, pname).grad for leaf in m1.deepspeed_moe.experts.deepspeed_experts])
        dist.all_reduce(full)
        local = torch.stack([getattr(leaf, pname).grad for leaf in m2.deepspeed_moe.experts.deepspeed_experts])
        torch.testing.assert_close(local, full[list(m2.local_leaves)], rtol=0, atol=1e-12)
    # gathering the shards gives back the core layer
    back = m2.to_fff()
    for name, p in core.named_parameters():
        assert torch.equal(back.get_parameter(name), p), name


def _counting_all_reduce(calls: list):
    """A stand-in for torch.distributed.all_reduce that counts its calls and then makes them."""
    import torch.distributed as dist

    real = dist.all_reduce

    def all_reduce(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    return real, all_reduce


def check_uniform_tokens(rank: int) -> None:
    """uniform_tokens: the same outputs, l_aux, gradients and drops as the capacity agreed in every call (tokens
    are dropped here), with one all-reduce on the first call and none after."""
    import torch
    import torch.distributed as dist

    from fff_moe_plugin import FFF, FFFConfig
    from fff_moe_plugin.integrations.deepspeed import FFFMoE

    cfg = FFFConfig(d_model=8, leaf_width=4, depth=3, train_mode="hard", load_balance="leaf", load_balance_coef=0.05)
    torch.manual_seed(0)
    core = FFF(cfg).double()
    knobs = dict(ep_size=2, capacity_factor=1.0, eval_capacity_factor=1.0, min_capacity=0)
    layers = {u: FFFMoE.from_fff(core, uniform_tokens=u, **knobs) for u in (False, True)}
    for m in layers.values():
        m.set_deepspeed_parallelism()
    g = torch.Generator().manual_seed(11 + rank)
    x = torch.randn(40, 8, generator=g, dtype=torch.float64)
    up = torch.randn(40, 8, generator=g, dtype=torch.float64)
    res = {}
    for u, m in layers.items():
        res[u] = []
        for call in range(2):
            calls = []
            real, counting = _counting_all_reduce(calls)
            dist.all_reduce = counting
            try:
                y, l_aux, _ = m(x)
            finally:
                dist.all_reduce = real
            ((y * up).sum() + l_aux).backward()
            res[u].append((y.detach(), l_aux.detach(), m.gate.last_record.stats["dropped"], len(calls)))
    for (y0, a0, d0, n0), (y1, a1, d1, n1) in zip(res[False], res[True]):
        torch.testing.assert_close(y1, y0, rtol=0, atol=0)
        torch.testing.assert_close(a1, a0, rtol=0, atol=0)
        assert d1 == d0
    assert sum(r[2] for r in res[True]) > 0, "the check needs dropped tokens"
    assert [r[3] for r in res[False]] == [1, 1], res[False]  # the capacity agreed in each call
    assert [r[3] for r in res[True]] == [1, 0], res[True]  # the check on the first call only
    for (n0, p0), (n1, p1) in zip(layers[False].named_parameters(), layers[True].named_parameters()):
        assert n0 == n1
        torch.testing.assert_close(p1.grad, p0.grad, rtol=0, atol=0)


def check_uniform_tokens_ragged(rank: int) -> None:
    """uniform_tokens with different token counts on the two ranks: a ValueError on both, on the first call."""
    import torch

    from fff_moe_plugin import FFF, FFFConfig
    from fff_moe_plugin.integrations.deepspeed import FFFMoE

    cfg = FFFConfig(d_model=8, leaf_width=4, depth=3, train_mode="hard")
    torch.manual_seed(0)
    m = FFFMoE.from_fff(FFF(cfg), ep_size=2, uniform_tokens=True)
    m.set_deepspeed_parallelism()
    try:
        m(torch.randn(24 + 8 * rank, 8))
    except ValueError as e:
        assert "uniform_tokens is set" in str(e) and "24 to 32 tokens" in str(e), e
    else:
        raise AssertionError("different token counts under uniform_tokens were not refused")


def check_zero_training(rank: int) -> None:
    """deepspeed.initialize through the JSON flag + a few steps reduce the loss, ZeRO 0, 1 and 2, ep_size 2."""
    for zero in (0, 1, 2):
        engine = _engine(zero, ep_size=2)
        assert len(_fff_layers(engine)) == 2 and engine.has_moe_layers
        losses = _train(engine, rank, steps=8)
        assert losses[-1] < 0.9 * losses[0], f"ZeRO {zero}: loss {losses[0]:.4f} -> {losses[-1]:.4f}"


def check_engine_ep_equality(rank: int) -> None:
    """Three Adam steps through the engine give the same trees at ep_size 1 and 2 (DeepSpeed's gradient
    averaging keeps expert gradients independent of ep_size)."""
    import torch

    trees = {}
    for ep in (1, 2):
        engine = _engine(0, ep_size=ep)
        _train(engine, rank, steps=3)
        trees[ep] = [layer.to_fff() for layer in _fff_layers(engine)]
    for t1, t2 in zip(trees[1], trees[2]):
        for name, p in t1.named_parameters():
            torch.testing.assert_close(t2.get_parameter(name), p, rtol=1e-5, atol=1e-6, msg=name)


def check_checkpoints(rank: int, ckpt_dir: str) -> None:
    """save/load round trip at ep_size 2 is exact; the same checkpoint loads at ep_size 1 (weights only) and
    is the same function."""
    import torch
    import torch.distributed as dist

    x, _ = _batch(50)
    engine = _engine(0, ep_size=2)
    _train(engine, rank, steps=3)
    engine.eval()
    with torch.no_grad():
        before = engine(x)
    trees = [layer.to_fff() for layer in _fff_layers(engine)]
    engine.save_checkpoint(ckpt_dir, tag="t3", client_state={"step": 3})
    dist.barrier()
    files = sorted(os.listdir(os.path.join(ckpt_dir, "t3")))
    experts = [f for f in files if "_expert_" in f]
    assert len(experts) == 2 * 8, files  # one file per global leaf and layer

    torch.manual_seed(123)  # a different init, so that a no-op load cannot pass
    again = _engine(0, ep_size=2)
    _, client = again.load_checkpoint(ckpt_dir, tag="t3")
    assert client["step"] == 3
    again.eval()
    with torch.no_grad():
        assert torch.equal(again(x), before)

    one = _engine(0, ep_size=1)
    one.load_checkpoint(ckpt_dir, tag="t3", load_optimizer_states=False, load_lr_scheduler_states=False)
    one.eval()
    with torch.no_grad():
        torch.testing.assert_close(one(x), before, rtol=1e-6, atol=1e-6)
    for t_saved, layer in zip(trees, _fff_layers(one)):
        for name, p in t_saved.named_parameters():
            assert torch.equal(layer.to_fff().get_parameter(name), p), name


def worker(out_dir: str, checks: list[str]) -> None:
    every = {
        "ep_equality": check_ep_equality,
        "ep_equality_dropless_uneven": lambda rank: check_ep_equality(rank, dropless=True, uneven=True),
        "ep_equality_forest": lambda rank: check_ep_equality(rank, n_trees=3),
        "uniform_tokens": check_uniform_tokens,
        "uniform_tokens_ragged": check_uniform_tokens_ragged,
        "zero_training": check_zero_training,
        "engine_ep_equality": check_engine_ep_equality,
        "checkpoints": lambda rank: check_checkpoints(rank, os.path.join(out_dir, "ckpt")),
    }
    run_rank_checks(out_dir, {name: every[name] for name in checks})


# ---------------------------------------------------------------------------------------------------- tests

@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return run_rank_scripts(__file__, tmp_path_factory.mktemp("ds_dist"), CHECKS, timeout=400)




@pytest.mark.slow
def test_ep_size_2_equals_ep_size_1_outputs_aux_and_gradients(results):
    assert_ok(results, "ep_equality")


@pytest.mark.slow
def test_dropless_capacity_is_agreed_across_ranks_with_uneven_token_counts(results):
    assert_ok(results, "ep_equality_dropless_uneven")


@pytest.mark.slow
def test_an_expert_parallel_forest_equals_the_one_rank_forest(results):
    assert_ok(results, "ep_equality_forest")


@pytest.mark.slow
def test_uniform_tokens_agrees_on_the_capacity_once_with_the_same_results(results):
    assert_ok(results, "uniform_tokens")


@pytest.mark.slow
def test_uniform_tokens_refuses_different_token_counts_on_the_first_call(results):
    assert_ok(results, "uniform_tokens_ragged")


@pytest.mark.slow
def test_deepspeed_initialize_with_json_flag_trains_under_zero_0_1_2(results):
    assert_ok(results, "zero_training")


@pytest.mark.slow
def test_engine_steps_at_ep_size_2_equal_ep_size_1(results):
    assert_ok(results, "engine_ep_equality")


@pytest.mark.slow
def test_checkpoint_round_trip_and_reload_at_other_ep_size(results):
    assert_ok(results, "checkpoints")


if __name__ == "__main__":
    worker(sys.argv[1], sys.argv[2:])
