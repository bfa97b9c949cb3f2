"""Client-steps per second of a population: batched versus sequential training (``bench population``).

One job, trained twice in the same invocation with :func:`hflmpi.federation.train` and only
``clients.training`` changed: ``N`` clients (256 by default) of an MLP on the bundled digits,
placed on the MPI ranks, a tree of clients (``[16, 4, 4]`` by default) with ``tau = [5, 2, 2]``
(20 local steps per round), a uniformly drawn cohort (10% by default) each round. Uniform
selection makes both modes train the same cohorts (priority selection would follow the losses,
which differ by float rounding between the modes).

The measure is ``participants x local steps per round / median round time``: the round times
come from the run record's ``wall_time``; round 1 (start-up, first batches) and the last round
(evaluation and checkpoint) are left out. Both runs report their final test accuracy, which agree
up to float rounding; and the bytes: the record's ``bytes_sent`` per layer counts every
participating client's uplink as its own message, its ``mpi_bytes`` the buffers really handed
to MPI (one partial sum per rank and spanning node).
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import statistics
import tempfile
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np

__all__ = ["MODES", "PopulationJob", "default_fanouts", "default_tau", "format_report",
           "population_config", "run_population", "timed_rounds"]

MODES = ("sequential", "batched")


def default_fanouts(clients: int) -> tuple[int, ...]:
    """Return the tree of ``clients``: ``[16, 4, 4]`` for 256 (the example job), else flat."""
    return (16, 4, 4) if clients == 256 else (clients,)


def default_tau(depth: int) -> tuple[int, ...]:
    """Return ``[5, 2, 2, ...]``: 5 local steps per edge period, 2 periods per layer above."""
    return (5,) + (2,) * (depth - 1)


@dataclass(frozen=True)
class PopulationJob:
    """The population both training modes run (see the module docstring)."""

    clients: int = 256
    cohort: float = 0.1
    rounds: int = 8
    fanouts: tuple[int, ...] = (16, 4, 4)
    tau: tuple[int, ...] = (5, 2, 2)
    hidden: tuple[int, ...] = (128,)
    bits: tuple[int, ...] = ()
    batch: int = 8
    lr: float = 0.05
    seed: int = 0
    batch_clients: int = 64

    @property
    def steps(self) -> int:
        """Local steps per client per round, ``prod(tau)``."""
        return math.prod(self.tau)

    @property
    def cohort_size(self) -> int:
        """Clients selected per round (every client is online; ``cohort`` as in ``[clients]``)."""
        from hflmpi.core.selection import SelectionOptions, cohort_size

        return int(cohort_size(SelectionOptions("uniform", self.cohort, seed=self.seed),
                               self.clients))


def population_config(job: PopulationJob, training: str, out: str) -> Any:
    """Return the :class:`~hflmpi.config.RunConfig` of ``job`` trained in mode ``training``."""
    from hflmpi.config import config_from_dict

    sections: dict[str, Any] = {
        "run": {"seed": job.seed, "rounds": job.rounds, "out": out, "progress": "off",
                "eval_every": 0, "checkpoint_every": 0, "divergence": False},
        "clients": {"count": job.clients, "training": training, "cohort": job.cohort,
                    "selection": "all" if job.cohort_size == job.clients else "uniform",
                    "batch_clients": job.batch_clients},
        "topology": {"fanouts": list(job.fanouts)},
        "schedule": {"tau": list(job.tau)},
        "data": {"name": "digits", "partition": "iid"},
        "model": {"name": "mlp", "hidden": list(job.hidden)},
        "optim": {"lr": job.lr, "batch_size": job.batch},
    }
    if job.bits:
        sections["quantize"] = {"bits": list(job.bits)}
    return config_from_dict(sections)


@contextlib.contextmanager
def _environment(name: str, value: str | None) -> Iterator[None]:
    """Set (or, with None, leave) the environment variable ``name`` while the block runs."""
    before = os.environ.get(name)
    if value is not None:
        os.environ[name] = value
    try:
        yield
    finally:
        if value is not None:
            if before is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = before


def timed_rounds(wall_time: Sequence[float]) -> list[float]:
    """Return the seconds of rounds 2..R-1 from cumulative ``wall_time`` (all when R < 3)."""
    rounds = np.diff(np.concatenate([[0.0], np.asarray(wall_time, dtype=np.float64)])).tolist()
    inner = rounds[1:-1]
    return inner if inner else rounds


def run_population(comm: Any, job: PopulationJob, training: str,
                   compile: bool = False) -> dict[str, Any]:
    """Train ``job`` in mode ``training`` over ``comm`` and measure it (collective).

    With ``compile``, the batched step is compiled (:data:`hflmpi.learn.batched.COMPILE_ENV` is
    set to ``1`` for the run and restored afterwards).

    Returns (on every rank) ``mode``, ``round_seconds`` (all rounds), ``median_round_seconds``
    (rounds 2..R-1), ``rounds_timed``, ``participants`` (per round), ``client_steps_per_second``,
    ``test_accuracy``, ``client_bytes`` and ``mpi_bytes`` (per layer, summed over the ranks and
    divided by the rounds).
    """
    from hflmpi.federation import train
    from hflmpi.learn.batched import COMPILE_ENV
    from hflmpi.mpi.messages import bcast_array, bcast_text
    from hflmpi.record.reading import read_clients, read_metrics

    if training not in MODES:
        raise ValueError(f"training={training!r}: choose one of {MODES}")
    rank = comm.Get_rank()
    workdir = bcast_text(comm, tempfile.mkdtemp(prefix="hflmpi-population-") if rank == 0
                         else None, max_bytes=4096, what="sharing rank 0's work directory")
    assert workdir is not None
    depth = len(job.fanouts)
    try:
        path = os.path.join(workdir, f"{training}.h5")
        with open(os.devnull, "w") as quiet, _environment(COMPILE_ENV, "1" if compile else None):
            result = train(population_config(job, training, path), comm, stream=quiet)
        table = None
        if rank == 0:
            metrics = read_metrics(path)
            clients = read_clients(path)
            assert clients is not None
            table = np.concatenate([
                np.asarray(metrics["wall_time"], np.float64),
                clients["participated"].sum(axis=1).astype(np.float64),
                np.asarray(metrics["bytes_sent"], np.float64).sum(axis=0),
                np.asarray(metrics["mpi_bytes"], np.float64).sum(axis=0),
            ])
        table = bcast_array(comm, table, root=0, max_elements=2 * job.rounds + 2 * depth,
                            dtypes=(np.float64,), shape=(None,), what="sharing the run's rows")
    finally:
        comm.Barrier()
        if rank == 0:
            shutil.rmtree(workdir, ignore_errors=True)
    rounds = job.rounds
    wall, participants = table[:rounds], table[rounds:2 * rounds]
    client_bytes, mpi = table[2 * rounds:2 * rounds + depth], table[2 * rounds + depth:]
    timed = timed_rounds(wall.tolist())
    median = statistics.median(timed)
    per_round = float(np.median(participants)) * job.steps
    return {
        "mode": training + ("+compile" if compile else ""),
        "round_seconds": np.diff(np.concatenate([[0.0], wall])).tolist(),
        "median_round_seconds": median,
        "rounds_timed": len(timed),
        "participants": participants.astype(int).tolist(),
        "client_steps_per_second": per_round / median if median > 0 else math.inf,
        "test_accuracy": float(result.test_accuracy),
        "client_bytes": (client_bytes / rounds).tolist(),
        "mpi_bytes": (mpi / rounds).tolist(),
    }


def format_report(job: PopulationJob, ranks: int, results: Sequence[dict[str, Any]],
                  cores: int | None = None) -> str:
    """Return the report of ``results`` (one per mode) and, with both modes, their ratio."""
    cores = os.cpu_count() if cores is None else cores
    quant = f"{list(job.bits)}-bit" if job.bits else "exact (float32)"
    cohort = ("all (every client every round)" if job.cohort_size == job.clients else
              f"{job.cohort:g} (uniform, {job.cohort_size} clients per round)")
    lines = [
        f"# population: {job.clients} clients on {ranks} ranks ({cores} cores), tree "
        f"{list(job.fanouts)}, tau {list(job.tau)} ({job.steps} local steps per round), cohort "
        f"{cohort}, MLP digits "
        f"64-{'-'.join(map(str, job.hidden))}-10, batch {job.batch}, {quant} aggregation, "
        f"{job.rounds} rounds (median of rounds 2..R-1)",
        f"{'mode':<16} {'s/round':>9} {'rounds timed':>13} {'client-steps/s':>15} "
        f"{'test acc':>9} {'client B/round':>15} {'MPI B/round':>13}",
    ]
    for r in results:
        lines.append(
            f"{r['mode']:<16} {r['median_round_seconds']:>9.4f} {r['rounds_timed']:>13} "
            f"{r['client_steps_per_second']:>15.1f} {r['test_accuracy']:>9.4f} "
            f"{sum(r['client_bytes']):>15.0f} {sum(r['mpi_bytes']):>13.0f}")
    for r in results:
        layers = ", ".join(f"L{n}: {c:.0f} / {m:.0f}" for n, (c, m) in
                           enumerate(zip(r["client_bytes"], r["mpi_bytes"]), start=1))
        lines.append(f"# {r['mode']} bytes per round, per-client count / handed to MPI: {layers}")
    by_mode = {r["mode"].split("+")[0]: r for r in results}
    if set(MODES) <= set(by_mode):
        seq, bat = by_mode["sequential"], by_mode["batched"]
        ratio = bat["client_steps_per_second"] / seq["client_steps_per_second"]
        lines.append(f"batched / sequential client-steps/s: {ratio:.2f}x; test accuracy "
                     f"difference {abs(bat['test_accuracy'] - seq['test_accuracy']):.4f}")
    return "\n".join(lines)
