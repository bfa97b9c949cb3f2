"""MPI tests of quantized nested aggregation (QMLHFL Eq. (4)) against a serial reference.

The reference below replays the aggregation for the whole tree in one process: per layer, each
child's weighted difference, the group's shared scales (max over children), stochastic levels
from the same keyed generators, an int64 sum in numpy, and the decoded update. It reuses only the
pure, separately tested rounding function ``to_levels``/``from_level_sum``; the MPI orchestration
(scales exchange, integer Reduce or Gather of packed bytes, nesting, weights, broadcast) is
what is under test. Integer sums make the comparison bitwise.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch
from conftest import parallel_assert, random_nested_groups

mpi4py = pytest.importorskip("mpi4py")
from mpi4py import MPI  # noqa: E402

from hflmpi.core.quantize import bucket_absmax, from_level_sum, to_levels  # noqa: E402
from hflmpi.core.rng import torch_generator  # noqa: E402
from hflmpi.core.topology import plan_fanouts, plan_groups  # noqa: E402
from hflmpi.core.wire import Method, choose_method, levels_for_bits, packed_nbytes  # noqa: E402
from hflmpi.mpi.aggregate import HierarchicalAggregator  # noqa: E402
from hflmpi.mpi.comm import LayerComms  # noqa: E402

NUMEL = 1000
BUCKET = 64
SEED = 11


def _anchor() -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(5).standard_normal(NUMEL).astype(np.float32))


def _model_of(rank: int) -> torch.Tensor:
    drift = np.random.default_rng(100 + rank).standard_normal(NUMEL).astype(np.float32)
    return _anchor() + torch.from_numpy(0.1 * drift)


def _weight_of(rank: int) -> float:
    return float(2 * rank + 3)


def _reference(plan, layer: int, bits: list[int], step: int) -> dict[int, torch.Tensor]:
    """Serial nested quantized aggregation; returns the model of every layer-``layer`` node."""
    anchor = _anchor()
    models = {r: _model_of(r) for r in range(plan.world_size)}
    weights = {r: _weight_of(r) for r in range(plan.world_size)}
    for n in range(1, layer + 1):
        new_models, new_weights = {}, {}
        for node, kids in enumerate(plan.children[n - 1]):
            total = sum(weights[c] for c in kids)
            if bits[n - 1] == 0:
                acc = sum((weights[c] / total) * models[c].double() for c in kids)
                new_models[node] = acc.float()
            else:
                s = levels_for_bits(bits[n - 1])
                diffs = {}
                for c in kids:
                    d = torch.sub(models[c], anchor)
                    share = weights[c] / total
                    if share != 1.0:
                        d.mul_(share)
                    diffs[c] = d
                scales = torch.stack([bucket_absmax(d, BUCKET) for d in diffs.values()]).amax(0)
                level_sum = np.zeros(NUMEL, dtype=np.int64)
                for c in kids:
                    gen = torch_generator(SEED, purpose="quantize", rank=plan.leader(n - 1, c),
                                          round=step, layer=n)
                    levels = to_levels(diffs[c], scales, s, gen, torch.int64, bucket_size=BUCKET,
                                       sign=bits[n - 1] == 1)
                    level_sum += levels.numpy()
                update = from_level_sum(torch.from_numpy(level_sum), scales, s, bucket_size=BUCKET)
                new_models[node] = anchor + update
            new_weights[node] = total
        models, weights = new_models, new_weights
    return models


def _plans(size: int):
    yield plan_fanouts([size], size)
    if size % 2 == 0 and size > 2:
        yield plan_fanouts([2, size // 2], size)
    if size >= 4:
        yield plan_groups(random_nested_groups(size, 3, seed=3), size)
    if size == 8:
        yield plan_fanouts([2, 2, 2], size)
        yield plan_groups([[[[0]], [[1, 2]]], [[[3, 4, 5, 6, 7]]]], size)  # depth 4, uneven


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.numpy().tobytes()).hexdigest()


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize("width", [1, 2, 4, 8, 12])
@pytest.mark.parametrize("method,downlink", [("sum", "levels"), ("gather", "float32"),
                                             ("lanes", "levels")])
def test_matches_serial_reference_bitwise(width, method, downlink):
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    for plan in _plans(size):
        bits = [width] * plan.depth
        with LayerComms(comm, plan) as comms:
            flat = _anchor().clone()
            agg = HierarchicalAggregator(comms, flat, bits=bits, bucket_size=BUCKET, seed=SEED,
                                         method=method, downlink=downlink)
            for layer in range(1, plan.depth + 1):
                flat.copy_(_anchor())
                agg.reset_anchors()
                flat.copy_(_model_of(rank))
                agg.aggregate(layer, _weight_of(rank), step=7 + layer)
                expected = _reference(plan, layer, bits, step=7 + layer)[plan.node_of(rank, layer)]
                same = torch.equal(flat, expected)
                diff = float((flat - expected).abs().max())
                parallel_assert(comm, same, f"{plan.children} layer {layer} bits {width}: max diff {diff:.3g}")
                digests = comms.subtree(layer).allgather(_digest(flat))
                parallel_assert(comm, len(set(digests)) == 1, "devices of a subtree disagree")


@pytest.mark.mpi(min_size=2)
def test_sum_gather_and_lanes_give_identical_bits():
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    plan = plan_fanouts([size], size)
    results = []
    with LayerComms(comm, plan) as comms:
        for method in ("sum", "gather", "lanes"):
            flat = _anchor().clone()
            agg = HierarchicalAggregator(comms, flat, bits=[4], bucket_size=BUCKET, seed=SEED, method=method)
            flat.copy_(_model_of(rank))
            agg.aggregate(1, _weight_of(rank), step=3)
            results.append(flat.clone())
    parallel_assert(comm, torch.equal(results[0], results[1]), "sum and gather differ")
    parallel_assert(comm, torch.equal(results[0], results[2]), "sum and lanes differ")


@pytest.mark.mpi(min_size=1)
def test_mixed_exact_and_quantized_layers():
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    if size % 2:
        pytest.skip("needs an even world size")
    plan = plan_fanouts([2, size // 2], size) if size > 2 else plan_fanouts([2, 1], size)
    for bits in ([8, 0], [0, 8]):
        with LayerComms(comm, plan) as comms:
            flat = _anchor().clone()
            agg = HierarchicalAggregator(comms, flat, bits=bits, bucket_size=BUCKET, seed=SEED)
            flat.copy_(_model_of(rank))
            agg.aggregate(2, _weight_of(rank), step=1)
            expected = _reference(plan, 2, bits, step=1)[0]
            err = float((flat - expected).abs().max())
            parallel_assert(comm, err < 1e-5, f"bits {bits}: max diff {err:.3g}")


@pytest.mark.mpi(min_size=2)
def test_unbiased_over_many_draws():
    """The mean of many quantized aggregations approaches the exact weighted average."""
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    plan = plan_fanouts([size], size)
    total = sum(_weight_of(r) for r in range(size))
    exact = sum((_weight_of(r) / total) * _model_of(r).double() for r in range(size))
    draws = []
    with LayerComms(comm, plan) as comms:
        flat = _anchor().clone()
        agg = HierarchicalAggregator(comms, flat, bits=[2], bucket_size=BUCKET, seed=SEED)
        for step in range(200):
            flat.copy_(_anchor())
            agg.reset_anchors()
            flat.copy_(_model_of(rank))
            agg.aggregate(1, _weight_of(rank), step=step)
            draws.append(flat.double().clone())
    stacked = torch.stack(draws)
    # Unbiased draws: E||mean - exact||^2 = E||draw - exact||^2 / K (the variance shrinks by K).
    # A bias b adds ||b||^2, which does not shrink. Summing over 1000 coordinates makes the
    # ratio concentrate near 1; a one-grid-step bias on even a few coordinates pushes it far up.
    error_of_mean = float(((stacked.mean(0) - exact) ** 2).sum())
    mean_error = float(((stacked - exact) ** 2).sum(1).mean()) / len(draws)
    ratio = error_of_mean / mean_error
    parallel_assert(comm, 0.5 < ratio < 1.6, f"||mean - exact||^2 is {ratio:.2f} x its unbiased value")
    parallel_assert(comm, float(stacked.std(0).max()) > 0, "no quantization noise at all?")


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("width", [2, 8, 16])
def test_bytes_counted_equal_the_formula(width):
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    plan = plan_fanouts([size], size)
    with LayerComms(comm, plan) as comms:
        flat = _model_of(rank).clone()
        agg = HierarchicalAggregator(comms, flat, bits=[width], bucket_size=BUCKET, seed=SEED)
        stats = agg.aggregate(1, 1.0, step=0)
        method = choose_method(NUMEL, width, size)
        scales = 4 * -(-NUMEL // BUCKET)
        if method == Method.GATHER:
            payload = packed_nbytes(NUMEL, width)
        elif method == Method.LANES:  # lanes of bit_length(2 size s) bits, floor(64 / L) a word
            width_bits = (2 * size * levels_for_bits(width)).bit_length()
            payload = 8 * -(-NUMEL // (64 // width_bits))
        else:
            container = torch.int8 if size * levels_for_bits(width) <= 127 else (
                torch.int16 if size * levels_for_bits(width) <= 2**15 - 1 else torch.int32)
            payload = NUMEL * torch.empty((), dtype=container).element_size()
        expected = scales + (0 if rank == 0 else payload)
        parallel_assert(comm, stats.bytes_sent == [expected], f"{stats.bytes_sent} != [{expected}]")
        parallel_assert(comm, agg.methods() == [method.label])
        # the downlink: the level sum in the same lanes as a fan-in of `size`, plus the scales,
        # unless that is not smaller than the float32 model
        width_bits = (2 * size * levels_for_bits(width)).bit_length()
        levels = 8 * -(-NUMEL // (64 // width_bits)) + scales
        down = levels if levels < 4 * NUMEL else 4 * NUMEL
        parallel_assert(comm, stats.bytes_received == [0 if rank == 0 else down],
                        f"{stats.bytes_received} != [{down}]")


@pytest.mark.mpi(min_size=2)
def test_nan_update_fails_on_every_rank():
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    with LayerComms(comm, plan_fanouts([size], size)) as comms:
        flat = _anchor().clone()
        agg = HierarchicalAggregator(comms, flat, bits=[8], bucket_size=BUCKET, seed=SEED)
        flat.copy_(_model_of(rank))
        if rank == size - 1:
            flat[3] = float("nan")
        with pytest.raises(FloatingPointError, match="NaN or Inf"):
            agg.aggregate(1, 1.0, step=0)
