"""The block a config describes: the one place that knows every block class (above the blocks, so that no
block module imports another)."""

from __future__ import annotations

from .baselines.dense import DenseFFN
from .baselines.pkm import PKM
from .baselines.sigma_moe import SigmaMoE
from .block import FeedForwardBlock
from .config import BlockConfig
from .fff import FFF
from .ultrafast import UltraFastFFF

BLOCKS: dict[str, type[FeedForwardBlock]] = {
    c.config_class.kind: c for c in (FFF, UltraFastFFF, SigmaMoE, PKM, DenseFFN)
}


def build_block(config: BlockConfig) -> FeedForwardBlock:
    """The block a config describes."""
    if config.kind not in BLOCKS:
        raise ValueError(f"no block for config kind {config.kind!r}; known: {', '.join(BLOCKS)}")
    return BLOCKS[config.kind](config)
