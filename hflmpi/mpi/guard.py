"""Keep a bad rank from hanging the job: a handshake before collectives and a watchdog.

* :func:`handshake` is one tiny ``MAX`` allreduce before a data collective: every rank offers a
  63-bit hash of what it is about to send (model signature, step, layer) and a flag for
  non-finite values. If the hashes differ, or a rank holds NaN/Inf, every rank learns it in the
  same call and raises the same error (naming the ranks), instead of some ranks entering a
  collective the others never join.
* :class:`Watchdog` aborts the whole job when one phase (a round's aggregation at some layer)
  takes longer than a timeout, printing which rank stalled where; a hung collective then costs
  minutes of allocation, not days.
"""

from __future__ import annotations

import hashlib
import sys
import threading
import time
from contextlib import contextmanager
from typing import Iterator

import numpy as np
from mpi4py import MPI

__all__ = ["HandshakeError", "NonFiniteUpdateError", "handshake_key", "handshake", "Watchdog"]


class HandshakeError(RuntimeError):
    """Ranks disagree on what the next collective carries."""


class NonFiniteUpdateError(FloatingPointError):
    """At least one rank's model holds NaN or Inf before an aggregation."""


def handshake_key(*parts: object) -> int:
    """Return a 63-bit hash of ``parts`` (their ``repr``), equal on every rank for equal parts."""
    digest = hashlib.blake2b(repr(parts).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def handshake(comm: MPI.Comm, key: int, finite: bool, what: str) -> list[int]:
    """Check that all ranks of ``comm`` agree on ``key``; report ranks whose data is not finite.

    Collective over ``comm`` (one 24-byte allreduce, plus an allgather only on failure).

    Parameters
    ----------
    comm : MPI.Comm
        The ranks about to run the collective.
    key : int
        :func:`handshake_key` of what this rank is about to send.
    finite : bool
        Whether this rank's data is free of NaN/Inf.
    what : str
        Names the collective in error messages, e.g. ``"layer-2 aggregation at step 40"``.

    Returns
    -------
    list of int
        Ranks (of ``comm``) whose data is not finite; empty when all are.

    Raises
    ------
    HandshakeError
        On every rank, if the keys differ.
    """
    probe = np.array([key, -key, 0 if finite else 1], dtype=np.int64)
    comm.Allreduce(MPI.IN_PLACE, probe, op=MPI.MAX)
    mismatch = probe[0] != -probe[1]
    if not mismatch and probe[2] == 0:
        return []
    reports = comm.allgather((key, finite))
    if mismatch:
        groups: dict[int, list[int]] = {}
        for rank, (their_key, _) in enumerate(reports):
            groups.setdefault(their_key, []).append(rank)
        detail = "; ".join(f"ranks {ranks} have key {k:#x}" for k, ranks in groups.items())
        raise HandshakeError(
            f"{what}: ranks disagree on the model layout, step or layer ({detail}); every rank "
            "must run the same config and code version"
        )
    return [rank for rank, (_, ok) in enumerate(reports) if not ok]


class Watchdog:
    """Abort the job when a guarded phase outlives ``timeout`` seconds.

    Parameters
    ----------
    comm : MPI.Comm
        Communicator to abort (the world).
    timeout : float
        Seconds; 0 or less disables the watchdog.
    """

    def __init__(self, comm: MPI.Comm, timeout: float) -> None:
        self.comm = comm
        self.timeout = float(timeout)
        self._phase: str | None = None
        self._deadline = 0.0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if self.timeout > 0:
            self._thread = threading.Thread(target=self._watch, name="hflmpi-watchdog", daemon=True)
            self._thread.start()

    @contextmanager
    def guard(self, phase: str) -> Iterator[None]:
        """Guard the block: if it runs longer than the timeout, abort every rank."""
        with self._lock:
            self._phase, self._deadline = phase, time.monotonic() + self.timeout
        try:
            yield
        finally:
            with self._lock:
                self._phase = None

    def close(self) -> None:
        """Stop watching."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _watch(self) -> None:
        period = min(1.0, self.timeout / 4)
        while not self._stop.wait(period):
            with self._lock:
                phase, late = self._phase, self._phase is not None and time.monotonic() > self._deadline
            if late:
                print(
                    f"hflmpi: watchdog: rank {self.comm.Get_rank()} stalled for more than "
                    f"{self.timeout:g} s in {phase}; aborting the job",
                    file=sys.stderr, flush=True,
                )
                self.comm.Abort(3)
