"""The QMLHFL training loop: every MPI rank is a device; one global round is ``prod(tau)`` steps.

Reads top to bottom: set up (config, tree, data, model, aggregator, run record), then for each
global round run the nested schedule of :mod:`hflmpi.schedule` (local SGD steps, with layers
``1..L`` aggregating whenever a layer-L period closes), evaluate the global model, record the
round and checkpoint. Collectives are marked "all ranks" (or the subtree that takes part).

Launch as ``mpiexec -n 8 python -m mpi4py -m hflmpi run CONFIG.toml`` so an exception on one
rank aborts every rank.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence, TextIO, TypeVar

import numpy as np
import torch
from mpi4py import MPI

from hflmpi import __version__
from hflmpi.aggregate import HierarchicalAggregator, PrivacyOptions, measure_divergences
from hflmpi.checkpoint import (
    CheckpointError,
    CheckpointFallbackWarning,
    checkpoint_paths,
    config_digest,
    describe_os_error,
    load_latest_valid,
    save_checkpoint,
)
from hflmpi.comm import LayerComms, node_local, plan_from_nodes
from hflmpi.config import ConfigError, RunConfig, load_config, to_toml_string
from hflmpi.data import TensorDataset, load_dataset
from hflmpi.flat import flatten_parameters
from hflmpi.guard import Watchdog
from hflmpi.privacy import epsilon_for
from hflmpi.local import BatchSampler, LocalSolver, evaluate, lr_at
from hflmpi.models import build_model
from hflmpi.partition import make_partition, partition_stats
from hflmpi.preempt import (
    EXIT_PREEMPTED,
    PreemptionFlag,
    clear_marker,
    leave_together,
    write_marker,
)
from hflmpi.progress import Progress
from hflmpi.schedule import round_events, steps_per_round
from hflmpi.store import RoundMetrics, RunRecord, read_config_toml
from hflmpi.topology import TopologyError, TreePlan, plan_fanouts, plan_groups

__all__ = ["SetupError", "TrainResult", "limit_threads", "plan_for", "train", "main"]

T = TypeVar("T")


class SetupError(RuntimeError):
    """Setup failed on at least one rank; raised on every rank with the first failure's text."""


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
    record_path : Path
        The HDF5 run file.
    preempted : bool
        The run stopped early on a signal, after checkpointing round ``rounds``.
    """

    rounds: int
    test_accuracy: float
    test_loss: float
    model: torch.Tensor
    record_path: Path
    preempted: bool = False


def agree(comm: MPI.Comm, what: str, action: Callable[[], T]) -> T:
    """Run ``action`` on every rank; if it fails anywhere, raise :class:`SetupError` everywhere.

    All ranks. Keeps a bad file or config on one rank from leaving the others in a collective.
    """
    error: str | None = None
    result: Any = None
    try:
        result = action()
    except (OSError, ValueError, RuntimeError, KeyError, ImportError, TypeError) as exc:
        error = f"{type(exc).__name__}: {exc}"
    errors = comm.allgather(error)
    failed = [(rank, text) for rank, text in enumerate(errors) if text is not None]
    if failed:
        rank, text = failed[0]
        if len(failed) == comm.Get_size() and all(t == text for _, t in failed):
            raise SetupError(text)  # the same error everywhere: the rank adds nothing
        more = f" (and {len(failed) - 1} more ranks)" if len(failed) > 1 else ""
        raise SetupError(f"{what} failed on rank {rank}{more}: {text}")
    return result


def plan_for(config: RunConfig, comm: MPI.Comm) -> TreePlan:
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


def _device(config: RunConfig, comm: MPI.Comm) -> torch.device:
    wanted = config.run.device
    if wanted == "cpu" or (wanted == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError('run.device="cuda" but torch sees no CUDA device; use "cpu" or "auto"')
    local_rank = int(os.environ.get("SLURM_LOCALID", node_local(comm)[0]))
    return torch.device("cuda", local_rank % torch.cuda.device_count())


def _resume_state(comm: MPI.Comm, resume: Path | None) -> dict[str, Any] | None:
    """Rank 0 loads the newest valid checkpoint; every rank gets its own slice (all ranks)."""
    if resume is None:
        return None

    def load() -> Any:
        if comm.Get_rank() != 0:
            return None
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", CheckpointFallbackWarning)
            checkpoint = load_latest_valid(resume)
        for warning in caught:
            print(f"hflmpi: warning: {warning.message}", file=sys.stderr, flush=True)
        saved = int(checkpoint.state.get("world_size", comm.Get_size()))
        if saved != comm.Get_size():  # partition, batch positions and momentum are per rank
            raise ValueError(
                f"{checkpoint.path} was written by {saved} ranks but this run has "
                f"{comm.Get_size()}; resume with mpiexec -n {saved}"
            )
        return checkpoint

    checkpoint = agree(comm, f"loading a checkpoint for {resume}", load)
    shared = None
    if comm.Get_rank() == 0:
        shared = {"round": checkpoint.round, "state": checkpoint.state, "model": checkpoint.model}
    shared = comm.bcast(shared, root=0)
    per_rank = None
    if comm.Get_rank() == 0:
        names = sorted(checkpoint.extra_arrays)
        per_rank = [{n: checkpoint.extra_arrays[n][r] for n in names} for r in range(comm.Get_size())]
    shared["mine"] = comm.scatter(per_rank, root=0)
    return shared


def train(
    config: RunConfig,
    comm: MPI.Comm,
    *,
    resume: str | os.PathLike[str] | None = None,
    stream: TextIO | None = None,
    replace_unfinished: bool = False,
) -> TrainResult:
    """Train federatedly over ``comm`` as ``config`` says and return the final global model.

    Collective over ``comm``: every rank calls it with the same config.

    Parameters
    ----------
    config : RunConfig
        The resolved configuration.
    comm : MPI.Comm
        Devices of the federation (``MPI.COMM_WORLD`` from the CLI).
    resume : path, optional
        Run file whose newest valid checkpoint to continue from (metrics past it are dropped).
    stream : text stream, optional
        Where rank 0 writes progress (default stdout).
    replace_unfinished : bool
        Starting fresh, replace a run file left at ``run.out`` by a run that stopped before its
        first checkpoint (the caller checked there is none), instead of refusing to overwrite it.
    """
    rank, size = comm.Get_rank(), comm.Get_size()
    seed, rounds, tau = config.run.seed, config.run.rounds, list(config.schedule.tau)
    record_path = Path(resume) if resume is not None else Path(config.run.out)

    # ---- set up: tree, data, model (all ranks; failures raise on every rank) ----
    plan = agree(comm, "planning the tree", lambda: plan_for(config, comm))
    device = agree(comm, "choosing the device", lambda: _device(config, comm))
    dtype = torch.float64 if config.run.dtype == "float64" else torch.float32
    train_set, test_set = agree(comm, "loading data", lambda: load_dataset(config.data, seed))
    parts = make_partition(train_set.labels.numpy(), size, config.data, seed)
    my_indices = parts[rank]
    weight = float(len(my_indices)) if config.aggregation.weighting == "samples" else 1.0
    train_set, test_set = train_set.to(device), test_set.to(device)
    my_test = test_set.subset(np.arange(rank, len(test_set), size))

    model = agree(comm, "building the model", lambda: build_model(
        config.model, train_set.input_shape, train_set.num_classes, seed=seed))
    params = flatten_parameters(model, dtype=dtype, device=device)
    comms = LayerComms(comm, plan)
    bits = list(config.quantize.bits_for(plan.depth))
    config.check_layer_options(plan.depth)
    agg_cfg, privacy = config.aggregation, config.privacy
    aggregator = agree(comm, "setting up the aggregation", lambda: HierarchicalAggregator(
        comms, params.flat, algorithm="tree" if agg_cfg.algorithm == "tree" else "subtree", bits=bits,
        bucket_size=config.quantize.bucket_size, seed=seed, method=config.quantize.method,
        robust=list(agg_cfg.robust) or None, secure=list(agg_cfg.secure) or None,
        robust_params={"trim": agg_cfg.trim, "f": agg_cfg.krum_f},
        privacy=PrivacyOptions(privacy.layer, privacy.clip, privacy.noise_multiplier, privacy.mode)
        if privacy.layer else None,
        signature=params.signature_hash(), nonfinite=config.run.nonfinite,
    ))
    watchdog = Watchdog(comm, config.run.watchdog_seconds)
    sampler = BatchSampler(my_indices, config.optim.batch_size, seed=seed, client=rank)

    # ---- resume or start fresh; the run record is rank 0's ----
    state = _resume_state(comm, Path(resume) if resume is not None else None)
    start_round = 1
    if state is not None:
        params.flat.copy_(torch.from_numpy(np.asarray(state["model"])).to(dtype))
        sampler.load_state_dict({k: int(v) for k, v in zip(("epoch", "offset"), state["mine"]["sampler"])})
        start_round = int(state["round"]) + 1
    aggregator.broadcast()  # all ranks: start from rank 0's model, bit for bit (sets anchors)
    solver = LocalSolver(model, config.optim)
    if state is not None and "momentum" in state["mine"]:
        _load_momentum(solver, state["mine"]["momentum"])
    record = agree(comm, "opening the run record", lambda: _open_record(
        config, comm, plan, record_path, resume is not None, start_round - 1, parts, train_set,
        replace_unfinished))
    progress = Progress(stream or sys.stdout, config.run.progress, total_rounds=rounds) if rank == 0 else None
    steps = steps_per_round(tau)
    started = time.perf_counter()
    test_loss = test_accuracy = math.nan
    preemption = PreemptionFlag()
    last_round = start_round - 1
    last_checkpoint = start_round - 1 if state is not None else None

    for rnd in range(start_round, rounds + 1):
        round_start = time.perf_counter()
        solver.lr = lr_at(rnd - 1, config.optim, rounds)
        compute = np.zeros(plan.depth)
        comm_seconds = np.zeros(plan.depth)
        bytes_sent = np.zeros(plan.depth)
        quant_error = np.full(plan.depth, np.nan)
        methods = [0] * plan.depth
        upward = downward = math.nan
        evaluate_now = rnd == rounds or (config.run.eval_every > 0 and rnd % config.run.eval_every == 0)
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        period_start = time.perf_counter()
        for step, layer in round_events(tau):
            batch = next(sampler)
            loss_sum += solver.step(train_set.features[batch], train_set.labels[batch])
            if layer == 0:
                continue
            compute[layer - 1] += time.perf_counter() - period_start
            if layer == plan.depth and evaluate_now and config.run.divergence:
                upward, downward = measure_divergences(comms, params.flat, weight)  # all ranks
            with watchdog.guard(f"the layer-{layer} aggregation of round {rnd} (step {step})"):
                stats = aggregator.aggregate(layer, weight, step=(rnd - 1) * steps + step,
                                             measure_error=evaluate_now)  # subtree ranks
            if stats.dropped and comms.subtree(layer).Get_rank() == 0:
                print(f"hflmpi: round {rnd}, layer {layer}: dropped rank(s) {stats.dropped} "
                      "(NaN/Inf model) from the aggregation", file=sys.stderr, flush=True)
            solver.on_aggregation()
            comm_seconds[:layer] += stats.seconds
            bytes_sent[:layer] += stats.bytes_sent
            for n, (err, method) in enumerate(zip(stats.quant_error, stats.methods)):
                if not math.isnan(err):
                    quant_error[n] = err if math.isnan(quant_error[n]) else max(quant_error[n], err)
                methods[n] = method
            period_start = time.perf_counter()

        if evaluate_now:
            test_loss, test_accuracy = _evaluate_global(model, my_test, comm)  # all ranks
        train_loss = _weighted_mean(comm, float(loss_sum) / steps, weight)  # all ranks
        totals = _reduce(comm, bytes_sent, MPI.SUM)  # all ranks
        worst = np.concatenate([compute, comm_seconds, np.nan_to_num(quant_error, nan=-1.0)])
        slowest = _reduce(comm, worst, MPI.MAX)  # all ranks
        record_error = None
        if record is not None and progress is not None:  # rank 0
            wall = time.perf_counter() - round_start
            try:
                record.append_round(RoundMetrics(
                    round=rnd, wall_time=time.perf_counter() - started, train_loss=train_loss,
                    test_loss=test_loss if evaluate_now else math.nan,
                    test_accuracy=test_accuracy if evaluate_now else math.nan,
                    samples_per_second=size * steps * config.optim.batch_size / wall,
                    compute_seconds=list(slowest[: plan.depth]),
                    comm_seconds=list(slowest[plan.depth: 2 * plan.depth]),
                    bytes_sent=list(totals), method=methods,
                    quant_error=[math.nan if e < 0 else e for e in slowest[2 * plan.depth:]],
                    upward_divergence=upward, downward_divergence=downward,
                ))
            except (OSError, RuntimeError) as exc:  # e.g. the disk is full
                record_error = (f"writing round {rnd} to the run record {record_path} failed: "
                                f"{describe_os_error(exc)}")
            progress.update(rnd, loss=train_loss, accuracy=test_accuracy,
                            samples_per_second=size * steps * config.optim.batch_size / wall)
        last_round = rnd
        # all ranks: did any rank get SIGUSR1/SIGTERM? Could rank 0 write the metrics?
        stop = _end_of_round(comm, preemption, record_error, record_path, last_checkpoint)
        stop = stop and rnd < rounds  # a signal in the last round: the run is done anyway
        why = (preemption.received.name if preemption.received else "signal") if stop else None
        if stop or rnd == rounds or (config.run.checkpoint_every > 0 and rnd % config.run.checkpoint_every == 0):
            _checkpoint(comm, record_path, rnd, params.flat, sampler, solver, config,
                        preempted_by=why)  # all ranks
            last_checkpoint = rnd
        if stop:
            if rank == 0:
                print(f"hflmpi: {why} on some rank: checkpointed round {rnd}, exiting for requeue",
                      file=sys.stderr, flush=True)
            break

    preemption.restore()
    watchdog.close()
    if record is not None and progress is not None:  # rank 0
        progress.close()
        if privacy.layer:
            releases = last_round * math.prod(tau[privacy.layer:])
            epsilon, _ = epsilon_for(privacy.noise_multiplier, releases, privacy.delta)
            print(f"hflmpi: privacy: ({epsilon:.3g}, {privacy.delta:g})-DP per client at layer "
                  f"{privacy.layer} after {releases} releases (RDP accounting)", flush=True)
        record.close()
    final = params.flat.detach().cpu().clone()
    comms.free()
    return TrainResult(last_round, test_accuracy, test_loss, final, record_path,
                       preempted=last_round < rounds)


def _end_of_round(
    comm: MPI.Comm, preemption: PreemptionFlag, record_error: str | None, record_path: Path,
    last_checkpoint: int | None,
) -> bool:
    """Return whether any rank got a stop signal; raise everywhere if rank 0's metrics failed.

    All ranks: one tiny MAX allreduce per round carries both flags, so a full disk on rank 0
    ends every rank with the same :class:`SetupError` instead of an exception on rank 0 alone.
    """
    flags = np.array([preemption.received is not None, record_error is not None], dtype=np.int32)
    comm.Allreduce(MPI.IN_PLACE, flags, op=MPI.MAX)
    if flags[1]:
        message = comm.bcast(record_error, root=0)
        kept = ("no checkpoint was written yet" if last_checkpoint is None else
                f"the round-{last_checkpoint} checkpoint is kept; free space and continue with "
                f"--resume {record_path}")
        raise SetupError(f"{message}; {kept}")
    return bool(flags[0])


def _open_record(
    config: RunConfig, comm: MPI.Comm, plan: TreePlan, path: Path, resuming: bool,
    last_round: int, parts: list[np.ndarray], train_set: TensorDataset,
    replace_unfinished: bool = False,
) -> RunRecord | None:
    """Rank 0 opens the run file: appends to it when resuming, else creates it.

    Resuming, a run file that is missing or unreadable (say truncated by a crash) does not make
    the checkpoints useless: it is moved aside and a new one is started at the checkpoint's round.
    Starting fresh with ``replace_unfinished``, a run file without checkpoints is replaced.
    Either way the run is starting: a preemption marker left by the previous leg is removed.
    """
    if comm.Get_rank() != 0:
        return None
    clear_marker(path)
    if resuming:
        try:
            record = RunRecord.open_append(path)
            note = None
        except (OSError, ValueError) as exc:
            note = _set_aside_unreadable(path, exc, last_round)
            record = _new_record(config, comm, plan, path, parts, train_set, overwrite=False)
        record.truncate_to(last_round, note=note)
        return record
    overwrite = False
    if replace_unfinished and path.exists():
        try:
            RunRecord.open_append(path).close()
            overwrite = True  # its rows were never checkpointed: a resume would drop them too
        except (OSError, ValueError) as exc:  # e.g. empty: killed while the file was created
            _set_aside_unreadable(path, exc, None)
        print(f"hflmpi: {path} has no checkpoint (the run stopped before its first one): "
              "starting it afresh", file=sys.stderr, flush=True)
    return _new_record(config, comm, plan, path, parts, train_set, overwrite=overwrite)


def _new_record(
    config: RunConfig, comm: MPI.Comm, plan: TreePlan, path: Path, parts: list[np.ndarray],
    train_set: TensorDataset, overwrite: bool,
) -> RunRecord:
    path.parent.mkdir(parents=True, exist_ok=True)
    record = RunRecord.create(
        path, to_toml_string(config),
        {"world_size": comm.Get_size(), "tree": plan.describe(), "hflmpi_version": __version__},
        layer_count=plan.depth, overwrite=overwrite,
    )
    stats = partition_stats(parts, train_set.labels.cpu().numpy(), train_set.num_classes)
    record.write_partition(stats.sizes, stats.histograms)
    return record


def _set_aside_unreadable(path: Path, error: BaseException, last_round: int | None) -> str | None:
    """Move an unusable run file out of the way (never delete it); return a resume-log note."""
    if not path.exists():
        return f"run record {path.name} was missing; rebuilt from the round-{last_round} checkpoint"
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    aside = path.with_name(f"{path.name}.unusable-{stamp}")
    os.replace(path, aside)
    reason = describe_os_error(error)
    if last_round is None:
        print(f"hflmpi: warning: {path} is not a usable run record ({reason}); moved it to "
              f"{aside.name}", file=sys.stderr, flush=True)
        return None
    note = (f"run record was unusable ({reason}); moved to {aside.name} and rebuilt from the "
            f"round-{last_round} checkpoint: metrics of rounds 1..{last_round} are only there")
    print(f"hflmpi: warning: {path}: {note}", file=sys.stderr, flush=True)
    return note


def _evaluate_global(model: torch.nn.Module, my_test: TensorDataset, comm: MPI.Comm) -> tuple[float, float]:
    """Evaluate the (identical) global model on this rank's slice of the test set; sum over ranks."""
    count = len(my_test)
    loss, accuracy = evaluate(model, my_test) if count else (0.0, 0.0)
    totals = np.array([loss * count, accuracy * count, count], dtype=np.float64)
    comm.Allreduce(MPI.IN_PLACE, totals, op=MPI.SUM)
    return float(totals[0] / totals[2]), float(totals[1] / totals[2])


