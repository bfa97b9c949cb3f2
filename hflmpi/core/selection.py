"""Which clients are online in a round, and which of them are selected into the round's cohort.

Pure module (numpy; no MPI, no torch of its own). Every rank calls these functions with the same
inputs and gets the same answer: all randomness comes from the keyed streams of
:mod:`hflmpi.core.rng` (``purpose="cohort"`` for the selection, ``purpose="availability"`` for
Bernoulli availability), keyed by the run's seed and the round. Rounds are numbered from 1.

Selection modes (:class:`SelectionOptions`, :func:`select_cohort`):

* ``"all"``: every online client;
* ``"uniform"``: ``k`` distinct online clients uniformly at random;
* ``"weighted"``: ``k`` distinct online clients drawn without replacement with probability
  proportional to their sample counts (clients with no samples are never drawn);
* ``"priority"``: a simplified Oort (Lai et al., OSDI 2021): the ``round(k (1 - exploration))``
  online clients of highest utility ``U_c = samples_c * loss_c`` (times the speed penalty
  ``(speed_c / median)**speed_weight`` for clients slower than the online median) among those
  with a known loss, then the rest uniformly from the online clients not picked, never-trained
  clients (NaN loss) first. In the first round no loss is known, so it is uniform selection
  (the very same cohort as ``"uniform"`` with the same seed).

If fewer clients are online (or eligible) than the cohort size, all of them are selected: a
documented behaviour, not an error. The page ``docs/population.md`` states the formulas and the
availability trace formats (:class:`hflmpi.core.availability.Availability`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from hflmpi.core.rng import numpy_generator
from hflmpi.errors import HflmpiError

__all__ = [
    "SelectionError",
    "SelectionOptions",
    "MODES",
    "cohort_size",
    "select_cohort",
    "priority_utility",
    "renormalised_weights",
]

MODES = ("all", "uniform", "weighted", "priority")
"""The selection modes, in the order the documentation lists them."""



class SelectionError(HflmpiError, ValueError):
    """Bad selection options, client arrays or availability trace (the message says the fix)."""


def _round_half_up(x: float) -> int:
    """Round to the nearest integer, halves up (Python's ``round`` rounds halves to even)."""
    return int(math.floor(x + 0.5))


@dataclass(frozen=True)
class SelectionOptions:
    """How each round's cohort is chosen among the online clients.

    Parameters
    ----------
    mode : {"all", "uniform", "weighted", "priority"}
        The selection rule (see the module docstring).
    cohort : float
        Cohort size: ``>= 1`` is a number of clients (a whole number); in ``(0, 1)`` a fraction
        of the population, rounded to nearest (halves up), at least 1. Ignored for ``"all"``.
    exploration : float
        ``"priority"`` only: fraction of the cohort drawn uniformly from the clients not picked
        by utility (Oort's epsilon), in ``[0, 1]``.
    speed_weight : float
        ``"priority"`` only: exponent of the speed penalty (Oort's alpha), ``>= 0``; 0 ignores
        speed.
    seed : int
        The run's seed, ``>= 0``; keys the ``"cohort"`` random stream.

    Raises
    ------
    SelectionError
        On an unknown mode or a value out of range.
    """

    mode: str
    cohort: float
    exploration: float = 0.1
    speed_weight: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise SelectionError(
                f"selection mode {self.mode!r} is unknown; use one of "
                + ", ".join(repr(m) for m in MODES)
            )
        if self.mode != "all":
            cohort = self.cohort
            if isinstance(cohort, bool) or not isinstance(cohort, (int, float)):
                raise SelectionError(f"cohort {cohort!r} is not a number; give a number of "
                                     "clients (>= 1) or a fraction of the population in (0, 1)")
            if not math.isfinite(cohort) or cohort <= 0:
                raise SelectionError(f"cohort {cohort!r} must be > 0: a number of clients "
                                     "(>= 1) or a fraction of the population in (0, 1)")
            if cohort >= 1 and cohort != int(cohort):
                raise SelectionError(
                    f"cohort {cohort!r} is neither a whole number of clients nor a fraction in "
                    f"(0, 1); use {int(cohort)} or {int(cohort) + 1} clients, or a fraction"
                )
        if not (0.0 <= self.exploration <= 1.0):  # NaN fails too
            raise SelectionError(f"exploration {self.exploration!r} must be in [0, 1] (the "
                                 "fraction of a priority cohort drawn at random)")
        if not (math.isfinite(self.speed_weight) and self.speed_weight >= 0):
            raise SelectionError(f"speed_weight {self.speed_weight!r} must be a finite number "
                                 ">= 0 (0 ignores client speed)")
        if isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer)) \
                or self.seed < 0:
            raise SelectionError(f"seed {self.seed!r} must be an integer >= 0")


