"""Shared test helpers: tree shapes for any world size and a hang-free parallel assert."""

from __future__ import annotations

import itertools
import random
import sys
from pathlib import Path
from typing import Any

import pytest


def ordered_factorizations(n: int, max_len: int) -> list[list[int]]:
    """Return every ordered factorization of ``n`` into 1..max_len factors >= 2 (plus ``[n]``)."""
    out: list[list[int]] = [[n]]

    def extend(prefix: list[int], rest: int) -> None:
        if len(prefix) >= max_len:
            return
        for f in range(2, rest + 1):
            if rest % f == 0:
                if rest // f == 1:
                    if len(prefix) >= 1:
                        out.append(prefix + [f])
                else:
                    extend(prefix + [f], rest // f)

    extend([], n)
    return [list(x) for x in {tuple(x) for x in out}]


def random_nested_groups(world_size: int, depth: int, seed: int) -> Any:
    """Return a random uneven nested group spec of exactly ``depth`` layers over ``world_size`` ranks."""
    rng = random.Random(seed)
    ranks = list(range(world_size))
    rng.shuffle(ranks)

    def split(items: list[Any]) -> list[list[Any]]:
        if len(items) == 1:
            return [items]
        cuts = sorted(rng.sample(range(1, len(items)), rng.randint(0, min(3, len(items) - 1))))
        bounds = [0, *cuts, len(items)]
        return [items[a:b] for a, b in zip(bounds, bounds[1:])]

    level: list[Any] = ranks
    for _ in range(depth - 1):
        level = split(level)
    return level


def tree_specs(world_size: int) -> list[tuple[str, Any]]:
    """Return ``(kind, spec)`` pairs covering depth 1..4, balanced and uneven, for ``world_size``."""
    specs: list[tuple[str, Any]] = []
    for fan in ordered_factorizations(world_size, 4):
        specs.append(("fanouts", fan))
    specs.append(("fanouts", [1] * 3 + [world_size]))  # depth 4, singleton groups below the root
    for depth, seed in itertools.product((1, 2, 3, 4), (0, 1)):
        specs.append(("groups", random_nested_groups(world_size, depth, seed)))
    return specs


@pytest.fixture
def comm() -> Any:
    """The world communicator of an MPI test."""
    from mpi4py import MPI

    return MPI.COMM_WORLD


@pytest.fixture
def shared_dir(comm: Any) -> Any:
    """A temporary directory with the same path on every rank (rank 0 creates and removes it)."""
    import shutil
    import tempfile

    path = comm.bcast(tempfile.mkdtemp(prefix="hflmpi-mpi-") if comm.rank == 0 else None, root=0)
    yield path
    comm.Barrier()
    if comm.rank == 0:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def one_torch_thread():
    """Run torch on one thread: tiny models crawl with several on a shared, oversubscribed CPU."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


MPIEXEC = Path(sys.executable).with_name("mpiexec")  # the venv's launcher, next to its python
JOBS = Path(__file__).resolve().parent.parent / "jobs"


def preemptible_run(out: Path, rounds: int, *settings: str) -> list[str]:
    """Return an ``mpiexec -n 2 ... hflmpi run jobs/preemptible.toml`` command for a tiny job.

    The job writes ``out``, runs ``rounds`` global rounds of a 2-rank FedAvg tree with tau 3 and
    no progress output; ``settings`` adds more ``--set`` pairs or flags.
    """
    return [
        str(MPIEXEC), "-n", "2", sys.executable, "-m", "mpi4py", "-m", "hflmpi", "run",
        str(JOBS / "preemptible.toml"),
        "--set", f'run.out="{out}"', "--set", f"run.rounds={rounds}",
        "--set", "topology.fanouts=[2]", "--set", "schedule.tau=[3]",
        "--set", 'run.progress="off"', *settings,
    ]


def wait_for_rounds(run_file: Any, rounds: int, timeout: float = 300.0) -> None:
    """Poll a run file written by another process until it records ``rounds`` rounds."""
    import time

    from hflmpi.record.reading import read_metrics

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if len(read_metrics(run_file)["round"]) >= rounds:
                return
        except (OSError, KeyError):
            pass
        time.sleep(0.2)
    pytest.fail(f"{run_file} did not reach {rounds} rounds within {timeout:.0f} s")


def parallel_assert(comm: Any, condition: bool, message: str = "") -> None:
    """Assert ``condition`` on every rank at once, so one failing rank cannot hang the others."""
    verdicts = comm.allgather((bool(condition), message))
    failed = [(rank, msg) for rank, (ok, msg) in enumerate(verdicts) if not ok]
    if failed:
        pytest.fail("; ".join(f"rank {rank}: {msg}" for rank, msg in failed), pytrace=False)
