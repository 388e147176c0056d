"""Fast feedforward (FFF) trees as router-plus-experts layers for PyTorch, fairseq and DeepSpeed."""

from .baselines.dense import DenseFFN
from .baselines.pkm import PKM
from .baselines.sigma_moe import SigmaMoE
from .block import BlockOutput
from .config import DenseConfig, FFFConfig, PKMConfig, SigmaMoEConfig, UltraFastConfig
from .fff import FFF
from .registry import build_block
from .ultrafast import UltraFastFFF

__version__ = "0.1.0"

__all__ = [
    "FFF", "FFFConfig", "UltraFastFFF", "UltraFastConfig", "SigmaMoE", "SigmaMoEConfig", "PKM", "PKMConfig",
    "DenseFFN", "DenseConfig", "BlockOutput", "build_block", "__version__",
]
