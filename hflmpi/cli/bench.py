"""``hflmpi bench aggregate|scaling|flower|population|calibrate``: benchmarks run under ``mpiexec -n P``.

``aggregate`` times the hierarchical aggregation against a raw mpi4py ``Allreduce`` (and gloo) of
the same buffer in the same run; ``scaling`` writes strong/weak scaling rows (and ``scaling plot``
adds cost-model predictions); ``flower`` compares a FedAvg round with Flower's simulation;
``population`` compares batched with sequential training of a population of clients.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any, Sequence

import torch
from mpi4py import MPI

from hflmpi.bench.aggregate import bench_aggregate
from hflmpi.bench.aggregate import default_fanouts as default_rank_fanouts
from hflmpi.bench.flower import Job, flower_available, run_flower, run_hflmpi, wait_sleeping
from hflmpi.bench.memory import (
    SAFETY,
    available_bytes,
    check_sizes,
    copies_per_rank,
    default_sizes,
    max_params,
)
from hflmpi.bench.population import (
    MODES,
    PopulationJob,
    default_fanouts,
    default_tau,
    format_report,
    run_population,
)
from hflmpi.bench.scaling import PREDICT_WORLDS, measure, plot
from hflmpi.core.topology import plan_fanouts
from hflmpi.errors import HflmpiError, report_user_error
from hflmpi.mpi.comm import node_local
from hflmpi.mpi.messages import allreduce_float

__all__ = ["main"]


def _header(world_size: int, fanouts: Sequence[int], bits: Sequence[int]) -> list[str]:
    lines = [
        f"# hflmpi bench aggregate: {world_size} ranks, tree fanouts={list(fanouts)}, float32, "
        "median of repeats, slowest rank; rows appear as they are measured",
        f"{'params':>10} {'raw MPI ms':>11} {'subtree ms':>11} {'tree ms':>9} {'gloo ms':>9} "
        f"{'subtree/raw':>12} {'tree/raw':>9} {'gloo/raw':>9}",
    ]
    if bits:
        lines.append("# quantized rows (quantize + exact integer reduce + dequantize + broadcast, all "
                     "layers; time/raw against a raw Allreduce timed with it):")
        lines.append(f"{'params':>10} {'bits':>4} {'method':>11} {'ms':>9} {'time/raw':>9} "
                     f"{'uplink bytes':>13} {'bytes/float32':>14}")
    return lines


def _format_row(row: dict[str, float], width: int | None) -> str:
    """Return the table line of a size's float candidates (``width`` None) or of one width."""
    if width is None:
        raw = row["mpi_allreduce"]
        gloo = row.get("gloo_all_reduce", float("nan"))
        return (f"{int(row['numel']):>10} {raw * 1e3:>11.2f} {row['hfl_subtree'] * 1e3:>11.2f} "
                f"{row['hfl_tree'] * 1e3:>9.2f} {gloo * 1e3:>9.2f} {row['hfl_subtree'] / raw:>12.3f} "
                f"{row['hfl_tree'] / raw:>9.3f} {gloo / raw:>9.3f}")
    method = "integer-sum" if row[f"q{width}_method"] == 1 else "gather"
    return (f"{int(row['numel']):>10} {width:>4} {method:>11} {row[f'q{width}'] * 1e3:>9.2f} "
            f"{row[f'q{width}'] / row[f'q{width}_raw']:>9.3f} {int(row[f'q{width}_bytes']):>13} "
            f"{row[f'q{width}_bytes'] / row['float_bytes']:>14.4f}")


def _sizes(comm: MPI.Comm, given: str | None, depth: int, bits: Sequence[int], gloo: bool,
           ) -> tuple[list[int], str]:
    """Return the sizes to time (the defaults that fit, or the checked ``given``) and a memory note.

    Collective: every rank takes the smallest budget of any rank, so all decide alike.
    """
    try:
        budget = available_bytes(node_local(comm)[1])
    except (OSError, ValueError):  # no /proc/meminfo (not Linux): nothing to size by
        budget = math.inf
    budget = allreduce_float(comm, budget, MPI.MIN)  # all ranks
    per_param = 4 * copies_per_rank(depth, bits, gloo)
    limit = max_params(budget, depth, bits, gloo) if math.isfinite(budget) else 2**62
    note = (f"# memory: each rank may use {budget / 2**30:.2f} GiB (MemAvailable, cgroup-capped, / "
            f"ranks on the node x {SAFETY}); peak ~{per_param / 4:.1f} float32 copies of the model "
            f"per rank; largest size that fits {limit:,}" if math.isfinite(budget) else
            "# memory: not known here (no /proc/meminfo); sizes are not checked")
    if given is None:
        return default_sizes(limit), note
    sizes = [int(float(s)) for s in given.split(",") if s]
    check_sizes(sizes, limit, budget, per_param)
    return sizes, note


