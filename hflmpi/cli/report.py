"""``hflmpi report RUN.h5 [RUN2.h5 ...] [--out DIR [--format png,pdf,svg]]``: summary and plots."""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from hflmpi.errors import HflmpiError, report_user_error
from hflmpi.record.report import plot, summarize

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hflmpi report",
        description="Summarise and compare hflmpi run records (HDF5).",
    )
    parser.add_argument("runs", nargs="+", metavar="RUN.h5", help="run record(s) to compare")
    parser.add_argument("--out", metavar="DIR", help="also write comparison figures into DIR")
    parser.add_argument("--format", default="png", metavar="FMT[,FMT]",
                        help="figure formats, comma-separated: png, pdf, svg (default png)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``hflmpi report``; return the exit status (0 ok, 2 unreadable input or user error)."""
    args = _parser().parse_args(argv)
    try:
        sys.stdout.write(summarize(args.runs))
        if args.out:
            for path in plot(args.runs, args.out, [f for f in args.format.split(",") if f]):
                sys.stdout.write(f"wrote {path}\n")
    except (HflmpiError, OSError, KeyError, ValueError) as err:
        return report_user_error("report", err)
    return 0

