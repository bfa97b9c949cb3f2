"""``hflmpi bench calibrate``: fit the cost model's networks to the collectives an aggregation runs.

Under ``mpiexec`` (or ``--emulate-nodes N --link RATE``, which launches itself on an emulated
cluster, :mod:`hflmpi.bench.emulate`), with the aggregation tree ``--fanouts`` (default: one group
per node), this times, on the communicators a training run's aggregation uses
(:class:`hflmpi.mpi.comm.LayerComms`), the buffer collectives it calls: ``Allreduce`` (float32
sums: the weights, the subtree model and the scales' ``MAX``), ``Reduce`` (the exact and integer
uplinks), ``Bcast`` (the downlinks) and ``Gather`` (the packed uplink), at each ``--sizes``
(bytes), interleaved, median of ``--repeats``, slowest rank. Layer n's network is fitted to the
layer-n communicator's samples with :func:`hflmpi.core.costmodel.calibrate`; the top layer also
gets the ``Allreduce`` over the whole tree (the exact ``subtree`` path crosses the top links).
Rank 0 writes the networks (:mod:`hflmpi.core.netfile`) to ``--out`` for ``hflmpi plan --network``.

The alpha-beta-gamma model has no term for the quantizer's own arithmetic (scale, dither,
round, pack; unpack, rebuild), which on CPUs costs more than the bytes it saves on fast links.
With ``--bits``, each width's quantized aggregation (every layer at that width, the default
method and downlink) is also timed at each ``--codec-numel`` size, and what the fitted networks
do not explain, per parameter and per layer, is stored as that width's codec cost at that size
(``meta.codec``, :func:`hflmpi.core.netfile.read_codec` takes the nearest size). The default
sizes, 2M and 6M, lie on both sides of :data:`hflmpi.core.fused.COMPILE_MIN_NUMEL` (4.2M),
where the quantizer switches from eager to compiled kernels and its cost per parameter may
change (on the 2-core development machine it hardly did: 22 vs 21-28 ns per parameter and layer).

``--validate SIZES`` then runs ``hflmpi bench aggregate``'s candidates (:func:`hflmpi.bench.aggregate.
bench_aggregate`: float32 flat ``Allreduce``, hflmpi's exact ``subtree`` and ``tree`` paths and the
quantized ``--bits`` widths, integer/levels downlink as a run does by default) at those parameter
counts in the same launch and prints the cost model's prediction beside each measured time. The
calibration sizes and the validation sizes should differ: nothing is fitted on the latter.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import asdict
from typing import Any, Callable, Sequence

import numpy as np
import torch
from mpi4py import MPI

from hflmpi.bench.aggregate import bench_aggregate, time_interleaved
from hflmpi.core.costmodel import Network, Sample, aggregation_costs, calibrate, collective_time
from hflmpi.core.netfile import write_networks
from hflmpi.core.topology import TreePlan, plan_fanouts
from hflmpi.errors import HflmpiError, report_user_error
from hflmpi.mpi.aggregate import HierarchicalAggregator
from hflmpi.mpi.comm import LayerComms

__all__ = ["time_collectives", "fit_layers", "measure_layers", "time_quantized", "codec_costs",
           "nearest_codec", "predictions", "format_validation", "main"]

DEFAULT_SIZES = "8,2097152,8388608,25165824"
"""Calibration message sizes in bytes: 8 B (latency), 2, 8 and 24 MiB.

