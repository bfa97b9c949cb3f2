"""Check once at set-up that the MPI library sums integers exactly where hflmpi relies on it.

The quantized uplink (:mod:`hflmpi.mpi.uplink`) sums integer levels, or masked residues on a
secure layer, with ``Reduce(SUM)`` in a container sized from the fan-in so that no sum or partial
sum overflows. Exactness then only needs MPI's integer ``SUM`` to be an exact sum of in-range
values, which every correct library gives (what a library does on overflow, wrapping or, like
Open MPI 5's vectorised 8- and 16-bit kernels, saturating, no longer matters). Still, a wrong
result would silently train a wrong model, so :func:`check_integer_sum` reduces a known pattern
with the very collective, datatype, communicator and operation the layer uses, and compares
with the exact sum computed in numpy int64:

* every participant adds values of the layer's range ``[low, high]``: the per-element extremes
  (all at ``high``: the largest sum the layer can produce; all at ``low``; alternating), then
  uniform draws, over 259 elements (several 64-element vector blocks and a scalar tail);
* rank 0 (the uplink's root) compares and broadcasts its verdict, so every rank raises the same
  :class:`InexactSumError`, naming the MPI library (first line of ``MPI.Get_library_version()``),
  the datatype, the communicator size and the first wrong element.

One ``Reduce`` and one ``Bcast`` of about 2 KiB per integer-sum layer, once per aggregator.
"""

from __future__ import annotations

import numpy as np
from mpi4py import MPI

from hflmpi.mpi.comm import library_name
from hflmpi.mpi.guard import SetupError

__all__ = ["InexactSumError", "check_integer_sum"]

_ELEMENTS = 4 * 64 + 3  # vector kernels take 64 int8 at a time (AVX-512); 3 more for the tail
_PATTERN_SEED = 0x5EC5


class InexactSumError(SetupError):
    """The MPI library's integer ``SUM`` gave a wrong result on in-range values."""


def _pattern(size: int, low: int, high: int, unsigned: bool = False) -> np.ndarray:
    """Return the ``(size, elements)`` int64 (uint64) contributions: extremes, then uniform draws."""
    rng = np.random.default_rng(_PATTERN_SEED)
    values = rng.integers(low, high, size=(size, _ELEMENTS), endpoint=True,
                          dtype=np.uint64 if unsigned else np.int64)
    ranks = np.arange(size)[:, None]
    values[:, 0:64] = high
    values[:, 64:128] = low
    values[:, 128:192] = np.where(ranks % 2 == 0, high, low)
    values[:, -3:] = [high, low, high]
    return values


def check_integer_sum(
    comm: MPI.Comm, dtype: np.dtype | type, low: int, high: int, *, what: str,
    op: MPI.Op = MPI.SUM,
) -> None:
    """Verify that ``Reduce(op)`` to rank 0 sums ``dtype`` values in ``[low, high]`` exactly.

    Collective over ``comm`` (nothing happens on a communicator of one rank).

    Parameters
    ----------
    comm : MPI.Comm
        The communicator the sums will run on.
    dtype : numpy dtype
        The signed integer container (int8/16/32/64), or uint64: the words of a lanes layer
        (:mod:`hflmpi.core.lanes`), summed as ``MPI_UINT64_T``.
    low, high : int
        The smallest and largest value one rank contributes; ``size * low`` and
        ``size * high`` must fit ``dtype`` (the layer's sizing rule guarantees it).
    what : str
        Names the layer in the error, e.g. ``"layer 1 (8-bit levels, secure)"``.
    op : MPI.Op
        The operation the layer reduces with (``MPI.SUM``; tests inject others).

    Raises
    ------
    ValueError
        If the sums of the range do not fit ``dtype`` (a sizing bug, not the library's fault).
    InexactSumError
        On every rank, if MPI's result differs from the exact sum.
    """
    dtype = np.dtype(dtype)
    size = comm.Get_size()
    info = np.iinfo(dtype)
    unsigned = dtype == np.dtype(np.uint64)
    if dtype.kind != "i" and not unsigned or not (
            info.min <= size * low <= size * high <= info.max):
        raise ValueError(f"sums of {size} values in [{low}, {high}] do not fit {dtype}; "
                         "the container must hold them without overflow")
    if size == 1:
        return
    values = _pattern(size, low, high, unsigned)
    buf = values[comm.Get_rank()].astype(dtype)
    mpi_buf = [buf, MPI.UINT64_T] if unsigned else buf
    # first wrong element, MPI's value, exact value (uint64 bits where unsigned)
    verdict = np.full(3, -1, dtype=np.int64)
    if comm.Get_rank() == 0:
        comm.Reduce(MPI.IN_PLACE, mpi_buf, op=op, root=0)
        exact = values.sum(axis=0)  # no overflow: size * high fits the dtype
        wrong = np.flatnonzero(buf.astype(exact.dtype) != exact)
        if wrong.size:
            found = np.array([buf[wrong[0]], exact[wrong[0]]], dtype=exact.dtype)
            verdict[0] = wrong[0]
            verdict[1:] = found.view(np.int64)
    else:
        comm.Reduce(mpi_buf, None, op=op, root=0)
    comm.Bcast(verdict, root=0)
    if verdict[0] >= 0:
        element = int(verdict[0])
        pair = verdict[1:].view(np.uint64) if unsigned else verdict[1:]
        got, expected = (int(v) for v in pair)
        raise InexactSumError(
            f"{library_name()} does not sum {dtype} integers exactly: a Reduce(SUM) over "
            f"{size} ranks of values in [{low}, {high}] gave {got} instead of {expected} "
            f"(element {element} of a {_ELEMENTS}-element check) for {what}; hflmpi's quantized "
            "aggregation needs exact integer sums: use another MPI library (e.g. MPICH), or "
            'quantize.method = "gather" on layers that are not secure'
        )
