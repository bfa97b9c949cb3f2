"""The fused dithered-rounding kernel: exact unbiasedness on the dyadic grid, its bias bound, and
bit-for-bit agreement of the compiled kernel, its eager twin, and the two encoders.

The exactness tests feed the kernel every one of the 2**16 dither values for each input and
compare the exact mean level with a numpy reference of the rounding rule (never the kernel).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hflmpi.core import fused
from hflmpi.core.fused import KERNEL_ENV, Grid, dither_bits, reciprocal_steps, round_dithered
from hflmpi.core.packing import pack_levels
from hflmpi.core.quantize import bucket_absmax, to_levels, to_packed
from hflmpi.core.rng import torch_generator
from hflmpi.core.wire import levels_for_bits

ALL_U = 1 << 16
MODES = ["eager", "compiled"]


def _gen(seed: int) -> torch.Generator:
    return torch_generator(seed, purpose="fused-test")


def _every_dither(copies: int) -> torch.Tensor:
    """Return dither bytes that give element ``i`` of each block of 2**16 the draw ``U = i``."""
    u = np.tile(np.arange(ALL_U, dtype=np.int64), copies)
    return torch.from_numpy(np.concatenate([u & 0xFF, u >> 8]).astype(np.uint8))


def _mean_levels(t: np.ndarray, step: float, s: int, sign: bool) -> np.ndarray:
    """Run the kernel on ``x = t * step`` under all 2**16 dithers; return the exact mean level.

    ``step`` is the grid step (``m/s``, or ``2m`` on the sign grid, where ``t = x/(2m)``).
    """
    x = torch.from_numpy(np.repeat(t * step, ALL_U).astype(np.float32))
    # the grid step is m/s, or 2m on the sign grid (t = x/(2m) in [-1/2, 1/2])
    scales = torch.full((t.size,), step / 2.0 if sign else step * s, dtype=torch.float32)
    steps = scales * 2.0 if sign else scales / s
    out = torch.empty(x.numel(), dtype=torch.int32)
    round_dithered(x, reciprocal_steps(steps), _every_dither(t.size), Grid(s, sign, codes=False),
                   out, ALL_U)
    # exact: integer sum over all dithers, divided by a power of two
    return out.view(t.size, ALL_U).sum(dim=1, dtype=torch.int64).numpy() / ALL_U


def _reference_mean(t: np.ndarray, s: int, sign: bool) -> np.ndarray:
    """The rounding rule in numpy: E[level] = clamp(rne(t 2^r) + o 2^r) / 2^r (sign: 2 E - 1)."""
    r = dither_bits(s)
    if sign:
        w = np.clip(np.round(t * 2.0**r) + 2.0 ** (r - 1), 0, 2.0**r)
        return 2.0 * w / 2.0**r - 1.0
    return np.clip(np.round(t * 2.0**r), -s * 2.0**r, s * 2.0**r) / 2.0**r


@pytest.fixture(params=MODES)
def mode(request, monkeypatch) -> str:
    monkeypatch.setenv(KERNEL_ENV, request.param)
    return request.param


@pytest.mark.parametrize("bits", [2, 4, 8, 9, 10, 16])
def test_values_on_the_dyadic_grid_are_exactly_unbiased(bits: int, mode: str) -> None:
    s = levels_for_bits(bits)
    r = dither_bits(s)
    rng = np.random.default_rng(bits)
    # t = k / 2^r: every representable fraction class, both signs, the ends of the grid
    k = rng.integers(-s << r, (s << r) + 1, 14)
    t = np.concatenate([k, [-s << r, s << r]]) / 2.0**r
    step = 2.0**-7  # a power of two: x = t*step and x * (1/step) are exact in float32
    np.testing.assert_array_equal(_mean_levels(t, step, s, sign=False), t)


@pytest.mark.parametrize("bits", [1, 2, 8, 12, 16])
def test_bias_is_within_the_stated_bound(bits: int, mode: str) -> None:
    s = levels_for_bits(bits)
    sign = bits == 1
    r = dither_bits(s)
    rng = np.random.default_rng(100 + bits)
    t = rng.uniform(-s, s, 12) if not sign else rng.uniform(-0.5, 0.5, 12)
    step = 2.0**-3
    t = (t * step).astype(np.float32).astype(np.float64) / step  # values that x can hold
    mean = _mean_levels(t, step, s, sign)
    np.testing.assert_array_equal(mean, _reference_mean(t, s, sign))
    value = 2.0 * t if sign else t  # E[level] targets 2t on the sign grid (level * m, m = step/2)
    bound = (2.0 if sign else 1.0) * 2.0 ** -(r + 1)
    assert np.all(np.abs(mean - value) <= bound)


def test_bias_bound_with_a_rounded_reciprocal_step(mode: str) -> None:
    s = levels_for_bits(8)
    r = dither_bits(s)
    step = np.float32(0.3) / np.float32(s)  # 1/step is not exact: one more float32 rounding
    t = np.random.default_rng(7).uniform(-s, s, 10)
    x = (t * step).astype(np.float32)
    t_exact = x.astype(np.float64) / float(step)
    mean = _mean_levels(t_exact, float(step), s, sign=False)
    assert np.all(np.abs(mean - t_exact) <= 2.0 ** -(r + 1) + 2.0**-23 * np.abs(t_exact))


def test_dither_bits_keeps_the_sum_exact_in_float32() -> None:
    for bits in range(1, 17):
        s = levels_for_bits(bits)
        r = dither_bits(s)
        assert r == min(16, 25 - bits)
        assert (s + 1) * 2**r <= 2**24
    with pytest.raises(ValueError, match="s=0"):
        dither_bits(0)


def _random_input(numel: int, seed: int) -> torch.Tensor:
    x = torch.randn(numel, generator=_gen(seed))
    x[: numel // 3] *= 1e-3  # a few buckets of very different scales
    if numel > 40:
        x[16:32] = 0.0  # an all-zero bucket
    return x


@pytest.mark.parametrize("bits", list(range(1, 17)))
def test_compiled_and_eager_kernels_give_the_same_bits(bits: int, monkeypatch) -> None:
    x = _random_input(1000, bits)
    scales = bucket_absmax(x, 16)
    dtype = torch.int8 if bits <= 8 else torch.int16
    results = []
    for mode in MODES:
        monkeypatch.setenv(KERNEL_ENV, mode)
        results.append((
            to_levels(x, scales, levels_for_bits(bits), _gen(bits), dtype, bucket_size=16,
                      sign=bits == 1),
            to_packed(x, scales, bits, _gen(bits), bucket_size=16),
        ))
    for eager, compiled in zip(results[0], results[1], strict=True):
        assert torch.equal(eager, compiled)


@pytest.mark.parametrize("bits", list(range(1, 17)))
@pytest.mark.parametrize("numel", [0, 1, 7, 9, 100, 1001])
def test_to_packed_equals_pack_levels_of_to_levels(bits: int, numel: int) -> None:
    x = _random_input(numel, 3 * bits + numel)
    bucket_size = 8
    scales = bucket_absmax(x, bucket_size)
    levels = to_levels(x, scales, levels_for_bits(bits), _gen(numel), bucket_size=bucket_size,
                       sign=bits == 1)
    packed = to_packed(x, scales, bits, _gen(numel), bucket_size=bucket_size)
    assert torch.equal(packed, pack_levels(levels, bits))


def test_failed_compilation_falls_back_to_the_same_bits(monkeypatch) -> None:
    x = _random_input(300, 1)
    scales = bucket_absmax(x, 32)
    monkeypatch.setenv(KERNEL_ENV, "eager")
    expected = to_levels(x, scales, 7, _gen(5), bucket_size=32)

    def broken(*args: object) -> None:
        raise RuntimeError("no C++ compiler\nsecond line")

    monkeypatch.setattr(fused, "_KERNELS", fused._Kernels(compiled={"_round_math": broken}))
    monkeypatch.setenv(KERNEL_ENV, "compiled")
    with pytest.raises(RuntimeError, match="no C"):
        to_levels(x, scales, 7, _gen(5), bucket_size=32)
    monkeypatch.setenv(KERNEL_ENV, "auto")  # below COMPILE_MIN_NUMEL: eager, no attempt
    assert torch.equal(to_levels(x, scales, 7, _gen(5), bucket_size=32), expected)
    assert not fused._KERNELS.failed
    monkeypatch.setattr(fused, "COMPILE_MIN_NUMEL", 100)
    with pytest.warns(RuntimeWarning, match="no C\\+\\+ compiler\\); using the eager kernels"):
        result = to_levels(x, scales, 7, _gen(5), bucket_size=32)
    assert torch.equal(result, expected)
    assert torch.equal(to_levels(x, scales, 7, _gen(5), bucket_size=32), expected)  # no retry
    monkeypatch.setenv(KERNEL_ENV, "fast")
    with pytest.raises(ValueError, match="HFLMPI_QUANTIZE_KERNEL='fast' must be one of"):
        to_levels(x, scales, 7, _gen(5), bucket_size=32)


@pytest.mark.parametrize(("numel", "bucket_size"), [(150_001, 70_000), (200_003, 1000)])
def test_eager_blocks_cover_large_buckets_and_many_rows(numel: int, bucket_size: int,
                                                        monkeypatch) -> None:
    """The eager kernel splits buckets wider than a block and batches narrow ones."""
    x = _random_input(numel, 11)
    scales = bucket_absmax(x, bucket_size)
    results = []
    for mode in MODES:
        monkeypatch.setenv(KERNEL_ENV, mode)
        results.append(to_levels(x, scales, 127, _gen(3), bucket_size=bucket_size))
    assert torch.equal(results[0], results[1])
