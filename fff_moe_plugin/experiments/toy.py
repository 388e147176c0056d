"""A small network of residual two-layer feedforward blocks, for runs that replace those blocks with FFF layers.

The DeepSpeed tests and benchmark, the GPU check and the checkpoint fixtures all build it: ``"replace":
"blocks.*.mlp"`` in the ``"fff_moe"`` JSON block names its feedforward modules (``nn.Sequential(Linear, act,
Linear)``, the shape :func:`fff_moe_plugin.integrations.deepspeed.feedforward_shape` recognises).
"""

from __future__ import annotations

from torch import Tensor, nn

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU}


class Block(nn.Module):
    """Pre-norm residual feedforward block: ``x + mlp(norm(x))``, ``mlp`` = Linear(d, h), act, Linear(h, d)."""

    def __init__(self, d_model: int, hidden: int, activation: str = "gelu") -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, hidden), ACTIVATIONS[activation](), nn.Linear(hidden, d_model))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.mlp(self.norm(x))


class ToyNet(nn.Module):
    """``[..., d_model] -> [..., d_model]``: ``n_blocks`` :class:`Block` s of hidden width ``hidden`` (default
    ``4 * d_model``), between an input and an output projection when ``projections``."""

    def __init__(self, d_model: int = 16, hidden: int | None = None, n_blocks: int = 2, activation: str = "gelu",
                 projections: bool = True) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation = {activation!r} is not allowed: must be one of {', '.join(ACTIVATIONS)}")
        hidden = 4 * d_model if hidden is None else hidden
        self.inp = nn.Linear(d_model, d_model) if projections else nn.Identity()
        self.blocks = nn.ModuleList(Block(d_model, hidden, activation) for _ in range(n_blocks))
        self.out = nn.Linear(d_model, d_model) if projections else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        x = self.inp(x)
        for block in self.blocks:
            x = block(x)
        return self.out(x)
