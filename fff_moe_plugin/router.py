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
from typing import Any, NamedTuple, Optional

import torch
from torch import Tensor, nn

from . import tree
from .config import FFFConfig
from .losses import forest_index, tree_losses, tree_of_row, tree_stats
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
    """The nodes of a depth-D tree: ``node_weight`` [N, d] and ``node_bias`` [N] (docs/methods.md §1); of a forest
    of ``n_trees`` K such trees, one after the other: [K * N, d] and [K * N] (§6).

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
        N, d = config.total_nodes, config.d_model  # a forest's trees one after the other: tree k's node n is k*N + n
        # nn.Linear's default init, as fastfeedforward uses: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
        k = 1.0 / math.sqrt(d)
        self.node_weight = nn.Parameter(torch.empty(N, d).uniform_(-k, k))  # [N, d]
        self.node_bias = nn.Parameter(torch.empty(N).uniform_(-k, k)) if config.bias else None  # [N]
        # bias balancing (fff_moe_plugin.balancing): each node's decision shift, saved with the weights, and the
        # tokens that reached it / went right since the last update (int64 [2, N]). The counts are each rank's own:
        # a plain attribute, not a buffer, so that neither the state dict nor DDP's buffer broadcast (which would
        # overwrite them with rank 0's between micro-batches) touches them; _apply moves them with the module.
        on = config.bias_balancing
        self.register_buffer("balance_bias", torch.zeros(N) if on else None)
        self.balance_counts: Optional[Tensor] = torch.zeros(2, N, dtype=torch.long) if on else None
        # the soft-to-hard schedule: the optimizer updates done (saved with the weights), and whether training is
        # still in its soft phase (a Python bool, so that a forward never reads a device value on the host)
        scheduled = config.soft_updates > 0
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long) if scheduled else None)
        self._soft_phase = scheduled

    def set_num_updates(self, num_updates: int) -> None:
        """The optimizer updates done so far (fairseq's trainer calls this on every module after each update and
        on resume; :func:`fff_moe_plugin.balancing.after_optimizer_step` does in other loops). With ``soft_updates`` S
        the first S updates train soft, the rest hard."""
        if self.num_updates is not None:
            self.num_updates.fill_(int(num_updates))
            self._soft_phase = int(num_updates) < self.config.soft_updates

    def trains_soft(self) -> bool:
        """Whether this call routes soft: in training, for a soft tree or in the soft phase of the schedule."""
        return self.training and (self.config.train_mode == "soft" or self._soft_phase)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if self.num_updates is not None:  # the schedule resumes where the checkpoint was written
            self._soft_phase = int(self.num_updates) < self.config.soft_updates

    def _apply(self, fn, recurse=True):
        # module.to(bfloat16 / float16) casts every floating buffer; a shift moved in steps of 1e-3 needs float32
        super()._apply(fn, recurse)
        if self.balance_bias is not None:
            if self.balance_bias.dtype in (torch.float16, torch.bfloat16):
                self.balance_bias = self.balance_bias.float()
            self.balance_counts = fn(self.balance_counts)  # the device only: module.to casts floating tensors alone
        return self

    def node_logits(self, x: Tensor) -> Tensor:
        """Every node's logit for every token: [S, d] -> [S, N], in float32 at least."""
        return tree.decision_linear(x, self.node_weight, self.node_bias)

    def forward(self, x: Tensor, kernels: bool = False) -> Routing:
        """Route ``x`` [S, d]. With ``kernels`` (eval on CPU, see ``ops/inference.py``) the hard descent runs on
        the compiled descent kernel, which computes the same function. A forest of K trees routes each token in
        each tree: the record then has S * K rows, row ``s * K + k`` for token s in tree k (:meth:`assignments`)."""
        c = self.config
        if c.n_trees > 1:
            return self._route_forest(x, kernels)
        if self.trains_soft():
            logits = tree.leak(self.node_logits(x), c.region_leak)  # [S, N]
            log_p = tree.leaf_log_probs(logits, c.depth)  # [S, L]
            path_nodes, end = tree.descend_from_logits(logits, c.depth)  # [S, D], [S]
            path_logits = tree.take_along(logits, path_nodes)  # [S, D]
            return Routing(path_nodes, path_logits, end - c.n_nodes, self.leaf_gate(path_logits), logits, log_p)
        shift = self.balance_bias  # [N] decision shifts (bias balancing), or None
        bias = self.node_bias if shift is None else (shift if self.node_bias is None else self.node_bias + shift)
        if kernels:
            path_nodes, path_logits, end = inference.descend(x, self.node_weight, bias, c.depth)
            gate_on = path_logits  # the shifted logits the decisions saw
            if shift is not None:  # the returned logits do not carry the shift
                path_logits = path_logits - shift.to(path_logits.dtype)[path_nodes]
            gate = self.leaf_gate(self._gated(path_logits, gate_on), self._turns(end, shift))
            return Routing(path_nodes, path_logits, end - c.n_nodes, gate)
        leak = c.region_leak if self.training else 0.0
        every = self.training and c.load_balance == "leaf"  # the leaf balancing loss needs every node's logit
        path_nodes, path_logits, end, all_logits = tree.route(  # [S, D], [S, D], [S], [S, N] or None
            x, self.node_weight, bias, c.depth, leak_rate=leak, every_logit=every)
        right = self._turns(end, shift)
        gate_on = path_logits  # the shifted logits the decisions saw
        if shift is not None:  # region leak is off with bias balancing (FFFConfig), so the shift comes off exactly
            path_logits = path_logits - shift.to(path_logits.dtype)[path_nodes]
            all_logits = None if all_logits is None else all_logits - shift.to(all_logits.dtype)
            if self.training:
                self._count(path_nodes, right)
        balance = None
        if every:  # the descent's own logits when they carry no leak, else computed again without it
            balance = all_logits if leak == 0 else self.node_logits(x)
        gate = self.leaf_gate(self._gated(path_logits, gate_on), right)
        return Routing(path_nodes, path_logits, end - c.n_nodes, gate, all_logits, None, balance)

    def _route_forest(self, x: Tensor, kernels: bool = False) -> Routing:
        """The K trees at once: every node's logit in one matrix product ([S, K * N]), each tree's descent on its
        own N of them (rows ``s * K + k``). Region leak and decision shifts as for one tree. With ``kernels``
        (eval) each tree descends on the compiled kernel, computing only its visited nodes."""
        c = self.config
        S, K, N = x.shape[0], c.n_trees, c.n_nodes
        shift = self.balance_bias
        if kernels:
            bias = self.node_bias if shift is None else (shift if self.node_bias is None else self.node_bias + shift)
            parts = []
            for k in range(K):
                nodes = slice(k * N, (k + 1) * N)
                parts.append(inference.descend(x, self.node_weight[nodes], None if bias is None else bias[nodes],
                                               c.depth))  # (nodes [S, D], shifted logits [S, D], end [S])
            path_nodes = torch.stack([p[0] for p in parts], 1).reshape(S * K, c.depth)
            path_logits = torch.stack([p[1] for p in parts], 1).reshape(S * K, c.depth)
            end = torch.stack([p[2] for p in parts], 1).reshape(S * K)
            gate_on = path_logits  # the shifted logits the decisions saw
            if shift is not None:  # the returned logits do not carry each tree's shifts
                forest_nodes = path_nodes + tree_of_row(S * K, K, x.device)[:, None] * N
                path_logits = path_logits - shift.to(path_logits.dtype)[forest_nodes]
            gate = self.leaf_gate(self._gated(path_logits, gate_on), self._turns(end, shift))
            return Routing(path_nodes, path_logits, end - N, gate)
        logits = tree.leak(self.node_logits(x), c.region_leak if self.training else 0.0).reshape(S * K, N)
        if self.trains_soft():
            log_p = tree.leaf_log_probs(logits, c.depth)  # [S*K, L]
            path_nodes, end = tree.descend_from_logits(logits, c.depth)
            path_logits = tree.take_along(logits, path_nodes)
            return Routing(path_nodes, path_logits, end - N, self.leaf_gate(path_logits), logits, log_p)
        shifted = logits if shift is None else logits + shift.to(logits.dtype).reshape(K, N).repeat(S, 1)
        path_nodes, end = tree.descend_from_logits(shifted, c.depth)  # [S*K, D], [S*K]: on the shifted logits,
        right = self._turns(end, shift)  # everything else on the unshifted ones
        if shift is not None and self.training:
            self._count(path_nodes + tree_of_row(S * K, K, x.device)[:, None] * N, right)
        path_logits = tree.take_along(logits, path_nodes)  # [S*K, D]
        balance = None
        if self.training and c.load_balance == "leaf":  # every node's logit without region leak
            balance = logits if c.region_leak == 0 else self.node_logits(x).reshape(S * K, N)
        gate_on = path_logits if c.bias_gate == "unshifted" else tree.take_along(shifted, path_nodes)
        return Routing(path_nodes, path_logits, end - N, self.leaf_gate(gate_on, right), logits, None, balance)

    def assignments(self, routing: Routing) -> tuple[Optional[Tensor], Tensor]:
        """``(token, leaf)`` of each row of a routing record, the leaf numbered over all the trees (tree k's leaf j
        is ``k * L + j``); ``token`` None for one tree (one row per token, in order)."""
        K = self.config.n_trees
        if K == 1:
            return None, routing.leaf
        rows = routing.leaf.shape[0]
        token = torch.arange(rows // K, device=routing.leaf.device).repeat_interleave(K)
        return token, forest_index(routing.leaf, K, self.config.n_leaves)

    def _gated(self, path_logits: Tensor, shifted: Tensor) -> Tensor:
        """The path logits the leaf's gate is computed on: the unshifted ones, or with ``bias_gate="shifted"``
        the ``shifted`` ones the decisions saw (docs/methods.md §3)."""
        return shifted if self.config.bias_gate == "shifted" else path_logits

    def _turns(self, end: Tensor, shift: Optional[Tensor]) -> Optional[Tensor]:
        """The turns taken [S, D] (1 = right) where decision shifts may have set them against the logits' signs;
        None without shifts (the signs are the turns)."""
        if shift is None:
            return None
        return tree.path_nodes_of_leaf(end - self.config.n_nodes, self.config.depth)[1]

    @torch.no_grad()
    def _count(self, path_nodes: Tensor, right: Tensor) -> None:
        """Add this call's tokens to ``balance_counts``: [0] reaching each node, [1] of those going right
        (``path_nodes`` numbered over all the trees of a forest)."""
        nodes = path_nodes.reshape(-1)
        self.balance_counts[0].index_add_(0, nodes, torch.ones_like(nodes))
        self.balance_counts[1].index_add_(0, nodes, right.reshape(-1).to(nodes.dtype))

    @torch.no_grad()
    def apply_balance_counts(self, counts: Tensor) -> None:
        """Move each node's decision shift by the update rate against its right-hand excess, from ``counts``
        [2, N] (tokens reaching each node, of those going right; summed over the data-parallel ranks), and start
        counting afresh (docs/methods.md §3): ``shift[n] -= rate * sign(R_n / T_n - 1/2)`` where ``T_n > 0``.
        The target share 1/2 is that of the leaves under the right child: uniform leaf load."""
        reached, right = counts[0].double(), counts[1].double()
        excess = right / reached.clamp_min(1.0) - 0.5
        step = self.config.bias_update_rate * torch.sign(excess) * (reached > 0)
        self.balance_bias.sub_(step.to(self.balance_bias.dtype))
        self.balance_counts.zero_()

    def leaf_gate(self, path_logits: Tensor, right: Optional[Tensor] = None) -> Tensor:
        """Weight of the chosen leaf's output in the hard forward: its path probability, or 1 for soft-trained
        trees in eval (the paper evaluates them unscaled). ``right`` [S, D]: the turns taken, where decision
        shifts may have set them against the logits' signs (the path probability is then that of the path taken,
        under the logits given: unshifted, or shifted with ``bias_gate="shifted"``); by default the signs."""
        if self.config.train_mode == "soft" and not self.training:
            return path_logits.new_ones(path_logits.shape[0])
        return tree.path_log_prob(path_logits, path_logits >= 0 if right is None else right).exp()

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
        right = None  # the turns taken are the logits' signs, but where bias balancing shifted the decisions
        if self.balance_bias is not None and not routing.soft:
            right = tree.path_nodes_of_leaf(routing.leaf, c.depth)[1]
        return tree_losses(c, routing.path_nodes, routing.path_logits, routing.leaf, harden_on=harden_on,
                           leaf_probs=leaf_p, all_logits=routing.balance_logits, right=right)

    def stats(self, routing: Routing) -> dict[str, Tensor]:
        """Detached statistics: ``counts`` per leaf, ``unused_leaves``, ``decision_entropy``, ``nonfinite_tokens``."""
        return tree_stats(self.config, routing.leaf, routing.path_logits)

    def extra_repr(self) -> str:
        c = self.config
        extra = f", bias_update_rate={c.bias_update_rate}" if c.bias_balancing else ""
        return f"d_model={c.d_model}, depth={c.depth}, nodes={c.n_nodes}, bias={c.bias}{extra}"


@torch.no_grad()
def shift_stats(router: TreeRouter, routings: list[Routing]) -> dict[str, Any]:
    """What a router's decision shifts (bias balancing) did to the hard routings of its calls ``routings``:
    ``against`` [D], the share of decisions at each level that went against the sign of the node's unshifted
    logit; ``against_any``, the share of paths (token and tree) with such a decision on some level; the mean gate
    of those paths (``gate_against``, None if there are none) and of the others (``gate_rest``); and the mean
    and largest shift size. Without shifts every decision follows its logit and the shares are 0."""
    if not routings or any(r.soft for r in routings):
        raise ValueError("shift_stats needs the records of hard routings (eval, or hard training), got "
                         + ("none" if not routings else "soft ones"))
    c = router.config
    logits = torch.cat([r.path_logits for r in routings]).float()  # [R, D], unshifted
    gate = torch.cat([r.gate for r in routings]).float()  # [R]
    right = tree.path_nodes_of_leaf(torch.cat([r.leaf for r in routings]), c.depth)[1].bool()  # [R, D]
    against = right != (logits >= 0)
    turned = against.any(1)
    shift = router.balance_bias
    return {
        "paths": int(gate.numel()),
        "against": [round(float(v), 4) for v in against.float().mean(0)],
        "against_any": float(turned.float().mean()),
        "gate_against": float(gate[turned].mean()) if turned.any() else None,
        "gate_rest": float(gate[~turned].mean()) if (~turned).any() else None,
        "shift_mean": 0.0 if shift is None else float(shift.abs().mean()),
        "shift_max": 0.0 if shift is None else float(shift.abs().max()),
    }


# The names that layers holding a tree gave their parameters before the tree had its router, leaves and master-leaf
# modules, and today's. The core FFF, DeepSpeed's TreeGate and FFFMoE, Tutel's gate and TutelFFF kept the nodes as
# ``node_weight`` / ``node_bias``, the core FFF its leaves as ``leaf_w1`` ... ``leaf_b2``, and the master leaf as
# ``master_w1`` ... ``master_b2`` (or as a ``master`` module) with its blend logit ``master_gate`` of shape [] or
# [1]. Today they are ``router.node_weight``, ``leaves.{w1, b1, w2, b2}`` and ``master.{w1, b1, w2, b2, gate}``,
# each of the same shape as before.
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
    names, in place (shapes are unchanged: each layer keeps the ones its checkpoints were written with)."""
    for old, new in LEGACY_NAMES.items():
        if prefix + old in state_dict and prefix + new not in state_dict:
            value = state_dict.pop(prefix + old)
            state_dict[prefix + new] = value
