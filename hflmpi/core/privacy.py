r"""Differential privacy of the aggregated updates: clipping, Gaussian noise, RDP accounting.

The Gaussian mechanism of DP-FedAvg (McMahan et al., "Learning differentially private recurrent
language models", ICLR 2018) applied at one layer ``n`` of the tree: every participant ``c`` of a
layer-``n`` aggregation clips its update ``d_c = x_c - x`` to L2 norm ``C`` (:func:`clip_update`),
and the released aggregate is

.. math::

    \tilde u = \sum_c a_c\,\mathrm{clip}_C(d_c) + \mathcal N(0, \sigma^2 \Delta^2 I),
    \qquad \Delta = C \max_c a_c,

with the noise added either once by the leader (``"central"``) or as ``k`` independent shares
``N(0, sigma^2 Delta^2 / k)``, one per participant (``"distributed"``; see :func:`noise_std`).

What is protected (client-level DP, "zero-out" adjacency): two runs are neighbours if one
participant's contribution is replaced by zero, all weights ``a_c`` being public and fixed. The
sensitivity of the weighted sum is then ``a_c C <= Delta``, so each release is the Gaussian
mechanism with noise multiplier ``sigma`` (standard deviation over sensitivity). With uniform
weights (``a_c = 1/k``), ``Delta = C/k``. A participant of layer ``n`` is a device for ``n = 1`` and
a whole layer-``(n-1)`` subtree for ``n > 1``.

Accounting (full participation: every participant takes part in every release, sampling rate 1).
The Gaussian mechanism has Renyi DP ``RDP(alpha) = alpha / (2 sigma^2)`` (Mironov, "Renyi
differential privacy", CSF 2017, Prop. 7); ``T`` adaptive releases compose additively,
``T alpha / (2 sigma^2)`` (ibid., Prop. 1). The conversion to ``(epsilon, delta)``-DP is

* ``"balle"`` (default; Balle et al., "Hypothesis testing interpretations and Renyi differential
  privacy", AISTATS 2020, Thm. 21; the conversion of Opacus and TF Privacy)::

      eps = min_alpha  RDP_T(alpha) + log((alpha - 1) / alpha)
                       - (log(delta) + log(alpha)) / (alpha - 1)

* ``"mironov"`` (Mironov 2017, Prop. 3)::

      eps = min_alpha  RDP_T(alpha) + log(1 / delta) / (alpha - 1)

both minimised over a grid of orders ``alpha > 1`` (:data:`DEFAULT_ALPHAS`). For this mechanism
the composition is exactly a Gaussian mechanism with multiplier ``sigma / sqrt(T)`` (``mu``-GDP
with ``mu = sqrt(T)/sigma``; Dong, Roth and Su, "Gaussian differential privacy", JRSS-B 2022,
Cor. 3.3), whose exact ``epsilon`` (:func:`gaussian_epsilon_exact`; Balle and Wang, ICML 2018,
Thm. 8) the RDP bound never undercuts.

Sampling of clients (Poisson subsampling amplification) is not accounted for here: with partial
participation these bounds remain valid but loose.

Noise source. The noise must be unpredictable to everyone who sees the release: noise drawn from a
generator keyed by the run seed (which the run file stores) can be regenerated and subtracted,
which recovers the exact un-noised aggregate. :func:`gaussian_noise` therefore draws, by default,
from the operating system's CSPRNG (``os.urandom``: ``getrandom(2)`` on Linux), never stored nor
derived from any seed, and turns the bits into normals with the Box-Muller transform in float64
(:func:`secure_standard_normal`). A DP run is consequently not reproducible bit for bit. An
explicit ``torch.Generator`` is accepted for tests that need reproducible noise only; such noise
gives no privacy at all.
"""

from __future__ import annotations

import math
import os
from typing import Literal

import numpy as np
import torch

__all__ = [
    "DEFAULT_ALPHAS",
    "clip_update",
    "sensitivity",
    "noise_std",
    "gaussian_noise",
    "secure_standard_normal",
    "rdp_gaussian",
    "rdp_to_epsilon",
    "epsilon_for",
    "sigma_for",
    "gaussian_epsilon_exact",
]