Nothing between: a shaped link's token bucket (``tbf burst``, 1 MB in :mod:`hflmpi.bench.netem`)
lets a message that fits in it pass at memory speed, which no alpha-beta model describes, and
the relative-error fit would give those messages as much weight as the bandwidth-bound ones.
"""


def _candidates(comm: MPI.Comm, nbytes: int) -> dict[str, Callable[[], object]]:
    floats = np.ones(max(1, nbytes // 4), dtype=np.float32)
    total = np.empty_like(floats)
    octets = np.ones(nbytes, dtype=np.uint8)
    rows = np.empty(nbytes * comm.Get_size(), dtype=np.uint8) if comm.Get_rank() == 0 else None
    return {
        "allreduce": lambda: comm.Allreduce(MPI.IN_PLACE, floats, op=MPI.SUM),
        "reduce": lambda: comm.Reduce(floats, total, op=MPI.SUM, root=0),
        "bcast": lambda: comm.Bcast(octets, root=0),
        "gather": lambda: comm.Gather(octets, rows, root=0),
    }


def time_collectives(comm: MPI.Comm, sizes: Sequence[int], repeats: int,
                     ops: Sequence[str] = ("allreduce", "reduce", "bcast", "gather")) -> list[Sample]:
    """Time ``ops`` on ``comm`` at each size in bytes; return one sample per (op, size) (collective).

    Every sample is the median over ``repeats`` of the slowest rank's time, the ops of one
    size interleaved (:func:`hflmpi.bench.aggregate.time_interleaved`).
    """
    samples = []
    for nbytes in sizes:
        candidates = {op: run for op, run in _candidates(comm, int(nbytes)).items() if op in ops}
        for op, seconds in time_interleaved(comm, candidates, repeats).items():
            sent = 4 * max(1, nbytes // 4) if op in ("allreduce", "reduce") else nbytes
            samples.append(Sample(op, comm.Get_size(), float(sent), seconds))
    return samples


def fit_layers(per_layer: Sequence[Sequence[Sample]], label: str = "") -> list[Network]:
    """Fit one network per layer to that layer's samples (:func:`hflmpi.core.costmodel.calibrate`)."""
    return [calibrate(samples, name=f"layer{n}{'-' + label if label else ''}",
                      note=f"fitted to {len(samples)} timed collectives by hflmpi bench calibrate")
            for n, samples in enumerate(per_layer, start=1)]


def measure_layers(comm: MPI.Comm, comms: LayerComms, sizes: Sequence[int], repeats: int) -> list[list[Sample]]:
    """Return, on rank 0, the samples of every layer's communicator (collective over ``comm``).

    Rank 0 belongs to every layer (it leads each of its nodes). The top layer also gets the
    ``Allreduce`` over all ranks.
    """
    per_layer: list[list[Sample]] = []
    for n in range(1, comms.depth + 1):
        layer = comms.layer(n)
        samples = time_collectives(layer, sizes, repeats) if layer != MPI.COMM_NULL else []
        comm.Barrier()
        per_layer.append(samples)
    per_layer[-1] += time_collectives(comm, sizes, repeats, ops=("allreduce",))
    return per_layer


def time_quantized(comm: MPI.Comm, comms: LayerComms, numel: int, bits: Sequence[int],
                   repeats: int, bucket_size: int = 0) -> dict[int, float]:
    """Return the median seconds of a top-layer quantized aggregation per width (collective)."""
    depth, out = comms.depth, {}
    for width in bits:
        model = torch.randn(numel, generator=torch.Generator().manual_seed(comm.Get_rank()))
        agg = HierarchicalAggregator(comms, model, bits=[width] * depth, bucket_size=bucket_size, seed=0)
        step = [0]

        def run(agg: HierarchicalAggregator = agg, step: list[int] = step) -> None:
            step[0] += 1
            agg.aggregate(depth, 1.0, step=step[0])

        out[width] = time_interleaved(comm, {"q": run}, repeats)["q"]
        del model, agg
    return out


def _comm_time(numel: int, fanouts: Sequence[int], nets: Sequence[Network], width: int,
               bucket_size: int) -> float:
    return sum(aggregation_costs(fanouts, numel, list(nets), [width] * len(fanouts), bucket_size,
                                 downlink="auto"))


