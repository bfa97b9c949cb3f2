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
"""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np

__all__ = [
    "TAUS",
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

PREDICT_WORLDS = [64, 128, 256, 512, 1024, 2048, 4096]

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
    from hflmpi.mpi.messages import bcast_text
    from hflmpi.record.store import read_metrics
    from hflmpi.federation import train

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


# ---------------------------------------------------------------------------------------------
# HDF5 table


def append_table(path: str | Path, group: str, columns: dict[str, str], rows: Sequence[dict[str, Any]]) -> None:
    """Append ``rows`` to ``/group/<column>`` datasets of ``path`` (created resizable if missing)."""
    import h5py

    if not rows:
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "a") as file:
        table = file.require_group(group)
        start = None
        for name, kind in columns.items():
            dtype = h5py.string_dtype() if kind == "str" else np.dtype(kind)
            if name not in table:
                table.create_dataset(name, shape=(0,), maxshape=(None,), dtype=dtype, chunks=(256,))
            ds = table[name]
            start = ds.shape[0] if start is None else start
            if ds.shape[0] != start:
                raise ValueError(f"{path}:/{group} has columns of different lengths; the file is damaged")
            ds.resize((start + len(rows),))
            values = [row[name] for row in rows]
            ds[start:] = values if kind == "str" else np.asarray(values, dtype=kind)
        file.flush()


def read_table(path: str | Path, group: str) -> list[dict[str, Any]]:
    """Return the rows of ``/group`` in ``path`` (empty if the group does not exist)."""
    import h5py

    with h5py.File(path, "r") as file:
        if group not in file:
            return []
        table = file[group]
        columns = {}
        for name, ds in table.items():
            data = ds[()]
            if h5py.check_string_dtype(ds.dtype) is not None:
                data = [v.decode() if isinstance(v, bytes) else str(v) for v in data]
            else:
                data = data.tolist()
            columns[name] = data
    length = min(len(v) for v in columns.values()) if columns else 0
    return [{name: values[i] for name, values in columns.items()} for i in range(length)]


def latest_rows(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Keep the newest row per (world, depth, mode), sorted by mode, depth and world."""
    latest: dict[tuple[int, int, str], dict[str, Any]] = {}
    for row in rows:
        key = (int(row["world"]), int(row["depth"]), str(row["mode"]))
        if key not in latest or row["time_unix"] >= latest[key]["time_unix"]:
            latest[key] = row
    return sorted(latest.values(), key=lambda r: (r["mode"], r["depth"], r["world"]))


# ---------------------------------------------------------------------------------------------
# Predictions and plots


