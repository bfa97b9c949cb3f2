"""Exact integer sums on any MPI: the start-up check, and secure sums under a saturating SUM.

Open MPI 5's vectorised SUM kernels saturate 8- and 16-bit integer sums instead of wrapping
(hflmpi issue 16). These tests emulate such libraries with user-defined ``MPI.Op``s:

* the start-up check (:func:`hflmpi.mpi.exact_sum.check_integer_sum`) accepts ``MPI.SUM`` and a
  sum that saturates only at the datatype's limits (exact on the in-range values hflmpi sums),
  and refuses on every rank, naming the MPI library and the datatype, a reduction that is not
  exact there (one saturating at a narrower width, one whose vector loop drops the tail);
* the aggregator runs that check on its integer-sum layers;
* a secure uplink summed with the saturating op stays bit-exact against an independent numpy
  sum of every participant's levels: no sum ever overflows, so the op's overflow behaviour
  never matters.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import pytest
import torch
from conftest import parallel_assert

pytest.importorskip("mpi4py")
from mpi4py import MPI  # noqa: E402
from mpi4py.util.dtlib import to_numpy_dtype  # noqa: E402

from hflmpi.core.quantize import to_levels  # noqa: E402
from hflmpi.core.rng import torch_generator  # noqa: E402
from hflmpi.core.secure import SharedSecretSeeds  # noqa: E402
from hflmpi.core.topology import plan_fanouts  # noqa: E402
from hflmpi.mpi import layers  # noqa: E402
from hflmpi.mpi.aggregate import HierarchicalAggregator  # noqa: E402
from hflmpi.mpi.comm import LayerComms, library_name  # noqa: E402
from hflmpi.mpi.exact_sum import InexactSumError, check_integer_sum  # noqa: E402
from hflmpi.mpi.uplink import QuantizedUplink  # noqa: E402

SIGNED = [np.int8, np.int16, np.int32, np.int64]


def _saturating(limit_bits: Callable[[np.dtype], int]) -> Callable[..., None]:
    """Return an MPI user function: exact sum, clipped to a signed ``limit_bits(dtype)`` range."""

    def combine(inbuf: object, inoutbuf: object, datatype: MPI.Datatype) -> None:
        dtype = to_numpy_dtype(datatype)
        a = np.frombuffer(inbuf, dtype=dtype)  # type: ignore[call-overload]
        b = np.frombuffer(inoutbuf, dtype=dtype)  # type: ignore[call-overload]
        bits = limit_bits(dtype)
        if bits >= 64:
            b[:] = a + b  # numpy int64 wraps; nothing here reaches it
            return
        total = a.astype(np.int64) + b.astype(np.int64)
        b[:] = np.clip(total, -(1 << (bits - 1)), (1 << (bits - 1)) - 1)

    return combine


def _open_mpi_like(dtype: np.dtype) -> int:
    """Open MPI 5: 8- and 16-bit sums saturate at the type's limits; wider ones wrap."""
    return 8 * dtype.itemsize if dtype.itemsize <= 2 else 64


def _drops_tail(inbuf: object, inoutbuf: object, datatype: MPI.Datatype) -> None:
    """A vector kernel that forgets the elements after its last full block of 64."""
    dtype = to_numpy_dtype(datatype)
    a = np.frombuffer(inbuf, dtype=dtype)  # type: ignore[call-overload]
    b = np.frombuffer(inoutbuf, dtype=dtype)  # type: ignore[call-overload]
    full = len(b) // 64 * 64
    b[:full] += a[:full]


@pytest.fixture
def ops() -> Iterator[dict[str, MPI.Op]]:
    """User-defined reductions emulating other libraries' SUM kernels (freed afterwards)."""
    made = {
        "open-mpi-like": MPI.Op.Create(_saturating(_open_mpi_like), commute=True),
        "saturates-at-8-bits": MPI.Op.Create(_saturating(lambda dtype: 8), commute=True),
        "drops-the-tail": MPI.Op.Create(_drops_tail, commute=True),
    }
    yield made
    for op in made.values():
        op.Free()


def _refusal(comm: MPI.Comm, dtype: type, low: int, high: int, op: MPI.Op) -> str:
    try:
        check_integer_sum(comm, dtype, low, high, op=op, what="a test layer")
    except InexactSumError as exc:
        return str(exc)
    return ""


