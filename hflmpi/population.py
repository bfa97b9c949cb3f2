"""The round loop of a population: many clients per rank, a cohort per round.

With ``clients.count > 0`` the tree is a tree of clients placed on the ranks
(:mod:`hflmpi.core.population`). Each global round:

1. every rank computes the same cohort: the online clients (:class:`hflmpi.core.selection.
   Availability`) selected by ``clients.selection`` from the losses, sizes and speeds known so far;
2. for each layer-1 period, the participants on each rank train ``tau_1`` steps from their
   layer-1 node's model (:class:`hflmpi.learn.clients.ClientTrainer`), then the layers that close
   aggregate bottom-up, in rank memory or over the spanning nodes' communicators, with weights
   renormalised over the participants (:class:`hflmpi.mpi.population.PopulationAggregator`)
   whose updates arrived in time on the simulated clock (:mod:`hflmpi.population_clock`);
3. the global model is evaluated, the round's metrics and per-client records are written by rank 0,
   and a checkpoint holds the model and every client's sampler position, last loss and (where
   the solver keeps it) momentum.

Clients that are not selected do no work. Run by :func:`hflmpi.federation.train` when the config
has a population; talks to MPI only through :mod:`hflmpi.mpi`.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence, TextIO

import numpy as np
import torch

from hflmpi.config import ConfigError, RunConfig
from hflmpi.core.availability import Availability
from hflmpi.core.population import PopulationPlan, place_clients, plan_population
from hflmpi.core.schedule import aggregation_layer, steps_per_round
from hflmpi.core.selection import (
    SelectionOptions,
    priority_utility,
    select_cohort,
)
from hflmpi.core.topology import plan_fanouts, plan_groups
from hflmpi.core.wire import Method
from hflmpi.learn.clients import ClientTrainer
from hflmpi.learn.data import TensorDataset, load_dataset
from hflmpi.learn.flat import detached_copy, flatten_parameters
from hflmpi.learn.local import evaluate, lr_at
from hflmpi.learn.models import build_model
from hflmpi.learn.partition import make_partition
from hflmpi.mpi.checkpointing import check_fresh_start, check_resume
from hflmpi.mpi.comm import mpi_provenance
from hflmpi.mpi.guard import SetupError, Watchdog, agree
from hflmpi.mpi.hooks import Hooks
from hflmpi.mpi.metrics import end_of_round
from hflmpi.mpi.model_check import check_same_bits
from hflmpi.mpi.population import PopulationAggregator, PopulationStats, node_weights
from hflmpi.mpi.population_divergence import population_divergences
from hflmpi.mpi.population_rules import rules_from_config
from hflmpi.mpi.population_state import (
    broadcast_resume,
    gather_client_state,
    max_over_ranks,
    reduce_round,
    share_client_values,
    write_population_checkpoint,
)
from hflmpi.mpi.preempt import PreemptionFlag
from hflmpi.population_buffered import buffered_nodes, buffered_round
from hflmpi.population_callbacks import aggregation_info, round_info, weighted_loss
from hflmpi.population_carry import HeldUpdates, carry_round
from hflmpi.population_clock import RoundClock
from hflmpi.record.progress import Progress
from hflmpi.record.provenance import provenance
from hflmpi.record.replace import drop_replaced
from hflmpi.record.runfile import check_model_size, close_record, open_record, record_error
from hflmpi.record.store import RoundMetrics, RunRecord

__all__ = ["plan_clients", "train_population"]

_log = logging.getLogger(__name__)


def plan_clients(config: RunConfig, ranks: int) -> PopulationPlan:
    """Plan the tree of ``clients.count`` clients and place them on ``ranks`` ranks (pure)."""
    count, topo = config.clients.count, config.topology
    if topo.kind == "nodes":
        raise ConfigError("topology.nodes=true groups ranks by host, but with clients.count the "
                          "tree is a tree of clients; give topology.fanouts (e.g. [16, 4, 4]) "
                          "or topology.groups over the clients")
    if topo.kind == "fanouts":
        fanouts = list(topo.fanouts or ())
        if math.prod(fanouts) != count:
            raise ConfigError(f"topology.fanouts={fanouts} has {math.prod(fanouts)} leaves but "
                              f"clients.count={count}; the product of the fan-outs must be the "
                              "number of clients")
        tree = plan_fanouts(fanouts, count)
    elif topo.kind == "groups":
        tree = plan_groups(topo.groups, count)
    else:
        tree = plan_fanouts([count], count)
    if len(config.schedule.tau) != tree.depth:
        raise ConfigError(f"schedule.tau={list(config.schedule.tau)} has "
                          f"{len(config.schedule.tau)} entries but the tree of clients has "
                          f"{tree.depth} layers; give one tau per layer")
    config.check_layer_options(tree.depth, [[len(kids) for kids in layer] for layer in tree.children])
    return plan_population(tree, place_clients(count, ranks, config.clients.placement))


@dataclass
class _Population:
    """Everything set-up builds on one rank; the round loop only reads it."""

    plan: PopulationPlan
    device: torch.device
    train_set: TensorDataset
    my_test: TensorDataset
    parts: list[np.ndarray]
    sizes: np.ndarray
    client_weights: np.ndarray
    model: torch.nn.Module
    aggregator: PopulationAggregator
    trainer: ClientTrainer
    mine: tuple[int, ...]
    availability: Availability
    speeds: np.ndarray
    clock: RoundClock
    hooks: Hooks
    buffered: Any = None  # hflmpi.mpi.buffered.BufferedNodes when layer 1 is buffered
    held: HeldUpdates | None = None  # with clock.late[0] = "carry"


def train_population(
    config: RunConfig, comm: Any, *, resume: str | os.PathLike[str] | None = None,
    stream: TextIO | None = None, allow_config_change: bool = False,
    replace_unfinished: bool = False, dataset: Callable[..., Any] | None = None,
    overwrite: bool = False, callbacks: Sequence[Any] = (), device: torch.device | None = None,
) -> Any:
    """Train a population of clients over ``comm`` (see :func:`hflmpi.federation.train`)."""
    from hflmpi.federation import TrainResult

    record_path = Path(resume) if resume is not None else Path(config.run.out)
    plan = agree(comm, "planning the tree of clients", lambda: plan_clients(config, comm.Get_size()))
    if resume is None and not (overwrite or replace_unfinished):
        check_fresh_start(comm, record_path)
    checkpoint, update = check_resume(comm, Path(resume) if resume is not None else None, config,
                                      plan.depth, allow_config_change)
    pop = _set_up(config, comm, plan, dataset, device or torch.device("cpu"), callbacks)
    state = None
    if resume is not None:
        agree(comm, "checking the checkpoint against the model",
              lambda: check_model_size(checkpoint, pop.aggregator.numel, config))
        state = broadcast_resume(comm, checkpoint, plan.clients, pop.aggregator.numel,
                                 pop.trainer.keeps_momentum)
        pop.aggregator.optimizers.restore(
            comm, checkpoint.extra_arrays if checkpoint is not None else None,
            allow_fresh=allow_config_change)
    watchdog = Watchdog(comm, config.run.watchdog_seconds)
    try:
        rank = comm.Get_rank()
        start_round = 1 if state is None else state.round + 1
        losses = np.full(plan.clients, np.nan)
        if state is not None:
            pop.aggregator.set_all(torch.from_numpy(state.model).to(pop.aggregator.dtype))
            pop.clock.restart(state.sim_time)
            losses = state.losses
            pop.trainer.load_positions({c: state.positions[c] for c in pop.mine
                                        if state.positions[c][0] >= 0})
            if state.momentum is not None:
                for c in pop.mine:
                    pop.trainer.momentum[c] = torch.from_numpy(state.momentum[c]).to(
                        pop.aggregator.dtype).clone()
        with watchdog.guard("opening the run record"):
            facts = mpi_provenance(comm)
            record: RunRecord | None = agree(comm, "opening the run record", lambda: open_record(
                config, comm.Get_size(), plan.tree, record_path, resuming=state is not None,
                last_round=start_round - 1, parts=pop.parts, train_set=pop.train_set,
                update=update, allow_change=allow_config_change,
                replace_unfinished=replace_unfinished, overwrite=overwrite,
                provenance=provenance(facts, os.environ, sys.argv, os.getcwd()),
            ) if rank == 0 else None)
        progress = (Progress(stream or sys.stdout, config.run.progress,
                             total_rounds=config.run.rounds) if rank == 0 else None)
        last, accuracy, test_loss, preempted = _run_rounds(
            config, comm, pop, watchdog, start_round, losses, record, progress, record_path,
            resumed=state is not None)
    finally:
        watchdog.close()
        pop.aggregator.free()
        pop.hooks.close()
    if rank == 0 and not preempted:
        drop_replaced(record_path)
    final = pop.aggregator.global_model
    pop.trainer.params.flat.copy_(final)
    return TrainResult(last, accuracy, test_loss, final.detach().cpu().clone(), record_path,
                       detached_copy(pop.model), preempted=preempted,
                       privacy=_privacy_line(config, plan, last) if config.privacy.layer else None)


def _privacy_line(config: RunConfig, plan: PopulationPlan, last_round: int) -> str:
    """Return the run's (epsilon, delta) line: every release of the layer counted, sampled or not."""
    from hflmpi.federation import _privacy_summary

    line = _privacy_summary(config, config.quantize.bits_for(plan.depth), last_round)
    if config.privacy.insecure_reproducible_noise:
        return line
    return (f"{line}; population: every release of a participant's node is counted whether it "
            "took part or not (no amplification by the sampling of the cohort)")


