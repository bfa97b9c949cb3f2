"""Pack signed quantization levels into a dense little-endian bit stream of ``uint8``.

The grid (QSGD, Alistarh et al., NeurIPS 2017; the quantizer ``Q_n`` of QMLHFL, arXiv
2505.08145): a ``b``-bit quantizer with ``2 <= b <= 16`` sends an integer level ``l`` in
``[-s, s]`` with ``s = 2**(b-1) - 1`` (sign and magnitude; an odd grid that contains 0).
``b = 1`` is the stochastic *sign* quantizer: ``l`` in ``{-1, +1}`` (``s = 1``, no level 0).

On the wire a level is stored unsigned as its *code*:

* ``b >= 2``: ``code = l + s``, in ``[0, 2s] = [0, 2**b - 2]`` (code ``2**b - 1`` is unused);
* ``b == 1``: ``code = (l + 1) // 2``, i.e. 1 for ``+1`` and 0 for ``-1`` (the sign bit).

Bit order (LSB first, "little-endian bit stream"): code ``i`` occupies stream bits
``[i*b, (i+1)*b)``, its least significant bit first; stream bit ``k`` is bit ``k % 8`` (value
``2**(k % 8)``) of byte ``k // 8``. This is ``numpy.packbits(bits, bitorder="little")`` of the
codes' bits written LSB first, so an 8-bit code is one byte and a 16-bit code is two bytes,
little-endian. Bits past ``numel*b`` in the last byte are zero. ``numel`` codes take exactly
``ceil(numel*b/8)`` bytes.

All work is vectorised and reinterprets integer words as bytes, which needs a little-endian host
(as all CPUs and GPUs that torch supports are). Width 8 is a cast and 16 keeps the low half of
each ``int32``. Widths 1, 2 and 4 read the ``8/b`` byte-wide codes of one output byte as one
``int64``/``int32``/``int16`` word and OR it with right-shifted copies of itself (1 to 3
shifts), keeping the low byte. Widths 3, 5, 6 and 7 load 8 byte-wide codes as one ``int64`` and
squeeze them into its low ``8*b`` bits with three shift-and-mask merge stages (16-, 32-, 64-bit
lanes), then keep ``b`` bytes per word. Widths 9..15 OR the 8 codes of a group into two
``int64`` words. No Python loop runs over elements; at most over the 8 codes of a group or the
3 merge stages.
"""

from __future__ import annotations

import sys
from typing import Sequence

import torch

from hflmpi.core.wire import check_bits, levels_for_bits, packed_nbytes

__all__ = [
    "packed_buffer",
    "code_buffer",
    "pack_codes",
    "unpack_codes",
    "pack_levels",
    "unpack_levels",
    "sum_packed_levels",
    "code_scratch",
    "code_scratch_shape",
]

_INT_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def _require_little_endian() -> None:
    if sys.byteorder != "little":  # pragma: no cover - no big-endian torch targets exist
        raise RuntimeError("hflmpi.core.packing needs a little-endian host")


