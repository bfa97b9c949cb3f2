"""Measure single-core encode/decode throughput of the stochastic uniform codec.

Prints parameters per second per core for :class:`hflmpi.core.quantize.StochasticUniformCodec`
encode (bucket max-abs, dither, round, bit-pack) and decode (unpack, rescale), and each as a
ratio to a baseline measured in the same run on the same tensor: ``torch.rand(n)`` followed by
``.copy_(x)`` (one uniform draw and one float copy per element, the floor of any naive
stochastic rounding). CPU speed on shared machines drifts, so compare the ratios, not absolute
numbers across runs. Times are the best of ``--repeats`` rounds, each round running baseline,
encode and decode back to back; the clock is this thread's CPU time (``time.thread_time``),
i.e. per core, so other processes on the machine distort it less than wall time.

Usage::

    python benchmarks/quantize_throughput.py [--numel 10000000 25000000] [--bits 2 4 8]
                                             [--bucket-size 512] [--repeats 7] [--wall]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

from hflmpi.core.quantize import StochasticUniformCodec
from hflmpi.core.rng import torch_generator


def _best_time(
    functions: dict[str, Callable[[], object]], repeats: int, clock: Callable[[], float]
) -> dict[str, float]:
    """Return the best time of each function over ``repeats`` interleaved rounds."""
    for function in functions.values():  # warm up (allocator, workspace, page faults)
        function()
    best = {name: float("inf") for name in functions}
    for _ in range(repeats):
        for name, function in functions.items():
            start = clock()
            function()
            best[name] = min(best[name], clock() - start)
    return best


def _rates(
    codec: StochasticUniformCodec,
    x: torch.Tensor,
    generator: torch.Generator,
    out: torch.Tensor,
    repeats: int,
    clock: Callable[[], float],
) -> tuple[dict[str, float], int]:
    """Return params/s of baseline, encode, decode and decode-into-out, and the wire bytes."""
    numel = x.numel()
    payload = codec.encode(x, generator)

    def baseline() -> None:
        torch.rand(numel, generator=generator).copy_(x)

    times = _best_time(
        {
            "baseline": baseline,
            "encode": lambda: codec.encode(x, generator),
            "decode": lambda: codec.decode(payload),
            "decode_out": lambda: codec.decode(payload, out=out),
        },
        repeats,
        clock,
    )
    return {name: numel / seconds for name, seconds in times.items()}, payload.nbytes


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
        f"clock={'wall' if args.wall else 'thread CPU'}; Mp/s = 1e6 params/s per core"
    )
    header = (
        f"{'numel':>10} {'bits':>4} {'baseline':>9} {'encode':>9} {'x base':>7} "
        f"{'decode':>9} {'x base':>7} {'dec->out':>9} {'x base':>7} {'wire bytes':>11}"
    )
    print(header)
    for numel in args.numel:
        generator = torch_generator(0, purpose="benchmark")
        x = torch.randn(numel, generator=generator)
        out = torch.empty(numel)
        for bits in args.bits:
            codec = StochasticUniformCodec(bits, args.bucket_size)
            rates, nbytes = _rates(codec, x, generator, out, args.repeats, clock)
            rate = {name: value / 1e6 for name, value in rates.items()}
            print(
                f"{numel:>10} {bits:>4} {rate['baseline']:>9.1f} "
                f"{rate['encode']:>9.1f} {rate['encode'] / rate['baseline']:>7.2f} "
                f"{rate['decode']:>9.1f} {rate['decode'] / rate['baseline']:>7.2f} "
                f"{rate['decode_out']:>9.1f} {rate['decode_out'] / rate['baseline']:>7.2f} "
                f"{nbytes:>11}"
            )


if __name__ == "__main__":
    main()