def codec_costs(measured: dict[int, float], numel: int, fanouts: Sequence[int], nets: Sequence[Network],
                bucket_size: int = 0) -> dict[int, float]:
    """Return seconds per parameter per quantized layer that the networks leave unexplained (>= 0)."""
    return {w: max(0.0, t - _comm_time(numel, fanouts, nets, w, bucket_size)) / (numel * len(fanouts))
            for w, t in measured.items()}


def nearest_codec(codec: dict[int, dict[int, float]], numel: int) -> dict[int, float]:
    """Return the codec costs calibrated at the size nearest to ``numel`` (log scale); ``{}`` if none."""
    if not codec:
        return {}
    return codec[min(codec, key=lambda n: abs(math.log(numel / n)))]


def predictions(row: dict[str, float], fanouts: Sequence[int], nets: Sequence[Network],
                bits: Sequence[int], bucket_size: int = 0, codec: dict[int, float] | None = None,
                ) -> dict[str, float]:
    """Return the modelled seconds of each candidate of a ``bench_aggregate`` row.

    ``mpi_allreduce``: one float32 ``Allreduce`` over every rank on the top network;
    ``hfl_subtree``/``hfl_tree``: a top-layer event of the exact paths; ``q{w}``: a top-layer event
    with every layer at ``w`` bits and the default (``"auto"``) downlink, plus ``codec[w]``
    seconds per parameter and layer (:func:`codec_costs`) where given.
    """
    numel, world = int(row["numel"]), int(np.prod(fanouts))
    out = {"mpi_allreduce": collective_time("allreduce", world, 4 * numel, nets[-1])}
    for algorithm in ("subtree", "tree"):
        out[f"hfl_{algorithm}"] = sum(aggregation_costs(fanouts, numel, list(nets), algorithm=algorithm))
    for width in bits:
        out[f"q{width}"] = (_comm_time(numel, fanouts, nets, width, bucket_size)
                            + (codec or {}).get(width, 0.0) * numel * len(fanouts))
    return out


def format_validation(rows: Sequence[dict[str, float]], fanouts: Sequence[int], nets: Sequence[Network],
                      bits: Sequence[int], bucket_size: int = 0,
                      codec: dict[int, dict[int, float]] | None = None) -> str:
    """Return the table of measured vs predicted seconds per size and candidate."""
    lines = ["# predicted vs measured (median of repeats, slowest rank); error = predicted / measured - 1",
             f"{'params':>10} {'candidate':>14} {'measured ms':>12} {'predicted ms':>13} {'error':>8}"]
    for row in rows:
        near = nearest_codec(codec or {}, int(row["numel"]))
        for name, predicted in predictions(row, fanouts, nets, bits, bucket_size, near).items():
            if name in row:
                lines.append(f"{int(row['numel']):>10} {name:>14} {row[name] * 1e3:>12.2f} "
                             f"{predicted * 1e3:>13.2f} {predicted / row[name] - 1:>+8.1%}")
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    """Return the parser of ``hflmpi bench calibrate``."""
    p = argparse.ArgumentParser(prog="hflmpi bench calibrate",
                                description="Fit the cost model's per-layer networks to timed collectives.")
    p.add_argument("--sizes", default=DEFAULT_SIZES, help="message sizes in bytes, comma-separated")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--fanouts", default="", help="tree fan-outs (default: all ranks in one layer)")
    p.add_argument("--out", default="", help="write the fitted networks here (JSON, for hflmpi plan --network)")
    p.add_argument("--validate", default="", help="parameter counts to predict and measure, comma-separated")
    p.add_argument("--bits", default="", help="quantized widths: calibrate their codec cost (and validate them)")
    p.add_argument("--codec-numel", default="2000000,6000000", help="model sizes of the codec calibration")
    p.add_argument("--bucket-size", type=int, default=0)
    p.add_argument("--emulate-nodes", type=int, default=0, metavar="N",
                   help="run on N fake nodes joined by shaped links (as root, not under mpiexec)")
    p.add_argument("--ranks-per-node", type=int, default=2, help="with --emulate-nodes")
    p.add_argument("--link", default="1gbit", metavar="RATE[,LATENCY]", help="with --emulate-nodes")
    p.add_argument("--label", default="", help="name of the link in the file (set by --emulate-nodes)")
    p.add_argument("--link-iface", default="", help=argparse.SUPPRESS)
    p.add_argument("--no-gloo", action="store_true", help=argparse.SUPPRESS)
    return p