def main(argv: Sequence[str] | None = None, comm: MPI.Comm | None = None) -> int:
    """Entry point of ``hflmpi bench``; run it under ``mpiexec -n P``."""
    parser = argparse.ArgumentParser(prog="hflmpi bench", description="Benchmarks under mpiexec: aggregation, scaling, Flower.")
    sub = parser.add_subparsers(dest="what", required=True)
    agg = sub.add_parser("aggregate", help="hierarchical aggregation vs raw Allreduce and gloo")
    agg.add_argument("--sizes", default=None,
                     help="parameter counts, comma-separated (default: those of 1M,10M,25M that fit "
                          "in the memory each rank has; larger sizes than fit are refused)")
    agg.add_argument("--fanouts", default="", help="tree fan-outs, e.g. 4,2 (default: groups of 4 or 2)")
    agg.add_argument("--repeats", type=int, default=7)
    agg.add_argument("--no-gloo", action="store_true", help="skip the torch.distributed baseline")
    agg.add_argument("--bits", default="", help="also time quantized aggregation at these widths, e.g. 8,4,2")
    agg.add_argument("--bucket-size", type=int, default=0, help="0 = auto per width")
    agg.add_argument("--emulate-nodes", type=int, default=0, metavar="N",
                     help="run on N fake nodes joined by shaped links (as root, not under mpiexec)")
    agg.add_argument("--ranks-per-node", type=int, default=2, help="with --emulate-nodes")
    agg.add_argument("--link", default="1gbit", metavar="RATE[,LATENCY]",
                     help="with --emulate-nodes: link rate (tc units) and one-way latency, e.g. 10gbit")
    agg.add_argument("--link-iface", default="", help="count bytes crossing this interface per "
                     "candidate (set by --emulate-nodes)")
    sub.add_parser("scaling", add_help=False,
                   help="strong/weak scaling rows to HDF5; 'scaling plot' adds cost-model predictions")
    sub.add_parser("flower", add_help=False, help="FedAvg round time: hflmpi vs Flower's simulation")
    sub.add_parser("population", add_help=False,
                   help="client-steps/s of a population: batched vs sequential training")
    sub.add_parser("calibrate", add_help=False, help="fit the cost model's networks (hflmpi plan --network)")
    raw = list(sys.argv[1:] if argv is None else argv)
    if raw and raw[0] == "calibrate":
        from hflmpi.bench.calibrate import main as calibrate_main

        return calibrate_main(raw[1:], comm)
    if raw and raw[0] == "population":
        return _population(raw[1:], comm)
    if raw and raw[0] == "scaling":  # their own parsers
        return _scaling(raw[1:], comm)
    if raw and raw[0] == "flower":
        return _flower(raw[1:], comm)
    args = parser.parse_args(argv)
    if args.emulate_nodes:
        from hflmpi.bench.emulate import run_emulated

        return run_emulated(raw, args.emulate_nodes, args.ranks_per_node, args.link)
    comm = MPI.COMM_WORLD if comm is None else comm
    torch.set_num_threads(1)
    try:  # the same options (and the agreed memory budget) on every rank: each raises alike
        fanouts = [int(f) for f in args.fanouts.split(",") if f] or default_rank_fanouts(comm.Get_size())
        plan = plan_fanouts(fanouts, comm.Get_size())
        bits = [int(b) for b in args.bits.split(",") if b]
        sizes, note = _sizes(comm, args.sizes, plan.depth, bits, not args.no_gloo)
    except (HflmpiError, ValueError) as exc:
        return report_user_error("bench aggregate", exc, show=comm.Get_rank() == 0)
    rank0 = comm.Get_rank() == 0
    if rank0:
        header = _header(comm.Get_size(), fanouts, bits)
        print("\n".join([header[0], note, *header[1:]]), flush=True)
    rows = bench_aggregate(comm, sizes, plan, args.repeats, gloo=not args.no_gloo, bits=bits,
                           bucket_size=args.bucket_size, link_iface=args.link_iface,
                           emit=lambda row, width: print(_format_row(row, width), flush=True)
                           if rank0 else None)
    if rank0 and args.link_iface:
        from hflmpi.bench.emulate import format_link_rows

        print(format_link_rows(rows), flush=True)
    return 0


