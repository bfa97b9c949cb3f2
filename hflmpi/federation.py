"""The QMLHFL training loop: every MPI rank is a device; one global round is ``prod(tau)`` steps.

Reads top to bottom: set up (config, tree, data, model, aggregator, run record), then for each
global round run the nested schedule of :mod:`hflmpi.core.schedule` (local SGD steps, with layers
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
from hflmpi.mpi.aggregate import HierarchicalAggregator, PrivacyOptions, measure_divergences
from hflmpi.record.checkpoint import (
    CheckpointFallbackWarning,
    checkpoint_paths,
    config_digest,
    load_latest_valid,
    save_checkpoint,
)
from hflmpi.mpi.comm import LayerComms, node_local, plan_from_nodes
from hflmpi.config import ConfigError, RunConfig, load_config, to_toml_string
from hflmpi.errors import HflmpiError
from hflmpi.learn.data import TensorDataset, load_dataset
from hflmpi.learn.flat import flatten_parameters
from hflmpi.mpi.guard import Watchdog
from hflmpi.core.privacy import epsilon_for
from hflmpi.learn.local import BatchSampler, LocalSolver, evaluate, lr_at
from hflmpi.mpi.messages import (
    MessageError,
    allgather_text,
    bcast_array,
    bcast_int,
    bcast_text,
    gather_array,
    scatter_array,
)
from hflmpi.learn.models import build_model
from hflmpi.learn.partition import make_partition, partition_stats
from hflmpi.mpi.preempt import EXIT_PREEMPTED, PreemptionFlag
from hflmpi.record.progress import Progress
from hflmpi.core.schedule import round_events, steps_per_round
from hflmpi.record.resume import (
    ALLOW_FLAG,
    FREE_KEYS,
    ConfigChange,
    check_checkpoint_config,
    check_config_change,
    check_untrusted_model,
    stored_config,
)
from hflmpi.record.store import RoundMetrics, RunRecord, read_config_toml, read_run_info
from hflmpi.core.topology import TopologyError, TreePlan, plan_fanouts, plan_groups

__all__ = ["SetupError", "TrainResult", "limit_threads", "plan_for", "train", "main"]

T = TypeVar("T")

_ERROR_BYTES = 4096  # longest error text a rank shares in agree(); longer ones are cut
_FLOATS = (np.dtype(np.float32), np.dtype(np.float64))
_INT64 = (np.dtype(np.int64),)


class SetupError(HflmpiError, RuntimeError):
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
    The errors travel as bounded UTF-8 texts (:func:`hflmpi.mpi.messages.allgather_text`).
    """
    error: str | None = None
    result: Any = None
    try:
        result = action()
    except (OSError, ValueError, RuntimeError, KeyError, ImportError, TypeError) as exc:
        error = f"{type(exc).__name__}: {exc}"
    errors = allgather_text(comm, error, max_bytes=_ERROR_BYTES, what=f"{what}: sharing the outcome")
    failed = [(rank, text) for rank, text in enumerate(errors) if text is not None]
    if failed:
        rank, text = failed[0]
        if len(failed) == comm.Get_size() and all(t == text for _, t in failed):
            # The same error everywhere: the rank adds nothing, and a config or tree error
            # stays one (the user fixes the config, not a file).
            for kind in (ConfigError, TopologyError):
                prefix = f"{kind.__name__}: "
                if text.startswith(prefix):
                    raise kind(text[len(prefix):])
            raise SetupError(text)
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


@dataclass(frozen=True)
class _ConfigUpdate:
    """Rank 0's note for the run file: the config a resume continues under, and what changed."""

    stored_toml: str
    changes: list[ConfigChange]