def cohort_size(options: SelectionOptions, population: int) -> int:
    """Return the number of clients a round's cohort asks for.

    Parameters
    ----------
    options : SelectionOptions
        The selection options.
    population : int
        Number of clients in the federation (``>= 1``).

    Returns
    -------
    int
        ``population`` for ``"all"``; ``int(cohort)`` for ``cohort >= 1``; otherwise
        ``max(1, round(cohort * population))`` (halves rounded up). Fewer may be selected in a
        round where fewer clients are online.

    Raises
    ------
    SelectionError
        If ``population < 1`` or a cohort given as a number of clients exceeds it.
    """
    population = _check_population(population)
    if options.mode == "all":
        return population
    if options.cohort >= 1:
        k = int(options.cohort)
        if k > population:
            raise SelectionError(
                f"cohort {k} exceeds the population of {population} clients; use at most "
                f"{population}, or a fraction of the population in (0, 1)"
            )
        return k
    return max(1, _round_half_up(options.cohort * population))


def select_cohort(
    options: SelectionOptions,
    round: int,
    online: np.ndarray,
    samples: np.ndarray,
    losses: np.ndarray,
    speeds: np.ndarray,
) -> np.ndarray:
    """Return the ids of the clients selected into round ``round``'s cohort.

    Parameters
    ----------
    options : SelectionOptions
        The selection options.
    round : int
        The round, from 1; keys the random stream, so each round draws afresh.
    online : ndarray of bool, shape (population,)
        Which clients are online this round (see :class:`Availability`).
    samples : ndarray of int, shape (population,)
        Each client's number of training samples, ``>= 0`` (``"weighted"`` and ``"priority"``).
    losses : ndarray of float, shape (population,)
        Each client's last reported mean training loss; NaN for a client never trained
        (``"priority"``). Must not be infinite.
    speeds : ndarray of float, shape (population,)
        Each client's speed in (simulated) steps per second, higher is faster; must be > 0 for
        the online clients when ``speed_weight > 0`` (``"priority"``).

    Returns
    -------
    ndarray of int64
        The selected client ids, sorted; a subset of the online clients of size
        ``min(cohort_size(options, population), eligible)``, where the eligible clients are the
        online ones (with ``samples > 0`` for ``"weighted"``).

    Raises
    ------
    SelectionError
        On arrays of the wrong length or invalid values, or a cohort larger than the population.
    """
    online, samples, losses, speeds = _check_arrays(online, samples, losses, speeds)
    round = _check_round(round)
    population = online.shape[0]
    k = cohort_size(options, population)
    online_ids = np.flatnonzero(online).astype(np.int64)
    if options.mode == "all":
        return online_ids
    rng = numpy_generator(options.seed, purpose="cohort", round=round)
    if options.mode == "uniform":
        return _draw(rng, online_ids, min(k, online_ids.size))
    if options.mode == "weighted":
        eligible = online_ids[samples[online_ids] > 0]
        weights = samples[eligible].astype(np.float64)
        if eligible.size == 0:
            return eligible
        chosen = rng.choice(eligible, size=min(k, eligible.size), replace=False,
                            p=weights / weights.sum())
        return np.sort(chosen).astype(np.int64)
    if options.speed_weight > 0:
        _check_speeds(speeds, online)
    return _select_priority(options, rng, min(k, online_ids.size), online_ids, samples, losses,
                            speeds)


def _draw(rng: np.random.Generator, ids: np.ndarray, k: int) -> np.ndarray:
    """Return ``k`` distinct entries of ``ids``, uniformly at random, sorted."""
    if k >= ids.size:
        return np.sort(ids).astype(np.int64)
    return np.sort(rng.choice(ids, size=k, replace=False)).astype(np.int64)


def priority_utility(
    options: SelectionOptions,
    online: np.ndarray,
    samples: np.ndarray,
    losses: np.ndarray,
    speeds: np.ndarray,
) -> np.ndarray:
    """Return each client's Oort utility (NaN where the loss is unknown), unchecked inputs.

    ``U_c = samples_c * losses_c``; with ``speed_weight > 0`` a client slower than the median
    speed of the online clients is multiplied by ``(speeds_c / median) ** speed_weight``.

    Parameters
    ----------
    options : SelectionOptions
        The selection options (``speed_weight``).
    online, samples, losses, speeds : ndarray
        As for :func:`select_cohort`.

    Returns
    -------
    ndarray of float64, shape (population,)
        The utilities (meaningful for the online clients only).
    """
    utility = samples.astype(np.float64) * losses.astype(np.float64)
    if options.speed_weight > 0 and online.any():
        speed = speeds.astype(np.float64)
        median = float(np.median(speed[online]))
        slow = speed < median
        utility[slow] *= (speed[slow] / median) ** options.speed_weight
    return utility


