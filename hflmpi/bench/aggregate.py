"""Benchmarks that time hflmpi against baselines measured in the same run.

``hflmpi bench aggregate`` (under ``mpiexec -n P``) times, for each model size, one hierarchical
aggregation of a float32 model against a raw mpi4py ``Allreduce`` of the same buffer and against
``torch.distributed`` (gloo) ``all_reduce``; ``--bits 8,4,2`` adds quantize + exact integer
reduce + dequantize at those widths, with the bytes each moves. The candidates run interleaved,
round-robin, so drift of this machine's speed hits all of them alike; the median of the repeats is
reported, and rank 0 prints ratios to the raw Allreduce. Each quantized width runs in its own
phase, interleaved with a raw Allreduce of its own (its ratio's baseline), and its buffers are
freed before the next width: the peak memory is the largest phase, not the sum
(:mod:`hflmpi.bench.memory` sizes the defaults to it). Rows are handed to ``emit`` as soon as
they are measured, so a crash still leaves the rows measured before it. Speed targets live
here, not in the unit tests.
"""

from __future__ import annotations

import gc
import socket
import statistics
import time
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
from mpi4py import MPI

from hflmpi.core.topology import TreePlan
from hflmpi.mpi.aggregate import HierarchicalAggregator
from hflmpi.mpi.comm import LayerComms
from hflmpi.mpi.messages import allreduce_float, allreduce_int, bcast_int

__all__ = ["default_fanouts", "time_interleaved", "bench_aggregate", "Emit"]

Emit = Callable[[dict[str, float], Optional[int]], None]
"""Called on every rank with a size's row so far and the quantized width just measured (None:
the float candidates)."""


def default_fanouts(world_size: int) -> list[int]:
    """Return a two-layer tree for ``world_size`` (groups of 2 or 4), or one layer if prime-sized."""
    for group in (4, 2):
        if world_size % group == 0 and world_size > group:
            return [group, world_size // group]
    return [world_size]


def time_interleaved(
    comm: MPI.Comm, candidates: dict[str, Callable[[], object]], repeats: int, warmup: int = 1
) -> dict[str, float]:
    """Time each candidate ``repeats`` times, round-robin, and return the median seconds.

    Each sample is the slowest rank's time (MAX reduction), started after a barrier, so a sample
    is what the job waits for.
    """
    samples: dict[str, list[float]] = {name: [] for name in candidates}
    for iteration in range(warmup + repeats):
        for name, run in candidates.items():
            comm.Barrier()
            start = time.perf_counter()
            run()
            elapsed = allreduce_float(comm, time.perf_counter() - start, MPI.MAX)
            if iteration >= warmup:
                samples[name].append(elapsed)
    return {name: statistics.median(values) for name, values in samples.items()}


def _gloo_group(comm: MPI.Comm) -> bool:
    import torch.distributed as dist

    if dist.is_initialized():
        return True
    chosen: int | None = None
    if comm.Get_rank() == 0:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            chosen = int(probe.getsockname()[1])
    port = bcast_int(comm, chosen, root=0, low=1, high=65535, what="sharing the gloo port")
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=comm.Get_rank(),
        world_size=comm.Get_size(),
    )
    return True


