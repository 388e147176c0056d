"""The tree router: an FFF's nodes as one module, deciding for each token the leaf it reaches.

:class:`TreeRouter` owns the node weights and biases, routes (soft or hard, docs/methods.md §1) and
returns one :class:`Routing` record; it also owns the routing losses (§3) and statistics. Every layer that
routes through a tree holds one: the core :class:`~fff_moe_plugin.fff.FFF`, DeepSpeed's
:class:`~fff_moe_plugin.integrations.deepspeed.gate.TreeGate` and Tutel's
:class:`~fff_moe_plugin.integrations.tutel.gate.TutelTreeGate` (fairseq's sharded block holds one of those).
So all of them decide with the same arithmetic, to the last bit, and train the same objective.

Axes: S tokens, d model width, N nodes, L leaves, D depth.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
from torch import Tensor, nn

from . import tree
from .config import FFFConfig
from .losses import tree_losses, tree_stats
from .ops import inference


class Routing(NamedTuple):
    """What a tree router decided for S tokens.

    path_nodes:      [S, D] heap index of the node visited on each level.
    path_logits:     [S, D] their logits (after region leak), differentiable.
    leaf:            [S] the leaf the hard descent reaches.
    gate:            [S] weight of that leaf's output in the hard forward: its path probability, or 1 for a
                     soft-trained tree in eval (docs/methods.md §1).
    all_logits:      [S, N] every node's logit (after region leak) where the descent computed them (soft
                     training, small trees, leaf balancing), else None.
    leaf_log_probs:  [S, L] log path probability of every leaf in soft training (they weight the mixture), else
                     None.
    balance_logits:  [S, N] every node's logit without region leak, for the leaf balancing loss in hard
                     training, else None.
    """

    path_nodes: Tensor
    path_logits: Tensor
    leaf: Tensor
    gate: Tensor
    all_logits: Optional[Tensor] = None
    leaf_log_probs: Optional[Tensor] = None
    balance_logits: Optional[Tensor] = None

    @property
    def soft(self) -> bool:
        """Whether this is a soft-training routing (every leaf runs, mixed by its path probability)."""
        return self.leaf_log_probs is not None

    def select(self, mask: Tensor) -> Routing:
        """The routing of the tokens where ``mask`` [S] (bool) is true."""
        return Routing(*(None if t is None else t[mask] for t in self))


class TreeRouter(nn.Module):
    """The nodes of a depth-D tree: ``node_weight`` [N, d] and ``node_bias`` [N] (docs/methods.md §1).

    Contract: ``forward(x [S, d]) -> Routing``. In training with ``train_mode="soft"`` every node's logit is
    computed and the leaves' path probabilities are returned for the mixture; otherwise each token descends to
    one leaf (hard routing), computing only the visited nodes' logits on deep trees. Decisions are made in
    float32 at least, whatever autocast says. :meth:`losses` gives the config's weighted auxiliary loss and its
    unweighted terms, :meth:`stats` the detached routing statistics.
    """

    def __init__(self, config: FFFConfig):
        super().__init__()
        if not isinstance(config, FFFConfig):
            raise TypeError(f"TreeRouter takes an FFFConfig, got {type(config).__name__}")
        self.config = config
        N, d = config.n_nodes, config.d_model
        # nn.Linear's default init, as fastfeedforward uses: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
        k = 1.0 / math.sqrt(d)
        self.node_weight = nn.Parameter(torch.empty(N, d).uniform_(-k, k))  # [N, d]
        self.node_bias = nn.Parameter(torch.empty(N).uniform_(-k, k)) if config.bias else None  # [N]

    def node_logits(self, x: Tensor) -> Tensor:
        """Every node's logit for every token: [S, d] -> [S, N], in float32 at least."""
        return tree.decision_linear(x, self.node_weight, self.node_bias)

    def forward(self, x: Tensor, kernels: bool = False) -> Routing:
        """Route ``x`` [S, d]. With ``kernels`` (eval on CPU, see ``ops/inference.py``) the hard descent runs on
        the compiled descent kernel, which computes the same function."""
        c = self.config
        if self.training and c.train_mode == "soft":
            logits = tree.leak(self.node_logits(x), c.region_leak)  # [S, N]
            log_p = tree.leaf_log_probs(logits, c.depth)  # [S, L]
            path_nodes, end = tree.descend_from_logits(logits, c.depth)  # [S, D], [S]
            path_logits = tree.take_along(logits, path_nodes)  # [S, D]
            return Routing(path_nodes, path_logits, end - c.n_nodes, self.leaf_gate(path_logits), logits, log_p)
        if kernels:
            path_nodes, path_logits, end = inference.descend(x, self.node_weight, self.node_bias, c.depth)
            return Routing(path_nodes, path_logits, end - c.n_nodes, self.leaf_gate(path_logits))
        leak = c.region_leak if self.training else 0.0
        every = self.training and c.load_balance == "leaf"  # the leaf balancing loss needs every node's logit
        path_nodes, path_logits, end, all_logits = tree.route(  # [S, D], [S, D], [S], [S, N] or None
            x, self.node_weight, self.node_bias, c.depth, leak_rate=leak, every_logit=every)
        balance = None
        if every:  # the descent's own logits when they carry no leak, else computed again without it
            balance = all_logits if leak == 0 else self.node_logits(x)
        return Routing(path_nodes, path_logits, end - c.n_nodes, self.leaf_gate(path_logits), all_logits,
                       None, balance)

    def leaf_gate(self, path_logits: Tensor) -> Tensor:
        """Weight of the chosen leaf's output in the hard forward: its path probability, or 1 for soft-trained
        trees in eval (the paper evaluates them unscaled)."""
        if self.config.train_mode == "soft" and not self.training:
            return path_logits.new_ones(path_logits.shape[0])
        right = path_logits >= 0
        return tree.path_log_prob(path_logits, right).exp()

    def losses(self, routing: Routing) -> tuple[Tensor, dict[str, Tensor]]:
        """``(weighted aux loss, unweighted {"hardening", "load_balance"})`` of a training routing (float32
        scalars); zeros in eval. With hardening weight 0 its term only reports: detached from the graph."""
        c = self.config
        if not self.training:
            zero = torch.zeros((), dtype=torch.float32, device=routing.path_logits.device)
            return zero, {"hardening": zero, "load_balance": zero}
        harden_on = routing.all_logits if routing.soft else routing.path_logits
        if c.hardening == 0:
            harden_on = harden_on.detach()
        leaf_p = routing.leaf_log_probs.exp() if routing.soft else None  # [S, L]
        return tree_losses(c, routing.path_nodes, routing.path_logits, routing.leaf, harden_on=harden_on,
                           leaf_probs=leaf_p, all_logits=routing.balance_logits)

    def stats(self, routing: Routing) -> dict[str, Tensor]:
        """Detached statistics: ``counts`` per leaf, ``unused_leaves``, ``decision_entropy``, ``nonfinite_tokens``."""
        return tree_stats(self.config, routing.leaf, routing.path_logits)

    def extra_repr(self) -> str:
        c = self.config
        return f"d_model={c.d_model}, depth={c.depth}, nodes={c.n_nodes}, bias={c.bias}"