def _ints(text: str) -> list[int]:
    return [int(float(x)) for x in text.split(",") if x.strip()]


def main(argv: Sequence[str], comm: Any = None) -> int:
    """Entry point of ``hflmpi bench calibrate`` (under ``mpiexec``, or ``--emulate-nodes``)."""
    args = parser().parse_args(argv)
    if args.emulate_nodes:
        from hflmpi.bench.emulate import run_emulated

        raw = ["calibrate", *argv, "--label", args.link.split(",")[0]]
        return run_emulated(raw, args.emulate_nodes, args.ranks_per_node, args.link)
    comm = MPI.COMM_WORLD if comm is None else comm
    try:
        sizes, validate, bits = _ints(args.sizes), _ints(args.validate), _ints(args.bits)
        codec_sizes = _ints(args.codec_numel) if bits else []
        fanouts = _ints(args.fanouts) or [comm.Get_size()]
        plan: TreePlan = plan_fanouts(fanouts, comm.Get_size())
        if not sizes or min(sizes) < 1 or args.repeats < 1 or min(codec_sizes, default=1) < 1:
            raise ValueError(f"--sizes={args.sizes!r} and --codec-numel={args.codec_numel!r} need "
                             "sizes >= 1 and --repeats >= 1")
    except (HflmpiError, ValueError) as exc:
        return report_user_error("bench calibrate", exc, show=comm.Get_rank() == 0)
    rank0 = comm.Get_rank() == 0
    with LayerComms(comm, plan) as comms:
        per_layer = measure_layers(comm, comms, sizes, args.repeats)
        quantized = {n: time_quantized(comm, comms, n, bits, args.repeats, args.bucket_size)
                     for n in codec_sizes}
    nets = fit_layers(per_layer, args.label) if rank0 else []
    codec = {n: codec_costs(quantized[n], n, fanouts, nets, args.bucket_size) for n in codec_sizes} if rank0 else {}
    if rank0:
        for net, samples in zip(nets, per_layer):
            print(f"# {net.name}: alpha {net.alpha * 1e6:.2f} us, beta {net.beta * 1e9:.4f} ns/B "
                  f"({1e-9 / net.beta if net.beta else float('inf'):.3f} GB/s), gamma "
                  f"{net.gamma * 1e9:.4f} ns/B; {len(samples)} samples", flush=True)
            for s in samples:
                print(f"#   {s.op:>9} p={s.p} {int(s.nbytes):>10} B {s.seconds * 1e3:10.3f} ms", flush=True)
        for n, costs in codec.items():
            for width, cost in costs.items():
                print(f"# codec {width} bits: {quantized[n][width] * 1e3:.2f} ms at {n} params, "
                      f"{cost * 1e9:.3f} ns per parameter per layer beyond the networks", flush=True)
        if args.out:
            write_networks(args.out, nets, {"fanouts": fanouts, "label": args.label, "samples": [
                [asdict(s) for s in samples] for samples in per_layer], "codec": {
                str(w): [[n, codec[n][w]] for n in codec_sizes] for w in bits}})
            print(f"# wrote {args.out}", flush=True)
    if validate:
        rows = bench_aggregate(comm, validate, plan, args.repeats, gloo=False, bits=bits,
                               bucket_size=args.bucket_size)
        if rank0:
            print(format_validation(rows, fanouts, nets, bits, args.bucket_size, codec), flush=True)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main(sys.argv[1:]))