DEFAULT_ALPHAS = 1.0 + np.geomspace(1e-3, 1e5, 2001)
"""Renyi orders searched by default: ``1 + 10^u`` for ``u`` in ``[-3, 5]`` on a fine grid."""

Conversion = Literal["balle", "mironov"]
Mode = Literal["central", "distributed"]


# --------------------------------------------------------------------------------------------
# Clipping and noise
# --------------------------------------------------------------------------------------------


def _positive(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name}={value!r} must be a finite number > 0")
    if value <= 0:
        raise ValueError(f"{name}={value} must be > 0")
    return float(value)


def clip_update(
    update: torch.Tensor, max_norm: float, *, out: torch.Tensor | None = None
) -> tuple[torch.Tensor, float]:
    """Return ``update * min(1, max_norm / ||update||_2)`` and the factor applied.

    The norm is accumulated in float64. A zero update is returned unchanged (factor 1).

    Parameters
    ----------
    update : Tensor
        Floating-point update ``x_c - x`` (any shape).
    max_norm : float
        Clipping bound ``C > 0``.
    out : Tensor, optional
        Where to write the result (may be ``update`` itself to clip in place).

    Returns
    -------
    (Tensor, float)
        The clipped update (``out`` if given) and the scale ``min(1, C / ||update||)``.

    Raises
    ------
    ValueError
        If ``max_norm`` is not positive or the update holds NaN or Inf.
    """
    max_norm = _positive("max_norm", max_norm)
    if not isinstance(update, torch.Tensor) or not update.is_floating_point():
        raise TypeError(
            f"update must be a floating-point tensor, got {getattr(update, 'dtype', update)!r}"
        )
    norm = float(torch.linalg.vector_norm(update, dtype=torch.float64))
    if not math.isfinite(norm):
        raise ValueError("cannot clip an update holding NaN or Inf; check for divergence")
    scale = 1.0 if norm <= max_norm else max_norm / norm
    if out is None:
        return (update.clone() if scale == 1.0 else update * scale), scale
    if out.shape != update.shape:
        raise ValueError(f"out has shape {tuple(out.shape)}, update {tuple(update.shape)}")
    if scale == 1.0:
        if out.data_ptr() != update.data_ptr():
            out.copy_(update)
    else:
        torch.mul(update, scale, out=out)
    return out, scale


def sensitivity(clip: float, max_share: float = 1.0) -> float:
    """Return the L2 sensitivity ``Delta = clip * max_share`` of ``sum_c a_c clip_C(d_c)``.

    ``max_share`` is ``max_c a_c`` (``1/k`` for uniform weights); 1 for an unweighted sum.
    """
    clip = _positive("clip", clip)
    max_share = _positive("max_share", max_share)
    if max_share > 1.0:
        raise ValueError(f"max_share={max_share} must be in (0, 1] (a_c = W_c / W_node)")
    return clip * max_share


def noise_std(
    noise_multiplier: float,
    clip: float,
    *,
    max_share: float = 1.0,
    mode: Mode = "central",
    participants: int = 1,
) -> float:
    """Return the standard deviation each noise source adds.

    ``central``: the leader adds ``sigma * Delta`` once. ``distributed``: each of the ``k``
    participants adds ``sigma * Delta / sqrt(k)``, so the sum carries ``N(0, sigma^2 Delta^2)``
    when all ``k`` are honest (``t`` honest ones give only ``sigma sqrt(t/k)``).

    Parameters
    ----------
    noise_multiplier : float
        ``sigma > 0`` (noise std over sensitivity; what the accountant takes).
    clip : float
        Clipping bound ``C``.
    max_share : float
        ``max_c a_c`` of the layer's weights (see :func:`sensitivity`).
    mode : {"central", "distributed"}
        Who adds the noise.
    participants : int
        ``k``, the number of noise shares in distributed mode.
    """
    sigma = _positive("noise_multiplier", noise_multiplier)
    delta = sensitivity(clip, max_share)
    if mode == "central":
        return sigma * delta
    if mode != "distributed":
        raise ValueError(f"privacy mode={mode!r} must be 'central' or 'distributed'")
    if isinstance(participants, bool) or not isinstance(participants, int) or participants < 1:
        raise ValueError(f"participants={participants!r} must be an integer >= 1")
    return sigma * delta / math.sqrt(participants)


