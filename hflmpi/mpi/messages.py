"""Typed messages between ranks: fixed-layout numpy buffers, validated on receipt.

mpi4py's lower-case methods (``bcast``, ``gather``, ``allreduce``, ... of Python objects) pickle
the object on the sending rank and unpickle it on the receiving one, and unpickling runs whatever
code the sender chose: one faulty or compromised rank could execute code on every other. hflmpi
therefore moves nothing between ranks but buffers of known dtype and size (the upper-case
collectives), and this module is the one place where small control messages (texts, integers, weights, public keys,
per-rank checkpoint state) are packed into such buffers and checked when they arrive.

Every receiver validates lengths, dtypes, shapes and value ranges before using a message. A
message that fails (or a sender that cannot pack its value) raises :class:`MessageError` on every
rank of the communicator, naming the rank that sent it: the local verdicts are agreed with one
4-byte ``MAX`` ``Allreduce`` before anyone raises, so no rank is left waiting in the next
collective. Each helper is collective over ``comm`` and all ranks must pass the same keyword
arguments (bounds, ``root``, sizes).

Wire layouts (numpy native byte order; MPI converts between hosts):

========================  =====================================================================
helper                    buffers, in order
========================  =====================================================================
agreement                 int32 flag (MAX); on failure int64 length + uint8[1024] report per rank
``allgather_text``        int64 length per rank (-1 = ``None``), uint8[max_bytes] per rank
``bcast_texts``           int64[2] (count, total bytes), then int64[count] lengths, uint8[total]
``bcast_int``             int64[1]
``allreduce_float/int``   float64[1] / int64[1]
``allgather_int64``       int64[n] per rank
``allgather_bigint``      uint8[nbytes] per rank, big-endian unsigned
``gather_float``          float64[1] per rank
array header              int64[2 + 4]: dtype code (0 = no array), ndim, dims (unused ones 0)
``bcast_array``           header, then the data
``scatter_array``         header of one row, then one row per rank (``Scatter``)
``gather_array``          one header per rank (``Gather``), then one row per rank (``Gather``)
========================  =====================================================================

Array dtypes come from a fixed list (:data:`DTYPES`); sizes are bounded by ``max_elements`` before
any receive buffer is allocated.

The agreement on a verdict (:func:`agree_valid`, :class:`MessageError`) lives in
:mod:`hflmpi.mpi.agreement`, the array helpers in :mod:`hflmpi.mpi.arrays`; both are re-exported
here, so ``from hflmpi.mpi.messages import ...`` reaches every helper of the table.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from mpi4py import MPI

from hflmpi.mpi.agreement import MessageError, agree_valid, who
from hflmpi.mpi.arrays import DTYPES, bcast_array, gather_array, scatter_array

__all__ = [
    "ERROR_TEXT_BYTES",
    "DTYPES",
    "MessageError",
    "agree_valid",
    "allgather_text",
    "bcast_texts",
    "bcast_text",
    "bcast_int",
    "allreduce_float",
    "allreduce_int",
    "allgather_int64",
    "allgather_bigint",
    "gather_float",
    "bcast_array",
    "scatter_array",
    "gather_array",
]

_INT64 = (-(2**63), 2**63 - 1)
ERROR_TEXT_BYTES = 4096  # longest error text one rank shares with the others; longer ones are cut


def _short(value: int) -> str:
    text = f"{value:#x}"
    return text if len(text) <= 20 else f"{text[:10]}...{text[-6:]} ({value.bit_length()} bits)"


# ---------------------------------------------------------------------------------------------
# Texts


def allgather_text(
    comm: MPI.Comm, text: str | None, *, max_bytes: int, what: str, strict: bool = False
) -> list[str | None]:
    """Give every rank every rank's text (or ``None``), UTF-8 in a fixed ``max_bytes`` slot.

    Collective. A longer text is cut to ``max_bytes`` (at a character boundary, ending in
    ``"..."``), or, with ``strict``, is an error. Received lengths must lie in
    ``[-1, max_bytes]``; bytes that are not UTF-8 are replaced. With ``strict``, ``None``,
    over-long texts and bytes that are not UTF-8 are errors.

    Returns
    -------
    list of str or None
        Indexed by rank.
    """
    size, me = comm.Get_size(), comm.Get_rank()
    own = problem = None
    data = b""
    if text is not None:
        data = text.encode("utf-8")
        if len(data) > max_bytes:
            if strict:
                own = (f"{who(comm, me)} has a text of {len(data)} bytes ({text[:40]!r}...), "
                           f"more than the {max_bytes} allowed; shorten it")
                data = b""
            else:
                data = data[: max(0, max_bytes - 3)].decode("utf-8", errors="ignore").encode() + b"..."
                data = data[:max_bytes]
    mine = np.zeros(max_bytes, dtype=np.uint8)
    mine[: len(data)] = np.frombuffer(data, dtype=np.uint8)
    lengths = np.empty(size, dtype=np.int64)
    rows = np.empty((size, max_bytes), dtype=np.uint8)
    comm.Allgather(np.array([-1 if text is None else len(data)], dtype=np.int64), lengths)
    comm.Allgather(mine, rows)
    texts: list[str | None] = []
    if strict and text is None:
        own = f"{who(comm, me)} has no text to send"
    shortest = 0 if strict else -1
    for rank in range(size):
        n = int(lengths[rank])
        if not shortest <= n <= max_bytes:
            problem = problem or (f"{who(comm, rank)} sent a text length of {n}, outside "
                                  f"[{shortest}, {max_bytes}]")
            texts.append(None)
            continue
        raw = rows[rank, :n].tobytes() if n >= 0 else None
        if raw is not None and strict:
            try:
                texts.append(raw.decode("utf-8"))
            except UnicodeDecodeError as exc:
                problem = problem or (f"{who(comm, rank)} sent a text that is not UTF-8 "
                                      f"({exc.reason} at byte {exc.start})")
                texts.append(None)
            continue
        texts.append(None if raw is None else raw.decode("utf-8", errors="replace"))
    agree_valid(comm, problem, what, own=own)
    return texts


def bcast_texts(
    comm: MPI.Comm, texts: Sequence[str] | None, *, root: int = 0, max_count: int, max_bytes: int,
    what: str,
) -> list[str]:
    """Broadcast ``root``'s list of texts (UTF-8, at most ``max_count`` texts and ``max_bytes`` in all).

    Collective; non-root ranks pass ``None``. Bytes that are not UTF-8 are replaced.
    """
    me = comm.Get_rank()
    own = problem = None
    header = np.zeros(2, dtype=np.int64)
    blobs: list[bytes] = []
    if me == root:
        blobs = [t.encode("utf-8") for t in texts or ()]
        total = sum(len(b) for b in blobs)
        if len(blobs) > max_count or total > max_bytes:
            own = (f"{who(comm, root)} has {len(blobs)} texts of {total} bytes, more than the "
                       f"{max_count} texts / {max_bytes} bytes allowed")
            blobs = []
        header[:] = (len(blobs), sum(len(b) for b in blobs))
    comm.Bcast(header, root=root)
    count, total = int(header[0]), int(header[1])
    if not (0 <= count <= max_count and 0 <= total <= max_bytes):
        problem = (f"{who(comm, root)} announced {count} texts of {total} bytes, outside "
                   f"[0, {max_count}] texts and [0, {max_bytes}] bytes")
    agree_valid(comm, problem, what, own=own)
    lengths = np.array([len(b) for b in blobs], dtype=np.int64) if me == root \
        else np.empty(count, dtype=np.int64)
    payload = np.frombuffer(b"".join(blobs), dtype=np.uint8).copy() if me == root \
        else np.empty(total, dtype=np.uint8)
    comm.Bcast(lengths, root=root)
    comm.Bcast(payload, root=root)
    if bool((lengths < 0).any()) or int(lengths.sum()) != total:
        problem = (f"{who(comm, root)} sent text lengths {lengths.tolist()[:8]} that do not add "
                   f"up to the announced {total} bytes")
    agree_valid(comm, problem, what)
    bounds = np.concatenate([[0], np.cumsum(lengths)])
    raw = payload.tobytes()
    return [raw[a:b].decode("utf-8", errors="replace") for a, b in zip(bounds[:-1], bounds[1:])]


def bcast_text(
    comm: MPI.Comm, text: str | None, *, root: int = 0, max_bytes: int, what: str
) -> str | None:
    """Broadcast ``root``'s text or ``None`` (collective; the other ranks' ``text`` is ignored)."""
    mine = None if comm.Get_rank() != root else ([] if text is None else [text])
    texts = bcast_texts(comm, mine, root=root, max_count=1, max_bytes=max_bytes, what=what)
    return texts[0] if texts else None


# ---------------------------------------------------------------------------------------------
# Numbers


def bcast_int(
    comm: MPI.Comm, value: int | None, *, root: int = 0, low: int = _INT64[0],
    high: int = _INT64[1], what: str,
) -> int:
    """Broadcast ``root``'s integer, which must lie in ``[low, high]`` (collective)."""
    own = problem = None
    buf = np.array([max(low, _INT64[0])], dtype=np.int64)
    if comm.Get_rank() == root:
        if value is None or not low <= value <= high or not _INT64[0] <= value <= _INT64[1]:
            own = f"{who(comm, root)} has the value {value!r}, outside [{low}, {high}]"
        else:
            buf[0] = value
    comm.Bcast(buf, root=root)
    got = int(buf[0])
    if not low <= got <= high:
        problem = f"{who(comm, root)} sent {got}, outside [{low}, {high}]"
    agree_valid(comm, problem, what, own=own)
    return got


