"""Leaving together and the preemption marker (hflmpi.mpi.preempt).

Under srun with KillOnBadExit, a rank that exits 75 (or 2) before its siblings gets them killed
with SIGTERM and the step ends 143, so the job would not requeue. :func:`leave_together` must not
let any rank past it before every rank has arrived, must give every rank the same code, and must
not wait forever for a rank that never comes. The marker is the durable "checkpointed for
preemption" note a job script trusts when a race still spoils the exit code.
"""

from __future__ import annotations

import json
import signal

import pytest
from conftest import parallel_assert

mpi4py = pytest.importorskip("mpi4py")
from mpi4py import MPI  # noqa: E402

from hflmpi.mpi.preempt import EXIT_PREEMPTED, leave_together  # noqa: E402
from hflmpi.record.marker import clear_marker, marker_path, read_marker, write_marker  # noqa: E402

_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


@pytest.fixture
def keep_signal_handlers():
    """leave_together ignores SIGTERM/SIGUSR1 for good (its process is exiting): undo that."""
    before = {sig: signal.getsignal(sig) for sig in _SIGNALS}
    yield
    for sig, handler in before.items():
        signal.signal(sig, handler)


@pytest.fixture
def shared_dir(tmp_path_factory):
    comm = MPI.COMM_WORLD
    path = comm.bcast(str(tmp_path_factory.mktemp("leave")) if comm.Get_rank() == 0 else None)
    return path


@pytest.mark.mpi(min_size=1)
def test_no_rank_leaves_before_the_last_one_arrives(shared_dir, keep_signal_handlers):
    """The last rank writes a file just before it calls leave_together: every rank must see that
    file once it is past (a barrier, not a race). All ranks get the largest code."""
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    note = f"{shared_dir}/last-rank-arrived"
    leaving = comm.Dup()
    if rank == size - 1:
        with open(note, "w", encoding="utf-8") as handle:
            handle.write("here")
    code = leave_together(leaving, EXIT_PREEMPTED if rank == size - 1 else 0, timeout=600)
    seen = open(note, encoding="utf-8").read() if _exists(note) else None
    parallel_assert(comm, seen == "here", f"rank {rank} left before the last rank arrived")
    parallel_assert(comm, code == EXIT_PREEMPTED, f"rank {rank} got exit code {code}")
    ignored = all(signal.getsignal(sig) == signal.SIG_IGN for sig in _SIGNALS)
    parallel_assert(comm, ignored, f"rank {rank} still acts on SIGTERM/SIGUSR1 while leaving")


@pytest.mark.mpi(min_size=2)
def test_a_rank_left_alone_leaves_after_the_timeout(keep_signal_handlers, caplog):
    """Rank 0 arrives alone (the others are elsewhere): it must give up after the timeout with its
    own code and say so; the others, arriving later, still complete the agreement."""
    comm = MPI.COMM_WORLD
    rank = comm.Get_rank()
    leaving = comm.Dup()
    code = None
    if rank == 0:
        code = leave_together(leaving, 2, timeout=0.5)
    comm.Barrier()  # the others reach leave_together only after rank 0 gave up
    if rank != 0:
        code = leave_together(leaving, 0, timeout=600)
    parallel_assert(comm, code == 2, f"rank {rank} got exit code {code}")
    said = caplog.text  # the library's notice (the command line shows it on stderr)
    parallel_assert(comm, rank != 0 or "did not reach the exit within 0.5 s" in said,
                    f"rank 0 did not say why it left alone: {said!r}")


def _exists(path: str) -> bool:
    try:
        open(path, encoding="utf-8").close()
        return True
    except FileNotFoundError:
        return False


# -- the marker (serial) -------------------------------------------------------------------------
def test_marker_round_trip_and_clear(tmp_path):
    run = tmp_path / "runs" / "job-7.h5"
    run.parent.mkdir()
    assert marker_path(run) == tmp_path / "runs" / "job-7.h5.preempted"  # "$RUN.preempted"
    assert read_marker(run) is None
    written = write_marker(run, round=12, checkpoint=tmp_path / "runs" / "job-7.ckpt.h5",
                           signal_name="SIGUSR1")
    assert written == marker_path(run)
    stored = json.loads(written.read_text(encoding="utf-8"))
    assert {k: stored[k] for k in ("round", "checkpoint", "signal")} == \
        {"round": 12, "checkpoint": "job-7.ckpt.h5", "signal": "SIGUSR1"}
    assert read_marker(run)["round"] == 12
    assert sorted(p.name for p in run.parent.iterdir()) == ["job-7.h5.preempted"]  # no .tmp
    clear_marker(run)
    clear_marker(run)  # idempotent
    assert read_marker(run) is None and not written.exists()
