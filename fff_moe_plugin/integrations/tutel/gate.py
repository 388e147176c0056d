"""The FFF tree's nodes as a Tutel gate.

Tutel's gate contract (``tutel.impls.moe_layer.MOELayer``): the layer builds the gate as
``Cls(model_dim=..., num_global_experts=..., **options)``, reads its ``top_k``, ``capacity_factor`` and
``gate_noise``, calls ``gate(x [S, d]) -> logits [S, E]``, takes ``softmax`` of the logits as the routing
scores, keeps each token's ``top_k`` best experts and uses their scores as the combine weights.

The tree routes in two ways (FFF paper, arXiv 2308.14711; docs/methods.md §1):
- descending (hard training and every eval): each token reaches one leaf by hard descent (one in each tree of a
  forest: top-K, each leaf at the log of its path probability, see :meth:`TutelTreeGate.forward`). Tutel's top-1 of
  the leaf probabilities would pick the most probable leaf, which is not always the leaf the descent
  reaches, and no distribution has the descended leaf as its strict maximum with weight P(path) when
  P(path) = 1/L. So the gate returns the descent as a one-hot (log 1 = 0 for the leaf, -inf elsewhere):
  Tutel routes every token to exactly its leaf with combine weight 1, and the layer scales the combined
  output by the path probability (per token, which is the same thing for top-1).
- soft training: the gate returns the log leaf probabilities; Tutel's softmax turns them back into P(leaf)
  and the layer asks for top-L, so every leaf runs and the outputs are mixed by P(leaf), as the core FFF's
  soft forward does.

Tutel hands only the logits back, so the gate keeps the routing it decided (the router's
:class:`~fff_moe_plugin.router.Routing`) for the layer to collect right after the call with
:meth:`TutelTreeGate.take_route`.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ...config import FFFConfig
from ...dispatch import DispatchConfig
from ...router import Routing, TreeRouter, move_legacy_keys


class TutelTreeGate(nn.Module):
    """A Tutel custom gate whose router is an FFF tree (``{'type': 'custom', 'module': TutelTreeGate}``).

    Contract: ``forward(x [S, d]) -> logits [S, L]`` for Tutel's softmax and top-k (see the module docstring);
    the :class:`~fff_moe_plugin.router.Routing` it decided is then collected once with :meth:`take_route`.
    ``router`` is the core layer's :class:`~fff_moe_plugin.router.TreeRouter`. ``capacity_factor``, which Tutel
    reads on every call, is the :class:`~fff_moe_plugin.dispatch.DispatchConfig`'s for training or eval.
    """

    def __init__(self, model_dim: int, num_global_experts: int, config: FFFConfig, dispatch: DispatchConfig):
        super().__init__()
        if model_dim != config.d_model or num_global_experts != config.total_leaves:
            raise ValueError(
                f"TutelTreeGate: the Tutel layer has model_dim={model_dim} and {num_global_experts} experts, "
                f"the tree d_model={config.d_model} and {config.total_leaves} leaves; they must agree"
            )
        self.config = config
        self.dispatch = dispatch
        self.router = TreeRouter(config)  # values are filled in by the owning layer (TutelFFF.load_fff)
        # read by Tutel's layer on every call
        self.top_k = config.n_trees
        self.gate_noise = 0.0
        self._route: Routing | None = None
        self.last_logits: Tensor | None = None  # what Tutel's softmax saw in the last call (the dropped count reads it)
        self.register_load_state_dict_pre_hook(_move_legacy_keys)

    @property
    def capacity_factor(self) -> float:
        """Tutel's capacity factor now (0 dropless, c > 0 capped, c < 0 dropless up to |c|)."""
        return self.dispatch.tutel_capacity_factor(self.training)

    def forward(self, x: Tensor) -> Tensor:
        # S tokens, d model width, N nodes, L leaves (all the trees'), D depth, K trees
        c = self.config
        S, K, L = x.shape[0], c.n_trees, c.total_leaves
        self._route = routing = self.router(x)
        if routing.soft:  # each tree's log leaf probabilities side by side: Tutel's softmax gives p / K
            logits = routing.leaf_log_probs.reshape(S, L)  # [S, L]
        elif K == 1:  # the descended leaf, weight 1: the layer scales by the path probability
            logits = torch.full((S, L), float("-inf"), dtype=x.dtype, device=x.device)
            logits = logits.scatter_(1, routing.leaf[:, None], 0.0)  # [S, L]
        else:  # a forest: each tree's leaf at log(path probability), so that Tutel's softmax weights tree k's leaf
            # by g_k / sum_j g_j (differentiably); the layer multiplies by sum_j g_j
            _, leaf = self.router.assignments(routing)
            logits = torch.full((S, L), float("-inf"), dtype=routing.gate.dtype, device=x.device)
            logits = logits.scatter(1, leaf.view(S, K), routing.gate.log().clamp_min(-1e4).view(S, K))
        self.last_logits = logits.detach()
        return logits

    def take_route(self) -> Routing:
        """The routing of the last call, once (a second take without a call in between is an error)."""
        route, self._route = self._route, None
        if route is None:
            raise RuntimeError("TutelTreeGate.take_route: no routing recorded; the gate runs inside the Tutel layer")
        return route

    def extra_repr(self) -> str:
        return f"depth={self.config.depth}, leaves={self.config.n_leaves}, dispatch={self.dispatch}"


def _move_legacy_keys(module: nn.Module, state_dict: dict, prefix: str, *args) -> None:
    move_legacy_keys(state_dict, prefix)  # a gate written before it held a router: node_weight -> router.node_weight
