"""MPI tests of the integer downlink (hflmpi.mpi.downlink) and the lanes uplink.

The independent reference is today's float32 path run in the same test: an aggregator with
``downlink="float32"`` fed the same models, weights and steps. Through a schedule of nested
aggregations (layer 1 several times, then higher layers, without resetting anything), every
device of the levels-downlink aggregator must hold the same bits as the float32 one, for every
uplink method; and every anchor must equal the model of that layer's last aggregation (the
invariant the levels downlink relies on). The serial reference of
``test_quantized_aggregate_mpi`` covers the first aggregation of every layer.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch
from conftest import parallel_assert, random_nested_groups

mpi4py = pytest.importorskip("mpi4py")
from mpi4py import MPI  # noqa: E402

from hflmpi.core.lanes import LaneFormat  # noqa: E402
from hflmpi.core.server_opt import ServerOptOptions  # noqa: E402
from hflmpi.core.topology import plan_fanouts, plan_groups  # noqa: E402
from hflmpi.mpi import layers  # noqa: E402
from hflmpi.mpi.aggregate import HierarchicalAggregator  # noqa: E402
from hflmpi.mpi.comm import LayerComms  # noqa: E402
from hflmpi.mpi.exact_sum import InexactSumError, check_integer_sum  # noqa: E402

NUMEL = 1500
BUCKET = 64
SEED = 5


def _start(dtype: torch.dtype) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(1).standard_normal(NUMEL)).to(dtype)


def _drift(rank: int, step: int, dtype: torch.dtype) -> torch.Tensor:
    noise = np.random.default_rng(1000 * step + rank).standard_normal(NUMEL)
    return torch.from_numpy(0.05 * noise).to(dtype)


def _weight(rank: int, step: int) -> float:
    return float(1 + (rank * 7 + step) % 5)


def _plans(size: int):
    if size > 1:
        yield plan_fanouts([size], size)
    if size % 2 == 0 and size > 2:
        yield plan_fanouts([2, size // 2], size)
    if size >= 4:
        yield plan_groups(random_nested_groups(size, 3, seed=7), size)
    if size == 8:
        yield plan_fanouts([2, 2, 2], size)
        yield plan_groups([[[[0]], [[1, 2]]], [[[3, 4, 5, 6, 7]]]], size)  # depth 4, uneven


def _schedule(depth: int) -> list[int]:
    return [min(n, depth) for n in (1, 1, 2, 1, 3, 2, 1, 4, depth)]


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.numpy().tobytes()).hexdigest()


def _run(comms, width: int, method: str, downlink: str, dtype: torch.dtype,
         check_anchors: bool = False) -> list[torch.Tensor]:
    """Run the schedule; return this device's model after every aggregation."""
    rank, depth = comms.rank, comms.depth
    flat = _start(dtype)
    agg = HierarchicalAggregator(comms, flat, bits=[width] * depth, bucket_size=BUCKET,
                                 seed=SEED, method=method, downlink=downlink)
    last = {n: flat.clone() for n in range(1, depth + 1)}  # the model of each layer's last round
    models = []
    for step, layer in enumerate(_schedule(depth)):
        flat.add_(_drift(rank, step, dtype))
        agg.aggregate(layer, _weight(rank, step), step=step)
        models.append(flat.clone())
        for n in range(1, layer + 1):
            last[n] = flat.clone()
        if check_anchors:
            held = agg._anchors  # every anchor this device keeps, levels downlinks included
            bad = [n for n, anchor in held.items() if not torch.equal(anchor, last[n])]
            parallel_assert(comms.comm, not bad, f"step {step}: anchors of layers {bad} stale")
            digests = comms.subtree(layer).allgather(_digest(flat))
            parallel_assert(comms.comm, len(set(digests)) == 1,
                            f"step {step}: devices of the layer-{layer} subtree disagree")
    return models


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("width", [1, 4, 8, 16])
def test_levels_downlink_rebuilds_the_float32_models_bit_for_bit(width, monkeypatch):
    # rebuild in chunks of 3 buckets, so chunks straddle lane boundaries (lane-major layout)
    monkeypatch.setattr("hflmpi.mpi.downlink._CHUNK", 3 * BUCKET)
    comm = MPI.COMM_WORLD
    for plan in _plans(comm.Get_size()):
        with LayerComms(comm, plan) as comms:
            reference = _run(comms, width, "sum", "float32", torch.float32)
            for method in ("lanes", "sum", "gather"):
                got = _run(comms, width, method, "levels", torch.float32,
                           check_anchors=method == "lanes")
                bad = [i for i, (a, b) in enumerate(zip(got, reference)) if not torch.equal(a, b)]
                parallel_assert(comm, not bad, f"{plan.children} {width} bits {method}: "
                                f"aggregations {bad} differ from the float32 downlink")


