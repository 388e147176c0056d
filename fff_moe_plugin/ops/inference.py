"""Inference kernels of the FFF trees, each behind one function with its plain-torch reference beside it.

| function        | what it computes                                               | op                      |
|-----------------|----------------------------------------------------------------|-------------------------|
| ``descend``     | hard descent, only the visited nodes' logits                   | ``fff_moe::descend``    |
| ``leaf_mlp``    | each token's leaf MLP, tokens grouped by leaf, scaled by gate  | ``fff_moe::leaf_mlp``   |
| ``fff_infer``   | descent + path-probability gate + leaf MLP in one call         | ``fff_moe::fff_infer``  |
| ``path_neuron`` | the path-neuron (UltraFastBERT) tree's eval forward            | ``fff_moe::path_neuron``|

The ops are compiled C++ (``ops/csrc``, built on first use by :mod:`.extension`) registered with
``torch.library`` together with fake implementations, so ``torch.compile`` traces through them. Each
function runs its op when the kernels are available and applicable (float32/float64 CPU tensors, no
autograd needed: the kernels have no backward) and its reference otherwise; ``FFF_MOE_REFERENCE=1``,
:func:`set_reference` or the :func:`reference_path` context force the references everywhere. The references
are vectorised torch code (the tree math of :mod:`fff_moe_plugin.tree` and :func:`.grouped.grouped_mlp`) and
are the exact definitions the kernels are tested against.

Axes: S tokens, d input width, N nodes, L leaves, l leaf width, o output width, D levels visited.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Optional

import torch
from torch import Tensor

from .. import tree
from ..activations import NAMES, activation_fn
from . import extension
from .grouped import grouped_mlp

# activation name -> code understood by the C++ kernels (csrc/fff_inference.cpp, enum Act)
ACTIVATION_CODES = {"identity": 0, "relu": 1, "gelu": 2, "silu": 3, "tanh": 4, "sigmoid": 5}  # the C++ switch
assert set(ACTIVATION_CODES) == set(NAMES), "every activation needs a code in the C++ kernels"
REFERENCE_ENV = "FFF_MOE_REFERENCE"
_KERNEL_DTYPES = (torch.float32, torch.float64)

_force_reference = os.environ.get(REFERENCE_ENV, "") not in ("", "0")
_fake_registered = False


def set_reference(flag: bool) -> None:
    """Force (True) or release (False) the plain-torch references in every FFF layer and kernel function."""
    global _force_reference
    _force_reference = bool(flag)


@contextlib.contextmanager
def reference_path(flag: bool = True) -> Iterator[None]:
    """Within the block, run the references (``flag=True``) or the fastest path (``flag=False``)."""
    global _force_reference
    before = _force_reference
    _force_reference = bool(flag)
    try:
        yield
    finally:
        _force_reference = before


def _register_fakes() -> None:
    """Shape-only implementations of the ops, so that torch.compile and meta tensors trace through them."""
    global _fake_registered
    if _fake_registered:
        return
    _fake_registered = True

    @torch.library.register_fake("fff_moe::descend")
    def _(x, weight, bias, levels, strict):
        S = x.shape[0]
        return x.new_empty(S, levels, dtype=torch.long), x.new_empty(S, levels), x.new_empty(S, dtype=torch.long)

    @torch.library.register_fake("fff_moe::leaf_mlp")
    def _(x, leaf, gate, w1, b1, w2, b2, act):
        return x.new_empty(x.shape[0], w2.shape[2])

    @torch.library.register_fake("fff_moe::fff_infer")
    def _(x, node_w, node_b, w1, b1, w2, b2, depth, act, gated):
        S = x.shape[0]
        return x.new_empty(S, w2.shape[2]), x.new_empty(S, dtype=torch.long), x.new_empty(S, depth)

    @torch.library.register_fake("fff_moe::path_neuron")
    def _(x, w_in, b_in, w_out, out_bias, levels, act):
        return x.new_empty(x.shape[0], w_out.shape[1]), x.new_empty(x.shape[0], dtype=torch.long)


_module = None  # the compiled module once loaded (its pybind functions are the eager entry points)
_loaded = False


def ops() -> Optional[object]:
    """``torch.ops.fff_moe`` when the compiled kernels are loaded, else None (builds them on first call)."""
    global _module, _loaded
    if not _loaded:
        _module = extension.load()
        _loaded = True
        if _module is not None:
            _register_fakes()
    return torch.ops.fff_moe if _module is not None else None


def _kernel(name: str):
    """The compiled function ``name``: the torch.library op while torch.compile traces, else its direct binding
    (the same C++ function without the dispatcher's boxing, several microseconds cheaper per call)."""
    if torch.compiler.is_compiling():
        return getattr(torch.ops.fff_moe, name)
    return getattr(_module, name)


def kernels_apply(*tensors: Optional[Tensor]) -> bool:
    """Whether the compiled kernels may run on these tensors (else the reference runs).

    They run on float32/float64 CPU tensors when no gradient is needed (they have no backward) and the
    references are not forced.
    """
    if _force_reference:
        return False
    x = tensors[0]
    if x is None or x.dtype not in _KERNEL_DTYPES or x.device.type != "cpu":
        return False
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        return False
    if not _loaded:
        ops()
    return _module is not None


def _act_code(activation: str) -> int:
    code = ACTIVATION_CODES.get(activation)
    if code is None:
        raise ValueError(f"activation {activation!r} unknown; allowed: {', '.join(ACTIVATION_CODES)}")
    return code


def _check_x(x: Tensor, d: int, name: str = "x") -> None:
    if x.dim() != 2 or x.shape[1] != d:
        raise ValueError(f"{name} must be [S, {d}], got {tuple(x.shape)}")


# -- descend -----------------------------------------------------------------------------------------------
def descend_reference(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], levels: int, strict: bool = False
) -> tuple[Tensor, Tensor, Tensor]:
    """Reference of :func:`descend`: :func:`fff_moe_plugin.tree.descend` without region leak."""
    return tree.descend(x, weight, bias, levels, strict=strict)


