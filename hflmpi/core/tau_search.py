"""Deadline-aware search of the intra-layer iteration counts ``tau`` (behind ``hflmpi plan``).

Pure module (no MPI, no I/O; the command line is :mod:`hflmpi.cli.plan`). Given the compute time of one local SGD step ``t_cp``, the time ``t_cm,n`` of
one layer-n aggregation, a wall-clock deadline ``D`` and the quantizer of every layer, it picks
the integers ``tau = [tau_1, ..., tau_N]`` that minimise a convergence bound of multi-layer local
SGD among all ``tau`` in ``1..tau_max`` per layer whose first global round fits in ``D``.

Round time (QMLHFL, arXiv 2505.08145, Sec. V, deadline model;
:func:`hflmpi.core.costmodel.round_time`, the one round-time model of hflmpi)::

    T(tau) = t_cp * prod(tau) + sum_n t_cm,n * prod_{m > n} tau_m

one global round runs ``prod(tau)`` SGD steps and ``prod_{m > n} tau_m`` layer-n aggregations.
The steps that fit in the deadline are ``K = floor(D / T(tau)) * prod(tau)``.

The bound. The exact constants of QMLHFL's Theorem are not reproduced here; this module uses an
explicitly stated *surrogate* of the standard form of nonconvex local / hierarchical SGD bounds
(Wang & Joshi, "Cooperative SGD", JMLR 2021; Wang et al., "Demystifying why local aggregation
helps: convergence analysis of hierarchical SGD", AAAI 2022), with the quantizer entering through
its variance factor ``q_n`` (``E||Q(x) - x||^2 <= q_n ||x||^2``, QSGD; Alistarh et al. 2017), as in
QMLHFL. With periods ``P_n = prod_{m <= n} tau_m`` (``P_0 = 1``), devices per layer-n node
``m_n = prod_{j <= n} f_j`` (``m_0 = 1``, ``m_N`` = all devices) and fan-outs ``f_n``::

    B(tau) = 2 (f0 - f*) / (eta K)                                       optimisation
           + eta L sigma^2 / m_N                                          minibatch noise
           + L^2 eta^2 sum_{l=0}^{N-1} [ sigma^2 (P_{l+1} - P_l) / 2 (1/m_l - 1/m_N)
                                      + zeta^2 (P_{l+1}^2 - P_l^2) / 3 (1 - m_l / m_N) ]   drift
           + eta L / m_N sum_{n=1}^{N} q_n (sigma^2 + m_{n-1} P_n G^2)    quantization (mean)
           + L^2 eta^2 sum_{n=1}^{N-1} q_n (P_n sigma^2 / m_{n-1} + P_n^2 G^2) / f_n
                                     * (1 - m_n / m_N) (tau_{n+1} - 1) / 2    quantization (drift)

bounding ``min_k E||grad f(x_k)||^2`` over the ``K`` steps. ``docs/planning.md`` derives each term
and states the assumptions (L-smooth f, unbiased gradients with variance ``sigma^2`` per device,
``||grad F_i||^2 <= G^2``, heterogeneity ``zeta^2``, uniform weights). The surrogate also
reports the step-size condition ``rho(tau) = eta L + eta^2 L^2 sum_n P_{n-1}^2 tau_n (tau_n - 1)/2
<= 1`` (the quantization-free part of QMLHFL's learning-rate condition); ``strict`` searches only
``tau`` that satisfy it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import numpy as np

from hflmpi.core.costmodel import round_time
from hflmpi.core.wire import bytes_ratio, resolve_bucket_size
from hflmpi.errors import HflmpiError

__all__ = [
    "PlanError",
    "BoundConstants",
    "BoundTerms",
    "PlanResult",
    "RandomComparison",
    "steps_within",
    "quantized_comm_time",
    "variance_factors",
    "step_condition",
    "convergence_bound",
    "feasible_taus",
    "search",
    "random_comparison",
]

_FLOOR_EPS = 1e-12  # D / T computed in floating point: 6.0 must not floor to 5
_MAX_GRID = 5_000_000


class PlanError(HflmpiError, ValueError):
    """The planning problem has no solution (e.g. the deadline is shorter than any round)."""


@dataclass(frozen=True)
class BoundConstants:
    """Problem constants of the surrogate bound (see the module docstring).

    Attributes
    ----------
    lipschitz : float
        Smoothness ``L`` of the objective. Default 1.0.
    sigma2 : float
        Variance ``sigma^2`` of one device's stochastic gradient. Default 1.0.
    gap : float
        ``f(x_0) - f*``; ``ln 10 = 2.3`` for 10-class cross-entropy at chance. Default 2.3.
    lr : float
        Learning rate ``eta``. Default 0.05.
    grad2 : float
        ``G^2``, bound on the squared norm of a device's full local gradient. Default 1.0.
    zeta2 : float
        Data heterogeneity ``zeta^2`` (0 = IID). Default 0.0.
    """

    lipschitz: float = 1.0
    sigma2: float = 1.0
    gap: float = 2.3
    lr: float = 0.05
    grad2: float = 1.0
    zeta2: float = 0.0

    def __post_init__(self) -> None:
        for name in ("lipschitz", "gap", "lr"):
            if not getattr(self, name) > 0:
                raise PlanError(f"{name}={getattr(self, name)} must be > 0")
        for name in ("sigma2", "grad2", "zeta2"):
            if not getattr(self, name) >= 0:
                raise PlanError(f"{name}={getattr(self, name)} must be >= 0")


@dataclass(frozen=True)
class BoundTerms:
    """The surrogate bound of one ``tau`` split into its terms (``total`` is their sum)."""

    optimisation: float
    noise: float
    drift: float
    quantization: float
    total: float


@dataclass
class RandomComparison:
    """Bounds of ``count`` uniformly drawn feasible ``tau`` against the chosen one."""

    count: int
    feasible: int
    minimum: float
    median: float
    mean: float
    maximum: float
    not_better: float
    median_ratio: float
    samples: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class PlanResult:
    """The chosen ``tau`` and what it buys within the deadline."""

    tau: list[int]
    round_time: float
    rounds: int
    steps: int
    bound: BoundTerms
    step_condition: float
    t_cp: float
    t_cm: list[float]
    q: list[float]
    fanouts: list[int]
    deadline: float
    feasible: int
    searched: int
    random: RandomComparison | None = None

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-serialisable dict."""
        return asdict(self)


