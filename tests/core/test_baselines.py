"""sigma-MoE, PKM and the dense block against direct definitions, on each device of the ``device`` fixture
(tests/conftest.py)."""

import copy

import pytest
import torch
import torch.nn.functional as F

from fff_moe_plugin import PKM, DenseConfig, DenseFFN, PKMConfig, SigmaMoE, SigmaMoEConfig
from fff_moe_plugin.ops.grouped import grouped_mlp, grouped_mlp_reference


def test_grouped_mlp_equals_per_assignment_loop_including_empty_experts(device):
    S, E, d, h, o, K = 30, 6, 5, 4, 3, 2
    f64 = dict(dtype=torch.float64, device=device)
    x = torch.randn(S, d, **f64)
    token = torch.arange(S, device=device).repeat_interleave(K)
    expert = torch.randint(0, E - 2, (S * K,), device=device)  # the last two experts get no tokens
    gate = torch.rand(S * K, **f64)
    w1, b1 = torch.randn(E, d, h, **f64), torch.randn(E, h, **f64)
    w2, b2 = torch.randn(E, h, o, **f64), torch.randn(E, o, **f64)
    args = (x, token, expert, gate, w1, b1, w2, b2, torch.relu)
    assert torch.allclose(grouped_mlp(*args), grouped_mlp_reference(*args))


def test_grouped_mlp_gradcheck(device):
    S, E, d, h, o = 6, 3, 3, 2, 2
    token = torch.arange(S, device=device)
    expert = torch.tensor([0, 2, 2, 0, 2, 2], device=device)
    tensors = [torch.randn(*s, dtype=torch.float64, device=device, requires_grad=True)
               for s in [(S, d), (S,), (E, d, h), (E, h), (E, h, o), (E, o)]]

    def f(x, gate, w1, b1, w2, b2):
        return grouped_mlp(x, token, expert, gate, w1, b1, w2, b2, torch.tanh)

    assert torch.autograd.gradcheck(f, tensors)


def sigma_reference(layer, x):
    s = torch.sigmoid(x @ layer.selection.t())
    out = []
    for t in range(x.shape[0]):
        top = s[t].topk(layer.config.top_k).indices
        out.append(sum(s[t, e] * (torch.relu(x[t] @ layer.keys[e]) @ layer.values[e]) for e in top))
    return torch.stack(out)


def test_sigma_moe_equals_definition_and_entropy_loss(device):
    layer = SigmaMoE(SigmaMoEConfig(d_model=8, n_experts=6, expert_size=3, top_k=2, entropy_coef=0.01))
    layer = layer.to(device, torch.float64)
    x = torch.randn(20, 8, dtype=torch.float64, device=device)
    out = layer.train()(x)
    assert torch.allclose(out.output, sigma_reference(layer, x))
    p_bar = torch.softmax(x @ layer.selection.t(), -1).mean(0)
    assert torch.allclose(out.losses["entropy"].double(), (p_bar * p_bar.log()).sum(), atol=1e-6)
    assert torch.allclose(out.aux_loss, 0.01 * out.losses["entropy"])
    assert out.stats["counts"].sum() == 40
    assert layer.eval()(x).aux_loss == 0


def test_sigma_moe_expert_dropout_only_in_training(device):
    layer = SigmaMoE(SigmaMoEConfig(d_model=8, n_experts=6, expert_size=3, top_k=2, expert_dropout=0.5))
    layer = layer.to(device, torch.float64)
    x = torch.randn(50, 8, dtype=torch.float64, device=device)
    assert torch.allclose(layer.eval()(x).output, sigma_reference(layer, x))
    assert not torch.allclose(layer.train()(x).output, sigma_reference(layer, x))


def test_sigma_moe_init_scales_and_equal_selector_norms():
    c = SigmaMoEConfig(d_model=256, n_experts=16, expert_size=64, top_k=4, weight_scale=0.5)
    layer = SigmaMoE(c)
    norms = layer.selection.norm(dim=1)
    assert torch.allclose(norms, norms.mean().expand_as(norms), rtol=1e-5)
    assert layer.keys.std().item() == pytest.approx(0.5 / 256**0.5, rel=0.05)
    assert layer.values.std().item() == pytest.approx(0.5 / (16 * 64) ** 0.5, rel=0.05)


@pytest.mark.parametrize("act", ["relu", "softmax"])
def test_pkm_equals_brute_force_over_all_slots(act, device):
    c = PKMConfig(d_model=8, n_keys=5, n_heads=2, knn=6, score_activation=act)
    layer = PKM(c).to(device, torch.float64)
    x = torch.randn(15, 8, dtype=torch.float64, device=device)
    q = x.view(15, 2, 4)
    y = torch.zeros(15, 8, dtype=torch.float64, device=device)
    for h in range(2):
        s1 = q[:, 0] @ layer.keys[h, 0].t()  # [S, n]
        s2 = q[:, 1] @ layer.keys[h, 1].t()
        full = (s1[:, :, None] + s2[:, None, :]).reshape(15, 25)  # every slot's score
        best, slot = full.topk(6, dim=-1)
        w = F.relu(best) if act == "relu" else torch.softmax(best, -1)
        y += (w[:, :, None] * layer.values[slot]).sum(1)
    assert torch.allclose(layer(x).output, y)


def test_pkm_with_knn_above_n_keys_still_exact(device):
    layer = PKM(PKMConfig(d_model=4, n_keys=3, n_heads=1, knn=7)).to(device, torch.float64)
    x = torch.randn(9, 4, dtype=torch.float64, device=device)
    slot, score = layer.lookup(x)
    q = x.view(9, 2, 2)
    full = ((q[:, 0] @ layer.keys[0, 0].t())[:, :, None] + (q[:, 1] @ layer.keys[0, 1].t())[:, None, :]).reshape(9, 9)
    assert torch.allclose(score[:, 0], full.topk(7, -1).values)


def test_dense_block_is_two_linears(device):
    layer = DenseFFN(DenseConfig(d_model=6, d_ff=10, activation="gelu")).to(device, torch.float64)
    x = torch.randn(7, 6, dtype=torch.float64, device=device)
    assert torch.allclose(layer(x).output, layer.fc2(F.gelu(layer.fc1(x))))


@pytest.mark.parametrize(
    "block",
    [
        SigmaMoE(SigmaMoEConfig(d_model=8, n_experts=4, expert_size=2, top_k=2)),
        PKM(PKMConfig(d_model=8, n_keys=4, knn=3)),
        DenseFFN(DenseConfig(d_model=8, d_ff=12)),
    ],
    ids=type,
)
def test_same_call_shape_and_empty_batch(block, device):
    block = copy.deepcopy(block).to(device)  # the parameter's module is shared by the device cases
    for train in (True, False):
        out = block.train(train)(torch.randn(0, 3, 8, device=device))
        assert out.output.shape == (0, 3, 8) and out.aux_loss.shape == () and "counts" in out.stats
    with pytest.raises(ValueError, match="d_model=8"):
        block(torch.randn(2, 9, device=device))
