"""The Tutel-backed FFF equals the DeepSpeed-backed FFF (FFFMoE) on the same weights, on 1 and 2 processes, as
a layer and through DeepSpeed's engine with expert parallelism (``"backend": "tutel"``, ep_size 2).

Needs Tutel (built from source) and DeepSpeed (the `deepspeed` extra); runs on CPU with gloo.
"""

import os
import sys

import pytest
import torch
import torch.multiprocessing as mp
from helpers import assert_ok, free_port, run_rank_checks, run_rank_scripts

from fff_moe_plugin import FFF, FFFConfig

try:
    from fff_moe_plugin.integrations.tutel import TutelFFF  # noqa: F401
except ImportError as e:  # the message says how to build Tutel
    pytest.skip(str(e), allow_module_level=True)
try:
    import deepspeed  # noqa: F401
except ImportError:
    pytest.skip('needs DeepSpeed: pip install -e ".[deepspeed]"', allow_module_level=True)

WIDTH, TOKENS = 8, 24  # model width; tokens per rank
MASTER = ("master.w1", "master.b1", "master.w2", "master.b2", "master.gate")


def make_config():
    return FFFConfig(d_model=WIDTH, leaf_width=4, depth=3, train_mode="hard", master_leaf=True,
                     load_balance="leaf", hardening=0.1)


