"""Run pytest under mpiexec with one readable report: rank 0 prints, other ranks log to files.

Usage: ``mpiexec -n N python tests/mpi_pytest.py LOGDIR [pytest args...]``. Every rank runs the
same tests (pytest-mpi's ``--only-mpi`` is added); ranks > 0 write their report to
``LOGDIR/rank<R>.log`` and rank 0 also writes ``LOGDIR/junit.xml``. The exit code of each rank is
pytest's, with exit 5 (no tests collected) turned into a failure, so mpiexec fails if any rank did.
"""

from __future__ import annotations

import os
import sys

import pytest
from mpi4py import MPI


def main() -> int:
    log_dir, args = sys.argv[1], sys.argv[2:]
    rank = MPI.COMM_WORLD.Get_rank()
    os.makedirs(log_dir, exist_ok=True)
    if rank > 0:
        log = os.open(os.path.join(log_dir, f"rank{rank}.log"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(log, 1)
        os.dup2(log, 2)
    extra = ["--only-mpi", "-p", "no:cacheprovider"]
    if rank == 0:
        extra.append(f"--junitxml={os.path.join(log_dir, 'junit.xml')}")
    code = int(pytest.main(extra + args))
    if code == pytest.ExitCode.NO_TESTS_COLLECTED:
        print(f"rank {rank}: no MPI tests were collected; failing", flush=True)
        code = 1
    sys.stdout.flush()
    return code


if __name__ == "__main__":
    sys.exit(main())
