"""``hflmpi run CONFIG.toml [--set k=v] [--resume RUN.h5 | --resume-if-exists]`` (under mpiexec).

Every rank parses the same command line, runs :func:`hflmpi.federation.train` and returns the
same exit code: 0 when done, 2 on a user error (reported once, by rank 0), 75 after a
preemption checkpoint (:data:`hflmpi.mpi.preempt.EXIT_PREEMPTED`, for the job script to
requeue). Ranks agree on the code and leave together (:func:`hflmpi.mpi.preempt.leave_together`).
Any other exception (a bug, say in a user model) aborts the job with code 1 after rank 0's one
traceback and a line per other failing rank (:mod:`hflmpi.mpi.crash`; ``HFLMPI_TRACEBACK=all``
prints every rank's).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Sequence

from mpi4py import MPI

from hflmpi.config import ConfigError, load_config
from hflmpi.core.topology import TopologyError
from hflmpi.federation import train
from hflmpi.mpi.comm import limit_threads
from hflmpi.mpi.crash import end_job
from hflmpi.mpi.guard import SetupError
from hflmpi.mpi.messages import MessageError
from hflmpi.mpi.preempt import EXIT_PREEMPTED, leave_together
from hflmpi.record.resume import ALLOW_FLAG
from hflmpi.record.runfile import config_from_run, has_checkpoint

__all__ = ["main", "show_notices"]


def show_notices() -> None:
    """Show the library's notices (``hflmpi.*`` loggers, already prefixed) on stderr, once."""
    logger = logging.getLogger("hflmpi")
    if not any(isinstance(h, _Stderr) for h in logger.handlers):
        logger.addHandler(_Stderr())
        logger.setLevel(logging.INFO)


class _Stderr(logging.Handler):
    """Write each notice as it is to whatever ``sys.stderr`` is at that moment."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            sys.stderr.write(record.getMessage() + "\n")
            sys.stderr.flush()
        except Exception:  # a notice must never stop a run
            self.handleError(record)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hflmpi run", description="Train under mpiexec.")
    parser.add_argument("config", nargs="?", help="TOML config (optional with --resume)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set schedule.tau=[5,2] (repeatable)")
    parser.add_argument("--resume", metavar="RUN.h5", help="continue the run stored in RUN.h5")
    parser.add_argument("--resume-if-exists", action="store_true",
                        help="resume from run.out's checkpoint when there is one, else start fresh "
                             "(for requeued batch jobs)")
    parser.add_argument(ALLOW_FLAG, dest="allow_config_change", action="store_true",
                        help="on resume, accept config changes beyond run.rounds, run.out, "
                             "run.progress, run.eval_every, run.checkpoint_every, run.divergence, "
                             "run.watchdog_seconds and run.callbacks (recorded in the run file)")
    return parser


def main(argv: Sequence[str] | None = None, comm: MPI.Comm | None = None) -> int:
    """Entry point of ``hflmpi run``; returns the process exit code (the same on every rank)."""
    args = _parser().parse_args(argv)
    comm = MPI.COMM_WORLD if comm is None else comm
    show_notices()
    leaving = comm.Dup()  # all ranks: the exit handshake's own communicator (see leave_together)
    code = _run(args, comm)
    # All ranks agree on the code and leave together: under srun a rank that exits 75 or 2 first
    # gets the others killed with SIGTERM, and the step would end 143 instead.
    return leave_together(leaving, code)


def _run(args: argparse.Namespace, comm: MPI.Comm) -> int:
    rank = comm.Get_rank()
    try:
        if args.config is None and args.resume is None:
            raise ConfigError("give a CONFIG.toml, or --resume RUN.h5 to continue a run")
        if args.config is None:
            config = config_from_run(Path(args.resume), args.overrides)
        else:
            config = load_config(args.config, args.overrides)
        replace_unfinished = False
        if args.resume_if_exists and args.resume is None:
            if has_checkpoint(Path(config.run.out)):
                args.resume = config.run.out
            else:  # a run file without any checkpoint: the last leg stopped before its first one
                replace_unfinished = True
        limit_threads(comm)
        result = train(config, comm, resume=args.resume, replace_unfinished=replace_unfinished,
                       allow_config_change=args.allow_config_change)
    except (ConfigError, TopologyError, SetupError, MessageError) as exc:
        # Every rank raised the same error (config and setup checks are collective): say it once.
        if rank == 0:
            print(f"hflmpi: error: {exc}", file=sys.stderr, flush=True)
        return 2
    except Exception as exc:  # a bug (ours or a user model's), maybe on this rank alone
        end_job(comm, exc, os.environ)  # one full traceback (rank 0's), then MPI_Abort
    if result.preempted:
        return EXIT_PREEMPTED
    if rank == 0 and result.privacy is not None:
        print(result.privacy, flush=True)
    if rank == 0:
        print(f"hflmpi: {result.rounds} rounds done; test accuracy {result.test_accuracy:.4f}, "
              f"test loss {result.test_loss:.4f}; run record {result.record_path}", flush=True)
    return 0