def _load_checked(
    resume: Path, config: RunConfig, world_size: int, depth: int, allow_change: bool
) -> tuple[Any, _ConfigUpdate]:
    """Load the newest valid checkpoint of ``resume`` and check it may continue as ``config``.

    Rank 0 only (no collectives). Checks, in order: the world size; that the checkpoint was
    written under a config the run file records; the changes from the stored config
    (:func:`hflmpi.record.resume.check_config_change`); the tree depth (the metric columns).
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", CheckpointFallbackWarning)
        checkpoint = load_latest_valid(resume)
    for warning in caught:
        print(f"hflmpi: warning: {warning.message}", file=sys.stderr, flush=True)
    saved = int(checkpoint.state.get("world_size", world_size))
    if saved != world_size:  # partition, batch positions and momentum are per rank
        raise ValueError(
            f"{checkpoint.path} was written by {saved} ranks but this run has "
            f"{world_size}; resume with mpiexec -n {saved}"
        )
    info = read_run_info(resume)
    check_checkpoint_config(checkpoint.state, info, checkpoint_path=str(checkpoint.path),
                            run_path=str(resume))
    text = read_config_toml(resume)
    changes = check_config_change(stored_config(text, str(resume)), config, run_path=str(resume),
                                  allow_change=allow_change, checkpoint_round=checkpoint.round)
    layers = int(info.get("layer_count", depth))
    if layers != depth:  # same config, other hosts: topology.nodes found another node count
        raise ConfigError(
            f"--resume {resume}: the run file has {layers} aggregation layers but the tree "
            f"planned for this job has {depth} ({config.topology.describe_depth()}); resume on "
            "the same layout of nodes and ranks"
        )
    return checkpoint, _ConfigUpdate(text, changes)


def _check_resume(
    comm: MPI.Comm, resume: Path | None, config: RunConfig, depth: int, allow_change: bool,
) -> tuple[Any, _ConfigUpdate | None]:
    """Rank 0 loads and checks the newest valid checkpoint; the verdict reaches every rank.

    All ranks. A refusal (see :func:`_load_checked`) raises :class:`ConfigError` (a config that
    may not continue this run) or :class:`SetupError` (a file problem) on every rank, before
    any data is loaded or any model code imported. Returns, on rank 0, the checkpoint and the
    config update for the run file (``None`` elsewhere; :func:`_resume_state` sends each rank
    its part once the model exists).
    """
    if resume is None:
        return None, None
    checkpoint: Any = None
    update: _ConfigUpdate | None = None
    kind, text = 0, ""
    if comm.Get_rank() == 0:
        try:
            checkpoint, update = _load_checked(resume, config, comm.Get_size(), depth,
                                               allow_change)
        except ConfigError as exc:
            kind, text = 1, str(exc)
        except (OSError, ValueError, RuntimeError, KeyError, TypeError) as exc:
            kind, text = 2, (f"loading a checkpoint for {resume} failed: "
                             f"{type(exc).__name__}: {exc}")
    what = f"checking the checkpoint of {resume} on rank 0"
    kind = bcast_int(comm, kind, low=0, high=2, what=what)
    if kind:
        text = (bcast_text(comm, text, max_bytes=_ERROR_BYTES, what=what) or "")[:_ERROR_BYTES]
        raise ConfigError(text) if kind == 1 else SetupError(text)
    return checkpoint, update


def _resume_state(comm: MPI.Comm, checkpoint: Any, numel: int) -> dict[str, Any]:
    """Send rank 0's checkpoint to every rank: its round, model and each rank's own slice.

    All ranks. Returns ``{"round", "model", "mine"}`` where ``mine`` holds this rank's
    ``"sampler"`` position (int64 ``[epoch, offset]``) and, if saved, its flat ``"momentum"``;
    ``numel`` is the model's length, which the checkpoint's model must have. Everything travels
    as typed, validated buffers (:mod:`hflmpi.mpi.messages`).
    """
    root = comm.Get_rank() == 0
    what = "sending the checkpoint from rank 0"
    rnd = bcast_int(comm, checkpoint.round if root else None, low=0, what=what)
    model = bcast_array(comm, checkpoint.model if root else None, max_elements=numel,
                        dtypes=_FLOATS, shape=(numel,), what=what)
    mine: dict[str, np.ndarray] = {}
    for name, dtypes, shape in (("sampler", _INT64, (2,)), ("momentum", _FLOATS, (None,))):
        row = scatter_array(comm, checkpoint.extra_arrays.get(name) if root else None,
                            max_elements=numel, dtypes=dtypes, shape=shape, what=f"{what} ({name})")
        if row is not None:
            mine[name] = row
    if "sampler" not in mine:
        raise SetupError(f"{what}: the checkpoint holds no per-rank \"sampler\" positions; it was "
                         "not written by hflmpi run")
    return {"round": rnd, "model": model, "mine": mine}


def _check_model_size(checkpoint: Any, numel: int, config: RunConfig) -> None:
    """On rank 0 (which holds the checkpoint): refuse a model whose size the checkpoint lacks."""
    if checkpoint is None:  # not rank 0
        return
    stored = int(np.asarray(checkpoint.model).size)
    if stored != numel:
        raise ValueError(
            f"the checkpoint holds a model of {stored} parameters but model.name="
            f"{config.model.name!r} builds one of {numel} for this data; resume with the model "
            "(and its code) the run was started with"
        )


def _checked_plan(config: RunConfig, comm: MPI.Comm) -> TreePlan:
    """Plan the tree and check the per-layer options against its depth (before any model)."""
    plan = plan_for(config, comm)
    config.check_layer_options(plan.depth, [[len(kids) for kids in layer] for layer in plan.children])
    return plan


def train(
    config: RunConfig,
    comm: MPI.Comm,
    *,
    resume: str | os.PathLike[str] | None = None,
    stream: TextIO | None = None,
    allow_config_change: bool = False,
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
        ``config`` must equal the run file's stored config except in
        :data:`hflmpi.record.resume.FREE_KEYS`; otherwise :class:`ConfigError` on every rank.
    stream : text stream, optional
        Where rank 0 writes progress (default stdout).
    allow_config_change : bool
        Let a resume change keys outside :data:`hflmpi.record.resume.FREE_KEYS` (never those in
        :data:`hflmpi.record.resume.FIXED_KEYS`); the changes are recorded in the run file.
    """
    rank, size = comm.Get_rank(), comm.Get_size()
    seed, rounds, tau = config.run.seed, config.run.rounds, list(config.schedule.tau)
    record_path = Path(resume) if resume is not None else Path(config.run.out)

    # ---- set up: tree, data, model (all ranks; failures raise on every rank) ----
    plan = agree(comm, "planning the tree", lambda: _checked_plan(config, comm))
    device = agree(comm, "choosing the device", lambda: _device(config, comm))
    dtype = torch.float64 if config.run.dtype == "float64" else torch.float32
    # Resume checks first: a refused config must stop before any data or model code is loaded.
    checkpoint, update = _check_resume(comm, Path(resume) if resume is not None else None, config,
                                       plan.depth, allow_config_change)
    train_set, test_set = agree(comm, "loading data", lambda: load_dataset(config.data, seed))
    parts = agree(comm, "partitioning the data", lambda: _partition(config, train_set, size))
    my_indices = parts[rank]
    weight = float(len(my_indices)) if config.aggregation.weighting == "samples" else 1.0
    # Features in the model's dtype once, here, rather than a cast at every step.
    train_set, test_set = train_set.to(device, dtype), test_set.to(device, dtype)
    my_test = test_set.subset(np.arange(rank, len(test_set), size))

    model = agree(comm, "building the model", lambda: build_model(
        config.model, train_set.input_shape, train_set.num_classes, seed=seed))
    params = flatten_parameters(model, dtype=dtype, device=device)
    state: dict[str, Any] | None = None
    if resume is not None:
        agree(comm, "checking the checkpoint against the model",
              lambda: _check_model_size(checkpoint, params.numel, config))
        state = _resume_state(comm, checkpoint, params.numel)  # all ranks: typed buffers
    comms = LayerComms(comm, plan)
    bits = list(config.quantize.bits_for(plan.depth))
    agg_cfg, privacy = config.aggregation, config.privacy
    if privacy.layer and privacy.insecure_reproducible_noise and rank == 0:
        print(_INSECURE_NOISE_WARNING, file=sys.stderr, flush=True)
    # what a device can honestly claim (every rank computes the whole partition from the seed):
    # robust layers clamp each child's claimed weight to it
    caps = [float(len(p)) if agg_cfg.weighting == "samples" else 1.0 for p in parts]
    aggregator = agree(comm, "setting up the aggregation", lambda: HierarchicalAggregator(
        comms, params.flat, algorithm="tree" if agg_cfg.algorithm == "tree" else "subtree", bits=bits,
        bucket_size=config.quantize.bucket_size, seed=seed, method=config.quantize.method,
        robust=list(agg_cfg.robust) or None, secure=list(agg_cfg.secure) or None,
        robust_params={"trim": agg_cfg.trim, "f": agg_cfg.krum_f}, weight_caps=caps,
        allow_small_secure_groups=agg_cfg.allow_small_secure_groups,
        privacy=PrivacyOptions(privacy.layer, privacy.clip, privacy.noise_multiplier, privacy.mode,
                               privacy.insecure_reproducible_noise)
        if privacy.layer else None,
        signature=params.signature_hash(), nonfinite=config.run.nonfinite,
    ))
    watchdog = Watchdog(comm, config.run.watchdog_seconds)
    try:
        sampler = BatchSampler(my_indices, config.optim.batch_size, seed=seed, client=rank)

        # ---- resume or start fresh; the run record is rank 0's ----
        start_round = 1
        if state is not None:
            params.flat.copy_(torch.from_numpy(np.asarray(state["model"])).to(dtype))
            sampler.load_state_dict({k: int(v) for k, v in zip(("epoch", "offset"), state["mine"]["sampler"])})
            start_round = int(state["round"]) + 1
        with watchdog.guard("the broadcast of rank 0's initial model"):
            aggregator.broadcast()  # all ranks: start from rank 0's model, bit for bit (sets anchors)
        solver = LocalSolver(model, config.optim)
        if state is not None and "momentum" in state["mine"]:
            _load_momentum(solver, state["mine"]["momentum"])
        with watchdog.guard("opening the run record"):
            record = agree(comm, "opening the run record", lambda: _open_record(
                config, comm, plan, record_path, resume is not None, start_round - 1, parts, train_set,
                update, allow_config_change))
        progress = Progress(stream or sys.stdout, config.run.progress, total_rounds=rounds) if rank == 0 else None
        steps = steps_per_round(tau)
        started = time.perf_counter()
        test_loss = test_accuracy = math.nan
        preemption = PreemptionFlag()
        last_round = start_round - 1

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
                    with watchdog.guard(f"the divergence measurement of round {rnd}"):
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

            evaluated = _evaluate_local(model, my_test) if evaluate_now else None
            worst = np.concatenate([compute, comm_seconds, np.nan_to_num(quant_error, nan=-1.0)])
            with watchdog.guard(f"the metrics reduction of round {rnd}"):
                if evaluated is not None:
                    test_loss, test_accuracy = _sum_evaluation(comm, evaluated)  # all ranks
                train_loss = _weighted_mean(comm, float(loss_sum) / steps, weight)  # all ranks
                totals = _reduce(comm, bytes_sent, MPI.SUM)  # all ranks
                slowest = _reduce(comm, worst, MPI.MAX)  # all ranks
            if record is not None and progress is not None:  # rank 0
                wall = time.perf_counter() - round_start
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
                progress.update(rnd, loss=train_loss, accuracy=test_accuracy,
                                samples_per_second=size * steps * config.optim.batch_size / wall)
            last_round = rnd
            with watchdog.guard(f"the preemption poll after round {rnd}"):
                stop = preemption.requested(comm)  # all ranks: did any rank get SIGUSR1/SIGTERM?
            if stop or rnd == rounds or (config.run.checkpoint_every > 0 and rnd % config.run.checkpoint_every == 0):
                _checkpoint(comm, record_path, rnd, params.flat, sampler, solver, config,
                            watchdog)  # all ranks
            if stop:
                if rank == 0:
                    print(f"hflmpi: {preemption.received.name if preemption.received else 'signal'} on "
                          f"some rank: checkpointed round {rnd}, exiting for requeue", file=sys.stderr,
                          flush=True)
                break
    finally:
        watchdog.close()  # all ranks; also when an error leaves the loop
    preemption.restore()
    if record is not None and progress is not None:  # rank 0
        progress.close()
        if privacy.layer:
            print(_privacy_summary(config, bits, last_round), flush=True)
        record.close()
    final = params.flat.detach().cpu().clone()
    comms.free()
    return TrainResult(last_round, test_accuracy, test_loss, final, record_path,
                       preempted=last_round < rounds)


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