def _reduce(comm: MPI.Comm, values: np.ndarray, op: MPI.Op) -> np.ndarray:
    """Element-wise reduction of a small float64 vector to rank 0 (buffer API)."""
    values = np.ascontiguousarray(values, dtype=np.float64)
    out = np.empty_like(values) if comm.Get_rank() == 0 else None
    comm.Reduce(values, out, op=op, root=0)
    return out if out is not None else values


def _weighted_mean(comm: MPI.Comm, value: float, weight: float) -> float:
    totals = np.array([value * weight, weight], dtype=np.float64)
    comm.Allreduce(MPI.IN_PLACE, totals, op=MPI.SUM)
    return float(totals[0] / totals[1]) if totals[1] > 0 else math.nan


def _flat_momentum(solver: LocalSolver) -> np.ndarray | None:
    if not solver.momentum_buffers or solver.config.momentum_reset == "aggregation":
        return None  # zero right after every global aggregation: nothing to save
    return torch.cat([b.detach().reshape(-1).cpu() for b in solver.momentum_buffers]).numpy()


def _load_momentum(solver: LocalSolver, flat: np.ndarray) -> None:
    offset = 0
    with torch.no_grad():
        for buffer in solver.momentum_buffers:
            n = buffer.numel()
            buffer.copy_(torch.from_numpy(np.asarray(flat[offset:offset + n])).view_as(buffer))
            offset += n


