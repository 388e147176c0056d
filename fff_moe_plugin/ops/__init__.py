"""Dispatch and inference kernels, each behind one function with a plain-torch reference beside it."""

from .grouped import grouped_mlp, grouped_mlp_reference

__all__ = ["grouped_mlp", "grouped_mlp_reference"]