@pytest.mark.mpi(min_size=2)
def test_the_emulated_kernel_really_saturates(comm, ops):
    """Sanity of the emulation: an overflowing int8/int16 sum clips (MPI.SUM's result differs)."""
    for dtype in (np.int8, np.int16):
        top = np.iinfo(dtype).max
        buf = np.full(100, top - 1, dtype=dtype)
        out = np.empty_like(buf)
        comm.Allreduce(buf, out, op=ops["open-mpi-like"])
        parallel_assert(comm, bool((out == top).all()), f"{dtype.__name__}: {out[:3]}")


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("dtype", SIGNED)
def test_check_accepts_exact_sums_near_the_container_limits(comm, ops, dtype):
    size, top = comm.Get_size(), int(np.iinfo(dtype).max)
    ranges = [(0, top // size), (-(top // size), top // size)]  # residues; signed levels
    for low, high in ranges:
        for name in ("MPI.SUM", "open-mpi-like"):
            op = MPI.SUM if name == "MPI.SUM" else ops[name]
            message = _refusal(comm, dtype, low, high, op)
            parallel_assert(comm, message == "", f"{name} [{low}, {high}]: {message}")


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("dtype", [np.int16, np.int32])
@pytest.mark.parametrize("name", ["saturates-at-8-bits", "drops-the-tail"])
def test_check_refuses_an_inexact_sum_on_every_rank(comm, ops, dtype, name):
    size = comm.Get_size()
    high = 1000  # the sums reach 1000 * size, past an 8-bit saturation
    message = _refusal(comm, dtype, 0, high, ops[name])
    expected = [library_name(), f"does not sum {np.dtype(dtype).name} integers exactly",
                f"over {size} ranks", "a test layer"]
    parallel_assert(comm, all(part in message for part in expected), f"{name}: {message!r}")


@pytest.mark.mpi(min_size=1)
def test_check_refuses_a_range_the_container_cannot_hold(comm):
    size = comm.Get_size()
    top = int(np.iinfo(np.int8).max)
    with pytest.raises(ValueError, match="do not fit int8"):
        check_integer_sum(comm, np.int8, 0, top // size + 1, what="a test layer")


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("secure", [False, True])
def test_aggregator_runs_the_check_on_integer_sum_layers(comm, ops, monkeypatch, secure):
    """Swap the aggregator's sum for a faulty one: building the layer must refuse everywhere."""
    used: list[MPI.Op] = []

    def faulty(*args, **kwargs):
        used.append(kwargs["op"])
        kwargs["op"] = ops["drops-the-tail"]
        return check_integer_sum(*args, **kwargs)

    monkeypatch.setattr(layers, "check_integer_sum", faulty)
    size = comm.Get_size()
    try:
        with LayerComms(comm, plan_fanouts([size], size)) as comms:
            HierarchicalAggregator(comms, torch.zeros(300), bits=[8], method="sum",
                                   secure=[secure], allow_small_secure_groups=True)
        message = ""
    except InexactSumError as exc:
        message = str(exc)
    parallel_assert(comm, used == [MPI.SUM], f"the layer checked {used}")
    parallel_assert(comm, "8-bit integer sum of layer 1" in message, message)


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_secure_sum_is_bit_exact_under_a_saturating_reduction(comm, ops, bits):
    """Masked residues summed by an Open-MPI-like SUM give exactly numpy's sum of the levels.

    With 2- and 4-bit levels the residues travel in int8 (groups of up to 4 and 2), with 8-bit
    levels in int16: the containers whose overflow Open MPI saturates.
    """
    rank, size = comm.Get_rank(), comm.Get_size()
    numel, bucket = 4099, 64
    op = ops["open-mpi-like"]
    seeds = SharedSecretSeeds(bytes(range(32)))
    uplink = QuantizedUplink(comm, numel, bits, bucket, torch.device("cpu"), False, "sum",
                             seeds=seeds, sum_op=op)
    low, high = uplink.sum_range()
    check_integer_sum(comm, uplink._levels.numpy().dtype, low, high, op=op, what="the test")
    anchor = torch.zeros(numel)
    child = torch.from_numpy(np.random.default_rng(rank).standard_normal(numel).astype(np.float32))
    diff = child - anchor
    uplink.exchange(child.clone(), anchor, 1.0, torch_generator(1, purpose="t", rank=rank),
                    step=3, layer=1)
    # Independent reference: regenerate this rank's levels with the same stream and the group's
    # scales, gather them, and add them in numpy int64.
    mine = to_levels(diff, uplink._scales, uplink.s, torch_generator(1, purpose="t", rank=rank),
                     torch.int64, bucket_size=bucket, sign=bits == 1).numpy()
    every = np.empty((size, numel), dtype=np.int64) if rank == 0 else None
    comm.Gather(mine, every, root=0)
    if rank == 0:
        assert every is not None
        expected = every.sum(axis=0)
        got = uplink._levels.numpy().astype(np.int64)
        ok = bool((got == expected).all())
        detail = f"{int((got != expected).sum())} of {numel} sums differ"
    else:
        ok, detail = True, ""
    parallel_assert(comm, ok, f"bits={bits}, container {uplink.container}: {detail}")
    parallel_assert(comm, size == 1 or int(np.abs(mine).max()) > 0, "trivial levels")