def predictions(
    rows: Sequence[dict[str, Any]], samples: Sequence[dict[str, Any]],
    worlds: Sequence[int] = PREDICT_WORLDS, numel: int | None = None,
    t_cp_override: float | None = None,
) -> dict[str, Any]:
    """Fit the cost model to the measurements and predict rounds/second and bytes per round.

    The fits: alpha-beta-gamma of shared memory from the collectives timed with ``p <= cores``
    ("shm-calibrated"; also over all samples and per ``p``, for the tables), compute per step
    ``t_cp(b) = c0 + c1 b`` and a fixed per-round overhead (round time minus compute minus
    communication) from the runs with ``world <= cores``. The predictions for ``worlds`` use
    :func:`hflmpi.core.costmodel.tree_for` trees with the measured schedule per depth, one core (or
    GPU) per rank, the per-rank batch of the mode (strong: the measured total batch split over
    the ranks, at least 1) and the named interconnects; "nvlink+ib-hdr" puts layer 1 (groups of
    8, one node) on NVLink and the layers above on InfiniBand. With ``numel`` (another model
    size) the per-sample compute term ``c1`` is scaled by ``numel / measured numel``;
    ``t_cp_override`` replaces the compute model by a fixed seconds per step (e.g. a GPU's).

    Returns ``{"network", "network_here", "per_world", "compute", "overhead", "networks",
    "measured_model", "predicted", "cores"}``; each prediction row has world, depth, mode,
    network, fanouts, batch, rounds_per_second, round_seconds, comm_seconds, bytes_per_round.
    """
    from hflmpi.core.costmodel import INTERCONNECTS, Sample, calibrate, fit_compute, predict, tree_for, with_gamma

    rows = latest_rows(rows)
    if not rows:
        raise ValueError("no scaling rows to predict from")
    cores = int(rows[0].get("cores", 2))
    timed = [Sample(s["op"], int(s["world"]), float(s["nbytes"]), float(s["seconds"])) for s in samples]
    # The predictions assume a core per rank, so they use the collectives timed with p <= cores;
    # the fits over all samples and per p (listed in the tables) show what oversubscription does.
    shm_here = shm = None
    per_world: dict[int, Any] = {}
    if sum(1 for s in timed if s.p > 1) >= 3:
        shm_here = calibrate(timed, "shm-here", note=f"fit to all {len(timed)} timed collectives")
        for p in sorted({s.p for s in timed if s.p > 1}):
            mine = [s for s in timed if s.p == p]
            if len(mine) >= 3:  # oversubscribed sizes get their own (much larger) alpha and beta
                per_world[p] = calibrate(mine, f"shm-here-{p}", note=f"fit to {len(mine)} collectives at p={p}")
        own_cores = [s for s in timed if 1 < s.p <= cores]
        shm = (calibrate(own_cores, "shm-calibrated",
                         note=f"fit to {len(own_cores)} timed collectives with p <= {cores} cores")
               if len(own_cores) >= 3 else replace(shm_here, name="shm-calibrated"))
    own = [r for r in rows if int(r["world"]) <= cores] or rows
    steps = [math.prod(json.loads(r["tau"])) for r in own]
    c0, c1 = fit_compute([r["batch"] for r in own], [r["compute_seconds"] / s for r, s in zip(own, steps)])
    overhead = float(np.median([max(0.0, r["round_seconds"] - r["compute_seconds"] - r["comm_seconds"])
                                for r in own]))
    gamma = shm.gamma if shm is not None and shm.gamma > 0 else None
    networks: dict[str, Any] = {}
    if shm is not None:
        networks["shm-calibrated"] = shm
    for name in ("ib-hdr", "25gbe"):
        net = INTERCONNECTS[name]
        networks[name] = with_gamma(net, gamma) if gamma is not None else net
    networks["nvlink+ib-hdr"] = [INTERCONNECTS["nvlink"], networks["ib-hdr"]]  # layer 1 in the node

    def t_cp(batch: float, size: int | None = None, measured: int | None = None) -> float:
        # A different model size scales the per-sample term (MLP FLOPs ~ parameters).
        scale = size / measured if size and measured else 1.0
        return t_cp_override if t_cp_override is not None else c0 + c1 * batch * scale

    measured_model = []
    if shm_here is not None:
        for r in rows:
            if int(r["world"]) > cores:
                continue  # oversubscribed: CPU time-slicing, not the network, sets the pace
            fanouts, tau, bits = json.loads(r["fanouts"]), json.loads(r["tau"]), json.loads(r["bits"])
            here = per_world.get(int(r["world"]), shm_here)
            out = predict(int(r["world"]), fanouts, tau, int(r["numel"]), c0 + c1 * r["batch"],
                          here, bits, overhead=overhead)
            measured_model.append({**_key(r), "network": "shm-here", **out})
    predicted = []
    reference = {(int(r["depth"]), r["mode"]): r for r in rows}
    for (depth, mode), r in sorted(reference.items()):
        tau, bits = json.loads(r["tau"]), json.loads(r["bits"])
        size = numel or int(r["numel"])
        total_batch = int(r["batch"]) * int(r["world"])
        for world in worlds:
            batch = max(1.0, total_batch / world) if mode == "strong" else float(r["batch"])
            fanouts = tree_for(world, depth)
            for name, net in networks.items():
                layer_nets = net
                if isinstance(net, list):
                    layer_nets = [net[0]] + [net[1]] * (depth - 1) if depth > 1 else [net[1]]
                out = predict(world, fanouts, tau, size, t_cp(batch, size, int(r["numel"])), layer_nets, bits,
                              overhead=overhead)
                out["world"] = world
                predicted.append({"world": world, "depth": depth, "mode": mode, "network": name,
                                  "fanouts": json.dumps(fanouts), "batch": batch, "numel": size, **out})
    return {"network": shm, "network_here": shm_here, "per_world": per_world, "compute": (c0, c1),
            "overhead": overhead,
            "networks": networks,
            "measured_model": measured_model, "predicted": predicted, "cores": cores}


def _key(row: dict[str, Any]) -> dict[str, Any]:
    return {"world": int(row["world"]), "depth": int(row["depth"]), "mode": row["mode"],
            "fanouts": row["fanouts"]}


