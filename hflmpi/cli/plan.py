"""``hflmpi plan``: choose ``tau`` per layer within a deadline (serial; no MPI needed).

Reads the times from the options or from a run record (:func:`hflmpi.record.timings.times_from_run`),
scales float32 aggregation times to the layers' quantizers
(:func:`hflmpi.core.tau_search.quantized_comm_time`) and runs the search of
:mod:`hflmpi.core.tau_search`.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from typing import Sequence

from hflmpi.config import format_value
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
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    args = parser.parse_args(argv)
    try:
        result, bits = _run(args)
    except (HflmpiError, ValueError, OSError, KeyError) as exc:
        return report_user_error("plan", exc)
    if args.json:
        out = result.to_dict()
        out["bits"] = list(bits)
        out["set"] = tau_setting(result.tau)
        print(json.dumps(out, indent=2))
    else:
        print(_format(result, bits))
    return 0


def _run(args: argparse.Namespace) -> tuple[PlanResult, list[int]]:
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
    limits = _ints(args.tau_max, "tau-max")
    tau_max: int | list[int] = limits[0] if len(limits) == 1 else limits
    constants = BoundConstants(lipschitz=args.lipschitz, sigma2=args.sigma2, gap=args.gap,
                               lr=args.lr, grad2=args.grad2, zeta2=args.zeta2)
    result = search(t_cp, t_cm, args.deadline, bits=bits, bucket_size=bucket, fanouts=fanouts,
                    constants=constants, tau_max=tau_max, strict=args.strict,
                    random=args.random, seed=args.seed)
    return result, bits


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
