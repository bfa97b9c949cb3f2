"""Regression tests of the papers' claims at CI scale: the small version of every experiment.

Each test runs one spec of ``experiments/`` with ``small=True`` over the 8 ranks of the MPI test
stage (``mpiexec -n 8 python tests/mpi_pytest.py LOGDIR tests/``), in process (no extra
``mpiexec``), and asserts the spec's ``[[check]]`` entries marked ``ci = true`` with their
``ci_margin``: the H-SGD sandwich ordering of local SGD (period I) >= H-SGD(I, G) >= local SGD
(period G) on the final-window accuracy, the upward/downward divergence ordering of mixed vs
by-label groups, divergences finite; quantization error strictly falling as bits grow at every
layer; bytes falling with bits; every depth, skew level and planned/random tau learning. The
trees are built for exactly 8 devices, so other world sizes skip. Together about 40-60 s on
2 shared cores.
"""

from __future__ import annotations

import io
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
from conftest import parallel_assert

pytest.importorskip("mpi4py")
from mpi4py import MPI  # noqa: E402

from hflmpi.experiments import evaluate_checks, load_experiment, load_results, run_experiment  # noqa: E402

SPECS = Path(__file__).resolve().parents[1] / "experiments"
NAMES = ["sandwich", "depth", "quantization", "heterogeneity", "tau_plan"]

pytestmark = [pytest.mark.mpi(min_size=8), pytest.mark.usefixtures("one_torch_thread")]


@pytest.fixture
def comm():
    comm = MPI.COMM_WORLD
    if comm.Get_size() != 8:
        pytest.skip("the experiments' trees are built for exactly 8 devices")
    return comm


@pytest.fixture
def shared_dir(comm):
    """A temporary directory with the same path on every rank (rank 0 creates and removes it)."""
    path = comm.bcast(tempfile.mkdtemp(prefix="hflmpi-exp-") if comm.rank == 0 else None, root=0)
    yield Path(path)
    comm.Barrier()
    if comm.rank == 0:
        shutil.rmtree(path, ignore_errors=True)


def _structure_problems(out: Path, spec: Path) -> list[str]:
    """Return what is wrong with a results file's curves (rank 0)."""
    exp = load_experiment(spec, small=True)
    attrs, variants = load_results(out)
    problems = []
    if exp.plan is None and [v.name for v in variants] != [v.name for v in exp.variants]:
        problems.append(f"variants {[v.name for v in variants]} != spec {[v.name for v in exp.variants]}")
    for v in variants:
        if sorted(v.seeds) != sorted(exp.seeds):
            problems.append(f"{v.name}: seeds {sorted(v.seeds)} != {sorted(exp.seeds)}")
        for seed, c in v.seeds.items():
            if int(c["step"][-1]) != int(v.attrs["steps"]):
                problems.append(f"{v.name}/{seed}: last step {c['step'][-1]} != {v.attrs['steps']}")
            if not np.isfinite(c["test_accuracy"][-1]):
                problems.append(f"{v.name}/{seed}: final round not evaluated")
            if np.any(np.diff(c["bytes_cum"]) <= 0) or np.any(np.diff(c["model_time"]) <= 0):
                problems.append(f"{v.name}/{seed}: cumulative bytes/time not increasing")
    return problems


@pytest.mark.parametrize("name", NAMES)
def test_small_experiment_reproduces_claims(comm, shared_dir, name):
    spec = SPECS / f"{name}.toml"
    out = shared_dir / f"{name}.h5"
    run_experiment(spec, out, comm, small=True, stream=io.StringIO())  # all ranks
    verdict = None
    if comm.rank == 0:
        checks = [c for c in evaluate_checks(out, ci=True) if c.ci]
        failed = [f"{c.claim}: {c.detail}" for c in checks if not c.passed]
        failed += _structure_problems(out, spec)
        if not checks:
            failed.append(f"{name}: no ci check was evaluated")
        verdict = (not failed, "; ".join(failed))
    ok, message = comm.bcast(verdict, root=0)
    parallel_assert(comm, ok, message)


def test_run_files_are_kept_and_reused(comm, shared_dir):
    """``reuse=True`` skips complete runs: the second sweep trains nothing and rewrites the same curves."""
    spec = SPECS / "quantization.toml"
    out = shared_dir / "q.h5"
    run_experiment(spec, out, comm, small=True, only=["l1-b8"], stream=io.StringIO())
    log = io.StringIO()
    run_experiment(spec, out, comm, small=True, only=["l1-b8"], reuse=True, stream=log)
    ok, message = True, ""
    if comm.rank == 0:
        run_file = out.parent / "q.runs" / "l1-b8__seed0.h5"
        ok = run_file.exists() and "reused" in log.getvalue() and not any(
            p.name.endswith(".ckpt.h5") for p in run_file.parent.iterdir())
        message = f"run file {run_file} missing, not reused or checkpoint left: {log.getvalue()!r}"
    ok, message = comm.bcast((ok, message), root=0)
    parallel_assert(comm, ok, message)
