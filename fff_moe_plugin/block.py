"""What every feedforward block of the package shares: the call shape and the activation names.

Every block (FFF, UltraFastFFF, SigmaMoE, PKM, DenseFFN) maps ``x [..., d_model]`` to a
:class:`BlockOutput` whose fields never change shape with flags or mode: losses are zeros in eval, and the
set of keys in ``losses`` and ``stats`` is fixed per block. The fairseq and DeepSpeed adapters rely on
this to treat all blocks alike.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

import torch
from torch import Tensor, nn

from .config import BlockConfig


class BlockOutput(NamedTuple):
    """Result of a block's forward.

    output:   [..., d_out], same leading shape as the input.
    aux_loss: float32 scalar, the block's auxiliary losses already weighted by the config's coefficients;
              the caller adds it to the training loss (zero in eval).
    losses:   the unweighted loss terms (float32 scalars), fixed keys per block, zeros in eval.
    stats:    detached routing statistics, a read-only mapping (a dict for the core blocks; DeepSpeed's FFFMoE
              computes its entries when first read); ``stats["counts"]`` is always the number of tokens that each
              expert / leaf / memory slot received in this call (float32 [E]).
    """

    output: Tensor
    aux_loss: Tensor
    losses: dict[str, Tensor]
    stats: Mapping[str, Tensor]


class FeedForwardBlock(nn.Module):
    """Base class: the config check, input checking and flattening shared by the blocks."""

    config_class: type[BlockConfig] = BlockConfig

    def __init__(self, config: BlockConfig):
        super().__init__()
        if not isinstance(config, self.config_class):
            raise TypeError(
                f"{type(self).__name__} takes a {self.config_class.__name__}, got {type(config).__name__}"
            )
        self.config = config

    def _flatten_input(self, x: Tensor) -> Tensor:
        """Check ``x`` against the config and return it as [S, d]."""
        d = self.config.d_model  # type: ignore[attr-defined]
        if x.dim() == 0 or x.shape[-1] != d:
            raise ValueError(
                f"{type(self).__name__} expects inputs of shape [..., {d}] (d_model={d}), got {tuple(x.shape)}"
            )
        p = next(self.parameters())
        autocast = torch.is_autocast_enabled(x.device.type)
        if autocast and x.dtype in (p.dtype, torch.get_autocast_dtype(x.device.type)):
            return x.reshape(-1, d)  # under torch.autocast the block runs its experts in the autocast dtype
        if x.dtype != p.dtype:
            raise ValueError(
                f"{type(self).__name__}: input dtype {x.dtype} differs from the parameters' {p.dtype}; "
                f"convert one of them (e.g. block.to({x.dtype}))"
            )
        return x.reshape(-1, d)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # -- the config travels with the weights ---------------------------------------------------------
    # state_dict() holds "<prefix>_extra_state" = {"kind": ..., "config": {...}} (plain Python values, so
    # torch.load(weights_only=True) reads it). Loading checks it against this layer's config and refuses weights
    # trained under a config that computes another function (config.BlockConfig.check_loadable). State dicts
    # written before the config travelled have no such entry and load unchecked.
    def get_extra_state(self) -> dict:
        return {"kind": self.config.kind, "config": self.config.to_dict()}

    def set_extra_state(self, state) -> None:
        self.config.check_loadable(state)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        key = prefix + "_extra_state"
        if key in state_dict:
            self.config.check_loadable(state_dict[key], where=prefix.rstrip("."))
        else:
            state_dict[key] = self.get_extra_state()  # an older state dict: nothing to check against
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    @classmethod
    def from_state_dict(cls, state_dict, prefix: str = "", strict: bool = True):
        """The block its state dict describes: built from the saved config, with the saved weights."""
        key = prefix + "_extra_state"
        saved = state_dict.get(key)
        if not isinstance(saved, dict) or "config" not in saved:
            raise ValueError(
                f"{cls.__name__}.from_state_dict: {key!r} holds no saved config (state dicts written before "
                f"configs travelled with the weights); build the layer from its config and load_state_dict instead"
            )
        block = cls(cls.config_class.from_dict(saved["config"]))
        own = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
        block.load_state_dict(own, strict=strict)
        return block

    def zero(self) -> Tensor:
        """A float32 scalar zero on the block's device (for losses in eval)."""
        return torch.zeros((), dtype=torch.float32, device=next(self.parameters()).device)
