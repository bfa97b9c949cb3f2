"""Read the compute and aggregation times of a finished (or live) run for the tau planner.

``hflmpi plan --from-run RUN.h5`` plans the next run's ``tau`` from what this run measured: the
seconds per SGD step ``t_cp`` and the seconds ``t_cm,n`` of one layer-n aggregation, the inputs
of the round-time model :func:`hflmpi.core.costmodel.round_time`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from hflmpi.core.costmodel import aggregation_counts
from hflmpi.core.schedule import steps_per_round
from hflmpi.record.reading import read_metrics, read_run_info
from hflmpi.record.run_config import read_run_config

__all__ = ["MeasuredTimes", "times_from_run"]


@dataclass(frozen=True)
class MeasuredTimes:
    """``t_cp`` and per-layer ``t_cm`` read from a run file (medians over rounds)."""

    t_cp: float
    t_cm: list[float]
    tau: list[int]
    bits: list[int]
    bucket_size: int
    fanouts: list[int]
    rounds_used: int


def times_from_run(path: str | os.PathLike[str], skip_first: bool = True) -> MeasuredTimes:
    """Derive ``t_cp`` and ``t_cm,n`` from a run record's ``/metrics`` (see :mod:`hflmpi.record.store`).

    Per round, ``compute_seconds`` summed over layers is the compute of ``prod(tau)`` steps, and
    ``comm_seconds[n]`` is layer n's time over its ``prod_{m > n} tau_m`` aggregations (slowest
    rank). Medians over the rounds (the first is skipped as warm-up when there are others) give
    ``t_cp = sum(compute) / prod(tau)`` and ``t_cm,n = comm[n] / prod_{m > n} tau_m``, measured at
    the run's own quantizer widths. With the default exact ``subtree`` algorithm the whole
    allreduce of an event is charged to its top layer, so there ``t_cm,1..N-1`` only hold the
    layer-only events (see docs/planning.md).

    Raises
    ------
    ConfigError
        If the file stores no valid config (see :func:`hflmpi.record.run_config.read_run_config`).
    ValueError
        If the run has no rounds yet.
    OSError, KeyError
        If the file cannot be read as a run record.
    """
    config = read_run_config(path)
    metrics = read_metrics(path)
    info = read_run_info(path)
    tau = list(config.schedule.tau)
    depth = len(tau)
    bits = list(config.quantize.bits_for(depth))
    bucket = config.quantize.bucket_size
    compute = np.asarray(metrics["compute_seconds"], dtype=np.float64).reshape(-1, depth)
    comm = np.asarray(metrics["comm_seconds"], dtype=np.float64).reshape(-1, depth)
    if len(compute) == 0:
        raise ValueError(f"{path} holds no rounds yet; plan from a run that finished a round")
    if skip_first and len(compute) > 1:
        compute, comm = compute[1:], comm[1:]
    t_cp = float(np.median(np.nansum(compute, axis=1))) / steps_per_round(tau)
    t_cm = [float(np.median(comm[:, n])) / count
            for n, count in enumerate(aggregation_counts(tau))]
    tree = info.get("tree")
    groups = list(tree.get("groups_per_layer", [])) if isinstance(tree, dict) else []
    world = int(info.get("world_size", 1))
    counts = [world, *groups] if len(groups) == depth else [world] + [1] * depth
    fanouts = [max(1, round(counts[n] / counts[n + 1])) for n in range(depth)]
    return MeasuredTimes(t_cp, t_cm, tau, bits, bucket, fanouts, len(compute))
