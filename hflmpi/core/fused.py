r"""Fused dithered rounding: float values to integer levels or wire codes in one pass.

The stochastic rounding of :func:`hflmpi.core.quantize.to_levels` with an ``r``-bit integer
dither instead of a float one, arranged so that every operation after the first multiply is exact
in float32. For an element ``x`` of a bucket with reciprocal step ``g = fl(1/step)``
(``step = m/s``, or ``2m`` on the sign grid) and grid ``[lo, hi]`` with offset ``o``
(``o = 0, lo = -s, hi = s``; sign grid ``o = 1/2, lo = 0, hi = 1``):

.. math::

    w = \mathrm{clamp}\big(\mathrm{rne}(\mathrm{fl}(x g)\,2^r) + o\,2^r,\ lo\,2^r,\ hi\,2^r\big),
    \qquad \ell = \lfloor (w + U) / 2^r \rfloor,\qquad U \sim \mathcal U\{0, \dots, 2^r - 1\},

with ``rne`` rounding to the nearest integer (ties to even). ``w`` is an integer, so
``P(l = floor(w/2^r) + 1) = (w mod 2^r) / 2^r`` exactly and **E[l] = w / 2^r exactly**: the
rounding is exactly unbiased for every value on the dyadic grid ``2^-r`` (in units of the step).
For any other value ``t = x / step`` the only bias is the deterministic rounding to that grid and
the float32 product:

.. math::

    |E[\ell] - t| \le 2^{-(r+1)} + 2^{-23} |t| \quad\text{(steps)},

i.e. at most ``2^-(r+1) step + 2^-23 m`` in value (before the clamp, which only bites for
values beyond the scale). ``r = min(16, 24 - bitlength(s))`` (:func:`dither_bits`): 16 bits up
to 9-bit quantizers: a bias of at most ``2^-17`` step, the size of the float32 rounding of
``x/step`` near the top of an 8-bit grid and ``2^-16`` of the rounding's standard deviation at
``p = 1/2``; fewer bits for wider grids so that
``|w + U| <= (hi + 1) 2^r <= 2^24`` stays exact in float32 (16 bits: ``r = 9``, bias
``<= 2^-10`` step ``= 2^-25 m``). ``w``, ``U``, their sum, the scaling by ``2^-r`` and the floor
are exact, so every implementation that computes ``fl(x g)`` with one IEEE multiply (CPU,
CUDA, eager, compiled) produces the same levels bit for bit from the same dither.

The dither comes from random 64-bit words drawn with the caller's generator
(``random_`` over the full 64-bit range, :func:`draw_dither`): two bytes per element, read as a
low-byte plane and a high-byte plane (``U = lo[i] + 256 hi[i]``, then the top ``r`` bits), which
is 4 elements per word where the float dither needed 2 and keeps every load byte-wide
(vectorizable).

The kernel runs compiled (``torch.compile``: C++ on CPU, Triton on CUDA) when possible and as
in-place eager ops otherwise; both compute the same exact arithmetic and are compared bit for bit
by the tests. ``HFLMPI_QUANTIZE_KERNEL`` picks: ``auto`` (default: compiled for tensors of
at least :data:`COMPILE_MIN_NUMEL` elements, falling back to eager with one warning if
compilation fails), ``compiled`` (always; fail instead of falling back) or ``eager``.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from hflmpi.core.packing import pack_codes

__all__ = [
    "COMPILE_MIN_NUMEL",
    "KERNEL_ENV",
    "Grid",
    "dither_bits",
    "dither_words",
    "draw_dither",
    "pack_into",
    "reciprocal_steps",
    "round_dithered",
]

KERNEL_ENV = "HFLMPI_QUANTIZE_KERNEL"
# ``auto`` compiles from this size on. Compiling costs each process about 10 s of CPU once (20 s
# with a cold inductor cache; most of it importing the compiler) and saves about 1.5 ns per
# element and call, so it pays off only where tensors are large (and runs long): 2^22
# elements save ~6 ms per call. Below it the eager twin runs (the same bits either way).
COMPILE_MIN_NUMEL = 1 << 22
_KERNEL_MODES = ("auto", "compiled", "eager")
_FLOAT32_MAX = torch.finfo(torch.float32).max
_DITHER_PLANE_BITS = 16  # two byte planes
# Widths 1, 2, 4: the word of 8/b byte-wide codes per output byte and its shift-OR steps
# (hflmpi.core.packing's divisor-width packing).
_PACK_WORDS = {1: (torch.int64, (7, 14, 28)), 2: (torch.int32, (6, 12)), 4: (torch.int16, (4,))}
_EAGER_BLOCK = 1 << 16  # elements per block of the eager kernel on CPU (3 x 256 KiB of scratch)


def dither_bits(s: int) -> int:
    """Return the dither resolution ``r`` for a grid up to level ``s``: ``min(16, 24 - bitlength(s))``.

    It keeps ``(s + 1) 2^r <= 2^24`` so that ``w + U`` is exact in float32 (see the module
    docstring); ``s = 2**(bits-1) - 1`` gives 16 bits up to ``bits = 9`` and ``25 - bits`` above.
    """
    if isinstance(s, bool) or not isinstance(s, int) or not 1 <= s < 1 << 16:
        raise ValueError(f"s={s!r} must be an integer in [1, 65535] (levels_for_bits(bits))")
    return min(_DITHER_PLANE_BITS, 24 - s.bit_length())


@dataclass(frozen=True)
class Grid:
    """A rounding grid: levels ``[lo, hi]``, value offset, and the affine map written out.

    The kernel writes ``l * mult + add`` for the rounded level ``l`` in ``[lo, hi]``: ``(1, 0)``
    for levels, ``(1, s)`` for the wire codes of :mod:`hflmpi.core.packing`, and on the sign
    grid (``lo, hi = 0, 1``) ``(2, -1)`` for the levels ``+-1`` or ``(1, 0)`` for the codes.
    """

    s: int
    sign: bool
    codes: bool

    @property
    def bounds(self) -> tuple[int, int]:
        """Return the lowest and highest rounded level ``(lo, hi)``."""
        return (0, 1) if self.sign else (-self.s, self.s)

    @property
    def affine(self) -> tuple[int, int]:
        """Return ``(mult, add)``: the kernel writes ``level * mult + add``."""
        if self.sign:
            return (1, 0) if self.codes else (2, -1)
        return (1, self.s) if self.codes else (1, 0)

    def constants(self) -> tuple[float, ...]:
        """Return ``(2^r, o 2^r, lo 2^r, hi 2^r, 2^(r-16), 2^-r, mult, add)``, all exact floats."""
        r = dither_bits(self.s)
        lo, hi = self.bounds
        offset = float(1 << (r - 1)) if self.sign else 0.0
        mult, add = self.affine
        return (float(1 << r), offset, float(lo << r), float(hi << r),
                2.0 ** (r - _DITHER_PLANE_BITS), 2.0**-r, float(mult), float(add))


def dither_words(numel: int) -> int:
    """Return how many int64 random words :func:`draw_dither` needs for ``numel`` elements."""
    return -(-2 * numel // 8)


def draw_dither(numel: int, generator: torch.Generator, words: torch.Tensor) -> torch.Tensor:
    """Fill ``words`` with random 64-bit words; return the ``2*numel`` dither bytes.

    Bytes ``[0, numel)`` are the low plane and ``[numel, 2*numel)`` the high plane of the
    16-bit draws ``U_i = lo[i] + 256 hi[i]``.
    """
    needed = dither_words(numel)
    if words.dtype != torch.int64 or words.numel() < needed:
        raise ValueError(f"the dither needs an int64 tensor of >= {needed} elements "
                         f"(new_workspace), got {words.dtype} with {words.numel()}")
    drawn = words[:needed]
    drawn.random_(-(1 << 63), None, generator=generator)  # all 64 bits
    return drawn.view(torch.uint8)[: 2 * numel]


def _round_math(
    x: torch.Tensor, inv: torch.Tensor, low: torch.Tensor, high: torch.Tensor,
    c: torch.Tensor, out: torch.Tensor,
) -> None:
    """Round as one expression (the compiled kernel); ``c`` holds :meth:`Grid.constants`."""
    w = torch.clamp(torch.round(x * inv * c[0]) + c[1], c[2], c[3])
    dither = torch.floor((high.to(torch.float32) * 256.0 + low.to(torch.float32)) * c[4])
    level = torch.floor((w + dither) * c[5]) * c[6] + c[7]
    out.copy_(level)


def _round_eager(
    x: torch.Tensor, inv: torch.Tensor, low: torch.Tensor, high: torch.Tensor,
    k: tuple[float, ...], out: torch.Tensor,
) -> None:
    """Run :func:`_round_math`'s operations in place (its eager twin), block by block.

    On CPU the blocks hold ``_EAGER_BLOCK`` elements so that the two float scratches stay in
    cache across the dozen passes; other devices take the whole tensor at once.
    """
    rows, cols = x.shape
    block = _EAGER_BLOCK if x.device.type == "cpu" else x.numel()
    scratch = torch.empty(3 * min(x.numel(), max(block, cols)), dtype=torch.float32,
                          device=x.device)
    if cols <= block:
        step = max(1, block // cols)
        pieces = [(slice(r, r + step), slice(None)) for r in range(0, rows, step)]
    else:  # a bucket larger than a block: split it along its columns
        pieces = [(slice(r, r + 1), slice(c, c + block))
                  for r in range(rows) for c in range(0, cols, block)]
    for r, c in pieces:
        _round_block(x[r, c], inv[r], low[r, c], high[r, c], k, out[r, c], scratch)


def _round_block(
    x: torch.Tensor, inv: torch.Tensor, low: torch.Tensor, high: torch.Tensor,
    k: tuple[float, ...], out: torch.Tensor, scratch: torch.Tensor,
) -> None:
    third = scratch.numel() // 3
    w, dither, low_float = (scratch[i * third : i * third + x.numel()].view(x.shape)
                            for i in range(3))
    torch.mul(x, inv, out=w)
    w.mul_(k[0]).round_()
    if k[1]:
        w.add_(k[1])
    w.clamp_(k[2], k[3])
    dither.copy_(high)
    low_float.copy_(low)  # a same-dtype add is vectorized, a uint8 operand is not
    dither.mul_(256.0).add_(low_float)
    if k[4] != 1.0:
        dither.mul_(k[4]).floor_()
    w.add_(dither).mul_(k[5]).floor_()
    if k[6] != 1.0:
        w.mul_(k[6])
    if k[7]:
        w.add_(k[7])
    out.copy_(w)


@dataclass
class _Kernels:
    """The compiled kernels of this process, or the reason they are not used."""

    compiled: dict[str, Callable[..., None]] = field(default_factory=dict)
    failed: str = ""


_KERNELS = _Kernels()  # a cache: compiling once per process is the point


def _mode() -> str:
    mode = os.environ.get(KERNEL_ENV, "auto").strip().lower() or "auto"
    if mode not in _KERNEL_MODES:
        raise ValueError(f"{KERNEL_ENV}={mode!r} must be one of {', '.join(_KERNEL_MODES)}")
    return mode


def _dispatch(
    math: Callable[..., None], args: tuple[object, ...], eager: Callable[[], object], numel: int
) -> None:
    """Run ``math(*args)`` compiled, or ``eager()`` (the same results) as :data:`KERNEL_ENV` says.

    ``auto`` compiles for tensors of at least :data:`COMPILE_MIN_NUMEL` elements only.
    """
    mode = _mode()
    if mode == "auto" and (_KERNELS.failed or numel < COMPILE_MIN_NUMEL):
        mode = "eager"
    if mode == "eager":
        eager()
        return
    kernel = _KERNELS.compiled.get(math.__name__)
    if kernel is None:
        kernel = _KERNELS.compiled[math.__name__] = torch.compile(math, dynamic=True)
    try:
        kernel(*args)
    except Exception as error:  # no C++ compiler / Triton: the eager twin gives the same bits
        if mode == "compiled":
            raise
        _KERNELS.failed = f"{type(error).__name__}: {error}".splitlines()[0]
        warnings.warn(f"torch.compile of the quantization kernels failed ({_KERNELS.failed}); "
                      f"using the eager kernels (same results, slower). Set {KERNEL_ENV}=eager "
                      "to skip the attempt.", RuntimeWarning, stacklevel=4)
        eager()


def _run(
    x: torch.Tensor, inv: torch.Tensor, low: torch.Tensor, high: torch.Tensor, grid: Grid,
    out: torch.Tensor, numel: int,
) -> None:
    constants = grid.constants()
    _dispatch(_round_math,
              (x, inv, low, high, torch.tensor(constants, device=out.device), out),
              lambda: _round_eager(x, inv, low, high, constants, out), numel)


def _pack_math(
    codes: torch.Tensor, word_dtype: torch.dtype, shifts: tuple[int, ...], out: torch.Tensor
) -> None:
    """Pack byte-wide codes like :func:`hflmpi.core.packing.pack_codes` at widths 1, 2 and 4."""
    words = codes.view(word_dtype)
    for shift in shifts:
        words = words | (words >> shift)
    out.copy_(words.to(torch.uint8)[: out.numel()])  # the low byte of each word


def pack_into(codes: torch.Tensor, bits: int, numel: int, out: torch.Tensor) -> torch.Tensor:
    """Pack ``numel`` byte-wide codes (zero-padded to a multiple of 8) into ``out``.

    Widths 1, 2 and 4 run one fused pass (compiled, same bytes as
    :func:`hflmpi.core.packing.pack_codes`, which is the eager twin); other widths run
    :func:`~hflmpi.core.packing.pack_codes`. ``codes`` is overwritten.
    """
    def eager() -> None:
        out.view(-1).copy_(pack_codes(codes, bits, numel, overwrite=True))

    if bits not in _PACK_WORDS or codes.dtype != torch.uint8 or codes.numel() % 8:
        eager()
    else:
        _dispatch(_pack_math, (codes, *_PACK_WORDS[bits], out.view(-1)), eager, numel)
    return out


def round_dithered(
    x: torch.Tensor,
    inv: torch.Tensor,
    dither: torch.Tensor,
    grid: Grid,
    out: torch.Tensor,
    bucket_size: int,
) -> torch.Tensor:
    """Write the dithered rounding of flat float32 ``x`` into ``out`` (see the module docstring).

    Parameters
    ----------
    x : Tensor
        Flat float32 values.
    inv : Tensor
        float32 reciprocal step of each bucket (0 for an all-zero bucket).
    dither : Tensor
        ``2*numel`` bytes from :func:`draw_dither`.
    grid : Grid
        Levels or codes, standard or sign grid.
    out : Tensor
        Flat tensor of ``numel`` elements (an integer dtype that holds the result).
    bucket_size : int
        Elements per bucket (the last may be short).

    Returns
    -------
    Tensor
        ``out``.
    """
    n = x.numel()
    full = n // bucket_size
    low, high = dither[:n], dither[n : 2 * n]
    cut = full * bucket_size
    if full:
        rows = (full, bucket_size)
        _run(x[:cut].view(rows), inv[:full, None], low[:cut].view(rows), high[:cut].view(rows),
             grid, out[:cut].view(rows), n)
    if cut < n:
        _run(x[cut:].view(1, -1), inv[full:].view(1, 1), low[cut:].view(1, -1),
             high[cut:].view(1, -1), grid, out[cut:].view(1, -1), n)
    return out


def reciprocal_steps(steps: torch.Tensor) -> torch.Tensor:
    """Return ``fl(1/step)`` per bucket, 0 for a zero step and the float32 max for a subnormal one."""
    inv = torch.reciprocal(steps).clamp_(max=_FLOAT32_MAX)
    return torch.where(steps > 0, inv, torch.zeros_like(inv))
