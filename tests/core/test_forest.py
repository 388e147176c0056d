"""Forests (FFFConfig.n_trees K): K independent trees, each token reads one leaf in each, the outputs summed. One
tree is today's layer bit for bit; a forest is the sum of K single-tree layers on copied weights, in outputs, losses
and gradients, hard and soft, with node or leaf balancing and with decision shifts."""

from __future__ import annotations

import pytest
import torch

from fff_moe_plugin import FFF, FFFConfig, update_balance_biases
from fff_moe_plugin.fast_eval import to_fast_eval
from fff_moe_plugin.losses import level_imbalance
from fff_moe_plugin.matching import match_fff

K = 3


def _forest(seed: int = 0, **kw) -> FFF:
    values = dict(d_model=6, leaf_width=4, depth=2, train_mode="hard", n_trees=K, hardening=0.1,
                  load_balance="leaf")
    values.update(kw)
    torch.manual_seed(seed)
    return FFF(FFFConfig(**values)).double()


def _trees(forest: FFF) -> list[FFF]:
    """The forest's K trees as single-tree layers on copied weights."""
    c = forest.config
    one = FFFConfig(**{**c.to_dict(), "n_trees": 1})
    N, L = c.n_nodes, c.n_leaves
    out = []
    for k in range(c.n_trees):
        t = FFF(one).double().train(forest.training)
        with torch.no_grad():
            t.router.node_weight.copy_(forest.router.node_weight[k * N:(k + 1) * N])
            t.router.node_bias.copy_(forest.router.node_bias[k * N:(k + 1) * N])
            if forest.router.balance_bias is not None:
                t.router.balance_bias.copy_(forest.router.balance_bias[k * N:(k + 1) * N])
            for name in ("w1", "b1", "w2", "b2"):
                getattr(t.leaves, name).copy_(getattr(forest.leaves, name)[k * L:(k + 1) * L])
        out.append(t)
    return out


def test_one_tree_is_todays_layer_bit_for_bit():
    torch.manual_seed(0)
    today = FFF(FFFConfig(d_model=6, leaf_width=4, depth=2, train_mode="hard"))
    torch.manual_seed(0)
    one = FFF(FFFConfig(d_model=6, leaf_width=4, depth=2, train_mode="hard", n_trees=1))
    assert [n for n, _ in one.named_parameters()] == [n for n, _ in today.named_parameters()]
    x = torch.randn(9, 6)
    assert torch.equal(one(x).output, today(x).output)


@pytest.mark.parametrize("mode, balance", [("hard", "leaf"), ("hard", "node"), ("soft", "leaf"), ("soft", "none")])
def test_a_forest_is_the_sum_of_its_trees(mode, balance):
    forest = _forest(train_mode=mode, load_balance=balance).train()
    trees = _trees(forest)
    x = torch.randn(20, 6, dtype=torch.float64)
    out = forest(x)
    parts = [t(x) for t in trees]
    torch.testing.assert_close(out.output, sum(p.output for p in parts))
    torch.testing.assert_close(out.aux_loss, sum(p.aux_loss for p in parts) / K)  # each term is a mean over trees
    up = torch.randn_like(out.output)
    ((out.output * up).sum() + out.aux_loss).backward()
    ((sum(p.output for p in parts) * up).sum() + sum(p.aux_loss for p in parts) / K).backward()
    N, L = forest.config.n_nodes, forest.config.n_leaves
    for k, t in enumerate(trees):
        torch.testing.assert_close(forest.router.node_weight.grad[k * N:(k + 1) * N], t.router.node_weight.grad)
        torch.testing.assert_close(forest.leaves.w1.grad[k * L:(k + 1) * L], t.leaves.w1.grad)
    counts = torch.cat([p.stats["counts"] for p in parts])
    assert torch.equal(out.stats["counts"], counts)
    forest.eval()
    torch.testing.assert_close(forest(x).output, sum(t.eval()(x).output for t in trees))


def test_a_bias_balanced_forest_shifts_each_trees_decisions():
    forest = _forest(load_balance="bias", bias_update_rate=0.1).train()
    with torch.no_grad():
        forest.router.balance_bias.copy_(torch.linspace(-0.5, 0.5, K * 3, dtype=torch.float64))
    trees = _trees(forest)
    x = torch.randn(30, 6, dtype=torch.float64)
    torch.testing.assert_close(forest(x).output, sum(t(x).output for t in trees))
    update_balance_biases(forest)
    for t in trees:
        update_balance_biases(t)
    torch.testing.assert_close(forest.router.balance_bias, torch.cat([t.router.balance_bias for t in trees]))