def _set_up(config: RunConfig, comm: Any, plan: PopulationPlan,
            dataset: Callable[..., Any] | None, device: torch.device,
            callbacks: Sequence[Any]) -> _Population:
    """Load the data, partition it over the clients, build the model and the aggregator."""
    rank, size, seed, clients = comm.Get_rank(), comm.Get_size(), config.run.seed, plan.clients
    hooks = Hooks.build(comm, config.run.callbacks, callbacks)
    dtype = torch.float64 if config.run.dtype == "float64" else torch.float32
    train_set, test_set = agree(comm, "loading data",
                                lambda: load_dataset(config.data, seed, dataset))
    parts = agree(comm, "partitioning the data over the clients",
                  lambda: _partition(config, train_set, clients))
    sizes = np.array([len(p) for p in parts], dtype=np.int64)
    client_weights = (sizes.astype(np.float64) if config.aggregation.weighting == "samples"
                      else np.ones(clients))
    train_set, test_set = train_set.to(device, dtype), test_set.to(device, dtype)
    model = agree(comm, "building the model", lambda: build_model(
        config.model, train_set.input_shape, train_set.num_classes, seed=seed))
    params = flatten_parameters(model, dtype=dtype, device=device)
    host = params.flat.detach().cpu().numpy().copy()
    comm.Bcast(host, root=0)  # all ranks: start from rank 0's model, bit for bit
    params.flat.copy_(torch.from_numpy(host))
    mine = plan.placement.clients_on(rank)
    aggregator = PopulationAggregator(comm, plan, params.flat, config.quantize.bits_for(plan.depth),
                                      config.quantize.bucket_size, seed, config.aggregation.secure,
                                      rules=rules_from_config(config, comm, plan),
                                      server_opt=config.server_opt.options_for(plan.depth))
    opts = config.clients
    trainer = agree(comm, "setting up the clients' training", lambda: ClientTrainer(
        model, params, config.optim, train_set, parts, mine, seed, mode=opts.training,
        batch_clients=opts.batch_clients))
    availability = agree(comm, "reading the availability of the clients", lambda: (
        Availability.from_trace(opts.trace, clients) if opts.trace else
        Availability.always(clients) if opts.online == 1.0 else
        Availability.bernoulli(clients, opts.online, seed)))
    clock = agree(comm, "setting up the simulated clock (device profiles)", lambda: RoundClock(
        config, plan, aggregator.numel, aggregator.bits, aggregator.bucket_sizes))
    buffered = agree(comm, "setting up the buffered layer",
                     lambda: buffered_nodes(config, aggregator, trainer))
    my_test = test_set.subset(np.arange(rank, len(test_set), size))
    return _Population(plan, device, train_set, my_test, parts, sizes, client_weights, model,
                       aggregator, trainer, mine, availability, clock.profiles.speeds, clock,
                       hooks, buffered, HeldUpdates(config.clock.exponents_for(plan.depth)[0])
                       if clock.carry else None)


