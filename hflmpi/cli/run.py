"""``hflmpi run CONFIG.toml|--example NAME [--set k=v] [--resume RUN.h5 | --resume-if-exists | --overwrite]``.

Launched under mpiexec. Every rank parses the same command line, then reads and checks the config
and agrees on the verdict with the others (:func:`hflmpi.mpi.guard.agree`) before torch is
imported, so a typo is reported without waiting for every rank to import torch; only then it
imports the training code and runs :func:`hflmpi.federation.train`. Every rank returns the
same exit code: 0 when done, 2 on a user error (reported once, by rank 0), 75 after a
preemption checkpoint (:data:`hflmpi.mpi.preempt.EXIT_PREEMPTED`, for the job script to
requeue). Ranks agree on the code and leave together (:func:`hflmpi.mpi.preempt.leave_together`).

Nothing here imports mpi4py or torch at import time: ``hflmpi run --help`` needs neither. The
config is agreed over MPI rather than checked before MPI starts because a rank that exits before
``MPI_Init`` leaves the others waiting in it for ever (a config file that differs between nodes).

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
from typing import TYPE_CHECKING, Any, Sequence

from hflmpi.cli.init import example_names, example_path
from hflmpi.config import ConfigError, RunConfig, load_config
from hflmpi.core.topology import TopologyError
from hflmpi.record.replace import OVERWRITE_FLAG, REPLACED_SUFFIX
from hflmpi.record.resume import ALLOW_FLAG

if TYPE_CHECKING:
    from mpi4py import MPI

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
    parser.add_argument("config", nargs="?", help="TOML config (optional with --resume or --example)")
    parser.add_argument("--example", metavar="NAME",
                        help=f"run a bundled example config instead: {', '.join(example_names())} "
                             "(hflmpi init DIR writes them into DIR to edit)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set schedule.tau=[5,2] (repeatable)")
    parser.add_argument("--resume", metavar="RUN.h5", help="continue the run stored in RUN.h5")
    parser.add_argument("--resume-if-exists", action="store_true",
                        help="resume from run.out's checkpoint when there is one, else start fresh "
                             "(for requeued batch jobs)")
    parser.add_argument(OVERWRITE_FLAG, action="store_true",
                        help="start afresh even where run.out holds a run; its files are kept as "
                             f"*{REPLACED_SUFFIX} until the new run finishes")
    parser.add_argument(ALLOW_FLAG, dest="allow_config_change", action="store_true",
                        help="on resume, accept config changes beyond run.rounds, run.out, "
                             "run.progress, run.eval_every, run.checkpoint_every, run.divergence, "
                             "run.watchdog_seconds and run.callbacks (recorded in the run file)")
    return parser


def main(argv: Sequence[str] | None = None, comm: MPI.Comm | None = None) -> int:
    """Entry point of ``hflmpi run``; returns the process exit code (the same on every rank)."""
    args = _parser().parse_args(argv)  # --help and usage errors end here, before MPI starts
    from mpi4py import MPI

    from hflmpi.mpi.preempt import leave_together

    comm = MPI.COMM_WORLD if comm is None else comm
    show_notices()
    leaving = comm.Dup()  # all ranks: the exit handshake's own communicator (see leave_together)
    code = _run(args, comm)
    # All ranks agree on the code and leave together: under srun a rank that exits 75 or 2 first
    # gets the others killed with SIGTERM, and the step would end 143 instead.
    return leave_together(leaving, code)


def _read_config(args: argparse.Namespace) -> RunConfig:
    """Check the options and read the config they name (one rank; no collective).

    No torch either, except for ``--resume RUN.h5`` alone: the run file's config is read with the
    run-record code.
    """
    if args.example is not None and args.config is not None:
        raise ConfigError(f"give CONFIG.toml ({args.config}) or --example {args.example}, not both")
    if args.overwrite and (args.resume is not None or args.resume_if_exists):
        other = "--resume" if args.resume is not None else "--resume-if-exists"
        raise ConfigError(f"{OVERWRITE_FLAG} starts the run afresh but {other} continues it; "
                          "give one of them")
    path = example_path(args.example) if args.example is not None else args.config
    if path is None and args.resume is None:
        raise ConfigError("give a CONFIG.toml (or --example NAME), or --resume RUN.h5 to "
                          "continue a run")
    if path is None:
        from hflmpi.record.runfile import config_from_run

        return config_from_run(Path(args.resume), args.overrides)
    return load_config(path, args.overrides)


def _run(args: argparse.Namespace, comm: Any) -> int:
    from hflmpi.mpi.guard import SetupError, agree
    from hflmpi.mpi.messages import MessageError
    from hflmpi.mpi.placement import check_srun_world

    rank = comm.Get_rank()
    try:
        check_srun_world(comm.Get_size())  # a wrong srun --mpi plugin: exit 2, not N runs
        # All ranks, before torch is imported: a config error is reported within a second.
        config = agree(comm, "reading the config", lambda: _read_config(args))
        from hflmpi.federation import train
        from hflmpi.mpi.comm import limit_threads
        from hflmpi.mpi.preempt import EXIT_PREEMPTED
        from hflmpi.record.runfile import has_checkpoint

        replace_unfinished = False
        if args.resume_if_exists and args.resume is None:
            if has_checkpoint(Path(config.run.out)):
                args.resume = config.run.out
            else:  # a run file without any checkpoint: the last leg stopped before its first one
                replace_unfinished = True
        limit_threads(comm)
        result = train(config, comm, resume=args.resume, replace_unfinished=replace_unfinished,
                       allow_config_change=args.allow_config_change, overwrite=args.overwrite)
    except (ConfigError, TopologyError, SetupError, MessageError) as exc:
        # Every rank raised the same error (config and setup checks are collective): say it once.
        if rank == 0:
            print(f"hflmpi: error: {exc}", file=sys.stderr, flush=True)
        return 2
    except Exception as exc:  # a bug (ours or a user model's), maybe on this rank alone
        if comm.Get_size() == 1:
            raise  # no other rank waits: the plain traceback, and in-process callers get the error
        from hflmpi.mpi.crash import end_job

        end_job(comm, exc, os.environ)  # one full traceback (rank 0's), then MPI_Abort
    if result.preempted:
        return EXIT_PREEMPTED
    if rank == 0 and result.privacy is not None:
        print(result.privacy, flush=True)
    if rank == 0:
        print(f"hflmpi: {result.rounds} rounds done; test accuracy {result.test_accuracy:.4f}, "
              f"test loss {result.test_loss:.4f}; run record {result.record_path}", flush=True)
    return 0
