"""``take_along``: ``src.gather(1, index)`` for [S, N] / [S, K] tensors, as a ``torch.library`` custom op.

The routers pick each token's path logits (the FFF tree) or selected scores (sigma-MoE) with it. Eagerly it is
exactly ``gather``, forward and backward. It exists for ``torch.compile``: torch 2.13's Inductor on CPU lowers the
backward of a plain ``gather`` to an in-place ``scatter_reduce_`` fallback and, in graphs that also hold the
grouped-expert custom ops (``ops/grouped.py``) with weight gradients, scheduled that mutation after the buffer's
consumer, so the gradient through the gathered logits was silently dropped. As an opaque op with a functional
backward (``put_along``), the scatter is an ordinary data dependency that no scheduler can reorder.
"""

from __future__ import annotations

import torch
from torch import Tensor


def take_along(src: Tensor, index: Tensor) -> Tensor:
    """``src.gather(1, index)``: src [S, N], index [S, K] long -> [S, K]. Eagerly the plain ``gather`` (a custom
    op's dispatch costs more than the gather itself); inside ``torch.compile`` the custom op."""
    if torch.compiler.is_compiling():
        return _take_along(src, index)
    return src.gather(1, index)


@torch.library.custom_op("fff_moe_gather::take_along", mutates_args=())
def _take_along(src: Tensor, index: Tensor) -> Tensor:
    return src.gather(1, index)


@_take_along.register_fake
def _(src, index):
    return src.new_empty(index.shape)


@torch.library.custom_op("fff_moe_gather::put_along", mutates_args=())
def put_along(grad: Tensor, index: Tensor, n: int) -> Tensor:
    """The gradient of :func:`take_along`: ``zeros(S, n).scatter_add(1, index, grad)``."""
    return grad.new_zeros(grad.shape[0], n).scatter_add_(1, index, grad)


@put_along.register_fake
def _(grad, index, n):
    return grad.new_empty(grad.shape[0], n)


def _setup(ctx, inputs, output) -> None:
    src, index = inputs
    ctx.save_for_backward(index)
    ctx.n = src.shape[1]


def _backward(ctx, grad: Tensor):
    (index,) = ctx.saved_tensors
    return put_along(grad.contiguous(), index, ctx.n), None


_take_along.register_autograd(_backward, setup_context=_setup)
