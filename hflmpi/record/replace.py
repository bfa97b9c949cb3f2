"""Start a run afresh over an old one (``hflmpi run --overwrite``) without a moment that holds neither.

A run owns its run file ``RUN.h5`` and its checkpoints ``RUN.ckpt.h5`` and ``RUN.ckpt.prev.h5``
(:func:`hflmpi.record.checkpoint.checkpoint_paths`); its preemption marker is removed by every
start anyway (:func:`hflmpi.record.runfile.open_record`). A fresh start over files a run owns is refused
(:func:`refusal` gives the message) unless it is asked for. Then rank 0, when it creates the new
run file, first renames the old files to ``<name>.replaced`` (:func:`set_aside`), and deletes
them once the new run has finished (:func:`drop_replaced`). A crash or a preemption in between
leaves the old run whole under those names (rename them back to use it) and the new one
resumable from its own checkpoints. Only one generation is kept aside: a second overwrite before
the first finished replaces the first's old files with the second's.

Plain files on rank 0; no MPI.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from hflmpi.record.checkpoint import checkpoint_paths, describe_os_error, fsync_path

__all__ = ["REPLACED_SUFFIX", "OVERWRITE_FLAG", "run_files", "refusal", "set_aside", "drop_replaced"]

REPLACED_SUFFIX = ".replaced"
OVERWRITE_FLAG = "--overwrite"
"""The command-line flag that asks for a fresh start over an existing run."""

_log = logging.getLogger(__name__)


def run_files(run_path: str | os.PathLike[str]) -> list[Path]:
    """Return the files a run owns: its run file, then its latest and previous checkpoints."""
    path = Path(run_path)
    return [path, *checkpoint_paths(path)]


def _aside(path: Path) -> Path:
    return path.with_name(path.name + REPLACED_SUFFIX)


def refusal(run_path: str | os.PathLike[str]) -> str | None:
    """Return why a fresh start at ``run_path`` is refused (files of a run are there), else None.

    The message names the three ways on: ``--overwrite``, ``--resume`` and another ``run.out``.
    """
    path = Path(run_path)
    found = [p for p in run_files(path) if p.exists()]
    if not found:
        return None
    what = (f"run record {path} already exists" if found[0] == path
            else f"run record {path} is gone but its checkpoint {found[0]} exists")
    return (f"{what}; pass {OVERWRITE_FLAG} to start afresh over it (the old files are kept as "
            f"*{REPLACED_SUFFIX} until the new run finishes), --resume {path} to continue it, or "
            f"--set run.out=\"OTHER.h5\" to write a new run")


def set_aside(run_path: str | os.PathLike[str]) -> list[Path]:
    """Rename the files of the run at ``run_path`` to ``<name>.replaced`` (rank 0).

    Files set aside by an earlier overwrite are deleted first, so what lies aside is always one
    run's files; nothing is touched when the run has no files. The directory is fsynced, so the
    renames are on disk before the new run file is created.

    Returns
    -------
    list of Path
        The files as they are now named.
    """
    found = [p for p in run_files(run_path) if p.exists()]
    if not found:
        return []
    drop_replaced(run_path)
    moved = []
    for path in found:
        os.replace(path, _aside(path))
        moved.append(_aside(path))
    fsync_path(Path(run_path).parent, directory=True)
    _log.warning("hflmpi: %s: starting afresh; the old run's files are kept as %s until the new "
                 "run finishes", run_path, ", ".join(p.name for p in moved))
    return moved


def drop_replaced(run_path: str | os.PathLike[str]) -> list[Path]:
    """Delete the files :func:`set_aside` kept for the run at ``run_path``; return those deleted.

    Never raises: the new run is complete, so a file that cannot be deleted is only a warning.
    """
    dropped = []
    for path in map(_aside, run_files(run_path)):
        try:
            if path.exists():
                path.unlink()
                dropped.append(path)
        except OSError as exc:
            _log.warning("hflmpi: warning: the replaced run's file %s stays: %s", path,
                         describe_os_error(exc))
    return dropped
