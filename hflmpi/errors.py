"""The one base of every error meant for the user, and how a command reports it.

A :class:`HflmpiError` is a user error: a bad config key, a tree that does not fit the world
size, a run file without a stored config, a plan that cannot meet its deadline. Its message
already names the key, the value, the constraint and the fix, so the command line prints it as
one line ``hflmpi <command>: error: <message>`` (once: rank 0 under MPI, where every rank raises
the same error) and exits with :data:`EXIT_USER_ERROR`. Anything else is a bug or an
environment failure and keeps its traceback.

Under MPI a command may only turn an error into an exit status when every rank raises it (the
config and setup checks run on every rank, and failures are agreed collectively); a rank that
returned while the others wait in a collective would hang the job.

Each concrete error keeps the built-in base it had before (``ConfigError`` is still a
``ValueError``, ``CheckpointError`` a ``RuntimeError``), so existing ``except`` clauses hold.
"""

from __future__ import annotations

import sys

__all__ = ["HflmpiError", "EXIT_USER_ERROR", "report_user_error"]

EXIT_USER_ERROR = 2
"""Exit status of a command stopped by a user error (as argparse uses for a usage error)."""


class HflmpiError(Exception):
    """A user error: the command line reports its message once and exits 2."""


def report_user_error(command: str, error: BaseException, *, show: bool = True) -> int:
    """Print ``error`` as the one line ``hflmpi <command>: error: ...`` and return the exit status.

    Parameters
    ----------
    command : str
        The subcommand, e.g. ``"report"`` or ``"bench scaling plot"``.
    error : BaseException
        The error; a message spanning several lines is joined into one.
    show : bool
        Print it (pass ``rank == 0`` under MPI, so that it is printed once).

    Returns
    -------
    int
        :data:`EXIT_USER_ERROR`.
    """
    if show:
        text = " ".join(part.strip() for part in str(error).splitlines() if part.strip())
        print(f"hflmpi {command}: error: {text}", file=sys.stderr, flush=True)
    return EXIT_USER_ERROR
