"""The user's own dataset: a function returning ``(x_train, y_train, x_test, y_test)``.

Named in the config as ``data.name = "package.module:function"``, or passed to
:func:`hflmpi.train` as ``dataset=function``. The function is called on every rank with the
keyword arguments it names among ``seed`` (``run.seed``) and ``path`` (``data.path``), and must
return the same arrays on every rank (the partition is computed from them everywhere).

Each part may be a numpy array, a torch tensor, or anything :func:`numpy.asarray` takes:

* ``x_train``, ``x_test``: real numbers ``[n, *input_shape]`` (the same ``input_shape``, at
  least one feature), finite; stored as float32;
* ``y_train``, ``y_test``: integer class labels ``[n]`` in ``0..num_classes - 1``;
* optionally a fifth item ``num_classes`` (an int >= 2); without it, the largest label of
  either part plus one (give it when the largest class may be missing from the data).

Anything else raises :class:`hflmpi.learn.data.DatasetError`, naming the part and what to fix.
``data.test_fraction`` does not apply (the function gives the split); ``data.normalize`` does.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from hflmpi.importing import accepted_kwargs, import_object
from hflmpi.learn.data import DatasetError, TensorDataset

__all__ = ["load_custom", "check_arrays"]

_PARTS = ("x_train", "y_train", "x_test", "y_test")


def load_custom(
    loader: Callable[..., Any] | str, *, seed: int, path: str = "", name: str | None = None
) -> tuple[TensorDataset, TensorDataset]:
    """Call the user's loader and return its checked ``(train, test)`` datasets.

    Parameters
    ----------
    loader : callable or str
        The function, or its import path ``"package.module:function"``.
    seed : int
        Passed as ``seed=`` when the function names that parameter.
    path : str
        Passed as ``path=`` when the function names that parameter.
    name : str, optional
        What to call the data in messages and the run file (default: the import path).
    """
    if isinstance(loader, str):
        name = name or loader
        try:
            loader = import_object(loader, "data.name")
        except ValueError as exc:
            raise DatasetError(str(exc)) from None
    name = name or _describe(loader)
    if not callable(loader):
        raise DatasetError(f"data.name={name!r} is not callable; name a function returning "
                           "(x_train, y_train, x_test, y_test)")
    returned = loader(**accepted_kwargs(loader, {"seed": seed, "path": path}))
    return check_arrays(returned, name)


def check_arrays(returned: Any, name: str) -> tuple[TensorDataset, TensorDataset]:
    """Check what a loader returned and turn it into ``(train, test)`` datasets.

    Raises
    ------
    DatasetError
        If it is not four arrays of the documented shapes and types, holds NaN/Inf features, or
        labels outside ``0..num_classes - 1``.
    """
    where = f"dataset {name!r}"
    if not isinstance(returned, (tuple, list)) or len(returned) not in (4, 5):
        raise DatasetError(f"{where} returned {_kind(returned)}; the function must return a tuple "
                           "(x_train, y_train, x_test, y_test) or (..., num_classes)")
    arrays = {part: _as_numpy(value, f"{where}: {part}") for part, value in zip(_PARTS, returned)}
    x_train, x_test = (_features(arrays[p], f"{where}: {p}") for p in ("x_train", "x_test"))
    y_train, y_test = (_labels(arrays[p], f"{where}: {p}") for p in ("y_train", "y_test"))
    if x_train.shape[1:] != x_test.shape[1:]:
        raise DatasetError(f"{where}: x_train samples have shape {x_train.shape[1:]} but x_test "
                           f"samples {x_test.shape[1:]}; both must be [n, *input_shape] alike")
    for x, y, split in ((x_train, y_train, "train"), (x_test, y_test, "test")):
        if len(x) != len(y):
            raise DatasetError(f"{where}: x_{split} has {len(x)} samples but y_{split} has "
                               f"{len(y)} labels; give one label per sample")
        if len(x) == 0:
            raise DatasetError(f"{where}: the {split} part is empty; give at least one sample")
    largest = int(max(y_train.max(), y_test.max()))
    num_classes = _num_classes(returned[4], largest, where) if len(returned) == 5 else largest + 1
    if num_classes < 2:
        raise DatasetError(f"{where}: every label is 0, so there is one class; classification "
                           "needs labels 0..num_classes-1 with num_classes >= 2")
    return (_dataset(x_train, y_train, num_classes, name),
            _dataset(x_test, y_test, num_classes, name))


def _num_classes(value: Any, largest: int, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 2:
        raise DatasetError(f"{where}: num_classes (the fifth item) is {value!r}; give an int >= 2")
    if largest >= value:
        raise DatasetError(f"{where} holds the label {largest} but num_classes is {int(value)}; "
                           f"labels must be 0..{int(value) - 1}")
    return int(value)


def _describe(loader: Any) -> str:
    module = getattr(loader, "__module__", None) or "?"
    return f"{module}:{getattr(loader, '__qualname__', type(loader).__name__)}"


def _kind(value: Any) -> str:
    if isinstance(value, (tuple, list)):
        return f"a {type(value).__name__} of {len(value)} items"
    return f"a {type(value).__name__}"


def _as_numpy(value: Any, where: str) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    try:
        array = np.asarray(value)
    except (TypeError, ValueError) as exc:
        raise DatasetError(f"{where} is not an array ({exc})") from None
    if array.dtype == object:
        raise DatasetError(f"{where} is not a numeric array (ragged or of objects: "
                           f"{type(value).__name__})")
    return array


def _features(x: np.ndarray, where: str) -> np.ndarray:
    if x.dtype.kind not in "iuf" or x.ndim < 2 or math.prod(x.shape[1:]) == 0:
        raise DatasetError(f"{where} has dtype {x.dtype} and shape {x.shape}; features must be "
                           "real numbers [n, *input_shape] with at least one feature per sample")
    flat = x.reshape(len(x), math.prod(x.shape[1:]))
    bad = ~np.isfinite(flat).all(axis=1) if x.dtype.kind == "f" else None
    if bad is not None and bad.any():
        rows = np.flatnonzero(bad)
        raise DatasetError(f"{where} holds NaN or Inf in {len(rows)} sample(s), the first at "
                           f"row {rows[0]}; clean or drop them")
    as32 = x.astype(np.float32)
    if not np.isfinite(as32).all():
        raise DatasetError(f"{where} holds values beyond float32 range (|x| > 3.4e38); rescale")
    return as32


def _labels(y: np.ndarray, where: str) -> np.ndarray:
    if y.dtype.kind not in "iu":
        raise DatasetError(f"{where} has dtype {y.dtype}; labels must be integers 0..num_classes-1 "
                           "(e.g. y.astype(int), or np.unique(y, return_inverse=True)[1])")
    if y.ndim != 1:
        raise DatasetError(f"{where} has shape {y.shape}; labels must be one integer per sample, "
                           "shape [n] (not one-hot)")
    if y.size and y.min() < 0:
        raise DatasetError(f"{where} holds the label {int(y.min())}; labels must be "
                           "0..num_classes-1")
    return y.astype(np.int64)


def _dataset(x: np.ndarray, y: np.ndarray, num_classes: int, name: str) -> TensorDataset:
    return TensorDataset(torch.from_numpy(np.ascontiguousarray(x)),
                         torch.from_numpy(np.ascontiguousarray(y)), num_classes, name)
