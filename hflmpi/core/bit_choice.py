"""Choose the quantizer width of every layer: the cheapest whose variance penalty fits a bound.

Pure module (no MPI, no I/O; the command line is ``hflmpi plan --choose-bits``). The convergence
penalty of a ``b``-bit layer is its unbiased quantizer's variance factor ``q(b)``
(``E||Q(x) - x||^2 <= q ||x||^2``, ``q = min(B/s^2, sqrt(B)/s)`` for buckets of ``B`` entries and
``s = 2^(b-1) - 1`` levels, QSGD, Alistarh et al. 2017; :func:`hflmpi.core.tau_search.
variance_factors`, the ``q_n`` of the tau planner's bound), and ``q(0) = 0`` for an exact layer.
Among every combination of the candidate widths per layer whose ``q_n`` all stay at or below
``max_variance``, the choice is the one with the smallest predicted time (given by ``cost``,
e.g. a top-layer aggregation event of :func:`hflmpi.core.costmodel.aggregation_costs`, which
holds every layer once); ties go to the smaller total variance.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Callable, Sequence

from hflmpi.core.tau_search import PlanError, variance_factors

__all__ = ["BitOption", "bit_options", "choose_bits"]


@dataclass(frozen=True)
class BitOption:
    """One combination of widths: ``bits`` per layer, its ``cost`` (s), ``q`` per layer, ``fits``."""

    bits: tuple[int, ...]
    cost: float
    q: tuple[float, ...]
    fits: bool


def _candidates(candidates: Sequence[int] | Sequence[Sequence[int]], depth: int) -> list[list[int]]:
    if depth < 1:
        raise PlanError(f"need at least one layer, got depth={depth}")
    per_layer: list[list[int]] = (
        [[int(c) for c in candidates]] * depth if all(isinstance(c, int) for c in candidates)  # type: ignore[arg-type]
        else [[int(b) for b in c] for c in candidates])  # type: ignore[union-attr]
    if len(per_layer) != depth or any(not c for c in per_layer):
        raise PlanError(f"candidate bits {list(candidates)} need one non-empty list, or one per layer ({depth})")
    return per_layer


def bit_options(
    candidates: Sequence[int] | Sequence[Sequence[int]], depth: int,
    cost: Callable[[tuple[int, ...]], float], max_variance: float, bucket_size: int = 0,
) -> list[BitOption]:
    """Return every combination of candidate widths, cheapest first, each marked whether it fits.

    Parameters
    ----------
    candidates : sequence of int, or one sequence per layer
        Widths to consider (0 = exact), e.g. ``[0, 8, 4, 2]`` for every layer.
    depth : int
        Number of aggregation layers.
    cost : callable
        Predicted seconds of a combination (a tuple of widths, layer 1 first).
    max_variance : float
        Largest variance factor ``q_n`` any layer may have.
    bucket_size : int
        Quantizer bucket size (0 = the per-width default).

    Raises
    ------
    PlanError
        If the candidates are malformed or a width is not supported.
    """
    if not max_variance >= 0:
        raise PlanError(f"--max-variance={max_variance} must be >= 0")
    options = []
    for combo in itertools.product(*_candidates(candidates, depth)):
        try:
            q = tuple(variance_factors(list(combo), bucket_size))
        except ValueError as exc:
            raise PlanError(f"candidate bits {list(combo)}: {exc}") from None
        options.append(BitOption(tuple(combo), float(cost(tuple(combo))), q, max(q) <= max_variance))
    return sorted(options, key=lambda o: (o.cost, sum(o.q), o.bits))


def choose_bits(
    candidates: Sequence[int] | Sequence[Sequence[int]], depth: int,
    cost: Callable[[tuple[int, ...]], float], max_variance: float, bucket_size: int = 0,
) -> BitOption:
    """Return the cheapest combination whose every layer has ``q_n <= max_variance``.

    See :func:`bit_options` for the parameters.

    Raises
    ------
    PlanError
        If no combination fits (include 0, exact, among the candidates to always have one).
    """
    for option in bit_options(candidates, depth, cost, max_variance, bucket_size):
        if option.fits:
            return option
    raise PlanError(f"no candidate bits fit --max-variance={max_variance}: add 0 (exact) or a wider "
                    "width to the candidates, or allow more variance")
