"""The compiled inference kernels against their plain-torch references, and the layers that use them."""

import warnings

import pytest
import torch
from helpers import kernel_calls, why_no_kernels

from fff_moe_plugin import FFF, FFFConfig, UltraFastConfig, UltraFastFFF
from fff_moe_plugin.fast_eval import FastFFF, FastUltraFastFFF, to_fast_eval
from fff_moe_plugin.ops import extension
from fff_moe_plugin.ops import inference as inf

_NO_KERNELS = why_no_kernels()
pytestmark = pytest.mark.skipif(_NO_KERNELS is not None, reason=_NO_KERNELS or "")


def test_the_kernels_build_and_load_where_a_toolchain_exists():
    module = extension.load()
    assert module is not None, "a C++ compiler and ninja are present, yet the kernels did not build (see the warning)"
    assert inf.ops() is not None and extension.simd_width_bytes() in (16, 32, 64)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The references run many small ops, which OpenMP makes slow on a busy 2-core machine; the kernels'
    own thread split is held by test_kernels_give_the_same_result_on_one_and_two_threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


DTYPES = [torch.float32, torch.float64]
DEPTHS = list(range(13))
BATCHES = [0, 1, 7, 4096]
D, LW, O = 37, 19, 70  # widths that exercise full vector tiles and scalar tails in both dtypes


def tol(dtype):
    return dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=1e-10, rtol=1e-10)


def kernel(fn, *args):
    """``fn(*args)`` on the compiled kernels; fails if ``fn`` ran its torch reference instead."""
    with kernel_calls() as calls, inf.reference_path(False), torch.no_grad():
        out = fn(*args)
    assert calls == [fn.__name__], f"{fn.__name__} did not run its compiled kernel (kernels ran: {calls})"
    return out


def tree_weights(depth, dtype, d=D, l=LW, o=O, integer=False, gen_shape=None):
    """Node and leaf weights of a leaf-MLP tree; integer-valued ones make every sum exact in any order."""
    N, L = 2**depth - 1, 2**depth

    def r(*shape):
        if integer:
            return torch.randint(-3, 4, shape).to(dtype)
        return torch.randn(*shape, dtype=dtype)

    node_b = r(N) + 0.5 if integer else r(N)  # half-integer biases: integer logits are never 0 (no ties)
    return r(N, d), node_b, r(L, d, l), r(L, l), r(L, l, o) / (1 if integer else l**0.5), r(L, o)


