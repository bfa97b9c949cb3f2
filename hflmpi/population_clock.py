"""The simulated clock of a population run: device profiles, arrivals per period, records per round.

Built from the ``[clock]`` and ``[clients]`` sections by :func:`hflmpi.population.train_population`
on every rank (the same numbers everywhere, no communication): :mod:`hflmpi.core.devices` gives
each client's profile, :class:`hflmpi.core.clock.SimulatedClock` says per layer-1 period which
children arrived before their node closed. With every layer ``"sync"`` nothing is dropped and the
aggregation is the synchronous one bit for bit; the clock then only records the simulated time.
"""

from __future__ import annotations

import logging
import math
from dataclasses import replace
from typing import Any, Sequence

import numpy as np

from hflmpi.config import ConfigError, RunConfig
from hflmpi.core.clock import PeriodEvents, SimulatedClock, message_bytes
from hflmpi.core.devices import DeviceProfiles, draw_profiles, read_profiles
from hflmpi.core.population import PopulationPlan
from hflmpi.record.store import RoundMetrics

__all__ = ["RoundClock", "device_profiles"]

_log = logging.getLogger(__name__)


def device_profiles(config: RunConfig, clients: int) -> DeviceProfiles:
    """Return every client's profile: read from ``clock.profile`` or drawn from the run seed."""
    opts = config.clock
    if opts.profile:
        return read_profiles(opts.profile, clients)
    return draw_profiles(clients, config.run.seed, step_seconds=opts.step_seconds,
                         uplink=opts.uplink, latency=opts.latency,
                         slow_fraction=opts.slow_fraction, slow_factor=opts.slow_factor,
                         spread=config.clients.speed_spread)


