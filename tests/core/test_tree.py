"""Tree math: path probabilities, descent and region leak against direct definitions, on each device of the
``device`` fixture (tests/conftest.py)."""

import itertools

import pytest
import torch

from fff_moe_plugin import tree


def brute_leaf_probs(logits: torch.Tensor, depth: int) -> torch.Tensor:
    """Product of p (right) or 1 - p (left) along each leaf's path, leaf by leaf."""
    p = torch.sigmoid(logits)
    cols = []
    for bits in itertools.product((0, 1), repeat=depth):
        node, prob = 0, torch.ones(logits.shape[0], dtype=logits.dtype, device=logits.device)
        for b in bits:
            prob = prob * (p[:, node] if b else 1 - p[:, node])
            node = 2 * node + 1 + b
        cols.append(prob)
    return torch.stack(cols, 1)


@pytest.mark.parametrize("depth", [0, 1, 2, 3, 5])
def test_leaf_probs_equal_path_products_and_sum_to_one(depth, device):
    logits = torch.randn(7, tree.num_nodes(depth), dtype=torch.float64, device=device)
    probs = tree.leaf_probs(logits, depth)
    assert torch.allclose(probs, brute_leaf_probs(logits, depth))
    assert torch.allclose(probs.sum(1), torch.ones(7, dtype=torch.float64, device=device))


def test_deep_tree_log_probs_do_not_underflow(device):
    depth = 14
    logits = 30 * torch.randn(3, tree.num_nodes(depth), device=device)  # near-certain decisions: products underflow
    lp = tree.leaf_log_probs(logits, depth)
    assert torch.isfinite(lp).all()
    assert torch.allclose(torch.logsumexp(lp, 1), torch.zeros(3, device=device), atol=1e-5)


def test_gradcheck_leaf_log_probs(device):
    logits = torch.randn(4, tree.num_nodes(3), dtype=torch.float64, requires_grad=True, device=device)
    assert torch.autograd.gradcheck(lambda z: tree.leaf_log_probs(z, 3), (logits,))


def test_gradcheck_path_log_prob_through_descent(device):
    x = torch.randn(5, 6, dtype=torch.float64, requires_grad=True, device=device)
    w = torch.randn(7, 6, dtype=torch.float64, requires_grad=True, device=device)
    b = torch.randn(7, dtype=torch.float64, requires_grad=True, device=device)

    def f(x, w, b):
        _, z, _ = tree.descend(x, w, b, 3)
        return tree.path_log_prob(z, z >= 0)

    assert torch.autograd.gradcheck(f, (x, w, b))


@pytest.mark.parametrize("depth", [0, 1, 4])
def test_descent_agrees_with_all_logits_and_leaf_paths(depth, device):
    x = torch.randn(50, 6, dtype=torch.float64, device=device)
    w = torch.randn(tree.num_nodes(depth), 6, dtype=torch.float64, device=device)
    b = torch.randn(tree.num_nodes(depth), dtype=torch.float64, device=device)
    nodes, z, end = tree.descend(x, w, b, depth)
    all_logits = x @ w.t() + b
    nodes2, end2 = tree.descend_from_logits(all_logits, depth)
    assert torch.equal(nodes, nodes2) and torch.equal(end, end2)
    assert torch.allclose(z, all_logits.gather(1, nodes))
    leaf = end - tree.num_nodes(depth)
    path, right = tree.path_nodes_of_leaf(leaf, depth)
    assert torch.equal(path, nodes)
    assert torch.equal(right.bool(), z >= 0)
    # the hard path's probability is the leaf's soft probability
    lp = tree.leaf_log_probs(all_logits, depth).gather(1, leaf[:, None])[:, 0]
    assert torch.allclose(tree.path_log_prob(z, right), lp)


@pytest.mark.parametrize("depth", [0, 3, 7, 8])
def test_route_gives_the_descents_routing_with_every_logit_only_for_small_trees(depth, device):
    # depth <= 7 (at most 255 nodes): one GEMM over every node; depth 8: only the visited nodes
    x = torch.randn(64, 6, dtype=torch.float64, device=device)
    w = torch.randn(tree.num_nodes(depth), 6, dtype=torch.float64, device=device)
    b = torch.randn(tree.num_nodes(depth), dtype=torch.float64, device=device)
    nodes, z, end, all_logits = tree.route(x, w, b, depth)
    nodes2, z2, end2 = tree.descend(x, w, b, depth)
    assert torch.equal(nodes, nodes2) and torch.equal(end, end2)
    torch.testing.assert_close(z, z2, rtol=0, atol=1e-12)
    if tree.num_nodes(depth) <= tree.FULL_LOGITS_MAX_NODES:
        torch.testing.assert_close(all_logits, x @ w.t() + b, rtol=0, atol=1e-12)
        assert torch.equal(all_logits.gather(1, nodes), z)
    else:
        assert all_logits is None


def test_route_of_a_deep_tree_computes_every_logit_when_asked(device):
    x = torch.randn(64, 6, dtype=torch.float64, device=device)
    w = torch.randn(tree.num_nodes(8), 6, dtype=torch.float64, device=device)
    b = torch.randn(tree.num_nodes(8), dtype=torch.float64, device=device)
    nodes, z, end, all_logits = tree.route(x, w, b, 8, every_logit=True)
    nodes2, z2, end2 = tree.descend(x, w, b, 8)
    assert torch.equal(nodes, nodes2) and torch.equal(end, end2)
    torch.testing.assert_close(z, z2, rtol=0, atol=1e-12)
    torch.testing.assert_close(all_logits, x @ w.t() + b, rtol=0, atol=1e-12)


@pytest.mark.parametrize("depth", [3, 8])
def test_route_with_leak_one_takes_the_mirrored_path(depth, device):
    x = torch.randn(32, 6, device=device)
    w, b = torch.randn(tree.num_nodes(depth), 6, device=device), torch.randn(tree.num_nodes(depth), device=device)
    nodes, z, end, _ = tree.route(x, w, b, depth, leak_rate=1.0)
    mirrored = tree.descend(x, -w, -b, depth)
    assert torch.equal(nodes, mirrored[0]) and torch.equal(end, mirrored[2])
    torch.testing.assert_close(z, mirrored[1])


def test_strict_descent_breaks_ties_to_the_left(device):
    x = torch.zeros(2, 3, device=device)
    w, b = torch.zeros(3, 3, device=device), torch.zeros(3, device=device)
    assert tree.descend(x, w, b, 2)[2].tolist() == [6, 6]  # z = 0 goes right
    assert tree.descend(x, w, b, 2, strict=True)[2].tolist() == [3, 3]  # z = 0 goes left


def test_leak_rate_one_swaps_every_decision_and_zero_none(device):
    z = torch.randn(10, 7, device=device)
    assert torch.equal(tree.leak(z, 1.0), -z)
    assert torch.equal(tree.leak(z, 0.0), z)


def test_leak_rate_is_the_swap_probability(device):
    z = torch.ones(200_000, device=device)
    frac = (tree.leak(z, 0.3) < 0).float().mean().item()
    assert abs(frac - 0.3) < 0.01


def test_bernoulli_entropy_matches_definition(device):
    z = torch.linspace(-8, 8, 33, dtype=torch.float64, device=device)
    p = torch.sigmoid(z)
    assert torch.allclose(tree.bernoulli_entropy(z), -(p * p.log() + (1 - p) * (1 - p).log()))
