"""The nested tau schedule of QMLHFL / hierarchical SGD, as pure integer arithmetic.

With intra-layer iteration counts ``tau = [tau_1, ..., tau_N]`` (arXiv 2505.08145, Sec. II):
``tau_1`` local SGD steps make one layer-1 period, ``tau_n`` layer-(n-1) periods make one layer-n
period, and one global round is ``prod(tau)`` SGD steps. After local step ``t`` (1-based within
the round) the layers ``1..L`` aggregate, where ``L`` is the largest ``n`` with
``prod(tau_1..tau_n) | t`` (0 when none does). N = 2 gives H-SGD with local period
``I = tau_1`` and global period ``G = tau_1 * tau_2`` (Wang et al., AAAI 2022).
"""

from __future__ import annotations

import math
from typing import Iterator, Sequence

__all__ = ["steps_per_round", "period_lengths", "aggregation_layer", "round_events"]


def _check(tau: Sequence[int]) -> list[int]:
    tau = list(tau)
    if not tau or any((not isinstance(t, int)) or t < 1 for t in tau):
        raise ValueError(f"schedule.tau={tau} must be a non-empty list of integers >= 1")
    return tau


def steps_per_round(tau: Sequence[int]) -> int:
    """Return the SGD steps per device in one global round, ``prod(tau)``."""
    return math.prod(_check(tau))


def period_lengths(tau: Sequence[int]) -> list[int]:
    """Return the length in SGD steps of one period of each layer: ``[tau_1, tau_1*tau_2, ...]``."""
    lengths, product = [], 1
    for t in _check(tau):
        product *= t
        lengths.append(product)
    return lengths


def aggregation_layer(step: int, tau: Sequence[int]) -> int:
    """Return the highest layer that aggregates after local step ``step`` (1-based), or 0.

    Parameters
    ----------
    step : int
        Step count since the start of the run (or of the round; rounds are whole periods).
    tau : sequence of int
        Intra-layer iteration counts, one per layer.
    """
    if step < 1:
        raise ValueError(f"step={step} must be >= 1")
    highest = 0
    for n, length in enumerate(period_lengths(tau), start=1):
        if step % length == 0:
            highest = n
    return highest


def round_events(tau: Sequence[int]) -> Iterator[tuple[int, int]]:
    """Yield ``(step, layer)`` for every step of one round; ``layer`` as in :func:`aggregation_layer`."""
    for step in range(1, steps_per_round(tau) + 1):
        yield step, aggregation_layer(step, tau)