def _partition(config: RunConfig, train_set: TensorDataset, clients: int) -> list[np.ndarray]:
    if len(train_set) < clients:
        raise ConfigError(
            f"the training set holds {len(train_set)} samples but clients.count={clients}, and "
            "each client needs at least one; use fewer clients or more data (e.g. "
            "data.synthetic_samples for synthetic data)")
    return make_partition(train_set.labels.numpy(), clients, config.data, config.run.seed)


def _run_rounds(
    config: RunConfig, comm: Any, pop: _Population, watchdog: Watchdog, start_round: int,
    losses: np.ndarray, record: RunRecord | None, progress: Progress | None, record_path: Path,
    resumed: bool,
) -> tuple[int, float, float, bool]:
    """Run the global rounds (all ranks; rank 0 records). Return (last round, acc, loss, stopped)."""
    rank, rounds = comm.Get_rank(), config.run.rounds
    accuracy = test_loss = math.nan
    preemption = PreemptionFlag()
    last_round, last_checkpoint = start_round - 1, (start_round - 1 if resumed else None)
    started = time.perf_counter()
    stopped = False
    try:
        for rnd in range(start_round, rounds + 1):
            evaluate_now = rnd == rounds or (config.run.eval_every > 0
                                             and rnd % config.run.eval_every == 0)
            round_started = time.perf_counter()
            cohort, scores = _select(config, pop, rnd, losses)
            trained = _round(config, comm, pop, watchdog, rnd, cohort, evaluate_now)
            with watchdog.guard(f"checking the global model of round {rnd}"):
                check_same_bits(comm, pop.aggregator.global_model,
                                f"the global model after round {rnd}")
            with watchdog.guard(f"sharing the client losses of round {rnd}"):
                round_losses, round_samples = share_client_values(comm, pop.plan.clients,
                                                                   trained.losses, trained.samples)
            losses = np.where(np.isnan(round_losses), losses, round_losses)
            evaluation = _evaluate(pop) if evaluate_now else None
            with watchdog.guard(f"the metrics reduction of round {rnd}"):
                metrics = trained.metrics(comm, config, pop, rnd, evaluation, round_losses,
                                          round_samples, cohort, started, round_started)
            if evaluation is not None:  # every rank has the reduced evaluation
                test_loss, accuracy = trained.test
            metrics, late, stale = pop.clock.close_round(metrics)
            error = _record(record, progress, metrics, record_path, accuracy, cohort,
                            round_losses, scores, round_samples, pop.plan.clients, late, stale)
            last_round = rnd
            if rnd == start_round:
                _report_state_memory(comm, pop)
            if pop.hooks.round_end:
                pop.hooks.call(comm, watchdog, "on_round_end", round_info(
                    pop.model, pop.trainer.params, pop.aggregator.global_model, rnd, rounds, rank,
                    comm.Get_size(), weighted_loss(round_losses, pop.client_weights),
                    trained.test if evaluation is not None else None, metrics, record_path),
                    f"the callbacks after round {rnd}")
            with watchdog.guard(f"the preemption poll after round {rnd}"):
                stop = end_of_round(comm, preemption.received is not None, error, record_path,
                                    last_checkpoint) and rnd < rounds
            why = (preemption.received.name if preemption.received else "signal") if stop else None
            every = config.run.checkpoint_every
            if stop or rnd == rounds or (every > 0 and rnd % every == 0):
                _checkpoint(config, comm, pop, watchdog, rnd, losses, record_path, why)
                last_checkpoint = rnd
            if stop:
                stopped = True
                if rank == 0:
                    _log.warning("hflmpi: %s on some rank: checkpointed round %d, exiting for "
                                 "requeue", why, rnd)
                break
    finally:
        preemption.restore()
        if progress is not None:
            progress.close()
        close_error = close_record(record, record_path)
    if close_error is not None:
        raise SetupError(close_error)
    return last_round, accuracy, test_loss, stopped


