"""The grouped-expert primitive: grouped_mm where it applies, the per-expert loop elsewhere; both equal the
one-assignment-at-a-time reference in outputs and gradients, and the grouped path compiles without a graph
break. Each test runs on every device of the ``device`` fixture (tests/conftest.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fff_moe_plugin.ops import grouped
from fff_moe_plugin.ops.grouped import grouped_mlp, grouped_mlp_loop, grouped_mlp_reference


def _problem(S, E, d, h, o, dtype, device, token_expert="random", k=1, bias=True, gate=True):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(S, d, generator=g).to(device, dtype).requires_grad_()
    w1 = (torch.randn(E, d, h, generator=g) / d**0.5).to(device, dtype).requires_grad_()
    w2 = (torch.randn(E, h, o, generator=g) / h**0.5).to(device, dtype).requires_grad_()
    b1 = torch.randn(E, h, generator=g).to(device, dtype).requires_grad_() if bias else None
    b2 = torch.randn(E, o, generator=g).to(device, dtype).requires_grad_() if bias else None
    token = torch.arange(S).repeat_interleave(k).to(device)
    if token_expert == "one":
        expert = torch.full((S * k,), E - 1, dtype=torch.long)
    elif token_expert == "skip":  # experts 0 and 2 get nothing
        expert = torch.randint(0, E, (S * k,), generator=g)
        expert[(expert == 0) | (expert == 2)] = 1
    else:
        expert = torch.randint(0, E, (S * k,), generator=g)
    expert = expert.to(device)
    gates = torch.rand(S * k, generator=g).to(device, dtype).requires_grad_() if gate else None
    return x, token, expert, gates, w1, b1, w2, b2


def _grads(fn, args, upstream):
    x, token, expert, gate, w1, b1, w2, b2 = args
    out = fn(x, token, expert, gate, w1, b1, w2, b2, F.gelu)
    leaves = [t for t in (x, gate, w1, b1, w2, b2) if t is not None]
    grads = torch.autograd.grad(out, leaves, upstream(out))
    return out, grads


CASES = [
    dict(S=40, E=8, d=16, h=8, o=12),  # aligned widths: grouped_mm as is
    dict(S=33, E=4, d=6, h=3, o=5),  # odd widths: zero-padded
    dict(S=40, E=8, d=16, h=8, o=12, token_expert="one"),  # every token on one expert
    dict(S=40, E=8, d=16, h=8, o=12, token_expert="skip"),  # empty experts, the first among them
    dict(S=20, E=6, d=8, h=8, o=8, k=3),  # three assignments per token (top-K)
    dict(S=24, E=4, d=8, h=8, o=8, bias=False, gate=False),
    dict(S=0, E=4, d=8, h=8, o=8),  # no tokens at all
]


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-12), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
def test_grouped_equals_reference_outputs_and_gradients(device, dtype, tol, case):
    args = _problem(**case, dtype=dtype, device=device)
    upstream = lambda out: torch.ones_like(out) * 0.5 + torch.arange(out.numel(), device=device, dtype=out.dtype  # noqa: E731
                                                                      ).view_as(out) / max(1, out.numel())
    out, grads = _grads(grouped_mlp, args, upstream)
    expected_path = "loop" if dtype == torch.float64 else "grouped"
    assert grouped.last_path == expected_path
    if case["S"] == 0:  # nothing routed: an empty output, and zero gradients that still reach every weight
        assert out.shape == (0, case["o"])
        assert all(torch.count_nonzero(g) == 0 for g in grads)
        return
    # the reference in float64 on the same values
    ref_args = [t.detach().double().requires_grad_() if torch.is_tensor(t) and t.is_floating_point() else t
                for t in args]
    ref_out, ref_grads = _grads(grouped_mlp_reference, ref_args, lambda o: upstream(o.to(dtype)).double())
    torch.testing.assert_close(out.double(), ref_out, rtol=tol, atol=tol)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g.double(), r, rtol=tol, atol=tol * max(1.0, r.abs().max().item()))


def test_a_broadcast_gradient_is_accepted(device):
    # y.sum().backward() hands grouped_mm's backward a stride-0 gradient, which its kernels refuse
    args = _problem(S=16, E=4, d=8, h=8, o=8, dtype=torch.float32, device=device)
    x, token, expert, gate, w1, b1, w2, b2 = args
    grouped_mlp(x, token, expert, None, w1, None, w2, None, F.relu).sum().backward()
    assert grouped.last_path == "grouped"
    ref = [t.detach().clone().requires_grad_() for t in (x, w1, w2)]
    grouped_mlp_reference(ref[0], token, expert, None, ref[1], None, ref[2], None, F.relu).sum().backward()
    for t, r in zip((x, w1, w2), ref):
        torch.testing.assert_close(t.grad, r.grad, rtol=1e-5, atol=1e-5)


def test_loop_and_grouped_paths_agree_and_the_switch_forces_the_loop(monkeypatch, device):
    args = _problem(S=50, E=8, d=16, h=8, o=8, dtype=torch.float32, device=device)
    x, token, expert, gate, w1, b1, w2, b2 = args
    a = grouped_mlp(*args, F.silu)
    assert grouped.last_path == "grouped"
    b = grouped_mlp_loop(*args, F.silu)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    monkeypatch.setenv("FFF_MOE_NO_GROUPED_MM", "1")
    grouped_mlp(*args, F.silu)
    assert grouped.last_path == "loop"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_path_compiles_without_graph_break_and_equals_eager(dtype, device):
    args = _problem(S=32, E=8, d=16, h=8, o=8, dtype=dtype, device=device)
    x, token, expert, gate, w1, b1, w2, b2 = args

    def step(x, gate, w1, b1, w2, b2):
        out = grouped_mlp(x, token, expert, gate, w1, b1, w2, b2, F.gelu)
        return out.float().square().mean()

    torch._dynamo.reset()
    explanation = torch._dynamo.explain(step)(x, gate, w1, b1, w2, b2)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    params = (x, gate, w1, b1, w2, b2)
    loss_c = compiled(*params)
    grads_c = torch.autograd.grad(loss_c, params)
    loss_e = step(*params)
    grads_e = torch.autograd.grad(loss_e, params)
    torch.testing.assert_close(loss_c, loss_e)
    for gc, ge in zip(grads_c, grads_e):
        torch.testing.assert_close(gc, ge)


def test_float64_compiles_without_host_reads_through_the_masked_path(device):
    args = _problem(S=30, E=4, d=6, h=5, o=3, dtype=torch.float64, device=device, k=2)
    x, token, expert, gate, w1, b1, w2, b2 = args

    def step(x, gate, w1, b1, w2, b2):
        return grouped_mlp(x, token, expert, gate, w1, b1, w2, b2, torch.tanh).square().sum()

    torch._dynamo.reset()
    explanation = torch._dynamo.explain(step)(x, gate, w1, b1, w2, b2)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    params = (x, gate, w1, b1, w2, b2)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    grads_c = torch.autograd.grad(compiled(*params), params)
    assert grouped.last_path == "masked"
    ref = torch.autograd.grad(grouped_mlp_reference(x, token, expert, gate, w1, b1, w2, b2, torch.tanh).square().sum(),
                              params)
    for a, b in zip(grads_c, ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_one_assignment_per_token_equals_the_general_form(device, dtype):
    # token None (the tree's case) permutes rows instead of scattering: same outputs and gradients
    args = _problem(S=37, E=8, d=16, h=8, o=12, dtype=dtype, device=device)
    x, token, expert, gate, w1, b1, w2, b2 = args
    upstream = lambda out: torch.linspace(-1, 1, out.numel(), device=device, dtype=out.dtype).view_as(out)  # noqa: E731
    general, g_general = _grads(grouped_mlp, args, upstream)
    permuted, g_permuted = _grads(grouped_mlp, (x, None, expert, gate, w1, b1, w2, b2), upstream)
    torch.testing.assert_close(permuted, general)
    for a, b in zip(g_permuted, g_general):
        torch.testing.assert_close(a, b)
