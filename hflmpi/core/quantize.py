r"""Unbiased stochastic uniform quantization with per-bucket scales (pure tensor math).

Implements the quantizer ``Q_n`` of QMLHFL (arXiv 2505.08145), which is QSGD's stochastic
uniform quantizer (Alistarh et al., "QSGD: Communication-efficient SGD via gradient quantization
and encoding", NeurIPS 2017, Lemma 3.1) applied per bucket with a max-abs scale.

A flat vector ``x`` is cut into buckets of ``B`` elements (the last may be short). For a bucket
with scale ``m = max_i |x_i|`` (float32) and ``s = 2**(bits-1) - 1`` levels per sign:

.. math::

    d = m / s,\qquad t_i = x_i / d,\qquad \ell_i = \lfloor t_i + u_i \rfloor,\quad
    u_i \sim U[0, 1),\qquad Q(x)_i = \ell_i\, d,

so ``P(l_i = floor(t_i) + 1) = t_i - floor(t_i)`` (to the dither's resolution, see Numerics) and ``E[Q(x)_i] = x_i`` (unbiased), with
``l_i`` in ``[-s, s]``. Per bucket, ``E||Q(x) - x||^2 <= q ||x||^2`` with QSGD's
``q = min(B/s^2, sqrt(B)/s)`` (:func:`variance_bound`). ``bits = 1`` is the stochastic sign
quantizer: ``Q(x)_i = +m`` with probability ``(1 + x_i/m)/2``, else ``-m`` (see
:func:`variance_bound` for its constant). A bucket with ``m = 0`` decodes to exact zeros; NaN or
Inf input raises ``ValueError``.

A group of ``k`` children agrees on shared scales (a MAX allreduce of :func:`bucket_absmax`),
rounds to integer levels (:func:`to_levels`) and sums integers exactly (associative, so bitwise
reproducible for any reduction order): ``sum_c Q(x_c) = (sum_c l_c) m / s``
(:func:`from_level_sum`), with ``|sum_c l_c| <= k s`` (:func:`sum_dtype`). The levels travel as
integers of that width or bit-packed (:func:`hflmpi.core.packing.pack_levels`, summed at the
leader by :func:`hflmpi.core.packing.sum_packed_levels`); :mod:`hflmpi.core.wire` says how many
bytes each way moves. These are the kernels the job's uplink (:mod:`hflmpi.mpi.uplink`) runs:

    encode   bucket_absmax -> (MAX allreduce) -> to_packed (gather) or to_levels (sum)
    decode   sum_packed_levels (or an integer Reduce) -> from_level_sum

Numerics: the dither is an ``r``-bit integer (``r = 16`` up to 9 bits, ``25 - bits`` above),
drawn as full 64-bit words with ``random_`` from the caller's generator (never the global RNG),
4 elements per word; :mod:`hflmpi.core.fused` rounds in one fused pass whose arithmetic after
``fl(x_i / d)`` is exact, so ``E[l_i]`` is ``t_i`` rounded to the ``2^-r`` grid:
``|E[Q(x)_i] - x_i| <= 2^-(r+1) d + 2^-23 m`` (exactly unbiased for ``t_i`` on that grid).
Decoding multiplies by the same float32 step ``d``. ``x / d`` never overflows (``|x| <= m``);
scales below float32's normal range (~1e-38 * s) give a subnormal ``d`` and lose relative
precision. The same code runs on CUDA tensors with a CUDA generator; CPU and CUDA generators
produce different streams, so levels differ between devices (same distribution).
"""

from __future__ import annotations

import math

import torch

from hflmpi.core.fused import (
    Grid,
    dither_bits,
    dither_words,
    draw_dither,
    pack_into,
    reciprocal_steps,
    round_dithered,
)
from hflmpi.core.packing import code_buffer, packed_buffer
from hflmpi.core.wire import (
    check_bucket_size,
    container_nbytes,
    levels_for_bits,
    num_buckets,
    packed_nbytes,
)

__all__ = [
    "variance_bound",
    "bucket_absmax",
    "new_workspace",
    "to_levels",
    "to_packed",
    "from_level_sum",
    "sum_dtype",
    "integer_dtype",
]

