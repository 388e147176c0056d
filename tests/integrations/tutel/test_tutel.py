"""The Tutel-backed FFF against the core FFF: same function, same gradients, on 1 and 2 processes.

Needs Tutel, built from source (the skip message says how). The 2-process runs use gloo on CPU.
"""

import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fff_moe_plugin import FFF, FFFConfig

try:
    from fff_moe_plugin.integrations.tutel import TutelFFF
except ImportError as e:  # the message says how to build Tutel
    pytest.skip(str(e), allow_module_level=True)

WIDTH, TOKENS = 8, 24  # model width; tokens per rank


def make_config(**kw):
    values = dict(d_model=WIDTH, leaf_width=4, depth=3, train_mode="hard", master_leaf=True,
                  load_balance="leaf", hardening=0.1)
    values.update(kw)
    return FFFConfig(**values)


def data(world, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(world * TOKENS, WIDTH, generator=g)  # every rank's tokens, rank r holds rows r*T..
    grad = torch.randn(world * TOKENS, WIDTH, generator=g)  # upstream gradient of the output
    return x, grad


def leaf_grads(layer):
    """Gradients of this rank's leaves in the core layout: w1 [L_r, d, l], b1, w2 [L_r, l, o], b2."""
    e = layer.moe.experts
    return [e.batched_fc1_w.grad.transpose(1, 2), e.batched_fc1_bias.grad, e.batched_fc2_w.grad,
            e.batched_fc2_bias.grad]


MASTER = ("master.w1", "master.b1", "master.w2", "master.b2", "master.gate")


def master_and_node_grads(layer):
    master = MASTER if layer.config.master_leaf else ()
    return [layer.router.node_weight.grad, layer.router.node_bias.grad] + [layer.get_parameter(n).grad for n in master]


def run_rank(rank, world, config, capacity_factor):
    """What one rank computes with the Tutel layer; the caller compares it with the core layer."""
    torch.manual_seed(0)
    core = FFF(config)  # the same draws on every rank
    x, grad = data(world)
    mine = slice(rank * TOKENS, (rank + 1) * TOKENS)
    layer = TutelFFF.from_fff(core, capacity_factor=capacity_factor)
    out = layer(x[mine])
    ((out.output * grad[mine]).sum() + out.aux_loss).backward()
    result = dict(
        output=out.output.detach(), aux=out.aux_loss.detach(), counts=out.stats["counts"],
        dropped=out.stats["dropped"], leaves=list(layer.local_leaves),
        leaf_grads=[g.clone() for g in leaf_grads(layer)],
        shared_grads=[g.clone() for g in master_and_node_grads(layer)],
    )
    with torch.no_grad():
        layer.eval()
        result["eval_r1"] = layer(x[mine], adaptive_r=1).output
        result["eval_r0"] = layer(x[mine], adaptive_r=0).output  # every rank gathers all leaves
        state = {k: v.clone() if torch.is_tensor(v) else v for k, v in layer.state_dict().items()}
        torch.manual_seed(123)
        fresh = TutelFFF(config, capacity_factor=capacity_factor).eval()  # other weights ...
        result["fresh_differs"] = not torch.equal(fresh(x[mine]).output, result["eval_r1"])
        fresh.load_state_dict(state)  # ... until the checkpoint is loaded
        result["reloaded"] = fresh(x[mine], adaptive_r=1).output
        back = layer.to_fff()  # the leaves gathered from every rank
        ours, theirs = back.state_dict(), core.state_dict()  # tensors and the saved config
        result["to_fff_equal"] = ours.keys() == theirs.keys() and all(
            torch.equal(v, theirs[k]) if torch.is_tensor(v) else v == theirs[k] for k, v in ours.items())
    return result


def _worker(rank, world, port, config, capacity_factor, path):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        result = run_rank(rank, world, config, capacity_factor)
        if world > 1:  # a depth that gives fewer leaves than ranks is refused before any work
            try:
                TutelFFF(make_config(depth=0))
                result["depth0_refused"] = False
            except ValueError:
                result["depth0_refused"] = True
        torch.save(result, os.path.join(path, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(world, config, capacity_factor, tmp_path):
    if world == 1:
        return [run_rank(0, 1, config, capacity_factor)]
    mp.spawn(_worker, args=(world, free_port(), config, capacity_factor, str(tmp_path)), nprocs=world)
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]


def core_reference(world, config):
    """The core layer run on each rank's tokens separately (as each rank routes its own), gradients summed."""
    torch.manual_seed(0)
    core = FFF(config)
    x, grad = data(world)
    outs, auxes, loss = [], [], 0.0
    for r in range(world):
        mine = slice(r * TOKENS, (r + 1) * TOKENS)
        out = core(x[mine])
        outs.append(out.output.detach())
        auxes.append(out.aux_loss.detach())
        loss = loss + (out.output * grad[mine]).sum() + out.aux_loss
    loss.backward()
    leaf = [core.leaves.w1.grad, core.leaves.b1.grad, core.leaves.w2.grad, core.leaves.b2.grad]
    shared = [core.router.node_weight.grad, core.router.node_bias.grad] + [core.get_parameter(n).grad for n in MASTER]
    with torch.no_grad():
        core.eval()
        evals = [core(x[r * TOKENS:(r + 1) * TOKENS]).output for r in range(world)]
    return outs, auxes, leaf, shared, evals


def assert_near(a, b):
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("world, n_trees", [(1, 1), (2, 1), (1, 3), (2, 3)])
def test_tutel_fff_equals_core_fff_in_hard_mode_outputs_and_gradients(world, n_trees, tmp_path):
    config = make_config(n_trees=n_trees)  # a forest of 3: each token to one leaf in each tree, top-3 in Tutel
    ranks = run(world, config, 0.0, tmp_path)  # dropless: nothing dropped
    outs, auxes, leaf, shared, evals = core_reference(world, config)
    for r, res in enumerate(ranks):
        assert_near(res["output"], outs[r])
        assert_near(res["aux"], auxes[r])
        assert res["dropped"].item() == 0
        for got, want in zip(res["leaf_grads"], leaf):  # this rank's leaves get every rank's tokens' gradient
            assert_near(got, want[res["leaves"]])
        # eval: adaptive_r 1 (all-to-all) and 0 (leaves gathered) give the core function
        assert_near(res["eval_r1"], evals[r])
        assert_near(res["eval_r0"], evals[r])
        # checkpoint round trip and conversion back to the core layer
        assert res["fresh_differs"]
        assert torch.equal(res["reloaded"], res["eval_r1"])
        assert res["to_fff_equal"]
    assert sorted(j for res in ranks for j in res["leaves"]) == list(range(config.total_leaves))
    # nodes and master leaf are replicated: their gradients, summed over ranks, are the core's
    for i, want in enumerate(shared):
        assert_near(sum(res["shared_grads"][i] for res in ranks), want)
    if world > 1:
        assert all(res["depth0_refused"] for res in ranks)


def expected_capped(config, x, capacity):
    """Core output with Tutel's dropping rule: a leaf keeps its first `capacity` tokens in token order."""
    torch.manual_seed(0)
    core = FFF(config).eval()
    with torch.no_grad():
        out = core(x).output
        leaf = core.router(x).leaf
    seen = torch.zeros(config.n_leaves, dtype=torch.long)
    keep = torch.zeros(x.shape[0], dtype=torch.bool)
    for t, j in enumerate(leaf.tolist()):
        keep[t] = seen[j] < capacity
        seen[j] += 1
    return torch.where(keep[:, None], out, torch.zeros_like(out)), int((~keep).sum())


@pytest.mark.parametrize("world", [1, 2])
def test_capped_capacity_drops_beyond_capacity_and_counts_them(world, tmp_path):
    # no master leaf, so that a dropped token's output is exactly zero; depth 2: 4 leaves of 24 tokens per rank
    config = make_config(depth=2, master_leaf=False)
    factor = 0.5
    capacity = int(factor * -(-TOKENS // config.n_leaves))  # Tutel: k * int(c * ceil(S / L)) slots per rank
    ranks = run(world, config, factor, tmp_path)
    x, _ = data(world)
    total = 0
    for r, res in enumerate(ranks):
        want, dropped = expected_capped(config, x[r * TOKENS:(r + 1) * TOKENS], capacity)
        assert_near(res["output"], want)
        assert res["dropped"].item() == dropped
        total += dropped
    assert total > 0  # the case really drops


def test_dropless_and_negative_factor_capacity(tmp_path):
    config = make_config(depth=2, master_leaf=False)
    torch.manual_seed(0)
    core = FFF(config).eval()
    x = data(1)[0]
    want = core(x).output
    for factor in (0.0, -100.0):  # 0: dropless; -100: dropless up to 100x the even share, never reached here
        layer = TutelFFF.from_fff(core, capacity_factor=factor).eval()
        out = layer(x)
        assert_near(out.output, want)
        assert out.stats["dropped"].item() == 0
    # -0.5: dropless up to half the even share, i.e. the same cap as +0.5
    capped, dropped = expected_capped(config, x, int(0.5 * -(-TOKENS // config.n_leaves)))
    out = TutelFFF.from_fff(core, capacity_factor=-0.5).eval()(x)
    assert_near(out.output, capped)
    assert out.stats["dropped"].item() == dropped > 0


@pytest.mark.parametrize("n_trees", [1, 3])
def test_soft_training_mixes_every_leaf_like_the_core_soft_forward(n_trees):
    config = make_config(train_mode="soft", n_trees=n_trees)
    torch.manual_seed(0)
    core = FFF(config)
    layer = TutelFFF.from_fff(core)
    x, grad = data(1)
    a, b = core(x), layer(x)
    assert_near(b.output, a.output)
    assert_near(b.aux_loss, a.aux_loss)
    ((a.output * grad).sum() + a.aux_loss).backward()
    ((b.output * grad).sum() + b.aux_loss).backward()
    for got, want in zip(leaf_grads(layer), [core.leaves.w1.grad, core.leaves.b1.grad,
                                             core.leaves.w2.grad, core.leaves.b2.grad]):
        assert_near(got, want)
    assert_near(layer.router.node_weight.grad, core.router.node_weight.grad)
    core.eval()
    layer.eval()  # a soft-trained tree evaluates by descent, leaf output unscaled
    assert_near(layer(x).output, core(x).output)


@pytest.mark.parametrize("bias_gate", ["unshifted", "shifted"])
def test_decision_shifts_route_and_gate_as_in_the_core_layer_and_travel_both_ways(bias_gate):
    config = make_config(load_balance="bias", bias_update_rate=0.01, bias_gate=bias_gate)
    torch.manual_seed(0)
    core = FFF(config)
    with torch.no_grad():
        core.router.balance_bias.uniform_(-0.5, 0.5)
    layer = TutelFFF.from_fff(core)
    assert torch.equal(layer.router.balance_bias, core.router.balance_bias)
    x, _ = data(1)
    for training in (True, False):
        core.train(training)
        layer.train(training)
        assert_near(layer(x).output, core(x).output)
    assert torch.equal(layer.to_fff().router.balance_bias, core.router.balance_bias)


def test_the_soft_phase_of_the_schedule_dispatches_every_leaf_then_one():
    from fff_moe_plugin import after_optimizer_step

    config = make_config(soft_updates=1)
    torch.manual_seed(0)
    core = FFF(config)
    layer = TutelFFF.from_fff(core)
    x, _ = data(1)
    assert layer.router.trains_soft()
    assert_near(layer(x).output, core(x).output)  # soft: every leaf, mixed
    for module in (core, layer):
        after_optimizer_step(module, 1)
    assert not layer.router.trains_soft()
    out = layer(x)
    assert_near(out.output, core(x).output)  # hard: one leaf per token
    assert out.stats["dropped"].item() == 0


def test_bad_arguments_are_refused_with_the_allowed_values():
    with pytest.raises(ValueError, match="capacity_factor"):
        TutelFFF(make_config(), capacity_factor=float("nan"))
    with pytest.raises(ValueError, match="even"):
        TutelFFF(make_config(d_model=7))
    layer = TutelFFF(make_config())
    with pytest.raises(ValueError, match=r"adaptive_r = 2 .*\[0, 1\]"):
        layer(torch.randn(3, WIDTH), adaptive_r=2)
    with pytest.raises(ValueError, match="d_model"):
        layer(torch.randn(3, WIDTH + 1))


def test_leaves_are_tagged_as_expert_parameters_and_nothing_else_is():
    seen = []
    layer = TutelFFF(make_config(), scan_expert_func=lambda name, p: seen.append(name))
    tagged = {n for n, p in layer.named_parameters() if getattr(p, "expert", False)}
    assert tagged == {f"moe.experts.{n}" for n in seen}
    assert tagged == {n for n in dict(layer.named_parameters()) if n.startswith("moe.experts.")}
    assert not any(getattr(p, "expert", False) for p in layer.gate.parameters())


def test_importing_the_backend_without_tutel_says_how_to_build_it():
    code = (
        "import sys; sys.modules['tutel'] = None\n"
        "try:\n    import fff_moe_plugin.integrations.tutel\nexcept ImportError as e:\n    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "NO_CUDA=1 pip install --no-build-isolation" in out
    assert "github.com/microsoft/tutel" in out


def _group_worker(rank, world, port, path):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        halves = [dist.new_group([0, 1]), dist.new_group([2, 3])]
        alone = [dist.new_group([r]) for r in range(world)]
        result = {}
        try:
            TutelFFF(make_config(depth=2), group=halves[rank // 2])
            result["half"] = "built"
        except ValueError as e:
            result["half"] = str(e)
        # a group of one: every rank holds all leaves, no all-to-all at all; trains like the core layer
        torch.manual_seed(0)
        core = FFF(make_config(depth=2))
        layer = TutelFFF.from_fff(core, group=alone[rank])
        x = torch.randn(TOKENS, WIDTH, generator=torch.Generator().manual_seed(rank))
        out = layer(x)
        out.output.sum().backward()
        ref = core(x)
        ref.output.sum().backward()
        same_grad = torch.allclose(layer.router.node_weight.grad, core.router.node_weight.grad, atol=1e-5)
        result["alone_equal"] = bool(torch.allclose(out.output, ref.output, atol=1e-5) and same_grad)
        torch.save(result, os.path.join(path, f"group{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_a_group_that_is_part_of_the_world_is_refused_a_group_of_one_works(tmp_path):
    # Tutel's all-to-all runs its backward on the whole world whatever the group: a half-world group would
    # mismatch the other half's collectives, so it is refused before any work
    mp.spawn(_group_worker, args=(4, free_port(), str(tmp_path)), nprocs=4)
    results = [torch.load(tmp_path / f"group{r}.pt") for r in range(4)]
    for r in results:
        assert "a group of 2 of the 4 ranks is not allowed" in r["half"]
        assert r["alone_equal"]


def test_eval_capacity_comes_from_the_dispatch_config_and_the_layer_offers_the_interface():
    from fff_moe_plugin.dispatch import DispatchConfig, ExpertParallelFFF

    config = make_config(depth=2, master_leaf=False)
    torch.manual_seed(0)
    core = FFF(config).eval()
    x = data(1)[0]
    # capped hard in training, dropless-wide in eval: the eval call drops nothing and equals the core layer
    dispatch = DispatchConfig(capacity_factor=0.5, eval_capacity_factor=100.0, min_capacity=0)
    layer = TutelFFF.from_fff(core, dispatch).eval()
    assert isinstance(layer, ExpertParallelFFF) and layer.gate.capacity_factor == 100.0
    out = layer.forward_block(x)
    assert layer.last is out and out.stats["dropped"].item() == 0
    assert_near(out.output, core(x).output)
    assert layer.train().gate.capacity_factor == 0.5
    assert [id(p) for p in layer.expert_parameters()] == [id(p) for p in layer.moe.experts.parameters()]
    with pytest.raises(ValueError, match="min_capacity = 4 is not allowed: must be 0 with the tutel backend"):
        TutelFFF(config, DispatchConfig(capacity_factor=1.0))
    with pytest.raises(TypeError, match="not both"):
        TutelFFF(config, DispatchConfig(dropless=True), capacity_factor=0.0)
