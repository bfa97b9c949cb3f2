"""Serial tests of the dataset loaders on bundled digits and tiny generated IDX/CIFAR files."""

from __future__ import annotations

import gzip
import os
import pickle
import struct

import numpy as np
import pytest
import torch

from hflmpi.config import DataConfig
from hflmpi.learn.data import (
    DatasetError,
    TensorDataset,
    load_cifar10,
    load_dataset,
    load_digits,
    load_mnist_idx,
    make_synthetic,
    train_test_split,
)

_IDX_NAMES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


def _idx_bytes(array: np.ndarray) -> bytes:
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim)
    header += b"".join(struct.pack(">I", d) for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def _write_idx_set(directory, n_train=6, n_test=4, side=5, compress=True, seed=0):
    rng = np.random.default_rng(seed)
    arrays = {
        "train_images": rng.integers(0, 256, (n_train, side, side)),
        "train_labels": rng.integers(0, 10, n_train),
        "test_images": rng.integers(0, 256, (n_test, side, side)),
        "test_labels": rng.integers(0, 10, n_test),
    }
    directory.mkdir(parents=True, exist_ok=True)
    for key, name in _IDX_NAMES.items():
        data = _idx_bytes(arrays[key])
        if compress:
            (directory / (name + ".gz")).write_bytes(gzip.compress(data))
        else:
            (directory / name).write_bytes(data)
    return arrays


def _write_cifar(directory, per_batch=3, byte_keys=True, seed=0):
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (per_batch, 3072)).astype(np.uint8)
        labels = rng.integers(0, 10, per_batch).tolist()
        content = {b"data": data, b"labels": labels}
        if not byte_keys:
            content = {"data": data, "labels": labels}
        (directory / name).write_bytes(pickle.dumps(content, protocol=2))
        batches[name] = (data, labels)
    return batches


def test_digits_shapes_range_and_seeded_split():
    train, test = load_digits(seed=0, test_fraction=0.2)
    assert len(train) + len(test) == 1797 and len(test) == 359
    assert train.input_shape == (1, 8, 8) and train.num_classes == 10
    assert train.features.dtype == torch.float32 and train.labels.dtype == torch.int64
    assert float(train.features.min()) >= 0.0 and float(train.features.max()) <= 1.0
    again, _ = load_digits(seed=0, test_fraction=0.2)
    other, _ = load_digits(seed=1, test_fraction=0.2)
    assert torch.equal(train.features, again.features)
    assert not torch.equal(train.features, other.features)


def test_load_dataset_digits_normalizes_with_train_stats():
    train, test = load_dataset(DataConfig(), seed=0)
    assert abs(float(train.features.mean())) < 1e-5
    assert abs(float(train.features.std()) - 1.0) < 1e-3
    raw_train, raw_test = load_dataset(DataConfig(normalize=False), seed=0)
    assert torch.equal(raw_test.labels, test.labels)
    assert float(raw_train.features.min()) == 0.0


@pytest.mark.parametrize("compress", [True, False])
def test_mnist_idx_reader(tmp_path, compress):
    arrays = _write_idx_set(tmp_path, compress=compress)
    train, test = load_mnist_idx(tmp_path)
    assert train.input_shape == (1, 5, 5) and len(train) == 6 and len(test) == 4
    np.testing.assert_allclose(train.features[:, 0].numpy(), arrays["train_images"] / 255.0,
                               rtol=1e-6)
    np.testing.assert_array_equal(test.labels.numpy(), arrays["test_labels"])


def test_mnist_torchvision_layout_and_load_dataset(tmp_path):
    arrays = _write_idx_set(tmp_path / "FashionMNIST" / "raw")
    cfg = DataConfig(name="fashion_mnist", path=str(tmp_path), normalize=False)
    train, test = load_dataset(cfg, seed=0)
    assert train.name == "fashion_mnist"
    np.testing.assert_array_equal(train.labels.numpy(), arrays["train_labels"])


def test_mnist_missing_directory_and_file_errors(tmp_path):
    with pytest.raises(DatasetError, match="does not exist.*train-images-idx3-ubyte"):
        load_mnist_idx(tmp_path / "nope")
    _write_idx_set(tmp_path)
    os.remove(tmp_path / "t10k-labels-idx1-ubyte.gz")
    with pytest.raises(DatasetError) as info:
        load_mnist_idx(tmp_path)
    assert "t10k-labels-idx1-ubyte[.gz] not found in" in str(info.value)
    assert str(tmp_path) in str(info.value)


