"""Dispatch and inference kernels, each behind one function with a plain-torch reference beside it.

The package imports only the tree math (``fff_moe_plugin.tree``) and the activations; the layers import it.
``to_fast_eval`` (one call to put a trained model in its fast inference form) is ``fff_moe_plugin.fast_eval``,
above the layers.
"""

from .grouped import grouped_mlp, grouped_mlp_reference
from .inference import (
    descend,
    descend_reference,
    fff_infer,
    fff_infer_reference,
    leaf_mlp,
    leaf_mlp_reference,
    path_neuron,
    path_neuron_reference,
    reference_path,
    set_reference,
)

__all__ = [
    "grouped_mlp", "grouped_mlp_reference", "descend", "descend_reference", "leaf_mlp", "leaf_mlp_reference",
    "fff_infer", "fff_infer_reference", "path_neuron", "path_neuron_reference", "reference_path", "set_reference",
]