def _padded(codes: torch.Tensor, multiple: int, dtype: torch.dtype) -> torch.Tensor:
    """Return ``codes`` as ``dtype`` with zeros appended up to a multiple of ``multiple``."""
    n = codes.numel()
    padded_n = -(-n // multiple) * multiple
    if padded_n == n:
        return codes.to(dtype)
    out = torch.zeros(padded_n, dtype=dtype, device=codes.device)
    out[:n].copy_(codes)
    return out


def _reinterpret(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """View contiguous ``t``'s bytes as ``dtype`` (copying first if the start is misaligned)."""
    misaligned = t.data_ptr() % torch.empty((), dtype=dtype).element_size()
    if misaligned or (t.dim() and t.stride(-1) != 1) or not t.is_contiguous():
        t = torch.empty(t.shape, dtype=t.dtype, device=t.device).copy_(t)
    return t.view(dtype)


def _lane_masks(lane_bits: int, width: int) -> int:
    """Return a 64-bit mask with the low ``width`` bits of every ``lane_bits``-bit lane set."""
    lane = (1 << width) - 1
    return sum(lane << offset for offset in range(0, 64, lane_bits))


def _compact_words_(words: torch.Tensor, bits: int) -> torch.Tensor:
    """Squeeze 8 byte-wide codes (< 2**bits, bits <= 7) per int64 into its low ``8*bits`` bits.

    In place. Three merge stages double the packed width each time: byte pairs in 16-bit
    lanes, then 32-bit lanes, then the whole word. Every intermediate keeps bit 63 clear, so
    the arithmetic right shifts of int64 act as logical ones.
    """
    moved = torch.empty_like(words)
    for lane_bits, width in ((16, bits), (32, 2 * bits), (64, 4 * bits)):
        half = lane_bits // 2
        low = _lane_masks(lane_bits, half)
        torch.bitwise_right_shift(words, half - width, out=moved)
        moved.bitwise_and_(low << width)
        words.bitwise_and_(low).bitwise_or_(moved)
    return words


def _spread_words_(words: torch.Tensor, bits: int) -> torch.Tensor:
    """Invert :func:`_compact_words_` in place: spread ``8*bits`` low bits into 8 byte codes."""
    moved = torch.empty_like(words)
    for lane_bits, width in ((64, 4 * bits), (32, 2 * bits), (16, bits)):
        half = lane_bits // 2
        keep = _lane_masks(lane_bits, width)
        torch.bitwise_right_shift(words, width, out=moved)
        moved.bitwise_and_(keep).bitwise_left_shift_(half)
        words.bitwise_and_(keep).bitwise_or_(moved)
    return words


# Widths that divide 8: one output byte per word of 8/b byte-wide codes. Packing ORs the word
# with itself shifted right (each shift pulls the next codes down next to the previous ones);
# the low byte then holds the packed codes (higher bytes hold leftovers and are dropped).
# Unpacking puts the byte in the low byte of a word and spreads it with (shift left, OR, mask).
_WORD_DTYPE = {1: torch.int64, 2: torch.int32, 4: torch.int16}
_PACK_SHIFTS = {1: (7, 14, 28), 2: (6, 12), 4: (4,)}
_SPREAD_STEPS = {
    1: ((28, 0x0000000F0000000F), (14, 0x0003000300030003), (7, 0x0101010101010101)),
    2: ((12, 0x000F000F), (6, 0x03030303)),
    4: ((4, 0x0F0F),),
}


def _pack_divisor_width(grouped: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack byte-wide codes (length a multiple of 8/bits) in place; return the packed bytes."""
    words = _reinterpret(grouped, _WORD_DTYPE[bits])
    moved = torch.empty_like(words)
    for shift in _PACK_SHIFTS[bits]:  # the top byte of each word is < 2**bits: bit 63/31/15 clear
        torch.bitwise_right_shift(words, shift, out=moved)
        words.bitwise_or_(moved)
    low_bytes = words.view(torch.uint8).view(words.numel(), words.element_size())[:, 0]
    return torch.empty(words.numel(), dtype=torch.uint8, device=words.device).copy_(low_bytes)


def _unpack_divisor_width(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Spread packed bytes into byte-wide codes, ``8/bits`` per input byte."""
    per_byte = 8 // bits
    raw = torch.zeros(packed.numel(), per_byte, dtype=torch.uint8, device=packed.device)
    raw[:, 0].copy_(packed)
    words = raw.view(_WORD_DTYPE[bits]).view(-1)
    moved = torch.empty_like(words)
    for shift, mask in _SPREAD_STEPS[bits]:
        torch.bitwise_left_shift(words, shift, out=moved)
        words.bitwise_or_(moved).bitwise_and_(mask)
    return raw.view(-1)


def pack_codes(
    codes: torch.Tensor, bits: int, numel: int | None = None, *, overwrite: bool = False
) -> torch.Tensor:
    """Pack unsigned codes (each in ``[0, 2**bits)``) into a ``uint8`` bit stream.

    Parameters
    ----------
    codes : Tensor
        1-D integer tensor of codes (not checked for range here; see :func:`pack_levels`). It
        may be longer than ``numel`` (for instance padded with zeros to a multiple of 8, which
        saves a copy); entries past ``numel`` must then be zero.
    bits : int
        Code width, 1..16.
    numel : int, optional
        Number of codes to keep; defaults to ``codes.numel()``.
    overwrite : bool
        Allow using ``codes`` as scratch (its contents are destroyed); saves a copy.

    Returns
    -------
    Tensor
        ``uint8`` tensor of exactly ``ceil(numel*bits/8)`` bytes on ``codes``' device, in the bit
        order given in the module docstring. For ``bits == 8`` and ``uint8`` input this may be
        ``codes`` itself (no copy).
    """
    bits = check_bits(bits)
    _require_little_endian()
    codes = codes.reshape(-1)
    numel = codes.numel() if numel is None else numel
    if numel > codes.numel():
        raise ValueError(f"numel={numel} exceeds the {codes.numel()} codes given")
    nbytes = packed_nbytes(numel, bits)
    if bits == 8:
        return codes[:numel].to(torch.uint8)
    if bits == 16:  # low half of each int32, reinterpreted (no narrowing conversion)
        wide = _reinterpret(codes[:numel].to(torch.int32), torch.int16)
        return _reinterpret(wide.view(-1, 2)[:, 0], torch.uint8)
    groups = -(-numel // 8)
    if bits < 8:
        grouped = _padded(codes[: groups * 8], 8, torch.uint8)
        if not overwrite and grouped.data_ptr() == codes.data_ptr():
            grouped = grouped.clone()
        if bits in _WORD_DTYPE:
            return _pack_divisor_width(grouped, bits)[:nbytes]
        words = _reinterpret(grouped, torch.int64)
        stream = _compact_words_(words, bits).view(torch.uint8).view(groups, 8)[:, :bits]
        return stream.reshape(-1)[:nbytes]
    # 9..15 bits: 8 codes span two int64 words; OR each code in at its bit offset.
    grouped = _padded(codes[: groups * 8], 8, torch.int64).view(groups, 8)
    words = torch.zeros(groups, 2, dtype=torch.int64, device=codes.device)
    for j in range(8):
        word, shift = divmod(j * bits, 64)
        column = grouped[:, j]
        words[:, word].bitwise_or_(column << shift)
        if shift + bits > 64:  # the code straddles the two words
            words[:, word + 1].bitwise_or_(column >> (64 - shift))
    stream = words.view(torch.uint8).view(groups, 16)[:, :bits]
    return stream.reshape(-1)[:nbytes]


def unpack_codes(
    packed: torch.Tensor, bits: int, numel: int, dtype: torch.dtype = torch.int32
) -> torch.Tensor:
    """Unpack ``numel`` unsigned codes from a ``uint8`` bit stream made by :func:`pack_codes`.

    Parameters
    ----------
    packed : Tensor
        1-D ``uint8`` tensor of at least ``ceil(numel*bits/8)`` bytes.
    bits : int
        Code width, 1..16.
    numel : int
        Number of codes to unpack.
    dtype : torch.dtype
        Integer dtype of the result; it must hold ``2**bits - 1``.

    Returns
    -------
    Tensor
        1-D tensor of ``numel`` codes of ``dtype`` on ``packed``'s device. For ``bits == 8``
        and ``dtype=torch.uint8`` this is a view of ``packed`` (no copy).
    """
    bits = check_bits(bits)
    _require_little_endian()
    _check_int_dtype(dtype, (1 << bits) - 1, f"{bits}-bit codes")
    if packed.dtype != torch.uint8:
        raise TypeError(f"packed must be a uint8 tensor, got {packed.dtype}")
    packed = packed.reshape(-1)
    nbytes = packed_nbytes(numel, bits)
    if packed.numel() < nbytes:
        raise ValueError(f"{numel} codes of {bits} bits need {nbytes} bytes, got {packed.numel()}")
    if bits == 8:
        return packed[:numel].to(dtype)
    if bits == 16:  # sign-extends, then masks back to the unsigned 16-bit value
        return (_reinterpret(packed[:nbytes], torch.int16).to(torch.int32) & 0xFFFF).to(dtype)
    if bits in _WORD_DTYPE:
        return _unpack_divisor_width(packed[:nbytes], bits)[:numel].to(dtype)
    groups = -(-numel // 8)
    source = packed[:nbytes]
    if nbytes < groups * bits:  # the last group is short: zero-fill it to ``bits`` bytes
        source = torch.zeros(groups * bits, dtype=torch.uint8, device=packed.device)
        source[:nbytes].copy_(packed[:nbytes])
    nwords = 1 if bits < 8 else 2
    raw = torch.zeros(groups, 8 * nwords, dtype=torch.uint8, device=packed.device)
    raw[:, :bits].copy_(source.view(groups, bits))
    words = raw.view(torch.int64)
    if bits < 8:
        return _spread_words_(words.view(-1), bits).view(torch.uint8)[:numel].to(dtype)
    mask = (1 << bits) - 1
    out = torch.empty(groups, 8, dtype=torch.int64, device=packed.device)
    for j in range(8):
        word, shift = divmod(j * bits, 64)
        column = out[:, j]
        if shift + bits <= 64:
            torch.bitwise_and(words[:, word] >> shift, mask, out=column)
        else:  # the code straddles two words; >> is arithmetic, so mask its sign extension off
            torch.bitwise_and(words[:, word] >> shift, (1 << (64 - shift)) - 1, out=column)
            high = words[:, word + 1] & ((1 << (shift + bits - 64)) - 1)
            column.bitwise_or_(high << (64 - shift))
    return out.view(-1)[:numel].to(dtype)


def _check_int_dtype(dtype: torch.dtype, largest: int, what: str) -> None:
    if dtype not in _INT_DTYPES:
        allowed = ", ".join(map(str, _INT_DTYPES))
        raise TypeError(f"dtype={dtype} is not an integer dtype ({allowed})")
    if torch.iinfo(dtype).max < largest:
        raise ValueError(f"dtype={dtype} cannot hold {what} (up to {largest}); use a wider dtype")


def packed_buffer(out: torch.Tensor | None, nbytes: int, device: torch.device) -> torch.Tensor:
    """Return ``out`` checked to be a ``uint8`` tensor of ``nbytes`` elements, or a new one."""
    if out is None:
        return torch.empty(nbytes, dtype=torch.uint8, device=device)
    if out.dtype != torch.uint8 or out.numel() != nbytes:
        raise ValueError(f"out must be a uint8 tensor of {nbytes} elements, got {out.dtype} "
                         f"with {out.numel()}")
    return out


def code_buffer(codes: torch.Tensor | None, numel: int, bits: int,
                device: torch.device) -> torch.Tensor:
    """Return ``codes`` checked to be the :func:`code_scratch` of ``numel`` codes, or a new one."""
    if codes is None:
        return code_scratch(numel, bits, device)
    expected = code_scratch_shape(numel, bits)
    if (codes.dtype, codes.numel()) != expected:
        raise ValueError(f"codes must be a {expected[0]} tensor of {expected[1]} elements "
                         f"(code_scratch), got {codes.dtype} with {codes.numel()}")
    return codes


def pack_levels(
    levels: torch.Tensor,
    bits: int,
    *,
    out: torch.Tensor | None = None,
    codes: torch.Tensor | None = None,
    check: bool = True,
) -> torch.Tensor:
    """Pack signed levels into ``uint8``, storing each as its unsigned code.

    This is the quantized uplink's encoder (:mod:`hflmpi.mpi.uplink`, gather path): it writes the
    bit stream straight into the row of the send buffer given as ``out``.

    Parameters
    ----------
    levels : Tensor
        Integer tensor (any shape, flattened) of levels in ``[-s, s]`` for ``bits >= 2``, or in
        ``{-1, +1}`` for ``bits == 1``; ``s = levels_for_bits(bits)``.
    bits : int
        Width, 1..16.
    out : Tensor, optional
        ``uint8`` tensor of exactly ``ceil(numel*bits/8)`` elements to write into.
    codes : Tensor, optional
        Scratch for the codes from :func:`code_scratch` (reuse it to avoid page faults); unused
        at 8 bits, where the codes are the bytes.
    check : bool
        Check that every level lies on the grid (one extra pass; a level off the grid would
        corrupt its neighbours). The uplink skips it: its levels come from a clamp.

    Returns
    -------
    Tensor
        ``uint8`` tensor of ``ceil(levels.numel()*bits/8)`` bytes (``out`` if given; see the
        module docstring for the bit order).

    Raises
    ------
    ValueError
        If ``check`` and a level is outside the grid, or ``out``/``codes`` has the wrong size.
    """
    s = levels_for_bits(bits)
    if levels.dtype not in _INT_DTYPES:
        raise TypeError(f"levels must be an integer tensor, got {levels.dtype}")
    levels = levels.reshape(-1)
    numel = levels.numel()
    if check and numel:
        low, high = int(levels.min()), int(levels.max())
        if low < -s or high > s or (bits == 1 and bool((levels == 0).any())):
            grid = "{-1, +1}" if bits == 1 else f"[-{s}, {s}]"
            raise ValueError(
                f"levels span [{low}, {high}] but {bits}-bit levels must lie in {grid}"
            )
    out = packed_buffer(out, packed_nbytes(numel, bits), levels.device)
    if bits == 8:  # codes 0..254 are the bytes themselves
        torch.add(levels, s, out=out.view(-1))
        return out
    codes = code_buffer(codes, numel, bits, levels.device)
    if bits == 1:
        torch.add(levels, 1, out=codes[:numel]).bitwise_right_shift_(1)
    else:
        torch.add(levels, s, out=codes[:numel])
    codes[numel:].zero_()  # the padding of the last group of 8 must be zero codes
    out.view(-1).copy_(pack_codes(codes, bits, numel, overwrite=True))
    return out


def code_scratch_shape(numel: int, bits: int) -> tuple[torch.dtype, int]:
    """Return the dtype and length of :func:`pack_levels`'s code scratch for ``numel`` levels.

    Widths below 8 use byte-wide codes padded to a multiple of 8 (packed in place, no copy);
    wider ones ``int32`` codes.
    """
    if check_bits(bits) < 8:
        return torch.uint8, -(-numel // 8) * 8
    return torch.int32, numel


def code_scratch(numel: int, bits: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Return a code scratch for :func:`pack_levels` (reuse it to avoid page faults)."""
    dtype, length = code_scratch_shape(numel, bits)
    return torch.empty(length, dtype=dtype, device=device)


def sum_packed_levels(
    rows: Sequence[torch.Tensor] | torch.Tensor,
    bits: int,
    out: torch.Tensor,
    *,
    out_holds_levels: bool = True,
) -> torch.Tensor:
    """Add the levels packed in ``rows`` into ``out``: the gather path's decoder at the leader.

    ``out <- out + sum_r unpack_levels(rows[r])`` (or ``out <- sum_r ...`` when
    ``out_holds_levels`` is false), exact in integers. It adds the *codes* (``level + s``; the
    sign grid's ``(level + 1) / 2``) of the rows in order and removes the offsets once at the end:
    one integer pass per row and no widening copies. The sign grid turns ``out``'s own levels into
    codes first and then ``sum(l) = 2 sum(codes) - k`` for ``k`` contributions.

    Parameters
    ----------
    rows : sequence of Tensor, or 2-D Tensor
        ``uint8`` bit streams of ``numel = out.numel()`` levels each (:func:`pack_levels`).
    bits : int
        Width, 1..16.
    out : Tensor
        Signed integer accumulator of ``numel`` elements; it must hold ``2 s k`` for ``k``
        contributions (:attr:`hflmpi.core.wire.LayerWire.accumulator_nbytes`). On entry it holds
        the leader's own levels (``out_holds_levels``) or anything (it is zeroed).
    out_holds_levels : bool
        Whether ``out``'s levels count as one contribution.

    Returns
    -------
    Tensor
        ``out``.
    """
    s = levels_for_bits(bits)
    numel = out.numel()
    contributions = len(rows) + (1 if out_holds_levels else 0)
    _check_int_dtype(out.dtype, 2 * s * contributions, f"a sum of {contributions} {bits}-bit codes")
    if out.dtype == torch.uint8:
        raise TypeError("out accumulates signed levels: use int8, int16, int32 or int64")
    nbytes = packed_nbytes(numel, bits)
    for row in rows:
        if row.dtype != torch.uint8 or row.numel() < nbytes:
            raise ValueError(f"every row must be a uint8 bit stream of >= {nbytes} bytes "
                             f"({numel} {bits}-bit levels), got {row.dtype} with {row.numel()}")
    flat = out.view(-1)
    if not out_holds_levels:
        flat.zero_()
    elif bits == 1:
        flat.add_(1).bitwise_right_shift_(1)
    for row in rows:
        if bits == 8:
            flat.add_(row.view(-1)[:numel])
        else:
            flat.add_(unpack_codes(row, bits, numel, dtype=out.dtype))
    if bits == 1:
        flat.mul_(2).sub_(contributions)
    elif len(rows):
        flat.sub_(len(rows) * s)
    return out


def unpack_levels(
    packed: torch.Tensor, bits: int, numel: int, dtype: torch.dtype = torch.int32
) -> torch.Tensor:
    """Unpack ``numel`` signed levels packed by :func:`pack_levels`.

    Parameters
    ----------
    packed : Tensor
        ``uint8`` bit stream of at least ``ceil(numel*bits/8)`` bytes.
    bits : int
        Width, 1..16.
    numel : int
        Number of levels.
    dtype : torch.dtype
        Signed integer dtype of the result (``int8``/``int16``/``int32``/``int64``); it must hold
        ``s = levels_for_bits(bits)``.

    Returns
    -------
    Tensor
        1-D tensor of ``numel`` levels.
    """
    s = levels_for_bits(bits)
    _check_int_dtype(dtype, s, f"{bits}-bit levels")
    if dtype == torch.uint8:
        raise TypeError("levels are signed: use int8, int16, int32 or int64")
    codes = unpack_codes(packed, bits, numel, torch.int32)
    levels = codes * 2 - 1 if bits == 1 else codes - s
    return levels.to(dtype)
