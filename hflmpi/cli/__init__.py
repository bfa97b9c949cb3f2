"""Command line: ``hflmpi run|init|report|plan|bench|experiments`` and ``hflmpi --version``.

Launch training under MPI as ``mpiexec -n 8 python -m mpi4py -m hflmpi run CONFIG.toml`` so an
exception on one rank aborts the whole job instead of hanging it.
"""

from __future__ import annotations

import platform
import sys
from pathlib import Path
from typing import Sequence

import hflmpi

__all__ = ["main", "version_line"]

_USAGE = """usage: hflmpi {run,init,report,plan,bench,experiments} ... | --version

  run CONFIG.toml [--set key=value ...] [--resume RUN.h5]   train (under mpiexec)
  run --example NAME [--overwrite]                           train on a bundled example config
  init [DIR] [--force]                                       write the example configs into DIR
  report RUN.h5 [RUN2.h5 ...] [--out DIR]                    summary table and plots
  plan --t-cp S --t-cm S1,S2 --deadline D [--bits 8,4 ...]  choose tau within a deadline
  bench aggregate|scaling|flower [...]                       benchmarks (under mpiexec)
  experiments run SPEC --out R.h5 | plot R.h5 --out DIR     paper-reproduction sweeps
"""


def main(argv: Sequence[str] | None = None) -> int:
    """Dispatch to a subcommand and return its exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(_USAGE)
        return 0 if args else 2
    if args[0] in ("-V", "--version"):
        print(version_line())
        return 0
    command, rest = args[0], args[1:]
    if command == "run":
        from hflmpi.cli.run import main as run_main

        return run_main(rest)
    if command == "init":
        from hflmpi.cli.init import main as init_main

        return init_main(rest)
    if command == "report":
        from hflmpi.cli.report import main as report_main

        return report_main(rest)
    if command == "plan":
        from hflmpi.cli.plan import main as plan_main

        return plan_main(rest)
    if command == "experiments":
        from hflmpi.cli.experiments import main as experiments_main

        return experiments_main(rest)
    if command == "bench":
        from hflmpi.cli.bench import main as bench_main

        return bench_main(rest)
    print(f"hflmpi: unknown command {command!r}\n\n{_USAGE}", file=sys.stderr)
    return 2


def version_line() -> str:
    """Return ``hflmpi VERSION from PACKAGE_DIR (Python X.Y.Z)``: which hflmpi a command runs."""
    return (f"hflmpi {hflmpi.__version__} from {Path(hflmpi.__file__).resolve().parent} "
            f"(Python {platform.python_version()})")