def _checkpoint(
    comm: MPI.Comm, path: Path, rnd: int, flat: torch.Tensor, sampler: BatchSampler,
    solver: LocalSolver, config: RunConfig, preempted_by: str | None = None,
) -> None:
    """Gather per-rank state to rank 0 and write an atomic checkpoint (all ranks).

    With ``preempted_by`` (the signal's name), rank 0 then writes the preemption marker, so a job
    script knows the checkpoint is on disk even if a race leaves the step with a wrong exit code.
    """
    position = sampler.state_dict()
    mine = {"sampler": np.array([position["epoch"], position["offset"]], dtype=np.int64)}
    momentum = _flat_momentum(solver)
    if momentum is not None:
        mine["momentum"] = momentum
    gathered = comm.gather(mine, root=0)

    def write() -> None:
        if gathered is None:  # not rank 0
            return
        extra = {name: np.stack([g[name] for g in gathered]) for name in mine}
        config_toml = to_toml_string(config)
        written = save_checkpoint(
            path, round=rnd, model_flat=flat.detach().cpu(), extra_arrays=extra,
            state={"round": rnd, "config_sha256": config_digest(config_toml),
                   "config_toml": config_toml,  # resume even if the run file is lost
                   "world_size": comm.Get_size(), "hflmpi_version": __version__},
        )
        if preempted_by is not None:
            write_marker(path, round=rnd, checkpoint=written, signal_name=preempted_by)

    agree(comm, f"writing the round-{rnd} checkpoint", write)


