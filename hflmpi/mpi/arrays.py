"""Typed array messages between ranks: a fixed header, then the data, validated on receipt.

The array helpers of :mod:`hflmpi.mpi.messages` (which re-exports them; see its wire table):
``bcast_array``, ``scatter_array`` and ``gather_array`` send an int64 header (dtype code from
:data:`DTYPES`, ndim, dims) before the data, and every receiver checks the dtype, the shape and the
element bound ``max_elements`` before it allocates a receive buffer. A bad header raises
:class:`~hflmpi.mpi.agreement.MessageError` on every rank (:func:`~hflmpi.mpi.agreement.agree_valid`).
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import numpy.typing as npt
from mpi4py import MPI

from hflmpi.mpi.agreement import agree_valid, who

__all__ = ["DTYPES", "bcast_array", "scatter_array", "gather_array"]

#: Array dtypes a message may carry, by wire code (0 means "no array").
DTYPES: dict[int, np.dtype] = {
    1: np.dtype(np.uint8),
    2: np.dtype(np.int32),
    3: np.dtype(np.int64),
    4: np.dtype(np.float32),
    5: np.dtype(np.float64),
}
_CODE_OF = {dtype: code for code, dtype in DTYPES.items()}
_MAX_NDIM = 4
_HEADER = 2 + _MAX_NDIM


def _contiguous(array: np.ndarray) -> np.ndarray:
    """Return ``array`` C-contiguous (a copy only if needed), keeping 0-d arrays 0-d."""
    return np.require(np.asarray(array), requirements="C")


def _header(array: np.ndarray | None) -> tuple[np.ndarray, str | None]:
    """Return the wire header of ``array`` (code 0 for ``None``) and a problem if it cannot be sent."""
    header = np.zeros(_HEADER, dtype=np.int64)
    if array is None:
        return header, None
    code = _CODE_OF.get(array.dtype)
    if code is None or array.ndim > _MAX_NDIM:
        return header, (f"an array of dtype {array.dtype} with {array.ndim} dimensions cannot be "
                        f"sent (dtypes {[str(d) for d in DTYPES.values()]}, at most {_MAX_NDIM} dims)")
    header[0], header[1] = code, array.ndim
    header[2: 2 + array.ndim] = array.shape
    return header, None


def _read_header(
    header: np.ndarray, *, max_elements: int, dtypes: Sequence[npt.DTypeLike] | None,
    shape: Sequence[int | None] | None,
) -> tuple[np.dtype | None, tuple[int, ...], str | None]:
    """Validate a received header; return ``(dtype or None for "no array", shape, problem)``."""
    code, ndim = int(header[0]), int(header[1])
    if code == 0 and not header[1:].any():
        return None, (), None
    if code not in DTYPES:
        return None, (), f"dtype code {code}, not one of {sorted(DTYPES)}"
    dtype = DTYPES[code]
    if dtypes is not None and dtype not in [np.dtype(d) for d in dtypes]:
        return None, (), f"an array of dtype {dtype}, not one of {[str(np.dtype(d)) for d in dtypes]}"
    if not 0 <= ndim <= _MAX_NDIM or header[2 + ndim:].any():
        return None, (), f"a header with ndim {ndim} and dims {header[2:].tolist()}"
    dims = tuple(int(d) for d in header[2: 2 + ndim])
    if any(d < 0 for d in dims) or math.prod(dims) > max_elements:
        return None, (), f"an array of shape {dims}, more than {max_elements} elements or negative"
    if shape is not None and (len(shape) != ndim
                              or any(w is not None and w != d for w, d in zip(shape, dims))):
        expected = tuple("any" if w is None else w for w in shape)
        return None, (), f"an array of shape {dims}, expected {expected}"
    return dtype, dims, None


def _describe(header: np.ndarray) -> str:
    """Say what an (unvalidated) header announces, for error messages."""
    code, ndim = int(header[0]), int(header[1])
    if code == 0 and not header[1:].any():
        return "no array"
    dtype = DTYPES[code] if code in DTYPES else f"dtype code {code}"
    dims = header[2: 2 + ndim].tolist() if 0 <= ndim <= _MAX_NDIM else header[2:].tolist()
    return f"a {dtype} array of shape {tuple(dims)}"


def bcast_array(
    comm: MPI.Comm, array: np.ndarray | None, *, root: int = 0, max_elements: int,
    dtypes: Sequence[npt.DTypeLike] | None = None, shape: Sequence[int | None] | None = None, what: str,
) -> np.ndarray:
    """Broadcast ``root``'s array (the other ranks pass ``None``); return it on every rank.

    Collective. The dtype must be in :data:`DTYPES` (and in ``dtypes`` when given), the element
    count at most ``max_elements``, and the shape ``shape`` where given (``None`` entries are free).
    """
    own = problem = None
    data = None
    header = np.zeros(_HEADER, dtype=np.int64)
    if comm.Get_rank() == root:
        if array is None:
            own = f"{who(comm, root)} has no array to broadcast"
        else:
            data = _contiguous(array)
            header, local = _header(data)
            own = None if local is None else f"{who(comm, root)}: {local}"
    comm.Bcast(header, root=root)
    dtype, dims, bad = _read_header(header, max_elements=max_elements, dtypes=dtypes, shape=shape)
    if bad is None and dtype is None:
        bad = "no array"
    if bad is not None:
        problem = f"{who(comm, root)} sent {bad}"
    agree_valid(comm, problem, what, own=own)
    assert dtype is not None
    if data is None:
        data = np.empty(dims, dtype=dtype)
    comm.Bcast(data, root=root)
    return data


def scatter_array(
    comm: MPI.Comm, stacked: np.ndarray | None, *, root: int = 0, max_elements: int,
    dtypes: Sequence[npt.DTypeLike] | None = None, shape: Sequence[int | None] | None = None, what: str,
) -> np.ndarray | None:
    """Send row ``r`` of ``root``'s ``stacked`` (leading axis = ranks) to rank ``r``.

    Collective; the other ranks' ``stacked`` is ignored. ``root`` passing ``None`` gives ``None``
    everywhere. ``max_elements``, ``dtypes`` and ``shape`` constrain one row.
    """
    own = problem = None
    data = None
    header = np.zeros(_HEADER, dtype=np.int64)
    if comm.Get_rank() == root and stacked is not None:
        data = _contiguous(stacked)
        if data.ndim < 1 or data.shape[0] != comm.Get_size():
            own = (f"{who(comm, root)} has an array of shape {data.shape} to scatter, whose "
                   f"leading axis is not the {comm.Get_size()} ranks")
        else:
            header, local = _header(data[0])
            own = None if local is None else f"{who(comm, root)}: {local}"
    comm.Bcast(header, root=root)
    dtype, dims, bad = _read_header(header, max_elements=max_elements, dtypes=dtypes, shape=shape)
    if bad is not None:
        problem = f"{who(comm, root)} sent {bad}"
    agree_valid(comm, problem, what, own=own)
    if dtype is None:
        return None
    row = np.empty(dims, dtype=dtype)
    comm.Scatter(data, row, root=root)
    return row


def gather_array(
    comm: MPI.Comm, array: np.ndarray | None, *, root: int = 0, max_elements: int,
    dtypes: Sequence[npt.DTypeLike] | None = None, shape: Sequence[int | None] | None = None, what: str,
) -> np.ndarray | None:
    """Stack every rank's array at ``root`` (leading axis = ranks).

    Collective. Every rank must send the same dtype and shape as ``root`` (or all ``None``, which
    gives ``None``); ``max_elements``, ``dtypes`` and ``shape`` constrain one rank's array.

    Returns
    -------
    numpy.ndarray or None
        ``[size, *shape]`` on ``root``; ``None`` elsewhere (and everywhere when all sent ``None``).
    """
    me, size = comm.Get_rank(), comm.Get_size()
    data = None if array is None else _contiguous(array)
    header, local = _header(data)
    own = None if local is None else f"{who(comm, me)}: {local}"
    problem = None
    headers = np.empty((size, _HEADER), dtype=np.int64) if me == root else None
    comm.Gather(header, headers, root=root)
    dtype: np.dtype | None = None
    dims: tuple[int, ...] = ()
    if headers is not None:
        dtype, dims, bad = _read_header(headers[root], max_elements=max_elements, dtypes=dtypes,
                                        shape=shape)
        if bad is not None:
            problem = f"{who(comm, root)} has {bad}"
        for rank in range(size):
            if problem is None and not np.array_equal(headers[rank], headers[root]):
                problem = (f"{who(comm, rank)} sent {_describe(headers[rank])} but "
                           f"{who(comm, root)} has {_describe(headers[root])}")
    agree_valid(comm, problem, what, own=own)
    if data is None:  # every rank sent None (agreed above)
        return None
    if headers is None:
        comm.Gather(data, None, root=root)
        return None
    assert dtype is not None
    out = np.empty((size, *dims), dtype=dtype)
    comm.Gather(data, out, root=root)
    return out
