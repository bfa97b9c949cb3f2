"""MPI test of :mod:`hflmpi.bench.scaling`: a minimal scaling measurement, its HDF5 rows and the plot.

Run with ``mpiexec -n N python tests/mpi_pytest.py LOGDIR tests/test_scaling_mpi.py`` (any N).
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import pytest
import torch
from conftest import parallel_assert

pytest.importorskip("mpi4py")
from mpi4py import MPI  # noqa: E402

from hflmpi.bench.scaling import latest_rows, measure, plot, read_table  # noqa: E402

TINY = dict(rounds=3, features=16, hidden=(32,), total_samples=256, total_batch=16,
            per_rank_samples=64, batch=8)


@pytest.fixture
def shared_dir():
    comm = MPI.COMM_WORLD
    path = comm.bcast(tempfile.mkdtemp(prefix="hflmpi-test-scaling-") if comm.Get_rank() == 0 else None)
    yield Path(path)
    comm.Barrier()
    if comm.Get_rank() == 0:
        shutil.rmtree(path, ignore_errors=True)


@pytest.mark.mpi(min_size=1)
def test_scaling_rows_and_plot(shared_dir):
    comm = MPI.COMM_WORLD
    size, rank = comm.Get_size(), comm.Get_rank()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = shared_dir / "scaling.h5"
        rows = measure(comm, out, depths=(1,), sizes=(8, 4096), repeats=2, **TINY)
        rows_again = measure(comm, out, depths=(1,), collectives=False, **TINY)
    finally:
        torch.set_num_threads(threads)
    parallel_assert(comm, [(r["world"], r["depth"], r["mode"]) for r in rows]
                    == [(size, 1, "strong"), (size, 1, "weak")], f"rows {rows}")
    parallel_assert(comm, all(r["rounds_per_second"] > 0 and r["rounds_used"] == 1 for r in rows),
                    "rounds/second must be positive, from the one inner round")
    # the cost model's byte count is exact: every non-root device uploads the float32 model once
    parallel_assert(comm, all(r["bytes_per_round"] == r["predicted_bytes_per_round"]
                              == (size - 1) * 4 * r["numel"] for r in rows),
                    f"bytes {[(r['bytes_per_round'], r['predicted_bytes_per_round']) for r in rows]}")
    strong, weak = rows
    parallel_assert(comm, strong["batch"] == max(1, 16 // size) and weak["batch"] == 8, "batch sizes")
    parallel_assert(comm, len(rows_again) == 2, "second measurement")
    verdict, message = True, ""
    if rank == 0:
        table = read_table(out, "runs")
        timed = read_table(out, "collectives")
        written, text = plot(out, shared_dir / "plots")
        checks = [
            (len(table) == 4, f"{len(table)} rows in /runs, expected 4 (two appends)"),
            (len(latest_rows(table)) == 2, "latest_rows keeps one row per (world, depth, mode)"),
            (len(timed) == (8 if size > 1 else 0), f"{len(timed)} timed collectives"),
            (all(p.is_file() and p.stat().st_size > 0 for p in written) and len(written) == 3,
             f"plots {written}"),
            ("Predicted rounds/second" in text and "| 4096 |" in text, "tables"),
        ]
        failed = [m for ok, m in checks if not ok]
        verdict, message = not failed, "; ".join(failed)
    request = comm.Ibarrier()  # the others sleep while rank 0 plots (busy waits would starve it)
    while not request.Test():
        time.sleep(0.02)
    parallel_assert(comm, verdict, message)