_SUM_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64)
_DTYPE_OF_NBYTES = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


# --------------------------------------------------------------------------------------------
# Bounds and containers
# --------------------------------------------------------------------------------------------


def variance_bound(bits: int, bucket_size: int) -> float:
    r"""Return ``q`` such that ``E||Q(x) - x||^2 <= q ||x||^2`` for every bucket.

    For ``2 <= bits <= 16`` this is QSGD's constant ``q = min(B/s^2, sqrt(B)/s)`` with
    ``B = bucket_size`` and ``s = 2**(bits-1) - 1``. Max-abs scaling satisfies it: with step
    ``d = m/s`` and ``p_i = t_i - floor(t_i)``, element ``i`` has variance ``d^2 p_i (1 - p_i)``,
    and ``p(1-p) <= min(1/4, s|x_i|/m)`` (if ``s|x_i| < m`` the lower level is 0 and
    ``p_i = s|x_i|/m``). Summing over the bucket,

    .. math::

        E\|Q(x)-x\|^2 \le \frac{m^2}{s^2}\min\Big(\frac{B}{4}, \frac{s\|x\|_1}{m}\Big)
        \le \min\Big(\frac{B}{4s^2}, \frac{\sqrt B}{s}\Big)\|x\|_2^2,

    using ``m <= ||x||_2`` and ``||x||_1 <= sqrt(B) ||x||_2``. That is within QSGD's ``q`` (the
    max-abs grid is never coarser than QSGD's norm-scaled one).

    For ``bits == 1`` (stochastic sign, levels ``+-m``) the QSGD formula does **not** hold for
    ``B >= 3``. Element ``i`` has variance ``m^2 - x_i^2``, so

    .. math::

        E\|Q(x)-x\|^2 = B m^2 - \|x\|^2 \le (B - 1)\|x\|^2,

    tight when one element is nonzero; this function returns ``B - 1`` for ``bits == 1``.

    Parameters
    ----------
    bits : int
        Quantizer width, 1..16.
    bucket_size : int
        Bucket size ``B >= 1``.

    Returns
    -------
    float
        The constant ``q``.
    """
    s = levels_for_bits(bits)
    b = check_bucket_size(bucket_size)
    if bits == 1:
        return float(b - 1)
    return min(b / s**2, math.sqrt(b) / s)


def sum_dtype(bits: int, fan_in: int) -> torch.dtype:
    """Return the smallest signed integer dtype that holds a sum of ``fan_in`` levels.

    Levels lie in ``[-s, s]``, so the sum lies in ``[-fan_in*s, fan_in*s]``; the width is
    :func:`hflmpi.core.wire.container_nbytes`, the one rule the byte model uses too.

    Parameters
    ----------
    bits : int
        Quantizer width, 1..16.
    fan_in : int
        Number of children summed (>= 1).

    Returns
    -------
    torch.dtype
        One of ``int8``, ``int16``, ``int32``, ``int64``.

    Raises
    ------
    OverflowError
        If even ``int64`` cannot hold ``fan_in*s``.
    """
    return integer_dtype(container_nbytes(bits, fan_in))


def integer_dtype(nbytes: int) -> torch.dtype:
    """Return the signed integer dtype of ``nbytes`` bytes (1, 2, 4 or 8), e.g. a wire container."""
    if nbytes not in _DTYPE_OF_NBYTES:
        raise ValueError(f"nbytes={nbytes!r} must be 1, 2, 4 or 8 (int8/16/32/64)")
    return _DTYPE_OF_NBYTES[nbytes]


# --------------------------------------------------------------------------------------------
# Bucket helpers
# --------------------------------------------------------------------------------------------


def _flat_float32(x: torch.Tensor, name: str = "x") -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {getattr(x, 'dtype', x)!r}")
    return x.reshape(-1).to(torch.float32)


