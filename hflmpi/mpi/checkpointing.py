"""The collective side of checkpoints: check a resume, hand out rank state, gather and write it.

Rank 0 owns the files (:mod:`hflmpi.record.runfile`, :mod:`hflmpi.record.checkpoint`); every
rank owns a slice of the state (its sampler position and momentum). Everything between ranks
travels as typed, validated buffers (:mod:`hflmpi.mpi.messages`), and every failure is raised on
every rank.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from mpi4py import MPI

from hflmpi import __version__
from hflmpi.config import ConfigError, RunConfig, to_toml_string
from hflmpi.mpi.guard import SetupError, Watchdog, agree
from hflmpi.mpi.messages import (
    ERROR_TEXT_BYTES,
    bcast_array,
    bcast_int,
    bcast_text,
    gather_array,
    scatter_array,
)
from hflmpi.record.checkpoint import Checkpoint, config_digest, save_checkpoint
from hflmpi.record.marker import write_marker
from hflmpi.record.replace import refusal
from hflmpi.record.runfile import ConfigUpdate, load_checked

__all__ = ["check_fresh_start", "check_resume", "resume_state", "write_checkpoint"]

_FLOATS = (np.dtype(np.float32), np.dtype(np.float64))
_INT64 = (np.dtype(np.int64),)


def check_resume(
    comm: MPI.Comm, resume: Path | None, config: RunConfig, depth: int, allow_change: bool,
) -> tuple[Checkpoint | None, ConfigUpdate | None]:
    """Rank 0 loads and checks the newest valid checkpoint; the verdict reaches every rank.

    All ranks. A refusal (:func:`hflmpi.record.runfile.load_checked`) raises
    :class:`ConfigError` (a config that may not continue this run) or :class:`SetupError` (a
    file problem) on every rank, before any data is loaded or any model code imported. Returns,
    on rank 0, the checkpoint and the config update for the run file (``None`` elsewhere;
    :func:`resume_state` sends each rank its part once the model exists).
    """
    if resume is None:
        return None, None
    checkpoint: Checkpoint | None = None
    update: ConfigUpdate | None = None
    kind, text = 0, ""
    if comm.Get_rank() == 0:
        try:
            checkpoint, update = load_checked(resume, config, comm.Get_size(), depth, allow_change)
        except ConfigError as exc:
            kind, text = 1, str(exc)
        except (OSError, ValueError, RuntimeError, KeyError, TypeError) as exc:
            kind, text = 2, (f"loading a checkpoint for {resume} failed: "
                             f"{type(exc).__name__}: {exc}")
    what = f"checking the checkpoint of {resume} on rank 0"
    kind = bcast_int(comm, kind, low=0, high=2, what=what)
    if kind:
        text = (bcast_text(comm, text, max_bytes=ERROR_TEXT_BYTES, what=what) or "")[:ERROR_TEXT_BYTES]
        raise ConfigError(text) if kind == 1 else SetupError(text)
    return checkpoint, update


def check_fresh_start(comm: MPI.Comm, run_path: Path) -> None:
    """Refuse on every rank a fresh start over the files of a run at ``run_path``.

    All ranks. Rank 0 alone writes the run, so its view of the disk decides
    (:func:`hflmpi.record.replace.refusal`); the refusal is a :class:`ConfigError` naming
    ``--overwrite``, ``--resume`` and another ``run.out``, raised before any data is loaded.
    """
    text = refusal(run_path) if comm.Get_rank() == 0 else None
    if text is not None:
        text = text.encode("utf-8")[:ERROR_TEXT_BYTES].decode("utf-8", errors="ignore")
    text = bcast_text(comm, text, max_bytes=ERROR_TEXT_BYTES, what=f"checking {run_path} on rank 0")
    if text is not None:
        raise ConfigError(text)


def resume_state(comm: MPI.Comm, checkpoint: Checkpoint | None, numel: int) -> dict[str, Any]:
    """Send rank 0's checkpoint to every rank: its round, model and each rank's own slice.

    All ranks. Returns ``{"round", "model", "mine"}`` where ``mine`` holds this rank's
    ``"sampler"`` position (int64 ``[epoch, offset]``) and, if saved, its flat ``"momentum"``;
    ``numel`` is the model's length, which the checkpoint's model must have.
    """
    root = checkpoint if comm.Get_rank() == 0 else None
    what = "sending the checkpoint from rank 0"
    rnd = bcast_int(comm, root.round if root is not None else None, low=0, what=what)
    model = bcast_array(comm, root.model if root is not None else None, max_elements=numel,
                        dtypes=_FLOATS, shape=(numel,), what=what)
    mine: dict[str, np.ndarray] = {}
    for name, dtypes, shape in (("sampler", _INT64, (2,)), ("momentum", _FLOATS, (None,))):
        row = scatter_array(comm, root.extra_arrays.get(name) if root is not None else None,
                            max_elements=numel, dtypes=dtypes, shape=shape, what=f"{what} ({name})")
        if row is not None:
            mine[name] = row
    if "sampler" not in mine:
        raise SetupError(f"{what}: the checkpoint holds no per-rank \"sampler\" positions; it was "
                         "not written by hflmpi run")
    return {"round": rnd, "model": model, "mine": mine}


def write_checkpoint(
    comm: MPI.Comm, path: Path, rnd: int, flat: torch.Tensor, position: dict[str, int],
    momentum: np.ndarray | None, config: RunConfig, watchdog: Watchdog,
    preempted_by: str | None = None,
    server_state: Callable[[], dict[str, np.ndarray]] | None = None,
) -> None:
    """Gather every rank's state to rank 0 and write an atomic checkpoint (all ranks, guarded).

    ``server_state`` (all ranks) gathers further arrays to rank 0, e.g. the server optimizers'
    (:func:`hflmpi.mpi.server_state.gather_server_state`).

    With ``preempted_by`` (the signal's name), rank 0 then writes the preemption marker, so a job
    script knows the checkpoint is on disk even if a race leaves the step with a wrong exit code.
    """
    what = f"gathering the round-{rnd} checkpoint state"
    with watchdog.guard(f"the round-{rnd} checkpoint (gathering every rank's state)"):
        positions = gather_array(comm, np.array([position["epoch"], position["offset"]], dtype=np.int64),
                                 max_elements=2, dtypes=_INT64, shape=(2,), what=what)
        momenta = gather_array(comm, momentum, max_elements=flat.numel(), dtypes=_FLOATS,
                               shape=(None,), what=f"{what} (momentum)")
        server = server_state() if server_state is not None else {}
    text = to_toml_string(config)

    def write() -> None:
        if positions is None:  # not rank 0
            return
        extra = {"sampler": positions}
        if momenta is not None:
            extra["momentum"] = momenta
        extra.update(server)
        written = save_checkpoint(
            path, round=rnd, model_flat=flat.detach().cpu(), extra_arrays=extra,
            state={"round": rnd, "config_sha256": config_digest(text),
                   "config_toml": text,  # resume even if the run file is lost
                   "world_size": comm.Get_size(), "hflmpi_version": __version__},
        )
        if preempted_by is not None:
            write_marker(path, round=rnd, checkpoint=written, signal_name=preempted_by)

    with watchdog.guard(f"the round-{rnd} checkpoint (writing it and agreeing it was written)"):
        agree(comm, f"writing the round-{rnd} checkpoint", write)
