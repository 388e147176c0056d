"""The leaf-MLP FFF layer against direct definitions and the reference package.

The layer tests take the ``device`` fixture (tests/conftest.py): each runs on the CPU and, where one exists, on a
CUDA device."""

import copy

import pytest
import torch
import torch.nn.functional as F

from fff_moe_plugin import FFF, FFFConfig, tree
from fff_moe_plugin.losses import leaf_balance_loss, node_balance_loss


def make(dtype=torch.float64, device="cpu", **kw):
    values = dict(d_model=6, leaf_width=3, depth=3, d_out=5)
    values.update(kw)
    return FFF(FFFConfig(**values)).to(device, dtype)


def randn(*shape, device="cpu", dtype=torch.float64):
    return torch.randn(*shape, dtype=dtype, device=device)


def leaf_mlp(layer, j, x):
    h = layer.act(x @ layer.leaves.w1[j] + layer.leaves.b1[j])
    return h @ layer.leaves.w2[j] + layer.leaves.b2[j]


def soft_reference(layer, x):
    """sum_j c_j(x) f_j(x), one leaf at a time."""
    c = tree.leaf_probs(layer.router.node_logits(x), layer.config.depth)
    return sum(c[:, j : j + 1] * leaf_mlp(layer, j, x) for j in range(layer.config.n_leaves))


def hard_reference(layer, x, scaled):
    """Each token on its own: descend, run the leaf, scale by the path probability if asked."""
    rows = []
    for t in range(x.shape[0]):
        node, logp = 0, 0.0
        for _ in range(layer.config.depth):
            z = x[t] @ layer.router.node_weight[node] + layer.router.node_bias[node]
            logp = logp + F.logsigmoid(z if z >= 0 else -z)
            node = 2 * node + 1 + int(z >= 0)
        leaf = node - layer.config.n_nodes
        y = leaf_mlp(layer, leaf, x[t : t + 1])[0]
        rows.append(torch.exp(logp) * y if scaled else y)
    return torch.stack(rows)


def test_soft_forward_equals_per_leaf_loop(device):
    layer = make(device=device).train()
    x = randn(20, 6, device=device)
    assert torch.allclose(layer(x).output, soft_reference(layer, x))


@pytest.mark.parametrize("mode", ["soft", "hard"])
def test_depth_zero_is_exactly_its_leaf(mode, device):
    layer = make(depth=0, train_mode=mode, device=device)
    x = randn(9, 6, device=device)
    expected = leaf_mlp(layer, 0, x)
    assert torch.allclose(layer.train()(x).output, expected)
    assert torch.allclose(layer.eval()(x).output, expected)


@pytest.mark.parametrize("mode", ["soft", "hard"])
def test_tree_pointing_one_way_equals_that_leaf(mode, device):
    layer = make(train_mode=mode, device=device)
    with torch.no_grad():
        layer.router.node_weight.zero_()
        layer.router.node_bias.fill_(-1e4)  # every node says "left": leaf 0
    x = randn(9, 6, device=device)
    expected = leaf_mlp(layer, 0, x)
    assert torch.allclose(layer.train()(x).output, expected)
    assert torch.allclose(layer.eval()(x).output, expected)


@pytest.mark.parametrize("master", [False, True])
def test_hard_training_forward_equals_eval(master, device):
    layer = make(train_mode="hard", master_leaf=master, load_balance="leaf", hardening=0.1, device=device)
    x = randn(64, 6, device=device)
    assert torch.equal(layer.train()(x).output, layer.eval()(x).output)


def test_hard_forward_equals_per_token_reference_with_path_probability(device):
    layer = make(train_mode="hard", device=device).eval()
    x = randn(40, 6, device=device)
    assert torch.allclose(layer(x).output, hard_reference(layer, x, scaled=True))


def test_soft_tree_eval_runs_its_leaf_unscaled(device):
    layer = make(train_mode="soft", device=device).eval()
    x = randn(40, 6, device=device)
    assert torch.allclose(layer(x).output, hard_reference(layer, x, scaled=False))