# The names that layers holding a tree gave their parameters before the tree had its router, leaves and master-leaf
# modules, and today's. The core FFF, DeepSpeed's TreeGate and FFFMoE, Tutel's gate and TutelFFF kept the nodes as
# ``node_weight`` / ``node_bias``, the core FFF its leaves as ``leaf_w1`` ... ``leaf_b2``, and the master leaf as
# ``master_w1`` ... ``master_b2`` (or as a ``master`` module) with its blend logit ``master_gate`` of shape [] or
# [1]. Today they are ``router.node_weight``, ``leaves.{w1, b1, w2, b2}`` and ``master.{w1, b1, w2, b2, gate}``
# (``gate`` of shape [1]).
LEGACY_NAMES: dict[str, str] = {
    "node_weight": "router.node_weight", "node_bias": "router.node_bias", "master_gate": "master.gate",
    **{f"master_{p}": f"master.{p}" for p in ("w1", "b1", "w2", "b2")},
    **{f"leaf_{p}": f"leaves.{p}" for p in ("w1", "b1", "w2", "b2")},
}


def current_key(key: str) -> str:
    """Today's name of a state-dict key that may have been written before the router and master-leaf modules."""
    head, _, last = key.rpartition(".")
    new = LEGACY_NAMES.get(last)
    if new is None or (last.startswith("node_") and head.rpartition(".")[2] == "router"):
        return key
    return f"{head}.{new}" if head else new


def move_legacy_keys(state_dict: dict, prefix: str) -> None:
    """Load-state-dict pre-hook helper: move the keys ``<prefix><old name>`` of :data:`LEGACY_NAMES` to today's
    names, in place (the blend logit reshaped to [1])."""
    for old, new in LEGACY_NAMES.items():
        if prefix + old in state_dict and prefix + new not in state_dict:
            value = state_dict.pop(prefix + old)
            state_dict[prefix + new] = value.reshape(1) if old == "master_gate" and torch.is_tensor(value) else value
