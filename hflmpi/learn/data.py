"""Datasets as plain tensors: bundled digits, local MNIST/Fashion-MNIST/CIFAR-10, synthetic, yours.

Nothing is ever downloaded.

Every loader returns :class:`TensorDataset` objects (``features`` float32 ``[n, *input_shape]``,
``labels`` int64 ``[n]``). Images are ``[n, channels, height, width]`` scaled to [0, 1]; with
``normalize`` the features are then standardised with training-set statistics.
"""

from __future__ import annotations

import gzip
import pickle
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hflmpi.config import DataConfig
from hflmpi.core.rng import numpy_generator
from hflmpi.errors import HflmpiError

__all__ = [
    "DatasetError",
    "TensorDataset",
    "load_digits",
    "load_mnist_idx",
    "read_idx",
    "load_cifar10",
    "make_synthetic",
    "train_test_split",
    "standardize",
    "load_dataset",
]

_IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
_IDX_SUBDIRS = {"mnist": ("MNIST/raw", "mnist"), "fashion_mnist": ("FashionMNIST/raw", "fashion")}
_CIFAR_FILES = tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch",)


class DatasetError(HflmpiError, ValueError):
    """A dataset directory or file is missing, unreadable or corrupt."""


@dataclass(frozen=True)
class TensorDataset:
    """Features and labels held as whole tensors.

    Attributes
    ----------
    features : torch.Tensor
        float32 ``[n, *input_shape]`` as loaded (the run's dtype after :meth:`to`).
    labels : torch.Tensor
        int64 ``[n]`` with values in ``0..num_classes-1``.
    num_classes : int
        Number of classes.
    name : str
        Where it came from, for messages and the run file.
    """

    features: torch.Tensor
    labels: torch.Tensor
    num_classes: int
    name: str = ""

    def __post_init__(self) -> None:
        if self.features.shape[0] != self.labels.shape[0] or self.labels.dim() != 1:
            raise ValueError(
                f"dataset {self.name!r}: {self.features.shape[0]} feature rows but labels of "
                f"shape {tuple(self.labels.shape)}"
            )

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Return the shape of one sample, e.g. ``(1, 28, 28)`` or ``(784,)``."""
        return tuple(self.features.shape[1:])

    def subset(self, indices: np.ndarray | torch.Tensor | Sequence[int]) -> TensorDataset:
        """Return the samples at ``indices`` (a copy)."""
        idx = torch.as_tensor(np.asarray(indices), dtype=torch.int64, device=self.labels.device)
        return TensorDataset(self.features[idx], self.labels[idx], self.num_classes, self.name)

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> TensorDataset:
        """Return the dataset with both tensors on ``device`` and the features in ``dtype``.

        ``dtype`` (default: keep float32) is the model's floating dtype, e.g. ``torch.float64``
        for ``run.dtype = "float64"``; labels stay int64.
        """
        return TensorDataset(
            self.features.to(device=device, dtype=dtype), self.labels.to(device),
            self.num_classes, self.name,
        )


def _dataset(
    features: np.ndarray, labels: np.ndarray, num_classes: int, name: str
) -> TensorDataset:
    return TensorDataset(
        torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32)),
        torch.from_numpy(np.ascontiguousarray(labels, dtype=np.int64)),
        num_classes,
        name,
    )


def train_test_split(
    dataset: TensorDataset, test_fraction: float, seed: int
) -> tuple[TensorDataset, TensorDataset]:
    """Split ``dataset`` at random into train and test parts, keyed by ``seed``.

    The test part holds ``round(test_fraction * n)`` samples, at least 1 and at most ``n - 1``.
    """
    n = len(dataset)
    if n < 2:
        raise DatasetError(f"dataset {dataset.name!r} has {n} sample(s); a split needs >= 2")
    n_test = min(max(int(round(test_fraction * n)), 1), n - 1)
    order = numpy_generator(seed, purpose="split").permutation(n)
    return dataset.subset(np.sort(order[n_test:])), dataset.subset(np.sort(order[:n_test]))


def standardize(train: TensorDataset, test: TensorDataset) -> tuple[TensorDataset, TensorDataset]:
    """Standardise both sets with the training mean and std (per channel for ``[n, c, h, w]``)."""
    x = train.features
    dims = (0, 2, 3) if x.dim() == 4 else (0,)
    count = x.numel() // (x.shape[1] if x.dim() == 4 else x[0].numel())
    # Two passes over chunks, accumulated in float64: exact enough, and no float64 copy of CIFAR.
    chunks = x.split(4096)
    mean = sum(c.double().sum(dim=dims, keepdim=True) for c in chunks) / count
    var = sum(((c.double() - mean) ** 2).sum(dim=dims, keepdim=True) for c in chunks)
    std = (var / max(count - 1, 1)).sqrt().clamp_min(1e-8)
    mean32, std32 = mean.float(), std.float()

    def apply(d: TensorDataset) -> TensorDataset:
        features = (d.features - mean32) / std32
        return TensorDataset(features, d.labels, d.num_classes, d.name)

    return apply(train), apply(test)


def load_digits(seed: int = 0, test_fraction: float = 0.2) -> tuple[TensorDataset, TensorDataset]:
    """Load scikit-learn's bundled 8x8 handwritten digits (1797 samples, 10 classes).

    Parameters
    ----------
    seed : int
        Keys the train/test split.
    test_fraction : float
        Fraction held out for testing.

    Returns
    -------
    train, test : TensorDataset
        Features ``[n, 1, 8, 8]`` scaled to [0, 1].
    """
    try:
        from sklearn.datasets import load_digits as sk_load_digits
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise DatasetError(
            "data.name=\"digits\" needs scikit-learn, which ships the digits data; "
            "pip install scikit-learn (or hflmpi[digits])"
        ) from exc
    bunch = sk_load_digits()
    images = np.asarray(bunch.images, dtype=np.float32)[:, None, :, :] / 16.0
    full = _dataset(images, np.asarray(bunch.target), 10, "digits")
    return train_test_split(full, test_fraction, seed)


# --------------------------------------------------------------------------------------------
# MNIST / Fashion-MNIST IDX files


def _check_directory(root: Path, kind: str, contents: str) -> None:
    """Raise :class:`DatasetError` unless ``root`` is a directory (saying what it is instead)."""
    if root.is_dir():
        return
    if root.exists():
        what = "a file" if root.is_file() else "not a directory"
        raise DatasetError(
            f"{kind} data.path {root} is {what}, expected a directory containing {contents}; "
            f"set data.path to that directory, e.g. the file's folder {root.parent}"
        )
    raise DatasetError(f"{kind} directory {root} does not exist; put {contents} there; "
                       "nothing is downloaded")


def _find_file(directories: Sequence[Path], stem: str) -> Path | None:
    for directory in directories:
        for name in (stem, stem + ".gz", stem.replace("-idx", ".idx"),
                     stem.replace("-idx", ".idx") + ".gz"):
            candidate = directory / name
            if candidate.is_file():
                return candidate
    return None


def _read_bytes(path: Path) -> bytes:
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as handle:
                return handle.read()
        return path.read_bytes()
    except (OSError, EOFError) as exc:  # gzip.BadGzipFile is an OSError
        raise DatasetError(f"{path} cannot be read: {exc}") from None


def read_idx(path: Path, expected_ndim: int) -> np.ndarray:
    """Read one IDX file of unsigned bytes (gzip-compressed or raw) into a uint8 array."""
    raw = _read_bytes(path)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise DatasetError(f"{path} is not an IDX file (bad magic number)")
    if raw[2] != 0x08:
        raise DatasetError(f"{path}: IDX element type 0x{raw[2]:02x} is not unsigned byte (0x08)")
    ndim = raw[3]
    if ndim != expected_ndim:
        raise DatasetError(f"{path} has {ndim} dimensions, expected {expected_ndim}")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DatasetError(f"{path} is truncated inside its header")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    size = int(np.prod(shape))
    if len(raw) != header + size:
        raise DatasetError(
            f"{path} is truncated or corrupt: header says shape {shape} ({size} bytes of data), "
            f"file holds {len(raw) - header}"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def load_mnist_idx(
    path: str | Path, kind: str = "mnist"
) -> tuple[TensorDataset, TensorDataset]:
    """Read MNIST or Fashion-MNIST from the four standard IDX files in a local directory.

    Looks in ``path`` and in the torchvision layout ``path/MNIST/raw`` (``FashionMNIST/raw``) for
    ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte`` and
    ``t10k-labels-idx1-ubyte``, each raw or ``.gz``.

    Parameters
    ----------
    path : str or Path
        The directory.
    kind : {"mnist", "fashion_mnist"}
        Which dataset (same format; used for messages and subdirectory names).

    Returns
    -------
    train, test : TensorDataset
        Features ``[n, 1, 28, 28]`` scaled to [0, 1], 10 classes.
    """
    if kind not in _IDX_SUBDIRS:
        raise ValueError(f"kind={kind!r} must be 'mnist' or 'fashion_mnist'")
    root = Path(path)
    _check_directory(root, kind, f"the four IDX files ({', '.join(_IDX_FILES.values())}, raw or "
                                 ".gz)")
    directories = [root] + [root / sub for sub in _IDX_SUBDIRS[kind]]
    arrays: dict[str, np.ndarray] = {}
    for key, stem in _IDX_FILES.items():
        found = _find_file(directories, stem)
        if found is None:
            raise DatasetError(
                f"{kind}: {stem}[.gz] not found in {root}; expected the four IDX files "
                f"{', '.join(_IDX_FILES.values())} (raw or .gz); nothing is downloaded"
            )
        arrays[key] = read_idx(found, 3 if key.endswith("images") else 1)
    out = []
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if images.shape[0] != labels.shape[0]:
            raise DatasetError(f"{kind} in {root}: {images.shape[0]} {split} images but "
                               f"{labels.shape[0]} {split} labels")
        if labels.size and labels.max() > 9:
            raise DatasetError(f"{kind} in {root}: {split} label {labels.max()} is not in 0..9")
        features = images[:, None, :, :].astype(np.float32) / 255.0
        out.append(_dataset(features, labels, 10, kind))
    return out[0], out[1]


# --------------------------------------------------------------------------------------------
# CIFAR-10 python batches


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickle plain containers and numpy arrays only, so a batch file cannot run code."""

    _ALLOWED = {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with path.open("rb") as handle:
            batch = _NumpyOnlyUnpickler(handle, encoding="bytes").load()
    except (OSError, EOFError, pickle.UnpicklingError, ValueError, TypeError,
            AttributeError, IndexError) as exc:
        raise DatasetError(f"{path} is not a readable CIFAR-10 batch ({exc})") from None
    if not isinstance(batch, dict):
        raise DatasetError(f"{path} is not a CIFAR-10 batch (no dict inside)")
    data = batch.get(b"data", batch.get("data"))
    labels = batch.get(b"labels", batch.get("labels"))
    if data is None or labels is None:
        raise DatasetError(f"{path} is not a CIFAR-10 batch (no 'data'/'labels' entries)")
    data = np.asarray(data)
    labels = np.asarray(labels)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise DatasetError(f"{path}: data has dtype {data.dtype} and shape {data.shape}, "
                           "expected uint8 [n, 3072]")
    if labels.shape != (data.shape[0],):
        raise DatasetError(f"{path}: {labels.shape} labels for {data.shape[0]} images")
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise DatasetError(f"{path}: labels outside 0..9")
    return data.reshape(-1, 3, 32, 32), labels


def load_cifar10(path: str | Path) -> tuple[TensorDataset, TensorDataset]:
    """Read CIFAR-10 from its python batches (``data_batch_1..5``, ``test_batch``).

    Parameters
    ----------
    path : str or Path
        The directory holding the batches, or its parent holding ``cifar-10-batches-py``.

    Returns
    -------
    train, test : TensorDataset
        Features ``[n, 3, 32, 32]`` scaled to [0, 1], 10 classes.
    """
    root = Path(path)
    expected = ", ".join(_CIFAR_FILES)
    _check_directory(root, "cifar10", f"the CIFAR-10 python batches ({expected})")
    directory = root / "cifar-10-batches-py" if (root / "cifar-10-batches-py").is_dir() else root
    missing = [name for name in _CIFAR_FILES if not (directory / name).is_file()]
    if missing:
        raise DatasetError(f"cifar10: {', '.join(missing)} not found in {directory}; expected "
                           f"the python batches {expected}; nothing is downloaded")
    parts = [_read_cifar_batch(directory / name) for name in _CIFAR_FILES]
    train_x = np.concatenate([x for x, _ in parts[:-1]])
    train_y = np.concatenate([y for _, y in parts[:-1]])
    test_x, test_y = parts[-1]
    return (_dataset(train_x.astype(np.float32) / 255.0, train_y, 10, "cifar10"),
            _dataset(test_x.astype(np.float32) / 255.0, test_y, 10, "cifar10"))


# --------------------------------------------------------------------------------------------
# Synthetic task


def make_synthetic(
    n_samples: int, n_features: int, n_classes: int, seed: int, *, class_sep: float = 3.0
) -> TensorDataset:
    """Draw a Gaussian-mixture classification task, keyed by ``seed``.

    Class ``c`` has mean ``class_sep * u_c`` with ``u_c`` a random unit vector, and every sample is
    its class mean plus standard normal noise; labels are uniform. A linear model can reach
    roughly ``1 - (n_classes - 1) * Phi(-class_sep / sqrt(2))`` accuracy.

    Returns
    -------
    TensorDataset
        Features ``[n_samples, n_features]``.
    """
    rng = numpy_generator(seed, purpose="synthetic")
    directions = rng.standard_normal((n_classes, n_features))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    labels = rng.integers(0, n_classes, size=n_samples)
    features = class_sep * directions[labels] + rng.standard_normal((n_samples, n_features))
    return _dataset(features, labels, n_classes, "synthetic")


def load_dataset(
    config: DataConfig, seed: int, loader: Callable[..., Any] | None = None
) -> tuple[TensorDataset, TensorDataset]:
    """Load the dataset named by ``config`` and return ``(train, test)``.

    Parameters
    ----------
    config : DataConfig
        The ``[data]`` section.
    seed : int
        The run's seed; keys splits and the synthetic task.
    loader : callable, optional
        The user's dataset function to call instead of importing ``config.name``
        (see :mod:`hflmpi.learn.custom_data`).

    Returns
    -------
    train, test : TensorDataset
        Standardised with training statistics when ``config.normalize``.
    """
    if loader is not None or ":" in config.name:
        from hflmpi.learn.custom_data import load_custom  # it builds on this module

        train, test = load_custom(loader or config.name, seed=seed, path=config.path,
                                  name=config.name)
    elif config.name == "digits":
        train, test = load_digits(seed, config.test_fraction)
    elif config.name in ("mnist", "fashion_mnist"):
        train, test = load_mnist_idx(config.path, config.name)
    elif config.name == "cifar10":
        train, test = load_cifar10(config.path)
    elif config.name == "synthetic":
        full = make_synthetic(config.synthetic_samples, config.synthetic_features,
                              config.synthetic_classes, seed)
        train, test = train_test_split(full, config.test_fraction, seed)
    else:  # pragma: no cover - DataConfig validates the name
        raise ValueError(f"unknown dataset {config.name!r}")
    if config.normalize:
        train, test = standardize(train, test)
    return train, test
