"""Tests of :mod:`hflmpi.core.costmodel`: collective formulas, hflmpi's layers, bytes and calibration."""

from __future__ import annotations

import math

import numpy as np
import pytest

from hflmpi.core.costmodel import (
    INTERCONNECTS,
    Network,
    Sample,
    aggregation_costs,
    aggregation_counts,
    bytes_per_layer,
    bytes_per_round,
    calibrate,
    coefficients,
    collective_time,
    event_counts,
    fit_compute,
    layer_time,
    predict,
    round_time,
    tree_for,
)
from hflmpi.core.schedule import round_events

NET = Network("test", alpha=1e-5, beta=1e-9, gamma=1e-10)


def test_collective_formulas_by_hand():
    a, b, g = NET.alpha, NET.beta, NET.gamma
    # one process: free
    assert collective_time("allreduce", 1, 1e6, NET) == 0
    # short allreduce, p = 8: recursive doubling, 3 steps of (a + n b + n g)
    assert collective_time("allreduce", 8, 1024, NET) == pytest.approx(3 * (a + 1024 * b + 1024 * g))
    # long allreduce, p = 8: Rabenseifner 2 lg p a + 2 (p-1)/p n b + (p-1)/p n g
    n = 4e6
    assert collective_time("allreduce", 8, n, NET) == pytest.approx(
        6 * a + 2 * 7 / 8 * n * b + 7 / 8 * n * g)
    # p = 6 (not a power of two): ceil(log2 6) = 3
    assert collective_time("reduce", 6, n, NET) == pytest.approx(6 * a + 2 * 5 / 6 * n * b + 5 / 6 * n * g)
    assert collective_time("reduce", 4, 100, NET) == pytest.approx(2 * (a + 100 * b + 100 * g))
    # bcast: binomial for p < 8, scatter + recursive doubling (p = 8, medium), ring (long)
    assert collective_time("bcast", 4, n, NET) == pytest.approx(2 * (a + n * b))
    assert collective_time("bcast", 8, 100_000, NET) == pytest.approx(6 * a + 2 * 7 / 8 * 100_000 * b)
    assert collective_time("bcast", 8, n, NET) == pytest.approx((3 + 7) * a + 2 * 7 / 8 * n * b)
    assert collective_time("gather", 4, 1000, NET) == pytest.approx(2 * a + 3 * 1000 * b)
    ring = Network("r", a, b, g, family="nccl")
    assert collective_time("allreduce", 8, n, ring) == pytest.approx(14 * a + 2 * 7 / 8 * n * b + 7 / 8 * n * g)
    assert collective_time("bcast", 8, n, ring) == pytest.approx(7 * a + n * b)
    with pytest.raises(ValueError):
        coefficients("scan", 4, 10)  # type: ignore[arg-type]


def test_layer_time_exact_and_quantized():
    numel = 100_000
    exact = layer_time(4, numel, 0, NET)
    assert exact == pytest.approx(collective_time("allreduce", 4, 8, NET)
                                  + collective_time("reduce", 4, 4 * numel, NET)
                                  + collective_time("bcast", 4, 4 * numel, NET))
    # 8 bits, fan-in 4: 3 packed rows into the leader (3 B/entry) against 2 tree hops of
    # 10-bit lanes, 6 a word (2 * 8/6 B/entry) -> a reduce of the lane words
    q8 = layer_time(4, numel, 8, NET, bucket_size=512)
    scales = 4 * math.ceil(numel / 512)
    assert q8 == pytest.approx(collective_time("allreduce", 4, 8, NET)
                               + collective_time("allreduce", 4, scales, NET)
                               + collective_time("reduce", 4, 8 * math.ceil(numel / 6), NET)
                               + collective_time("bcast", 4, 4 * numel, NET))
    # 8 bits, fan-in 2: one packed row -> gather
    q8 = layer_time(2, numel, 8, NET, bucket_size=512)
    assert q8 == pytest.approx(collective_time("allreduce", 2, 8, NET)
                               + collective_time("allreduce", 2, scales, NET)
                               + collective_time("gather", 2, numel, NET)
                               + collective_time("bcast", 2, 4 * numel, NET))
    assert layer_time(1, numel, 8, NET) == 0  # a single participant communicates nothing


