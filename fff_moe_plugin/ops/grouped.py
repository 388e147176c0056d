"""Run a bank of small MLPs on the tokens routed to each of them.

Shared by the FFF hard path (one leaf per token) and sigma-MoE (top-K experts per token). Tokens are
sorted by expert once; each of the two layers of the experts is then one grouped matrix product over all
experts (``torch.nn.functional.grouped_mm``, the kernel torchtitan and DeepSpeed's AutoEP compute experts
with), and the outputs are summed back to their tokens with one ``index_add``. The cost is that of the
selected experts only; it is differentiable with respect to inputs, weights and gates; and this code never reads
a tensor's values on the host, so ``torch.compile`` captures it whole. (On CUDA, torch fuses grouped_mm for
bfloat16 on sm90 and newer; other dtypes and GPUs run torch's own fallback, which copies the group offsets to the
host once per call.)

``grouped_mm`` is used where it is supported and correct: float32, bfloat16 and float16, rows whose byte
widths are multiples of 16 (narrower or odd widths are zero-padded to that), on a device where a probe call
succeeded. Its traps are handled here: a broadcast (stride-0) incoming gradient is made contiguous before
the backward kernels see it; every output row belongs to a group (the offsets end at the row count); no
``out_dtype`` is asked for; and the call is a ``torch.library`` custom op with its own shape function and
backward, so ``torch.compile`` traces float32 too (grouped_mm's own meta function accepts bfloat16 only).
float64, and devices without grouped_mm, run the per-expert loop (:func:`grouped_mlp_loop`), which reads
the group sizes on the host; inside ``torch.compile`` they run :func:`grouped_mlp_masked` instead, which reads
nothing on the host at E times the cost.

Axes: S tokens, A assignments (token, expert, gate), E experts, d input, h hidden, o output.
"""

from __future__ import annotations

import os
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

_GROUPED_MM = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)
_GROUPED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_ALIGN_BYTES = 16  # grouped_mm asks every stride to be a multiple of 16 bytes
_probed: dict[tuple[str, torch.dtype], bool] = {}  # (device, dtype) -> grouped_mm runs and is right

# which implementation the last call of grouped_mlp took ("grouped", "loop" or "masked"), for tests and benchmarks
last_path: Optional[str] = None


# -- grouped_mm as custom ops: one shape function and one backward for every dtype ------------------------
@torch.library.custom_op("fff_moe_grouped::mm", mutates_args=())
def _grouped_mm(a: Tensor, b: Tensor, offs: Tensor) -> Tensor:
    """``[A, k] x [E, k, n] -> [A, n]``: rows ``offs[e-1]:offs[e]`` of ``a`` times ``b[e]``."""
    return _GROUPED_MM(a, b, offs=offs)


@_grouped_mm.register_fake
def _(a, b, offs):
    return a.new_empty(a.shape[0], b.shape[-1])


@torch.library.custom_op("fff_moe_grouped::mm_k", mutates_args=())
def _grouped_mm_k(a_t: Tensor, g: Tensor, offs: Tensor) -> Tensor:
    """``[k, A] x [A, n] -> [E, k, n]``: group e sums over rows ``offs[e-1]:offs[e]`` (the weight gradient)."""
    return _GROUPED_MM(a_t, g, offs=offs)


@_grouped_mm_k.register_fake
def _(a_t, g, offs):
    return a_t.new_empty(offs.shape[0], a_t.shape[0], g.shape[1])


def _mm_setup(ctx, inputs, output) -> None:
    a, b, offs = inputs
    ctx.save_for_backward(a, b, offs)


def _mm_backward(ctx, grad: Tensor):
    a, b, offs = ctx.saved_tensors
    # trap 1: grouped_mm's kernels refuse a broadcast (stride-0) gradient such as y.sum()'s
    grad = grad.contiguous()
    grad_a = _grouped_mm(grad, b.transpose(-1, -2), offs) if ctx.needs_input_grad[0] else None
    grad_b = _grouped_mm_k(a.t(), grad, offs) if ctx.needs_input_grad[1] else None
    return grad_a, grad_b, None


_grouped_mm.register_autograd(_mm_backward, setup_context=_mm_setup)


def _pad_to(t: Tensor, dim: int, multiple: int) -> Tensor:
    pad = -t.shape[dim] % multiple
    if pad == 0:
        return t
    widths = [0, 0] * (t.dim() - 1 - dim % t.dim()) + [0, pad]
    return F.pad(t, widths)