class RoundClock:
    """A population's simulated clock and what it recorded in the current round.

    Parameters
    ----------
    config : RunConfig
        The run's config (``[clock]``, ``clients.speed_spread``, ``schedule.tau``).
    plan : PopulationPlan
        The tree of clients.
    numel : int
        Model parameters (the message sizes follow from it and the quantizers).
    bits, bucket_sizes : sequence of int
        Per layer, the quantizer width (0: exact) and bucket size.

    Raises
    ------
    ConfigError
        A layer-1 deadline shorter than one local step of the fastest client.
    ProfileError
        A profile file that does not describe the population.
    """

    def __init__(self, config: RunConfig, plan: PopulationPlan, numel: int,
                 bits: Sequence[int], bucket_sizes: Sequence[int]) -> None:
        depth, opts = plan.depth, config.clock
        self.profiles = device_profiles(config, plan.clients)
        deadlines = opts.deadlines_for(depth)
        _check_deadline(deadlines[0], config.schedule.tau[0], self.profiles,
                        message_bytes(numel, bits, bucket_sizes)[0])
        uplinks, latencies = opts.links_for(depth)
        self.clock = SimulatedClock(plan, config.schedule.tau[0], self.profiles,
                                    opts.modes_for(depth), deadlines,
                                    message_bytes(numel, bits, bucket_sizes), uplinks, latencies,
                                    late=opts.late_for(depth))
        self.asynchronous = opts.asynchronous
        self.late = np.zeros(depth)
        self.late_clients = np.zeros(plan.clients, dtype=bool)
        self.buffered = opts.modes_for(depth)[0] == "buffered"
        self.carry = self.clock.carry
        self.abandoned = 0
        self.flushes = 0
        self.staleness: list[int] = []
        self.client_staleness = np.full(plan.clients, np.nan)

    @property
    def time(self) -> float:
        """Return the simulated time at the end of the last global round (seconds)."""
        return self.clock.time

    def restart(self, time: float) -> None:
        """Continue from a checkpoint whose round ended at simulated ``time``."""
        self.clock.reset(time)

    def period(self, top: int, weights: Sequence[np.ndarray]) -> list[np.ndarray] | None:
        """Advance over one layer-1 period; return the weights the updates carry (None: all sync).

        With every layer ``"sync"`` every update arrives with its node weight, so the
        aggregation takes ``weights`` as they are (the synchronous bits).
        """
        events = self.clock.period(top, weights)
        self.late += events.late
        self.late_clients |= events.late_clients
        return events.carried if self.asynchronous else None

    def carry_period(self, top: int, weights: Sequence[np.ndarray]) -> PeriodEvents:
        """Advance over one layer-1 period of a deadline layer 1 that carries its late updates.

        Records the staleness of every applied held update and the abandoned ones; returns the
        clock's events (who started, who is held, which held updates apply, the carried weights).
        """
        events = self.clock.period(top, weights)
        self.late += events.late
        self.late_clients |= events.late_clients
        self.abandoned += events.abandoned
        for client, stale in events.applied:
            self.staleness.append(stale)
            self.client_staleness[client] = stale
        return events

    def buffered_period(self, top: int, closed: np.ndarray, weights: np.ndarray, dropped: int,
                        flushes: int, applied: Sequence[tuple[int, int]]) -> list[np.ndarray]:
        """Advance over one layer-2 period of buffered layer-1 nodes; return the carried weights.

        ``closed`` and ``weights``: per layer-1 node, its last flush and the weight of its
        clients with an applied update; ``applied``: every applied update's (client, staleness),
        in the order each node applied them.
        """
        events = self.clock.buffered_period(top, closed, weights, dropped)
        self.late += events.late
        self.flushes += flushes
        for client, stale in applied:
            self.staleness.append(int(stale))
            self.client_staleness[client] = stale
        return events.carried

    def close_round(self, metrics: RoundMetrics | None
                    ) -> tuple[RoundMetrics | None, np.ndarray, np.ndarray | None]:
        """Add the round's simulated time and late counts to ``metrics``; start the next round.

        Returns the metrics (None stays None), which clients were late in the round and, with a
        buffered layer 1, each client's last applied staleness (NaN: none; else None).
        """
        late_clients = self.late_clients.copy()
        last = self.client_staleness.copy() if self.buffered or self.carry else None
        self.client_staleness[:] = np.nan
        out = None if metrics is None else replace(metrics, sim_time=self.time,
                                                   late=list(self.late), **self._staleness())
        self.late[:] = 0.0
        self.late_clients[:] = False
        self.flushes, self.staleness = 0, []
        if self.abandoned:
            _log.debug("hflmpi: %d held late updates abandoned in the round", self.abandoned)
        self.abandoned = 0
        return out, late_clients, last

    def _staleness(self) -> dict[str, Any]:
        """Return the round's flush and staleness columns (layer 1; NaN above, or empty)."""
        if not (self.buffered or self.carry):
            return {}
        pad = [math.nan] * (len(self.late) - 1)
        stale = np.asarray(self.staleness, dtype=np.float64)
        return {"flushes": [float(self.flushes) if self.buffered else math.nan, *pad],
                "staleness_count": [float(stale.size), *pad],
                "staleness_mean": [float(stale.mean()) if stale.size else math.nan, *pad],
                "staleness_max": [float(stale.max()) if stale.size else math.nan, *pad]}


def _check_deadline(deadline: float, tau1: int, profiles: DeviceProfiles, nbytes: float) -> None:
    """Refuse a layer-1 deadline below one step of the fastest client; warn if none can make it."""
    fastest = float(profiles.step_seconds.min())
    if deadline < fastest:
        raise ConfigError(
            f"clock.deadline[0]={deadline:g} s is shorter than one local step of the fastest "
            f"client ({fastest:g} s): no update could ever arrive; give a layer-1 deadline of at "
            f"least {tau1} steps plus the upload, e.g. clock.deadline[0]="
            f"{_suggest(tau1, profiles, nbytes):.3g}")
    best = float((tau1 * profiles.step_seconds + 2 * profiles.link_seconds(nbytes)).min())
    if deadline < best:
        _log.warning("hflmpi: clock.deadline[0]=%g s is shorter than the fastest client's period "
                     "(%g s for %d steps, download and upload): every layer-1 update will be "
                     "late", deadline, best, tau1)


def _suggest(tau1: int, profiles: DeviceProfiles, nbytes: float) -> float:
    """Return a deadline the median client makes (its steps, download and upload)."""
    period = tau1 * profiles.step_seconds + 2 * profiles.link_seconds(nbytes)
    return float(np.median(period))
