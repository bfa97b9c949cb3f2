"""``hflmpi plan``: choose ``tau`` per layer within a deadline (serial; no MPI needed).

Reads the times from the options or from a run record (:func:`hflmpi.record.timings.times_from_run`),
scales float32 aggregation times to the layers' quantizers
(:func:`hflmpi.core.tau_search.quantized_comm_time`) and runs the search of
:mod:`hflmpi.core.tau_search`. With ``--network FILE`` (per-layer networks fitted by
``hflmpi bench calibrate``) and ``--numel``, ``t_cm`` comes from the cost model instead
(:func:`hflmpi.core.costmodel.aggregation_costs`, plus the file's codec cost per parameter on
quantized layers), and ``--choose-bits 0,8,4,2`` also picks every
layer's width: the cheapest whose variance factor fits ``--max-variance``
(:func:`hflmpi.core.bit_choice.choose_bits`).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from typing import Sequence

from hflmpi.config import format_value
from hflmpi.core.bit_choice import BitOption, bit_options, choose_bits
from hflmpi.core.costmodel import Network, aggregation_costs
from hflmpi.core.netfile import read_codec, read_networks
from hflmpi.core.tau_search import (
    BoundConstants,
    PlanError,
    PlanResult,
    quantized_comm_time,
    search,
)
from hflmpi.core.wire import bytes_ratio
from hflmpi.errors import HflmpiError, report_user_error
from hflmpi.record.timings import times_from_run

__all__ = ["main", "tau_setting"]


def tau_setting(tau: Sequence[int]) -> str:
    """Return the ``hflmpi run --set`` value that runs with ``tau``, e.g. ``schedule.tau=[4, 2]``."""
    return f"schedule.tau={format_value(list(tau))}"


def _floats(text: str, name: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise PlanError(f"--{name}={text!r} must be comma-separated numbers, e.g. 0.01,0.05") from None


def _ints(text: str, name: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise PlanError(f"--{name}={text!r} must be comma-separated integers, e.g. 8,4") from None


def _format(result: PlanResult, bits: Sequence[int]) -> str:
    b = result.bound
    lines = [
        f"# hflmpi plan: deadline {result.deadline:g} s, t_cp {result.t_cp:.6g} s/step, "
        f"t_cm {[round(t, 9) for t in result.t_cm]} s/aggregation, bits {list(bits)}, "
        f"q {[round(x, 5) for x in result.q]}, fanouts {result.fanouts}",
        f"chosen tau        {result.tau}   (best of {result.feasible} feasible; "
        f"{result.searched} fit the deadline)",
        f"apply with        hflmpi run CONFIG.toml --set {shlex.quote(tau_setting(result.tau))}",
        f"round time T(tau) {result.round_time:.6g} s",
        f"rounds in D       {result.rounds}",
        f"SGD steps K       {result.steps}",
        f"bound B(tau)      {b.total:.6g}  (optimisation {b.optimisation:.4g}, noise {b.noise:.4g}, "
        f"drift {b.drift:.4g}, quantization {b.quantization:.4g})",
        f"step condition    rho = {result.step_condition:.4g} "
        f"({'holds' if result.step_condition <= 1 else 'VIOLATED: the bound is not guaranteed'})",
    ]
    r = result.random
    if r is not None:
        lines += [
            f"random feasible tau ({r.count} draws of {r.feasible}): bound min {r.minimum:.6g}, "
            f"median {r.median:.6g}, mean {r.mean:.6g}, max {r.maximum:.6g}",
            f"  chosen bound <= random in {100 * r.not_better:.1f}% of draws; "
            f"median random / chosen = {r.median_ratio:.3f}",
        ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``hflmpi plan`` (serial; no MPI needed)."""
    parser = argparse.ArgumentParser(
        prog="hflmpi plan",
        description="Choose tau per layer that minimises a convergence bound within a deadline.",
    )
    parser.add_argument("--t-cp", type=float, help="seconds per local SGD step")
    parser.add_argument("--t-cm", help="seconds per layer-n aggregation of a float32 model, "
                        "comma-separated (layer 1 first); scaled to --bits")
    parser.add_argument("--t-cm-quantized", action="store_true",
                        help="--t-cm was measured at --bits already: do not rescale it")
    parser.add_argument("--latency", default="", help="per-layer fixed part of t_cm that does not "
                        "shrink with the payload (seconds, comma-separated; default 0)")
    parser.add_argument("--from-run", metavar="RUN.h5", help="read t_cp, t_cm, bits and fanouts "
                        "from a run record (explicit options override)")
    parser.add_argument("--deadline", type=float, required=True, help="wall-clock budget D (s)")
    parser.add_argument("--bits", default="", help="quantizer bits per layer, e.g. 8,4 (0 = exact)")
    parser.add_argument("--bucket-size", type=int, default=0, help="0 = per-width default")
    parser.add_argument("--fanouts", default="", help="children per node per layer (default 4 each)")
    parser.add_argument("--tau-max", default="20", help="largest tau searched (one, or per layer)")
    parser.add_argument("--strict", action="store_true", help="only tau with rho(tau) <= 1")
    parser.add_argument("--random", type=int, default=100, help="random feasible tau to compare (0 = none)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lipschitz", type=float, default=BoundConstants.lipschitz, help="L")
    parser.add_argument("--sigma2", type=float, default=BoundConstants.sigma2, help="sigma^2")
    parser.add_argument("--gap", type=float, default=BoundConstants.gap, help="f(x0) - f*")
    parser.add_argument("--lr", type=float, default=BoundConstants.lr, help="eta")
    parser.add_argument("--grad2", type=float, default=BoundConstants.grad2, help="G^2")
    parser.add_argument("--zeta2", type=float, default=BoundConstants.zeta2, help="zeta^2 (heterogeneity)")
    parser.add_argument("--network", metavar="FILE", help="per-layer networks (JSON of hflmpi bench "
                        "calibrate): t_cm from the cost model; needs --numel")
    parser.add_argument("--numel", type=int, default=0, help="model parameters (with --network)")
    parser.add_argument("--algorithm", default="subtree", choices=("subtree", "tree"),
                        help="aggregation.algorithm of the exact layers (with --network)")
    parser.add_argument("--choose-bits", default="", metavar="B,B,...", help="with --network: pick "
                        "each layer's width among these (0 = exact): the cheapest that fits --max-variance")
    parser.add_argument("--max-variance", type=float, default=None,
                        help="largest quantizer variance factor q_n a layer may have (with --choose-bits)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    args = parser.parse_args(argv)
    try:
        result, bits, options = _run(args)
    except (HflmpiError, ValueError, OSError, KeyError) as exc:
        return report_user_error("plan", exc)
    if args.json:
        out = result.to_dict()
        out["bits"] = list(bits)
        out["set"] = tau_setting(result.tau)
        if options:
            out["bit_options"] = [{"bits": list(o.bits), "cost": o.cost, "q": list(o.q), "fits": o.fits}
                                  for o in options]
        print(json.dumps(out, indent=2))
    else:
        print(_format_bits(options, bits, args.max_variance) + _format(result, bits))
    return 0


def _format_bits(options: Sequence[BitOption], bits: Sequence[int], bound: float | None) -> str:
    if not options:
        return ""
    chosen = next(o for o in options if o.fits)
    lines = [f"# bits per layer: the cheapest of {len(options)} combinations whose q_n all <= {bound:g} "
             "(predicted seconds of one top-layer aggregation event, cheapest first)"]
    at = options.index(chosen)
    for i, o in enumerate(options[: at + 3]):
        why = ("CHOSEN" if i == at else "dearer" if i > at
               else f"cheaper, but q {max(o.q):.4g} > {bound:g}")
        lines.append(f"  bits {list(o.bits)!s:<14} {o.cost * 1e3:>11.3f} ms  q {[round(x, 4) for x in o.q]}  {why}")
    lines.append(f"apply with        --set 'quantize.bits={format_value(list(bits))}'")
    return "\n".join(lines) + "\n"


def _network_t_cm(args: argparse.Namespace, depth_hint: int | None) -> tuple[list[int], list[float],
                                                                               list[int], list[BitOption]]:
    """Return fan-outs, ``t_cm`` from the network file, the bits and the bit options considered."""
    nets: list[Network] = read_networks(args.network)
    if args.numel < 1:
        raise PlanError("--network needs --numel PARAMETERS (the model's size)")
    fanouts = (_ints(args.fanouts, "fanouts") if args.fanouts
               else [4] * (depth_hint or len(nets)))
    depth = len(fanouts)
    if len(nets) == 1:
        nets = nets * depth
    if len(nets) != depth:
        raise PlanError(f"{args.network} has {len(nets)} layer networks but --fanouts={fanouts} has {depth} layers")

    codec = read_codec(args.network, args.numel)  # the quantizer's arithmetic, per parameter and layer

    def cost(combo: Sequence[int]) -> list[float]:
        comm = aggregation_costs(fanouts, args.numel, nets, list(combo), args.bucket_size,
                                 args.algorithm, downlink="auto")
        return [t + (codec.get(b, 0.0) * args.numel if b else 0.0) for t, b in zip(comm, combo)]

    options: list[BitOption] = []
    if args.choose_bits:
        if args.max_variance is None:
            raise PlanError("--choose-bits needs --max-variance Q (e.g. 0.05 allows 8 bits, 5 allows 4)")
        candidates = _ints(args.choose_bits, "choose-bits")
        missing = sorted({b for b in candidates if b and b not in codec})
        if codec and missing:  # those widths would look free of arithmetic next to the others
            raise PlanError(f"{args.network} has no codec cost for bits {missing}: calibrate with "
                            f"hflmpi bench calibrate --bits {','.join(map(str, sorted(set(codec) | set(missing))))}")
        options = bit_options(candidates, depth, lambda c: sum(cost(c)), args.max_variance, args.bucket_size)
        bits = list(choose_bits(candidates, depth, lambda c: sum(cost(c)), args.max_variance,
                                args.bucket_size).bits)
    else:
        bits = _ints(args.bits, "bits") if args.bits else [0] * depth
        if len(bits) != depth:
            raise PlanError(f"--bits={bits} needs {depth} entries (one per layer)")
    return fanouts, cost(bits), bits, options


def _run(args: argparse.Namespace) -> tuple[PlanResult, list[int], list[BitOption]]:
    if args.network:
        return _run_network(args)
    if args.choose_bits:
        raise PlanError("--choose-bits needs --network FILE (from hflmpi bench calibrate) and --numel")
    result, bits = _run_times(args)
    return result, bits, []


def _search(args: argparse.Namespace, t_cp: float, t_cm: Sequence[float], bits: Sequence[int],
            bucket: int, fanouts: Sequence[int] | None) -> PlanResult:
    limits = _ints(args.tau_max, "tau-max")
    tau_max: int | list[int] = limits[0] if len(limits) == 1 else limits
    constants = BoundConstants(lipschitz=args.lipschitz, sigma2=args.sigma2, gap=args.gap,
                               lr=args.lr, grad2=args.grad2, zeta2=args.zeta2)
    return search(t_cp, t_cm, args.deadline, bits=bits, bucket_size=bucket, fanouts=fanouts,
                  constants=constants, tau_max=tau_max, strict=args.strict,
                  random=args.random, seed=args.seed)


def _run_network(args: argparse.Namespace) -> tuple[PlanResult, list[int], list[BitOption]]:
    measured = times_from_run(args.from_run) if args.from_run else None
    t_cp = args.t_cp if args.t_cp is not None else (measured.t_cp if measured else None)
    if t_cp is None:
        raise PlanError("give --t-cp SECONDS (or --from-run RUN.h5)")
    fanouts, t_cm, bits, options = _network_t_cm(args, len(measured.tau) if measured else None)
    return _search(args, t_cp, t_cm, bits, args.bucket_size, fanouts), bits, options


def _run_times(args: argparse.Namespace) -> tuple[PlanResult, list[int]]:
    measured = times_from_run(args.from_run) if args.from_run else None
    t_cp = args.t_cp if args.t_cp is not None else (measured.t_cp if measured else None)
    if t_cp is None:
        raise PlanError("give --t-cp SECONDS (or --from-run RUN.h5)")
    depth_hint = len(measured.tau) if measured else None
    bits = _ints(args.bits, "bits") if args.bits else (measured.bits if measured else [])
    if args.t_cm:
        raw = _floats(args.t_cm, "t-cm")
        measured_bits = bits if args.t_cm_quantized else [0] * len(raw)
    elif measured:
        raw, measured_bits = measured.t_cm, measured.bits
    else:
        raise PlanError("give --t-cm SECONDS,... per layer (or --from-run RUN.h5)")
    depth = len(raw)
    if depth_hint is not None and depth != depth_hint and not args.t_cm:
        raise PlanError(f"the run has {depth_hint} layers but t_cm has {depth}")
    bits = bits or [0] * depth
    if len(bits) != depth:
        raise PlanError(f"--bits={bits} has {len(bits)} entries but --t-cm has {depth} layers")
    latency = _floats(args.latency, "latency") if args.latency else [0.0] * depth
    if len(latency) != depth:
        raise PlanError(f"--latency needs {depth} entries")
    bucket = args.bucket_size or (measured.bucket_size if measured else 0)
    t_cm = []
    for t, have, want, lat in zip(raw, measured_bits, bits, latency):
        lat = min(lat, t)
        t32 = lat + (t - lat) / bytes_ratio(have, bucket)  # back to float32, then to the target
        t_cm.append(quantized_comm_time(t32, want, bucket, lat))
    fanouts = (_ints(args.fanouts, "fanouts") if args.fanouts
               else (measured.fanouts if measured and len(measured.fanouts) == depth else None))
    return _search(args, t_cp, t_cm, bits, bucket, fanouts), bits


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