# ---------------------------------------------------------------------------------------------
# Time model


def steps_within(deadline: float, tau: Sequence[int], t_cp: float, t_cm: Sequence[float]) -> int:
    """Return ``K = floor(D / T(tau)) * prod(tau)``: SGD steps of the whole rounds that fit in ``D``."""
    period = round_time(tau, t_cp, t_cm)
    return _rounds(deadline, period) * math.prod(tau)


def _rounds(deadline: float, period: float) -> int:
    return int(math.floor(deadline / period * (1 + _FLOOR_EPS))) if period > 0 else 0


def quantized_comm_time(t_float32: float, bits: int, bucket_size: int = 0, latency: float = 0.0) -> float:
    """Scale a measured float32 aggregation time to a ``bits``-bit uplink.

    ``t = latency + (t_float32 - latency) * bytes_ratio(bits, bucket_size)``: only the
    bandwidth part shrinks with the payload. ``latency`` (per-aggregation fixed cost, e.g. the
    alpha terms of :mod:`hflmpi.core.costmodel`) defaults to 0, i.e. all of the time scales.
    """
    if t_float32 < 0 or latency < 0 or latency > t_float32:
        raise PlanError(f"need 0 <= latency={latency} <= t_float32={t_float32}")
    try:
        ratio = bytes_ratio(bits, bucket_size)
    except ValueError as exc:
        raise PlanError(str(exc)) from None
    return latency + (t_float32 - latency) * ratio


