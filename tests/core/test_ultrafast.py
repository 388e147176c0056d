"""The path-neuron FFF (UltraFastBERT): masked and sparse training agree, and both equal the definition, on each
device of the ``device`` fixture (tests/conftest.py)."""

import pytest
import torch
import torch.nn.functional as F

from fff_moe_plugin import UltraFastConfig, UltraFastFFF


def make(mode="masked", device="cpu", **kw):
    values = dict(d_model=6, depth=3, d_out=4, train_mode=mode, output_bias=True)
    values.update(kw)
    layer = UltraFastFFF(UltraFastConfig(**values)).to(device, torch.float64)
    with torch.no_grad():
        if layer.output_bias is not None:
            layer.output_bias.normal_()
    return layer


def reference(layer, x):
    """One token at a time: visit depth + 1 neurons, add act(a_n) u_n, go right iff a_n > 0."""
    rows = []
    for t in range(x.shape[0]):
        node, y = 0, layer.output_bias.clone()
        for _ in range(layer.config.depth + 1):
            a = x[t] @ layer.neuron_in[node] + layer.neuron_bias[node]
            y = y + F.gelu(a) * layer.neuron_out[node]
            node = 2 * node + 1 + int(a > 0)
        rows.append(y)
    return torch.stack(rows)


@pytest.mark.parametrize("depth", [0, 1, 4])
@pytest.mark.parametrize("mode", ["masked", "sparse"])
def test_forward_equals_per_token_definition(mode, depth, device):
    layer = make(mode, depth=depth, device=device)
    x = torch.randn(25, 6, dtype=torch.float64, device=device)
    expected = reference(layer, x)
    assert torch.allclose(layer.train()(x).output, expected)
    assert torch.allclose(layer.eval()(x).output, expected)


def test_sparse_and_masked_training_agree_in_outputs_and_gradients(device):
    masked = make("masked", device=device).train()
    sparse = make("sparse", device=device).train()
    sparse.load_state_dict(masked.state_dict())
    x = torch.randn(40, 6, dtype=torch.float64, device=device, requires_grad=True)
    grads = []
    for layer in (masked, sparse):
        x.grad = None
        out = layer(x).output
        (out * torch.linspace(-1, 1, 4, dtype=torch.float64, device=device)).sum().backward()
        grads.append([x.grad.clone()] + [p.grad.clone() for p in layer.parameters()])
        layer.zero_grad()
    assert torch.allclose(masked(x).output, sparse(x).output)
    for a, b in zip(*grads):
        assert torch.allclose(a, b)


def test_gradcheck_sparse_path(device):
    layer = make("sparse", depth=2, device=device).train()
    x = torch.randn(5, 6, dtype=torch.float64, device=device, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: layer(x).output, (x,))


def test_counts_and_empty_batch(device):
    layer = make(device=device).eval()
    out = layer(torch.randn(50, 6, dtype=torch.float64, device=device))
    assert out.stats["counts"].shape == (8,) and out.stats["counts"].sum() == 50 and out.aux_loss == 0
    assert layer(torch.randn(0, 6, dtype=torch.float64, device=device)).output.shape == (0, 4)


def test_parameters_visited_per_token():
    c = UltraFastConfig(d_model=768, depth=11)
    assert c.n_neurons == 4095
    assert c.num_parameters_per_token() / c.num_parameters() == pytest.approx(12 / 4095)