def _tables(rows: Sequence[dict[str, Any]], model: dict[str, Any]) -> str:
    lines = ["## Measured (this machine)", "",
             "| mode | ranks | depth | fanouts | batch/rank | rounds/s | compute s/round | comm s/round "
             "| bytes/round | model bytes/round | model rounds/s (P <= cores) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    fitted = {(m["world"], m["depth"], m["mode"]): m for m in model["measured_model"]}
    for r in latest_rows(rows):
        m = fitted.get((int(r["world"]), int(r["depth"]), r["mode"]))
        lines.append(
            f"| {r['mode']} | {r['world']} | {r['depth']} | {r['fanouts']} | {r['batch']} "
            f"| {r['rounds_per_second']:.1f} | {r['compute_seconds']:.4f} | {r['comm_seconds']:.4f} "
            f"| {r['bytes_per_round']:.0f} | {r['predicted_bytes_per_round']:.0f} "
            f"| {m['rounds_per_second']:.1f} |" if m else
            f"| {r['mode']} | {r['world']} | {r['depth']} | {r['fanouts']} | {r['batch']} "
            f"| {r['rounds_per_second']:.1f} | {r['compute_seconds']:.4f} | {r['comm_seconds']:.4f} "
            f"| {r['bytes_per_round']:.0f} | {r['predicted_bytes_per_round']:.0f} | oversubscribed |")
    c0, c1 = model["compute"]
    lines += ["", "## Fitted model", ""]
    for shm in [model["network"], model["network_here"], *model["per_world"].values()]:
        if shm is not None:
            lines.append(f"- {shm.name} ({shm.note}): alpha = {shm.alpha * 1e6:.2f} us, "
                         f"beta = {shm.beta * 1e9:.4f} ns/B "
                         f"({1 / shm.beta / 1e9 if shm.beta else math.inf:.2f} GB/s), "
                         f"gamma = {shm.gamma * 1e9:.4f} ns/B")
    lines.append(f"- compute per SGD step: t_cp(b) = {c0 * 1e3:.4f} ms + {c1 * 1e6:.3f} us x batch")
    lines.append(f"- fixed per-round overhead (metrics, HDF5 record): {model['overhead'] * 1e3:.2f} ms")
    lines += ["", "## Predicted rounds/second (bytes/round is network-independent)", ""]
    names = list(model["networks"])
    lines.append("| mode | depth | ranks | fanouts | batch/rank | " + " | ".join(names) + " | bytes/round |")
    lines.append("|---|---|---|---|---|" + "---|" * len(names) + "---|")
    grouped: dict[tuple[str, int, int], dict[str, Any]] = {}
    for p in model["predicted"]:
        grouped.setdefault((p["mode"], p["depth"], p["world"]), {})[p["network"]] = p
    for (mode, depth, world), by_net in sorted(grouped.items()):
        first = next(iter(by_net.values()))
        cells = " | ".join(f"{by_net[n]['rounds_per_second']:.2f}" for n in names)
        lines.append(f"| {mode} | {depth} | {world} | {first['fanouts']} | {first['batch']:g} | {cells} "
                     f"| {first['bytes_per_round']:.3g} |")
    return "\n".join(lines)


def plot(
    path: str | Path, plots: str | Path, numel: int | None = None,
    worlds: Sequence[int] = PREDICT_WORLDS, t_cp: float | None = None,
) -> tuple[list[Path], str]:
    """Draw measured scaling with the model's predictions to PNGs in ``plots``; return them and the tables."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_table(path, "runs")
    samples = read_table(path, "collectives")
    model = predictions(rows, samples, worlds=worlds, numel=numel, t_cp_override=t_cp)
    latest = latest_rows(rows)
    out_dir = Path(plots)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    depths = sorted({int(r["depth"]) for r in latest})
    for mode in sorted({r["mode"] for r in latest}):
        fig, axes = plt.subplots(1, len(depths), figsize=(5 * len(depths), 4), squeeze=False)
        for ax, depth in zip(axes[0], depths):
            mine = [r for r in latest if r["mode"] == mode and int(r["depth"]) == depth]
            ax.plot([r["world"] for r in mine], [r["rounds_per_second"] for r in mine], "ko",
                    label="measured (2 cores)")
            fit = [m for m in model["measured_model"] if m["mode"] == mode and m["depth"] == depth]
            if fit:
                ax.plot([m["world"] for m in fit], [m["rounds_per_second"] for m in fit], "k--",
                        label="model, shm fit (P <= cores)")
            for name in model["networks"]:
                pts = [p for p in model["predicted"]
                       if p["mode"] == mode and p["depth"] == depth and p["network"] == name]
                ax.plot([p["world"] for p in pts], [p["rounds_per_second"] for p in pts], "-", label=name)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("ranks")
            ax.set_ylabel("rounds / second")
            ax.set_title(f"{mode} scaling, depth {depth}")
            ax.grid(True, which="both", alpha=0.3)
        axes[0][0].legend(fontsize=7)
        fig.tight_layout()
        target = out_dir / f"scaling_{mode}_rounds.png"
        fig.savefig(target, dpi=110)
        plt.close(fig)
        written.append(target)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), squeeze=False)
    for ax, mode in zip(axes[0], ("strong", "weak")):
        for depth in depths:
            mine = [r for r in latest if r["mode"] == mode and int(r["depth"]) == depth]
            pts = [p for p in model["predicted"] if p["mode"] == mode and p["depth"] == depth
                   and p["network"] == "ib-hdr"]
            line, = ax.plot([p["world"] for p in pts], [p["bytes_per_round"] for p in pts], "-",
                            label=f"depth {depth} (model)")
            ax.plot([r["world"] for r in mine], [r["bytes_per_round"] for r in mine], "o",
                    color=line.get_color(), label=f"depth {depth} (measured)")
            ax.plot([r["world"] for r in mine], [r["predicted_bytes_per_round"] for r in mine], "x",
                    color="k", markersize=8)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("ranks")
        ax.set_ylabel("uplink bytes / round (all ranks)")
        ax.set_title(f"{mode} scaling (x: model at the measured trees)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    target = out_dir / "scaling_bytes.png"
    fig.savefig(target, dpi=110)
    plt.close(fig)
    written.append(target)
    return written, _tables(rows, model)
