"""Robust aggregation rules: numpy references, tie rules, validation, and a Byzantine simulation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hflmpi.core.robust import (
    RULES,
    coordinate_median,
    krum,
    krum_scores,
    max_byzantine,
    robust_update,
    trim_count,
    trimmed_mean,
    weighted_mean,
)


def _close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Compare with numpy (``torch.testing`` takes seconds to import)."""
    np.testing.assert_allclose(actual.numpy(), expected.numpy(), rtol=1e-12, atol=1e-15)


def _updates(k: int, n: int, seed: int = 0, dtype=torch.float64) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    return torch.from_numpy(rng.standard_normal((k, n))).to(dtype)


# --------------------------------------------------------------------------------------------
# Median
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 2, 3, 4, 7, 10])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_median_matches_numpy(k, dtype):
    u = _updates(k, 1001, seed=k, dtype=dtype)
    expected = np.median(u.numpy(), axis=0)
    got = coordinate_median(u, chunk_size=97)  # many uneven blocks
    assert got.dtype == dtype
    np.testing.assert_array_equal(got.numpy(), expected)


def test_median_even_k_averages_the_middle_pair():
    u = torch.tensor([[0.0], [1.0], [3.0], [10.0]])
    assert coordinate_median(u).item() == 2.0  # torch.median would give 1.0


def _weighted_median_reference(values: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """The documented rule, one coordinate at a time, with exact rational half comparisons."""
    keep = weights > 0
    values, weights = values[keep], weights[keep]
    total = weights.sum()
    out = np.empty(values.shape[1])
    for col in range(values.shape[1]):
        order = np.argsort(values[:, col], kind="stable")
        v, cum = values[order, col], np.cumsum(weights[order])
        i = int(np.argmax(2 * cum >= total))
        out[col] = (v[i] + v[i + 1]) / 2 if 2 * cum[i] == total else v[i]
    return out


@pytest.mark.parametrize("k", [2, 3, 5, 8])
def test_weighted_median_matches_reference(k):
    rng = np.random.default_rng(k)
    u = rng.standard_normal((k, 300))
    w = rng.integers(0, 5, size=k).astype(float)
    w[0] = 3.0  # at least one positive
    got = coordinate_median(torch.from_numpy(u), torch.from_numpy(w), chunk_size=64)
    np.testing.assert_array_equal(got.numpy(), _weighted_median_reference(u, w))


def test_weighted_median_equal_weights_is_the_plain_median():
    for k in (4, 5):
        u = _updates(k, 500, seed=3)
        for weight in (1.0, 0.1, 7.0):
            got = coordinate_median(u, torch.full((k,), weight))
            np.testing.assert_array_equal(got.numpy(), np.median(u.numpy(), axis=0))


def test_weighted_median_half_weight_tie_and_minimiser():
    u = torch.tensor([[0.0], [1.0], [2.0]])
    # cumulative weights 1, 2, 4: exactly half at value 1 -> midpoint of [1, 2]
    assert coordinate_median(u, torch.tensor([1.0, 1.0, 2.0])).item() == 1.5
    # majority weight wins outright
    assert coordinate_median(u, torch.tensor([1.0, 1.0, 5.0])).item() == 2.0
    # the result minimises sum_c w_c |u_c - m|
    rng = np.random.default_rng(5)
    values = rng.standard_normal((6, 40))
    weights = rng.uniform(0.1, 3.0, size=6)
    m = coordinate_median(torch.from_numpy(values), torch.from_numpy(weights)).numpy()

    def objective(x):
        return (weights[:, None] * np.abs(values - x)).sum(axis=0)

    for shift in (-1e-3, 1e-3):
        assert np.all(objective(m) <= objective(m + shift) + 1e-12)


def test_zero_weight_children_are_ignored():
    u = _updates(5, 50, seed=9)
    w = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0])
    keep = [0, 2, 4]
    np.testing.assert_array_equal(
        coordinate_median(u, w).numpy(), np.median(u.numpy()[keep], axis=0)
    )
    _close(weighted_mean(u, w), u[keep].mean(dim=0))


# --------------------------------------------------------------------------------------------
# Trimmed mean
# --------------------------------------------------------------------------------------------


