"""Strong and weak scaling of short training jobs, and cost-model predictions (``hflmpi bench scaling``).

``mpiexec -n P python -m mpi4py -m hflmpi bench scaling --out runs/scaling.h5`` trains, for every
tree depth 1..3 whose fan-outs (all >= 2) fit P and for each mode, a tiny synthetic job with
:func:`hflmpi.federation.train` for a few rounds and appends one row per (P, depth, mode) to the HDF5
file: rounds/second (median round time, first and last rounds left out: warm-up, evaluation and
checkpoint), compute/communication seconds and uplink bytes per round from the run record, plus
the bytes the cost model predicts (:func:`hflmpi.core.costmodel.bytes_per_round`). It also times raw
``Allreduce``/``Reduce``/``Bcast``/``Gather`` at a few sizes for the calibration.

* strong scaling: fixed total samples and a fixed total batch per step, split over the ranks;
* weak scaling: fixed samples and batch per rank.

``hflmpi bench scaling plot --out runs/scaling.h5 --plots DIR`` (serial) fits the alpha-beta-gamma
model to the timed collectives (:func:`hflmpi.core.costmodel.calibrate`) and the compute per step to
the runs that had a core per rank, draws the measured points with the model's predictions for
64..4096 ranks over named interconnects (:data:`hflmpi.core.costmodel.INTERCONNECTS`) to PNGs, and
prints the tables. HDF5 layout: ``/runs/<column>`` and ``/collectives/<column>``, one resizable
1-D dataset per column, one entry per row; rank 0 writes (PyPI h5py has no parallel HDF5).

This module measures; the predictions and plots live in :mod:`hflmpi.bench.scaling_model`, the
HDF5 table in :mod:`hflmpi.bench.scaling_table`, and both are re-exported here.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from hflmpi.bench.scaling_model import PREDICT_WORLDS, plot, predictions
from hflmpi.bench.scaling_table import append_table, latest_rows, read_table

__all__ = [
    "TAUS",
    "PREDICT_WORLDS",
    "depth_trees",
    "job_config",
    "measure",
    "time_collectives",
    "append_table",
    "read_table",
    "latest_rows",
    "predictions",
    "plot",
]

TAUS: dict[int, list[int]] = {1: [8], 2: [4, 2], 3: [2, 2, 2]}
"""Schedule per depth: 8 SGD steps per global round at every depth."""

_RUN_COLUMNS: dict[str, str] = {
    "world": "i8", "depth": "i8", "mode": "str", "fanouts": "str", "tau": "str", "bits": "str",
    "numel": "i8", "batch": "i8", "samples_per_rank": "f8", "rounds": "i8", "rounds_used": "i8",
    "round_seconds": "f8", "rounds_per_second": "f8", "compute_seconds": "f8", "comm_seconds": "f8",
    "bytes_per_round": "f8", "predicted_bytes_per_round": "f8", "samples_per_second": "f8",
    "cores": "i8", "time_unix": "f8", "host": "str",
}
_MAX_ROWS = 10_000  # most rows one measure() call shares between ranks
_COLLECTIVE_COLUMNS: dict[str, str] = {
    "world": "i8", "op": "str", "nbytes": "f8", "seconds": "f8", "time_unix": "f8",
}


# ---------------------------------------------------------------------------------------------
# Jobs


def depth_trees(world: int, depths: Sequence[int] = (1, 2, 3)) -> list[tuple[int, list[int]]]:
    """Return ``(depth, fanouts)`` for each depth whose balanced fan-outs (all >= 2) fit ``world``.

    Depth 1 is always ``[world]``. Deeper trees split ``world`` into factors as even as possible,
    the smallest first (``8 -> [4, 2]`` is written ``[2, 4]``: pairs at layer 1).
    """
    out = []
    for depth in depths:
        if depth == 1:
            out.append((1, [world]))
            continue
        best: list[int] | None = None
        for factors in _factorizations(world, depth):
            if best is None or max(factors) - min(factors) < max(best) - min(best):
                best = factors
        if best is not None:
            out.append((depth, sorted(best)))
    return out


def _factorizations(n: int, parts: int, smallest: int = 2) -> list[list[int]]:
    if parts == 1:
        return [[n]] if n >= smallest else []
    out = []
    for f in range(smallest, int(n**0.5) + 1 if parts == 2 else n + 1):
        if n % f == 0:
            out += [[f, *rest] for rest in _factorizations(n // f, parts - 1, f)]
    return out


def job_config(
    world: int, fanouts: Sequence[int], mode: str, out: str, *, rounds: int = 12,
    features: int = 64, hidden: Sequence[int] = (256, 256), total_samples: int = 4096,
    total_batch: int = 64, per_rank_samples: int = 512, batch: int = 16, bits: int = 0,
    seed: int = 0,
) -> Any:
    """Return the :class:`~hflmpi.config.RunConfig` of one scaling job.

    ``mode="strong"``: ``total_samples`` over all ranks, per-rank batch ``total_batch // world``
    (at least 1). ``mode="weak"``: ``per_rank_samples`` and ``batch`` per rank.
    """
    from hflmpi.config import config_from_dict

    test_fraction = 0.2
    if mode == "strong":
        train_samples, rank_batch = total_samples, max(1, total_batch // world)
    elif mode == "weak":
        train_samples, rank_batch = per_rank_samples * world, batch
    else:
        raise ValueError(f"mode={mode!r} must be 'strong' or 'weak'")
    depth = len(fanouts)
    return config_from_dict({
        "run": {"seed": seed, "rounds": rounds, "out": out, "progress": "off", "eval_every": 0,
                "checkpoint_every": 0, "divergence": False},
        "topology": {"fanouts": list(fanouts)},
        "schedule": {"tau": TAUS[depth]},
        "quantize": {"bits": [bits] * depth},
        "data": {"name": "synthetic", "partition": "iid", "test_fraction": test_fraction,
                 "synthetic_samples": max(2, math.ceil(train_samples / (1 - test_fraction))),
                 "synthetic_features": features, "synthetic_classes": 10},
        "model": {"name": "mlp", "hidden": list(hidden)},
        "optim": {"lr": 0.05, "batch_size": rank_batch},
    })


def _mlp_numel(features: int, hidden: Sequence[int], classes: int = 10) -> int:
    widths = [features, *hidden, classes]
    return sum(a * b + b for a, b in zip(widths, widths[1:]))


def measure(
    comm: Any, out: str | Path, *, modes: Sequence[str] = ("strong", "weak"),
    depths: Sequence[int] = (1, 2, 3), collectives: bool = True,
    sizes: Sequence[int] = (8, 4096, 262144, 1 << 21), repeats: int = 5, **job: Any,
) -> list[dict[str, Any]]:
    """Run the scaling jobs over ``comm`` and append their rows to ``out`` (collective; rank 0 writes).

    Returns the rows (identical on every rank). ``job`` goes to :func:`job_config`.
    """
    from hflmpi.core.costmodel import bytes_per_round
    from hflmpi.federation import train
    from hflmpi.mpi.messages import bcast_text
    from hflmpi.record.reading import read_metrics

    rank, world = comm.Get_rank(), comm.Get_size()
    workdir = bcast_text(comm, tempfile.mkdtemp(prefix="hflmpi-scaling-") if rank == 0 else None,
                         root=0, max_bytes=4096, what="sharing rank 0's work directory")
    assert workdir is not None
    rows: list[dict[str, Any]] = []
    samples = []
    try:
        if collectives and world > 1:
            samples = time_collectives(comm, sizes, repeats)
        for depth, fanouts in depth_trees(world, depths):
            for mode in modes:
                path = os.path.join(workdir, f"d{depth}-{mode}.h5")
                config = job_config(world, fanouts, mode, path, **job)
                comm.Barrier()  # all ranks
                with open(os.devnull, "w") as quiet:
                    train(config, comm, stream=quiet)  # all ranks
                if rank == 0:
                    rows.append(_row(world, depth, fanouts, mode, config, read_metrics(path),
                                     bytes_per_round))
        rows = _bcast_rows(comm, rows, _RUN_COLUMNS)  # all ranks
        if rank == 0:
            append_table(out, "runs", _RUN_COLUMNS, rows)
            if samples:
                now = time.time()
                append_table(out, "collectives", _COLLECTIVE_COLUMNS,
                             [{"world": world, "op": s.op, "nbytes": s.nbytes, "seconds": s.seconds,
                               "time_unix": now} for s in samples])
        comm.Barrier()
    finally:
        if rank == 0:
            shutil.rmtree(workdir, ignore_errors=True)
    return rows


def _bcast_rows(comm: Any, rows: list[dict[str, Any]], columns: dict[str, str]) -> list[dict[str, Any]]:
    """Give every rank rank 0's ``rows`` as typed buffers, one per column kind (collective).

    ``i8`` and ``f8`` columns travel as int64 / float64 arrays ``[rows, columns]``, ``str``
    columns as UTF-8 texts; every rank (rank 0 too) returns the rows rebuilt from the buffers.
    """
    from hflmpi.mpi.messages import bcast_array, bcast_texts

    root = comm.Get_rank() == 0
    names = {kind: [n for n, k in columns.items() if k == kind] for kind in ("i8", "f8", "str")}
    count = len(rows) if root else 0
    tables: dict[str, Any] = {}
    for kind, dtype in (("i8", np.int64), ("f8", np.float64)):
        local = np.array([[row[n] for n in names[kind]] for row in rows], dtype=dtype).reshape(
            count, len(names[kind])) if root else None
        tables[kind] = bcast_array(comm, local, root=0, max_elements=_MAX_ROWS * len(names[kind]),
                                   dtypes=(dtype,), shape=(None, len(names[kind])),
                                   what=f"sharing rank 0's scaling rows ({kind} columns)")
    count = tables["i8"].shape[0]
    texts = bcast_texts(comm, [str(row[n]) for row in rows for n in names["str"]] if root else None,
                        root=0, max_count=_MAX_ROWS * len(names["str"]), max_bytes=1 << 20,
                        what="sharing rank 0's scaling rows (text columns)")
    if tables["f8"].shape[0] != count or len(texts) != count * len(names["str"]):
        from hflmpi.mpi.messages import MessageError

        raise MessageError(f"sharing rank 0's scaling rows: rank 0 sent {count} integer rows, "
                           f"{tables['f8'].shape[0]} float rows and {len(texts)} texts")
    out = []
    for i in range(count):
        row: dict[str, Any] = {}
        row.update(zip(names["i8"], (int(v) for v in tables["i8"][i])))
        row.update(zip(names["f8"], (float(v) for v in tables["f8"][i])))
        row.update(zip(names["str"], texts[i * len(names["str"]):(i + 1) * len(names["str"])]))
        out.append({n: row[n] for n in columns})
    return out


def _row(world: int, depth: int, fanouts: list[int], mode: str, config: Any,
         metrics: dict[str, np.ndarray], bytes_model: Any) -> dict[str, Any]:
    wall = np.asarray(metrics["wall_time"], dtype=np.float64)
    durations = np.diff(np.concatenate([[0.0], wall]))
    inner = slice(1, len(durations) - 1) if len(durations) >= 3 else slice(0, len(durations))
    used = durations[inner]
    compute = np.nansum(np.atleast_2d(metrics["compute_seconds"]), axis=1)[inner]
    comm_s = np.nansum(np.atleast_2d(metrics["comm_seconds"]), axis=1)[inner]
    sent = np.nansum(np.atleast_2d(metrics["bytes_sent"]), axis=1)[inner]
    tau, bits = list(config.schedule.tau), list(config.quantize.bits)
    numel = _mlp_numel(config.data.synthetic_features, config.model.hidden)
    round_seconds = float(np.median(used))
    return {
        "world": world, "depth": depth, "mode": mode, "fanouts": json.dumps(fanouts),
        "tau": json.dumps(tau), "bits": json.dumps(bits), "numel": numel,
        "batch": config.optim.batch_size,
        "samples_per_rank": config.data.synthetic_samples * (1 - config.data.test_fraction) / world,
        "rounds": int(config.run.rounds), "rounds_used": int(used.size),
        "round_seconds": round_seconds, "rounds_per_second": 1.0 / round_seconds,
        "compute_seconds": float(np.median(compute)), "comm_seconds": float(np.median(comm_s)),
        "bytes_per_round": float(np.median(sent)),
        "predicted_bytes_per_round": float(bytes_model(fanouts, tau, numel, bits, config.quantize.bucket_size,
                                                       config.aggregation.algorithm)),
        "samples_per_second": world * math.prod(tau) * config.optim.batch_size / round_seconds,
        "cores": os.cpu_count() or 1, "time_unix": time.time(), "host": socket.gethostname(),
    }


def time_collectives(comm: Any, sizes: Sequence[int], repeats: int = 5) -> list[Any]:
    """Time ``Allreduce``, ``Reduce``, ``Bcast`` and ``Gather`` of ``sizes`` bytes over ``comm``.

    Collective. Each time is the median over ``repeats`` of the slowest rank (after a barrier),
    the candidates interleaved (:func:`hflmpi.bench.time_interleaved`). Returns
    :class:`hflmpi.core.costmodel.Sample` rows.
    """
    from mpi4py import MPI

    from hflmpi.bench.aggregate import time_interleaved
    from hflmpi.core.costmodel import Sample

    world, rank = comm.Get_size(), comm.Get_rank()
    out = []
    for nbytes in sizes:
        count = max(1, nbytes // 4)
        buf = np.ones(count, dtype=np.float32)
        recv = np.empty(count * world, dtype=np.float32) if rank == 0 else None
        candidates = {
            "allreduce": lambda: comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM),
            "reduce": (lambda: comm.Reduce(MPI.IN_PLACE, buf, op=MPI.SUM, root=0)) if rank == 0
            else (lambda: comm.Reduce(buf, None, op=MPI.SUM, root=0)),
            "bcast": lambda: comm.Bcast(buf, root=0),
            "gather": lambda: comm.Gather(buf, recv, root=0),
        }
        medians = time_interleaved(comm, candidates, repeats)
        out += [Sample(op, world, float(count * 4), seconds) for op, seconds in medians.items()]
    return out
