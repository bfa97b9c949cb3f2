"""The durable "checkpointed for preemption" marker a job script trusts (rank 0, plain files).

After the preemption checkpoint is on disk, rank 0 writes ``RUN.h5.preempted``; the job script
requeues on exit code 75 *or* this marker, so a step whose exit code was lost in a race (a sibling
task killed by srun) is still requeued. A run removes the marker when it starts again, so a real
failure is never requeued forever.
"""

from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from hflmpi.record.checkpoint import fsync_path

__all__ = ["MARKER_SUFFIX", "marker_path", "write_marker", "read_marker", "clear_marker"]

MARKER_SUFFIX = ".preempted"


def marker_path(run_path: str | os.PathLike[str]) -> Path:
    """Return the preemption marker of a run: the run file's path plus ``.preempted``.

    ``runs/job-42.h5`` gives ``runs/job-42.h5.preempted`` (a job script can spell it the same way:
    ``"$RUN.preempted"``).
    """
    return Path(os.fspath(run_path) + MARKER_SUFFIX)


def write_marker(
    run_path: str | os.PathLike[str], *, round: int, checkpoint: str | os.PathLike[str],
    signal_name: str,
) -> Path:
    """Durably record that the run stopped on a signal after checkpointing ``round`` (rank 0).

    Call it only after the checkpoint itself is on disk (``save_checkpoint`` fsyncs the file and
    its directory). The marker is written to a temporary file, fsynced and renamed into place, so
    a job script never sees half of it.

    Returns
    -------
    Path
        The marker written.
    """
    target = marker_path(run_path)
    tmp = target.with_name(target.name + ".tmp")
    text = json.dumps({
        "round": int(round),
        "checkpoint": Path(checkpoint).name,
        "signal": signal_name,
        "written": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }, sort_keys=True)
    try:
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(text + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_path(target.parent, directory=True)
    return target


def read_marker(run_path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """Return the preemption marker of a run as a dict, or None when there is none."""
    try:
        text = marker_path(run_path).read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    value = json.loads(text)
    return value if isinstance(value, dict) else None


def clear_marker(run_path: str | os.PathLike[str]) -> None:
    """Remove the preemption marker of a run, if any (rank 0, when the run starts again)."""
    target = marker_path(run_path)
    if target.exists():
        target.unlink(missing_ok=True)
        fsync_path(target.parent, directory=True)