def test_event_counts_and_round_time():
    assert event_counts([5]) == [1]
    assert event_counts([5, 2]) == [1, 1]
    assert event_counts([2, 3, 4]) == [12 - 4, 4 - 1, 1]
    assert event_counts([4, 1]) == [0, 1]  # tau_2 = 1: every layer-1 period ends a round
    assert aggregation_counts([2, 3, 4]) == [12, 4, 1]
    for tau in ([5], [5, 2], [2, 3, 4], [4, 1], [1, 3, 1, 2]):  # what the nested schedule runs
        layers = [layer for _, layer in round_events(tau)]
        assert event_counts(tau) == [layers.count(n) for n in range(1, len(tau) + 1)], tau
    fan, tau, numel, t_cp = [2, 4], [3, 2], 10_000, 1e-3
    costs = aggregation_costs(fan, numel, NET, bits=[8, 8], algorithm="tree")
    l1, l2 = layer_time(2, numel, 8, NET), layer_time(4, numel, 8, NET)
    assert costs == pytest.approx([l1, l2])
    # the plan's formula: t_cp prod(tau) + t_cm,1 * tau_2 + t_cm,2
    assert round_time(tau, 0.0, costs) == pytest.approx(l1 * 2 + l2)
    assert round_time(tau, t_cp, costs) == pytest.approx(t_cp * 6 + l1 * 2 + l2)
    # exact subtree: one layer-1 event (allreduce over 2) + one global event (allreduce over 8)
    comm_exact = round_time(tau, 0.0, aggregation_costs(fan, numel, NET))
    assert comm_exact == pytest.approx(
        collective_time("allreduce", 2, 8, NET) + collective_time("allreduce", 2, 4 * numel, NET)
        + collective_time("allreduce", 8, 8, NET) + collective_time("allreduce", 8, 4 * numel, NET))


def test_round_time_matches_hand_computation():
    # T = t_cp*prod(tau) + sum_n t_cm,n * prod_{m>n} tau_m
    assert round_time([5], 0.1, [1.0]) == pytest.approx(0.5 + 1.0)
    assert round_time([5, 2], 0.1, [1.0, 3.0]) == pytest.approx(0.1 * 10 + 1.0 * 2 + 3.0)
    assert round_time([2, 3, 4], 0.01, [0.1, 0.2, 0.5]) == pytest.approx(
        0.01 * 24 + 0.1 * 12 + 0.2 * 4 + 0.5)
    assert round_time([1, 1, 1], 1.0, [0.0, 0.0, 0.0]) == 1.0
    # one schedule per row gives one time per row, the same floats as one at a time
    rows = np.array([[5, 2], [1, 1], [3, 7]])
    times = round_time(rows, 0.1, [1.0, 3.0])
    assert times.tolist() == [round_time(list(r), 0.1, [1.0, 3.0]) for r in rows.tolist()]
    with pytest.raises(ValueError, match="one per t_cm"):
        round_time([5, 2], 0.1, [1.0])
    with pytest.raises(ValueError, match="integers >= 1"):
        round_time([5, 0], 0.1, [1.0, 1.0])


