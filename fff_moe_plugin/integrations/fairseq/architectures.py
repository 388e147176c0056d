"""Registers the preset architectures ``transformer_lm_<dense|fff|sigma_moe|pkm>_<setting>`` with fairseq.

Each preset sets the transformer size and the block's flags of one setting in ``presets`` (flags given on
the command line still win), then applies fairseq's ``base_lm_architecture`` (pre-LN and the other
``transformer_lm`` defaults). The dense presets belong to fairseq's own ``transformer_lm`` model.
"""

from __future__ import annotations

from typing import Any, Callable

from fairseq.models import register_model_architecture
from fairseq.models.transformer_lm import base_lm_architecture
from fairseq.utils import safe_getattr

from . import models  # noqa: F401  (the block models must be registered before their architectures)
from .presets import KINDS, MODEL_OF_KIND, SETTINGS, arch_name, fairseq_args


def _architecture(values: dict[str, Any]) -> Callable[[Any], None]:
    def apply(args: Any) -> None:
        for name, value in values.items():
            setattr(args, name, safe_getattr(args, name, value))
        base_lm_architecture(args)

    return apply


ARCHITECTURES: dict[str, Callable[[Any], None]] = {}
for _setting in SETTINGS.values():
    _blocks = _setting.blocks()
    for _kind in KINDS:
        _name = arch_name(_kind, _setting.name)
        ARCHITECTURES[_name] = register_model_architecture(MODEL_OF_KIND[_kind], _name)(
            _architecture(fairseq_args(_setting, _kind, _blocks[_kind]))
        )