def _scaling_plot(args: Sequence[str]) -> int:
    """Entry point of ``hflmpi bench scaling plot`` (serial)."""
    parser = argparse.ArgumentParser(prog="hflmpi bench scaling plot",
                                     description="Plot scaling rows with cost-model predictions.")
    parser.add_argument("--out", default="runs/scaling.h5", help="the scaling HDF5 file")
    parser.add_argument("--plots", default="runs/scaling_plots", help="directory for the PNGs")
    parser.add_argument("--numel", type=int, default=0, help="model size for the predictions "
                        "(default: the measured model's)")
    parser.add_argument("--worlds", default=",".join(map(str, PREDICT_WORLDS)),
                        help="rank counts to predict (powers of two times 8)")
    parser.add_argument("--t-cp", type=float, default=0.0, help="seconds per SGD step for the "
                        "predictions (default: fitted, scaled to --numel)")
    parser.add_argument("--table", default="", help="also write the tables (Markdown) here")
    opts = parser.parse_args(args)
    try:
        worlds = [int(w) for w in opts.worlds.split(",") if w]
        written, tables = plot(opts.out, opts.plots, numel=opts.numel or None, worlds=worlds,
                               t_cp=opts.t_cp or None)
    except (HflmpiError, OSError, ValueError) as exc:
        return report_user_error("bench scaling plot", exc)
    print(tables)
    if opts.table:
        Path(opts.table).write_text(tables + "\n", encoding="utf-8")
    print("\n".join(f"wrote {p}" for p in written))
    return 0