def _checkpoint(config: RunConfig, comm: Any, pop: _Population, watchdog: Watchdog, rnd: int,
                losses: np.ndarray, record_path: Path, why: str | None) -> None:
    """Write round ``rnd``'s checkpoint: model, clients and server optimizers (all ranks)."""
    with watchdog.guard(f"the round-{rnd} checkpoint"):
        client_state = gather_client_state(comm, pop.plan.clients, pop.trainer, losses)
        write_population_checkpoint(
            comm, record_path, rnd, pop.aggregator.global_model, client_state, config,
            preempted_by=why, sim_time=pop.clock.time,
            server_state=pop.aggregator.optimizers.collect_state(comm))


def _report_state_memory(comm: Any, pop: _Population) -> None:
    """Log (rank 0) the most per-client state any rank holds, after the first round (all ranks)."""
    largest = max_over_ranks(comm, pop.trainer.state_nbytes())
    if comm.Get_rank() == 0:
        _log.info("hflmpi: population of %d clients on %d ranks: per-client state (momentum, "
                  "sampler orders, batched buffers) up to %.1f MiB per rank", pop.plan.clients,
                  comm.Get_size(), largest / 2**20)


def _select(config: RunConfig, pop: _Population, rnd: int,
            losses: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return this round's cohort (sorted client ids) and the clients' selection scores."""
    opts = config.clients
    online = pop.availability.online(rnd)
    options = SelectionOptions(opts.selection, opts.cohort, opts.exploration, opts.speed_weight,
                               config.run.seed)
    cohort = select_cohort(options, rnd, online, pop.sizes, losses, pop.speeds)
    scores = np.full(pop.plan.clients, np.nan)
    if opts.selection == "priority":
        scores = priority_utility(options, online, pop.sizes, losses, pop.speeds)
    return cohort, scores


class _RoundWork:
    """One rank's measurements in one global round."""

    def __init__(self, depth: int) -> None:
        self.losses: dict[int, float] = {}
        self.samples: dict[int, int] = {}
        self.compute = np.zeros(depth)
        self.comm_seconds = np.zeros(depth)
        self.client_bytes = np.zeros(depth)
        self.mpi_bytes = np.zeros(depth)
        self.quant_error = np.full(depth, np.nan)
        self.test: tuple[float, float] = (math.nan, math.nan)
        self.divergences: tuple[float, float] = (math.nan, math.nan)

    def add(self, top: int, compute: float, stats: PopulationStats) -> None:
        self.compute[top - 1] += compute
        self.comm_seconds[:top] += stats.seconds
        self.client_bytes += stats.client_bytes
        self.mpi_bytes += stats.mpi_bytes
        errors = np.asarray(stats.quant_error)
        self.quant_error = np.fmax(self.quant_error, errors)

    def metrics(self, comm: Any, config: RunConfig, pop: _Population, rnd: int,
                evaluation: np.ndarray | None, losses: np.ndarray, samples: np.ndarray,
                cohort: np.ndarray, run_started: float, round_started: float) -> RoundMetrics | None:
        """Combine every rank's measurements into the round's metrics on rank 0 (all ranks)."""
        depth = pop.plan.depth
        sums = np.concatenate([self.client_bytes, self.mpi_bytes])
        worst = np.concatenate([self.compute, self.comm_seconds,
                                np.nan_to_num(self.quant_error, nan=-1.0)])
        reduce_round(comm, evaluation, sums, worst)
        if evaluation is not None:
            self.test = (float(evaluation[0] / evaluation[2]), float(evaluation[1] / evaluation[2]))
        if comm.Get_rank() != 0:
            return None
        train_loss = weighted_loss(losses, pop.client_weights)
        now = time.perf_counter()
        bits = config.quantize.bits_for(depth)
        methods = [int(Method.INTEGER_SUM) if b else int(Method.NONE) for b in bits]
        return RoundMetrics(
            round=rnd, wall_time=now - run_started, train_loss=train_loss,
            test_loss=self.test[0], test_accuracy=self.test[1],
            samples_per_second=float(samples.sum()) / max(now - round_started, 1e-9),
            compute_seconds=list(worst[:depth]), comm_seconds=list(worst[depth:2 * depth]),
            bytes_sent=list(sums[:depth]), mpi_bytes=list(sums[depth:]), method=methods,
            quant_error=[math.nan if e < 0 else e for e in worst[2 * depth:]],
            upward_divergence=self.divergences[0], downward_divergence=self.divergences[1],
        )


def _round(config: RunConfig, comm: Any, pop: _Population, watchdog: Watchdog, rnd: int,
           cohort: np.ndarray, evaluate_now: bool) -> _RoundWork:
    """Train the cohort's clients on this rank and aggregate at every closing layer."""
    tau, plan = list(config.schedule.tau), pop.plan
    steps = steps_per_round(tau)
    participating = np.zeros(plan.clients, dtype=bool)
    participating[cohort] = True
    weights = node_weights(plan, np.where(participating, pop.client_weights, 0.0))
    mine = [c for c in pop.mine if participating[c]]
    pop.trainer.lr = lr_at(rnd - 1, config.optim, config.run.rounds)
    work = _RoundWork(plan.depth)
    if pop.buffered is not None:
        buffered_round(config, pop, watchdog, rnd, participating, weights, work, evaluate_now)
        return work
    if pop.held is not None:
        carry_round(config, pop, watchdog, rnd, weights, mine, work, evaluate_now)
        return work
    for period in range(steps // tau[0]):
        step = (period + 1) * tau[0]
        top = aggregation_layer(step, tau)
        began = time.perf_counter()
        result = pop.trainer.train(mine, pop.aggregator.start_of, tau[0])
        compute = time.perf_counter() - began
        for client in mine:
            work.losses[client] = work.losses.get(client, 0.0) + result.losses[client]
            work.samples[client] = work.samples.get(client, 0) + result.samples[client]
        if top == plan.depth and evaluate_now and config.run.divergence:
            with watchdog.guard(f"the divergence measurement of round {rnd}"):
                work.divergences = population_divergences(
                    comm, pop.aggregator.comms[1], plan, result.models, weights[0],
                    pop.aggregator.numel)
        carried = pop.clock.period(top, weights)  # the simulated clock: who was in time
        with watchdog.guard(f"the layer-{top} aggregation of round {rnd} (step {step})"):
            stats = pop.aggregator.aggregate(top, result.models, weights,
                                             step=(rnd - 1) * steps + step,
                                             measure_error=evaluate_now, carried=carried)
        work.add(top, compute, stats)
        if pop.hooks.aggregation:
            pop.hooks.call(comm, watchdog, "on_aggregation", aggregation_info(
                pop.model, pop.trainer.params, pop.aggregator.start_of(pop.mine[0]), rnd, step,
                steps, top, plan.depth, comm.Get_rank(), comm.Get_size()),
                f"the callbacks after the layer-{top} aggregation of round {rnd} (step {step})")
    periods = steps // tau[0]
    work.losses = {c: loss / periods for c, loss in work.losses.items()}
    return work


def _evaluate(pop: _Population) -> np.ndarray:
    """Evaluate the global model on this rank's slice of the test set: the sums to reduce."""
    pop.trainer.params.flat.copy_(pop.aggregator.global_model)
    count = len(pop.my_test)
    loss, accuracy = evaluate(pop.model, pop.my_test) if count else (0.0, 0.0)
    return np.array([loss * count, accuracy * count, count], dtype=np.float64)


def _record(record: RunRecord | None, progress: Progress | None, metrics: RoundMetrics | None,
            record_path: Path, accuracy: float, cohort: np.ndarray, losses: np.ndarray,
            scores: np.ndarray, samples: np.ndarray, clients: int,
            late: np.ndarray, staleness: np.ndarray | None = None) -> str | None:
    """Append the round and its clients to the run file (rank 0); return a write error."""
    if record is None or progress is None or metrics is None:
        return None
    progress.update(metrics.round, loss=metrics.train_loss, accuracy=accuracy,
                    samples_per_second=metrics.samples_per_second)
    participated = np.zeros(clients, dtype=bool)
    participated[cohort] = True
    try:
        record.append_round(metrics)
        record.append_clients(metrics.round, participated, losses, scores, samples, late=late,
                              staleness=staleness)
    except (OSError, RuntimeError) as exc:
        return record_error(f"writing round {metrics.round} to", record_path, exc)
    return None