@pytest.mark.mpi(min_size=2)
def test_float64_models_and_the_auto_choice_match_too():
    comm = MPI.COMM_WORLD
    plan = next(iter(_plans(comm.Get_size())))
    with LayerComms(comm, plan) as comms:
        reference = _run(comms, 8, "gather", "float32", torch.float64)
        got = _run(comms, 8, "auto", "auto", torch.float64, check_anchors=True)
        same = all(torch.equal(a, b) for a, b in zip(got, reference))
        parallel_assert(comm, same, "float64 model: levels downlink differs")


@pytest.mark.mpi(min_size=2)
def test_a_server_optimizer_at_the_top_keeps_the_float32_downlink():
    """The leader changes the aggregate after dequantizing: the model itself goes down."""
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    plan = plan_fanouts([size], size)
    results, received = [], []
    with LayerComms(comm, plan) as comms:
        for downlink in ("float32", "levels"):
            flat = _start(torch.float32)
            agg = HierarchicalAggregator(
                comms, flat, bits=[8], bucket_size=BUCKET, seed=SEED, downlink=downlink,
                server_opt=[ServerOptOptions(name="avgm", lr=1.0, momentum=0.9)])
            for step in range(3):
                flat.add_(_drift(rank, step, torch.float32))
                stats = agg.aggregate(1, 1.0, step=step)
            results.append(flat.clone())
            received.append(stats.bytes_received[0])
    parallel_assert(comm, torch.equal(results[0], results[1]), "server optimizer results differ")
    parallel_assert(comm, received == [0, 0] if rank == 0 else received == [4 * NUMEL] * 2,
                    f"received {received}")


def _drops_the_tail(inbuf: object, inoutbuf: object, datatype: MPI.Datatype) -> None:
    """A uint64 vector kernel that forgets the elements after its last full block of 64."""
    a = np.frombuffer(inbuf, dtype=np.uint64)  # type: ignore[call-overload]
    b = np.frombuffer(inoutbuf, dtype=np.uint64)  # type: ignore[call-overload]
    full = len(b) // 64 * 64
    b[:full] += a[:full]


@pytest.mark.mpi(min_size=2)
def test_lanes_layers_check_the_uint64_sum_at_set_up(monkeypatch):
    """The start-up check covers the lane words: MPI.SUM passes, a faulty sum is refused."""
    comm = MPI.COMM_WORLD
    size = comm.Get_size()
    fmt = LaneFormat(300, 8, size)
    check_integer_sum(comm, np.uint64, 0, fmt.max_word, what="lanes")  # MPI.SUM: exact
    faulty = MPI.Op.Create(_drops_the_tail, commute=True)
    try:
        with pytest.raises(InexactSumError, match="uint64"):
            check_integer_sum(comm, np.uint64, 0, fmt.max_word, op=faulty, what="lanes")
    finally:
        faulty.Free()
    seen: list[tuple[object, int]] = []

    def recording(comm_, dtype, low, high, **kwargs):
        seen.append((np.dtype(dtype), high))
        return check_integer_sum(comm_, dtype, low, high, **kwargs)

    monkeypatch.setattr(layers, "check_integer_sum", recording)
    with LayerComms(comm, plan_fanouts([size], size)) as comms:
        HierarchicalAggregator(comms, torch.zeros(300), bits=[8], method="lanes")
    parallel_assert(comm, seen == [(np.dtype(np.uint64), fmt.max_word)], f"checked {seen}")
    # the largest word of one participant times the fan-in still fits 64 bits
    parallel_assert(comm, size * fmt.max_word < 1 << 64, "lanes overflow a word")
