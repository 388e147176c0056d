"""Which implementation an FFF runs on each device.

On the CPU, eval of a frozen FFF runs the compiled C++ kernels (ops/inference.py). On a CUDA device the kernels
never apply; eval and training run the grouped expert path (ops/grouped.py), and give the CPU's result to
rounding. The CUDA tests carry "cuda" in their names (``pytest -k cuda`` selects them) and skip without a device.
"""

from __future__ import annotations

import pytest
import torch
from helpers import kernel_calls, why_no_kernels

from fff_moe_plugin import FFF, FFFConfig
from fff_moe_plugin.ops import grouped, inference

needs_cuda = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="needs a CUDA device (torch.cuda.is_available() is False); benchmarks/gpu_check.sh runs these on a GPU",
)


def make(dtype=torch.float32, **kw) -> FFF:
    values = dict(d_model=64, leaf_width=16, depth=4, train_mode="hard", master_leaf=True)
    values.update(kw)
    return FFF(FFFConfig(**values)).to(dtype)


def away_from_boundaries(layer: FFF, x: torch.Tensor, margin: float = 1e-3) -> torch.Tensor:
    """The rows of ``x`` whose every decision on the path is at least ``margin`` from its node's boundary (the
    logits in float64), so that the rounding of another device cannot send them down another branch."""
    with torch.no_grad():
        w, b = layer.router.node_weight.double().cpu(), layer.router.node_bias.double().cpu()
        _, logits, _ = inference.descend_reference(x.double().cpu(), w, b, layer.config.depth)
    keep = (logits.abs() > margin).all(1) if logits.shape[1] else torch.ones(x.shape[0], dtype=torch.bool)
    assert keep.float().mean() > 0.9, "the margin discards most tokens: the comparison would be vacuous"
    return x[keep.to(x.device)]


# -- CPU: the compiled kernels -------------------------------------------------------------------------------
def test_cpu_eval_of_a_frozen_fff_runs_the_compiled_kernels():
    reason = why_no_kernels()
    if reason is not None:
        pytest.skip(reason)
    layer = make().eval().requires_grad_(False)
    x = torch.randn(300, 64)
    grouped.last_path = None
    with kernel_calls() as calls, inference.reference_path(False):
        out = layer(x).output
    assert calls == ["descend", "leaf_mlp"], f"eval on the CPU did not run the compiled kernels (ran: {calls})"
    assert grouped.last_path is None  # the leaves ran in the kernel, not in grouped_mlp
    with inference.reference_path(True):
        torch.testing.assert_close(out, layer(x).output, rtol=1e-5, atol=1e-5)


def test_cpu_eval_that_needs_a_gradient_runs_the_grouped_path():
    # the kernels have no backward: with trainable weights and autograd on, eval stays differentiable
    layer = make().eval()
    x = torch.randn(50, 64)
    grouped.last_path = None
    with kernel_calls() as calls, inference.reference_path(False):
        layer(x).output.sum().backward()
    assert calls == [] and grouped.last_path == "grouped"
    assert layer.leaves.w1.grad is not None


# -- CUDA: the grouped path ----------------------------------------------------------------------------------
@needs_cuda
@pytest.mark.parametrize("mode", ["hard", "soft"])
def test_cuda_eval_runs_the_grouped_path_and_equals_the_cpu(mode):
    cpu = make(train_mode=mode).eval().requires_grad_(False)
    gpu = make(train_mode=mode).eval().requires_grad_(False)
    gpu.load_state_dict(cpu.state_dict())
    gpu.to("cuda")
    x = away_from_boundaries(cpu, torch.randn(2000, 64))
    xc = x.to("cuda")
    assert not inference.kernels_apply(xc, *gpu.parameters())
    with torch.no_grad():
        assert not inference.kernels_apply(xc, *gpu.parameters())
        expected = cpu(x)
        grouped.last_path = None
        with kernel_calls() as calls, inference.reference_path(False):
            out = gpu(xc)
    assert calls == [], f"the CPU kernels ran on CUDA tensors: {calls}"
    assert grouped.last_path == "grouped"
    assert out.output.device.type == "cuda"
    assert torch.equal(out.stats["counts"].cpu(), expected.stats["counts"])
    torch.testing.assert_close(out.output.cpu(), expected.output, rtol=1e-4, atol=1e-5)


@needs_cuda
def test_cuda_bfloat16_eval_runs_the_grouped_path():
    layer = make().eval().requires_grad_(False)
    x = away_from_boundaries(layer, torch.randn(1000, 64))
    with torch.no_grad():
        expected = layer(x).output
        low = make(torch.bfloat16).eval().requires_grad_(False)
        low.load_state_dict(layer.state_dict())
        grouped.last_path = None
        out = low.to("cuda")(x.to("cuda", torch.bfloat16)).output
    assert grouped.last_path == "grouped" and out.dtype == torch.bfloat16
    # bfloat16 rounding may move a token near a boundary to another leaf: compare the tokens that kept theirs
    same = low.router(x.to("cuda", torch.bfloat16)).leaf.cpu() == layer.router(x).leaf
    assert same.float().mean() > 0.95
    torch.testing.assert_close(out.float().cpu()[same], expected[same], rtol=5e-2, atol=5e-2)


@needs_cuda
def test_cuda_hard_training_step_runs_the_grouped_path_and_equals_the_cpu_gradients():
    cpu = make(load_balance="leaf", hardening=0.1).train()
    gpu = make(load_balance="leaf", hardening=0.1).train()
    gpu.load_state_dict(cpu.state_dict())
    gpu.to("cuda")
    x = away_from_boundaries(cpu, torch.randn(1000, 64))
    up = torch.randn(x.shape[0], 64)
    losses = []
    for layer, dev in ((cpu, "cpu"), (gpu, "cuda")):
        grouped.last_path = None
        out = layer(x.to(dev))
        loss = (out.output * up.to(dev)).sum() + out.aux_loss
        loss.backward()
        assert grouped.last_path == "grouped"
        losses.append(loss.detach().cpu())
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-4, atol=1e-4)
    for (name, p), q in zip(cpu.named_parameters(), gpu.parameters()):
        torch.testing.assert_close(q.grad.cpu(), p.grad, rtol=1e-3, atol=1e-4, msg=name)
