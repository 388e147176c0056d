"""The eFFF image classifier: 784 pixels -> one FFF tree -> 10 logits, in the paper's three variants.

eFFF (arXiv 2405.16836, docs/methods.md §3): plain FFF (cross-entropy + hardening), + leaf load balancing
(Switch loss with leaves as experts), + load balancing + master leaf (an always-on MLP blended with the tree
by a learned sigmoid gate). The master leaf is 784 -> 8 -> 10 as in the paper's MNIST code, whatever the
tree's leaf width, so the third variant reads more parameters per image than the other two.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from ...block import BlockOutput
from ...config import FFFConfig
from ...fff import FFF

INPUT_WIDTH = 784
N_CLASSES = 10
MASTER_LEAF_WIDTH = 8

# variant key -> (FFFConfig.load_balance, FFFConfig.master_leaf)
VARIANTS: dict[str, tuple[str, bool]] = {
    "fff": ("none", False),
    "fff+lb": ("leaf", False),
    "fff+lb+ml": ("leaf", True),
}
VARIANT_LABELS = {"fff": "FFF", "fff+lb": "FFF + load balancing", "fff+lb+ml": "FFF + load balancing + master leaf"}


@dataclass(frozen=True)
class Setting:
    """One point of the paper's grid: leaf width l and depth D (training width l * 2**D)."""

    leaf_width: int
    depth: int

    @property
    def training_width(self) -> int:
        return self.leaf_width * 2**self.depth

    @property
    def key(self) -> str:
        return f"({self.leaf_width},{self.depth})"


def classifier_config(variant: str, setting: Setting, hardening: float, balance: float) -> FFFConfig:
    """The FFFConfig of one variant at one grid point (soft training, hard inference, as in the paper)."""
    if variant not in VARIANTS:
        raise ValueError(f"variant {variant!r} is not known: must be one of {', '.join(VARIANTS)}")
    load_balance, master_leaf = VARIANTS[variant]
    return FFFConfig(
        d_model=INPUT_WIDTH, d_out=N_CLASSES, leaf_width=setting.leaf_width, depth=setting.depth,
        train_mode="soft", hardening=hardening, load_balance=load_balance,
        load_balance_coef=balance if load_balance != "none" else 0.0,
        master_leaf=master_leaf, master_leaf_width=MASTER_LEAF_WIDTH if master_leaf else None,
    )


class EFFFClassifier(nn.Module):
    """Image classifier whose only hidden block is an FFF (eFFF paper's MNIST / Fashion-MNIST model).

    Contract: ``forward(x [B, 784] in [0, 1]) -> BlockOutput(logits [B, 10], aux_loss, losses, stats)``;
    pixels are normalised to [-1, 1] as in the paper's code. The caller adds ``aux_loss`` (hardening and,
    for the balanced variants, load balancing, weighted by the config) to the cross-entropy.
    """

    def __init__(self, config: FFFConfig):
        super().__init__()
        if config.d_model != INPUT_WIDTH or config.d_out != N_CLASSES:
            raise ValueError(f"EFFFClassifier needs d_model={INPUT_WIDTH}, d_out={N_CLASSES}; "
                             f"got d_model={config.d_model}, d_out={config.d_out}")
        self.config = config
        self.fff = FFF(config)

    def forward(self, x: Tensor) -> BlockOutput:
        # B images, 784 pixels, 10 classes
        return self.fff((x - 0.5) / 0.5)  # logits [B, 10]
