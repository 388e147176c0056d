"""The leaf-MLP fast feedforward layer: a tree of single-neuron nodes routing to small leaf MLPs.

Implements Belcak & Wattenhofer, "Fast Feedforward Networks" (arXiv 2308.14711), with the load
balancing and master leaf of the eFFF paper (arXiv 2405.16836). docs/methods.md §1 and §3 give the formulas.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .activations import activation_fn, activation_module, activation_name
from .block import BlockOutput, FeedForwardBlock
from .config import ACTIVATIONS, FFFConfig
from .leaves import LeafBank, MasterLeaf
from .losses import warn_nonfinite
from .ops import inference
from .router import TreeRouter, move_legacy_keys


class FFF(FeedForwardBlock):
    """Fast feedforward tree: nodes are a hierarchical gate, leaves are experts.

    Contract: ``forward(x [..., d_model]) -> BlockOutput(output [..., d_out], aux_loss, losses, stats)``.
    The caller adds ``aux_loss`` (hardening and load balancing, weighted by the config) to its loss.

    Training, by ``config.train_mode``:
    - ``soft``: every leaf runs and the outputs are mixed by the leaves' path probabilities (the paper's
      training forward; the cost of a dense layer of the training width).
    - ``hard``: each token descends to one leaf, which alone runs; its output is scaled by the path
      probability so that the nodes receive gradients. This is exactly the eval function.
    Eval always descends: D node neurons and one leaf per token. A soft-trained tree is evaluated as the
    paper does, with the leaf output unscaled; a hard-trained one with the same path-probability scale
    as in training. Unlike ``fastfeedforward`` 0.2.1, eval keeps the leaves' output bias.

    With ``master_leaf`` the output is ``sigmoid(k) * tree(x) + (1 - sigmoid(k)) * M(x)``, M an always-on
    MLP and k a learned scalar (eFFF). With ``n_trees`` K > 1 the layer is a forest: K independent trees, each
    token descending each of them, the K leaves' outputs summed (UltraFastBERT's ``parallel_size``).

    Parts: ``router`` (:class:`~fff_moe_plugin.router.TreeRouter`, the nodes), ``leaves``
    (:class:`~fff_moe_plugin.leaves.LeafBank`, the L leaf MLPs) and ``master``
    (:class:`~fff_moe_plugin.leaves.MasterLeaf`, or None).
    """

    config_class = FFFConfig

    def __init__(self, config: FFFConfig):
        super().__init__(config)
        c = config
        self.act = activation_fn(c.activation)
        # registered in this order, which is the order of the parameters (and of optimizer states)
        self.router = TreeRouter(c)  # node_weight [N, d], node_bias [N]
        self.leaves = LeafBank(c.total_leaves, c.d_model, c.leaf_width, c.d_out, c.activation, c.bias,
                               c.leaf_dropout)  # a forest's trees' leaves one after the other
        self.master = (MasterLeaf(c.d_model, c.master_leaf_width, c.d_out, c.activation, c.bias, c.leaf_dropout)
                       if c.master_leaf else None)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        move_legacy_keys(state_dict, prefix)  # state dicts written before the router, leaves and master modules
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # -- forward -------------------------------------------------------------------------------------
    def forward(self, x: Tensor) -> BlockOutput:
        # S tokens, d model width, N nodes, L leaves, l leaf width, o output width, D depth
        c = self.config
        lead = x.shape[:-1]
        x = self._flatten_input(x)  # [S, d]
        # eval on the compiled descent and grouped leaf kernels (ops/inference.py) where they apply; same function
        kernels = not self.training and inference.kernels_apply(x, *self.parameters())
        routing = self.router(x, kernels=kernels)
        if routing.soft:  # every leaf of every tree, mixed by each tree's leaf probabilities
            y = self.leaves.mixture(x, routing.leaf_log_probs.exp().reshape(x.shape[0], c.total_leaves))
        elif kernels:  # each tree's leaves on the grouped leaf kernel, the trees' outputs summed
            w, S, K, L = self.leaves, x.shape[0], c.n_trees, c.n_leaves
            leaf, gate = routing.leaf.view(S, K), routing.gate.view(S, K)
            y = None
            for k in range(K):
                t = slice(k * L, (k + 1) * L)
                part = inference.leaf_mlp(x, leaf[:, k], gate[:, k], w.w1[t], None if w.b1 is None else w.b1[t],
                                          w.w2[t], None if w.b2 is None else w.b2[t], c.activation)
                y = part if y is None else y + part
        else:
            token, leaf = self.router.assignments(routing)  # a forest: one leaf per token in each tree, summed
            y = self.leaves(x, leaf, routing.gate, token)  # [S, o]
        if self.master is not None:
            y = self.master.blend(x, y)  # [S, o]

        stats = self.router.stats(routing)
        warn_nonfinite(self, stats, type(self).__name__)
        stats["master_gate"] = self.master.share() if self.master is not None else self.zero() + 1.0
        aux, losses = self.router.losses(routing)
        return BlockOutput(y.reshape(*lead, c.d_out), aux, losses, stats)

    # -- interop with the reference package ----------------------------------------------------------
    @classmethod
    def from_fastfeedforward(cls, ref: nn.Module, **overrides) -> FFF:
        """An FFF with the weights of a ``fastfeedforward.FFF`` (0.2.1) module.

        The activation, region leak, dropout and shape are read from ``ref``; ``overrides`` sets any other
        FFFConfig field (e.g. ``hardening=0.1``). ``train_hardened=True`` has no counterpart and is refused.
        """
        if getattr(ref, "train_hardened", False):
            raise ValueError("fastfeedforward.FFF(train_hardened=True) has no counterpart; use train_mode='hard'")
        act = activation_name(ref.activation)
        if act is None:
            raise ValueError(
                f"activation {ref.activation!r} of the reference has no counterpart; supported: "
                f"{', '.join(repr(activation_module(n)) for n in ACTIVATIONS)}"
            )
        values = dict(
            d_model=ref.input_width, leaf_width=ref.leaf_width, depth=int(ref.depth), d_out=ref.output_width,
            activation=act, region_leak=float(ref.region_leak), leaf_dropout=float(ref.dropout),
        )
        values.update(overrides)
        layer = cls(FFFConfig.from_dict(values))
        with torch.no_grad():
            layer.router.node_weight.copy_(ref.node_weights)
            layer.router.node_bias.copy_(ref.node_biases.view(-1))
            layer.leaves.w1.copy_(ref.w1s)
            layer.leaves.b1.copy_(ref.b1s)
            layer.leaves.w2.copy_(ref.w2s)
            layer.leaves.b2.copy_(ref.b2s)
        return layer.to(ref.w1s.dtype)

    def to_fastfeedforward(self) -> nn.Module:
        """A ``fastfeedforward.FFF`` with this layer's tree weights (needs ``pip install fastfeedforward``).

        Only plain trees convert: no master leaf, with biases. The reference's eval path drops the leaves'
        output bias, so its eval output differs from ours by ``b2`` of the chosen leaf.
        """
        try:
            import fastfeedforward
        except ImportError as e:
            raise ImportError(
                "to_fastfeedforward needs the reference package: pip install fastfeedforward==0.2.1"
            ) from e
        c = self.config
        if c.master_leaf or not c.bias:
            raise ValueError("only an FFF without master leaf and with biases has a fastfeedforward counterpart")
        ref = fastfeedforward.FFF(c.d_model, c.leaf_width, c.d_out, c.depth, activation=activation_module(c.activation),
                                  dropout=c.leaf_dropout, region_leak=c.region_leak)
        with torch.no_grad():
            ref.node_weights.copy_(self.router.node_weight)
            ref.node_biases.copy_(self.router.node_bias.view(-1, 1))
            ref.w1s.copy_(self.leaves.w1)
            ref.b1s.copy_(self.leaves.b1)
            ref.w2s.copy_(self.leaves.w2)
            ref.b2s.copy_(self.leaves.b2)
        return ref