def _trimmed_reference(values: np.ndarray, b: int) -> np.ndarray:
    s = np.sort(values, axis=0)
    return s[b : values.shape[0] - b].mean(axis=0)


@pytest.mark.parametrize(
    "k,trim,b", [(5, 0.2, 1), (10, 0.3, 3), (10, 0.25, 2), (7, 2, 2), (4, 0, 0)]
)
def test_trimmed_mean_matches_numpy(k, trim, b):
    u = _updates(k, 777, seed=k)
    assert trim_count(trim, k) == b
    got = trimmed_mean(u, trim, chunk_size=100)
    np.testing.assert_allclose(
        got.numpy(), _trimmed_reference(u.numpy(), b), rtol=1e-12, atol=1e-15
    )


def test_weighted_trimmed_mean():
    rng = np.random.default_rng(2)
    values = rng.standard_normal((6, 200))
    weights = rng.uniform(0.5, 2.0, size=6)
    got = trimmed_mean(torch.from_numpy(values), 1, torch.from_numpy(weights)).numpy()
    order = np.argsort(values, axis=0, kind="stable")[1:5]
    kept_v = np.take_along_axis(values, order, axis=0)
    kept_w = weights[order]
    np.testing.assert_allclose(got, (kept_v * kept_w).sum(0) / kept_w.sum(0), rtol=1e-12)
    # equal weights: the unweighted trimmed mean
    np.testing.assert_allclose(
        trimmed_mean(torch.from_numpy(values), 1, torch.ones(6)).numpy(),
        _trimmed_reference(values, 1),
        rtol=1e-12,
    )


@pytest.mark.parametrize("trim,k", [(0.5, 10), (2, 4), (3, 5), (-1, 5), (0.7, 5)])
def test_trimmed_mean_rejects_too_much_trimming(trim, k):
    with pytest.raises(ValueError, match="trim"):
        trimmed_mean(_updates(k, 3), trim)


def test_nonfinite_outliers_are_trimmed():
    u = _updates(7, 20, seed=1)
    u[0, :] = float("nan")
    u[1, :] = float("inf")
    assert torch.isfinite(trimmed_mean(u, 2)).all()
    assert torch.isfinite(coordinate_median(u)).all()
    assert torch.isfinite(krum(torch.cat([u, _updates(3, 20, seed=2)]), f=3)).all()


# --------------------------------------------------------------------------------------------
# Krum
# --------------------------------------------------------------------------------------------


def test_krum_scores_and_choice_match_numpy():
    rng = np.random.default_rng(4)
    values = rng.standard_normal((9, 50))
    values[7:] += 20.0  # two far outliers
    f = 2
    d = ((values[:, None, :] - values[None, :, :]) ** 2).sum(-1)
    np.fill_diagonal(d, np.inf)
    expected = np.sort(d, axis=1)[:, : 9 - f - 2].sum(1)
    scores = krum_scores(torch.from_numpy(values), f, chunk_size=7)
    np.testing.assert_allclose(scores.numpy(), expected, rtol=1e-12)
    best = int(np.argmin(expected))
    np.testing.assert_array_equal(krum(torch.from_numpy(values), f).numpy(), values[best])
    chosen = np.argsort(expected, kind="stable")[:3]
    np.testing.assert_allclose(
        krum(torch.from_numpy(values), f, m=3).numpy(), values[chosen].mean(0), rtol=1e-12
    )


def test_krum_needs_enough_children():
    with pytest.raises(ValueError, match="k > 2f \\+ 2"):
        krum(_updates(6, 4), f=2)
    with pytest.raises(ValueError, match="m="):
        krum(_updates(9, 4), f=2, m=8)


# --------------------------------------------------------------------------------------------
# Dispatcher and validation
# --------------------------------------------------------------------------------------------


