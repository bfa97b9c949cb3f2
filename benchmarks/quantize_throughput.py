"""Measure single-core throughput of the quantization kernels the job's uplink runs.

Times, in parameters per second per core, the encoder of one child on the gather path of
:class:`hflmpi.mpi.uplink.QuantizedUplink` (``bucket_absmax`` -> ``to_packed`` into the send
row) and the decoder of a leader with one child (its own levels plus ``sum_packed_levels`` of
the child's row -> ``from_level_sum``), with the same preallocated
buffers the uplink keeps. The MPI collectives themselves are not timed (see ``hflmpi bench
aggregate``). Each rate is also given as a ratio to a baseline measured in the same run on the
same tensor: ``torch.rand(n)`` followed by ``.copy_(x)`` (one uniform draw and one float copy per
element, the floor of any naive stochastic rounding). CPU speed on shared machines drifts, so
compare the ratios, not absolute numbers across runs. The encoder runs compiled unless
``HFLMPI_QUANTIZE_KERNEL=eager`` (:mod:`hflmpi.core.fused`); the warm-up call compiles. Times
are the best of ``--repeats`` rounds, each round running baseline, encode and decode back to
back; the clock is this thread's CPU time (``time.thread_time``), i.e. per core, so other
processes on the machine distort it less than wall time.

Usage::

    python benchmarks/quantize_throughput.py [--numel 10000000 25000000] [--bits 2 4 8]
                                             [--bucket-size 512] [--repeats 7] [--wall]
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable

import torch

from hflmpi.core.fused import KERNEL_ENV
from hflmpi.core.packing import code_scratch, sum_packed_levels
from hflmpi.core.quantize import (
    bucket_absmax,
    from_level_sum,
    integer_dtype,
    new_workspace,
    to_levels,
    to_packed,
)
from hflmpi.core.rng import torch_generator
from hflmpi.core.wire import layer_wire, levels_for_bits

FAN_IN = 2  # a leader and one child: one packed row to decode


def _best_time(
    functions: dict[str, Callable[[], object]], repeats: int, clock: Callable[[], float]
) -> dict[str, float]:
    """Return the best time of each function over ``repeats`` interleaved rounds."""
    for function in functions.values():  # warm up (allocator, page faults)
        function()
    best = {name: float("inf") for name in functions}
    for _ in range(repeats):
        for name, function in functions.items():
            start = clock()
            function()
            best[name] = min(best[name], clock() - start)
    return best


def _kernels(
    x: torch.Tensor, bits: int, bucket_size: int, generator: torch.Generator
) -> tuple[Callable[[], object], Callable[[], object], int]:
    """Return the uplink's encode and decode steps on preallocated buffers, and the wire bytes."""
    numel = x.numel()
    wire = layer_wire(numel, bits, FAN_IN, bucket_size, "gather")
    s = levels_for_bits(bits)
    levels = torch.empty(numel, dtype=integer_dtype(wire.accumulator_nbytes))
    accumulator = torch.empty_like(levels)
    workspace = new_workspace(numel)
    codes = code_scratch(numel, bits)
    row = torch.empty(wire.payload_nbytes, dtype=torch.uint8)
    out = torch.empty(numel)
    scales = bucket_absmax(x, bucket_size)

    def encode() -> None:
        scales.copy_(bucket_absmax(x, bucket_size))
        to_packed(x, scales, bits, generator, bucket_size=bucket_size, out=row, codes=codes,
                  workspace=workspace)

    def decode() -> None:
        # The accumulator's previous contents stand in for the leader's own levels (the job
        # writes them there with to_levels); wrapping integers do not change the timing.
        sum_packed_levels([row], bits, accumulator)
        from_level_sum(accumulator, scales, s, out=out, bucket_size=bucket_size)

    encode()
    to_levels(x, scales, s, generator, bucket_size=bucket_size, sign=bits == 1, out=levels,
              workspace=workspace)
    accumulator.copy_(levels)
    return encode, decode, wire.payload_nbytes + wire.scale_nbytes


def _rates(
    x: torch.Tensor, bits: int, bucket_size: int, generator: torch.Generator, repeats: int,
    clock: Callable[[], float],
) -> tuple[dict[str, float], int]:
    """Return params/s of baseline, encode and decode, and the bytes one child sends."""
    numel = x.numel()
    encode, decode, nbytes = _kernels(x, bits, bucket_size, generator)

    def baseline() -> None:
        torch.rand(numel, generator=generator).copy_(x)

    times = _best_time({"baseline": baseline, "encode": encode, "decode": decode}, repeats, clock)
    return {name: numel / seconds for name, seconds in times.items()}, nbytes


def main(argv: list[str] | None = None) -> None:
    """Run the benchmark and print one line per (numel, bits)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--numel", type=int, nargs="+", default=[10_000_000, 25_000_000])
    parser.add_argument("--bits", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--bucket-size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--wall", action="store_true", help="use wall time instead of CPU time")
    args = parser.parse_args(argv)

    torch.set_num_threads(1)
    clock = time.perf_counter if args.wall else time.thread_time
    print(
        f"torch {torch.__version__}, threads={torch.get_num_threads()}, "
        f"bucket_size={args.bucket_size}, best of {args.repeats}, "
        f"clock={'wall' if args.wall else 'thread CPU'}, "
        f"{KERNEL_ENV}={os.environ.get(KERNEL_ENV, 'auto')}; Mp/s = 1e6 params/s per core"
    )
    print(f"{'numel':>10} {'bits':>4} {'baseline':>9} {'encode':>9} {'x base':>7} "
          f"{'decode':>9} {'x base':>7} {'wire bytes':>11}")
    for numel in args.numel:
        generator = torch_generator(0, purpose="benchmark")
        x = torch.randn(numel, generator=generator)
        for bits in args.bits:
            rates, nbytes = _rates(x, bits, args.bucket_size, generator, args.repeats, clock)
            rate = {name: value / 1e6 for name, value in rates.items()}
            print(
                f"{numel:>10} {bits:>4} {rate['baseline']:>9.1f} "
                f"{rate['encode']:>9.1f} {rate['encode'] / rate['baseline']:>7.2f} "
                f"{rate['decode']:>9.1f} {rate['decode'] / rate['baseline']:>7.2f} "
                f"{nbytes:>11}"
            )


if __name__ == "__main__":
    main()
