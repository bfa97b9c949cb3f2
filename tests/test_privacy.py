"""DP: clipping, noise scale and source, RDP accounting against independent references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from hflmpi.core.privacy import (
    DEFAULT_ALPHAS,
    clip_update,
    epsilon_for,
    gaussian_epsilon_exact,
    gaussian_noise,
    noise_std,
    rdp_gaussian,
    rdp_to_epsilon,
    secure_standard_normal,
    sensitivity,
    sigma_for,
)
from hflmpi.core.rng import torch_generator

# --------------------------------------------------------------------------------------------
# Clipping
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_clip_update_bounds_the_norm(dtype):
    g = torch.Generator().manual_seed(0)
    update = torch.randn(1000, generator=g, dtype=dtype) * 3.0
    norm = float(update.double().norm())
    clipped, scale = clip_update(update, 1.0)
    assert scale == pytest.approx(1.0 / norm)
    assert float(clipped.double().norm()) == pytest.approx(1.0, rel=1e-6)
    np.testing.assert_allclose(clipped.numpy(), (update * scale).numpy(), rtol=1e-6)
    assert clipped.dtype == dtype
    small, scale = clip_update(update, 2 * norm)  # below the bound: unchanged, a copy
    assert scale == 1.0 and torch.equal(small, update) and small.data_ptr() != update.data_ptr()
    zero, scale = clip_update(torch.zeros(5, dtype=dtype), 1.0)
    assert scale == 1.0 and not zero.any()
    inplace = update.clone()
    out, _ = clip_update(inplace, 0.5, out=inplace)
    assert out is inplace and float(inplace.double().norm()) == pytest.approx(0.5, rel=1e-6)


def test_clip_update_rejects_bad_input():
    with pytest.raises(ValueError, match="max_norm"):
        clip_update(torch.ones(3), 0.0)
    with pytest.raises(ValueError, match="NaN or Inf"):
        clip_update(torch.tensor([1.0, float("nan")]), 1.0)
    with pytest.raises(TypeError):
        clip_update(torch.ones(3, dtype=torch.int32), 1.0)


# --------------------------------------------------------------------------------------------
# Noise
# --------------------------------------------------------------------------------------------


def test_noise_std_matches():
    g = torch_generator(7, purpose="dp", rank=0, round=0, layer=1)
    noise = gaussian_noise(200_000, sigma=1.3, clip=0.5, generator=g, dtype=torch.float64)
    # sample std of 200k normals: relative standard error ~ 1/sqrt(2n) = 0.16%
    assert float(noise.std()) == pytest.approx(0.65, rel=0.01)
    assert abs(float(noise.mean())) < 5 * 0.65 / math.sqrt(200_000)
    assert noise.shape == (200_000,)
    shaped = gaussian_noise((3, 4), 1.0, 1.0, torch_generator(7, purpose="dp"))
    assert shaped.shape == (3, 4) and shaped.dtype == torch.float32
    assert not gaussian_noise(10, 0.0, 1.0, torch_generator(7, purpose="dp")).any()


def test_seeded_noise_for_tests_is_reproducible_and_keyed():
    def draw(**key):
        return gaussian_noise(100, 1.0, 1.0, torch_generator(3, purpose="dp", **key))

    assert torch.equal(draw(rank=1, round=5, layer=2), draw(rank=1, round=5, layer=2))
    for other in (
        {"rank": 2, "round": 5, "layer": 2},
        {"rank": 1, "round": 6, "layer": 2},
        {"rank": 1, "round": 5, "layer": 1},
    ):
        assert not torch.equal(draw(rank=1, round=5, layer=2), draw(**other))
    with pytest.raises(TypeError, match="Generator"):
        gaussian_noise(3, 1.0, 1.0, 7)  # type: ignore[arg-type]


def test_default_noise_is_not_a_function_of_any_seed():
    """Without a generator the noise comes from os.urandom: two draws differ, and the torch
    generator keyed by the run seed (the old, recoverable source) does not reproduce it."""
    first, second = gaussian_noise(10_000, 1.0, 1.0), gaussian_noise(10_000, 1.0, 1.0)
    assert not torch.equal(first, second)
    for rank in range(4):
        seeded = gaussian_noise(10_000, 1.0, 1.0, torch_generator(0, purpose="dp", rank=rank))
        # independent draws: the difference has variance 2, not 0
        assert float((first - seeded).double().var()) == pytest.approx(2.0, rel=0.1)
    # the global RNG is not the source either
    torch.manual_seed(0)
    again = gaussian_noise(10_000, 1.0, 1.0)
    torch.manual_seed(0)
    assert not torch.equal(again, gaussian_noise(10_000, 1.0, 1.0))


def _normal_cdf(x: np.ndarray) -> np.ndarray:
    return 0.5 * np.array([math.erfc(-v / math.sqrt(2.0)) for v in x])


def test_secure_standard_normal_is_standard_normal():
    values = secure_standard_normal(400_001).numpy()  # odd: the last pair is cut in half
    assert values.shape == (400_001,) and values.dtype == np.float64
    assert np.isfinite(values).all()
    n = values.size
    assert abs(values.mean()) < 5 / math.sqrt(n)
    assert values.std() == pytest.approx(1.0, abs=5 * math.sqrt(0.5 / n))
    # Kolmogorov-Smirnov distance against the exact normal CDF (2.7/sqrt(n): false alarm ~1e-6)
    ordered = np.sort(values)
    cdf = _normal_cdf(ordered[:: 97])  # every 97th order statistic is plenty for the sup
    empirical = (np.arange(n)[:: 97] + 1) / n
    assert np.abs(cdf - empirical).max() < 2.7 / math.sqrt(n) + 1e-4
    # neighbouring values are uncorrelated
    assert abs(np.corrcoef(values[:-1:2], values[1::2])[0, 1]) < 5 / math.sqrt(n / 2)
    # shapes, dtypes and edge sizes
    assert secure_standard_normal(0).numel() == 0
    assert secure_standard_normal(1).shape == (1,)
    assert secure_standard_normal(3, dtype=torch.float32).dtype == torch.float32
    with pytest.raises(ValueError, match="count"):
        secure_standard_normal(-1)


def test_distributed_noise_shares_add_up_to_central_noise():
    k, sigma, clip = 8, 1.5, 2.0
    central = noise_std(sigma, clip, max_share=0.25)
    share = noise_std(sigma, clip, max_share=0.25, mode="distributed", participants=k)
    assert central == pytest.approx(sigma * clip * 0.25)
    assert math.sqrt(k) * share == pytest.approx(central)
    shares = [
        gaussian_noise(
            100_000, share, 1.0, torch_generator(1, purpose="dp", rank=r), dtype=torch.float64
        )
        for r in range(k)
    ]
    assert float(sum(shares).std()) == pytest.approx(central, rel=0.02)
    assert sensitivity(1.0, 0.1) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="max_share"):
        sensitivity(1.0, 1.5)
    with pytest.raises(ValueError, match="mode"):
        noise_std(1.0, 1.0, mode="local")  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------
# Accounting
# --------------------------------------------------------------------------------------------


def _phi(x: float) -> float:
    return 0.5 * math.erfc(-x / math.sqrt(2.0))


def _exact_epsilon_reference(sigma: float, steps: int, delta: float) -> float:
    """Solve Phi(-e/mu + mu/2) - e^e Phi(-e/mu - mu/2) = delta for e, mu = sqrt(T)/sigma."""
    mu = math.sqrt(steps) / sigma
    lo, hi = 0.0, 500.0
    for _ in range(200):
        mid = (lo + hi) / 2
        if _phi(-mid / mu + mu / 2) - math.exp(mid) * _phi(-mid / mu - mu / 2) > delta:
            lo = mid
        else:
            hi = mid
    return hi


def test_rdp_of_the_gaussian():
    np.testing.assert_allclose(rdp_gaussian(2.0, [2.0, 10.0]), [2.0 / 8.0, 10.0 / 8.0])
    with pytest.raises(ValueError, match="> 1"):
        rdp_gaussian(1.0, [1.0])


@pytest.mark.parametrize(
    "sigma,steps", [(0.8, 1), (1.0, 1), (2.0, 10), (1.1, 100), (5.0, 1000), (10.0, 1)]
)
def test_epsilon_against_independent_references(sigma, steps):
    delta = 1e-5
    eps, alpha = epsilon_for(sigma, steps, delta)
    # 1) a fine numpy grid over alpha of Balle et al.'s conversion, written out independently
    grid = np.linspace(1.0005, 2000.0, 400_000)
    reference = np.min(
        steps * grid / (2 * sigma**2)
        + np.log((grid - 1) / grid)
        - (np.log(delta) + np.log(grid)) / (grid - 1)
    )
    assert eps == pytest.approx(reference, rel=2e-3)
    assert alpha > 1
    # 2) Mironov's conversion has a closed-form optimum over continuous alpha
    mironov, _ = epsilon_for(sigma, steps, delta, conversion="mironov")
    closed = steps / (2 * sigma**2) + math.sqrt(2 * steps * math.log(1 / delta)) / sigma
    assert closed <= mironov <= closed * (1 + 1e-4)
    assert eps < mironov  # the improved conversion is tighter
    # 3) RDP is an upper bound on the exact epsilon of the composed Gaussian, and not loose
    exact = gaussian_epsilon_exact(sigma, steps, delta)
    assert exact == pytest.approx(_exact_epsilon_reference(sigma, steps, delta), rel=1e-9)
    assert exact <= eps <= 1.2 * exact


def test_epsilon_is_monotone():
    sigmas = [0.5, 0.8, 1.0, 2.0, 4.0, 8.0]
    eps = [epsilon_for(s, 50, 1e-5)[0] for s in sigmas]
    assert all(a > b for a, b in zip(eps, eps[1:]))
    eps_steps = [epsilon_for(1.0, t, 1e-5)[0] for t in (1, 2, 10, 100, 1000)]
    assert all(a < b for a, b in zip(eps_steps, eps_steps[1:]))
    assert epsilon_for(1.0, 10, 1e-6)[0] > epsilon_for(1.0, 10, 1e-3)[0]
    assert epsilon_for(1.0, 0, 1e-5)[0] == 0.0


@pytest.mark.parametrize("epsilon,steps", [(1.0, 100), (8.0, 30), (0.5, 1)])
def test_sigma_for_inverts_epsilon_for(epsilon, steps):
    sigma = sigma_for(epsilon, 1e-5, steps)
    assert epsilon_for(sigma, steps, 1e-5)[0] <= epsilon
    assert epsilon_for(sigma * (1 - 1e-4), steps, 1e-5)[0] > epsilon


def test_accounting_validation():
    with pytest.raises(ValueError, match="delta"):
        epsilon_for(1.0, 10, 0.0)
    with pytest.raises(ValueError, match="conversion"):
        rdp_to_epsilon(
            rdp_gaussian(1.0),
            DEFAULT_ALPHAS,
            1e-5,
            conversion="other",  # type: ignore[arg-type]
        )
    with pytest.raises(ValueError, match="steps"):
        epsilon_for(1.0, -1, 1e-5)
    with pytest.raises(ValueError, match="sigma"):
        epsilon_for(0.0, 1, 1e-5)
