"""The QMLHFL round loop: every MPI rank is a device; one global round is ``prod(tau)`` steps.

Reads top to bottom: set up (tree, data, model, aggregator, run record; every failure raised on
every rank), then for each global round run the nested schedule of
:mod:`hflmpi.core.schedule` (local SGD steps, with layers ``1..L`` aggregating whenever a layer-L
period closes), evaluate the global model, record the round and checkpoint. This module talks to
MPI only through :mod:`hflmpi.mpi` (no import of its own); calls that are collective are marked
"all ranks" (or the subtree that takes part), and every one after set-up runs under the watchdog.

Launched by ``hflmpi run`` under mpiexec (:mod:`hflmpi.cli.run`), or called from Python with a
communicator.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence, TextIO

import numpy as np
import torch

from hflmpi.callbacks import AggregationInfo, RoundInfo
from hflmpi.config import ConfigError, RunConfig
from hflmpi.config.strategy import load_rules
from hflmpi.core.privacy import epsilon_for
from hflmpi.core.schedule import round_events, steps_per_round
from hflmpi.core.topology import TreePlan, plan_fanouts, plan_groups
from hflmpi.learn.data import TensorDataset, load_dataset
from hflmpi.learn.flat import FlatParameters, detached_copy, flatten_parameters
from hflmpi.learn.local import BatchSampler, LocalSolver, evaluate, lr_at
from hflmpi.learn.models import build_model
from hflmpi.learn.partition import make_partition
from hflmpi.mpi.aggregate import (
    AggregationStats,
    HierarchicalAggregator,
    PrivacyOptions,
    measure_divergences,
)
from hflmpi.mpi.checkpointing import check_fresh_start, check_resume, resume_state, write_checkpoint
from hflmpi.mpi.comm import LayerComms, mpi_provenance, plan_from_nodes
from hflmpi.mpi.guard import SetupError, Watchdog, agree
from hflmpi.mpi.hooks import Hooks
from hflmpi.mpi.metrics import RoundMeter, end_of_round
from hflmpi.mpi.placement import cuda_device_index
from hflmpi.mpi.preempt import PreemptionFlag
from hflmpi.mpi.server_state import gather_server_state, restore_server_state
from hflmpi.record.progress import Progress
from hflmpi.record.provenance import provenance
from hflmpi.record.replace import drop_replaced
from hflmpi.record.runfile import (
    ConfigUpdate,
    check_model_size,
    close_record,
    open_record,
    record_error,
)
from hflmpi.record.store import RunRecord

__all__ = ["SetupError", "TrainResult", "plan_for", "train"]

_log = logging.getLogger(__name__)  # notices; the command line shows them on stderr


@dataclass
class TrainResult:
    """What a finished run leaves behind (identical on every rank).

    Attributes
    ----------
    rounds : int
        Last completed global round.
    test_accuracy, test_loss : float
        Of the global model after the last round (NaN if never evaluated).
    model : torch.Tensor
        Copy of the final global model, flat, on the CPU.
    module : torch.nn.Module
        The same model as an ``nn.Module`` (the architecture the run built), on the CPU.
    record_path : Path
        The HDF5 run file.
    preempted : bool
        The run stopped early on a signal, after checkpointing round ``rounds``.
    privacy : str or None
        With a DP layer, the line that states the run's ``(epsilon, delta)`` (or that the test
        override left it without privacy).
    """

    rounds: int
    test_accuracy: float
    test_loss: float
    model: torch.Tensor
    record_path: Path
    module: torch.nn.Module
    preempted: bool = False
    privacy: str | None = None


@dataclass
class _Federation:
    """Everything set-up builds on one rank; the round loop only reads it."""

    plan: TreePlan
    comms: LayerComms
    device: torch.device
    train_set: TensorDataset
    my_test: TensorDataset
    parts: list[np.ndarray]
    weight: float
    model: torch.nn.Module
    params: FlatParameters
    bits: list[int]
    aggregator: HierarchicalAggregator
    sampler: BatchSampler
    hooks: Hooks


def plan_for(config: RunConfig, comm: Any) -> TreePlan:
    """Plan the tree the config asks for over ``comm`` (collective only for ``nodes``)."""
    topo, size = config.topology, comm.Get_size()
    if topo.kind == "fanouts":
        plan = plan_fanouts(list(topo.fanouts or ()), size)
    elif topo.kind == "groups":
        plan = plan_groups(topo.groups, size)
    elif topo.kind == "nodes":
        plan = plan_from_nodes(comm, list(topo.node_fanouts))
    else:
        plan = plan_fanouts([size], size)
    if len(config.schedule.tau) != plan.depth:
        raise ConfigError(
            f"schedule.tau={list(config.schedule.tau)} has {len(config.schedule.tau)} entries but "
            f"the tree over {size} ranks has {plan.depth} layers; give one tau per layer"
        )
    return plan


def _device(config: RunConfig, comm: Any) -> torch.device:
    wanted = config.run.device
    if wanted == "cpu" or (wanted == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError('run.device="cuda" but torch sees no CUDA device; use "cpu" or "auto"')
    return torch.device("cuda", cuda_device_index(comm, torch.cuda.device_count()))


def _checked_plan(config: RunConfig, comm: Any) -> TreePlan:
    """Plan the tree and check the per-layer options against its depth (before any model)."""
    plan = plan_for(config, comm)
    config.check_layer_options(plan.depth, [[len(kids) for kids in layer] for layer in plan.children])
    return plan


def train(
    config: RunConfig,
    comm: Any,
    *,
    resume: str | os.PathLike[str] | None = None,
    stream: TextIO | None = None,
    allow_config_change: bool = False,
    replace_unfinished: bool = False,
    callbacks: Sequence[Any] = (),
    dataset: Callable[..., Any] | None = None,
    overwrite: bool = False,
) -> TrainResult:
    """Train federatedly over ``comm`` as ``config`` says and return the final global model.

    Collective over ``comm``: every rank calls it with the same config.

    Parameters
    ----------
    config : RunConfig
        The resolved configuration.
    comm : MPI.Comm
        Devices of the federation (``MPI.COMM_WORLD`` from the command line).
    resume : path, optional
        Run file whose newest valid checkpoint to continue from (metrics past it are dropped).
        ``config`` must equal the run file's stored config except in
        :data:`hflmpi.record.resume.FREE_KEYS`; otherwise :class:`ConfigError` on every rank.
    stream : text stream, optional
        Where rank 0 writes progress (default stdout).
    allow_config_change : bool
        Let a resume change keys outside :data:`hflmpi.record.resume.FREE_KEYS` (never those in
        :data:`hflmpi.record.resume.FIXED_KEYS`); the changes are recorded in the run file.
    replace_unfinished : bool
        Starting fresh, replace a run file left at ``run.out`` by a run that stopped before its
        first checkpoint (the caller checked there is none), instead of refusing to overwrite it.
    callbacks : sequence, optional
        This rank's callbacks (:mod:`hflmpi.callbacks`), called after those ``run.callbacks``
        names; the ranks may pass different ones.
    dataset : callable, optional
        The user's dataset function, called instead of importing ``data.name``
        (:mod:`hflmpi.learn.custom_data`).
    overwrite : bool
        Start afresh even where a run at ``run.out`` has files (``--overwrite``): they are set
        aside when the new run file is created and deleted when the new run finishes
        (:mod:`hflmpi.record.replace`). Without it (or ``resume``) such files are refused.
    """
    if overwrite and resume is not None:
        raise ConfigError(f"overwrite starts afresh but resume={os.fspath(resume)!r} continues a "
                          "run; give one of them")
    if config.clients.population:  # many clients per rank: hflmpi.population runs the rounds
        from hflmpi.population import train_population

        return train_population(config, comm, resume=resume, stream=stream, dataset=dataset,
                                allow_config_change=allow_config_change, overwrite=overwrite,
                                replace_unfinished=replace_unfinished, callbacks=callbacks,
                                device=agree(comm, "choosing the device", lambda: _device(config, comm)))
    record_path = Path(resume) if resume is not None else Path(config.run.out)
    # Resume checks come before any data or model code (all ranks; refusals raise everywhere).
    plan = agree(comm, "planning the tree", lambda: _checked_plan(config, comm))
    if resume is None and not (overwrite or replace_unfinished):
        check_fresh_start(comm, record_path)
    checkpoint, update = check_resume(comm, Path(resume) if resume is not None else None, config,
                                      plan.depth, allow_config_change)
    fed = _set_up(config, comm, plan, dataset, callbacks)
    state = None
    if resume is not None:
        agree(comm, "checking the checkpoint against the model",
              lambda: check_model_size(checkpoint, fed.params.numel, config))
        state = resume_state(comm, checkpoint, fed.params.numel)  # all ranks: typed buffers
        agree(comm, "restoring the server optimizers", lambda: restore_server_state(
            fed.aggregator, checkpoint.extra_arrays if checkpoint is not None else None))
    watchdog = Watchdog(comm, config.run.watchdog_seconds)
    try:
        return _train_rounds(config, comm, fed, watchdog, state, update, record_path, stream,
                             allow_config_change, replace_unfinished, overwrite)
    finally:
        watchdog.close()  # all ranks; also when an error leaves the loop
        fed.comms.free()
        fed.hooks.close()


def _set_up(
    config: RunConfig, comm: Any, plan: TreePlan, dataset: Callable[..., Any] | None,
    callbacks: Sequence[Any],
) -> _Federation:
    """Load the data, build the model and the aggregator (all ranks; failures raise everywhere)."""
    rank, size, seed = comm.Get_rank(), comm.Get_size(), config.run.seed
    hooks = Hooks.build(comm, config.run.callbacks, callbacks)
    device = agree(comm, "choosing the device", lambda: _device(config, comm))
    dtype = torch.float64 if config.run.dtype == "float64" else torch.float32
    train_set, test_set = agree(comm, "loading data", lambda: load_dataset(config.data, seed, dataset))
    parts = agree(comm, "partitioning the data", lambda: _partition(config, train_set, size))
    weight = float(len(parts[rank])) if config.aggregation.weighting == "samples" else 1.0
    # Features in the model's dtype once, here, rather than a cast at every step.
    train_set, test_set = train_set.to(device, dtype), test_set.to(device, dtype)
    model = agree(comm, "building the model", lambda: build_model(
        config.model, train_set.input_shape, train_set.num_classes, seed=seed))
    params = flatten_parameters(model, dtype=dtype, device=device)
    comms = LayerComms(comm, plan)
    bits = list(config.quantize.bits_for(plan.depth))
    if config.privacy.layer and config.privacy.insecure_reproducible_noise and rank == 0:
        _log.warning(_INSECURE_NOISE_WARNING)
    aggregator = agree(comm, "setting up the aggregation",
                       lambda: _aggregator(config, comms, params, bits, parts))
    sampler = BatchSampler(parts[rank], config.optim.batch_size, seed=seed, client=rank)
    return _Federation(plan, comms, device, train_set, test_set.subset(np.arange(rank, len(test_set), size)),
                       parts, weight, model, params, bits, aggregator, sampler, hooks)


def _aggregator(
    config: RunConfig, comms: LayerComms, params: FlatParameters, bits: list[int],
    parts: list[np.ndarray],
) -> HierarchicalAggregator:
    agg, privacy = config.aggregation, config.privacy
    # what a device can honestly claim (every rank computes the whole partition from the seed):
    # robust layers clamp each child's claimed weight to it
    caps = [float(len(p)) if agg.weighting == "samples" else 1.0 for p in parts]
    return HierarchicalAggregator(
        comms, params.flat, algorithm="tree" if agg.algorithm == "tree" else "subtree", bits=bits,
        bucket_size=config.quantize.bucket_size, seed=config.run.seed,
        method=config.quantize.method, downlink=config.quantize.downlink, robust=load_rules(agg.robust) or None,  # imports plug-ins
        secure=list(agg.secure) or None, robust_params={"trim": agg.trim, "f": agg.krum_f},
        weight_caps=caps, allow_small_secure_groups=agg.allow_small_secure_groups,
        privacy=PrivacyOptions(privacy.layer, privacy.clip, privacy.noise_multiplier, privacy.mode,
                               privacy.insecure_reproducible_noise) if privacy.layer else None,
        signature=params.signature_hash(), nonfinite=config.run.nonfinite,
        server_opt=config.server_opt.options_for(comms.depth),
    )


def _train_rounds(
    config: RunConfig, comm: Any, fed: _Federation, watchdog: Watchdog,
    state: dict[str, Any] | None, update: ConfigUpdate | None, record_path: Path,
    stream: TextIO | None, allow_change: bool, replace_unfinished: bool, overwrite: bool,
) -> TrainResult:
    """Start from the checkpoint (or rank 0's model) and run the global rounds (all ranks)."""
    rank, rounds = comm.Get_rank(), config.run.rounds
    start_round = _start(fed, state)
    with watchdog.guard("the broadcast of rank 0's initial model"):
        fed.aggregator.broadcast()  # all ranks: start from rank 0's model, bit for bit
    solver = LocalSolver(fed.model, config.optim)  # after the broadcast: FedProx anchors it
    if state is not None and "momentum" in state["mine"]:
        solver.restore_momentum(state["mine"]["momentum"])
    with watchdog.guard("opening the run record"):
        mpi_facts = mpi_provenance(comm)  # all ranks: library, host names
        record: RunRecord | None = agree(comm, "opening the run record", lambda: open_record(
            config, comm.Get_size(), fed.plan, record_path, resuming=state is not None,
            last_round=start_round - 1, parts=fed.parts, train_set=fed.train_set, update=update,
            allow_change=allow_change, replace_unfinished=replace_unfinished, overwrite=overwrite,
            provenance=provenance(mpi_facts, os.environ, sys.argv, os.getcwd()),
        ) if rank == 0 else None)
    progress = Progress(stream or sys.stdout, config.run.progress, total_rounds=rounds) if rank == 0 else None
    result = _run_rounds(config, comm, fed, watchdog, solver, start_round, state is not None,
                         record, progress, record_path)
    if rank == 0 and not result.preempted:
        drop_replaced(record_path)  # the new run is complete: what overwrite set aside goes
    return result


def _run_rounds(
    config: RunConfig, comm: Any, fed: _Federation, watchdog: Watchdog, solver: LocalSolver,
    start_round: int, resumed: bool, record: RunRecord | None, progress: Progress | None,
    record_path: Path,
) -> TrainResult:
    """Run the global rounds, top to bottom (all ranks; rank 0 records)."""
    rank, rounds, tau = comm.Get_rank(), config.run.rounds, list(config.schedule.tau)
    steps, started = steps_per_round(tau), time.perf_counter()
    samples = comm.Get_size() * steps * config.optim.batch_size
    test_loss = test_accuracy = math.nan
    preemption = PreemptionFlag()
    last_round, last_checkpoint = start_round - 1, (start_round - 1 if resumed else None)
    try:
        for rnd in range(start_round, rounds + 1):
            solver.lr = lr_at(rnd - 1, config.optim, rounds)
            evaluate_now = rnd == rounds or (config.run.eval_every > 0 and rnd % config.run.eval_every == 0)
            meter = _round_steps(config, comm, fed, watchdog, solver, rnd, evaluate_now)
            evaluation = _evaluate_local(fed.model, fed.my_test) if evaluate_now else None
            with watchdog.guard(f"the metrics reduction of round {rnd}"):
                result = meter.combine(comm, fed.weight, steps, evaluation, samples, started)  # all ranks
            if result.test is not None:
                test_loss, test_accuracy = result.test
            record_error = _record_round(record, progress, result, record_path, test_accuracy)  # rank 0
            last_round = rnd
            if fed.hooks.round_end:
                fed.hooks.call(comm, watchdog, "on_round_end", _round_info(
                    config, comm, fed, rnd, result, record_path), f"the callbacks after round {rnd}")
            with watchdog.guard(f"the preemption poll after round {rnd}"):  # all ranks
                stop = end_of_round(comm, preemption.received is not None, record_error, record_path,
                                    last_checkpoint) and rnd < rounds  # the last round needs no requeue
            why = (preemption.received.name if preemption.received else "signal") if stop else None
            if stop or rnd == rounds or (config.run.checkpoint_every > 0 and rnd % config.run.checkpoint_every == 0):
                write_checkpoint(comm, record_path, rnd, fed.params.flat, fed.sampler.state_dict(),
                                 solver.checkpoint_momentum(), config, watchdog, preempted_by=why,
                                 server_state=lambda: gather_server_state(fed.aggregator))
                last_checkpoint = rnd
            if stop:
                if rank == 0:
                    _log.warning("hflmpi: %s on some rank: checkpointed round %d, exiting for requeue",
                                 why, rnd)
                break
    finally:
        preemption.restore()
        if progress is not None:  # rank 0
            progress.close()
        # Never raises: on the way out of an error it must not replace that error.
        close_error = close_record(record, record_path)
    if close_error is not None:  # rank 0; the others are done and wait to leave together
        raise SetupError(close_error)
    summary = _privacy_summary(config, fed.bits, last_round) if config.privacy.layer else None
    return TrainResult(last_round, test_accuracy, test_loss, fed.params.flat.detach().cpu().clone(),
                       record_path, detached_copy(fed.model), preempted=last_round < rounds,
                       privacy=summary)


def _round_steps(
    config: RunConfig, comm: Any, fed: _Federation, watchdog: Watchdog, solver: LocalSolver,
    rnd: int, evaluate_now: bool,
) -> RoundMeter:
    """Run the local steps and aggregations of global round ``rnd`` (all ranks)."""
    tau = list(config.schedule.tau)
    steps, rank, size = steps_per_round(tau), comm.Get_rank(), comm.Get_size()
    meter = RoundMeter(fed.plan.depth, rnd, fed.device)
    for step, layer in round_events(tau):
        batch = next(fed.sampler)
        meter.add_loss(solver.step(fed.train_set.features[batch], fed.train_set.labels[batch]))
        if layer == 0:
            continue
        meter.end_compute(layer)
        if layer == fed.plan.depth and evaluate_now and config.run.divergence:
            with watchdog.guard(f"the divergence measurement of round {rnd}"):
                meter.divergences = measure_divergences(fed.comms, fed.params.flat, fed.weight)
        with watchdog.guard(f"the layer-{layer} aggregation of round {rnd} (step {step})"):
            stats = fed.aggregator.aggregate(layer, fed.weight, step=(rnd - 1) * steps + step,
                                             measure_error=evaluate_now)  # subtree ranks
        _report_dropped(stats, fed.comms, rnd, layer)
        solver.on_aggregation()
        meter.add_aggregation(layer, stats)
        if fed.hooks.aggregation:
            info = AggregationInfo(fed.model, fed.params.flat, rnd, step, (rnd - 1) * steps + step,
                                   layer, fed.plan.depth, rank, size, tuple(stats.dropped))
            fed.hooks.call(comm, watchdog, "on_aggregation", info, f"the callbacks after the "
                           f"layer-{layer} aggregation of round {rnd} (step {step})")
    return meter


def _round_info(config: RunConfig, comm: Any, fed: _Federation, rnd: int, result: Any,
                record_path: Path) -> RoundInfo:
    """Describe the finished round to the callbacks (metrics on rank 0 only)."""
    test_loss, test_accuracy = result.test if result.test is not None else (math.nan, math.nan)
    metrics = asdict(result.metrics) if result.metrics is not None else None
    return RoundInfo(fed.model, fed.params.flat, rnd, config.run.rounds,
                     comm.Get_rank(), comm.Get_size(), result.train_loss, test_loss, test_accuracy,
                     metrics, record_path)


def _start(fed: _Federation, state: dict[str, Any] | None) -> int:
    """Load a resumed run's model and sampler position; return the first round to run."""
    if state is None:
        return 1
    fed.params.flat.copy_(torch.from_numpy(np.asarray(state["model"])).to(fed.params.flat.dtype))
    fed.sampler.load_state_dict({k: int(v) for k, v in zip(("epoch", "offset"), state["mine"]["sampler"])})
    return int(state["round"]) + 1


def _report_dropped(stats: AggregationStats, comms: LayerComms, rnd: int, layer: int) -> None:
    if stats.dropped and comms.subtree(layer).Get_rank() == 0:
        _log.warning("hflmpi: round %d, layer %d: dropped rank(s) %s (NaN/Inf model) from the "
                     "aggregation", rnd, layer, stats.dropped)


def _record_round(
    record: RunRecord | None, progress: Progress | None, result: Any, record_path: Path,
    accuracy: float,
) -> str | None:
    """Append the round to the run file and the progress line (rank 0); return a write error."""
    if record is None or progress is None or result.metrics is None:
        return None
    metrics = result.metrics
    progress.update(metrics.round, loss=metrics.train_loss, accuracy=accuracy,
                    samples_per_second=metrics.samples_per_second)
    try:
        record.append_round(metrics)
    except (OSError, RuntimeError) as exc:  # e.g. the disk is full
        return record_error(f"writing round {metrics.round} to", record_path, exc)
    return None


def _evaluate_local(model: torch.nn.Module, my_test: TensorDataset) -> np.ndarray:
    """Evaluate the (identical) global model on this rank's slice of the test set (no MPI).

    Returns the sums ``[loss * count, accuracy * count, count]`` that the round's reduction adds.
    """
    count = len(my_test)
    loss, accuracy = evaluate(model, my_test) if count else (0.0, 0.0)
    return np.array([loss * count, accuracy * count, count], dtype=np.float64)


_INSECURE_NOISE_WARNING = """\
hflmpi: WARNING: ************************************************************************
hflmpi: WARNING: privacy.insecure_reproducible_noise = true: the DP noise is drawn from
hflmpi: WARNING: generators keyed by run.seed, which the run file stores. Anyone holding the run
hflmpi: WARNING: file can regenerate the noise and subtract it: this run has NO differential
hflmpi: WARNING: privacy. For tests only; never release its models.
hflmpi: WARNING: ************************************************************************"""


def _privacy_summary(config: RunConfig, bits: Sequence[int], last_round: int) -> str:
    """Return the line that states the run's (epsilon, delta), or that there is none."""
    privacy = config.privacy
    releases = last_round * math.prod(config.schedule.tau[privacy.layer:])
    if privacy.insecure_reproducible_noise:
        return (f"hflmpi: privacy: NO differential privacy: privacy.insecure_reproducible_noise = "
                f"true made the noise of all {releases} releases at layer {privacy.layer} a "
                "function of run.seed (stored in the run file)")
    epsilon, _ = epsilon_for(privacy.noise_multiplier, releases, privacy.delta)
    caveats = []
    if bits[privacy.layer - 1] > 0:
        caveats.append(f"quantized DP layer (quantize.bits[{privacy.layer - 1}] > 0)")
    if privacy.mode == "distributed":
        caveats.append("distributed noise: holds only if every participant adds its share")
    note = "" if not caveats else (
        "; approximate: " + ", ".join(caveats) + " (see docs/security.md)")
    return (f"hflmpi: privacy: ({epsilon:.3g}, {privacy.delta:g})-DP per client at layer "
            f"{privacy.layer} after {releases} releases (RDP accounting{note})")


def _partition(config: RunConfig, train_set: TensorDataset, clients: int) -> list[np.ndarray]:
    """Split the training samples over ``clients`` ranks; too few samples is a config error."""
    if len(train_set) < clients:
        data = config.data
        knob = (f"data.synthetic_samples={data.synthetic_samples}" if data.name == "synthetic"
                else f"data.name={data.name!r}")
        raise ConfigError(
            f"the training set holds {len(train_set)} samples ({knob}, "
            f"data.test_fraction={data.test_fraction}) but there are {clients} clients (ranks) "
            "and each needs at least one; use fewer ranks or more data"
        )
    return make_partition(train_set.labels.numpy(), clients, config.data, config.run.seed)