def test_hard_mode_nodes_receive_gradients(device):
    layer = make(train_mode="hard", device=device).train()
    layer(randn(32, 6, device=device)).output.pow(2).sum().backward()
    assert layer.router.node_weight.grad.abs().sum() > 0 and layer.router.node_bias.grad.abs().sum() > 0


def test_master_leaf_blends_with_learned_gate(device):
    layer = make(master_leaf=True, master_leaf_width=4, device=device).eval()
    plain = copy.deepcopy(layer)
    plain.config = FFFConfig.from_dict({**layer.config.to_dict(), "master_leaf": False, "master_leaf_width": None})
    plain.master = None
    with torch.no_grad():
        layer.master.gate.fill_(0.7)
    x = randn(11, 6, device=device)
    m = layer.act(x @ layer.master.w1 + layer.master.b1) @ layer.master.w2 + layer.master.b2
    g = torch.sigmoid(torch.tensor(0.7, dtype=torch.float64, device=device))
    expected = g * plain(x).output + (1 - g) * m
    out = layer(x)
    assert torch.allclose(out.output, expected)
    assert torch.allclose(out.stats["master_gate"], g.float())


def test_region_leak_one_equals_mirrored_tree(device):
    leaky = make(region_leak=1.0, device=device).train()
    mirrored = copy.deepcopy(leaky)
    mirrored.config = mirrored.router.config = FFFConfig.from_dict({**leaky.config.to_dict(), "region_leak": 0.0})
    with torch.no_grad():
        mirrored.router.node_weight.neg_()
        mirrored.router.node_bias.neg_()
    x = randn(13, 6, device=device)
    assert torch.allclose(leaky(x).output, mirrored(x).output)


def test_region_leak_and_dropout_are_off_in_eval(device):
    layer = make(region_leak=0.5, leaf_dropout=0.5, train_mode="hard", device=device)
    clean = copy.deepcopy(layer)
    clean.config = FFFConfig.from_dict({**layer.config.to_dict(), "region_leak": 0.0, "leaf_dropout": 0.0})
    x = randn(30, 6, device=device)
    assert torch.equal(layer.eval()(x).output, clean.eval()(x).output)


def test_aux_loss_is_weighted_sum_and_zero_in_eval(device):
    layer = make(hardening=0.3, load_balance="leaf", load_balance_coef=0.05, device=device).train()
    out = layer(randn(25, 6, device=device))
    expected = 0.3 * out.losses["hardening"] + 0.05 * out.losses["load_balance"]
    assert torch.allclose(out.aux_loss, expected)
    assert out.aux_loss > 0
    ev = layer.eval()(randn(25, 6, device=device))
    assert ev.aux_loss == 0 and set(ev.losses) == set(out.losses) and set(ev.stats) == set(out.stats)


def test_hardening_equals_mean_entropy_of_all_nodes_in_soft_mode(device):
    layer = make(hardening=1.0, device=device).train()
    x = randn(25, 6, device=device)
    p = torch.sigmoid(layer.router.node_logits(x))
    entropy = -(p * p.log() + (1 - p) * (1 - p).log())
    assert torch.allclose(layer(x).losses["hardening"], entropy.mean().float())


@pytest.mark.parametrize("mode", ["soft", "hard"])
def test_leaf_balance_loss_in_layer_matches_definition(mode, device):
    layer = make(train_mode=mode, load_balance="leaf", device=device).train()
    x = randn(40, 6, device=device)
    out = layer(x)
    probs = tree.leaf_probs(layer.router.node_logits(x), 3)
    leaf = tree.descend(x, layer.router.node_weight, layer.router.node_bias, 3)[2] - 7
    f = torch.bincount(leaf, minlength=8).double() / 40
    assert torch.allclose(out.losses["load_balance"].double(), 8 * (f * probs.mean(0)).sum(), atol=1e-6)
    assert torch.equal(out.stats["counts"], torch.bincount(leaf, minlength=8).float())