_UNIFORM_BITS = 53  # one float64 mantissa: uniforms on the grid k * 2**-53
_PAIRS_PER_BLOCK = 1 << 20  # Box-Muller pairs per block: bounds the temporaries (~40 MB)


def secure_standard_normal(
    count: int, *, dtype: torch.dtype = torch.float64, device: torch.device | str | None = None
) -> torch.Tensor:
    """Return ``count`` independent standard normals drawn from the OS CSPRNG.

    Each pair of normals comes from two 53-bit uniforms read from ``os.urandom`` (the kernel's
    cryptographically secure generator; nothing is seeded, stored or reproducible), through the
    Box-Muller transform in float64: ``r = sqrt(-2 ln u1)``, ``(r cos 2 pi u2, r sin 2 pi u2)``
    with ``u1`` in ``(0, 1]`` and ``u2`` in ``[0, 1)`` on the grid ``k 2^-53``.

    Resolution: the tail is cut at ``sqrt(2 * 53 ln 2) = 8.57`` standard deviations (probability
    below ``1e-17`` per draw) and values are float64 roundings of the exact transform. Like every
    floating-point sampler this is not a perfect continuous Gaussian (see Mironov, "On significance
    of the least significant bits for differential privacy", CCS 2012); the discrete Gaussian
    is not implemented. Cost: ``8 * count`` bytes from the kernel plus the transform; measured
    at about 2-3x the time of a seeded ``torch.randn`` of the same size on the development
    machine (the kernel's generator dominates).

    Parameters
    ----------
    count : int
        Number of values (>= 0).
    dtype : torch.dtype
        float32 or float64 (the transform always runs in float64).
    device : torch.device or str, optional
        Where the result lives (generated on the CPU, then copied).
    """
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise ValueError(f"count={count!r} must be an integer >= 0")
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype={dtype} must be torch.float32 or torch.float64")
    out = torch.empty(count, dtype=torch.float64)
    mask = (1 << _UNIFORM_BITS) - 1
    scale = 2.0**-_UNIFORM_BITS
    pairs = (count + 1) // 2
    done = 0
    for first in range(0, pairs, _PAIRS_PER_BLOCK):
        block = min(_PAIRS_PER_BLOCK, pairs - first)
        raw = torch.frombuffer(bytearray(os.urandom(16 * block)), dtype=torch.int64)
        uniform = raw.bitwise_and_(mask).to(torch.float64)  # 53 uniform bits each
        radius, angle = uniform[:block], uniform[block:]
        radius.add_(1.0).mul_(scale).log_().mul_(-2.0).sqrt_()  # u1 in (0, 1]: finite
        angle.mul_(2.0 * math.pi * scale)
        take = min(2 * block, count - done)
        cos_part = min(block, take)
        torch.mul(radius[:cos_part], torch.cos(angle[:cos_part]), out=out[done:done + cos_part])
        sin_part = take - cos_part
        if sin_part:
            torch.mul(radius[:sin_part], angle[:sin_part].sin_(),
                      out=out[done + cos_part:done + take])
        done += take
    return out.to(device=device, dtype=dtype)