def test_dispatcher_routes_and_validates():
    u, w = _updates(10, 64, seed=8), torch.arange(1.0, 11.0)
    _close(robust_update("mean", u, w), weighted_mean(u, w))
    _close(robust_update("median", u, w), coordinate_median(u, w))
    _close(robust_update("trimmed_mean", u, w, trim=0.2), trimmed_mean(u, 0.2, w))
    _close(robust_update("krum", u, None, f=2, m=2), krum(u, 2, m=2))
    out = torch.empty(64, dtype=torch.float64)
    assert robust_update("median", u, out=out) is out
    assert set(RULES) == {"mean", "median", "trimmed_mean", "krum"}
    with pytest.raises(ValueError, match="unknown"):
        robust_update("geomedian", u)
    with pytest.raises(ValueError, match="needs parameter"):
        robust_update("trimmed_mean", u)
    with pytest.raises(ValueError, match="unknown parameter"):
        robust_update("median", u, trim=0.1)
    with pytest.raises(ValueError, match="weights"):
        robust_update("median", u, torch.ones(3))
    with pytest.raises(ValueError, match="weight 0"):
        robust_update("median", u, torch.zeros(10))
    with pytest.raises(ValueError, match="finite"):
        robust_update("median", u, torch.tensor([-1.0] + [1.0] * 9))
    with pytest.raises(ValueError, match=r"shape \[k, n\]"):
        robust_update("median", torch.zeros(5))
    assert max_byzantine("median", 10) == 4
    assert max_byzantine("median", 9) == 4
    assert max_byzantine("trimmed_mean", 10, trim=0.3) == 3
    assert max_byzantine("krum", 10, f=3) == 3
    assert max_byzantine("mean", 10) == 0


# --------------------------------------------------------------------------------------------
# Byzantine simulation (serial, no MPI)
# --------------------------------------------------------------------------------------------


def _least_squares_clients(clients: int, per_client: int, dim: int, seed: int):
    """Return features ``[clients, per_client, dim]`` and targets of one shared linear model."""
    rng = np.random.default_rng(seed)
    truth = rng.standard_normal(dim)
    a = rng.standard_normal((clients, per_client, dim))
    b = a @ truth + 0.1 * rng.standard_normal((clients, per_client))
    return torch.from_numpy(a), torch.from_numpy(b)


def _loss(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a @ x - b) ** 2).mean()) / 2


def _simulate(rule: str, attack: str, rounds: int = 50, **params) -> tuple[float, float, float]:
    """Return the honest loss (final, optimum, initial) with 3 of 10 clients Byzantine.

    Honest clients run 5 local GD steps on their own least-squares data per round; Byzantine ones
    (clients 0..2) send -100 x the honest mean ("scaled") or -10 x their own update ("sign_flip").
    """
    a, b = _least_squares_clients(10, 40, 10, seed=0)
    honest_a, honest_b = a[3:], b[3:]
    optimum = torch.linalg.lstsq(honest_a.reshape(-1, 10), honest_b.reshape(-1, 1)).solution[:, 0]
    x = torch.zeros(10, dtype=torch.float64)
    initial, best = _loss(x, honest_a, honest_b), _loss(optimum, honest_a, honest_b)
    lr, local_steps = 0.05, 5
    weights = torch.full((10,), 40.0)
    for _ in range(rounds):
        y = x.expand(10, 10).clone()  # every client starts from x; all clients at once
        for _ in range(local_steps):
            residual = torch.einsum("cmd,cd->cm", a, y) - b
            y -= lr * torch.einsum("cmd,cm->cd", a, residual) / a.shape[1]
        updates = y - x
        if attack == "scaled":
            updates[:3] = -100.0 * updates[3:].mean(dim=0)
        elif attack == "sign_flip":
            updates[:3] *= -10.0
        x = x + robust_update(rule, updates, weights, **params)
        if not torch.isfinite(x).all():
            return float("inf"), best, initial
    return _loss(x, honest_a, honest_b), best, initial


@pytest.mark.parametrize("attack", ["scaled", "sign_flip"])
def test_byzantine_clients_break_the_mean_but_not_robust_rules(attack):
    clean, optimum, initial = _simulate("mean", "none")
    assert clean - optimum < 1e-3 * (initial - optimum)  # the mean is fine without attackers
    bad, optimum, initial = _simulate("mean", attack)
    assert not bad < 1e3 * initial  # diverged (inf or astronomically large)
    for rule, params in (
        ("median", {}),
        ("trimmed_mean", {"trim": 0.3}),
        ("krum", {"f": 3, "m": 3}),
    ):
        loss, optimum, initial = _simulate(rule, attack, **params)
        # within 0.1% of the initial excess loss of the honest optimum (observed: <= 0.04%)
        assert loss - optimum < 1e-3 * (initial - optimum), (rule, attack, loss, optimum, initial)