def test_leaf_balance_loss_is_one_when_uniform_and_larger_otherwise():
    L = 8
    leaf = torch.arange(64) % L
    uniform = F.one_hot(leaf, L).double()
    assert leaf_balance_loss(uniform, leaf).item() == pytest.approx(1.0)
    skewed_leaf = torch.where(torch.arange(64) < 40, 0, leaf)
    skewed = F.one_hot(skewed_leaf, L).double()
    assert leaf_balance_loss(skewed, skewed_leaf).item() > 1.5


def test_node_balance_loss_is_one_at_balance_and_larger_otherwise():
    depth, S = 3, 64
    leaf = torch.arange(S) % 8
    nodes, right = tree.path_nodes_of_leaf(leaf, depth)
    confident = torch.where(right.bool(), 5.0, -5.0).double()  # decisions agree with the routing
    assert node_balance_loss(nodes, torch.zeros(S, depth, dtype=torch.float64) + 1e-12, 7).item() == pytest.approx(
        1.0, abs=1e-6
    )
    balanced = node_balance_loss(nodes, confident, 7).item()
    assert balanced == pytest.approx(1.0, abs=0.02)
    skewed_leaf = torch.where(torch.arange(S) < 48, 7, leaf)
    nodes, right = tree.path_nodes_of_leaf(skewed_leaf, depth)
    skewed = node_balance_loss(nodes, torch.where(right.bool(), 5.0, -5.0).double(), 7).item()
    assert skewed > 1.3


@pytest.mark.parametrize("mode", ["soft", "hard"])
def test_node_balance_gradient_reaches_nodes(mode, device):
    layer = make(train_mode=mode, load_balance="node", load_balance_coef=1.0, device=device).train()
    layer(randn(40, 6, device=device)).aux_loss.backward()
    assert layer.router.node_weight.grad.abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("mode", ["soft", "hard"])
def test_dtypes(dtype, mode, device):
    ref = make(torch.float64, train_mode=mode, master_leaf=True, load_balance="leaf", device=device)
    layer = copy.deepcopy(ref).to(dtype)
    x = randn(16, 6, device=device)
    for train in (True, False):
        out = layer.train(train)(x.to(dtype))
        assert out.output.dtype == dtype and out.aux_loss.dtype == torch.float32
        assert torch.isfinite(out.output).all()
    if mode == "soft":  # no hard decision to flip under rounding: outputs agree to the dtype's precision
        tol = {torch.float32: 1e-5, torch.float64: 1e-12, torch.bfloat16: 5e-2}[dtype]
        expected = ref.train()(x).output
        assert torch.allclose(layer.train()(x.to(dtype)).output.double(), expected, atol=tol, rtol=tol)


@pytest.mark.parametrize("mode", ["soft", "hard"])
def test_zero_token_batch_returns_empty_output(mode, device):
    layer = make(train_mode=mode, load_balance="leaf", hardening=0.1, master_leaf=True, device=device)
    for train in (True, False):
        out = layer.train(train)(randn(0, 4, 6, device=device))
        assert out.output.shape == (0, 4, 5)
        assert out.aux_loss == 0 and out.stats["counts"].sum() == 0
    layer.train()(randn(0, 6, device=device)).output.sum().backward()


def test_leading_dimensions_are_kept(device):
    layer = make(device=device).eval()
    x = randn(2, 3, 4, 6, device=device)
    assert torch.equal(layer(x).output, layer(x.reshape(-1, 6)).output.reshape(2, 3, 4, 5))


def test_wrong_feature_width_raises_clear_error():
    with pytest.raises(ValueError, match=r"\[\.\.\., 6\] \(d_model=6\), got \(4, 7\)"):
        make()(torch.randn(4, 7, dtype=torch.float64))
    with pytest.raises(ValueError, match="dtype"):
        make()(torch.randn(4, 6, dtype=torch.float32))


def test_state_dict_round_trip_gives_identical_outputs(device):
    layer = make(master_leaf=True, train_mode="hard", device=device).eval()
    other = FFF(layer.config).to(device, torch.float64).eval()
    x = randn(30, 6, device=device)
    assert not torch.equal(layer(x).output, other(x).output)
    other.load_state_dict(layer.state_dict())
    assert torch.equal(layer(x).output, other(x).output)