def _scaling(argv: Sequence[str] | None = None, comm: Any = None) -> int:
    """Entry point of ``hflmpi bench scaling [plot]``."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] == "plot":
        return _scaling_plot(args[1:])
    parser = argparse.ArgumentParser(prog="hflmpi bench scaling",
                                     description="Strong/weak scaling rows (run under mpiexec -n P).")
    parser.add_argument("--out", default="runs/scaling.h5", help="HDF5 file the rows are appended to")
    parser.add_argument("--modes", default="strong,weak")
    parser.add_argument("--depths", default="1,2,3")
    parser.add_argument("--rounds", type=int, default=12, help="rounds per job (first and last not timed)")
    parser.add_argument("--features", type=int, default=64)
    parser.add_argument("--hidden", default="256,256", help="MLP hidden widths")
    parser.add_argument("--total-samples", type=int, default=4096, help="strong scaling: all ranks")
    parser.add_argument("--total-batch", type=int, default=64, help="strong scaling: batch over all ranks")
    parser.add_argument("--per-rank-samples", type=int, default=512, help="weak scaling")
    parser.add_argument("--batch", type=int, default=16, help="weak scaling: batch per rank")
    parser.add_argument("--bits", type=int, default=0, help="quantizer bits at every layer (0 = exact)")
    parser.add_argument("--no-collectives", action="store_true", help="skip timing raw collectives")
    parser.add_argument("--sizes", default="8,4096,262144,2097152", help="collective sizes (bytes)")
    parser.add_argument("--repeats", type=int, default=5)
    opts = parser.parse_args(args)
    import torch
    from mpi4py import MPI

    torch.set_num_threads(1)
    comm = MPI.COMM_WORLD if comm is None else comm
    try:  # bad options fail on every rank alike; so do config and setup errors (all ranks)
        rows = measure(
            comm, opts.out, modes=[m for m in opts.modes.split(",") if m],
            depths=[int(d) for d in opts.depths.split(",") if d],
            collectives=not opts.no_collectives,
            sizes=[int(s) for s in opts.sizes.split(",") if s], repeats=opts.repeats,
            rounds=opts.rounds, features=opts.features,
            hidden=[int(h) for h in opts.hidden.split(",") if h], total_samples=opts.total_samples,
            total_batch=opts.total_batch, per_rank_samples=opts.per_rank_samples, batch=opts.batch,
            bits=opts.bits,
        )
    except HflmpiError as exc:
        return report_user_error("bench scaling", exc, show=comm.Get_rank() == 0)
    if comm.Get_rank() == 0:
        for r in rows:
            print(f"P={r['world']} depth={r['depth']} {r['mode']:>6} fanouts={r['fanouts']} "
                  f"batch={r['batch']} rounds/s={r['rounds_per_second']:.1f} "
                  f"compute={r['compute_seconds'] * 1e3:.2f} ms comm={r['comm_seconds'] * 1e3:.2f} ms "
                  f"bytes/round={r['bytes_per_round']:.0f} (model {r['predicted_bytes_per_round']:.0f})",
                  flush=True)
    return 0


def _report(job: Job, results: list[dict[str, Any]]) -> str:
    what = (f"FedAvg over a population of {job.clients} clients, {job.cohort_size} per round"
            if job.population else f"FedAvg, {job.clients} clients")
    data = ("digits" if job.data == "digits" else f"{job.samples_per_client} synthetic samples "
            "per client")
    steps = (f"{job.steps_per_epoch} SGD steps" if job.local_steps else
             f"{job.steps_per_epoch} SGD steps (1 epoch)")
    features = 64 if job.data == "digits" else job.features
    widths = [features, *job.hidden, 10]
    numel = sum(a * b + b for a, b in zip(widths, widths[1:]))
    lines = [f"# {what}, MLP {'-'.join(map(str, widths))} ({numel:,} parameters), {data}, "
             f"{steps} of batch {job.batch} per client per round, {job.rounds} rounds, "
             f"{os.cpu_count()} cores",
             f"{'framework':<48} {'s/round (median)':>17} {'rounds timed':>13} {'test acc':>9}"]
    for r in results:
        lines.append(f"{r['framework']:<48} {r['median_round_seconds']:>17.4f} {r['rounds_timed']:>13} "
                     f"{r['test_accuracy']:>9.4f}")
    if len(results) == 2:
        lines.append(f"Flower / hflmpi time per round: "
                     f"{results[1]['median_round_seconds'] / results[0]['median_round_seconds']:.2f}x")
    return "\n".join(lines)


def flower_parser() -> argparse.ArgumentParser:
    """Return the parser of ``hflmpi bench flower``."""
    parser = argparse.ArgumentParser(prog="hflmpi bench flower", description="FedAvg round time: hflmpi vs Flower's simulation of the same job.")
    parser.add_argument("--clients", type=int, default=0, help="default: the MPI world size (8 "
                        "intended); more clients than ranks (or --cohort) makes a population")
    parser.add_argument("--cohort", type=float, default=1.0, help="population: clients per round, "
                        "a fraction in (0, 1] or a count > 1 (default: all)")
    parser.add_argument("--rounds", type=int, default=Job.rounds)
    parser.add_argument("--samples-per-client", type=int, default=Job.samples_per_client)
    parser.add_argument("--batch", type=int, default=Job.batch)
    parser.add_argument("--hidden", default=",".join(map(str, Job.hidden)))
    parser.add_argument("--data", choices=("synthetic", "digits"), default="synthetic")
    parser.add_argument("--local-steps", type=int, default=0,
                        help="SGD steps per client per round (default: one epoch)")
    parser.add_argument("--training", choices=("sequential", "batched"), default="sequential",
                        help="population: how hflmpi trains a rank's clients")
    parser.add_argument("--actors", type=int, default=0, help="Flower client actors at once "
                        "(default: the clients, or the MPI ranks for a population)")
    parser.add_argument("--side", choices=("both", "hflmpi", "flower"), default="both",
                        help="flower alone needs no mpiexec")
    parser.add_argument("--cpus", type=float, default=0, help="CPUs for Ray (default: all cores)")
    parser.add_argument("--json", default="", help="also write the results here")
    return parser


def flower_job(args: argparse.Namespace, ranks: int) -> Job:
    """Return the :class:`Job` of parsed ``bench flower`` options on ``ranks`` MPI ranks."""
    clients = args.clients or (ranks if args.side != "flower" else Job.clients)
    population = args.cohort != 1.0 or clients != ranks and args.side != "flower"
    return Job(clients=clients, rounds=args.rounds, samples_per_client=args.samples_per_client,
               batch=args.batch, hidden=tuple(int(h) for h in args.hidden.split(",") if h),
               population=population, cohort=args.cohort, data=args.data,
               local_steps=args.local_steps, training=args.training)


def _flower(argv: Sequence[str] | None = None, comm: Any = None) -> int:
    """Entry point of ``hflmpi bench flower`` (``mpiexec -n CLIENTS``; fewer for a population)."""
    args = flower_parser().parse_args(argv)
    if args.side == "flower":
        comm = None
    else:
        from mpi4py import MPI

        comm = MPI.COMM_WORLD if comm is None else comm
    size = comm.Get_size() if comm is not None else 1
    rank = comm.Get_rank() if comm is not None else 0
    job = flower_job(args, size)
    actors = args.actors or (size if job.population else job.clients)
    results: list[dict[str, Any]] = []
    if args.side in ("both", "hflmpi"):
        import torch

        torch.set_num_threads(1)
        try:
            results.append(run_hflmpi(comm, job))
        except (HflmpiError, ValueError) as exc:
            return report_user_error("bench flower", exc, show=rank == 0)
    message = ""
    if args.side in ("both", "flower"):
        available, why = flower_available()
        if not available:
            message = f"Flower comparison skipped: flwr is not usable here ({why})"
        elif rank == 0:
            results.append(run_flower(job, args.cpus or None, actors))
        if comm is not None and available:
            wait_sleeping(comm)  # all ranks; rank 0 arrives after Flower finished
    if rank == 0:
        if results:
            print(_report(job, results))
        if message:
            print(message)
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps({"job": asdict(job), "numel": job.numel,
                                                   "results": results, "note": message}, indent=2))
    return 0

def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(",") if v.strip())


def population_job(args: argparse.Namespace) -> PopulationJob:
    """Return the :class:`PopulationJob` of parsed ``bench population`` options.

    ``--cohort 1`` means every client (a fraction), not one client as in ``[clients] cohort``.
    """
    fanouts = _ints(args.fanouts) or default_fanouts(args.clients)
    tau = _ints(args.tau) or default_tau(len(fanouts))
    cohort = float(args.clients) if args.cohort == 1.0 else args.cohort
    return PopulationJob(clients=args.clients, cohort=cohort, rounds=args.rounds, fanouts=fanouts,
                         tau=tau, hidden=_ints(args.hidden), bits=_ints(args.bits),
                         batch=args.batch, lr=args.lr, batch_clients=args.batch_clients)


def population_parser() -> argparse.ArgumentParser:
    """Return the parser of ``hflmpi bench population``."""
    parser = argparse.ArgumentParser(
        prog="hflmpi bench population",
        description="Client-steps/s of a population trained batched vs sequentially (same job, "
                    "same run; under mpiexec -n P).")
    parser.add_argument("--clients", type=int, default=PopulationJob.clients)
    parser.add_argument("--cohort", type=float, default=PopulationJob.cohort,
                        help="fraction of the clients per round, in (0, 1] (1: all), or a count > 1")
    parser.add_argument("--rounds", type=int, default=PopulationJob.rounds,
                        help="rounds per mode (the first and last are not timed)")
    parser.add_argument("--fanouts", default="", help="tree of clients, e.g. 16,4,4 (default: "
                        "16,4,4 for 256 clients, else one layer)")
    parser.add_argument("--tau", default="", help="local steps per layer period, e.g. 5,2,2 "
                        "(default: 5 then 2 per layer)")
    parser.add_argument("--hidden", default=",".join(map(str, PopulationJob.hidden)),
                        help="MLP hidden widths")
    parser.add_argument("--bits", default="", help="quantizer bits per layer (default: exact)")
    parser.add_argument("--batch", type=int, default=PopulationJob.batch)
    parser.add_argument("--lr", type=float, default=PopulationJob.lr)
    parser.add_argument("--batch-clients", type=int, default=PopulationJob.batch_clients)
    parser.add_argument("--mode", choices=("both", *MODES), default="both")
    parser.add_argument("--compile", action="store_true", help="batched: torch.compile the "
                        "vectorised step (sets HFLMPI_COMPILE_BATCHED=1 for that run)")
    parser.add_argument("--repeats", type=int, default=1, help="train each mode this many times, "
                        "alternating, and keep each mode's fastest run (load noise)")
    parser.add_argument("--json", default="", help="also write the results here")
    return parser


def _population(argv: Sequence[str], comm: Any = None) -> int:
    """Entry point of ``hflmpi bench population`` (under ``mpiexec -n P``)."""
    args = population_parser().parse_args(argv)
    comm = MPI.COMM_WORLD if comm is None else comm
    torch.set_num_threads(1)
    rank0 = comm.Get_rank() == 0
    best: dict[str, dict[str, Any]] = {}
    try:
        job = population_job(args)
        for _ in range(max(args.repeats, 1)):
            for mode in MODES if args.mode == "both" else (args.mode,):
                run = run_population(comm, job, mode, compile=args.compile and mode == "batched")
                if mode not in best or (run["client_steps_per_second"]
                                        > best[mode]["client_steps_per_second"]):
                    best[mode] = run
    except (HflmpiError, ValueError) as exc:
        return report_user_error("bench population", exc, show=rank0)
    results = list(best.values())
    if rank0:
        print(format_report(job, comm.Get_size(), results), flush=True)
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps({"job": asdict(job), "ranks": comm.Get_size(),
                                                   "results": results}, indent=2))
    return 0
