"""The hidden activations every block, kernel and integration of the package knows, in one table.

A name is what configs hold (``FFFConfig.activation``); :func:`activation_fn` is the function the layers apply,
:func:`activation_module` the ``nn.Module`` that other code (``fastfeedforward``, a model being converted) uses for
it, and :func:`activation_name` reads a module back into a name, or None when no name computes the same function
(e.g. ``nn.GELU(approximate="tanh")``, which is not ``F.gelu``).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

NAMES = ("relu", "gelu", "silu", "tanh", "sigmoid", "identity")

_FUNCTIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "relu": F.relu,
    "gelu": F.gelu,
    "silu": F.silu,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "identity": lambda t: t,
}

_MODULES: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "identity": nn.Identity,
}


def activation_fn(name: str) -> Callable[[Tensor], Tensor]:
    """The function of activation ``name`` (one of :data:`NAMES`)."""
    if name not in _FUNCTIONS:
        raise ValueError(f"activation {name!r} is not known: must be one of {', '.join(NAMES)}")
    return _FUNCTIONS[name]


def activation_module(name: str) -> nn.Module:
    """A fresh ``nn.Module`` computing activation ``name``."""
    activation_fn(name)  # the same error for an unknown name
    return _MODULES[name]()


def activation_name(module: nn.Module) -> Optional[str]:
    """The name of the activation ``module`` computes, or None when it is not one of :data:`NAMES`."""
    if isinstance(module, nn.GELU) and module.approximate != "none":
        return None
    for name, cls in _MODULES.items():
        if type(module) is cls:
            return name
    return None