def allreduce_float(comm: MPI.Comm, value: float, op: MPI.Op = MPI.SUM) -> float:
    """Reduce one float64 per rank with ``op`` and return the result on every rank (collective)."""
    buf = np.array([value], dtype=np.float64)
    comm.Allreduce(MPI.IN_PLACE, buf, op=op)
    return float(buf[0])


def allreduce_int(comm: MPI.Comm, value: int, op: MPI.Op = MPI.SUM) -> int:
    """Reduce one int64 per rank with ``op`` and return the result on every rank (collective)."""
    buf = np.array([value], dtype=np.int64)
    comm.Allreduce(MPI.IN_PLACE, buf, op=op)
    return int(buf[0])


def allgather_int64(
    comm: MPI.Comm, values: Sequence[int], *, low: Sequence[int], high: Sequence[int], what: str
) -> np.ndarray:
    """Give every rank every rank's ``len(low)`` integers; column ``j`` must lie in ``[low[j], high[j]]``.

    Returns
    -------
    numpy.ndarray
        int64 ``[size, len(low)]``, row ``r`` from rank ``r``.
    """
    width = len(low)
    mine = np.asarray(values, dtype=np.int64)
    own = problem = None
    if mine.shape != (width,):
        own = f"{who(comm, comm.Get_rank())} has {mine.size} values, not {width}"
        mine = np.asarray(low, dtype=np.int64)
    rows = np.empty((comm.Get_size(), width), dtype=np.int64)
    comm.Allgather(mine, rows)
    lo, hi = np.asarray(low, dtype=np.int64), np.asarray(high, dtype=np.int64)
    bad = np.argwhere((rows < lo) | (rows > hi))
    if len(bad):
        rank, column = (int(x) for x in bad[0])
        problem = (f"{who(comm, rank)} sent {int(rows[rank, column])} as value {column}, outside "
                   f"[{low[column]}, {high[column]}]")
    agree_valid(comm, problem, what, own=own)
    return rows


