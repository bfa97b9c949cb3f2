"""Summable packing: integer codes in narrow lanes of 64-bit words that MPI can add as words.

Pure module (torch, no MPI). ``k`` lanes of ``L`` bits share one 64-bit word
(:func:`hflmpi.core.wire.lane_width`, :func:`~hflmpi.core.wire.lanes_per_word`). Every lane
holds a non-negative value (offset binary: ``level + s`` for one participant's levels, ``sum +
fan_in s`` for a group's level sum), and the lane width is sized so that the sum of ``fan_in``
participants' lanes stays below ``2^L``. Adding words as unsigned 64-bit integers (a plain
``MPI_Reduce``/``MPI_Allreduce`` with ``MPI_SUM`` on ``MPI_UINT64_T``) then never carries from
one lane into the next, and never past bit 64: the sum of the words is the word of the lane sums,
exactly, for any reduction order.

Layout: lane-major. With ``W`` words, entry ``i`` sits in lane ``i // W`` of word ``i % W``,
so packing and unpacking work on ``k`` contiguous slices of ``W`` entries (the last one
shorter); unused lanes of the last slice hold 0.

Words are stored in ``torch.int64`` tensors (torch has few unsigned 64-bit kernels); shifts and
ORs act on the same bits, and MPI is told the words are ``MPI_UINT64_T``.
"""

from __future__ import annotations

import torch

from hflmpi.core.wire import WORD_BITS, lane_width, lane_words, lanes_per_word, levels_for_bits

__all__ = ["LaneFormat", "pack_lanes", "unpack_lanes"]


class LaneFormat:
    """The lanes of ``numel`` entries, each a sum of up to ``fan_in`` ``bits``-bit codes.

    Parameters
    ----------
    numel : int
        Entries.
    bits : int
        Quantizer width (1..16); codes are ``level + s`` in ``[0, 2s]``.
    fan_in : int
        Most values one lane ever adds up (the participants of the sum).

    Raises
    ------
    OverflowError
        If a lane of ``fan_in`` codes cannot fit a word (checked up front, before any sum).
    """

    def __init__(self, numel: int, bits: int, fan_in: int) -> None:
        self.numel = numel
        self.bits = bits
        self.fan_in = fan_in
        self.s = levels_for_bits(bits)
        self.width = lane_width(bits, fan_in)
        self.lanes = lanes_per_word(bits, fan_in)
        self.words = lane_words(numel, bits, fan_in)
        largest = 2 * fan_in * self.s
        if largest >= 1 << self.width or self.width * self.lanes > WORD_BITS:
            raise OverflowError(  # a sizing bug: lane_width guarantees the opposite
                f"lanes of {self.width} bits cannot hold sums up to {largest} ({self.lanes} "
                f"lanes per {WORD_BITS}-bit word)"
            )

    @property
    def max_word(self) -> int:
        """Return the largest word one participant sends: every lane at its largest code ``2s``."""
        return sum((2 * self.s) << (lane * self.width) for lane in range(self.lanes))

    @property
    def nbytes(self) -> int:
        """Bytes of the packed words."""
        return 8 * self.words

    def slices(self) -> list[tuple[int, int, int]]:
        """Return ``(lane, start, stop)`` of every non-empty lane's entries (lane-major)."""
        out = []
        for lane in range(self.lanes):
            start = lane * self.words
            stop = min(start + self.words, self.numel)
            if start < stop:
                out.append((lane, start, stop))
        return out


def pack_lanes(values: torch.Tensor, fmt: LaneFormat, out: torch.Tensor, *, offset: int,
               scratch: torch.Tensor) -> torch.Tensor:
    """Write ``values + offset`` into the lanes of ``out`` (``fmt.words`` int64 words).

    Parameters
    ----------
    values : Tensor
        ``fmt.numel`` integers; ``values + offset`` must lie in ``[0, 2^L)`` (not checked here:
        levels from :func:`hflmpi.core.quantize.to_levels` plus ``s``, or a level sum plus
        ``fan_in s``, always do).
    fmt : LaneFormat
        The lanes.
    out : Tensor
        int64 tensor of ``fmt.words`` entries, overwritten.
    offset : int
        Added to every value (offset binary), ``s`` or ``fan_in s``.
    scratch : Tensor
        int64 tensor of at least ``fmt.words`` entries.

    Returns
    -------
    Tensor
        ``out``.
    """
    _check(values, fmt, out, scratch)
    out.zero_()
    for lane, start, stop in fmt.slices():
        part = scratch[: stop - start]
        part.copy_(values[start:stop])
        if offset:
            part.add_(offset)
        if lane:
            part.bitwise_left_shift_(lane * fmt.width)
        out[: stop - start].bitwise_or_(part)
    return out


def unpack_lanes(words: torch.Tensor, fmt: LaneFormat, out: torch.Tensor, *, offset: int,
                 scratch: torch.Tensor, start: int = 0, stop: int | None = None) -> torch.Tensor:
    """Read the lanes of ``words`` into ``out`` and subtract ``offset``: the inverse of packing.

    Parameters
    ----------
    words : Tensor
        int64 tensor of ``fmt.words`` entries.
    fmt : LaneFormat
        The lanes.
    out : Tensor
        Integer tensor of ``stop - start`` entries, wide enough for the values.
    offset : int
        Subtracted from every lane (``fan_in s`` for a sum of ``fan_in`` offset codes).
    scratch : Tensor
        int64 tensor of at least ``min(stop - start, fmt.words)`` entries.
    start, stop : int
        The entries to read (all by default), so a large model can be read in chunks.

    Returns
    -------
    Tensor
        ``out``.
    """
    stop = fmt.numel if stop is None else stop
    if not 0 <= start <= stop <= fmt.numel:
        raise ValueError(f"entries [{start}, {stop}) are outside [0, {fmt.numel})")
    _check_words(words, fmt)
    if out.is_floating_point() or out.dim() != 1 or out.numel() != stop - start:
        raise ValueError(f"out must be a 1-D integer tensor of {stop - start} entries, got "
                         f"{out.dtype} {tuple(out.shape)}")
    mask = (1 << fmt.width) - 1
    for lane, first, last in fmt.slices():
        low, high = max(first, start), min(last, stop)
        if low >= high:
            continue
        part = scratch[: high - low]
        source = words[low - first: high - first]
        if lane:
            # arithmetic shift of the int64 view: the sign copies land above the mask
            torch.bitwise_right_shift(source, lane * fmt.width, out=part)
            part.bitwise_and_(mask)
        else:
            torch.bitwise_and(source, mask, out=part)
        if offset:
            part.sub_(offset)
        out[low - start: high - start].copy_(part)
    return out


def _check_words(words: torch.Tensor, fmt: LaneFormat) -> None:
    if words.dtype != torch.int64 or words.dim() != 1 or words.numel() != fmt.words:
        raise ValueError(f"words must be a 1-D int64 tensor of {fmt.words} entries, got "
                         f"{words.dtype} {tuple(words.shape)}")


def _check(values: torch.Tensor, fmt: LaneFormat, words: torch.Tensor,
           scratch: torch.Tensor) -> None:
    if values.is_floating_point() or values.dim() != 1 or values.numel() != fmt.numel:
        raise ValueError(f"values must be a 1-D integer tensor of {fmt.numel} entries, got "
                         f"{values.dtype} {tuple(values.shape)}")
    _check_words(words, fmt)
    if scratch.dtype != torch.int64 or scratch.numel() < min(fmt.words, fmt.numel):
        raise ValueError(f"scratch must be an int64 tensor of at least {fmt.words} entries")