def gaussian_noise(
    shape: int | tuple[int, ...] | torch.Size,
    sigma: float,
    clip: float,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Return ``N(0, (sigma * clip)^2)`` noise, from the OS CSPRNG unless a generator is given.

    Pass ``clip = Delta`` (:func:`sensitivity`) and, for one share of distributed noise,
    ``sigma / sqrt(k)`` (or use :func:`noise_std` and ``clip = 1``).

    Parameters
    ----------
    shape : int or tuple of int
        Shape of the noise.
    sigma : float
        Noise multiplier (>= 0; 0 gives zeros).
    clip : float
        Sensitivity the multiplier refers to (> 0).
    generator : torch.Generator, optional
        None (the default, and the only choice that gives differential privacy): draw from
        :func:`secure_standard_normal`, unpredictable and never stored. A generator (e.g.
        ``hflmpi.core.rng.torch_generator(seed, purpose="dp", ...)``) makes the noise reproducible,
        and therefore recoverable by anyone who can rebuild the generator: **tests only**.
    device : torch.device or str, optional
        Defaults to the generator's device (the CPU without a generator).
    dtype : torch.dtype
        float32 or float64.
    """
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(
            "generator must be None (OS CSPRNG noise) or a torch.Generator (reproducible, "
            f"insecure, tests only), got {type(generator).__name__}"
        )
    if (
        isinstance(sigma, bool)
        or not isinstance(sigma, (int, float))
        or not sigma >= 0
        or not math.isfinite(sigma)
    ):
        raise ValueError(f"sigma={sigma!r} must be a finite number >= 0")
    clip = _positive("clip", clip)
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype={dtype} must be torch.float32 or torch.float64")
    if device is None:
        device = generator.device if generator is not None else torch.device("cpu")
    device = torch.device(device)
    if isinstance(shape, int):
        shape = (shape,)
    shape = tuple(shape)
    if generator is None:
        noise = secure_standard_normal(math.prod(shape), dtype=dtype, device=device).reshape(shape)
    else:
        noise = torch.randn(shape, generator=generator, device=device, dtype=dtype)
    return noise.mul_(float(sigma) * clip)


# --------------------------------------------------------------------------------------------
# Accounting
# --------------------------------------------------------------------------------------------


def _alphas(alphas: np.ndarray | list[float] | None) -> np.ndarray:
    a = DEFAULT_ALPHAS if alphas is None else np.asarray(alphas, dtype=np.float64).reshape(-1)
    if a.size == 0 or not np.all(np.isfinite(a)) or np.any(a <= 1.0):
        raise ValueError("Renyi orders alphas must be finite and > 1")
    return a


def rdp_gaussian(sigma: float, alphas: np.ndarray | list[float] | None = None) -> np.ndarray:
    """Return the Renyi DP ``alpha / (2 sigma^2)`` of one Gaussian release at each order.

    Parameters
    ----------
    sigma : float
        Noise multiplier (std over L2 sensitivity), > 0.
    alphas : array-like, optional
        Orders > 1 (default :data:`DEFAULT_ALPHAS`).
    """
    sigma = _positive("sigma", sigma)
    return _alphas(alphas) / (2.0 * sigma * sigma)


def rdp_to_epsilon(
    rdp: np.ndarray,
    alphas: np.ndarray | list[float] | None,
    delta: float,
    *,
    conversion: Conversion = "balle",
) -> tuple[float, float]:
    """Return ``(epsilon, best_alpha)`` of an RDP curve at ``delta`` (see the module docstring).

    Parameters
    ----------
    rdp : array
        Composed RDP at each order.
    alphas : array-like or None
        The orders (default :data:`DEFAULT_ALPHAS`).
    delta : float
        Target ``delta`` in ``(0, 1)``.
    conversion : {"balle", "mironov"}
        Conversion theorem.
    """
    a = _alphas(alphas)
    rdp = np.asarray(rdp, dtype=np.float64).reshape(-1)
    if rdp.shape != a.shape:
        raise ValueError(f"rdp has {rdp.size} values for {a.size} orders")
    if not 0.0 < delta < 1.0:
        raise ValueError(f"delta={delta} must be in (0, 1)")
    if conversion == "balle":
        eps = rdp + np.log1p(-1.0 / a) - (math.log(delta) + np.log(a)) / (a - 1.0)
    elif conversion == "mironov":
        eps = rdp + math.log(1.0 / delta) / (a - 1.0)
    else:
        raise ValueError(f"conversion={conversion!r} must be 'balle' or 'mironov'")
    best = int(np.nanargmin(eps))
    return max(0.0, float(eps[best])), float(a[best])


def epsilon_for(
    sigma: float,
    steps: int,
    delta: float,
    alphas: np.ndarray | list[float] | None = None,
    *,
    conversion: Conversion = "balle",
) -> tuple[float, float]:
    """Return ``(epsilon, best_alpha)`` after ``steps`` full-participation Gaussian releases.

    Parameters
    ----------
    sigma : float
        Noise multiplier of every release.
    steps : int
        Number of releases ``T`` (layer-``n`` aggregations over the run); 0 gives ``epsilon = 0``.
    delta : float
        Target ``delta``.
    alphas : array-like, optional
        Renyi orders (default :data:`DEFAULT_ALPHAS`).
    conversion : {"balle", "mironov"}
        RDP to ``(epsilon, delta)`` conversion.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps={steps!r} must be an integer >= 0 (releases)")
    if steps == 0:
        return 0.0, float(_alphas(alphas)[0])
    return rdp_to_epsilon(steps * rdp_gaussian(sigma, alphas), alphas, delta, conversion=conversion)


def sigma_for(
    epsilon: float,
    delta: float,
    steps: int,
    alphas: np.ndarray | list[float] | None = None,
    *,
    conversion: Conversion = "balle",
    rtol: float = 1e-6,
) -> float:
    """Return the smallest noise multiplier whose ``epsilon_for`` is ``<= epsilon`` (to ``rtol``).

    Binary search on ``log(sigma)``; the returned ``sigma`` always satisfies the target.

    Raises
    ------
    ValueError
        If the target cannot be met with ``sigma <= 1e6``.
    """
    epsilon = _positive("epsilon", epsilon)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps={steps!r} must be an integer >= 1")

    def eps(s: float) -> float:
        return epsilon_for(s, steps, delta, alphas, conversion=conversion)[0]

    low, high = 1e-2, 1.0
    while eps(high) > epsilon:
        low, high = high, high * 2.0
        if high > 1e6:
            raise ValueError(
                f"epsilon={epsilon} at delta={delta} over {steps} steps needs sigma > 1e6; "
                "raise epsilon or lower steps"
            )
    while eps(low) <= epsilon and low > 1e-6:
        high, low = low, low / 2.0
    while high / low > 1.0 + rtol:
        middle = math.sqrt(low * high)
        if eps(middle) <= epsilon:
            high = middle
        else:
            low = middle
    return high


def _log_phi(x: float) -> float:
    """Return ``log Phi(x)`` for the standard normal CDF (accurate in the lower tail)."""
    value = 0.5 * math.erfc(-x / math.sqrt(2.0))
    return math.log(value) if value > 0.0 else -math.inf


def _gaussian_delta(epsilon: float, mu: float) -> float:
    """Return ``delta(eps)`` of ``mu``-GDP: ``Phi(-eps/mu + mu/2) - e^eps Phi(-eps/mu - mu/2)``."""
    first = math.exp(_log_phi(-epsilon / mu + mu / 2.0))
    second = math.exp(epsilon + _log_phi(-epsilon / mu - mu / 2.0))
    return max(0.0, first - second)


def gaussian_epsilon_exact(sigma: float, steps: int, delta: float) -> float:
    """Return the exact ``epsilon`` of ``steps`` Gaussian releases with multiplier ``sigma``.

    The composition is ``mu``-GDP with ``mu = sqrt(steps) / sigma`` (Dong, Roth and Su 2022,
    Cor. 3.3), whose privacy profile is
    ``delta(eps) = Phi(-eps/mu + mu/2) - e^eps Phi(-eps/mu - mu/2)`` (Balle and Wang 2018, Thm. 8);
    this solves ``delta(eps) = delta`` by bisection. Tighter than the RDP bound; given as a check
    and for reporting.
    """
    sigma = _positive("sigma", sigma)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps={steps!r} must be an integer >= 1")
    if not 0.0 < delta < 1.0:
        raise ValueError(f"delta={delta} must be in (0, 1)")
    mu = math.sqrt(steps) / sigma
    if _gaussian_delta(0.0, mu) <= delta:
        return 0.0
    low, high = 0.0, 1.0
    while _gaussian_delta(high, mu) > delta:
        low, high = high, high * 2.0
    for _ in range(200):
        middle = 0.5 * (low + high)
        if _gaussian_delta(middle, mu) > delta:
            low = middle
        else:
            high = middle
        if high - low <= 1e-12 * max(1.0, high):
            break
    return high
