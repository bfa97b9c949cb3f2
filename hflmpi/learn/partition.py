"""Split training samples over clients: IID, Dirichlet label skew, label shards, label-sorted.

Pure functions from integer labels, a client count and a numpy ``Generator`` to one sorted int64
index array per client. Every sample goes to exactly one client. References: Dirichlet label skew
(Hsu et al., 2019, arXiv 1909.06335), label shards (McMahan et al., FedAvg, AISTATS 2017), the
label-sorted split as the extreme non-IID case of H-SGD (Wang et al., AAAI 2022).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hflmpi.config import DataConfig
from hflmpi.core.rng import numpy_generator

__all__ = [
    "iid",
    "dirichlet",
    "shards",
    "label_sorted",
    "make_partition",
    "PartitionStats",
    "partition_stats",
]


def _check(labels: np.ndarray, num_clients: int) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be a 1-D integer array, got {labels.dtype} {labels.shape}")
    if num_clients < 1:
        raise ValueError(f"num_clients={num_clients} must be >= 1")
    if labels.size < num_clients:
        raise ValueError(
            f"{labels.size} samples cannot give each of {num_clients} clients at least one; "
            "use fewer ranks or more data"
        )
    return labels


def _finish(parts: list[np.ndarray]) -> list[np.ndarray]:
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


def iid(labels: np.ndarray, num_clients: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Deal a random permutation into ``num_clients`` parts whose sizes differ by at most one."""
    labels = _check(labels, num_clients)
    return _finish(np.array_split(rng.permutation(labels.size), num_clients))