def variance_factors(bits: Sequence[int], bucket_size: int = 0) -> list[float]:
    """Return ``q_n`` per layer: :func:`hflmpi.core.quantize.variance_bound` (0 for exact layers)."""
    from hflmpi.core.quantize import variance_bound

    return [0.0 if b == 0 else float(variance_bound(b, resolve_bucket_size(b, bucket_size)))
            for b in bits]


# ---------------------------------------------------------------------------------------------
# The surrogate bound (vectorised over rows of tau)


def _as_grid(tau: Any) -> np.ndarray:
    grid = np.atleast_2d(np.asarray(tau, dtype=np.float64))
    if grid.size == 0 or (grid < 1).any():
        raise PlanError(f"tau={tau} must hold integers >= 1")
    return grid


def step_condition(tau: Any, constants: BoundConstants) -> np.ndarray | float:
    """Return ``rho(tau) = eta L + eta^2 L^2 sum_n P_{n-1}^2 tau_n (tau_n - 1) / 2`` (valid if <= 1)."""
    grid = _as_grid(tau)
    before = np.cumprod(np.hstack([np.ones((len(grid), 1)), grid[:, :-1]]), axis=1)  # P_{n-1}
    eta_l = constants.lr * constants.lipschitz
    rho = eta_l + eta_l**2 * np.sum(before**2 * grid * (grid - 1) / 2, axis=1)
    return float(rho[0]) if np.ndim(tau) == 1 else rho


def convergence_bound(
    tau: Any,
    steps: Any,
    fanouts: Sequence[int],
    q: Sequence[float],
    constants: BoundConstants,
) -> BoundTerms | list[BoundTerms]:
    """Evaluate the surrogate bound ``B(tau)`` of the module docstring.

    Parameters
    ----------
    tau : sequence of int, or 2-D array of rows
        One ``tau`` or many (rows).
    steps : int or array
        ``K``, the SGD steps run (``steps_within``); 0 gives an infinite bound.
    fanouts : sequence of int
        ``f_1..f_N``: children per node at each layer (devices per layer-1 group first).
    q : sequence of float
        Quantizer variance factor per layer (0 = exact).
    constants : BoundConstants

    Returns
    -------
    BoundTerms, or list of BoundTerms when ``tau`` is 2-D.
    """
    grid = _as_grid(tau)
    rows, depth = grid.shape
    if len(fanouts) != depth or len(q) != depth:
        raise PlanError(f"fanouts={list(fanouts)} and q={list(q)} need one entry per layer ({depth})")
    if any(f < 1 for f in fanouts):
        raise PlanError(f"fanouts={list(fanouts)} must be >= 1")
    c = constants
    eta, lip = c.lr, c.lipschitz
    k = np.broadcast_to(np.asarray(steps, dtype=np.float64), (rows,))
    m = np.cumprod([1.0, *map(float, fanouts)])  # m_0..m_N
    total_devices = m[-1]
    periods = np.cumprod(np.hstack([np.ones((rows, 1)), grid]), axis=1)  # P_0..P_N
    with np.errstate(divide="ignore"):
        optimisation = np.where(k > 0, 2 * c.gap / (eta * np.maximum(k, 1)), np.inf)
    noise = np.full(rows, eta * lip * c.sigma2 / total_devices)
    drift = np.zeros(rows)
    for level in range(depth):
        p_lo, p_hi = periods[:, level], periods[:, level + 1]
        drift += c.sigma2 * (p_hi - p_lo) / 2 * (1 / m[level] - 1 / total_devices)
        drift += c.zeta2 * (p_hi**2 - p_lo**2) / 3 * (1 - m[level] / total_devices)
    drift *= lip**2 * eta**2
    quant = np.zeros(rows)
    for n in range(1, depth + 1):
        qn = float(q[n - 1])
        if qn == 0:
            continue
        p_n = periods[:, n]
        quant += eta * lip / total_devices * qn * (c.sigma2 + m[n - 1] * p_n * c.grad2)
        if n < depth:
            node_error = qn * (p_n * c.sigma2 / m[n - 1] + p_n**2 * c.grad2) / fanouts[n - 1]
            quant += (lip**2 * eta**2 * node_error * (1 - m[n] / total_devices)
                      * (grid[:, n] - 1) / 2)
    total = optimisation + noise + drift + quant
    terms = [BoundTerms(float(a), float(b), float(d), float(e), float(t))
             for a, b, d, e, t in zip(optimisation, noise, drift, quant, total)]
    return terms[0] if np.ndim(tau) == 1 else terms