def test_counts_parameters_fast_eval_and_matching():
    forest = _forest()
    c = forest.config
    assert c.num_parameters() == sum(p.numel() for p in forest.parameters())
    assert c.num_parameters_per_token() == K * (c.depth * (c.d_model + 1) + 4 * 6 + 4 + 4 * 6 + 6)
    x = torch.randn(12, 6, dtype=torch.float64)
    reference = forest.eval()(x).output
    torch.testing.assert_close(to_fast_eval(forest).infer(x), reference)
    stats = forest(x).stats
    assert stats["node_counts"].shape == (2, K, 3) and level_imbalance(stats["node_counts"]).shape == (2,)
    matched = match_fff(64, 200_000, depth=3, n_trees=4)
    assert matched.n_trees == 4 and abs(matched.num_parameters() - 200_000) / 200_000 < 0.02


def test_forest_sizes_are_checked():
    with pytest.raises(ValueError, match="n_trees = 0 is not allowed"):
        FFFConfig(d_model=6, leaf_width=4, depth=2, n_trees=0)


# ------------------------------------------------------------------------------------------ path-neuron forests
def _path_forest(mode: str, seed: int = 0):
    from fff_moe_plugin import UltraFastConfig, UltraFastFFF

    torch.manual_seed(seed)
    forest = UltraFastFFF(UltraFastConfig(d_model=6, depth=2, n_trees=K, train_mode=mode, output_bias=True)).double()
    c = forest.config
    one = UltraFastConfig(**{**c.to_dict(), "n_trees": 1, "output_bias": False})
    N = c.n_neurons
    trees = []
    for k in range(K):
        t = UltraFastFFF(one).double()
        with torch.no_grad():
            t.neuron_in.copy_(forest.neuron_in[k * N:(k + 1) * N])
            t.neuron_bias.copy_(forest.neuron_bias[k * N:(k + 1) * N])
            t.neuron_out.copy_(forest.neuron_out[k * N:(k + 1) * N])
            forest.output_bias.normal_()
        trees.append(t)
    return forest, trees


@pytest.mark.parametrize("mode", ["masked", "sparse"])
def test_a_path_neuron_forest_is_the_sum_of_its_trees(mode):
    forest, trees = _path_forest(mode)
    x = torch.randn(25, 6, dtype=torch.float64)
    for training in (True, False):
        forest.train(training)
        out = forest(x)
        parts = [t.train(training)(x) for t in trees]
        torch.testing.assert_close(out.output, sum(p.output for p in parts) + forest.output_bias)
        assert torch.equal(out.stats["counts"], torch.cat([p.stats["counts"] for p in parts]))
    forest.train()
    up = torch.randn(25, 6, dtype=torch.float64)
    (forest(x).output * up).sum().backward()
    (sum(t(x).output for t in trees) * up).sum().backward()
    N = forest.config.n_neurons
    for k, t in enumerate(trees):
        torch.testing.assert_close(forest.neuron_in.grad[k * N:(k + 1) * N], t.neuron_in.grad)
        torch.testing.assert_close(forest.neuron_out.grad[k * N:(k + 1) * N], t.neuron_out.grad)
    assert forest.config.num_parameters() == sum(p.numel() for p in forest.parameters())
    torch.testing.assert_close(to_fast_eval(forest).infer(x), forest(x).output)


def test_one_path_neuron_tree_is_todays_layer_bit_for_bit():
    from fff_moe_plugin import UltraFastConfig, UltraFastFFF

    torch.manual_seed(0)
    today = UltraFastFFF(UltraFastConfig(d_model=6, depth=3))
    torch.manual_seed(0)
    one = UltraFastFFF(UltraFastConfig(d_model=6, depth=3, n_trees=1))
    x = torch.randn(9, 6)
    assert torch.equal(one(x).output, today(x).output)


@pytest.mark.parametrize("shifted", [False, True])
def test_a_forest_evaluates_on_the_compiled_kernels_tree_by_tree(shifted):
    from helpers import kernel_calls, why_no_kernels

    reason = why_no_kernels()
    if reason:
        pytest.skip(reason)
    forest = _forest(load_balance="bias" if shifted else "leaf").eval()
    if shifted:
        with torch.no_grad():
            forest.router.balance_bias.copy_(torch.linspace(-0.3, 0.3, K * 3, dtype=torch.float64))
    x = torch.randn(40, 6, dtype=torch.float64)
    reference = forest(x)  # parameters require grad: the torch path
    forest.requires_grad_(False)
    with kernel_calls() as calls:
        out = forest(x)
    assert calls, "the kernels did not run"
    torch.testing.assert_close(out.output, reference.output)
    assert torch.equal(out.stats["counts"], reference.stats["counts"])
    torch.testing.assert_close(to_fast_eval(forest).infer(x), reference.output)
