"""Per-client state of a population across ranks: shared each round, gathered into checkpoints.

Every rank fills the rows of its own clients in arrays over the whole population and one
reduction combines them: ``MAX`` over rows other ranks leave at ``-inf`` (or -1 for positions,
which are >= 0), ``SUM`` for momentum rows other ranks leave at zero (``x + 0`` is exact). The
checkpoint holds, besides the global model, ``client_sampler`` (int64 ``[clients, 2]``: epoch and
offset, -1 for a client that never trained), ``client_loss`` (float64 ``[clients]``, NaN where
unknown) and, where the solver keeps momentum across aggregations, ``client_momentum``
(``[clients, numel]``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from mpi4py import MPI

from hflmpi import __version__
from hflmpi.config import RunConfig, to_toml_string
from hflmpi.learn.clients import ClientTrainer
from hflmpi.mpi.guard import SetupError, agree
from hflmpi.mpi.messages import allreduce_int
from hflmpi.record.checkpoint import Checkpoint, config_digest, save_checkpoint
from hflmpi.record.marker import write_marker

__all__ = ["ClientState", "ResumeState", "broadcast_resume", "gather_client_state",
           "max_over_ranks", "reduce_round", "share_client_values",
           "write_population_checkpoint"]


@dataclass
class ClientState:
    """Every client's state, complete on rank 0 after :func:`gather_client_state`."""

    positions: np.ndarray  # int64 [clients, 2]
    losses: np.ndarray  # float64 [clients]
    momentum: np.ndarray | None  # [clients, numel]


@dataclass
class ResumeState:
    """What a resumed population continues from (identical on every rank)."""

    round: int
    model: np.ndarray
    positions: np.ndarray
    losses: np.ndarray
    momentum: np.ndarray | None
    sim_time: float = 0.0