def _open_record(
    config: RunConfig, comm: MPI.Comm, plan: TreePlan, path: Path, resuming: bool,
    last_round: int, parts: list[np.ndarray], train_set: TensorDataset,
    update: _ConfigUpdate | None = None, allow_change: bool = False,
) -> RunRecord | None:
    if comm.Get_rank() != 0:
        return None
    if resuming:
        record = RunRecord.open_append(path)
        record.truncate_to(last_round)
        text = to_toml_string(config)
        if update is not None and text != update.stored_toml:
            # The stored config must stay the one the run continues under; the history keeps the
            # previous hash so the checkpoints written before this resume still match the file.
            record.replace_config(text, {
                "round": last_round,
                "changes": {c.key: {"stored": c.stored, "given": c.given} for c in update.changes},
                "allowed_by": ALLOW_FLAG if allow_change and any(
                    c.key not in FREE_KEYS for c in update.changes) else "free keys",
                "previous_config_sha256": config_digest(update.stored_toml),
                "config_sha256": config_digest(text),
            })
        return record
    path.parent.mkdir(parents=True, exist_ok=True)
    meta: dict[str, Any] = {"world_size": comm.Get_size(), "tree": plan.describe(),
                            "hflmpi_version": __version__}
    if config.privacy.layer:
        meta["dp_noise"] = ("INSECURE: keyed by run.seed (privacy.insecure_reproducible_noise)"
                            if config.privacy.insecure_reproducible_noise
                            else "os.urandom (CSPRNG, not stored, not reproducible)")
    record = RunRecord.create(path, to_toml_string(config), meta, layer_count=plan.depth)
    stats = partition_stats(parts, train_set.labels.cpu().numpy(), train_set.num_classes)
    record.write_partition(stats.sizes, stats.histograms)
    return record


