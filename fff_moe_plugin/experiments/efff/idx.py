"""Reader for the IDX files of MNIST and Fashion-MNIST (plain or gzip-compressed).

Format (LeCun's MNIST page): two zero bytes, a type code, the number of dimensions, then one big-endian
uint32 per dimension, then the data in C order. MNIST and Fashion-MNIST use type 0x08 (unsigned byte).
"""

from __future__ import annotations

import gzip
import os

import numpy as np

# IDX type code -> numpy dtype (big-endian where it matters)
_DTYPES = {0x08: np.dtype("u1"), 0x09: np.dtype("i1"), 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
           0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """The array stored in an IDX file (``.gz`` files are decompressed); ValueError on a malformed file."""
    path = os.fspath(path)
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _DTYPES:
        raise ValueError(f"{path} is not an IDX file: it must start with two zero bytes and a type code in "
                         f"{sorted(_DTYPES)} (got {raw[:4]!r})")
    dtype, ndim = _DTYPES[raw[2]], raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: truncated IDX header ({len(raw)} bytes, {ndim} dimensions announced)")
    shape = tuple(int(v) for v in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = header + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) != expected:
        raise ValueError(f"{path}: {len(raw)} bytes, but an IDX array of shape {shape} and type {dtype} "
                         f"takes {expected}")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))
