"""Catch the signals a batch system sends before it stops a job, so the job can checkpoint first.

Slurm sends ``SIGTERM`` when a job is preempted or hits its time limit (then ``SIGKILL`` after
``KillWait``), and ``--signal=USR1@120`` asks it to send ``SIGUSR1`` 120 s ahead. A signal only
raises a flag; the training loop polls it once per global round with one tiny MAX allreduce, so
every rank stops after the same round, writes one checkpoint and exits with
:data:`EXIT_PREEMPTED`. The job script then requeues itself, and ``hflmpi run --resume-if-exists``
continues from the checkpoint.
"""

from __future__ import annotations

import signal
from types import FrameType

import numpy as np
from mpi4py import MPI

__all__ = ["EXIT_PREEMPTED", "PreemptionFlag"]

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: "try again later", what a requeued job is


class PreemptionFlag:
    """Record ``SIGUSR1``/``SIGTERM`` (by default) instead of dying on them.

    Parameters
    ----------
    signals : tuple of signal.Signals
        Signals to catch. The previous handlers are restored by :meth:`restore`.
    """

    def __init__(self, signals: tuple[signal.Signals, ...] = (signal.SIGUSR1, signal.SIGTERM)) -> None:
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
