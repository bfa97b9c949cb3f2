"""MPI tests of :mod:`hflmpi.mpi.messages`: typed round trips and malformed messages.

Round trips are compared with plain numpy / Python values every rank computes for itself. A
malformed message is either sent through the public API (a NaN weight, an out-of-range key: the
sender does not check what only receivers can judge) or crafted by hand on one rank from the wire
layout in the module docstring (a wrong length header, a bad array header); in every case each
rank must raise :class:`MessageError` naming the sender, and every rank must leave the call (the
tests run under ``--timeout``, so a hang fails).
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from conftest import parallel_assert

mpi4py = pytest.importorskip("mpi4py")
from mpi4py import MPI  # noqa: E402

from hflmpi.core.secure import MODP_2048_P  # noqa: E402
from hflmpi.mpi import messages  # noqa: E402
from hflmpi.mpi.messages import MessageError  # noqa: E402

WHAT = "testing"


def _raises_everywhere(comm, call, match: str) -> None:
    """Run ``call`` on every rank; every rank must raise MessageError matching ``match``."""
    try:
        call()
    except MessageError as exc:
        import re

        parallel_assert(comm, re.search(match, str(exc)) is not None,
                        f"MessageError {str(exc)!r} does not match {match!r}")
        return
    parallel_assert(comm, False, "no MessageError raised")


# ---------------------------------------------------------------------------------------------
# round trips (any size)


@pytest.mark.mpi
def test_allgather_text_round_trip():
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()

    def text_of(r: int) -> str | None:
        return None if r == 1 else f"ранг {r} ✓ " * r

    got = messages.allgather_text(comm, text_of(rank), max_bytes=256, what=WHAT)  # holds rank 7 (105 bytes)
    parallel_assert(comm, got == [text_of(r) for r in range(size)], f"got {got}")


@pytest.mark.mpi
def test_allgather_text_cuts_long_texts_at_a_character_boundary():
    comm = MPI.COMM_WORLD
    text = "é" * 40  # 80 bytes of UTF-8
    got = messages.allgather_text(comm, text, max_bytes=20, what=WHAT)
    expected = "é" * 8 + "..."  # 17 bytes of characters, then the marker
    parallel_assert(comm, got == [expected] * comm.Get_size(), f"got {got}")


@pytest.mark.mpi
def test_bcast_texts_and_numbers_round_trip():
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    root = size - 1
    texts = ["", "path/with ünïcode", "", "x" * 100]
    got = messages.bcast_texts(comm, texts if rank == root else None, root=root, max_count=4,
                               max_bytes=200, what=WHAT)
    parallel_assert(comm, got == texts, f"bcast_texts gave {got}")
    none = messages.bcast_text(comm, None, root=root, max_bytes=10, what=WHAT)
    parallel_assert(comm, none is None, f"bcast_text(None) gave {none!r}")
    one = messages.bcast_text(comm, "/tmp/dir" if rank == root else "ignored", root=root,
                              max_bytes=10, what=WHAT)
    parallel_assert(comm, one == "/tmp/dir", f"bcast_text gave {one!r}")
    value = messages.bcast_int(comm, 2**62 + 7 if rank == root else None, root=root, low=0,
                               what=WHAT)
    parallel_assert(comm, value == 2**62 + 7, f"bcast_int gave {value}")
    total = messages.allreduce_float(comm, rank + 0.5, MPI.SUM)
    parallel_assert(comm, total == sum(r + 0.5 for r in range(size)), f"sum {total}")
    top = messages.allreduce_float(comm, -float(rank), MPI.MAX)
    parallel_assert(comm, top == 0.0, f"max {top}")
    count = messages.allreduce_int(comm, 2**40 + rank, MPI.SUM)
    parallel_assert(comm, count == sum(2**40 + r for r in range(size)), f"int sum {count}")


@pytest.mark.mpi
@pytest.mark.parametrize("dtype", [np.uint8, np.int32, np.int64, np.float32, np.float64])
@pytest.mark.parametrize("shape", [(), (0,), (7,), (3, 4), (2, 1, 3, 2)])
def test_bcast_array_round_trip(dtype, shape):
    comm = MPI.COMM_WORLD
    root = comm.Get_size() - 1
    expected = (np.arange(int(np.prod(shape))) * 3 + 1).astype(dtype).reshape(shape)
    got = messages.bcast_array(comm, expected.copy() if comm.Get_rank() == root else None,
                               root=root, max_elements=100, what=WHAT)
    parallel_assert(comm, got.dtype == expected.dtype and got.shape == expected.shape
                    and np.array_equal(got, expected), f"got {got!r}")


@pytest.mark.mpi
def test_scatter_and_gather_arrays_round_trip():
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    stacked = np.arange(size * 6, dtype=np.float32).reshape(size, 2, 3) / 7
    row = messages.scatter_array(comm, stacked if rank == 0 else None, max_elements=6,
                                 shape=(2, 3), what=WHAT)
    parallel_assert(comm, row is not None and np.array_equal(row, stacked[rank]), f"row {row}")
    nothing = messages.scatter_array(comm, None, max_elements=6, what=WHAT)
    parallel_assert(comm, nothing is None, "scatter of None gave an array")

    mine = np.array([rank, 10 * rank + 1], dtype=np.int64)
    root = size // 2
    gathered = messages.gather_array(comm, mine, root=root, max_elements=2, shape=(2,), what=WHAT)
    expected = np.array([[r, 10 * r + 1] for r in range(size)], dtype=np.int64)
    ok = gathered is None if rank != root else (gathered.dtype == np.int64
                                                and np.array_equal(gathered, expected))
    parallel_assert(comm, ok, f"gathered {gathered}")
    none = messages.gather_array(comm, None, root=root, max_elements=2, what=WHAT)
    parallel_assert(comm, none is None, "gather of None everywhere gave an array")


@pytest.mark.mpi
def test_gather_float_and_integer_exchanges_round_trip():
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    weights = messages.gather_float(comm, rank * 1.25, what=WHAT)
    expected = [r * 1.25 for r in range(size)] if rank == 0 else None
    parallel_assert(comm, weights == expected, f"weights {weights}")

    def key_of(r: int) -> int:
        return pow(2, 1000 + r, MODP_2048_P)

    keys = messages.allgather_bigint(comm, key_of(rank), nbytes=256, low=2, high=MODP_2048_P - 2,
                                     what=WHAT)
    parallel_assert(comm, keys == [key_of(r) for r in range(size)], "public keys differ")
    rows = messages.allgather_int64(comm, [2**62 + rank, rank % 2], low=[0, 0],
                                    high=[2**63 - 1, 1], what=WHAT)
    parallel_assert(comm, rows.tolist() == [[2**62 + r, r % 2] for r in range(size)], f"{rows}")


# ---------------------------------------------------------------------------------------------
# malformed messages (the last rank misbehaves)


@pytest.mark.mpi(min_size=2)
def test_wrong_text_length_header_fails_everywhere():
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    bad = size - 1

    def call() -> None:
        if rank != bad:
            messages.allgather_text(comm, "fine", max_bytes=16, what=WHAT)
            return
        lengths = np.empty(size, dtype=np.int64)
        rows = np.empty((size, 16), dtype=np.uint8)
        comm.Allgather(np.array([10**6], dtype=np.int64), lengths)  # claims a megabyte
        comm.Allgather(np.zeros(16, dtype=np.uint8), rows)
        messages.agree_valid(comm, None, WHAT)

    _raises_everywhere(comm, call, rf"^testing: rank {bad} sent a text length of 1000000, "
                                   r"outside \[-1, 16\]")


@pytest.mark.mpi(min_size=2)
def test_pickle_in_a_text_slot_is_only_text():
    """What the old pickled agree() would have executed arrives as inert text."""
    import pickle

    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    marker = f"/tmp/hflmpi-pickle-marker-{os.getpid()}"

    class Exploit:
        def __reduce__(self):
            return (open, (marker, "w"))

    payload = pickle.dumps(Exploit())[:200]
    if rank == size - 1:
        lengths = np.empty(size, dtype=np.int64)
        rows = np.empty((size, 256), dtype=np.uint8)
        mine = np.zeros(256, dtype=np.uint8)
        mine[: len(payload)] = np.frombuffer(payload, dtype=np.uint8)
        comm.Allgather(np.array([len(payload)], dtype=np.int64), lengths)
        comm.Allgather(mine, rows)
        messages.agree_valid(comm, None, WHAT)
        got = None
    else:
        got = messages.allgather_text(comm, None, max_bytes=256, what=WHAT)
    ok = got is None or (isinstance(got[-1], str) and not os.path.exists(marker))
    parallel_assert(comm, ok, f"got {got!r}; marker exists: {os.path.exists(marker)}")


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("header, match", [
    ([99, 1, 5, 0, 0, 0], r"sent dtype code 99"),
    ([5, 1, 10**12, 0, 0, 0], r"sent an array of shape \(1000000000000,\), more than 100"),
    ([5, 7, 1, 1, 1, 1], r"sent a header with ndim 7"),
    ([5, 1, -3, 0, 0, 0], r"sent an array of shape \(-3,\), more than 100 elements or negative"),
    ([0, 0, 0, 0, 0, 0], r"sent no array"),
])
def test_bad_array_header_fails_everywhere(header, match):
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    root = size - 1

    def call() -> None:
        if rank != root:
            messages.bcast_array(comm, None, root=root, max_elements=100, what=WHAT)
            return
        comm.Bcast(np.array(header, dtype=np.int64), root=root)
        messages.agree_valid(comm, None, WHAT)

    _raises_everywhere(comm, call, rf"^testing: rank {root} {match}")


@pytest.mark.mpi(min_size=2)
def test_text_lengths_that_do_not_add_up_fail_everywhere():
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    root = size - 1

    def call() -> None:
        if rank != root:
            messages.bcast_texts(comm, None, root=root, max_count=4, max_bytes=64, what=WHAT)
            return
        comm.Bcast(np.array([2, 5], dtype=np.int64), root=root)
        messages.agree_valid(comm, None, WHAT)
        comm.Bcast(np.array([3, 3], dtype=np.int64), root=root)
        comm.Bcast(np.zeros(5, dtype=np.uint8), root=root)
        messages.agree_valid(comm, None, WHAT)

    _raises_everywhere(comm, call, rf"rank {root} sent text lengths \[3, 3\] that do not add up "
                                   r"to the announced 5 bytes")


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("value, match", [
    (1, r"sent 0x1, outside \[0x2, 0xffffffff\.\.\.fffffd \(2048 bits\)\]"),
    (0, r"sent 0x0, outside"),
    (MODP_2048_P - 1, r"sent 0xffffffff\.\.\.fffffe \(2048 bits\), outside"),
    (MODP_2048_P, r"sent 0xffffffff\.\.\.ffffff \(2048 bits\), outside"),
])
def test_out_of_range_public_key_fails_everywhere(value, match):
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    mine = value if rank == size - 1 else pow(2, 1000 + rank, MODP_2048_P)
    _raises_everywhere(comm, lambda: messages.allgather_bigint(
        comm, mine, nbytes=256, low=2, high=MODP_2048_P - 2, what=WHAT), rf"rank {size - 1} {match}")


@pytest.mark.mpi(min_size=2)
def test_too_long_public_key_fails_everywhere():
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    mine = 2**2048 + 5 if rank == size - 1 else 5
    _raises_everywhere(comm, lambda: messages.allgather_bigint(
        comm, mine, nbytes=256, low=2, high=MODP_2048_P - 2, what=WHAT),
        rf"rank {size - 1} has a value of 2049 bits, more than 2048")


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("weight", [float("nan"), float("inf"), -1.0])
def test_bad_weight_fails_everywhere(weight):
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    mine = weight if rank == size - 1 else 3.0
    _raises_everywhere(comm, lambda: messages.gather_float(comm, mine, what=WHAT),
                       rf"rank {size - 1} sent {weight}; it must be finite and >= 0\.0")


@pytest.mark.mpi(min_size=2)
def test_mismatched_gather_shapes_fail_everywhere():
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    mine = np.zeros(3 if rank == size - 1 else 2, dtype=np.float32)
    _raises_everywhere(comm, lambda: messages.gather_array(comm, mine, max_elements=8, what=WHAT),
                       rf"rank {size - 1} sent a float32 array of shape \(3,\) but rank 0 has "
                       r"a float32 array of shape \(2,\)")


@pytest.mark.mpi(min_size=2)
def test_handshake_report_out_of_range_fails_everywhere():
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    mine = [5, 2] if rank == size - 1 else [5, 1]
    _raises_everywhere(comm, lambda: messages.allgather_int64(
        comm, mine, low=[0, 0], high=[2**63 - 1, 1], what=WHAT),
        rf"rank {size - 1} sent 2 as value 1, outside \[0, 1\]")


@pytest.mark.mpi(min_size=2)
def test_overlong_node_name_fails_everywhere(monkeypatch):
    from hflmpi.mpi.comm import node_names

    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    monkeypatch.setenv("HFLMPI_NODE_NAME", "n" * 2000 if rank == size - 1 else "node-a")
    _raises_everywhere(comm, lambda: node_names(comm),
                       rf"sharing the node names .*: rank {size - 1} has a text of 2000 bytes")
    monkeypatch.setenv("HFLMPI_NODE_NAME", f"node-{rank % 2}")
    names = node_names(comm)
    parallel_assert(comm, names == [f"node-{r % 2}" for r in range(size)], f"names {names}")