def _evaluate_local(model: torch.nn.Module, my_test: TensorDataset) -> np.ndarray:
    """Evaluate the (identical) global model on this rank's slice of the test set (no MPI).

    Returns the sums ``[loss * count, accuracy * count, count]`` that :func:`_sum_evaluation` adds.
    """
    count = len(my_test)
    loss, accuracy = evaluate(model, my_test) if count else (0.0, 0.0)
    return np.array([loss * count, accuracy * count, count], dtype=np.float64)


def _sum_evaluation(comm: MPI.Comm, totals: np.ndarray) -> tuple[float, float]:
    """Add every rank's :func:`_evaluate_local` sums; return the global (loss, accuracy) (all ranks)."""
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
    solver: LocalSolver, config: RunConfig, watchdog: Watchdog,
) -> None:
    """Gather per-rank state to rank 0 and write an atomic checkpoint (all ranks, both guarded)."""
    position = sampler.state_dict()
    what = f"gathering the round-{rnd} checkpoint state"
    with watchdog.guard(f"the round-{rnd} checkpoint (gathering every rank's state)"):
        positions = gather_array(comm, np.array([position["epoch"], position["offset"]], dtype=np.int64),
                                 max_elements=2, dtypes=_INT64, shape=(2,), what=what)
        momentum = gather_array(comm, _flat_momentum(solver), max_elements=flat.numel(),
                                dtypes=_FLOATS, shape=(None,), what=f"{what} (momentum)")
    text = to_toml_string(config)

    def write() -> None:
        if positions is None:  # not rank 0
            return
        extra = {"sampler": positions}
        if momentum is not None:
            extra["momentum"] = momentum
        save_checkpoint(
            path, round=rnd, model_flat=flat.detach().cpu(), extra_arrays=extra,
            state={"round": rnd, "config_sha256": config_digest(text), "config_toml": text,
                   "world_size": comm.Get_size(), "hflmpi_version": __version__},
        )

    with watchdog.guard(f"the round-{rnd} checkpoint (writing it and agreeing it was written)"):
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
    parser.add_argument(ALLOW_FLAG, dest="allow_config_change", action="store_true",
                        help="on resume, accept config changes beyond run.rounds, run.out, "
                             "run.progress, run.eval_every, run.checkpoint_every, run.divergence "
                             "and run.watchdog_seconds (recorded in the run file)")
    args = parser.parse_args(argv)
    comm = MPI.COMM_WORLD if comm is None else comm
    rank = comm.Get_rank()
    try:
        if args.config is None and args.resume is None:
            raise ConfigError("give a CONFIG.toml, or --resume RUN.h5 to continue a run")
        if args.config is None:
            config = _config_from_run(Path(args.resume), args.overrides)
        else:
            config = load_config(args.config, args.overrides)
        if args.resume_if_exists and args.resume is None and _has_checkpoint(Path(config.run.out)):
            args.resume = config.run.out
        limit_threads(comm)
        result = train(config, comm, resume=args.resume,
                       allow_config_change=args.allow_config_change)
    except (ConfigError, TopologyError, SetupError, MessageError) as exc:
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
    newest, previous = checkpoint_paths(run_path)
    return run_path.exists() and (newest.exists() or previous.exists())


def _config_from_run(path: Path, overrides: Sequence[str]) -> RunConfig:
    """Return the config stored in run file ``path`` with ``--set`` overrides (every rank).

    The run file is data, not code: an import-path ``model.name`` it stores is refused unless
    the command line names it again (:func:`hflmpi.record.resume.check_untrusted_model`).
    """
    try:
        text = read_config_toml(path)
    except (OSError, KeyError, ValueError) as exc:
        raise ConfigError(f"--resume {path}: cannot read the stored config ({exc})") from None
    config = stored_config(text, str(path), overrides)
    check_untrusted_model(config, overrides, str(path))
    return config


def limit_threads(comm: MPI.Comm) -> None:
    """Give each rank its share of the node's cores (ranks oversubscribing cores crawl otherwise)."""
    if "OMP_NUM_THREADS" in os.environ:
        return
    ranks_here = node_local(comm)[1]
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // ranks_here))