def _select_priority(
    options: SelectionOptions,
    rng: np.random.Generator,
    k: int,
    online_ids: np.ndarray,
    samples: np.ndarray,
    losses: np.ndarray,
    speeds: np.ndarray,
) -> np.ndarray:
    """Oort, simplified: the top utilities, then uniform exploration (never-trained first)."""
    online = np.zeros(samples.shape[0], dtype=bool)
    online[online_ids] = True
    utility = priority_utility(options, online, samples, losses, speeds)
    known = online_ids[~np.isnan(losses[online_ids])]
    exploit = min(_round_half_up(k * (1.0 - options.exploration)), known.size)
    # lexsort's last key is the primary one: highest utility first, ties to the lower id
    ranked = known[np.lexsort((known, -utility[known]))]
    picked = ranked[:exploit]
    rest = k - exploit
    left = np.setdiff1d(online_ids, picked)
    unseen = left[np.isnan(losses[left])]
    if rest <= unseen.size:
        explored = _draw(rng, unseen, rest)
    else:
        trained = np.setdiff1d(left, unseen)
        explored = np.concatenate([unseen, _draw(rng, trained, rest - unseen.size)])
    return np.sort(np.concatenate([picked, explored])).astype(np.int64)


def _check_population(population: Any) -> int:
    if isinstance(population, bool) or not isinstance(population, (int, np.integer)) \
            or population < 1:
        raise SelectionError(f"population {population!r} must be a whole number of clients >= 1")
    return int(population)


def _check_round(round: Any) -> int:
    if isinstance(round, bool) or not isinstance(round, (int, np.integer)) or round < 1:
        raise SelectionError(f"round {round!r} must be an integer >= 1 (rounds count from 1)")
    return int(round)


def _check_arrays(
    online: Any, samples: Any, losses: Any, speeds: Any
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Return the four per-client arrays as numpy arrays, or raise on a bad one."""
    online = np.asarray(online)
    if online.ndim != 1 or online.dtype != np.bool_:
        raise SelectionError(f"online must be a 1-D bool array (one flag per client), got "
                             f"shape {online.shape} dtype {online.dtype}")
    population = online.shape[0]
    if population < 1:
        raise SelectionError("online is empty; the population needs at least one client")
    arrays = {"samples": np.asarray(samples), "losses": np.asarray(losses),
              "speeds": np.asarray(speeds)}
    for name, array in arrays.items():
        if array.shape != (population,):
            raise SelectionError(f"{name} has shape {array.shape} but online has "
                                 f"{population} clients; give one entry per client")
    samples_ = arrays["samples"]
    if not np.issubdtype(samples_.dtype, np.integer) or (samples_ < 0).any():
        raise SelectionError("samples must be integer sample counts >= 0, one per client")
    for name in ("losses", "speeds"):
        if not np.issubdtype(arrays[name].dtype, np.floating) \
                and not np.issubdtype(arrays[name].dtype, np.integer):
            raise SelectionError(f"{name} must be a float array, got dtype {arrays[name].dtype}")
    losses_ = arrays["losses"].astype(np.float64)
    if np.isinf(losses_).any():
        bad = int(np.flatnonzero(np.isinf(losses_))[0])
        raise SelectionError(f"losses[{bad}] is {losses_[bad]}: a reported loss must be finite "
                             "(NaN marks a client never trained)")
    speeds_ = arrays["speeds"].astype(np.float64)
    return online, samples_, losses_, speeds_


def _check_speeds(speeds: np.ndarray, online: np.ndarray) -> None:
    bad = np.flatnonzero(online & ~(np.isfinite(speeds) & (speeds > 0)))
    if bad.size:
        raise SelectionError(
            f"speeds[{int(bad[0])}] is {speeds[bad[0]]}: with speed_weight > 0 every online "
            "client needs a finite speed > 0 (steps per second); fix the speeds or set "
            "speed_weight = 0"
        )


def renormalised_weights(weights: np.ndarray, participating: np.ndarray) -> np.ndarray:
    """Return the participants' weights divided by their sum, 0 for everyone else.

    Parameters
    ----------
    weights : ndarray of float or int, shape (n,)
        Non-negative finite weights (e.g. sample counts).
    participating : ndarray of bool, shape (n,)
        Who takes part.

    Returns
    -------
    ndarray of float64, shape (n,)
        ``weights_i / sum_{j participating} weights_j`` for participants, 0 otherwise; all zeros
        when no one participates or the participants' weights sum to 0 (never divides by zero).

    Raises
    ------
    SelectionError
        On shapes that differ, or a negative or non-finite weight.
    """
    w = np.asarray(weights, dtype=np.float64)
    mask = np.asarray(participating)
    if w.ndim != 1 or mask.shape != w.shape or mask.dtype != np.bool_:
        raise SelectionError(f"weights (shape {w.shape}) and participating (shape {mask.shape}, "
                             f"dtype {mask.dtype}) must be 1-D, of one length, participating bool")
    if not np.isfinite(w).all() or (w < 0).any():
        raise SelectionError("weights must be finite and >= 0")
    out = np.where(mask, w, 0.0)
    total = float(out.sum())
    if total <= 0.0:
        return np.zeros_like(out)
    return out / total
