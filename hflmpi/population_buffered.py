"""A population round whose layer-1 nodes are buffered (FedBuff) on the simulated clock.

Each period of layer 2 (``tau_2`` flushes of every layer-1 node) runs in three steps, on every
rank with the same numbers:

1. :func:`hflmpi.core.buffered.node_schedule` plans every layer-1 node from its ready time on
   the clock and its participants' profiles (no communication);
2. :class:`hflmpi.mpi.buffered.BufferedNodes` trains each dispatch and applies each flush on the
   ranks that hold the node's clients (ascending node order, so the collectives of spanning
   nodes match);
3. the clock closes layers ``2..top`` from the nodes' last flushes (:meth:`hflmpi.population_clock.
   RoundClock.buffered_period`) and :meth:`hflmpi.mpi.population.PopulationAggregator.aggregate`
   aggregates them as usual; the new models come down and the updates still in flight are
   dropped (counted as late at layer 1), so nothing is in flight between rounds and a
   checkpoint holds no pending update.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np

from hflmpi.config import ConfigError, RunConfig
from hflmpi.core.buffered import node_schedule
from hflmpi.core.schedule import aggregation_layer, steps_per_round
from hflmpi.mpi.buffered import BufferedNodes, NodeWork, empty_stats
from hflmpi.population_callbacks import aggregation_info

__all__ = ["buffered_nodes", "buffered_round"]

_log = logging.getLogger(__name__)


def buffered_nodes(config: RunConfig, aggregator: Any, trainer: Any) -> BufferedNodes | None:
    """Return the buffered layer-1 nodes of this rank (None when layer 1 is not buffered).

    Raises
    ------
    ConfigError
        A secure, robust or private layer 1 (not built for buffered nodes).
    """
    depth = aggregator.plan.depth
    if config.clock.modes_for(depth)[0] != "buffered":
        return None
    agg = config.aggregation
    refused = [name for name, on in (
        ("aggregation.secure", bool(agg.secure) and agg.secure[0]),
        ("aggregation.robust", bool(agg.robust) and agg.robust[0] != "mean"),
        ("privacy.layer", config.privacy.layer == 1),
        ("server_opt.optimizer", config.server_opt.options_for(depth)[0] is not None)) if on]
    if refused:
        raise ConfigError(f"clock.mode[0]=\"buffered\" applies each client's update on its own, "
                          f"but {', '.join(refused)} asks layer 1 for a joint sum, rule or step; "
                          "use them on a layer above, or clock.mode[0]=\"sync\"")
    tau1 = config.schedule.tau[0]

    def train(client: int, start: Any) -> tuple[Any, float, int]:
        result = trainer.train([client], lambda _: start, tau1)
        return result.models[client], result.losses[client], result.samples[client]

    return BufferedNodes(aggregator, train, config.clock.exponents_for(depth)[0],
                         config.clock.server_lr)


def buffered_round(config: RunConfig, pop: Any, watchdog: Any, rnd: int,
                   participating: np.ndarray, weights: list[np.ndarray], work: Any,
                   evaluate_now: bool) -> None:
    """Run one global round of buffered layer-1 nodes and the layers above (all ranks)."""
    tau, plan, clock = list(config.schedule.tau), pop.plan, pop.clock
    steps = steps_per_round(tau)
    periods = steps // (tau[0] * tau[1])
    durations = 2 * clock.clock.client_link + tau[0] * clock.profiles.step_seconds
    client_weights = weights[0]
    done = NodeWork()
    for p in range(1, periods + 1):
        step = p * tau[0] * tau[1]
        top = aggregation_layer(step, tau)
        ready = clock.clock.ready[1]
        schedules = []
        for k in range(plan.node_count(1)):
            members = [c for c in plan.children(1, k) if participating[c]]
            schedules.append(node_schedule(float(ready[k]), members, durations[members],
                                           config.clock.buffer[0], tau[1]))
        stats = empty_stats(plan.depth)
        began = time.perf_counter()
        with watchdog.guard(f"the buffered layer-1 flushes of round {rnd} (layer-2 period {p})"):
            for k in pop.aggregator.nodes[1]:
                pop.buffered.run(k, schedules[k], client_weights, (rnd - 1) * periods + p, done,
                                 stats)
        work.add(1, time.perf_counter() - began, stats)
        carried = clock.buffered_period(
            top, np.array([s.close for s in schedules]),
            np.array([client_weights[s.applied_clients()].sum() for s in schedules]),
            sum(s.dropped for s in schedules), sum(len(s.flushes) for s in schedules),
            [(s.uploads[u].client, x) for s in schedules for f in s.flushes
             for u, x in zip(f.uploads, f.staleness)])
        with watchdog.guard(f"the layer-{top} aggregation of round {rnd} (step {step})"):
            above = pop.aggregator.aggregate(top, {}, weights, step=(rnd - 1) * steps + step,
                                             measure_error=evaluate_now, carried=carried,
                                             bottom=2)
        work.add(top, 0.0, above)
        if pop.hooks.aggregation:  # after each aggregation above the buffered layer
            comm = pop.aggregator.comm
            pop.hooks.call(comm, watchdog, "on_aggregation", aggregation_info(
                pop.model, pop.trainer.params, pop.aggregator.start_of(pop.mine[0]), rnd, step,
                steps, top, plan.depth, comm.Get_rank(), comm.Get_size()),
                f"the callbacks after the layer-{top} aggregation of round {rnd} (step {step})")
    _log.debug("hflmpi: round %d: this rank held up to %d updates in flight (%.1f MiB)", rnd,
               done.in_flight, done.in_flight * pop.aggregator.numel
               * pop.aggregator.models[1][pop.aggregator.nodes[1][0]].element_size() / 2**20
               if done.in_flight else 0.0)
    work.losses = {c: loss / done.trainings[c] for c, loss in done.losses.items()}
    work.samples = dict(done.samples)
