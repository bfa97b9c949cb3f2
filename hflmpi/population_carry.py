"""A population round whose deadline layer 1 carries late updates into a later close.

With ``clock.late = ["carry", ...]`` a client whose update misses its layer-1 node's deadline
keeps working on the simulated clock (:class:`hflmpi.core.clock.SimulatedClock`): it is busy
until its update arrives, does not start the node's next period, and its update joins the first
close of its node at or after the arrival, discounted by ``(1 + s) ** -a`` for the ``s`` closes
it missed (``a = clock.staleness_exponent[0]``). Each layer-1 period, on every rank:

1. the clock's state says which participants are busy; the others train ``tau_1`` steps from
   their node's model (:class:`hflmpi.learn.clients.ClientTrainer`);
2. the clock closes the period (:meth:`hflmpi.population_clock.RoundClock.carry_period`): who
   arrived in time, who is now held, which held updates apply and with which staleness;
3. a newly held update is kept on its rank as its difference ``d = x_trained - x_anchor`` from
   the model it started from (float64); a held update that applies enters the aggregation as
   the model ``x_node + (1 + s) ** -a * d`` with its undiscounted weight, so
   :meth:`hflmpi.mpi.population.PopulationAggregator.aggregate` renormalises by the
   undiscounted weights (as FedBuff divides by K) and a quantized layer rounds
   ``a_c (1 + s) ** -a d`` with the client's stream at the step of application.

When a layer above closes, the node's model comes from above and the updates still held are
abandoned (the clock counts them), so nothing is held between rounds and a checkpoint needs no
pending update.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from hflmpi.config import RunConfig
from hflmpi.core.schedule import aggregation_layer, steps_per_round
from hflmpi.population_callbacks import aggregation_info

__all__ = ["HeldUpdates", "carry_round"]


class HeldUpdates:
    """The late updates this rank's clients hold for a later close of their layer-1 node.

    Parameters
    ----------
    exponent : float
        ``a`` of the staleness discount ``(1 + s) ** -a``.
    """

    def __init__(self, exponent: float) -> None:
        self.exponent = float(exponent)
        self.deltas: dict[int, torch.Tensor] = {}
        self.most = 0

    def models(self, events: Any, trained: dict[int, torch.Tensor], mine: list[int],
               start_of: Any) -> dict[int, torch.Tensor]:
        """Return the models this rank's children bring to the close described by ``events``.

        Keeps the newly held updates (before the aggregation changes their anchors) and turns
        the applied held ones into discounted models around the node's current model.
        """
        models = dict(trained)
        for client in mine:
            if events.held[client]:
                self.deltas[client] = (trained[client].to(torch.float64)
                                       - start_of(client).to(torch.float64))
        self.most = max(self.most, len(self.deltas))
        for client, stale in events.applied:
            if client in self.deltas:
                discount = (1.0 + stale) ** -self.exponent
                models[client] = (start_of(client).to(torch.float64)
                                  + self.deltas.pop(client) * discount)
        return models

    def abandon(self) -> None:
        """Drop every held update (a layer above closed: the models come from above)."""
        self.deltas.clear()


def carry_round(config: RunConfig, pop: Any, watchdog: Any, rnd: int, weights: list[np.ndarray],
                mine: list[int], work: Any, evaluate_now: bool) -> None:
    """Run one global round of a carrying deadline layer 1 and the layers above (all ranks)."""
    tau, plan, clock = list(config.schedule.tau), pop.plan, pop.clock
    steps = steps_per_round(tau)
    held, trainings = pop.held, dict.fromkeys(mine, 0)
    for period in range(steps // tau[0]):
        step = (period + 1) * tau[0]
        top = aggregation_layer(step, tau)
        busy = clock.clock.busy
        starting = [c for c in mine if not busy[c]]
        began = time.perf_counter()
        result = pop.trainer.train(starting, pop.aggregator.start_of, tau[0])
        compute = time.perf_counter() - began
        for client in starting:
            trainings[client] += 1
            work.losses[client] = work.losses.get(client, 0.0) + result.losses[client]
            work.samples[client] = work.samples.get(client, 0) + result.samples[client]
        events = clock.carry_period(top, weights)  # the simulated clock: in time, held, applied
        models = held.models(events, result.models, mine, pop.aggregator.start_of)
        with watchdog.guard(f"the layer-{top} aggregation of round {rnd} (step {step})"):
            stats = pop.aggregator.aggregate(top, models, weights,
                                             step=(rnd - 1) * steps + step,
                                             measure_error=evaluate_now, carried=events.carried)
        if top > 1:
            held.abandon()
        work.add(top, compute, stats)
        if pop.hooks.aggregation:
            comm = pop.aggregator.comm
            pop.hooks.call(comm, watchdog, "on_aggregation", aggregation_info(
                pop.model, pop.trainer.params, pop.aggregator.start_of(pop.mine[0]), rnd, step,
                steps, top, plan.depth, comm.Get_rank(), comm.Get_size()),
                f"the callbacks after the layer-{top} aggregation of round {rnd} (step {step})")
    work.losses = {c: loss / trainings[c] for c, loss in work.losses.items()}