# ---------------------------------------------------------------------------------------------
# Search


def _tau_limits(tau_max: int | Sequence[int], depth: int) -> list[int]:
    limits = [int(tau_max)] * depth if isinstance(tau_max, (int, np.integer)) else [int(t) for t in tau_max]
    if len(limits) != depth or any(t < 1 for t in limits):
        raise PlanError(f"tau_max={tau_max} must be >= 1, one value or one per layer ({depth})")
    return limits


def feasible_taus(
    t_cp: float, t_cm: Sequence[float], deadline: float, tau_max: int | Sequence[int]
) -> np.ndarray:
    """Return every ``tau`` in ``1..tau_max`` per layer whose round fits in ``deadline`` (rows).

    ``T(tau)`` grows with every ``tau_n``, so the enumeration stops raising ``tau_n`` as soon as
    ``T`` (with the later layers at 1) exceeds the deadline: the grid is pruned, not scanned.

    Raises
    ------
    PlanError
        If even ``tau = [1, ..., 1]`` does not fit (with the time it needs and a fix).
    """
    depth = len(t_cm)
    limits = _tau_limits(tau_max, depth)
    if math.prod(limits) > _MAX_GRID:
        raise PlanError(f"the grid 1..{limits} has {math.prod(limits)} points (> {_MAX_GRID}); "
                        "lower --tau-max")
    if t_cp <= 0 or any(t < 0 for t in t_cm):
        raise PlanError(f"t_cp={t_cp} must be > 0 and t_cm={list(t_cm)} >= 0")
    shortest = round_time([1] * depth, t_cp, t_cm)
    if not deadline >= shortest:
        raise PlanError(
            f"deadline={deadline} s is shorter than the fastest global round, tau=[1]*{depth}: "
            f"T = t_cp + sum(t_cm) = {shortest:.6g} s; raise the deadline to at least that, "
            "use fewer bits (cheaper aggregations) or a shallower tree"
        )
    found: list[list[int]] = []

    def extend(prefix: list[int]) -> None:
        n = len(prefix)
        if n == depth:
            found.append(prefix)
            return
        for value in range(1, limits[n] + 1):
            candidate = prefix + [value] + [1] * (depth - n - 1)
            if round_time(candidate, t_cp, t_cm) > deadline:
                break  # larger tau_n only lengthens the round
            extend(prefix + [value])

    extend([])
    return np.asarray(found, dtype=np.int64)