def test_bytes_match_a_real_run_record():
    # runs/default.h5 of the development machine: 4 ranks, fanouts [2, 2], tau [5, 4], 8-bit
    # uplinks, MLP 64-128-10 (9610 parameters); its /metrics/bytes_sent row is [78096, 9762].
    assert bytes_per_layer([2, 2], [5, 4], 9610, [8, 8]) == [78096.0, 9762.0]
    # exact subtree: (m_L - 1) * 4 numel per subtree, charged to the top layer
    assert bytes_per_layer([2, 4], [3, 2], 1000, [0, 0]) == [4 * 1 * 4000.0, 7 * 4000.0]
    assert bytes_per_round([8], [5], 1000) == 7 * 4000.0
    # forced integer sum at 8 bits over pairs: int16 levels, 2 B per entry (+ scales of 512)
    scales = 4 * math.ceil(9610 / 512)
    assert bytes_per_layer([2, 2], [5, 4], 9610, [8, 8], method="sum") == [
        4 * 2 * (2 * 9610 + 2 * scales), 1 * (2 * 9610 + 2 * scales)]


def test_tree_for_and_predict():
    assert tree_for(64, 1) == [64]
    assert tree_for(64, 2) == [8, 8]
    assert tree_for(64, 3) == [8, 2, 4]
    assert tree_for(4096, 3) == [8, 16, 32]
    out = predict(64, [8, 8], [4, 2], 1_000_000, 0.01, INTERCONNECTS["ib-hdr"])
    assert out["rounds_per_second"] == pytest.approx(1 / out["round_seconds"])
    assert out["round_seconds"] > 0.08 and out["comm_seconds"] > 0
    with pytest.raises(ValueError):
        predict(64, [8, 4], [4, 2], 1000, 0.01, NET)
    # hybrid: NVLink inside the node, InfiniBand above it; faster than InfiniBand alone
    hybrid = predict(64, [8, 8], [4, 2], 1_000_000, 0.01, [INTERCONNECTS["nvlink"], INTERCONNECTS["ib-hdr"]],
                     bits=[0, 8])
    ib = predict(64, [8, 8], [4, 2], 1_000_000, 0.01, INTERCONNECTS["ib-hdr"], bits=[0, 8])
    assert hybrid["round_seconds"] < ib["round_seconds"]


@pytest.mark.parametrize("family", ["mpich", "nccl"])
def test_calibration_recovers_known_parameters(family):
    truth = Network("truth", alpha=3e-5, beta=2.5e-9, gamma=4e-10, family=family)
    samples = [Sample(op, p, n, collective_time(op, p, n, truth))
               for op in ("allreduce", "reduce", "bcast", "gather")
               for p in (2, 3, 4, 8)
               for n in (8, 1024, 65536, 1 << 20, 1 << 22)]
    samples.append(Sample("allreduce", 1, 1000, 1e-7))  # p = 1: ignored
    fit = calibrate(samples, family=family)
    assert fit.alpha == pytest.approx(truth.alpha, rel=1e-6)
    assert fit.beta == pytest.approx(truth.beta, rel=1e-6)
    assert fit.gamma == pytest.approx(truth.gamma, rel=1e-6)


def test_calibration_with_noise_and_nonnegativity():
    rng = np.random.default_rng(0)
    truth = Network("truth", alpha=2e-5, beta=1e-9, gamma=0.0)
    samples = [Sample("allreduce", p, n, collective_time("allreduce", p, n, truth) * rng.uniform(0.97, 1.03))
               for p in (2, 4, 8) for n in (8, 4096, 1 << 18, 1 << 22) for _ in range(3)]
    fit = calibrate(samples)
    assert min(fit.alpha, fit.beta, fit.gamma) >= 0
    assert fit.alpha == pytest.approx(truth.alpha, rel=0.1)
    assert fit.beta == pytest.approx(truth.beta, rel=0.15)
    with pytest.raises(ValueError, match="needs >= 3"):
        calibrate(samples[:2])


def test_fit_compute():
    c0, c1 = fit_compute([8, 16, 32, 32], [1e-3 + 8e-5, 1e-3 + 16e-5, 1e-3 + 32e-5, 1e-3 + 32e-5])
    assert c0 == pytest.approx(1e-3) and c1 == pytest.approx(1e-5)
    assert fit_compute([32, 32], [0.0032, 0.0032]) == (0.0, pytest.approx(1e-4))