def share_client_values(comm: MPI.Comm, clients: int, losses: dict[int, float],
                        samples: dict[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Give every rank each client's loss (NaN: did not train) and samples of this round.

    All ranks; one ``MAX`` allreduce of ``2 * clients`` float64.
    """
    values = np.full((2, clients), -np.inf)
    for client, value in losses.items():
        values[0, client] = value if np.isfinite(value) else np.inf
        values[1, client] = samples.get(client, 0)
    comm.Allreduce(MPI.IN_PLACE, values, op=MPI.MAX)
    shared_losses = np.where(np.isneginf(values[0]), np.nan, values[0])
    return shared_losses, np.where(np.isneginf(values[1]), 0, values[1]).astype(np.int64)


def reduce_round(comm: MPI.Comm, evaluation: np.ndarray | None, sums: np.ndarray,
                 worst: np.ndarray) -> None:
    """Combine a round's measurements in place on every rank (all ranks, float64 buffers).

    ``evaluation`` (``[loss * count, accuracy * count, count]``, on evaluated rounds) and
    ``sums`` (bytes) are summed, ``worst`` (seconds, errors) takes the maximum.
    """
    if evaluation is not None:
        comm.Allreduce(MPI.IN_PLACE, evaluation, op=MPI.SUM)
    comm.Allreduce(MPI.IN_PLACE, sums, op=MPI.SUM)
    comm.Allreduce(MPI.IN_PLACE, worst, op=MPI.MAX)


def max_over_ranks(comm: MPI.Comm, value: int) -> int:
    """Return the largest ``value`` over the ranks (all ranks)."""
    return allreduce_int(comm, value, MPI.MAX)


def gather_client_state(comm: MPI.Comm, clients: int, trainer: ClientTrainer,
                        losses: np.ndarray) -> ClientState:
    """Combine every rank's client state on rank 0 (all ranks; the losses are known everywhere)."""
    positions = np.full((clients, 2), -1, dtype=np.int64)
    for client, (epoch, offset) in trainer.positions().items():
        positions[client] = (epoch, offset)
    combined = np.empty_like(positions) if comm.Get_rank() == 0 else None
    comm.Reduce(positions, combined, op=MPI.MAX, root=0)
    momentum = None
    if trainer.keeps_momentum:
        numel = trainer.params.flat.numel()
        dtype = np.float64 if trainer.params.flat.dtype == torch.float64 else np.float32
        rows = np.zeros((clients, numel), dtype=dtype)
        for client, buffer in trainer.momentum.items():
            rows[client] = buffer.detach().cpu().numpy()
        momentum = np.empty_like(rows) if comm.Get_rank() == 0 else None
        comm.Reduce(rows, momentum, op=MPI.SUM, root=0)
    return ClientState(combined if combined is not None else positions, losses, momentum)


def write_population_checkpoint(comm: MPI.Comm, path: Path, rnd: int, model: torch.Tensor,
                                state: ClientState, config: RunConfig,
                                preempted_by: str | None = None, sim_time: float = 0.0,
                                server_state: dict[str, np.ndarray] | None = None) -> None:
    """Write the round's checkpoint on rank 0; every rank learns whether it worked.

    ``sim_time`` is the simulated clock at the end of the round (:mod:`hflmpi.core.clock`);
    ``server_state`` (rank 0) holds the nodes' server optimizer arrays
    (:meth:`hflmpi.mpi.population_opt.NodeOptimizers.collect_state`).
    """
    text = to_toml_string(config)

    def write() -> None:
        if comm.Get_rank() != 0:
            return
        extra: dict[str, Any] = {"client_sampler": state.positions, "client_loss": state.losses,
                                 "sim_time": np.array([sim_time], dtype=np.float64)}
        if state.momentum is not None:
            extra["client_momentum"] = state.momentum
        extra.update(server_state or {})
        written = save_checkpoint(
            path, round=rnd, model_flat=model.detach().cpu(), extra_arrays=extra,
            state={"round": rnd, "config_sha256": config_digest(text), "config_toml": text,
                   "world_size": comm.Get_size(), "clients": int(state.losses.size),
                   "hflmpi_version": __version__})
        if preempted_by is not None:
            write_marker(path, round=rnd, checkpoint=written, signal_name=preempted_by)

    agree(comm, f"writing the round-{rnd} checkpoint", write)


def broadcast_resume(comm: MPI.Comm, checkpoint: Checkpoint | None, clients: int, numel: int,
                     momentum: bool) -> ResumeState:
    """Send rank 0's checkpoint of a population to every rank (all ranks)."""

    def check() -> None:
        if checkpoint is None:  # not rank 0
            return
        extra = checkpoint.extra_arrays
        wanted = {"client_sampler": (clients, 2), "client_loss": (clients,)}
        if momentum:
            wanted["client_momentum"] = (clients, numel)
        for name, shape in wanted.items():
            got = np.asarray(extra.get(name)).shape if name in extra else None
            if got != shape:
                raise ValueError(f"{checkpoint.path} holds {name} of shape {got}, not {shape}: "
                                 "it was not written by a population of "
                                 f"clients.count={clients}; resume with the run's config")

    agree(comm, "checking the checkpoint's client state", check)
    rnd = np.array([checkpoint.round if checkpoint is not None else 0], dtype=np.int64)
    comm.Bcast(rnd, root=0)
    model = np.asarray(checkpoint.model) if checkpoint is not None else None
    model = _bcast(comm, model, (numel,), np.float64)
    extra = checkpoint.extra_arrays if checkpoint is not None else {}
    positions = _bcast(comm, extra.get("client_sampler"), (clients, 2), np.int64)
    losses = _bcast(comm, extra.get("client_loss"), (clients,), np.float64)
    rows = _bcast(comm, extra.get("client_momentum"), (clients, numel), np.float64) \
        if momentum else None
    # a checkpoint written before the simulated clock existed resumes the clock at 0
    clock = _bcast(comm, extra.get("sim_time", [0.0]), (1,), np.float64)
    if model is None or positions is None or losses is None:
        raise SetupError("the checkpoint's client state did not reach every rank")
    return ResumeState(int(rnd[0]), model, positions, losses, rows, float(clock[0]))


def _bcast(comm: MPI.Comm, array: Any, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    """Broadcast rank 0's array of a shape every rank knows (as ``dtype``, exact for float32)."""
    out = (np.ascontiguousarray(np.asarray(array), dtype=dtype) if comm.Get_rank() == 0
           else np.empty(shape, dtype=dtype))
    comm.Bcast(out, root=0)
    return out