def test_mnist_truncated_and_corrupt_files(tmp_path):
    _write_idx_set(tmp_path, compress=False)
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-7])
    with pytest.raises(DatasetError, match="truncated or corrupt.*holds 143"):
        load_mnist_idx(tmp_path)
    path.write_bytes(b"\x12\x34\x08\x03" + b"\x00" * 20)
    with pytest.raises(DatasetError, match="bad magic"):
        load_mnist_idx(tmp_path)
    path.unlink()
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(b"not gzip at all")
    with pytest.raises(DatasetError, match="cannot be read"):
        load_mnist_idx(tmp_path)
    full = gzip.compress(_idx_bytes(np.zeros((6, 5, 5))))
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(full[: len(full) // 2])
    with pytest.raises(DatasetError, match=r"train-images-idx3-ubyte\.gz cannot be read"):
        load_mnist_idx(tmp_path)


def test_mnist_count_mismatch(tmp_path):
    _write_idx_set(tmp_path, compress=False)
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(_idx_bytes(np.zeros(5)))
    with pytest.raises(DatasetError, match="6 train images but 5 train labels"):
        load_mnist_idx(tmp_path)


@pytest.mark.parametrize("byte_keys, nested", [(True, True), (False, False)])
def test_cifar10_reader(tmp_path, byte_keys, nested):
    directory = tmp_path / "cifar-10-batches-py" if nested else tmp_path
    batches = _write_cifar(directory, byte_keys=byte_keys)
    train, test = load_cifar10(tmp_path)
    assert train.input_shape == (3, 32, 32) and len(train) == 15 and len(test) == 3
    data, labels = batches["data_batch_2"]
    np.testing.assert_allclose(train.features[3:6].numpy().reshape(3, -1), data / 255.0,
                               rtol=1e-6)
    np.testing.assert_array_equal(test.labels.numpy(), batches["test_batch"][1])


def test_cifar10_errors(tmp_path):
    with pytest.raises(DatasetError, match="does not exist.*data_batch_1"):
        load_cifar10(tmp_path / "nope")
    _write_cifar(tmp_path)
    os.remove(tmp_path / "data_batch_4")
    with pytest.raises(DatasetError, match="data_batch_4 not found in"):
        load_cifar10(tmp_path)
    _write_cifar(tmp_path)
    path = tmp_path / "data_batch_3"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(DatasetError, match="data_batch_3 is not a readable CIFAR-10 batch"):
        load_cifar10(tmp_path)
    path.write_bytes(pickle.dumps({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}))
    with pytest.raises(DatasetError, match=r"expected uint8 \[n, 3072\]"):
        load_cifar10(tmp_path)


def test_cifar10_refuses_code_in_pickles(tmp_path):
    _write_cifar(tmp_path)
    (tmp_path / "test_batch").write_bytes(pickle.dumps(os.getcwd))
    with pytest.raises(DatasetError, match="refusing to load"):
        load_cifar10(tmp_path)


def test_synthetic_is_seeded_and_learnable():
    a = make_synthetic(2000, 20, 5, seed=3)
    b = make_synthetic(2000, 20, 5, seed=3)
    assert torch.equal(a.features, b.features) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.features, make_synthetic(2000, 20, 5, seed=4).features)
    train, test = train_test_split(a, 0.25, seed=0)
    assert len(test) == 500
    # A nearest-class-mean classifier fitted on train must do far better than chance (0.2).
    means = torch.stack([train.features[train.labels == c].mean(0) for c in range(5)])
    predicted = torch.cdist(test.features, means).argmin(1)
    assert float((predicted == test.labels).float().mean()) > 0.85


def test_load_dataset_synthetic_sizes():
    cfg = DataConfig(name="synthetic", synthetic_samples=500, synthetic_features=7,
                     synthetic_classes=3, test_fraction=0.2)
    train, test = load_dataset(cfg, seed=0)
    assert (len(train), len(test), train.input_shape, train.num_classes) == (400, 100, (7,), 3)


def test_tensor_dataset_subset_and_checks():
    ds = TensorDataset(torch.arange(12.0).view(6, 2), torch.tensor([0, 1, 0, 1, 0, 1]), 2)
    sub = ds.subset(np.array([4, 1]))
    assert sub.features.tolist() == [[8.0, 9.0], [2.0, 3.0]] and sub.labels.tolist() == [0, 1]
    with pytest.raises(ValueError, match="6 feature rows"):
        TensorDataset(torch.zeros(6, 2), torch.zeros(5, dtype=torch.int64), 2)


def test_a_data_path_that_is_a_file_says_so(tmp_path):
    """data.path naming a file (say one of the IDX files) is not "does not exist"."""
    arrays_dir = tmp_path / "mnist"
    _write_idx_set(arrays_dir)
    inside = arrays_dir / "train-images-idx3-ubyte.gz"
    for load, kind in ((load_mnist_idx, "mnist"), (load_cifar10, "cifar10")):
        with pytest.raises(DatasetError) as info:
            load(inside)
        text = str(info.value)
        assert "does not exist" not in text, text
        assert f"{inside} is a file, expected a directory containing" in text, text
        assert str(arrays_dir) in text.partition("expected")[2]  # suggests the file's folder
        assert text.startswith(kind)
    cfg = DataConfig(name="fashion_mnist", path=str(inside))
    with pytest.raises(DatasetError, match="is a file, expected a directory containing the four "
                                           "IDX files"):
        load_dataset(cfg, seed=0)
