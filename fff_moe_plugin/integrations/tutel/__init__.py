"""Tutel (Hwang et al. 2023, "Tutel: Adaptive Mixture-of-Experts at Scale", arXiv 2206.03382) as a dispatch
backend for the FFF tree: the tree's nodes are a Tutel gate, its leaves Tutel experts sharded over ranks.

Tutel is not on the package registries; it is built from its source repository. Importing this package
without it raises an ImportError that says how.
"""

INSTALL_MESSAGE = (
    "fff_moe_plugin.integrations.tutel needs Tutel, which is not on PyPI: build it from its source repository "
    "into the environment that already has torch, with\n"
    "    git clone https://github.com/microsoft/tutel /tmp/tutel-src\n"
    "    NO_CUDA=1 pip install --no-build-isolation /tmp/tutel-src\n"
    "(NO_CUDA=1 builds the CPU-only extension, about 40 s; leave it out on a CUDA machine. "
    "--no-build-isolation makes the build use the installed torch instead of downloading another one.)"
)

try:
    import tutel  # noqa: F401
    from tutel import moe as _tutel_moe  # noqa: F401
except ImportError as e:  # only a missing or broken Tutel lands here
    raise ImportError(INSTALL_MESSAGE) from e

from .gate import TutelTreeGate  # noqa: E402
from .layer import TutelFFF  # noqa: E402

__all__ = ["TutelFFF", "TutelTreeGate", "INSTALL_MESSAGE"]
