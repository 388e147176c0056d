"""The FFF tree's nodes as a Tutel gate.

Tutel's gate contract (``tutel.impls.moe_layer.MOELayer``): the layer builds the gate as
``Cls(model_dim=..., num_global_experts=..., **options)``, reads its ``top_k``, ``capacity_factor`` and
``gate_noise``, calls ``gate(x [S, d]) -> logits [S, E]``, takes ``softmax`` of the logits as the routing
scores, keeps each token's ``top_k`` best experts and uses their scores as the combine weights.

The tree routes in two ways (FFF paper, arXiv 2308.14711; docs/methods.md §1):
- descending (hard training and every eval): each token reaches one leaf by hard descent. Tutel's top-1 of
  the leaf probabilities would pick the most probable leaf, which is not always the leaf the descent
  reaches, and no distribution has the descended leaf as its strict maximum with weight P(path) when
  P(path) = 1/L. So the gate returns the descent as a one-hot (log 1 = 0 for the leaf, -inf elsewhere):
  Tutel routes every token to exactly its leaf with combine weight 1, and the layer scales the combined
  output by the path probability (per token, which is the same thing for top-1).
- soft training: the gate returns the log leaf probabilities; Tutel's softmax turns them back into P(leaf)
  and the layer asks for top-L, so every leaf runs and the outputs are mixed by P(leaf), as the core FFF's
  soft forward does.

Tutel hands only the logits back, so the gate keeps the routing it decided (visited nodes, their logits,
the leaf) for the layer to collect right after the call with :meth:`TutelTreeGate.take_route`.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from ... import tree
from ...config import FFFConfig
from ...fff import FFF


class TreeRoute(NamedTuple):
    """The routing one gate call decided.

    path_nodes, path_logits: [S, D] heap index and logit of the node visited on each level.
    leaf: [S] the leaf the descent reaches.
    leaf_log_probs: [S, L] log leaf probabilities in soft training (they weight the mixture), else None.
    harden_on: the logits the hardening entropy is taken over ([S, N] in soft training, [S, D] otherwise).
    balance_logits: [S, N] every node's logit for the leaf balancing loss in hard training, else None.
    """

    path_nodes: Tensor
    path_logits: Tensor
    leaf: Tensor
    leaf_log_probs: Tensor | None
    harden_on: Tensor
    balance_logits: Tensor | None = None


class TutelTreeGate(nn.Module):
    """A Tutel custom gate whose router is an FFF tree's nodes (``{'type': 'custom', 'module': TutelTreeGate}``).

    Contract: ``forward(x [S, d]) -> logits [S, L]`` for Tutel's softmax and top-k (see the module docstring);
    the routing it decided is then collected once with :meth:`take_route`. Parameters ``node_weight`` [N, d]
    and ``node_bias`` [N] are those of :class:`fff_moe_plugin.FFF`; the descent, the path probability and the
    node logits are the core FFF's own methods, not copies.
    """

    # the core layer's router pieces, bound to this module (they read config, node_weight, node_bias, training)
    node_logits = FFF.node_logits
    route = FFF.route
    needs_every_logit = FFF.needs_every_logit
    balance_logits = FFF.balance_logits
    leaf_gate = FFF.leaf_gate

    def __init__(self, model_dim: int, num_global_experts: int, config: FFFConfig, capacity_factor: float = 0.0):
        super().__init__()
        if model_dim != config.d_model or num_global_experts != config.n_leaves:
            raise ValueError(
                f"TutelTreeGate: the Tutel layer has model_dim={model_dim} and {num_global_experts} experts, "
                f"the tree d_model={config.d_model} and {config.n_leaves} leaves; they must agree"
            )
        self.config = config
        N, d = config.n_nodes, config.d_model
        # values are filled in by the owning layer (TutelFFF.load_fff), which copies a core FFF
        self.node_weight = nn.Parameter(torch.zeros(N, d))  # [N, d]
        self.node_bias = nn.Parameter(torch.zeros(N)) if config.bias else None  # [N]
        # read by Tutel's layer on every call
        self.top_k = 1
        self.capacity_factor = float(capacity_factor)
        self.gate_noise = 0.0
        self._route: TreeRoute | None = None

    def forward(self, x: Tensor) -> Tensor:
        # S tokens, d model width, N nodes, L leaves, D depth
        c = self.config
        if self.training and c.train_mode == "soft":
            logits = tree.leak(self.node_logits(x), c.region_leak)  # [S, N]
            log_p = tree.leaf_log_probs(logits, c.depth)  # [S, L]
            path_nodes, end = tree.descend_from_logits(logits, c.depth)  # [S, D], [S]
            path_logits = tree.take_along(logits, path_nodes)  # [S, D]
            self._route = TreeRoute(path_nodes, path_logits, end - c.n_nodes, log_p, logits)
            return log_p
        leak = c.region_leak if self.training else 0.0
        path_nodes, path_logits, leaf, routed = self.route(x, leak)  # [S, D], [S, D], [S], [S, N] or None
        balance = self.balance_logits(x, routed, leak) if self.training else None
        self._route = TreeRoute(path_nodes, path_logits, leaf, None, path_logits, balance)
        one_hot = torch.full((x.shape[0], c.n_leaves), float("-inf"), dtype=x.dtype, device=x.device)  # [S, L]
        return one_hot.scatter_(1, leaf[:, None], 0.0)

    def take_route(self) -> TreeRoute:
        """The routing of the last call, once (a second take without a call in between is an error)."""
        route, self._route = self._route, None
        if route is None:
            raise RuntimeError("TutelTreeGate.take_route: no routing recorded; the gate runs inside the Tutel layer")
        return route

    def extra_repr(self) -> str:
        return f"depth={self.config.depth}, leaves={self.config.n_leaves}, capacity_factor={self.capacity_factor}"