def same_routes(kernel_end, ref_end, ref_logits, dtype):
    """Routes agree, except float32 tokens whose reference path passes within rounding of a tie."""
    differ = kernel_end != ref_end
    if dtype == torch.float64 or not differ.any():
        assert torch.equal(kernel_end, ref_end)
        return ~differ
    near_tie = (ref_logits.abs() < 1e-4).any(1)
    assert bool(near_tie[differ].all()), "a route differs away from any tie"
    assert int(differ.sum()) <= max(1, kernel_end.numel() // 1000)
    return ~differ


# -- descend -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("depth", DEPTHS)
@pytest.mark.parametrize("S", BATCHES)
def test_descend_kernel_equals_reference(S, depth, dtype):
    x = torch.randn(S, D, dtype=dtype)
    w, b = torch.randn(2**depth - 1, D, dtype=dtype), torch.randn(2**depth - 1, dtype=dtype)
    nodes, logits, end = kernel(inf.descend, x, w, b, depth)
    r_nodes, r_logits, r_end = inf.descend_reference(x, w, b, depth)
    assert nodes.shape == r_nodes.shape == (S, depth) and logits.dtype == dtype and end.dtype == torch.long
    ok = same_routes(end, r_end, r_logits, dtype)
    assert torch.equal(nodes[ok], r_nodes[ok])
    torch.testing.assert_close(logits[ok], r_logits[ok], **tol(dtype))


@pytest.mark.parametrize("strict", [False, True])
def test_descend_kernel_is_exact_on_integer_data_and_keeps_the_tie_rule(strict):
    depth = 9
    x = torch.randint(-3, 4, (500, D)).float()
    w = torch.randint(-3, 4, (2**depth - 1, D)).float()
    b = torch.randint(-3, 4, (2**depth - 1,)).float()  # integer logits: many exact zeros, the tie case
    got = kernel(inf.descend, x, w, b, depth, strict)
    ref = inf.descend_reference(x, w, b, depth, strict)
    assert bool((ref[1] == 0).any())
    for a, r in zip(got, ref):
        assert torch.equal(a, r)


def test_descend_without_bias_and_on_non_contiguous_inputs():
    x = torch.randn(300, 2 * D)[:, ::2]
    w = torch.randn(D, 63).t()
    got = kernel(inf.descend, x, w, None, 6)
    ref = inf.descend_reference(x, w, None, 6)
    ok = same_routes(got[2], ref[2], ref[1], torch.float32)
    torch.testing.assert_close(got[1][ok], ref[1][ok], **tol(torch.float32))


# -- leaf MLP ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("depth", DEPTHS)
@pytest.mark.parametrize("S", BATCHES)
def test_leaf_mlp_kernel_equals_reference(S, depth, dtype):
    _, _, w1, b1, w2, b2 = tree_weights(depth, dtype)
    x = torch.randn(S, D, dtype=dtype)
    leaf = torch.randint(0, 2**depth, (S,))  # deep trees: most leaves get zero tokens
    gate = torch.rand(S, dtype=dtype)
    got = kernel(inf.leaf_mlp, x, leaf, gate, w1, b1, w2, b2, "gelu")
    torch.testing.assert_close(got, inf.leaf_mlp_reference(x, leaf, gate, w1, b1, w2, b2, "gelu"), **tol(dtype))


@pytest.mark.parametrize("activation", list(inf.ACTIVATION_CODES))
@pytest.mark.parametrize("dtype", DTYPES)
def test_leaf_mlp_kernel_every_activation_without_gate_or_biases(activation, dtype):
    _, _, w1, _, w2, _ = tree_weights(4, dtype)
    x = torch.randn(333, D, dtype=dtype)
    leaf = torch.randint(0, 16, (333,))
    got = kernel(inf.leaf_mlp, x, leaf, None, w1, None, w2, None, activation)
    ref = inf.leaf_mlp_reference(x, leaf, None, w1, None, w2, None, activation)
    torch.testing.assert_close(got, ref, **tol(dtype))


@pytest.mark.parametrize("S", [1, 7, 4096])
def test_leaf_mlp_kernel_all_tokens_on_one_leaf_is_exact_on_integer_data(S):
    _, _, w1, b1, w2, b2 = tree_weights(5, torch.float32, integer=True)
    x = torch.randint(-3, 4, (S, D)).float()
    leaf = torch.full((S,), 13)
    got = kernel(inf.leaf_mlp, x, leaf, None, w1, b1, w2, b2, "relu")
    assert torch.equal(got, inf.leaf_mlp_reference(x, leaf, None, w1, b1, w2, b2, "relu"))


def test_leaf_mlp_kernel_on_non_contiguous_inputs_and_weights():
    L = 8
    x = torch.randn(200, 3, D)[:, 1]  # rows 3 * D apart
    w1 = torch.randn(L, LW, D).transpose(1, 2)  # [L, D, LW], non-contiguous
    w2 = torch.randn(L, O, LW).transpose(1, 2)
    b1, b2 = torch.randn(LW, L).t(), torch.randn(O, L).t()
    leaf = torch.randint(0, L, (400,))[::2]
    gate = torch.rand(400)[::2]
    got = kernel(inf.leaf_mlp, x, leaf, gate, w1, b1, w2, b2, "silu")
    torch.testing.assert_close(got, inf.leaf_mlp_reference(x, leaf, gate, w1, b1, w2, b2, "silu"), **tol(torch.float32))


def test_leaf_mlp_at_the_benchmark_shape():
    L, d, l = 128, 768, 32
    x = torch.randn(700, d)
    w1, b1 = torch.randn(L, d, l) / d**0.5, torch.randn(L, l)
    w2, b2 = torch.randn(L, l, d) / l**0.5, torch.randn(L, d)
    leaf = torch.randint(0, L, (700,))
    got = kernel(inf.leaf_mlp, x, leaf, None, w1, b1, w2, b2, "gelu")
    torch.testing.assert_close(got, inf.leaf_mlp_reference(x, leaf, None, w1, b1, w2, b2, "gelu"), atol=1e-4, rtol=1e-4)


# -- fused leaf-MLP tree -------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("depth", DEPTHS)
@pytest.mark.parametrize("S", BATCHES)
def test_fff_infer_kernel_equals_reference(S, depth, dtype):
    w = tree_weights(depth, dtype)
    x = torch.randn(S, D, dtype=dtype)
    gated = depth % 2 == 1  # both gate rules across the depths
    y, leaf, logits = kernel(inf.fff_infer, x, *w, depth, "gelu", gated)
    r_y, r_leaf, r_logits = inf.fff_infer_reference(x, *w, depth, "gelu", gated)
    ok = same_routes(leaf, r_leaf, r_logits, dtype)
    torch.testing.assert_close(y[ok], r_y[ok], **tol(dtype))
    torch.testing.assert_close(logits[ok], r_logits[ok], **tol(dtype))


def test_fff_infer_kernel_is_exact_on_integer_data():
    w = tree_weights(7, torch.float32, integer=True)
    x = torch.randint(-3, 4, (4096, D)).float()
    got = kernel(inf.fff_infer, x, *w, 7, "relu", False)
    ref = inf.fff_infer_reference(x, *w, 7, "relu", False)
    for a, r in zip(got, ref):
        assert torch.equal(a, r)


# -- path-neuron tree ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("depth", DEPTHS)
@pytest.mark.parametrize("S", BATCHES)
def test_path_neuron_kernel_equals_reference(S, depth, dtype):
    levels = depth + 1
    N = 2**levels - 1
    x = torch.randn(S, D, dtype=dtype)
    w_in, b_in, w_out, out_bias = (torch.randn(N, D, dtype=dtype), torch.randn(N, dtype=dtype),
                                   torch.randn(N, O, dtype=dtype), torch.randn(O, dtype=dtype))
    y, last = kernel(inf.path_neuron, x, w_in, b_in, w_out, out_bias, levels, "gelu")
    r_y, r_last = inf.path_neuron_reference(x, w_in, b_in, w_out, out_bias, levels, "gelu")
    _, r_logits, _ = inf.descend_reference(x, w_in, b_in, levels, strict=True)
    ok = same_routes(last, r_last, r_logits, dtype)
    torch.testing.assert_close(y[ok], r_y[ok], **tol(dtype))


def test_path_neuron_kernel_is_exact_on_integer_data_and_non_contiguous_inputs():
    levels, N = 8, 255
    x = torch.randint(-3, 4, (900, 2 * D)).float()[:, ::2]
    w_in = torch.randint(-3, 4, (D, N)).float().t()
    b_in = torch.randint(-3, 4, (N,)).float()  # integer logits: exact zeros exercise the strict "> 0" rule
    w_out = torch.randint(-3, 4, (N, O)).float()
    got = kernel(inf.path_neuron, x, w_in, b_in, w_out, None, levels, "relu")
    ref = inf.path_neuron_reference(x, w_in, b_in, w_out, None, levels, "relu")
    for a, r in zip(got, ref):
        assert torch.equal(a, r)


# -- dispatch: fallback, gradients, bad input, absence of the extension, torch.compile ---------------------
def test_kernels_give_the_same_result_on_one_and_two_threads():
    w = tree_weights(7, torch.float32)
    x = torch.randn(1000, D)
    W, U = torch.randn(255, D), torch.randn(255, O)
    one = kernel(inf.fff_infer, x, *w, 7, "gelu", True) + kernel(inf.path_neuron, x, W, None, U, None, 8, "gelu")
    torch.set_num_threads(2)
    try:
        two = kernel(inf.fff_infer, x, *w, 7, "gelu", True) + kernel(inf.path_neuron, x, W, None, U, None, 8, "gelu")
    finally:
        torch.set_num_threads(1)
    for a, b in zip(one, two):
        assert torch.equal(a, b)


def test_forced_reference_path_equals_the_kernel():
    w = tree_weights(6, torch.float64)
    x = torch.randn(257, D, dtype=torch.float64)
    fast = kernel(inf.fff_infer, x, *w, 6, "gelu", True)
    with inf.reference_path():
        slow = inf.fff_infer(x, *w, 6, "gelu", True)
    for a, r in zip(fast, slow):
        torch.testing.assert_close(a, r, **tol(torch.float64))


def test_functions_stay_differentiable_through_the_reference_when_a_gradient_is_needed():
    _, _, w1, b1, w2, b2 = tree_weights(3, torch.float64, d=5, l=3, o=4)
    x = torch.randn(11, 5, dtype=torch.float64, requires_grad=True)
    leaf = torch.randint(0, 8, (11,))
    gate = torch.rand(11, dtype=torch.float64, requires_grad=True)
    assert not inf.kernels_apply(x, gate)
    torch.autograd.gradcheck(lambda x, g: inf.leaf_mlp(x, leaf, g, w1, b1, w2, b2, "tanh"), (x, gate))


def test_bad_inputs_raise_value_errors_on_both_paths():
    _, _, w1, b1, w2, b2 = tree_weights(2, torch.float32)
    x = torch.randn(5, D)
    for force in (False, True):
        with inf.reference_path(force), torch.no_grad():
            with pytest.raises(ValueError, match="leaf indices"):
                inf.leaf_mlp(x, torch.tensor([0, 1, 2, 3, 4]), None, w1, b1, w2, b2, "relu")
            with pytest.raises(ValueError, match="38"):  # the width of x against the weights' 37
                inf.leaf_mlp(torch.randn(5, D + 1), torch.zeros(5, dtype=torch.long), None, w1, b1, w2, b2, "relu")
            with pytest.raises(ValueError, match="activation"):
                inf.leaf_mlp(x, torch.zeros(5, dtype=torch.long), None, w1, b1, w2, b2, "swish")
    with pytest.raises(ValueError, match="dtype"):
        torch.ops.fff_moe.leaf_mlp(x, torch.zeros(5, dtype=torch.long), None, w1.double(), b1, w2, b2, 1)


def test_absent_extension_falls_back_to_the_reference(monkeypatch):
    layer = FFF(FFFConfig(d_model=D, leaf_width=4, depth=3, train_mode="hard")).eval()
    x = torch.randn(50, D)
    with torch.no_grad():
        fast = layer(x).output
    monkeypatch.setenv(extension.DISABLE_ENV, "1")
    monkeypatch.setattr(inf, "_loaded", False)
    monkeypatch.setattr(inf, "_module", None)
    assert extension.load() is None and inf.ops() is None and not inf.kernels_apply(x)
    with torch.no_grad():
        torch.testing.assert_close(layer(x).output, fast, **tol(torch.float32))


def test_missing_compiler_warns_once_and_falls_back(monkeypatch):
    monkeypatch.setattr(extension, "_state", {})
    monkeypatch.setenv("CXX", "no-such-compiler-fff-moe")
    with pytest.warns(UserWarning, match="no C\\+\\+ compiler"):
        assert extension.load() is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert extension.load() is None  # decided once per process


def test_ops_have_fake_implementations_and_torch_compile_traces_them():
    inf.ops()
    w = tree_weights(4, torch.float32)
    x = torch.randn(9, D)
    leaf = torch.randint(0, 16, (9,))
    torch.library.opcheck(torch.ops.fff_moe.fff_infer.default, (x, *w, 4, 2, True),
                          test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(torch.ops.fff_moe.leaf_mlp.default, (x, leaf, None, w[2], w[3], w[4], w[5], 2),
                          test_utils=("test_schema", "test_faketensor"))

    def f(x):
        y, leaf, logits = inf.fff_infer(x, *w, 4, "gelu", True)
        nodes, _, end = inf.descend(x, w[0], w[1], 4)
        return y + inf.leaf_mlp(x, end - 15, None, *w[2:], "gelu"), nodes

    with torch.no_grad():
        compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
        for a, r in zip(compiled(x), f(x)):
            assert torch.equal(a, r)


# -- the layers ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["soft", "hard"])
@pytest.mark.parametrize("master", [False, True])
def test_fff_eval_on_kernels_equals_reference_and_hard_training_forward(mode, master):
    layer = FFF(FFFConfig(d_model=D, leaf_width=6, depth=5, train_mode=mode, master_leaf=master,
                          activation="gelu")).double()
    x = torch.randn(300, D, dtype=torch.float64)
    with torch.no_grad():
        with kernel_calls() as calls, inf.reference_path(False):
            fast = layer.eval()(x)
        with inf.reference_path():
            ref = layer(x)
        train = layer.train()(x) if mode == "hard" else None
    assert calls == ["descend", "leaf_mlp"]
    torch.testing.assert_close(fast.output, ref.output, **tol(torch.float64))
    for key in ref.stats:
        torch.testing.assert_close(fast.stats[key], ref.stats[key])
    if train is not None:
        torch.testing.assert_close(train.output, fast.output, **tol(torch.float64))


def test_fff_eval_on_kernels_is_exact_on_integer_weights():
    layer = FFF(FFFConfig(d_model=D, leaf_width=5, depth=4, train_mode="soft", activation="relu")).eval()
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randint(-3, 4, p.shape))
        layer.router.node_bias.add_(0.5)
        x = torch.randint(-3, 4, (64, D)).float()
        with kernel_calls() as calls, inf.reference_path(False):
            fast = layer(x).output
        with inf.reference_path():
            assert torch.equal(fast, layer(x).output)
    assert calls == ["descend", "leaf_mlp"]


def test_ultrafast_eval_on_kernels_equals_reference():
    layer = UltraFastFFF(UltraFastConfig(d_model=D, depth=6, output_bias=True)).double().eval()
    with torch.no_grad():
        layer.output_bias.normal_()
        x = torch.randn(2, 150, D, dtype=torch.float64)
        with kernel_calls() as calls, inf.reference_path(False):
            fast = layer(x)
        with inf.reference_path():
            ref = layer(x)
    assert calls == ["path_neuron"]
    torch.testing.assert_close(fast.output, ref.output, **tol(torch.float64))
    assert torch.equal(fast.stats["counts"], ref.stats["counts"])


def test_to_fast_eval_converts_a_model_in_one_call():
    fff = FFF(FFFConfig(d_model=D, leaf_width=6, depth=4, train_mode="hard", master_leaf=True)).double()
    soft = FFF(FFFConfig(d_model=D, leaf_width=6, depth=3, train_mode="soft")).double()
    ultra = UltraFastFFF(UltraFastConfig(d_model=D, depth=5)).double()
    model = torch.nn.ModuleDict({"a": fff, "b": soft, "c": ultra})
    keys = list(model.state_dict())
    x = torch.randn(4, 30, D, dtype=torch.float64)
    with torch.no_grad(), inf.reference_path():
        expected = {k: m.eval()(x).output for k, m in model.items()}
    assert to_fast_eval(model) is model
    assert isinstance(model["a"], FastFFF) and isinstance(model["c"], FastUltraFastFFF)
    assert list(model.state_dict()) == keys and not model.training
    assert not any(p.requires_grad for p in model.parameters())
    for k, m in model.items():
        with kernel_calls() as calls, inf.reference_path(False):
            got = m.infer(x)
        assert calls == (["path_neuron"] if k == "c" else ["fff_infer"])
        assert got.shape == expected[k].shape
        torch.testing.assert_close(got, expected[k], **tol(torch.float64))
        torch.testing.assert_close(m(x).output, expected[k], **tol(torch.float64))


def test_to_fast_eval_refuses_subclasses_it_would_break():
    class Custom(FFF):
        pass

    with pytest.raises(ValueError, match="subclass"):
        to_fast_eval(Custom(FFFConfig(d_model=4, leaf_width=2, depth=1)))