def _label_order(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Return sample indices sorted by label, in random order within each label."""
    shuffled = rng.permutation(labels.size)
    return shuffled[np.argsort(labels[shuffled], kind="stable")]


def dirichlet(
    labels: np.ndarray,
    num_clients: int,
    rng: np.random.Generator,
    alpha: float,
    *,
    min_size: int = 1,
    max_tries: int = 100,
) -> list[np.ndarray]:
    """Split each class over the clients in proportions drawn from ``Dirichlet(alpha * 1)``.

    For every class independently, ``p ~ Dir(alpha, ..., alpha)`` (one entry per client) and the
    class's shuffled samples are cut at the cumulative proportions. Small ``alpha`` gives each
    client few classes; large ``alpha`` approaches IID.

    Minimum size: the whole draw is repeated (up to ``max_tries`` times) until every client holds
    at least ``min_size`` samples. If no draw succeeds, the last draw is topped up by moving
    randomly chosen samples from the currently largest clients to the short ones, which perturbs
    the label proportions slightly but always terminates.

    Parameters
    ----------
    labels : ndarray of int
        One label per sample.
    num_clients : int
        Number of parts.
    rng : numpy.random.Generator
        The randomness (use ``numpy_generator(seed, purpose="partition")``).
    alpha : float
        Dirichlet concentration, > 0.
    min_size : int
        Smallest allowed part.
    max_tries : int
        Redraws before topping up.

    Returns
    -------
    list of ndarray
        Sorted int64 sample indices per client.
    """
    labels = _check(labels, num_clients)
    if alpha <= 0:
        raise ValueError(f"alpha={alpha} must be > 0")
    if min_size * num_clients > labels.size:
        raise ValueError(
            f"min_size={min_size} for {num_clients} clients needs {min_size * num_clients} "
            f"samples, only {labels.size} exist"
        )
    classes = np.unique(labels)
    by_class = [rng.permutation(np.flatnonzero(labels == c)) for c in classes]
    parts: list[list[int]] = []
    for _ in range(max(1, max_tries)):
        parts = [[] for _ in range(num_clients)]
        for members in by_class:
            proportions = rng.dirichlet(np.full(num_clients, float(alpha)))
            cuts = (np.cumsum(proportions)[:-1] * members.size).astype(np.int64)
            for client, chunk in enumerate(np.split(members, cuts)):
                parts[client].extend(chunk.tolist())
        if min(len(p) for p in parts) >= min_size:
            return _finish([np.asarray(p) for p in parts])
    return _finish(_top_up(parts, min_size, rng))


def _top_up(parts: list[list[int]], min_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    arrays = [rng.permutation(np.asarray(p, dtype=np.int64)) for p in parts]
    for client in range(len(arrays)):
        while arrays[client].size < min_size:
            donor = int(np.argmax([a.size for a in arrays]))
            take = min(min_size - arrays[client].size, arrays[donor].size - min_size)
            arrays[client] = np.concatenate([arrays[client], arrays[donor][:take]])
            arrays[donor] = arrays[donor][take:]
    return arrays


def shards(
    labels: np.ndarray, num_clients: int, rng: np.random.Generator, shards_per_client: int
) -> list[np.ndarray]:
    """Sort by label, cut into ``num_clients * shards_per_client`` shards, deal them at random.

    Shard sizes differ by at most one. A client holds at most ``shards_per_client`` labels when
    the class sizes are multiples of the shard size; otherwise a shard can straddle a class
    boundary, so a client holds at most ``2 * shards_per_client`` labels.
    """
    labels = _check(labels, num_clients)
    count = num_clients * shards_per_client
    if shards_per_client < 1 or count > labels.size:
        raise ValueError(
            f"shards_per_client={shards_per_client} with {num_clients} clients needs "
            f"{count} shards of >= 1 sample, but there are {labels.size} samples"
        )
    pieces = np.array_split(_label_order(labels, rng), count)
    dealt = rng.permutation(count).reshape(num_clients, shards_per_client)
    return _finish([np.concatenate([pieces[s] for s in row]) for row in dealt])


def label_sorted(
    labels: np.ndarray, num_clients: int, rng: np.random.Generator
) -> list[np.ndarray]:
    """Sort by label and give client ``k`` the ``k``-th contiguous block (sizes differ by <= 1).

    The extreme non-IID split: each client sees one or two labels, neighbouring clients share
    at most a boundary label. ``rng`` only shuffles samples within a label.
    """
    labels = _check(labels, num_clients)
    return _finish(np.array_split(_label_order(labels, rng), num_clients))


def make_partition(
    labels: np.ndarray, num_clients: int, config: DataConfig, seed: int
) -> list[np.ndarray]:
    """Partition by ``config.partition`` with the generator keyed ``(seed, "partition")``.

    Every rank computes the same split from the same seed, so no partition is ever sent.
    """
    rng = numpy_generator(seed, purpose="partition")
    if config.partition == "iid":
        return iid(labels, num_clients, rng)
    if config.partition == "dirichlet":
        return dirichlet(labels, num_clients, rng, config.alpha)
    if config.partition == "shards":
        return shards(labels, num_clients, rng, config.shards_per_client)
    if config.partition == "label_sorted":
        return label_sorted(labels, num_clients, rng)
    raise ValueError(f"unknown partition {config.partition!r}")  # pragma: no cover


@dataclass(frozen=True)
class PartitionStats:
    """Per-client sizes and label histograms of a partition.

    Attributes
    ----------
    sizes : ndarray of int64, shape [clients]
    histograms : ndarray of int64, shape [clients, num_classes]
    """

    sizes: np.ndarray
    histograms: np.ndarray

    def label_distributions(self) -> np.ndarray:
        """Return each client's label distribution, rows summing to 1 (0 rows for empty clients)."""
        return self.histograms / np.maximum(self.sizes, 1)[:, None]

    def mean_tv_distance(self) -> float:
        """Return the mean total-variation distance of client label distributions from the global.

        0 for a perfectly IID split; close to 1 when every client holds one rare label.
        """
        total = self.histograms.sum(axis=0)
        global_dist = total / max(int(total.sum()), 1)
        tv = 0.5 * np.abs(self.label_distributions() - global_dist[None, :]).sum(axis=1)
        return float(tv.mean())


def partition_stats(
    parts: list[np.ndarray], labels: np.ndarray, num_classes: int
) -> PartitionStats:
    """Return the size and label histogram of every part (for the run file)."""
    labels = np.asarray(labels)
    histograms = np.stack(
        [np.bincount(labels[p], minlength=num_classes)[:num_classes] for p in parts]
    ).astype(np.int64)
    sizes = np.array([len(p) for p in parts], dtype=np.int64)
    return PartitionStats(sizes=sizes, histograms=histograms)
