"""The leaf-MLP fast feedforward layer: a tree of single-neuron nodes routing to small leaf MLPs.

Implements Belcak & Wattenhofer, "Fast Feedforward Networks" (arXiv 2308.14711), with the load
balancing and master leaf of the eFFF paper (arXiv 2405.16836). docs/methods.md §1 and §3 give the formulas.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import tree
from .activations import activation_fn, activation_module, activation_name
from .block import BlockOutput, FeedForwardBlock
from .config import ACTIVATIONS, FFFConfig
from .losses import tree_losses, tree_stats, warn_nonfinite
from .ops import inference
from .ops.grouped import grouped_mlp


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
    MLP and k a learned scalar (eFFF).
    """

    config_class = FFFConfig

    def __init__(self, config: FFFConfig):
        super().__init__(config)
        c = config
        d, l, o, N, L = c.d_model, c.leaf_width, c.d_out, c.n_nodes, c.n_leaves
        self.act = activation_fn(c.activation)
        # nn.Linear's default init, as fastfeedforward uses: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
        k1, k2 = 1.0 / math.sqrt(d), 1.0 / math.sqrt(l)
        self.node_weight = nn.Parameter(torch.empty(N, d).uniform_(-k1, k1))  # [N, d]
        self.node_bias = nn.Parameter(torch.empty(N).uniform_(-k1, k1)) if c.bias else None  # [N]
        self.leaf_w1 = nn.Parameter(torch.empty(L, d, l).uniform_(-k1, k1))  # [L, d, l]
        self.leaf_b1 = nn.Parameter(torch.empty(L, l).uniform_(-k1, k1)) if c.bias else None  # [L, l]
        self.leaf_w2 = nn.Parameter(torch.empty(L, l, o).uniform_(-k2, k2))  # [L, l, o]
        self.leaf_b2 = nn.Parameter(torch.empty(L, o).uniform_(-k2, k2)) if c.bias else None  # [L, o]
        if c.master_leaf:
            m = c.master_leaf_width
            km = 1.0 / math.sqrt(m)
            self.master_w1 = nn.Parameter(torch.empty(d, m).uniform_(-k1, k1))
            self.master_b1 = nn.Parameter(torch.empty(m).uniform_(-k1, k1)) if c.bias else None
            self.master_w2 = nn.Parameter(torch.empty(m, o).uniform_(-km, km))
            self.master_b2 = nn.Parameter(torch.empty(o).uniform_(-km, km)) if c.bias else None
            # blend logit k: sigmoid(0) = 1/2 starts tree and master leaf on an equal footing
            self.master_gate = nn.Parameter(torch.zeros(()))

    # -- pieces shared with the integrations --------------------------------------------------------
    def node_logits(self, x: Tensor) -> Tensor:
        """Logits of every node for every token: [S, d] -> [S, N]."""
        return tree.decision_linear(x, self.node_weight, self.node_bias)

    def route(self, x: Tensor, leak_rate: float = 0.0) -> tuple[Tensor, Tensor, Tensor, Optional[Tensor]]:
        """Hard descent (:func:`fff_moe_plugin.tree.route`): path nodes [S, D], path logits [S, D], leaf [S],
        and every node's logit [S, N] where the descent computed them (small trees), else None."""
        nodes, logits, end, all_logits = tree.route(x, self.node_weight, self.node_bias, self.config.depth,
                                                    leak_rate=leak_rate, every_logit=self.needs_every_logit())
        return nodes, logits, end - self.config.n_nodes, all_logits

    def descend(self, x: Tensor, leak_rate: float = 0.0) -> tuple[Tensor, Tensor, Tensor]:
        """Hard descent: (path nodes [S, D], path logits [S, D], leaf [S])."""
        return self.route(x, leak_rate)[:3]

    def needs_every_logit(self) -> bool:
        """Whether this training step needs every node's logit (the leaf balancing loss), so routing computes
        them in one GEMM whatever the depth."""
        return self.training and self.config.load_balance == "leaf"

    def balance_logits(self, x: Tensor, routed: Optional[Tensor], leak_rate: float) -> Optional[Tensor]:
        """Every node's logit [S, N], without region leak, for the leaf balancing loss (None when it is off);
        the descent's own ``routed`` logits when it computed them with no leak."""
        if self.config.load_balance != "leaf":
            return None
        return routed if routed is not None and leak_rate == 0 else self.node_logits(x)

    def leaf_gate(self, path_logits: Tensor) -> Tensor:
        """Weight of the chosen leaf's output in the hard forward: its path probability, or 1 for soft trees."""
        if self.config.train_mode == "soft" and not self.training:
            return path_logits.new_ones(path_logits.shape[0])
        right = path_logits >= 0
        return tree.path_log_prob(path_logits, right).exp()

    def leaves(self, x: Tensor, leaf: Tensor, gate: Tensor) -> Tensor:
        """Run each token's leaf, scaled by ``gate``: [S, d], [S], [S] -> [S, o]."""
        return grouped_mlp(
            x, None, leaf, gate, self.leaf_w1, self.leaf_b1, self.leaf_w2, self.leaf_b2,
            self.act, self.config.leaf_dropout, self.training,
        )

    def master(self, x: Tensor, tree_out: Tensor) -> Tensor:
        """Blend the tree's output with the master leaf (identity without one)."""
        if not self.config.master_leaf:
            return tree_out
        h = x @ self.master_w1
        if self.master_b1 is not None:
            h = h + self.master_b1.to(h.dtype)  # .to: under autocast h is bfloat16
        m = F.dropout(self.act(h), self.config.leaf_dropout, self.training) @ self.master_w2
        if self.master_b2 is not None:
            m = m + self.master_b2.to(m.dtype)
        g = torch.sigmoid(self.master_gate).to(m.dtype)
        return g * tree_out + (1 - g) * m

    # -- forward -------------------------------------------------------------------------------------
    def forward(self, x: Tensor) -> BlockOutput:
        # S tokens, d model width, N nodes, L leaves, l leaf width, o output width, D depth
        lead = x.shape[:-1]
        x = self._flatten_input(x)  # [S, d]
        if self.training and self.config.train_mode == "soft":
            y, path_nodes, path_logits, leaf, leaf_p, harden_on, all_logits = self._soft(x)
        else:
            y, path_nodes, path_logits, leaf, leaf_p, harden_on, all_logits = self._hard(x)
        y = self.master(x, y)  # [S, o]

        c = self.config
        zero = self.zero()
        stats = tree_stats(c, leaf, path_logits)
        warn_nonfinite(self, stats, type(self).__name__)
        stats["master_gate"] = torch.sigmoid(self.master_gate.detach().float()) if c.master_leaf else zero + 1.0
        if not self.training:
            losses = {"hardening": zero, "load_balance": zero}
            return BlockOutput(y.reshape(*lead, c.d_out), zero, losses, stats)
        aux, losses = tree_losses(
            c, path_nodes, path_logits, leaf, harden_on=harden_on, leaf_probs=leaf_p, all_logits=all_logits
        )
        return BlockOutput(y.reshape(*lead, c.d_out), aux, losses, stats)

    def _soft(self, x: Tensor):
        c = self.config
        logits = tree.leak(self.node_logits(x), c.region_leak)  # [S, N]
        leaf_p = tree.leaf_probs(logits, c.depth)  # [S, L]
        path_nodes, end = tree.descend_from_logits(logits, c.depth)  # [S, D], [S]
        path_logits = tree.take_along(logits, path_nodes)  # [S, D]
        S, L, l = x.shape[0], c.n_leaves, c.leaf_width
        # every leaf at once, as one dense layer of the training width L * l
        h = x @ self.leaf_w1.permute(1, 0, 2).reshape(c.d_model, L * l)  # [S, L*l]
        if self.leaf_b1 is not None:
            h = h + self.leaf_b1.reshape(L * l).to(h.dtype)  # .to: under autocast h is bfloat16
        h = F.dropout(self.act(h), c.leaf_dropout, self.training).view(S, L, l)
        # fold the mixture weights into the hidden units: sum_j c_j (h_j W2_j + b2_j)
        mixed = (h * leaf_p.to(h.dtype)[:, :, None]).reshape(S, L * l)  # [S, L*l]
        y = mixed @ self.leaf_w2.reshape(L * l, c.d_out)  # [S, o]
        if self.leaf_b2 is not None:
            y = y + leaf_p.to(h.dtype) @ self.leaf_b2
        return y, path_nodes, path_logits, end - c.n_nodes, leaf_p, logits, None

    def _hard(self, x: Tensor):
        if not self.training and inference.kernels_apply(x, *self.parameters()):
            # eval on the compiled descent and grouped leaf kernels (ops/inference.py); same function
            path_nodes, path_logits, end = inference.descend(x, self.node_weight, self.node_bias, self.config.depth)
            leaf = end - self.config.n_nodes
            w = (self.leaf_w1, self.leaf_b1, self.leaf_w2, self.leaf_b2)
            y = inference.leaf_mlp(x, leaf, self.leaf_gate(path_logits), *w, self.config.activation)
            return y, path_nodes, path_logits, leaf, None, path_logits, None
        leak = self.config.region_leak if self.training else 0.0
        path_nodes, path_logits, leaf, routed = self.route(x, leak)
        y = self.leaves(x, leaf, self.leaf_gate(path_logits))
        # hard mode mixes no leaves; the leaf balancing loss needs every node's logit
        all_logits = self.balance_logits(x, routed, leak) if self.training else None
        return y, path_nodes, path_logits, leaf, None, path_logits, all_logits

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
            layer.node_weight.copy_(ref.node_weights)
            layer.node_bias.copy_(ref.node_biases.view(-1))
            layer.leaf_w1.copy_(ref.w1s)
            layer.leaf_b1.copy_(ref.b1s)
            layer.leaf_w2.copy_(ref.w2s)
            layer.leaf_b2.copy_(ref.b2s)
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
            ref.node_weights.copy_(self.node_weight)
            ref.node_biases.copy_(self.node_bias.view(-1, 1))
            ref.w1s.copy_(self.leaf_w1)
            ref.b1s.copy_(self.leaf_b1)
            ref.w2s.copy_(self.leaf_w2)
            ref.b2s.copy_(self.leaf_b2)
        return ref
