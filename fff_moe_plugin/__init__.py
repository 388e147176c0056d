"""Fast feedforward (FFF) trees as router-plus-experts layers for PyTorch, fairseq and DeepSpeed.

An FFF is a :class:`TreeRouter` (the tree's nodes, deciding each token's leaf: one :class:`Routing` record), a
:class:`~fff_moe_plugin.leaves.LeafBank` (the leaves, the experts) and an optional
:class:`~fff_moe_plugin.leaves.MasterLeaf`. The core :class:`FFF` holds them in one process; DeepSpeed's
``FFFMoE`` and Tutel's ``TutelFFF`` (``fff_moe_plugin.integrations``) hold the same router and master leaf with
the leaves sharded over ranks, as one :class:`DispatchConfig` says. docs/architecture.md walks through the
package; docs/methods.md gives the formulas.
"""

from .balancing import after_optimizer_step, update_balance_biases
from .baselines.dense import DenseFFN
from .baselines.pkm import PKM
from .baselines.sigma_moe import SigmaMoE
from .block import BlockOutput
from .config import DenseConfig, FFFConfig, PKMConfig, SigmaMoEConfig, UltraFastConfig
from .dispatch import DispatchConfig
from .fff import FFF
from .registry import build_block
from .router import Routing, TreeRouter
from .ultrafast import UltraFastFFF

__version__ = "0.1.0"

__all__ = [
    "FFF", "FFFConfig", "UltraFastFFF", "UltraFastConfig", "SigmaMoE", "SigmaMoEConfig", "PKM", "PKMConfig",
    "DenseFFN", "DenseConfig", "BlockOutput", "build_block", "TreeRouter", "Routing", "DispatchConfig",
    "update_balance_biases", "after_optimizer_step", "__version__",
]