def _worker(rank, world, port, path):
    os.environ.update(DS_ACCELERATOR="cpu", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
    import deepspeed

    from fff_moe_plugin.integrations.deepspeed.layer import FFFMoE
    from fff_moe_plugin.integrations.tutel import TutelFFF

    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    torch.manual_seed(0)
    core = FFF(make_config())  # the same draws on every rank
    g = torch.Generator().manual_seed(1)
    x = torch.randn(world * TOKENS, WIDTH, generator=g)[rank * TOKENS:(rank + 1) * TOKENS]
    grad = torch.randn(world * TOKENS, WIDTH, generator=g)[rank * TOKENS:(rank + 1) * TOKENS]

    # nothing dropped on either side: DeepSpeed without token dropping, Tutel dropless
    ds = FFFMoE.from_fff(core, ep_size=world, drop_tokens=False)
    ds.set_deepspeed_parallelism()
    tu = TutelFFF.from_fff(core, capacity_factor=0.0)
    result = {}
    for name, out in (("deepspeed", ds.forward_block(x)), ("tutel", tu(x))):
        ((out.output * grad).sum() + out.aux_loss).backward()
        result[name] = dict(output=out.output.detach(), aux=out.aux_loss.detach(), counts=out.stats["counts"])
    leaves = ds.deepspeed_moe.experts.deepspeed_experts
    result["deepspeed"]["leaf_grads"] = [torch.stack([getattr(leaf, n).grad for leaf in leaves])
                                         for n in ("w1", "b1", "w2", "b2")]
    result["deepspeed"]["shared_grads"] = [ds.router.node_weight.grad, ds.router.node_bias.grad] + [
        ds.get_parameter(n).grad.reshape(tu.get_parameter(n).shape) for n in MASTER]  # the blend logit: [1] -> []
    e = tu.moe.experts
    result["tutel"]["leaf_grads"] = [e.batched_fc1_w.grad.transpose(1, 2), e.batched_fc1_bias.grad,
                                     e.batched_fc2_w.grad, e.batched_fc2_bias.grad]
    result["tutel"]["shared_grads"] = [tu.router.node_weight.grad, tu.router.node_bias.grad] + [
        tu.get_parameter(n).grad for n in MASTER]
    result["leaves"] = (list(ds.local_leaves), list(tu.local_leaves))
    torch.save(result, os.path.join(path, f"rank{rank}.pt"))
    torch.distributed.destroy_process_group()



@pytest.mark.slow
@pytest.mark.parametrize("world", [1, 2])
def test_tutel_fff_equals_deepspeed_fff_on_the_same_weights(world, tmp_path):
    mp.spawn(_worker, args=(world, free_port(), str(tmp_path)), nprocs=world)
    for r in range(world):
        res = torch.load(tmp_path / f"rank{r}.pt")
        ds, tu = res["deepspeed"], res["tutel"]
        assert res["leaves"][0] == res["leaves"][1]  # both hold the same leaves on this rank
        torch.testing.assert_close(tu["output"], ds["output"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(tu["aux"], ds["aux"], rtol=1e-5, atol=1e-6)
        assert torch.equal(tu["counts"], ds["counts"])
        for a, b in zip(tu["leaf_grads"] + tu["shared_grads"], ds["leaf_grads"] + ds["shared_grads"]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_tutel_fffmoe_state_dict_is_fffmoes_and_loads_both_ways():
    from fff_moe_plugin.integrations.deepspeed import FFFMoE
    from fff_moe_plugin.integrations.deepspeed.tutel_moe import TutelFFFMoE

    torch.manual_seed(0)
    core = FFF(make_config())
    ds = FFFMoE.from_fff(core, drop_tokens=False)
    tu = TutelFFFMoE.from_fff(core)
    ds_state, tu_state = ds.state_dict(), tu.state_dict()
    assert set(tu_state) == set(ds_state)  # one entry per leaf, no Tutel names
    for name, value in ds_state.items():
        assert torch.equal(tu_state[name], value), name
    x = torch.randn(TOKENS, WIDTH)
    torch.manual_seed(1)
    fresh = TutelFFFMoE(make_config())
    assert not torch.equal(fresh(x)[0], tu(x)[0])
    fresh.load_state_dict(ds_state)  # FFFMoE's state into the Tutel layer ...
    assert torch.equal(fresh(x)[0], tu(x)[0])
    other = FFFMoE(make_config(), drop_tokens=False)
    other.load_state_dict(fresh.state_dict())  # ... and back
    torch.testing.assert_close(other(x)[0], ds(x)[0], rtol=0, atol=0)
    missing = {k: v for k, v in ds_state.items() if k != "deepspeed_moe.experts.deepspeed_experts.1.w1"}
    with pytest.raises(RuntimeError, match=r"deepspeed_experts\.1\.w1 missing"):
        fresh.load_state_dict(missing)


# ------------------------------------------------------------------------------------------------------------
# Through DeepSpeed's engine: the "fff_moe" block with backend "tutel" at ep_size 2 on 2 processes. The checks
# run in one 2-process job (this file run as a script); each test below asserts the result of one check.
ENGINE_CHECKS = ("engine_zero0", "engine_zero2", "checkpoint")
D_MODEL = 16


def _engine_model():
    from fff_moe_plugin.experiments.toy import ToyNet

    return ToyNet(D_MODEL, 4 * D_MODEL, 2, activation="gelu")


def _engine(backend: str, zero: int, seed: int = 0, ep_size: int = 2):
    """A DeepSpeed engine from fff_moe_plugin.deepspeed.initialize; the same seed gives the same initial model
    for both backends. Plain SGD with momentum: its update is linear in the gradient, so a wrongly scaled or
    wrongly reduced leaf gradient shows in the parameters (Adam's update would hide a scale)."""
    from fff_moe_plugin.deepspeed import initialize

    # capacity 8x the even share: nothing is dropped on either backend (24 tokens per rank, 8 leaves)
    block = {"backend": backend, "depth": 3, "leaf_width": 8, "ep_size": ep_size, "master_leaf": True,
             "load_balance_coef": 0.05, "hardening": 0.05, "replace": "blocks.*.mlp", "capacity_factor": 8.0,
             "eval_capacity_factor": 8.0}
    config = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1,
              "optimizer": {"type": "SGD", "params": {"lr": 0.05, "momentum": 0.9}},
              "zero_optimization": {"stage": zero}, "zero_allow_untested_optimizer": True,  # torch's SGD
              "steps_per_print": 10**9, "fff_moe": block}
    torch.manual_seed(seed)
    engine, *_ = initialize(model=_engine_model(), config=config, verbose=False)
    return engine


def _batch(rank: int):
    g = torch.Generator().manual_seed(100 + rank)  # each rank its own tokens
    return torch.randn(4, 6, D_MODEL, generator=g), torch.randn(4, 6, D_MODEL, generator=g)


def _train(engine, rank: int, steps: int) -> list[float]:
    import torch.nn.functional as F

    from fff_moe_plugin.deepspeed import aux_loss

    x, y = _batch(rank)
    losses = []
    for _ in range(steps):
        loss = F.mse_loss(engine(x), y) + aux_loss(engine)
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    return losses


def _trees(engine):
    """Each FFF layer's whole tree (leaves gathered over the expert-parallel group), as a core FFF."""
    from deepspeed.moe.layer import MoE

    return [m.to_fff() for m in engine.module.modules() if isinstance(m, MoE)]


def _dense(engine) -> dict:
    """The parameters outside the FFF layers."""
    return {n: p.detach().clone() for n, p in engine.module.named_parameters() if ".mlp." not in n}


def _assert_same_model(a, b, exact: bool = False):
    tol = dict(rtol=0, atol=0) if exact else dict(rtol=1e-5, atol=1e-6)
    trees_a, trees_b = _trees(a), _trees(b)
    assert len(trees_a) == len(trees_b) == 2
    for i, (ta, tb) in enumerate(zip(trees_a, trees_b)):
        for name, p in ta.named_parameters():
            torch.testing.assert_close(tb.get_parameter(name), p, **tol, msg=lambda m, i=i, n=name: f"{i}.{n}: {m}")
    dense_a, dense_b = _dense(a), _dense(b)
    assert dense_a.keys() == dense_b.keys()
    for name, p in dense_a.items():
        torch.testing.assert_close(dense_b[name], p, **tol, msg=lambda m, n=name: f"{n}: {m}")


def check_engine(rank: int, zero: int):
    """Three SGD steps through the engine: backend "tutel" == backend "deepspeed" (FFFMoE), leaves and rest."""
    from fff_moe_plugin.integrations.deepspeed import FFFMoE
    from fff_moe_plugin.integrations.deepspeed.tutel_moe import TutelFFFMoE

    engines = {backend: _engine(backend, zero) for backend in ("deepspeed", "tutel")}
    assert all(e.has_moe_layers and e.num_experts == [8, 8] for e in engines.values())
    kinds = {b: {type(m) for m in e.module.modules() if isinstance(m, (FFFMoE, TutelFFFMoE))} for b, e in
             engines.items()}
    assert kinds == {"deepspeed": {FFFMoE}, "tutel": {TutelFFFMoE}}, kinds
    _assert_same_model(engines["deepspeed"], engines["tutel"], exact=True)  # the same initial model
    losses = {b: _train(e, rank, steps=3) for b, e in engines.items()}
    assert losses["tutel"][-1] < losses["tutel"][0], losses
    torch.testing.assert_close(losses["tutel"], losses["deepspeed"], rtol=1e-5, atol=1e-6)
    _assert_same_model(engines["deepspeed"], engines["tutel"])
    return engines["tutel"]


def check_checkpoint(rank: int, engine, ckpt_dir: str):
    """save_checkpoint at ep_size 2 writes one file per global leaf; load_checkpoint into a model built under
    another seed restores the weights and the optimizer's momentum; the same files load (weights only) into
    backend "deepspeed" and into backend "tutel" at ep_size 1 as the same function."""
    import torch.distributed as dist

    x, _ = _batch(50)
    engine.eval()
    with torch.no_grad():
        before = engine(x)
    engine.save_checkpoint(ckpt_dir, tag="t3")
    dist.barrier()
    files = sorted(os.listdir(os.path.join(ckpt_dir, "t3")))
    expected = {f"layer_{layer}_expert_{leaf}_mp_rank_00_model_states.pt" for layer in (0, 1) for leaf in range(8)}
    assert expected <= set(files) and sum("_expert_" in f for f in files) == 16, files

    again = _engine("tutel", zero=2, seed=123)  # other initial weights, so that a no-op load cannot pass
    again.eval()
    with torch.no_grad():
        assert not torch.equal(again(x), before)
    again.load_checkpoint(ckpt_dir, tag="t3")
    with torch.no_grad():
        assert torch.equal(again(x), before)
    _assert_same_model(engine, again, exact=True)
    engine.train()
    again.train()
    _train(engine, rank, steps=1)
    _train(again, rank, steps=1)  # the same step only if the momentum came back too
    _assert_same_model(engine, again, exact=True)

    for backend, ep_size in (("deepspeed", 2), ("tutel", 1)):
        other = _engine(backend, zero=2, seed=123, ep_size=ep_size)
        other.load_checkpoint(ckpt_dir, tag="t3", load_module_only=True)
        other.eval()
        with torch.no_grad():
            torch.testing.assert_close(other(x), before, rtol=1e-5, atol=1e-6, msg=lambda m, b=backend: f"{b}: {m}")


def engine_worker(out_dir: str, checks: list[str]) -> None:
    kept = {}  # the engine_zero2 check's engine, which the checkpoint check continues

    def engine_zero2(rank: int) -> None:
        kept["engine"] = check_engine(rank, zero=2)

    def checkpoint(rank: int) -> None:
        if "engine" not in kept:
            raise RuntimeError("the checkpoint check continues the engine_zero2 check, which failed")
        check_checkpoint(rank, kept["engine"], os.path.join(out_dir, "ckpt"))

    every = {"engine_zero0": lambda rank: check_engine(rank, zero=0), "engine_zero2": engine_zero2,
             "checkpoint": checkpoint}
    run_rank_checks(out_dir, {name: every[name] for name in checks})


@pytest.fixture(scope="module")
def engine_results(tmp_path_factory):
    return run_rank_scripts(__file__, tmp_path_factory.mktemp("tutel_engine"), ENGINE_CHECKS, timeout=300)




@pytest.mark.slow
def test_engine_steps_with_tutel_backend_at_ep_size_2_equal_deepspeed_backend_zero_0(engine_results):
    assert_ok(engine_results, "engine_zero0")


@pytest.mark.slow
def test_engine_steps_with_tutel_backend_at_ep_size_2_equal_deepspeed_backend_zero_2(engine_results):
    assert_ok(engine_results, "engine_zero2")


@pytest.mark.slow
def test_tutel_backend_checkpoint_per_leaf_files_round_trip_and_reload_in_deepspeed_backend_and_at_ep_1(
        engine_results):
    assert_ok(engine_results, "checkpoint")


if __name__ == "__main__":
    engine_worker(sys.argv[1], sys.argv[2:])