def allgather_bigint(
    comm: MPI.Comm, value: int, *, nbytes: int, low: int, high: int, what: str
) -> list[int]:
    """Give every rank every rank's non-negative integer, ``nbytes`` big-endian bytes each.

    Collective. Every received value must lie in ``[low, high]`` (e.g. a Diffie-Hellman public key
    in ``[2, p - 2]`` with ``nbytes`` the byte length of ``p``).
    """
    own = problem = None
    if not 0 <= value < 256**nbytes:
        own = (f"{who(comm, comm.Get_rank())} has a value of {value.bit_length()} bits, more "
               f"than {8 * nbytes}")
        value = low if 0 <= low < 256**nbytes else 0
    mine = np.frombuffer(value.to_bytes(nbytes, "big"), dtype=np.uint8).copy()
    rows = np.empty((comm.Get_size(), nbytes), dtype=np.uint8)
    comm.Allgather(mine, rows)
    values = [int.from_bytes(row.tobytes(), "big") for row in rows]
    for rank, got in enumerate(values):
        if problem is None and not low <= got <= high:
            problem = f"{who(comm, rank)} sent {_short(got)}, outside [{_short(low)}, {_short(high)}]"
    agree_valid(comm, problem, what, own=own)
    return values


def gather_float(
    comm: MPI.Comm, value: float, *, root: int = 0, low: float = 0.0, what: str
) -> list[float] | None:
    """Gather one float per rank to ``root``; each must be finite and ``>= low`` (collective).

    Returns the values (indexed by rank) on ``root``, ``None`` elsewhere.
    """
    mine = np.array([value], dtype=np.float64)
    values = np.empty(comm.Get_size(), dtype=np.float64) if comm.Get_rank() == root else None
    comm.Gather(mine, values, root=root)
    problem = None
    if values is not None:
        for rank, got in enumerate(values.tolist()):
            if not (math.isfinite(got) and got >= low):
                problem = f"{who(comm, rank)} sent {got}; it must be finite and >= {low}"
                break
    agree_valid(comm, problem, what)
    return None if values is None else values.tolist()
