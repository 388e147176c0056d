"""The Tutel-backed FFF equals the DeepSpeed-backed FFF (FFFMoE) on the same weights, on 1 and 2 processes.

Needs Tutel (built from source) and DeepSpeed (the `deepspeed` extra); runs on CPU with gloo.
"""

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

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
MASTER = ("master_w1", "master_b1", "master_w2", "master_b2", "master_gate")


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
    result["deepspeed"]["shared_grads"] = [ds.gate.node_weight.grad, ds.gate.node_bias.grad] + [
        p.grad for p in (ds.master.w1, ds.master.b1, ds.master.w2, ds.master.b2)] + [
        ds.master_gate.grad.reshape(())]  # the blend logit, in the core layer's shape
    e = tu.moe.experts
    result["tutel"]["leaf_grads"] = [e.batched_fc1_w.grad.transpose(1, 2), e.batched_fc1_bias.grad,
                                     e.batched_fc2_w.grad, e.batched_fc2_bias.grad]
    result["tutel"]["shared_grads"] = [tu.gate.node_weight.grad, tu.gate.node_bias.grad] + [
        getattr(tu, n).grad for n in MASTER]
    result["leaves"] = (list(ds.local_leaves), list(tu.local_leaves))
    torch.save(result, os.path.join(path, f"rank{rank}.pt"))
    torch.distributed.destroy_process_group()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
