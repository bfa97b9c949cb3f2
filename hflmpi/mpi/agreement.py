"""Agreement on a message's verdict: every rank raises, or none does (collective).

A receiver that finds a message malformed must not simply raise: the other ranks would wait for it
in their next collective. :func:`agree_valid` agrees the local verdicts with one 4-byte ``MAX``
``Allreduce`` first and, when any rank found a problem, shares the reports (int64 length and
priority plus uint8[1024] per rank, ``Allgather``) so that every rank raises the same
:class:`MessageError`, naming the rank that sent the bad message. Used by the typed messages of
:mod:`hflmpi.mpi.messages` and :mod:`hflmpi.mpi.arrays`.
"""

from __future__ import annotations

import numpy as np
from mpi4py import MPI

from hflmpi.errors import HflmpiError

__all__ = ["MessageError", "agree_valid", "who"]

_REPORT_BYTES = 1024
_FIX = ("every rank must run the same hflmpi version and config; a rank that sends this is faulty "
        "or compromised: check its host and software")


class MessageError(HflmpiError, RuntimeError):
    """A message between ranks failed validation; raised on every rank of the communicator."""


def agree_valid(comm: MPI.Comm, problem: str | None, what: str, *, own: str | None = None) -> None:
    """Raise :class:`MessageError` on every rank if any rank reports a problem (collective).

    Parameters
    ----------
    comm : MPI.Comm
        The ranks that exchanged the message.
    problem : str or None
        What this rank found wrong in a message it received (naming the sender), or ``None``.
    what : str
        The exchange, e.g. ``"exchanging Diffie-Hellman public keys"``; starts the error text.
    own : str or None
        What is wrong with this rank's own message (it could not pack its value). The sender
        knows best, so such a report is shown before the receivers' reports.
    """
    report = own if own is not None else problem
    flag = np.array([0 if report is None else 1], dtype=np.int32)
    comm.Allreduce(MPI.IN_PLACE, flag, op=MPI.MAX)
    if flag[0] == 0:
        return
    reports = _exchange_reports(comm, report, 1 if own is not None else 0)
    found = sorted((-priority, rank, text) for rank, (text, priority) in enumerate(reports)
                   if text is not None)
    if not found:
        raise MessageError(f"{what}: a rank flagged a bad message without describing it; {_FIX}")
    _, rank, text = found[0]
    more = f" and {len(found) - 1} more" if len(found) > 1 else ""
    raise MessageError(f"{what}: {text} (found by {who(comm, rank)}{more}); {_FIX}")


def _exchange_reports(comm: MPI.Comm, report: str | None, priority: int) -> list[tuple[str | None, int]]:
    """Allgather every rank's ``(report, priority)`` (bounded, decoded leniently: only shown)."""
    size = comm.Get_size()
    data = b"" if report is None else report.encode("utf-8")[:_REPORT_BYTES]
    mine = np.zeros(_REPORT_BYTES, dtype=np.uint8)
    mine[: len(data)] = np.frombuffer(data, dtype=np.uint8)
    heads = np.empty((size, 2), dtype=np.int64)
    rows = np.empty((size, _REPORT_BYTES), dtype=np.uint8)
    comm.Allgather(np.array([-1 if report is None else len(data), priority], dtype=np.int64), heads)
    comm.Allgather(mine, rows)
    reports: list[tuple[str | None, int]] = []
    for rank in range(size):
        n, rank_priority = int(heads[rank, 0]), 1 if heads[rank, 1] == 1 else 0
        text = None if n < 0 else rows[rank, : min(n, _REPORT_BYTES)].tobytes().decode(
            "utf-8", errors="replace")
        reports.append((text, rank_priority))
    return reports


def who(comm: MPI.Comm, rank: int) -> str:
    """Name ``rank`` of ``comm`` for an error message (with its world rank when that differs)."""
    group, world = comm.Get_group(), MPI.COMM_WORLD.Get_group()
    try:
        (world_rank,) = MPI.Group.Translate_ranks(group, [rank], world)
    finally:
        group.Free()
        world.Free()
    if world_rank == rank or world_rank == MPI.UNDEFINED:
        return f"rank {rank}"
    return f"rank {rank} (world rank {world_rank})"
