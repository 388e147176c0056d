"""The toy network of the DeepSpeed engine checkpoint in this folder (``deepspeed_engine/``).

``fff_moe_plugin.deepspeed.initialize`` replaces each ``blocks.<i>.mlp`` (Linear, ReLU, Linear) with an FFF
layer; ``write.py`` trains and saves it, ``tests/test_old_checkpoints.py`` rebuilds it and loads the checkpoint.
"""

from __future__ import annotations

from torch import Tensor, nn


class Block(nn.Module):
    """Pre-norm residual feedforward block: ``x + mlp(norm(x))``."""

    def __init__(self, d_model: int, hidden: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, hidden), nn.ReLU(), nn.Linear(hidden, d_model))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.mlp(self.norm(x))


class ToyNet(nn.Module):
    """Input projection, ``n_blocks`` feedforward blocks, output projection: ``[..., d_model] -> [..., d_model]``."""

    def __init__(self, d_model: int = 8, hidden: int = 16, n_blocks: int = 2) -> None:
        super().__init__()
        self.inp = nn.Linear(d_model, d_model)
        self.blocks = nn.ModuleList(Block(d_model, hidden) for _ in range(n_blocks))
        self.out = nn.Linear(d_model, d_model)

    def forward(self, x: Tensor) -> Tensor:
        x = self.inp(x)
        for block in self.blocks:
            x = block(x)
        return self.out(x)


def train_step(engine, batch: tuple[Tensor, Tensor]) -> None:
    """One optimizer step of a DeepSpeed engine wrapping a ToyNet: mean squared error plus the FFF layers' aux loss."""
    import torch.nn.functional as F

    from fff_moe_plugin.deepspeed import aux_loss

    x, y = batch
    engine.train()
    engine.backward(F.mse_loss(engine(x), y) + aux_loss(engine))
    engine.step()


def eval_output(engine, x: Tensor) -> Tensor:
    """The engine's output on ``x`` in eval mode, without gradients."""
    import torch

    engine.eval()
    with torch.no_grad():
        return engine(x)