def main(argv: Sequence[str] | None = None, comm: MPI.Comm | None = None) -> int:
    """Entry point of ``hflmpi run``; returns the process exit code."""
    parser = argparse.ArgumentParser(prog="hflmpi run", description="Train under mpiexec.")
    parser.add_argument("config", nargs="?", help="TOML config (optional with --resume)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set schedule.tau=[5,2] (repeatable)")
    parser.add_argument("--resume", metavar="RUN.h5", help="continue the run stored in RUN.h5")
    parser.add_argument("--resume-if-exists", action="store_true",
                        help="resume from run.out's checkpoint when there is one, else start fresh "
                             "(for requeued batch jobs)")
    args = parser.parse_args(argv)
    comm = MPI.COMM_WORLD if comm is None else comm
    leaving = comm.Dup()  # all ranks: the exit handshake's own communicator (see leave_together)
    code = _run(args, comm)
    # All ranks agree on the code and leave together: under srun a rank that exits 75 or 2 first
    # gets the others killed with SIGTERM, and the step would end 143 instead.
    return leave_together(leaving, code)


def _run(args: argparse.Namespace, comm: MPI.Comm) -> int:
    rank = comm.Get_rank()
    try:
        if args.config is None and args.resume is None:
            raise ConfigError("give a CONFIG.toml, or --resume RUN.h5 to continue a run")
        if args.config is None:
            config = _config_from_run(Path(args.resume), args.overrides)
        else:
            config = load_config(args.config, args.overrides)
        replace_unfinished = False
        if args.resume_if_exists and args.resume is None:
            if _has_checkpoint(Path(config.run.out)):
                args.resume = config.run.out
            else:  # a run file without any checkpoint: the last leg stopped before its first one
                replace_unfinished = True
        limit_threads(comm)
        result = train(config, comm, resume=args.resume, replace_unfinished=replace_unfinished)
    except (ConfigError, TopologyError, SetupError) as exc:
        # Every rank raised the same error (config and setup checks are collective): say it once.
        if rank == 0:
            print(f"hflmpi: error: {exc}", file=sys.stderr, flush=True)
        return 2
    if result.preempted:
        return EXIT_PREEMPTED
    if rank == 0:
        print(f"hflmpi: {result.rounds} rounds done; test accuracy {result.test_accuracy:.4f}, "
              f"test loss {result.test_loss:.4f}; run record {result.record_path}", flush=True)
    return 0


