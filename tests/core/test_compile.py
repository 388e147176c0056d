"""A compiled training step: ``torch.compile(fullgraph=True)`` of a block's forward and backward captures one graph
and computes what eager computes, for the FFF tree in hard mode (balancing, master leaf) and for sigma-MoE."""

from __future__ import annotations

import shutil

import pytest
import torch

from fff_moe_plugin import FFF, PKM, FFFConfig, PKMConfig, SigmaMoE, SigmaMoEConfig
from fff_moe_plugin.ops import grouped

BLOCKS = {
    "fff-leaf-balance-master": lambda: FFF(FFFConfig(d_model=16, leaf_width=8, depth=3, train_mode="hard",
                                                     load_balance="leaf", master_leaf=True, hardening=0.1)),
    "fff-node-balance": lambda: FFF(FFFConfig(d_model=16, leaf_width=8, depth=3, train_mode="hard",
                                              load_balance="node", hardening=0.1)),
    "sigma-moe": lambda: SigmaMoE(SigmaMoEConfig(d_model=16, n_experts=8, expert_size=8, top_k=2)),
    "pkm": lambda: PKM(PKMConfig(d_model=16, n_keys=4, knn=4)),
}


def _step(layer):
    def step(x):
        out = layer(x)
        return out.output.square().mean() + out.aux_loss
    return step


@pytest.mark.parametrize("name", list(BLOCKS))
def test_training_step_has_no_graph_break(name):
    layer = BLOCKS[name]().train()
    x = torch.randn(64, 16)
    layer(x)  # an eager call first, as training does: it probes grouped_mm once
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(_step(layer))(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons


@pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None,
                    reason="torch.compile's Inductor backend needs a C++ compiler (apt-get install g++)")
@pytest.mark.parametrize("name", ["fff-leaf-balance-master", "sigma-moe"])
def test_compiled_training_step_equals_eager(name):
    layer = BLOCKS[name]().train()
    x = torch.randn(64, 16)
    step = _step(layer)
    layer.zero_grad()
    eager_loss = step(x)
    eager_loss.backward()
    assert grouped.last_path == "grouped"
    eager = {n: p.grad.clone() for n, p in layer.named_parameters()}
    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True)  # Inductor
    layer.zero_grad()
    loss = compiled(x)
    loss.backward()
    torch.testing.assert_close(loss, eager_loss, rtol=1e-5, atol=1e-6)
    for n, p in layer.named_parameters():
        # every gradient, the nodes' included: Inductor once dropped the path logits' share of it (ops/gather.py)
        assert p.grad.abs().max() > 0, n
        torch.testing.assert_close(p.grad, eager[n], rtol=1e-4, atol=1e-6 * eager[n].abs().max().item(), msg=n)