# -- the reference package, fastfeedforward 0.2.1 (CPU) ---------------------------------------------------
@pytest.fixture
def fastfeedforward():
    """The reference package; each test that needs it skips without it (the tests above run either way)."""
    return pytest.importorskip(
        "fastfeedforward", reason="reference tests need fastfeedforward: pip install fastfeedforward==0.2.1"
    )


@pytest.mark.parametrize("depth", [1, 3, 4])
def test_soft_forward_equals_fastfeedforward_training_forward(depth, fastfeedforward):
    ref = fastfeedforward.FFF(6, 3, 5, depth, activation=torch.nn.GELU()).train()
    layer = FFF.from_fastfeedforward(ref).train()
    assert layer.config.activation == "gelu"
    x = torch.randn(33, 6)
    expected, entropies = ref.training_forward(x, return_entropies=True)
    out = layer(x)
    assert torch.allclose(out.output, expected, atol=1e-6)
    assert torch.allclose(out.losses["hardening"], entropies.mean(), atol=1e-5)


def test_eval_equals_fastfeedforward_eval_plus_output_bias(fastfeedforward):
    ref = fastfeedforward.FFF(6, 3, 5, 3).eval()
    layer = FFF.from_fastfeedforward(ref).eval()
    x = torch.randn(33, 6)
    leaf = layer.router(x).leaf
    # the reference's eval forgets b2; ours keeps it
    assert torch.allclose(layer(x).output, ref(x) + ref.b2s[leaf], atol=1e-6)


def test_round_trip_through_fastfeedforward(fastfeedforward):
    layer = make(torch.float32, activation="tanh")
    back = FFF.from_fastfeedforward(layer.to_fastfeedforward())
    x = torch.randn(10, 6)
    assert torch.equal(layer.train()(x).output, back.train()(x).output)
    with pytest.raises(ValueError, match="master leaf"):
        make(torch.float32, master_leaf=True).to_fastfeedforward()


def test_hard_training_and_eval_differ_only_within_rounding_of_a_node_boundary():
    # training computes the node logits with one matrix product, the eval kernels with a dot product per visited
    # node: the same function, other rounding. Tokens placed on the root's boundary (to float32 rounding) show
    # the one way they can differ: a token within rounding of a boundary may take the other branch.
    from fff_moe_plugin.ops import inference

    layer = FFF(FFFConfig(d_model=64, leaf_width=8, depth=3, train_mode="hard")).eval()
    x = torch.randn(4000, 64)
    w, b = layer.router.node_weight[0].detach(), layer.router.node_bias[0].detach()
    x = x - ((x @ w + b) / w.dot(w))[:, None] * w
    with torch.no_grad():
        nodes_t, logits_t, leaf_t = layer.router(x)[:3]
        nodes_e, logits_e, end_e = inference.descend(x, layer.router.node_weight, layer.router.node_bias, 3)
    differ = leaf_t != end_e - layer.config.n_nodes
    # where the two descents part, the logit that decided it is within float32 rounding of zero
    scale = (x.abs() @ w.abs() + b.abs())  # [S]: the size of the terms summed into the root's logit
    full_t = torch.cat([nodes_t, leaf_t[:, None] + layer.config.n_nodes], 1)  # [S, D + 1]: the path and its end
    full_e = torch.cat([nodes_e, end_e[:, None]], 1)
    decided = (full_t != full_e).long().argmax(1) - 1  # the level whose decision differed
    z = logits_t.gather(1, decided.clamp_min(0)[:, None])[:, 0]
    assert (z[differ].abs() <= 1e-5 * scale[differ]).all()
    # everywhere else the leaves agree and the outputs are equal to rounding
    keep = ~differ
    out_t = layer.train()(x).output[keep]
    out_e = layer.eval()(x).output[keep]
    torch.testing.assert_close(out_t, out_e, rtol=1e-5, atol=1e-5)
