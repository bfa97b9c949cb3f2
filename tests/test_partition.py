"""Serial tests of the client partitions: coverage, balance and label skew."""

from __future__ import annotations

import numpy as np
import pytest

from hflmpi.config import DataConfig
from hflmpi.learn.partition import (
    dirichlet,
    iid,
    label_sorted,
    make_partition,
    partition_stats,
    shards,
)

BALANCED = np.repeat(np.arange(10), 600)  # 6000 samples, 10 equal classes


def _uneven_labels(seed=0, n=1237, classes=7):
    return np.random.default_rng(seed).choice(classes, size=n, p=np.linspace(1, 3, classes) / 14)


def _rng(seed=0):
    return np.random.default_rng(seed)


def _assert_exact_cover(parts, n):
    joined = np.concatenate(parts)
    assert joined.dtype == np.int64
    np.testing.assert_array_equal(np.sort(joined), np.arange(n))
    for p in parts:
        np.testing.assert_array_equal(p, np.sort(p))


METHODS = {
    "iid": lambda labels, k, rng: iid(labels, k, rng),
    "dirichlet_0.1": lambda labels, k, rng: dirichlet(labels, k, rng, 0.1),
    "dirichlet_10": lambda labels, k, rng: dirichlet(labels, k, rng, 10.0),
    "shards": lambda labels, k, rng: shards(labels, k, rng, 2),
    "label_sorted": lambda labels, k, rng: label_sorted(labels, k, rng),
}


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("clients", [1, 3, 8, 13])
def test_every_sample_exactly_once(method, clients):
    labels = _uneven_labels()
    parts = METHODS[method](labels, clients, _rng(clients))
    assert len(parts) == clients
    _assert_exact_cover(parts, labels.size)
    assert min(len(p) for p in parts) >= 1


def test_iid_sizes_balanced_and_labels_near_global():
    parts = iid(_uneven_labels(), 8, _rng())
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1
    assert partition_stats(iid(BALANCED, 10, _rng()), BALANCED, 10).mean_tv_distance() < 0.08


def test_dirichlet_alpha_controls_skew():
    tv = {
        alpha: partition_stats(dirichlet(BALANCED, 10, _rng(5), alpha), BALANCED, 10)
        .mean_tv_distance()
        for alpha in (100.0, 0.5, 0.05)
    }
    assert tv[100.0] < 0.08, tv
    assert tv[0.05] > 0.6, tv
    assert tv[100.0] < tv[0.5] < tv[0.05], tv


def test_dirichlet_minimum_size_by_top_up():
    labels = np.repeat(np.arange(4), 5)  # 20 samples, 10 clients, very skewed: redraws fail
    parts = dirichlet(labels, 10, _rng(), 0.01, min_size=2, max_tries=1)
    _assert_exact_cover(parts, labels.size)
    assert all(len(p) == 2 for p in parts)
    with pytest.raises(ValueError, match="needs 30 samples"):
        dirichlet(labels, 10, _rng(), 0.5, min_size=3)


def test_shards_limit_labels_per_client():
    parts = shards(BALANCED, 20, _rng(), 3)  # 60 shards of 100: aligned with classes of 600
    stats = partition_stats(parts, BALANCED, 10)
    assert set(stats.sizes.tolist()) == {300}
    assert ((stats.histograms > 0).sum(axis=1) <= 3).all()
    assert ((stats.histograms > 0).sum(axis=1) >= 1).all()
    labels = _uneven_labels()  # unaligned: a shard may straddle one class boundary
    stats = partition_stats(shards(labels, 9, _rng(), 2), labels, 7)
    assert ((stats.histograms > 0).sum(axis=1) <= 4).all()
    with pytest.raises(ValueError, match="needs 40 shards"):
        shards(np.zeros(30, dtype=np.int64), 20, _rng(), 2)


def test_label_sorted_is_contiguous_in_label_order():
    labels = _uneven_labels()
    parts = label_sorted(labels, 6, _rng())
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1
    for left, right in zip(parts, parts[1:]):
        assert labels[left].max() <= labels[right].min()
    stats = partition_stats(label_sorted(BALANCED, 10, _rng()), BALANCED, 10)
    assert ((stats.histograms > 0).sum(axis=1) == 1).all()
    assert stats.mean_tv_distance() == pytest.approx(0.9)


def test_make_partition_is_keyed_by_seed():
    labels = _uneven_labels()
    for name in ("iid", "dirichlet", "shards", "label_sorted"):
        cfg = DataConfig(partition=name)
        a = make_partition(labels, 5, cfg, seed=11)
        b = make_partition(labels, 5, cfg, seed=11)
        c = make_partition(labels, 5, cfg, seed=12)
        assert all(np.array_equal(x, y) for x, y in zip(a, b))
        if name != "label_sorted":  # label_sorted's blocks do not depend on the seed
            assert not all(np.array_equal(x, y) for x, y in zip(a, c))


def test_partition_stats_counts():
    labels = np.array([0, 1, 1, 2, 2, 2])
    stats = partition_stats([np.array([0, 3]), np.array([1, 2, 4, 5])], labels, 4)
    np.testing.assert_array_equal(stats.sizes, [2, 4])
    np.testing.assert_array_equal(stats.histograms, [[1, 0, 1, 0], [0, 2, 2, 0]])
    np.testing.assert_allclose(stats.label_distributions().sum(axis=1), 1.0)


def test_bad_inputs():
    with pytest.raises(ValueError, match="cannot give each of 5 clients"):
        iid(np.zeros(3, dtype=np.int64), 5, _rng())
    with pytest.raises(ValueError, match="1-D integer"):
        iid(np.zeros(3), 2, _rng())
    with pytest.raises(ValueError, match="alpha"):
        dirichlet(BALANCED, 2, _rng(), 0.0)