def descend(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], levels: int, strict: bool = False
) -> tuple[Tensor, Tensor, Tensor]:
    """Hard descent computing only the visited nodes: ``(nodes [S, D] long, logits [S, D], end [S] long)``.

    x: [S, d]; weight: [N, d] with N >= 2**levels - 1; bias: [N] or None. Goes right when the logit is
    ``>= 0`` (``> 0`` with ``strict``), as :func:`fff_moe_plugin.tree.descend` does.
    """
    if kernels_apply(x, weight, bias):
        return _kernel("descend")(x, weight, bias, levels, strict)  # the op checks its arguments itself
    _check_x(x, weight.shape[-1])
    if levels < 0:
        raise ValueError(f"levels must be >= 0, got {levels}")
    return descend_reference(x, weight, bias, levels, strict)


# -- leaf MLP ----------------------------------------------------------------------------------------------
def leaf_mlp_reference(
    x: Tensor, leaf: Tensor, gate: Optional[Tensor], w1: Tensor, b1: Optional[Tensor], w2: Tensor,
    b2: Optional[Tensor], activation: str,
) -> Tensor:
    """Reference of :func:`leaf_mlp`: :func:`.grouped.grouped_mlp` with one assignment per token."""
    token = torch.arange(x.shape[0], device=x.device)
    return grouped_mlp(x, token, leaf, gate, w1, b1, w2, b2, activation_fn(activation))


def leaf_mlp(
    x: Tensor, leaf: Tensor, gate: Optional[Tensor], w1: Tensor, b1: Optional[Tensor], w2: Tensor,
    b2: Optional[Tensor], activation: str,
) -> Tensor:
    """``y[t] = gate[t] * (act(x[t] @ w1[leaf[t]] + b1[leaf[t]]) @ w2[leaf[t]] + b2[leaf[t]])``.

    x: [S, d]; leaf: [S] long in [0, L); gate: [S] or None (ones); w1: [L, d, l]; b1: [L, l] or None;
    w2: [L, l, o]; b2: [L, o] or None. Returns [S, o]. The kernel sorts tokens by leaf and runs blocked
    small matmuls per leaf.
    """
    act = _act_code(activation)
    if kernels_apply(x, gate, w1, b1, w2, b2):
        return _kernel("leaf_mlp")(x, leaf, gate, w1, b1, w2, b2, act)  # the op checks its arguments itself
    _check_x(x, w1.shape[1])
    if leaf.shape != (x.shape[0],):
        raise ValueError(f"leaf must be [{x.shape[0]}] (one leaf per token), got {tuple(leaf.shape)}")
    if leaf.numel() and (int(leaf.min()) < 0 or int(leaf.max()) >= w1.shape[0]):
        raise ValueError(f"leaf indices must lie in [0, {w1.shape[0]}), got [{int(leaf.min())}, {int(leaf.max())}]")
    return leaf_mlp_reference(x, leaf, gate, w1, b1, w2, b2, activation)


