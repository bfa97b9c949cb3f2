"""``hflmpi experiments run|plot``: paper-reproduction sweeps (run under mpiexec) and their plots."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

from hflmpi.errors import HflmpiError, report_user_error
from hflmpi.experiments import load_results, plot_results, results_markdown, run_experiment

__all__ = ["main"]

# ---------------------------------------------------------------------------------------------
# Command line


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: ``run`` (under mpiexec) or ``plot`` (serial); returns the exit code."""
    parser = argparse.ArgumentParser(prog="hflmpi experiments",
                                     description="Run experiment sweeps and plot their results.")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="train every variant and seed in one MPI job")
    run.add_argument("spec", help="experiments/NAME.toml")
    run.add_argument("--out", required=True, help="results HDF5 (run files go to OUT.runs/)")
    run.add_argument("--small", action="store_true", help="the spec's small (CI) version")
    run.add_argument("--reuse", action="store_true", help="skip runs whose run file is complete")
    run.add_argument("--only", default="", help="comma-separated variant names to train")
    run.add_argument("--base", metavar="CONFIG.toml", help="run config merged into the spec's "
                     "base, e.g. jobs/experiments.toml (MNIST/CIFAR-10 files, model, device)")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a base config key, e.g. --set optim.lr=0.05 (repeatable)")
    plot = sub.add_parser("plot", help="draw figures and write the markdown table (serial)")
    plot.add_argument("results", nargs="+", help="results HDF5 file(s)")
    plot.add_argument("--out", required=True, help="directory for the figures and NAME.md")
    plot.add_argument("--format", default="png", metavar="FMT[,FMT]",
                      help="figure formats, comma-separated: png, pdf, svg (default png)")
    plot.add_argument("--no-png", action="store_true", help="write the markdown table only")
    args = parser.parse_args(argv)

    if args.command == "plot":
        try:
            Path(args.out).mkdir(parents=True, exist_ok=True)
            for results in args.results:
                figures = [] if args.no_png else plot_results(
                    results, args.out, [f for f in args.format.split(",") if f])
                name = load_results(results)[0]["experiment"]
                md = Path(args.out) / f"{name}.md"
                md.write_text(results_markdown(results, figures), encoding="utf-8")
                for p in [*figures, md]:
                    print(f"wrote {p} ({p.stat().st_size // 1024} KiB)")
        except (HflmpiError, OSError, KeyError, ValueError) as exc:
            return report_user_error("experiments", exc)
        return 0

    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    try:
        from hflmpi.mpi.placement import check_srun_world, limit_threads

        check_srun_world(comm.Get_size())  # a wrong srun --mpi plugin: exit 2, not N experiments
        limit_threads(comm)
        run_experiment(args.spec, args.out, comm, small=args.small, reuse=args.reuse,
                       only=[s for s in args.only.split(",") if s] or None,
                       base_file=args.base, overrides=args.overrides)
    except HflmpiError as exc:  # raised on every rank (the runner shares rank 0's verdict)
        return report_user_error("experiments", exc, show=comm.Get_rank() == 0)
    return 0

