"""Build and load the compiled CPU kernels (``ops/csrc``) on first use.

The kernels are compiled against the torch that is already installed, with torch's cpp_extension JIT (ninja),
into torch's extension cache (``$TORCH_EXTENSIONS_DIR`` or ``~/.cache/torch_extensions``); later imports
reuse the cached build, and a changed source is rebuilt. Nothing is built at install time, so installing
the package never pulls a second torch into an isolated build environment.

The build is specialised for this processor's vector width (AVX-512, AVX2 or portable SSE code, as
``torch.backends.cpu.get_cpu_capability()`` reports) and the width is part of the cached module's name.
Without a compiler or ninja, or with ``FFF_MOE_NO_EXTENSION=1``, :func:`load` returns None and the callers
run the vectorised torch references; a missing toolchain is reported once with a one-line warning.
"""

from __future__ import annotations

import os
import shutil
import threading
import warnings
from pathlib import Path
from types import ModuleType

import torch

DISABLE_ENV = "FFF_MOE_NO_EXTENSION"
SOURCE = Path(__file__).parent / "csrc" / "fff_inference.cpp"

_lock = threading.Lock()
_state: dict[str, object] = {}


def _isa_flags() -> tuple[str, list[str]]:
    """The vector instruction set to compile for, and its compiler flags."""
    try:
        cap = torch.backends.cpu.get_cpu_capability()
    except Exception:  # older torch: no capability query, build the portable code
        cap = "DEFAULT"
    if cap.startswith("AVX512"):
        return "avx512", ["-mavx512f", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma", "-mprefer-vector-width=512"]
    if cap.startswith("AVX2"):
        return "avx2", ["-mavx2", "-mfma"]
    return "generic", []


def disabled() -> bool:
    return os.environ.get(DISABLE_ENV, "") not in ("", "0")


def _toolchain_missing() -> str | None:
    from torch.utils import cpp_extension

    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        return f"no C++ compiler ({cxx})"
    if not cpp_extension.is_ninja_available():
        return "ninja is not installed (pip install ninja)"
    return None


def load(verbose: bool = False) -> ModuleType | None:
    """The compiled module (its ops registered under ``torch.ops.fff_moe``), or None when unavailable."""
    if disabled():
        return None
    with _lock:
        if "module" in _state:
            return _state["module"]  # type: ignore[return-value]
        module = None
        missing = _toolchain_missing()
        if missing is not None:
            warnings.warn(f"fff_moe: {missing}; using the torch reference path for inference", stacklevel=2)
        else:
            from torch.utils import cpp_extension

            isa, flags = _isa_flags()
            try:
                module = cpp_extension.load(
                    name=f"fff_moe_ops_{isa}",
                    sources=[str(SOURCE)],
                    extra_cflags=["-O3", "-fopenmp", *flags],
                    extra_ldflags=["-fopenmp"],
                    verbose=verbose,
                )
            except Exception as e:  # a broken toolchain: same fallback, with the reason on one line
                reason = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
                warnings.warn(
                    f"fff_moe: building the CPU kernels failed ({reason}); using the torch reference path",
                    stacklevel=2,
                )
        _state["module"] = module
        return module


def available() -> bool:
    """Whether the compiled kernels are loaded (building them on first call)."""
    return load() is not None


def simd_width_bytes() -> int:
    """Vector width the kernels were compiled for (64 AVX-512, 32 AVX2, 16 portable), 0 without them."""
    module = load()
    return int(module.simd_width_bytes()) if module is not None else 0