def _buckets(t: torch.Tensor, bucket_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split a flat tensor into a ``(full_buckets, bucket_size)`` view and the short tail."""
    full = t.numel() // bucket_size
    return t[: full * bucket_size].view(full, bucket_size), t[full * bucket_size :]


def _per_bucket(
    op: str,
    t: torch.Tensor,
    values: torch.Tensor,
    bucket_size: int,
    other: torch.Tensor | None = None,
) -> None:
    """Run ``t.op(other, values[bucket])`` (or ``t.op(values[bucket])``) in place per bucket."""
    main, tail = _buckets(t, bucket_size)
    full = main.shape[0]
    if other is None:
        main_args: tuple[torch.Tensor, ...] = ()
        tail_args: tuple[torch.Tensor, ...] = ()
    else:
        other_main, other_tail = _buckets(other, bucket_size)
        main_args, tail_args = (other_main,), (other_tail,)
    if full:
        getattr(main, op)(*main_args, values[:full, None])
    if tail.numel():
        getattr(tail, op)(*tail_args, values[full:])


def bucket_absmax(x: torch.Tensor, bucket_size: int) -> torch.Tensor:
    """Return the float32 max ``|x|`` of each bucket of the flattened ``x``.

    This is the local scale; on the integer-sum path a group MAX-allreduces it so that every
    member rounds on the same grid. NaN propagates into the result (checked by the callers).

    Parameters
    ----------
    x : Tensor
        Floating-point tensor (flattened).
    bucket_size : int
        Bucket size ``B``; the last bucket may be short.

    Returns
    -------
    Tensor
        float32 tensor of ``ceil(numel/B)`` scales on ``x``'s device.
    """
    bucket_size = check_bucket_size(bucket_size)
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got {getattr(x, 'dtype', x)!r}")
    x = x.reshape(-1)
    out = torch.empty(num_buckets(x.numel(), bucket_size), dtype=torch.float32, device=x.device)
    main, tail = _buckets(x, bucket_size)
    full = main.shape[0]
    if full:  # amax and amin are single fast passes; abs() would allocate a full temporary
        torch.maximum(main.amax(dim=1), main.amin(dim=1).neg_(), out=out[:full])
    if tail.numel():
        out[full:] = tail.abs().amax()
    return out


def _check_finite(scales: torch.Tensor) -> None:
    finite = torch.isfinite(scales)
    if not bool(finite.all()):
        bad = int((~finite).nonzero()[0, 0])
        raise ValueError(
            f"cannot quantize a tensor with NaN or Inf values (first in bucket {bad}, "
            f"scale={float(scales[bad])}); check the model update for divergence"
        )


def _check_generator(generator: torch.Generator | None, device: torch.device) -> torch.Generator:
    if not isinstance(generator, torch.Generator):
        raise TypeError(
            "stochastic quantization needs an explicit torch.Generator "
            "(hflmpi.core.rng.torch_generator(seed, purpose='quantize', ...)); got "
            f"{type(generator).__name__}"
        )
    if generator.device.type != device.type:
        raise ValueError(
            f"generator is on {generator.device} but the tensor is on {device}; "
            f"make it with torch_generator(..., device={str(device)!r})"
        )
    return generator


def _check_scales(scales: torch.Tensor, numel: int, bucket_size: int, device: torch.device) -> torch.Tensor:
    expected = num_buckets(numel, bucket_size)
    if scales.numel() != expected:
        raise ValueError(
            f"got {scales.numel()} scales for {numel} elements in buckets of {bucket_size}; "
            f"expected {expected}"
        )
    return scales.reshape(-1).to(device=device, dtype=torch.float32)


def new_workspace(numel: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Return a scratch buffer for quantizing ``numel`` elements (reuse it to avoid page faults).

    It holds the random words of the dither (:func:`hflmpi.core.fused.draw_dither`): ``2*numel``
    bytes (rounded up to 8), as an ``int64`` tensor.
    """
    return torch.empty(dither_words(numel), dtype=torch.int64, device=device)


def _round(
    x: torch.Tensor,
    scales: torch.Tensor,
    grid: Grid,
    generator: torch.Generator,
    out: torch.Tensor,
    bucket_size: int,
    workspace: torch.Tensor | None,
) -> torch.Tensor:
    """Check the arguments shared by :func:`to_levels` and :func:`to_codes`; round into ``out``.

    The grid spacing is ``step = scale / s`` (``2 * scale`` on the sign grid), the one
    :func:`from_level_sum` multiplies by; zero-scale buckets get a reciprocal step of 0, which
    leaves their zeros at level 0 (sign grid: +-1 times a zero scale).
    """
    _check_generator(generator, x.device)
    if out.numel() != x.numel() or out.dtype not in _SUM_DTYPES + (torch.uint8,):
        raise ValueError(f"out must be an integer tensor of {x.numel()} elements, got {out.dtype} "
                         f"with {out.numel()}")
    low, high = grid.bounds
    mult, add = grid.affine
    largest = max(abs(low * mult + add), abs(high * mult + add))
    if torch.iinfo(out.dtype).max < largest or (torch.iinfo(out.dtype).min > low * mult + add):
        raise ValueError(f"dtype {out.dtype} cannot hold levels up to s={grid.s}")
    scales = _check_scales(scales, x.numel(), bucket_size, x.device)
    _check_finite(scales)
    if x.numel() == 0:
        return out
    if workspace is None:
        workspace = new_workspace(x.numel(), x.device)
    if workspace.device != x.device:
        raise ValueError(f"workspace is on {workspace.device}, x on {x.device} (see new_workspace)")
    dither = draw_dither(x.numel(), generator, workspace)
    steps = scales * 2.0 if grid.sign else scales / grid.s
    round_dithered(x, reciprocal_steps(steps), dither, grid, out.view(-1), bucket_size)
    return out


# --------------------------------------------------------------------------------------------
# Integer-sum path
# --------------------------------------------------------------------------------------------


def to_levels(
    x: torch.Tensor,
    scales: torch.Tensor,
    s: int,
    generator: torch.Generator,
    dtype: torch.dtype = torch.int32,
    *,
    bucket_size: int,
    sign: bool = False,
    out: torch.Tensor | None = None,
    workspace: torch.Tensor | None = None,
) -> torch.Tensor:
    """Round ``x`` stochastically to integer levels on a shared per-bucket grid.

    ``l_i = floor(x_i / d_b + u_i)`` clamped to ``[-s, s]``, with ``d_b = m_b / s`` (float32)
    and ``m_b`` the (shared) scale of ``x_i``'s bucket, so ``E[l_i] d_b = x_i`` whenever
    ``|x_i| <= m_b`` (up to the dither resolution: :mod:`hflmpi.core.fused`). With ``sign=True`` (the 1-bit grid, ``s`` must be 1) ``l_i = +1`` with
    probability ``(1 + x_i/m_b)/2``, else -1, so ``E[l_i] m_b = x_i``.

    Parameters
    ----------
    x : Tensor
        Floating-point tensor (flattened), e.g. a child's weighted model difference.
    scales : Tensor
        ``ceil(numel/bucket_size)`` float32 scales shared by the group: the MAX over members of
        :func:`bucket_absmax`. A scale below the local max clamps (biases) those elements.
    s : int
        Largest level, ``levels_for_bits(bits)``.
    generator : torch.Generator
        Keyed generator on ``x``'s device (:func:`hflmpi.core.rng.torch_generator`).
    dtype : torch.dtype
        ``int8``/``int16``/``int32``/``int64``; pick :func:`sum_dtype` so the group sum fits.
        Ignored when ``out`` is given.
    bucket_size : int
        Bucket size the scales were computed with.
    sign : bool
        Use the stochastic sign grid ``{-1, +1}`` instead of ``[-s, s]``.
    out : Tensor, optional
        Integer tensor of ``numel`` elements to write into (e.g. the MPI send buffer).
    workspace : Tensor, optional
        Scratch from :func:`new_workspace`, reused across calls to avoid page faults.

    Returns
    -------
    Tensor
        1-D integer tensor of levels (``out`` if given).
    """
    bucket_size = check_bucket_size(bucket_size)
    x = _flat_float32(x)
    dither_bits(s)  # checks s
    if sign and s != 1:
        raise ValueError(f"the sign grid has s=1, got s={s}")
    if out is None:
        out = torch.empty(x.numel(), dtype=dtype, device=x.device)
    if out.dtype not in _SUM_DTYPES:
        raise ValueError(f"out must be an int8/16/32/64 tensor of {x.numel()} elements, got "
                         f"{out.dtype} with {out.numel()}")
    return _round(x, scales, Grid(s, sign, codes=False), generator, out, bucket_size, workspace)


def to_packed(
    x: torch.Tensor,
    scales: torch.Tensor,
    bits: int,
    generator: torch.Generator,
    *,
    bucket_size: int,
    out: torch.Tensor | None = None,
    codes: torch.Tensor | None = None,
    workspace: torch.Tensor | None = None,
) -> torch.Tensor:
    """Round ``x`` like :func:`to_levels` and bit-pack the levels: the gather path's encoder.

    Equal to ``pack_levels(to_levels(x, scales, s, generator, sign=bits == 1, ...), bits)`` for
    the same generator state, but the kernel writes the wire codes (``level + s``, or the sign
    bit) directly, into ``out`` itself at 8 bits, so no level tensor is made.

    Parameters
    ----------
    x, scales, generator, bucket_size, workspace
        As for :func:`to_levels`.
    bits : int
        Quantizer width, 1..16 (1 = stochastic sign).
    out : Tensor, optional
        ``uint8`` tensor of exactly ``ceil(numel*bits/8)`` bytes (e.g. the send row).
    codes : Tensor, optional
        Scratch from :func:`hflmpi.core.packing.code_scratch` (unused at 8 bits).

    Returns
    -------
    Tensor
        The packed ``uint8`` bit stream (``out`` if given).
    """
    bucket_size = check_bucket_size(bucket_size)
    x = _flat_float32(x)
    n = x.numel()
    out = packed_buffer(out, packed_nbytes(n, bits), x.device)
    grid = Grid(levels_for_bits(bits), bits == 1, codes=True)
    if bits == 8:  # the codes are the bytes
        return _round(x, scales, grid, generator, out, bucket_size, workspace)
    codes = code_buffer(codes, n, bits, x.device)
    _round(x, scales, grid, generator, codes[:n], bucket_size, workspace)
    codes[n:].zero_()  # the padding of the last group of 8 must be zero codes
    return pack_into(codes, bits, n, out)


def from_level_sum(
    level_sum: torch.Tensor,
    scales: torch.Tensor,
    s: int,
    out: torch.Tensor | None = None,
    *,
    bucket_size: int,
) -> torch.Tensor:
    """Turn a sum of integer levels back into values: ``level_sum * (scale / s)`` per bucket.

    Exactly: ``step = scale / s`` in float32 (the grid spacing :func:`to_levels` divided by),
    then ``out = level_sum.to(out.dtype) * step.to(out.dtype)``; reproducible bit for bit.
    Integer sums beyond ``2**24`` (float32) or ``2**53`` (float64) round when converted.

    Parameters
    ----------
    level_sum : Tensor
        Integer tensor (flattened): the sum over children of :func:`to_levels` outputs.
    scales : Tensor
        The shared float32 scales used by :func:`to_levels`.
    s : int
        Largest level (1 for the sign grid).
    out : Tensor, optional
        float32 or float64 tensor of ``numel`` elements to write into; float32 if omitted.
    bucket_size : int
        Bucket size of ``scales``.

    Returns
    -------
    Tensor
        1-D float tensor (``out`` if given).
    """
    bucket_size = check_bucket_size(bucket_size)
    if level_sum.is_floating_point() or level_sum.is_complex():
        raise TypeError(f"level_sum must be an integer tensor, got {level_sum.dtype}")
    level_sum = level_sum.reshape(-1)
    n = level_sum.numel()
    if out is None:
        out = torch.empty(n, dtype=torch.float32, device=level_sum.device)
    if out.dtype not in (torch.float32, torch.float64) or out.numel() != n:
        raise ValueError(
            f"out must be a float32/float64 tensor of {n} elements, got {out.dtype} with "
            f"{out.numel()}"
        )
    scales = _check_scales(scales, n, bucket_size, out.device)
    flat = out.view(-1)
    flat.copy_(level_sum)
    _per_bucket("mul_", flat, (scales / s).to(out.dtype), bucket_size)
    return out
