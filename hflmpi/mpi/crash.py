"""One traceback per crash, not one per rank: how an unexpected exception ends the job.

A bug (say in a user model) usually raises on every rank at once, and printing every rank's
traceback buries the one worth reading under ``size`` copies. So when an unexpected exception
reaches ``hflmpi run``:

* rank 0 prints the full traceback and aborts the job at once;
* any other rank prints one line (rank, exception type, message, innermost frame ``file:line``),
  then waits :data:`GRACE_SECONDS` for rank 0 to end the job. If rank 0 has not (it did not fail:
  the bug is this rank's alone), the rank prints its full traceback too and aborts the job itself;
  a failure on one rank therefore always ends the whole job, never hangs it;
* with ``HFLMPI_TRACEBACK=all`` in the environment every rank prints its full traceback at once.

A world of one rank needs none of this: ``hflmpi run`` lets the exception propagate (Python's
own traceback, exit 1, and in-process callers such as tests get the exception).

Errors users cause (config, topology, setup) are reported collectively elsewhere, once, with exit
code 2. Any other :class:`hflmpi.errors.HflmpiError` that reaches here (say a checkpoint that
cannot be written, or a non-finite update the ranks agreed on) already explains itself: rank 0
prints its one line ``hflmpi: error: ...`` instead of a traceback, and the job is aborted as above.
"""

from __future__ import annotations

import sys
import time
import traceback
from typing import Mapping, NoReturn, TextIO

from mpi4py import MPI

from hflmpi.errors import HflmpiError
from hflmpi.mpi.guard import wait_until_read

__all__ = ["EXIT_CRASH", "GRACE_SECONDS", "TRACEBACK_ENV", "crash_summary", "crash_report", "end_job"]

EXIT_CRASH = 1  # the Abort code: a bug, not a user error (2) or a preemption (75)
GRACE_SECONDS = 15.0
TRACEBACK_ENV = "HFLMPI_TRACEBACK"
_MESSAGE_CHARS = 300


def crash_summary(rank: int, exc: BaseException) -> str:
    """Return the one line a rank prints for ``exc``, e.g.

    ``hflmpi: rank 3: ValueError: bad shape (at /home/u/model.py:41 in forward)``.
    """
    message = " ".join(str(exc).split())
    if len(message) > _MESSAGE_CHARS:
        message = message[: _MESSAGE_CHARS - 3] + "..."
    frames = traceback.extract_tb(exc.__traceback__)
    where = f" (at {frames[-1].filename}:{frames[-1].lineno} in {frames[-1].name})" if frames else ""
    kind = type(exc).__qualname__
    return f"hflmpi: rank {rank}: {kind}: {message}{where}" if message else f"hflmpi: rank {rank}: {kind}{where}"


def _traceback(rank: int, exc: BaseException) -> str:
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    return f"hflmpi: rank {rank}: unexpected error, the job ends; traceback:\n{text}"


def crash_report(rank: int, exc: BaseException, env: Mapping[str, str]) -> tuple[str, bool]:
    """Return what ``rank`` prints at once for ``exc``, and whether it should wait for rank 0.

    Pure: rank 0 (and every rank under ``HFLMPI_TRACEBACK=all``) gives the full traceback and
    does not wait; the other ranks give :func:`crash_summary` plus how to see the rest. Rank 0
    gives a user error (:class:`~hflmpi.errors.HflmpiError`) as its one line, no traceback.
    """
    every = env.get(TRACEBACK_ENV, "").strip().lower() == "all"
    if rank == 0 and isinstance(exc, HflmpiError) and not every:
        return f"hflmpi: error: {exc}", False
    if rank == 0 or every:
        return _traceback(rank, exc), False
    hint = (f"; rank 0 prints its traceback (set {TRACEBACK_ENV}=all to print every rank's; this "
            f"rank prints its own if the job has not ended within {GRACE_SECONDS:g} s)")
    return crash_summary(rank, exc) + hint, True


def end_job(comm: MPI.Comm, exc: BaseException, env: Mapping[str, str],
            stream: TextIO | None = None, grace: float = GRACE_SECONDS) -> NoReturn:
    """Report ``exc`` as :func:`crash_report` says and abort every rank of ``comm``.

    Called by one rank alone (no collective: the other ranks may be inside one).
    """
    stream = sys.stderr if stream is None else stream
    rank = comm.Get_rank()
    text, wait = crash_report(rank, exc, env)
    _say(stream, text)
    if wait:
        time.sleep(grace)  # rank 0, if it failed too, aborts the job (and this rank) meanwhile
        _say(stream, f"hflmpi: rank {rank}: the job has not ended within {grace:g} s (rank 0 did "
                     f"not fail, or not yet); rank {rank}'s full traceback:\n"
                     + _traceback(rank, exc).split("\n", 1)[1])
    comm.Abort(EXIT_CRASH)
    raise SystemExit(EXIT_CRASH)  # not reached: Abort does not return


def _say(stream: TextIO, text: str) -> None:
    stream.write(text if text.endswith("\n") else text + "\n")
    stream.flush()
    wait_until_read(stream)  # the launcher must have the text before Abort tears the job down
