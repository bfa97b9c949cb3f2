r"""Rank-0 progress line: round, loss, accuracy, throughput.

The style is resolved once from the mode (config key ``run.progress``, also ``--set
run.progress="lines"`` on the command line), the stream and the environment:

==========  =====================================================================================
mode        style
==========  =====================================================================================
``auto``    "bar" on an interactive terminal (see below), "off" under CI, "lines" otherwise
``bar``     "bar" always, even into a file (forced)
``lines``   "lines" always (forced)
``on``      "bar" on an interactive terminal, "lines" otherwise (also under CI)
``off``     "off"
==========  =====================================================================================

"lines" writes one ordinary line every ``every`` rounds (and on the last round when the total is
known), which suits Slurm log files; "bar" rewrites a single line in place with ``\r``.

Interactive means: the stream is a TTY, and the process is neither inside a Slurm batch job
(``SLURM_JOB_ID`` set without ``SLURM_PTY_PORT``, which only ``srun --pty`` sets) nor a rank
started by Open MPI's ``mpirun`` (``OMPI_COMM_WORLD_SIZE`` or ``PMIX_RANK`` set): Open MPI gives
every rank a pseudo-terminal even when the job's output goes to a file, and ``\r`` rewrites would
pile up in that file. Nothing here reads global state: the stream and the environment are
arguments.
"""

from __future__ import annotations

import math
import os
from types import TracebackType
from typing import Literal, Mapping, TextIO

__all__ = ["PROGRESS_MODES", "Progress", "format_progress", "interactive", "is_ci", "resolve_style"]

PROGRESS_MODES = ("auto", "bar", "lines", "on", "off")
Style = Literal["bar", "lines", "off"]
_FALSE_WORDS = frozenset({"", "0", "false", "no", "off"})
_OPEN_MPI_VARS = ("OMPI_COMM_WORLD_SIZE", "PMIX_RANK")


def is_ci(env: Mapping[str, str]) -> bool:
    """Return whether ``env`` says we run under CI (``CI`` set to anything but 0/false/no/off)."""
    return env.get("CI", "").strip().lower() not in _FALSE_WORDS


def _isatty(stream: TextIO) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):
        return False


def interactive(stream: TextIO, env: Mapping[str, str]) -> bool:
    """Return whether a person watches ``stream`` live: a TTY outside Slurm batch jobs and Open MPI.

    A Slurm batch job (``SLURM_JOB_ID`` without ``SLURM_PTY_PORT``) writes to a log file, and
    Open MPI's launcher (``OMPI_COMM_WORLD_SIZE``/``PMIX_RANK``) hands each rank a pseudo-terminal
    whatever the final destination, so neither counts even when ``stream.isatty()``.
    """
    if env.get("SLURM_JOB_ID") and not env.get("SLURM_PTY_PORT"):
        return False
    if any(env.get(name) for name in _OPEN_MPI_VARS):
        return False
    return _isatty(stream)


def resolve_style(mode: str, stream: TextIO, env: Mapping[str, str]) -> Style:
    """Return the output style ("bar", "lines" or "off") for a mode, stream and environment.

    Raises
    ------
    ValueError
        If ``mode`` is not one of :data:`PROGRESS_MODES`.
    """
    if mode not in PROGRESS_MODES:
        raise ValueError(f"progress mode {mode!r} is not one of {PROGRESS_MODES}")
    forced: dict[str, Style] = {"bar": "bar", "lines": "lines", "off": "off"}
    if mode in forced:
        return forced[mode]
    ci = is_ci(env)
    if interactive(stream, env) and not ci:
        return "bar"
    if mode == "auto" and ci:
        return "off"
    return "lines"


def _fmt(value: float, spec: str) -> str:
    return "-" if value is None or not math.isfinite(value) else format(value, spec)


def format_progress(
    round: int,
    total: int | None = None,
    *,
    loss: float = math.nan,
    accuracy: float = math.nan,
    samples_per_second: float = math.nan,
) -> str:
    """Return the progress text, e.g. ``round 12/100  loss 0.4321  acc 91.20%  1,234 samples/s``.

    Missing (NaN) values print as ``-``.
    """
    width = len(str(total)) if total else 0
    head = f"round {round:>{width}d}/{total}" if total else f"round {round}"
    acc = "-" if not math.isfinite(accuracy) else f"{100.0 * accuracy:.2f}%"
    return (
        f"{head}  loss {_fmt(loss, '.4f')}  acc {acc}  "
        f"{_fmt(samples_per_second, ',.0f')} samples/s"
    )


class Progress:
    """Progress reporter for rank 0.

    Parameters
    ----------
    stream : TextIO
        Where to write (``sys.stdout`` in the CLI).
    mode : {"auto", "bar", "lines", "on", "off"}
        See the module docstring.
    every : int
        "lines" style: print every ``every`` rounds.
    total_rounds : int, optional
        Shown as ``round r/total``; the last round is always printed in "lines" style.
    env : mapping, optional
        Environment to read ``CI``, Slurm's and Open MPI's variables from (default ``os.environ``).
    """

    def __init__(
        self,
        stream: TextIO,
        mode: str = "auto",
        *,
        every: int = 10,
        total_rounds: int | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        if every < 1:
            raise ValueError(f"progress every={every} must be >= 1")
        self._stream = stream
        self.style: Style = resolve_style(mode, stream, os.environ if env is None else env)
        self._every = every
        self._total = total_rounds
        self._live_width = 0

    def update(
        self,
        round: int,
        *,
        loss: float = math.nan,
        accuracy: float = math.nan,
        samples_per_second: float = math.nan,
    ) -> None:
        """Report the end of global round ``round``."""
        if self.style == "off":
            return
        text = format_progress(
            round, self._total, loss=loss, accuracy=accuracy, samples_per_second=samples_per_second
        )
        if self.style == "bar":
            pad = max(0, self._live_width - len(text))
            self._stream.write("\r" + text + " " * pad)
            self._live_width = len(text)
        elif round % self._every == 0 or round == self._total:
            self._stream.write(text + "\n")
        else:
            return
        self._stream.flush()

    def close(self) -> None:
        """End a "bar" line with a newline (no-op otherwise)."""
        if self.style == "bar" and self._live_width:
            self._stream.write("\n")
            self._stream.flush()
            self._live_width = 0

    def __enter__(self) -> Progress:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