def grouped_mm_available(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether grouped_mm runs for ``dtype`` on ``device`` (probed once per pair: a CUDA device may lack a kernel
    for a dtype that the CPU has). ``FFF_MOE_NO_GROUPED_MM=1`` turns it off everywhere."""
    if _GROUPED_MM is None or dtype not in _GROUPED_DTYPES or os.environ.get("FFF_MOE_NO_GROUPED_MM"):
        return False
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    key = (str(device), dtype)  # per device: a machine may hold GPUs of several kinds
    if key not in _probed and torch.compiler.is_compiling():
        # no probe call inside a traced graph: trust the dtype check (torch falls back to a per-group loop on
        # CUDA devices without a fused kernel); an eager call before compiling probes for real
        return True
    if key not in _probed:
        try:
            a = torch.ones(8, 8, device=device, dtype=dtype)
            b = torch.ones(2, 8, 8, device=device, dtype=dtype)
            out = _GROUPED_MM(a, b, offs=torch.tensor([3, 8], device=device, dtype=torch.int32))
            _probed[key] = bool(torch.all(out == 8).item())
        except (RuntimeError, NotImplementedError):
            _probed[key] = False
    return _probed[key]


def grouped_mlp(
    x: Tensor,
    token: Tensor | None,
    expert: Tensor,
    gate: Tensor | None,
    w1: Tensor,
    b1: Tensor | None,
    w2: Tensor,
    b2: Tensor | None,
    act: Callable[[Tensor], Tensor],
    dropout: float = 0.0,
    training: bool = False,
) -> Tensor:
    """``out[t] = sum over assignments a with token[a] = t of gate[a] * MLP_{expert[a]}(x[t])``.

    x: [S, d]; token, expert: [A] long; gate: [A] or None (all ones); w1: [E, d, h]; b1: [E, h];
    w2: [E, h, o]; b2: [E, o].  Returns [S, o]; tokens without an assignment get zeros. ``token`` None means
    ``arange(S)``: one assignment per token, in token order (the FFF tree), which saves a scatter each way.
    """
    global last_path
    if torch.is_autocast_enabled(x.device.type):
        # the custom ops are outside autocast's lists: cast here, so the experts run in the autocast dtype (the
        # gradients reach the float32 weights through the casts)
        dt = torch.get_autocast_dtype(x.device.type)
        x, w1, w2 = x.to(dt), w1.to(dt), w2.to(dt)
        b1 = b1.to(dt) if b1 is not None else None
        b2 = b2.to(dt) if b2 is not None else None
    if not (x.dtype == w1.dtype == w2.dtype and grouped_mm_available(x.device, x.dtype)):
        if token is None:
            token = torch.arange(x.shape[0], device=x.device)
        if torch.compiler.is_compiling():
            # no host reads inside a graph: every expert on every row, each row keeping its own expert's result
            last_path = "masked"
            return grouped_mlp_masked(x, token, expert, gate, w1, b1, w2, b2, act, dropout, training)
        last_path = "loop"
        return grouped_mlp_loop(x, token, expert, gate, w1, b1, w2, b2, act, dropout, training)
    last_path = "grouped"
    S, E, o = x.shape[0], w1.shape[0], w2.shape[-1]
    multiple = _ALIGN_BYTES // x.element_size()
    # zero columns leave every product unchanged; they are cut off again below
    xp, w1p = _pad_to(x, -1, multiple), _pad_to(_pad_to(w1, 1, multiple), 2, multiple)  # [S, d'], [E, d', h']
    order = torch.argsort(expert, stable=True)  # [A]
    e_sorted = expert[order]  # [A]
    # group sizes as a device tensor (scatter_add keeps the shape static, unlike bincount)
    counts = torch.zeros(E, dtype=torch.long, device=x.device).scatter_add(0, expert, torch.ones_like(expert))
    offs = counts.cumsum(0).to(torch.int32)  # [E]: the last offset is A, so every row belongs to a group
    if token is None:  # one assignment per token: sorting is a permutation, undone by its inverse
        inverse = torch.empty_like(order).scatter_(0, order, torch.arange(order.shape[0], device=order.device))
        xs = _PermuteRows.apply(xp, order, inverse)  # [A, d']
    else:
        t_sorted = token[order]
        xs = xp.index_select(0, t_sorted)
    h = _grouped_mm(xs, w1p, offs)  # [A, h']
    if b1 is not None:
        h = h + _pad_to(b1, 1, multiple).index_select(0, e_sorted)
    h = F.dropout(act(h), dropout, training)
    hidden = w2.shape[1]
    if h.shape[1] != hidden:
        h = h[:, :hidden]  # the padded columns (act(0), which need not be 0)
    g = gate[order, None].to(h.dtype) if gate is not None else None  # [A, 1]
    # gate * (h W2 + b2) = (gate * h) W2 + gate * b2: scaling the narrow hidden row costs less than the output
    # row, and b2 rides in the product as one more row of W2 against one more column of h (the gate, or 1): no
    # [A, o] gather of the biases, no extra pass over the output, forward or backward
    h = h * g if g is not None else h  # [A, h]
    if b2 is None:
        h, w2x = _pad_to(h, 1, multiple), _pad_to(_pad_to(w2, 1, multiple), 2, multiple)
    else:  # one concatenation each, the zero padding included: [A, h''], [E, h'', o]
        pad = -(hidden + 1) % multiple
        h = torch.cat([h, g if g is not None else h.new_ones(h.shape[0], 1), h.new_zeros(h.shape[0], pad)], 1)
        w2x = _pad_to(torch.cat([w2, b2[:, None, :], w2.new_zeros(E, pad, o)], 1), 2, multiple)
    y = _grouped_mm(h, w2x, offs)  # [A, o']
    if y.shape[1] != o:  # (a slice of the whole width would still cost a zero-filled copy in backward)
        y = y[:, :o]
    if token is None:
        return _PermuteRows.apply(y, inverse, order)  # [S, o]
    return x.new_zeros(S, o).index_add(0, t_sorted, y)  # [S, o]


class _PermuteRows(torch.autograd.Function):
    """``x[index]`` for a permutation ``index`` whose inverse is ``inverse``: the gradient is ``grad[inverse]``,
    one gather, where ``index_select``'s would zero a tensor and scatter-add into it."""

    @staticmethod
    def forward(x: Tensor, index: Tensor, inverse: Tensor) -> Tensor:
        return x.index_select(0, index)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.save_for_backward(inputs[2])

    @staticmethod
    def backward(ctx, grad: Tensor):
        (inverse,) = ctx.saved_tensors
        return grad.index_select(0, inverse), None, None


def _expert(xe: Tensor, e: int, w1: Tensor, b1: Tensor | None, w2: Tensor, b2: Tensor | None,
            act: Callable[[Tensor], Tensor], dropout: float, training: bool) -> Tensor:
    """Expert ``e``'s MLP on rows ``xe`` [n, d] -> [n, o] (the loop and masked paths)."""
    h = xe @ w1[e]
    if b1 is not None:
        h = h + b1[e]
    ye = F.dropout(act(h), dropout, training) @ w2[e]
    return ye + b2[e] if b2 is not None else ye


def grouped_mlp_loop(
    x: Tensor,
    token: Tensor,
    expert: Tensor,
    gate: Tensor | None,
    w1: Tensor,
    b1: Tensor | None,
    w2: Tensor,
    b2: Tensor | None,
    act: Callable[[Tensor], Tensor],
    dropout: float = 0.0,
    training: bool = False,
) -> Tensor:
    """:func:`grouped_mlp` as one pair of matmuls per non-empty expert, in a Python loop.

    The path for float64 and for devices without grouped_mm. It reads the group sizes on the host (a device
    synchronisation), and ``torch.compile`` breaks its graph there.
    """
    S, o = x.shape[0], w2.shape[-1]
    if token.numel() == 0:
        # keep the graph connected to every input so that backward still runs, with zero gradients
        used = [t.sum() for t in (x, gate, w1, b1, w2, b2) if t is not None]
        return x.new_zeros(S, o) + 0.0 * torch.stack(used).sum().to(x.dtype)
    order = torch.argsort(expert, stable=True)  # [A]
    counts = torch.bincount(expert, minlength=w1.shape[0]).tolist()
    tok_sorted = token[order]
    gate_sorted = gate[order] if gate is not None else None
    rows, start = [], 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        ye = _expert(x.index_select(0, tok_sorted[start : start + n]), e, w1, b1, w2, b2, act, dropout, training)
        if gate_sorted is not None:
            ye = ye * gate_sorted[start : start + n, None].to(ye.dtype)
        rows.append(ye)
        start += n
    # one index_add over all groups (an out-of-place one per group would copy [S, o] each time)
    return x.new_zeros(S, o).index_add(0, tok_sorted, torch.cat(rows))


def grouped_mlp_masked(
    x: Tensor,
    token: Tensor,
    expert: Tensor,
    gate: Tensor | None,
    w1: Tensor,
    b1: Tensor | None,
    w2: Tensor,
    b2: Tensor | None,
    act: Callable[[Tensor], Tensor],
    dropout: float = 0.0,
    training: bool = False,
) -> Tensor:
    """:func:`grouped_mlp` with static shapes and no host reads, at E times the cost: each expert runs on every
    assignment and each assignment keeps its own expert's result. What ``torch.compile`` captures for dtypes
    grouped_mm lacks (float64)."""
    S, E, o = x.shape[0], w1.shape[0], w2.shape[-1]
    xa = x.index_select(0, token)  # [A, d]
    y = xa.new_zeros(token.shape[0], o)
    for e in range(E):
        y = torch.where((expert == e)[:, None], _expert(xa, e, w1, b1, w2, b2, act, dropout, training), y)
    if gate is not None:
        y = y * gate[:, None].to(y.dtype)
    return x.new_zeros(S, o).index_add(0, token, y)


def grouped_mlp_reference(
    x: Tensor,
    token: Tensor,
    expert: Tensor,
    gate: Tensor | None,
    w1: Tensor,
    b1: Tensor | None,
    w2: Tensor,
    b2: Tensor | None,
    act: Callable[[Tensor], Tensor],
) -> Tensor:
    """One assignment at a time: the definition :func:`grouped_mlp` must equal (no dropout)."""
    rows = [x.new_zeros(w2.shape[-1]) for _ in range(x.shape[0])]
    for a in range(token.numel()):
        t, e = int(token[a]), int(expert[a])
        h = x[t] @ w1[e] + (b1[e] if b1 is not None else 0)
        y = act(h) @ w2[e] + (b2[e] if b2 is not None else 0)
        rows[t] = rows[t] + (gate[a] * y if gate is not None else y)
    if not rows:
        return x.new_zeros(0, w2.shape[-1])
    return torch.stack(rows)