def _evaluate(
    grid: np.ndarray, t_cp: float, t_cm: Sequence[float], deadline: float,
    fanouts: Sequence[int], q: Sequence[float], constants: BoundConstants,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    periods = np.prod(grid, axis=1).astype(np.float64)
    times = round_time(grid, t_cp, t_cm)
    rounds = np.floor(deadline / times * (1 + _FLOOR_EPS))
    steps = rounds * periods
    terms = convergence_bound(grid, steps, fanouts, q, constants)
    totals = np.array([t.total for t in terms])  # type: ignore[union-attr]
    return totals, times, steps


def search(
    t_cp: float,
    t_cm: Sequence[float],
    deadline: float,
    *,
    bits: Sequence[int] | None = None,
    bucket_size: int = 0,
    fanouts: Sequence[int] | None = None,
    constants: BoundConstants | None = None,
    tau_max: int | Sequence[int] = 20,
    strict: bool = False,
    random: int = 0,
    seed: int = 0,
) -> PlanResult:
    """Choose the ``tau`` that minimises the surrogate bound within the deadline.

    Parameters
    ----------
    t_cp : float
        Seconds per local SGD step.
    t_cm : sequence of float
        Seconds per layer-n aggregation at the layer's quantizer (see
        :func:`quantized_comm_time` to derive them from a float32 measurement).
    deadline : float
        Wall-clock budget ``D`` in seconds.
    bits : sequence of int, optional
        Quantizer width per layer (0 = exact, the default).
    bucket_size : int
        Quantizer bucket size (0 = the per-width default).
    fanouts : sequence of int, optional
        Children per node per layer; default 4 at every layer.
    constants : BoundConstants, optional
    tau_max : int or sequence of int
        Largest ``tau_n`` searched (per layer if a sequence).
    strict : bool
        Search only ``tau`` with ``step_condition <= 1``.
    random : int
        Also draw this many feasible ``tau`` uniformly and compare (0 = skip).
    seed : int
        Seed of the random draw.

    Raises
    ------
    PlanError
        On an infeasible deadline or inconsistent inputs.
    """
    depth = len(t_cm)
    bits = [0] * depth if bits is None else [int(b) for b in bits]
    fanouts = [4] * depth if fanouts is None else [int(f) for f in fanouts]
    constants = constants or BoundConstants()
    if len(bits) != depth or len(fanouts) != depth:
        raise PlanError(f"bits={bits} and fanouts={fanouts} need one entry per layer (t_cm has {depth})")
    q = variance_factors(bits, bucket_size)
    grid = feasible_taus(t_cp, t_cm, deadline, tau_max)
    searched = len(grid)
    if strict:
        grid = grid[np.asarray(step_condition(grid, constants)) <= 1]
        if len(grid) == 0:
            raise PlanError(
                f"no tau satisfies the step-size condition rho(tau) <= 1 with lr={constants.lr} "
                f"and L={constants.lipschitz} (even tau=[1]*{depth}: rho = lr*L); lower the "
                "learning rate or drop --strict"
            )
    totals, times, steps = _evaluate(grid, t_cp, t_cm, deadline, fanouts, q, constants)
    best = int(np.argmin(totals))  # ties: first in lexicographic order (smallest tau_1, ...)
    tau = [int(t) for t in grid[best]]
    result = PlanResult(
        tau=tau, round_time=float(times[best]),
        rounds=_rounds(deadline, float(times[best])), steps=int(steps[best]),
        bound=convergence_bound(tau, int(steps[best]), fanouts, q, constants),  # type: ignore[arg-type]
        step_condition=float(step_condition(tau, constants)),
        t_cp=float(t_cp), t_cm=[float(t) for t in t_cm], q=q, fanouts=fanouts,
        deadline=float(deadline), feasible=len(grid), searched=searched,
    )
    if random > 0:
        result.random = random_comparison(grid, totals, times, steps, best, random, seed)
    return result


def random_comparison(
    grid: np.ndarray, totals: np.ndarray, times: np.ndarray, steps: np.ndarray,
    best: int, count: int, seed: int = 0,
) -> RandomComparison:
    """Draw ``count`` feasible rows uniformly (with replacement) and compare their bounds with row ``best``."""
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(grid), size=count)
    values = totals[picks]
    chosen = totals[best]
    samples = [{"tau": [int(t) for t in grid[i]], "bound": float(totals[i]),
                "round_time": float(times[i]), "steps": int(steps[i])} for i in picks]
    return RandomComparison(
        count=count, feasible=len(grid), minimum=float(values.min()),
        median=float(np.median(values)), mean=float(values.mean()), maximum=float(values.max()),
        not_better=float(np.mean(values >= chosen)),
        median_ratio=float(np.median(values) / chosen) if chosen > 0 else math.nan,
        samples=samples,
    )
