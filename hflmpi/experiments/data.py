"""Digits enlarged by one-pixel shifts: a training set big enough for populations of 64+ clients.

scikit-learn's digits hold 1,437 training images (``test_fraction = 0.2``), about 22 per client
at 64 clients, less than one minibatch of 32. :func:`shifted_digits` keeps the same seeded
train/test split as ``data.name = "digits"`` and adds, for every training image, its copies
shifted by one pixel up, down, left and right (zero fill): 5 x 1,437 = 7,185 training images.
The test set is the untouched held-out digits, so accuracies stay comparable with the
8-client experiments. Named in a config as
``data.name = "hflmpi.experiments.data:shifted_digits"`` (:mod:`hflmpi.learn.custom_data`).
"""

from __future__ import annotations

import numpy as np

__all__ = ["shift_images", "shifted_digits"]

_SHIFTS = ((-1, 0), (1, 0), (0, -1), (0, 1))


def shift_images(images: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """Shift images ``[n, c, h, w]`` by ``rows`` down and ``cols`` right, filling with zeros.

    Parameters
    ----------
    images : ndarray, shape [n, c, h, w]
    rows, cols : int
        Pixels to move the content down / right (negative: up / left); ``|shift| < h, w``.

    Returns
    -------
    ndarray
        A new array of the same shape and dtype.
    """
    out = np.zeros_like(images)
    h, w = images.shape[-2:]
    src_r = slice(max(0, -rows), h - max(0, rows))
    dst_r = slice(max(0, rows), h - max(0, -rows))
    src_c = slice(max(0, -cols), w - max(0, cols))
    dst_c = slice(max(0, cols), w - max(0, -cols))
    out[..., dst_r, dst_c] = images[..., src_r, src_c]
    return out


def shifted_digits(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]:
    """Return digits' seeded split with the training set enlarged five-fold by one-pixel shifts.

    Parameters
    ----------
    seed : int
        ``run.seed``; keys the train/test split exactly as ``data.name = "digits"`` does.

    Returns
    -------
    x_train, y_train, x_test, y_test : ndarray
        Images ``[n, 1, 8, 8]`` in [0, 1]; the training part is the original images followed by
        their four shifted copies (in the order up, down, left, right).
    num_classes : int
        10.
    """
    from hflmpi.learn.data import load_digits

    train, test = load_digits(seed, 0.2)
    x = train.features.numpy()
    y = train.labels.numpy()
    x_train = np.concatenate([x] + [shift_images(x, r, c) for r, c in _SHIFTS])
    y_train = np.concatenate([y] * (1 + len(_SHIFTS)))
    return x_train, y_train, test.features.numpy(), test.labels.numpy(), 10