# -- fused leaf-MLP tree -----------------------------------------------------------------------------------
def fff_infer_reference(
    x: Tensor, node_w: Tensor, node_b: Optional[Tensor], w1: Tensor, b1: Optional[Tensor], w2: Tensor,
    b2: Optional[Tensor], depth: int, activation: str, gated: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Reference of :func:`fff_infer`: the tree math and grouped MLP that ``FFF`` runs in eval."""
    _, logits, end = tree.descend(x, node_w, node_b, depth)  # [S, D], [S]
    gate = tree.path_log_prob(logits, logits >= 0).exp() if gated else None  # [S]
    leaf = end - tree.num_nodes(depth)
    return leaf_mlp_reference(x, leaf, gate, w1, b1, w2, b2, activation), leaf, logits


def fff_infer(
    x: Tensor, node_w: Tensor, node_b: Optional[Tensor], w1: Tensor, b1: Optional[Tensor], w2: Tensor,
    b2: Optional[Tensor], depth: int, activation: str, gated: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """A leaf-MLP tree's eval forward in one call: ``(y [S, o], leaf [S], path logits [S, D])``.

    Descends the ``depth``-level tree (right when the logit is >= 0) and runs the chosen leaf's MLP, scaled
    by the path probability ``prod sigmoid(|z|)`` when ``gated`` (a hard-trained tree) or not at all (a
    soft-trained tree, as the FFF paper evaluates it).
    """
    act = _act_code(activation)
    if kernels_apply(x, node_w, node_b, w1, b1, w2, b2):
        return _kernel("fff_infer")(x, node_w, node_b, w1, b1, w2, b2, depth, act, gated)  # checks its arguments
    _check_x(x, node_w.shape[-1])
    if depth < 0 or w1.shape[0] != 2**depth or node_w.shape[0] != 2**depth - 1:
        raise ValueError(
            f"depth {depth} needs {2**depth - 1 if depth >= 0 else '?'} nodes and {2**depth if depth >= 0 else '?'} "
            f"leaves, got {node_w.shape[0]} and {w1.shape[0]}"
        )
    return fff_infer_reference(x, node_w, node_b, w1, b1, w2, b2, depth, activation, gated)


# -- path-neuron tree --------------------------------------------------------------------------------------
def path_neuron_reference(
    x: Tensor, w_in: Tensor, b_in: Optional[Tensor], w_out: Tensor, out_bias: Optional[Tensor], levels: int,
    activation: str,
) -> tuple[Tensor, Tensor]:
    """Reference of :func:`path_neuron`: the eval branch of ``UltraFastFFF.forward``."""
    nodes, a, end = tree.descend(x, w_in, b_in, levels, strict=True)  # [S, D+1]
    y = torch.einsum("sk,sko->so", activation_fn(activation)(a), w_out[nodes])  # [S, o]
    if out_bias is not None:
        y = y + out_bias
    return y, nodes[:, -1]


def path_neuron(
    x: Tensor, w_in: Tensor, b_in: Optional[Tensor], w_out: Tensor, out_bias: Optional[Tensor], levels: int,
    activation: str,
) -> tuple[Tensor, Tensor]:
    """Path-neuron eval forward: ``(y [S, o], last visited neuron [S] long)``.

    At each of ``levels`` visited neurons n: ``a = w_in[n] . x + b_in[n]``, ``y += act(a) * w_out[n]``, then
    ``n -> 2n + 1 + [a > 0]``; finally ``y += out_bias``. w_in: [2**levels - 1, d]; w_out: [2**levels - 1, o].
    """
    act = _act_code(activation)
    if kernels_apply(x, w_in, b_in, w_out, out_bias):
        return _kernel("path_neuron")(x, w_in, b_in, w_out, out_bias, levels, act)  # checks its arguments
    _check_x(x, w_in.shape[-1])
    if levels < 1 or w_in.shape[0] != 2**levels - 1 or w_out.shape[0] != w_in.shape[0]:
        raise ValueError(
            f"levels must be >= 1 with 2**levels - 1 neurons in w_in and w_out; got levels={levels}, "
            f"w_in {tuple(w_in.shape)}, w_out {tuple(w_out.shape)}"
        )
    return path_neuron_reference(x, w_in, b_in, w_out, out_bias, levels, activation)
