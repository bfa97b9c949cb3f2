"""Where a round of ``bench population`` goes: local training against the rest of the round.

Runs the ``bench population`` job (:class:`hflmpi.bench.population.PopulationJob`) through
:func:`hflmpi.federation.train` in three modes, alternating, ``--repeats`` times:
``sequential``, ``batched`` and ``no-training``, the last with
:meth:`hflmpi.learn.clients.ClientTrainer.train` replaced by one that returns the start models at
once (same selection, aggregation, reductions and record; nothing learnt). Per mode it prints
the median wall time of rounds 2..R-1 and, averaged over ranks and rounds, the wall and process
CPU time spent inside ``ClientTrainer.train`` and the process CPU time of the whole run.

The ``no-training`` round is the floor of any local-training speed-up: the ratio of two modes'
round times can be at most ``sequential round / no-training round``.

Usage (under MPI; times on a shared machine drift, compare modes of one run)::

    mpiexec -n 8 python -m mpi4py benchmarks/population_rounds.py [--cohort 0.1] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from typing import Any

import numpy as np
import torch
from mpi4py import MPI

from hflmpi.bench.population import PopulationJob, population_config, timed_rounds
from hflmpi.federation import train
from hflmpi.learn import clients as client_training
from hflmpi.mpi.messages import bcast_text
from hflmpi.record.reading import read_metrics


class _Timed:
    """Wrap ``ClientTrainer.train``: add its wall and CPU seconds; optionally train nothing."""

    def __init__(self) -> None:
        self.original = client_training.ClientTrainer.train
        self.skip = False
        self.wall = 0.0
        self.cpu = 0.0

    def __call__(self, trainer: Any, clients: Any, start_of: Any, steps: int) -> Any:
        wall, cpu = time.perf_counter(), time.process_time()
        if self.skip:
            result = client_training.PeriodResult({c: start_of(c).clone() for c in clients},
                                                  {c: 0.0 for c in clients},
                                                  {c: 1 for c in clients})
        else:
            result = self.original(trainer, clients, start_of, steps)
        self.wall += time.perf_counter() - wall
        self.cpu += time.process_time() - cpu
        return result


def main() -> None:
    """Run the modes and print one line per run (rank 0)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cohort", type=float, default=0.1, help="1: every client")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(1)
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    job = PopulationJob(cohort=args.cohort if args.cohort < 1 else 256.0, rounds=args.rounds)
    timed = _Timed()
    def train_timed(trainer: Any, clients: Any, start_of: Any, steps: int) -> Any:
        return timed(trainer, clients, start_of, steps)

    client_training.ClientTrainer.train = train_timed  # type: ignore[method-assign, assignment]
    workdir = bcast_text(comm, tempfile.mkdtemp() if rank == 0 else None, max_bytes=4096,
                         what="sharing rank 0's work directory")
    assert workdir is not None
    if rank == 0:
        print(f"# {size} ranks, cohort {args.cohort:g}, {job.rounds} rounds; per rank and round: "
              "ClientTrainer.train wall / CPU, whole process CPU (ms)", flush=True)
    try:
        for repeat in range(args.repeats):
            for mode in ("sequential", "batched", "no-training"):
                timed.skip, timed.wall, timed.cpu = mode == "no-training", 0.0, 0.0
                path = os.path.join(workdir, f"{mode}-{repeat}.h5")
                training = "sequential" if mode == "no-training" else mode
                cpu = time.process_time()
                with open(os.devnull, "w") as quiet:
                    train(population_config(job, training, path), comm, stream=quiet)
                mine = np.array([timed.wall, timed.cpu, time.process_time() - cpu]) / job.rounds
                means = np.zeros(3)
                comm.Reduce(mine, means, op=MPI.SUM, root=0)
                if rank == 0:
                    wall = statistics.median(timed_rounds(list(read_metrics(path)["wall_time"])))
                    train_wall, train_cpu, process = means / size * 1e3
                    print(f"{mode:<12} round {wall * 1e3:7.1f} ms   train wall {train_wall:6.1f}  "
                          f"train CPU {train_cpu:5.1f}  process CPU {process:6.1f}", flush=True)
    finally:
        comm.Barrier()
        if rank == 0:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