def bench_aggregate(
    comm: MPI.Comm,
    sizes: Sequence[int],
    plan: TreePlan,
    repeats: int,
    gloo: bool = True,
    bits: Sequence[int] = (),
    bucket_size: int = 0,
    emit: Emit | None = None,
    link_iface: str = "",
) -> list[dict[str, float]]:
    """Time hierarchical aggregation against raw Allreduce (and gloo) for each model size.

    ``emit(row, width)`` (if given) is called on every rank after each phase: the float
    candidates of a size (``width`` None), then each quantized width in turn. With
    ``link_iface`` (on emulated nodes, :mod:`hflmpi.bench.emulate`) each row also holds the
    bytes one run of each candidate sent across the nodes' links (``{name}_link``).

    Returns
    -------
    list of dict
        One row per size with median seconds per candidate (identical on every rank); quantized
        width ``w`` adds ``q{w}`` (seconds), ``q{w}_raw`` (the raw Allreduce timed with it),
        ``q{w}_bytes`` and ``q{w}_method``.
    """
    rows = []
    if gloo:
        _gloo_group(comm)
    meter = None
    if link_iface:
        from hflmpi.bench.emulate import LinkMeter

        meter = LinkMeter(comm, link_iface)
    with LayerComms(comm, plan) as comms:
        for numel in sizes:
            rows.append(_bench_size(comm, comms, plan, numel, repeats, gloo, bits, bucket_size,
                                    emit or (lambda row, width: None), meter))
    return rows


def _bench_size(
    comm: MPI.Comm, comms: LayerComms, plan: TreePlan, numel: int, repeats: int, gloo: bool,
    bits: Sequence[int], bucket_size: int, emit: Emit, meter: Any = None,
) -> dict[str, float]:
    """Time every candidate on one model size, one phase at a time (buffers freed in between)."""
    raw = np.ones(numel, dtype=np.float32)
    allreduce = lambda: comm.Allreduce(MPI.IN_PLACE, raw, op=MPI.SUM)  # noqa: E731
    floats = _float_candidates(comms, plan, numel, gloo, allreduce)
    row = {"numel": float(numel), **time_interleaved(comm, floats, repeats)}
    if meter is not None:
        row.update(meter.per_candidate(floats))
    del floats  # the float candidates' buffers go before the first quantized width's come
    # what a flat float32 reduction's uplinks carry: every rank but the root sends the model
    row["float_bytes"] = float((comm.Get_size() - 1) * numel * 4)
    gc.collect()
    emit(dict(row), None)
    for width in bits:
        model = torch.randn(numel, generator=torch.Generator().manual_seed(comm.Get_rank()))
        agg = HierarchicalAggregator(comms, model, bits=[width] * plan.depth,
                                     bucket_size=bucket_size, seed=0)
        times = time_interleaved(comm, {"mpi_allreduce": allreduce, "q": _quantized_run(agg, plan.depth)},
                                 repeats)
        row[f"q{width}"], row[f"q{width}_raw"] = times["q"], times["mpi_allreduce"]
        if meter is not None:
            row.update(meter.per_candidate({f"q{width}": _quantized_run(agg, plan.depth)}))
        stats = agg.aggregate(plan.depth, 1.0, step=10**6)
        row[f"q{width}_bytes"] = allreduce_int(comm, sum(stats.bytes_sent), MPI.SUM)
        row[f"q{width}_method"] = float(stats.methods[0])
        del model, agg
        gc.collect()
        emit(dict(row), width)
    return row


def _float_candidates(
    comms: LayerComms, plan: TreePlan, numel: int, gloo: bool, allreduce: Callable[[], object],
) -> dict[str, Callable[[], object]]:
    subtree = HierarchicalAggregator(comms, torch.ones(numel), algorithm="subtree")
    tree = HierarchicalAggregator(comms, torch.ones(numel), algorithm="tree")
    candidates: dict[str, Callable[[], object]] = {
        "mpi_allreduce": allreduce,
        "hfl_subtree": lambda: subtree.aggregate(plan.depth, 1.0),
        "hfl_tree": lambda: tree.aggregate(plan.depth, 1.0),
    }
    if gloo:
        import torch.distributed as dist

        gloo_tensor = torch.ones(numel, dtype=torch.float32)
        candidates["gloo_all_reduce"] = lambda: dist.all_reduce(gloo_tensor)
    return candidates


def _quantized_run(agg: HierarchicalAggregator, depth: int) -> Callable[[], None]:
    step = [0]

    def run() -> None:
        step[0] += 1
        agg.aggregate(depth, 1.0, step=step[0])

    return run