def _has_checkpoint(run_path: Path) -> bool:
    """Whether the run has a checkpoint file to resume from (its run file may be lost or broken)."""
    return any(path.exists() for path in checkpoint_paths(run_path))


def _config_from_run(path: Path, overrides: Sequence[str]) -> RunConfig:
    import tempfile

    text: str | None
    try:
        text = read_config_toml(path)
    except (OSError, KeyError, ValueError) as exc:
        text = _config_from_checkpoint(path)  # the run file is lost or broken; a checkpoint may do
        if text is None:
            raise ConfigError(f"--resume {path}: cannot read the stored config ({exc}) and no "
                              "valid checkpoint holds one; give the CONFIG.toml too") from None
    with tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False) as handle:
        handle.write(text)
    try:
        return load_config(handle.name, overrides)
    finally:
        os.unlink(handle.name)


def _config_from_checkpoint(path: Path) -> str | None:
    """Return the resolved config a checkpoint of the run stored, or None (every rank reads it)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CheckpointFallbackWarning)
        try:
            text = load_latest_valid(path).state.get("config_toml")
        except CheckpointError:
            return None
    return text if isinstance(text, str) else None


def limit_threads(comm: MPI.Comm) -> None:
    """Give each rank its share of the node's cores (ranks oversubscribing cores crawl otherwise)."""
    if "OMP_NUM_THREADS" in os.environ:
        return
    ranks_here = node_local(comm)[1]
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // ranks_here))
