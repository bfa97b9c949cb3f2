"""Catch the signals a batch system sends before it stops a job, so the job can checkpoint first.

Slurm sends ``SIGTERM`` when a job is preempted or hits its time limit (then ``SIGKILL`` after
``KillWait``), and ``--signal=USR1@120`` asks it to send ``SIGUSR1`` 120 s ahead. A signal only
raises a flag; the training loop polls it once per global round with one tiny MAX allreduce, so
every rank stops after the same round, writes one checkpoint and exits with
:data:`EXIT_PREEMPTED`. The job script then requeues itself, and ``hflmpi run --resume-if-exists``
continues from the checkpoint.

Two things keep that path safe on a busy machine, where the ranks do not finish at the same moment:

- :func:`leave_together`: every rank agrees on the exit code and waits for the others before it
  exits. Under ``srun`` (``KillOnBadExit``) the first task to exit non-zero gets its siblings
  killed with ``SIGTERM``, and the step then ends 143 instead of 75 (or 2).
- A durable marker ``<run file>.preempted`` (:func:`write_marker`), written by rank 0 once the
  checkpoint is on disk. A job script requeues when it exists, whatever exit code a race left.
  The run removes it when it starts again (:func:`clear_marker`), so a real failure later is not
  requeued forever.
"""

from __future__ import annotations

import logging
import signal
import time
from types import FrameType

import numpy as np
from mpi4py import MPI

__all__ = [
    "EXIT_PREEMPTED",
    "EXIT_WAIT_SECONDS",
    "PreemptionFlag",
    "leave_together",
]

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: "try again later", what a requeued job is
EXIT_WAIT_SECONDS = 60.0  # how long a rank waits at the exit for the others (see leave_together)
_STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


_log = logging.getLogger(__name__)  # notices; the command line shows them on stderr

class PreemptionFlag:
    """Record ``SIGUSR1``/``SIGTERM`` (by default) instead of dying on them.

    Parameters
    ----------
    signals : tuple of signal.Signals
        Signals to catch. The previous handlers are restored by :meth:`restore`.
    """

    def __init__(self, signals: tuple[signal.Signals, ...] = _STOP_SIGNALS) -> None:
        self.received: signal.Signals | None = None
        self._previous = {sig: signal.signal(sig, self._handle) for sig in signals}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.received = signal.Signals(signum)

    def requested(self, comm: MPI.Comm) -> bool:
        """Tell every rank whether any rank got a signal (collective: all ranks)."""
        flag = np.array([1 if self.received is not None else 0], dtype=np.int32)
        comm.Allreduce(MPI.IN_PLACE, flag, op=MPI.MAX)
        return bool(flag[0])

    def restore(self) -> None:
        """Put the previous signal handlers back."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}


def leave_together(comm: MPI.Comm, code: int, timeout: float = EXIT_WAIT_SECONDS) -> int:
    """Agree on one exit code with every rank, and return it once every rank is leaving.

    All ranks of ``comm``; give it a communicator of its own (``Dup`` it at the start), so that a
    rank that arrives here early can never be matched with another rank's training collective.
    From the call on, ``SIGTERM`` and ``SIGUSR1`` are ignored: the process is about to exit, and
    under ``srun`` with ``KillOnBadExit`` a sibling that exits a moment earlier with 75 or 2 gets
    this rank sent ``SIGTERM``, which would turn the step's exit code into 143. Call it only on
    the way out of the process (the ``hflmpi`` command line does).

    Parameters
    ----------
    comm : MPI.Comm
        A communicator used for nothing else, over the ranks that leave together.
    code : int
        This rank's exit code.
    timeout : float
        Seconds to wait for the other ranks. A rank that stops alone (say a config file it alone
        could not read) must not wait forever: after ``timeout`` it returns ``code`` and leaves.

    Returns
    -------
    int
        The largest exit code over all ranks (0 only if every rank succeeded), or this rank's
        own code after a timeout. ``comm`` is freed when the agreement completed.
    """
    for sig in _STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    mine = np.array([code], dtype=np.int32)
    agreed = np.zeros(1, dtype=np.int32)
    request = comm.Iallreduce(mine, agreed, op=MPI.MAX)
    deadline = time.monotonic() + timeout
    while not request.Test():
        if time.monotonic() > deadline:
            _log.warning("hflmpi: rank %d: the other ranks did not reach the exit within %g s; "
                         "leaving alone with exit code %d", comm.Get_rank(), timeout, code)
            return code
        time.sleep(0.002)
    comm.Free()
    return int(agreed[0])
