"""One call to turn a trained model's FFF layers into their fast inference form.

:func:`to_fast_eval` walks any ``nn.Module`` (a bare layer, a model built from the package's blocks, a
fairseq or DeepSpeed model that contains them), puts it in eval mode, freezes its parameters and turns
each :class:`~fff_moe_plugin.FFF` into a :class:`FastFFF` and each :class:`~fff_moe_plugin.UltraFastFFF`
into a :class:`FastUltraFastFFF`. These are subclasses that keep the parameters, the state-dict keys and
``forward`` (which in eval already runs the compiled kernels), and add :meth:`infer`: the whole eval
forward in one compiled call (descent, path-probability gate, leaf MLP), returning the output tensor
without the routing statistics. Frozen parameters let the kernels run without ``torch.no_grad()``;
``model.train()`` followed by ``requires_grad_(True)`` undoes the conversion's effect.
"""

from __future__ import annotations

from torch import Tensor, nn

from .fff import FFF
from .ops import inference
from .ultrafast import UltraFastFFF


class FastFFF(FFF):
    """A leaf-MLP FFF in fast inference form (see :func:`to_fast_eval`); ``forward`` is unchanged.

    ``infer(x [..., d_model]) -> [..., d_out]`` equals ``forward(x).output`` in eval: the chosen leaf's
    output is scaled by its path probability for a hard-trained tree and unscaled for a soft-trained one (the
    rule of :meth:`fff_moe_plugin.router.TreeRouter.leaf_gate`), and the master leaf is blended in when the
    layer has one.
    """

    def infer(self, x: Tensor) -> Tensor:
        # S tokens, d model width, o output width
        # Parameters are read from _parameters directly: nn.Module.__getattr__ would cost a microsecond each,
        # which matters when one token takes a few microseconds.
        c, m = self.config, self._modules
        if c.bias_balancing or c.n_trees > 1:  # the layer's own eval forward: shifted decisions, or a forest
            return self(x).output
        r, p = m["router"]._parameters, m["leaves"]._parameters
        x2 = _flat(x, p["w1"], type(self).__name__)  # [S, d]
        gated = c.train_mode != "soft"  # TreeRouter.leaf_gate in eval: path probability unless soft-trained
        y, _, _ = inference.fff_infer(
            x2, r["node_weight"], r.get("node_bias"), p["w1"], p.get("b1"), p["w2"], p.get("b2"),
            c.depth, c.activation, gated,
        )  # [S, o]
        if c.master_leaf:
            y = self.master.blend(x2, y)
        return y if x.dim() == 2 else y.reshape(*x.shape[:-1], c.d_out)


class FastUltraFastFFF(UltraFastFFF):
    """A path-neuron FFF in fast inference form (see :func:`to_fast_eval`); ``forward`` is unchanged.

    ``infer(x [..., d_model]) -> [..., d_out]`` equals ``forward(x).output`` in eval.
    """

    def infer(self, x: Tensor) -> Tensor:
        # S tokens, d model width, o output width
        c, p = self.config, self._parameters
        if c.n_trees > 1:  # a forest: the layer's own eval forward
            return self(x).output
        x2 = _flat(x, p["neuron_in"], type(self).__name__)  # [S, d]
        y, _ = inference.path_neuron(
            x2, p["neuron_in"], p.get("neuron_bias"), p["neuron_out"], p.get("output_bias"), c.depth + 1, c.activation
        )  # [S, o]
        return y if x.dim() == 2 else y.reshape(*x.shape[:-1], c.d_out)


def _flat(x: Tensor, weight: Tensor, owner: str) -> Tensor:
    """``x`` as [S, d], or a ValueError naming the expected width or dtype (``weight``'s d and dtype)."""
    d = weight.shape[-2] if weight.dim() == 3 else weight.shape[-1]
    if x.dim() == 0 or x.shape[-1] != d:
        raise ValueError(f"{owner} expects inputs of shape [..., {d}] (d_model={d}), got {tuple(x.shape)}")
    if x.dtype != weight.dtype:
        raise ValueError(f"{owner}: input dtype {x.dtype} differs from the parameters' {weight.dtype}")
    return x if x.dim() == 2 else x.reshape(-1, d)


_FAST = {FFF: FastFFF, UltraFastFFF: FastUltraFastFFF}


def to_fast_eval(model: nn.Module, freeze: bool = True) -> nn.Module:
    """Convert ``model`` in place to its fast eval form and return it.

    Every FFF / UltraFastFFF inside (``model`` itself included) gains ``infer``; the model is put in eval mode
    and, with ``freeze``, its parameters stop requiring gradients so that the compiled kernels run even
    outside ``torch.no_grad()``. Parameters are made contiguous once here rather than on every call. A
    module of a subclass of the layers (other than the fast forms) is refused with a ValueError, since its
    overrides would be lost.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"to_fast_eval takes an nn.Module, got {type(model).__name__}")
    for name, module in model.named_modules():
        if isinstance(module, (FastFFF, FastUltraFastFFF)):
            continue
        base = type(module)
        if base in _FAST:
            module.__class__ = _FAST[base]  # same parameters and state-dict keys, one more method
            for p in module.parameters():
                if not p.is_contiguous():
                    p.data = p.data.contiguous()
        elif isinstance(module, (FFF, UltraFastFFF)):
            raise ValueError(
                f"{name or 'model'} is a {base.__name__}, a subclass of {base.__mro__[1].__name__} that "
                "to_fast_eval cannot convert without dropping its overrides"
            )
    model.eval()
    if freeze:
        model.requires_grad_(False)
    inference.ops()  # build or load the kernels now rather than on the first batch
    return model
