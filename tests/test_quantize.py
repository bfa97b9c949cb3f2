"""Stochastic uniform quantization: unbiasedness, variance, sizes, and the integer-sum path.

Every test runs the kernels the job's uplink runs (:mod:`hflmpi.mpi.uplink`): ``bucket_absmax ->
to_levels -> pack_levels`` to encode and ``sum_packed_levels -> from_level_sum`` to decode (the
gather path), or an integer sum of ``to_levels`` outputs (the integer-sum path).

Statistical checks compare against numpy references of the math (never the code under test)
with a tolerance of 5 standard errors from the empirical per-element spread, and a sanity test
shows the same checker catches a deliberately biased rounding.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from hflmpi.core.packing import code_scratch, pack_levels, sum_packed_levels, unpack_levels
from hflmpi.core.quantize import (
    bucket_absmax,
    from_level_sum,
    integer_dtype,
    new_workspace,
    sum_dtype,
    to_levels,
    variance_bound,
)
from hflmpi.core.rng import torch_generator
from hflmpi.core.wire import layer_wire, levels_for_bits

B = 16
BUCKET_SCALES = [3.0, 0.5, 0.0, 1e-20, 7.5e5, 2.0]  # bucket 2 is all zeros; the last is short
BUCKET_SIZES = [B, B, B, B, B, 7]
DRAWS = 4000
WIDTHS = [1, 2, 3, 4, 8, 12, 16]


def _gen(seed: int = 0, **key: int) -> torch.Generator:
    return torch_generator(seed, purpose="quantize-test", **key)


def _bucket_index(numel: int, bucket_size: int = B) -> np.ndarray:
    return np.arange(numel) // bucket_size


def _np_absmax(x: np.ndarray, bucket_size: int = B) -> np.ndarray:
    return np.array(
        [np.abs(x[i : i + bucket_size]).max() for i in range(0, x.size, bucket_size)],
        dtype=np.float32,
    )


def make_x(bits: int, seed: int = 0) -> np.ndarray:
    """Return a float32 test vector: mixed signs, a zero bucket, a tiny and a huge bucket.

    Off-grid elements sit at fractional position p in [0.1, 0.9] between two levels so that
    2000 draws always see both outcomes; every 4th element sits on the grid (p = 0); each
    nonzero bucket's first element is its scale (so the scale is known exactly).
    """
    rng = np.random.default_rng(seed)
    s = levels_for_bits(bits)
    parts = []
    for index, (m, size) in enumerate(zip(BUCKET_SCALES, BUCKET_SIZES, strict=True)):
        if m == 0.0:
            parts.append(np.zeros(size))
            continue
        if bits == 1:
            y = rng.uniform(-0.8, 0.8, size)
        else:
            p = rng.uniform(0.1, 0.9, size)
            p[::4] = 0.0
            y = (rng.integers(0, s, size) + p) / s
            y *= 1.0 if index == 0 else rng.choice([-1.0, 1.0], size)
        y[0] = 1.0 if index != 1 else -1.0
        parts.append(y * m)
    return np.concatenate(parts).astype(np.float32)


def _scale_per_element(x: np.ndarray) -> np.ndarray:
    return _np_absmax(x)[_bucket_index(x.size)].astype(np.float64)


def assert_unbiased(samples: np.ndarray, x: np.ndarray, atol: np.ndarray, z: float = 5.0) -> None:
    """Fail unless every ``|mean_n samples[n] - x| <= z * std/sqrt(N) + atol`` (empirical std)."""
    samples = np.asarray(samples, dtype=np.float64)
    draws = samples.shape[0]
    error = np.abs(samples.mean(axis=0) - np.asarray(x, dtype=np.float64))
    tolerance = z * samples.std(axis=0, ddof=1) / math.sqrt(draws) + atol
    bad = np.flatnonzero(error > tolerance)
    assert bad.size == 0, (
        f"{bad.size} biased elements, e.g. {bad[:5].tolist()}: |mean - x| = "
        f"{error[bad[:5]].tolist()} > tolerance {tolerance[bad[:5]].tolist()}"
    )


def _float_atol(x: np.ndarray) -> np.ndarray:
    """Allowance for float32 rounding of x/step and step (a few ulps of the bucket scale)."""
    return 1e-6 * _scale_per_element(x)


def _tiled(x: np.ndarray, draws: int) -> np.ndarray:
    """Zero-pad ``x`` to whole buckets and repeat it ``draws`` times.

    Padding with zeros leaves every bucket's max-abs scale unchanged, and each element gets its
    own dither, so one call over the tiled vector yields ``draws`` independent quantizations.
    """
    padded = np.zeros(-(-x.size // B) * B, dtype=x.dtype)
    padded[: x.size] = x
    return np.tile(padded, draws)


def _untiled(tiled: np.ndarray, draws: int, numel: int) -> np.ndarray:
    return tiled.reshape(draws, -1)[:, :numel]


def encode(
    x: torch.Tensor, bits: int, bucket_size: int, generator: torch.Generator,
    dtype: torch.dtype = torch.int32, codes: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(packed levels, scales)`` of ``x``: the uplink's encoder on one child."""
    scales = bucket_absmax(x, bucket_size)
    levels = to_levels(x, scales, levels_for_bits(bits), generator, dtype,
                       bucket_size=bucket_size, sign=bits == 1)
    return pack_levels(levels, bits, codes=codes, check=False), scales


def decode(packed: torch.Tensor, scales: torch.Tensor, bits: int, numel: int, bucket_size: int,
           out: torch.Tensor | None = None) -> torch.Tensor:
    """Return ``Q(x)`` from one payload: the uplink leader's decoder with no levels of its own."""
    level_sum = sum_packed_levels([packed], bits, torch.empty(numel, dtype=torch.int32),
                                  out_holds_levels=False)
    return from_level_sum(level_sum, scales, levels_for_bits(bits), out, bucket_size=bucket_size)


def _quantized_draws(bits: int, x: np.ndarray, draws: int = DRAWS) -> np.ndarray:
    tiled = torch.from_numpy(_tiled(x, draws))
    packed, scales = encode(tiled, bits, B, _gen(bits))
    return _untiled(decode(packed, scales, bits, tiled.numel(), B).numpy(), draws, x.size)


def _np_stochastic_round(x: np.ndarray, bits: int, draws: int, bias: float, nearest: bool):
    """Numpy reference quantizer with an optional deliberate bias (for the checker's sanity)."""
    rng = np.random.default_rng(99)
    s = levels_for_bits(bits)
    step = (_scale_per_element(x) / s)[None, :]
    t = np.where(step > 0, x / np.where(step > 0, step, 1.0), 0.0)
    u = np.full((draws, x.size), 0.5) if nearest else rng.random((draws, x.size))
    return np.floor(t + u + bias) * step


@pytest.fixture(scope="module")
def quantized_samples() -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """DRAWS independent decodes of make_x(bits) for every tested width (shared by tests)."""
    return {bits: (make_x(bits), _quantized_draws(bits, make_x(bits))) for bits in WIDTHS}


# ---------------------------------------------------------------------------------------------
# Unbiasedness and variance
# ---------------------------------------------------------------------------------------------


def test_checker_catches_biased_rounding() -> None:
    x = make_x(4)
    atol = _float_atol(x)
    assert_unbiased(_np_stochastic_round(x, 4, DRAWS, 0.0, nearest=False), x, atol)  # control
    with pytest.raises(AssertionError, match="biased"):
        assert_unbiased(_np_stochastic_round(x, 4, DRAWS, 0.0, nearest=True), x, atol)
    with pytest.raises(AssertionError, match="biased"):
        assert_unbiased(_np_stochastic_round(x, 4, DRAWS, 0.1, nearest=False), x, atol)


@pytest.mark.parametrize("bits", WIDTHS)
def test_quantizer_is_unbiased(bits: int, quantized_samples) -> None:
    x, samples = quantized_samples[bits]
    assert_unbiased(samples, x, _float_atol(x))


def test_short_last_bucket_is_unbiased() -> None:
    x = make_x(3)[-23:]  # 16 + 7 elements: one full bucket and a short one, one call per draw
    generator = _gen(33)
    tensor = torch.from_numpy(x)
    samples = np.stack([decode(*encode(tensor, 3, B, generator), 3, x.size, B).numpy()
                        for _ in range(1500)])
    assert_unbiased(samples, x, 1e-6 * _np_absmax(x)[_bucket_index(x.size)])


@pytest.mark.parametrize("bits", WIDTHS)
def test_quantizer_outputs_lie_on_the_grid(bits: int, quantized_samples) -> None:
    x, samples = quantized_samples[bits]
    m = _scale_per_element(x)
    if bits == 1:
        assert np.all(np.abs(samples) == m)
        return
    s = levels_for_bits(bits)
    step = (m.astype(np.float32) / np.float32(s)).astype(np.float64)[None, :]
    t = np.divide(x, step, out=np.zeros_like(step), where=step > 0)
    level = np.divide(samples, step, out=np.zeros(samples.shape), where=step > 0)
    slack = 1e-6 * s  # float32 rounding of level * step, in level units
    assert np.all(np.abs(level - np.rint(level)) <= slack)
    assert np.all(np.abs(np.rint(level)) <= s)
    assert np.all(np.abs(level - t) < 1.0 + slack)  # one of the two neighbouring levels


def _theoretical_variance(x: np.ndarray, bits: int, bucket_size: int = B) -> np.ndarray:
    """Exact per-bucket E||Q(x)-x||^2 = sum p(1-p) step^2 (sign grid: sum m^2 - x^2), numpy."""
    x64 = x.astype(np.float64)
    m = _np_absmax(x, bucket_size)[_bucket_index(x.size, bucket_size)].astype(np.float64)
    if bits == 1:
        per_element = m**2 - x64**2
    else:
        step = m / levels_for_bits(bits)
        t = np.divide(x64, step, out=np.zeros_like(step), where=step > 0)
        p = t - np.floor(t)
        per_element = p * (1 - p) * step**2
    return np.bincount(_bucket_index(x.size, bucket_size), weights=per_element)


@pytest.mark.parametrize("bits", WIDTHS)
def test_variance_matches_theory_and_bound(bits: int, quantized_samples) -> None:
    x, samples = quantized_samples[bits]
    index = _bucket_index(x.size)
    buckets = index.max() + 1
    squared = (samples.astype(np.float64) - x.astype(np.float64)) ** 2
    per_bucket = np.stack([np.bincount(index, weights=row, minlength=buckets) for row in squared])
    empirical = per_bucket.mean(axis=0)
    stderr = per_bucket.std(axis=0, ddof=1) / math.sqrt(per_bucket.shape[0])
    theory = _theoretical_variance(x, bits)
    norm2 = np.bincount(index, weights=x.astype(np.float64) ** 2)
    slack = 5 * stderr + 1e-5 * theory + 1e-12 * norm2
    assert np.all(np.abs(empirical - theory) <= slack), (empirical, theory)
    bound = np.array([variance_bound(bits, int(size)) for size in np.bincount(index)])
    assert np.all(empirical <= bound * norm2 + slack)
    assert empirical[2] == 0.0  # the zero bucket is exact


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8, 16])
def test_variance_bound_holds_for_random_vectors(bits: int) -> None:
    rng = np.random.default_rng(bits)
    for bucket_size in (1, 2, 7, 64, 512):
        q = variance_bound(bits, bucket_size)
        for draw in range(40):
            mask = rng.choice([1.0, 0.0], bucket_size, p=[0.7, 0.3])
            x = rng.standard_normal(bucket_size) * mask
            if draw % 5 == 0:  # the sparse worst case (one nonzero element)
                x = np.zeros(bucket_size)
                x[draw % bucket_size] = -1.5
            if not x.any():
                continue
            x = x.astype(np.float32)
            theory = float(_theoretical_variance(x, bits, bucket_size)[0])
            assert theory <= q * float(np.sum(x.astype(np.float64) ** 2)) * (1 + 1e-9)


def test_variance_bound_values() -> None:
    assert variance_bound(8, 512) == pytest.approx(min(512 / 127**2, math.sqrt(512) / 127))
    assert variance_bound(2, 4) == pytest.approx(2.0)  # min(4/1, 2/1)
    assert variance_bound(2, 1) == pytest.approx(1.0)
    # sign quantizer: B - 1, which exceeds QSGD's sqrt(B)/s for B >= 3 and is attained by e_1
    assert variance_bound(1, 16) == 15.0
    x = np.zeros(16, dtype=np.float32)
    x[3] = -2.5
    attained = float(np.sum(2.5**2 - x.astype(np.float64) ** 2))
    assert attained == pytest.approx(variance_bound(1, 16) * 2.5**2)
    assert attained > math.sqrt(16) * 2.5**2


# ---------------------------------------------------------------------------------------------
# Sizes, determinism, input checks of the encode/decode kernels
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [1, 2, 3, 5, 8, 12, 16])
def test_payload_sizes_formula_and_tensors(bits: int) -> None:
    for bucket_size in (1, 16, 512):
        for numel in (0, 1, 87, 1000, 4097):
            x = torch.randn(numel, generator=_gen(numel))
            packed, scales = encode(x, bits, bucket_size, _gen(1))
            formula = -(-numel * bits // 8) + 4 * -(-numel // bucket_size)
            assert packed.dtype == torch.uint8 and scales.dtype == torch.float32
            assert packed.numel() == -(-numel * bits // 8)
            assert scales.numel() == -(-numel // bucket_size)
            wire = layer_wire(numel, bits, 2, bucket_size, "gather")
            assert packed.numel() * 1 + scales.numel() * 4 == formula
            assert wire.payload_nbytes + wire.scale_nbytes == formula
            assert decode(packed, scales, bits, numel, bucket_size).shape == (numel,)


@pytest.mark.parametrize("bits", [1, 3, 8, 16])
def test_decode_equals_unpacked_levels_times_step(bits: int) -> None:
    x = torch.from_numpy(make_x(bits))
    packed, scales_tensor = encode(x, bits, B, _gen(4))
    levels = unpack_levels(packed, bits, x.numel()).numpy()
    scales = scales_tensor.numpy()
    np.testing.assert_array_equal(scales, _np_absmax(x.numpy()))
    s = levels_for_bits(bits)
    step = (scales / np.float32(s)).astype(np.float32)
    expected = levels.astype(np.float32) * step[_bucket_index(x.numel())]
    np.testing.assert_array_equal(decode(packed, scales_tensor, bits, x.numel(), B).numpy(),
                                  expected)


def test_same_key_same_bits_and_other_keys_differ() -> None:
    x = torch.randn(1000, generator=_gen(5))
    key = dict(seed=1, rank=2, round=3, layer=1)

    def packed(**changes: int) -> torch.Tensor:
        merged = {**key, **changes}
        generator = torch_generator(merged.pop("seed"), purpose="quantize", **merged)
        return encode(x, 4, 64, generator)[0]

    assert torch.equal(packed(), packed())
    assert torch.equal(
        packed(), encode(x, 4, 64, torch_generator(1, purpose="quantize", rank=2, round=3, layer=1))[0]
    )
    for change in ({"round": 4}, {"layer": 2}, {"rank": 3}, {"seed": 2}):
        assert not torch.equal(packed(), packed(**change)), change


@pytest.mark.parametrize("bits", [1, 2, 4, 7, 8, 12, 16])
def test_payloads_do_not_share_the_scratch(bits: int) -> None:
    for numel in (1, 5, 8, 100):
        codes = code_scratch(numel, bits)  # reused, as the uplink reuses its own
        first, _ = encode(torch.randn(numel, generator=_gen(1)), bits, 4, _gen(2), codes=codes)
        kept = first.clone()
        encode(torch.randn(numel, generator=_gen(3)), bits, 4, _gen(4), codes=codes)
        assert torch.equal(first, kept), numel


def test_zero_buckets_decode_to_exact_zeros() -> None:
    for bits in (1, 2, 8, 16):
        x = torch.cat([torch.zeros(8), torch.randn(8), torch.zeros(5)])
        out = decode(*encode(x, bits, 8, _gen(bits)), bits, x.numel(), 8)
        assert torch.all(out[:8] == 0) and torch.all(out[16:] == 0)
        zeros = decode(*encode(torch.zeros(100), bits, 8, _gen(bits)), bits, 100, 8)
        assert torch.all(zeros == 0)


def test_any_shape_and_float_dtype_is_flattened() -> None:
    x = torch.randn(12, 10, dtype=torch.float64, generator=_gen(6))[:, ::2]  # non-contiguous
    a = decode(*encode(x, 5, 16, _gen(7)), 5, 60, 16)
    b = decode(*encode(x.reshape(-1).float().contiguous(), 5, 16, _gen(7)), 5, 60, 16)
    assert a.shape == (60,) and torch.equal(a, b)


def test_decode_into_out_buffer() -> None:
    packed, scales = encode(torch.randn(50, generator=_gen(8)), 8, 16, _gen(9))
    out = torch.empty(50)
    assert decode(packed, scales, 8, 50, 16, out=out) is out
    assert torch.equal(out, decode(packed, scales, 8, 50, 16))
    with pytest.raises(ValueError, match=">= 50 bytes"):  # a 4-bit reader needs 25; 8 bits 50
        decode(packed[:25], scales, 8, 50, 16)
    with pytest.raises(ValueError, match="cannot hold"):  # an accumulator too narrow to sum
        sum_packed_levels([packed, packed], 8, torch.zeros(50, dtype=torch.int8))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nan_and_inf_are_rejected(bad: float) -> None:
    x = torch.randn(40)
    x[21] = bad
    with pytest.raises(ValueError, match=r"NaN or Inf .*bucket 1"):
        encode(x, 4, 16, _gen())
    scales = torch.tensor([1.0, bad, 1.0])
    with pytest.raises(ValueError, match="NaN or Inf"):
        to_levels(torch.zeros(40), scales, 7, _gen(), bucket_size=16)


def test_argument_validation_messages() -> None:
    for bad in (0, 17, -3):
        with pytest.raises(ValueError, match=rf"bits={bad}.*\[1, 16\]"):
            encode(torch.randn(4), bad, 16, _gen())
        with pytest.raises(ValueError, match=rf"bits={bad}"):
            variance_bound(bad, 16)
        with pytest.raises(ValueError, match=rf"bits={bad}"):
            pack_levels(torch.zeros(4, dtype=torch.int32), bad)
    with pytest.raises(ValueError, match="bucket_size=0"):
        encode(torch.randn(4), 4, 0, _gen())
    with pytest.raises(ValueError, match="bits=20"):
        layer_wire(16, 20, 2)
    with pytest.raises(TypeError, match="Generator"):
        to_levels(torch.randn(4), torch.ones(1), 7, None, bucket_size=16)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="floating-point"):
        encode(torch.arange(4), 4, 16, _gen())
    with pytest.raises(ValueError, match="nbytes=3"):
        integer_dtype(3)


# ---------------------------------------------------------------------------------------------
# Integer-sum path
# ---------------------------------------------------------------------------------------------

CHILDREN = 4


def _children(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    magnitudes = np.repeat([1.0, 1e-3, 0.0, 50.0, 2.0, 7.0], BUCKET_SIZES)
    return (rng.standard_normal((CHILDREN, magnitudes.size)) * magnitudes).astype(np.float32)


def test_bucket_absmax_matches_numpy() -> None:
    x = _children()[0]
    x[5] = -9.0  # a negative maximum
    np.testing.assert_array_equal(bucket_absmax(torch.from_numpy(x), B).numpy(), _np_absmax(x))
    assert bucket_absmax(torch.zeros(0), B).numel() == 0
    with_nan = torch.from_numpy(x.copy())
    with_nan[20] = float("nan")
    assert torch.isnan(bucket_absmax(with_nan, B)[1])


@pytest.mark.parametrize("bits", [2, 4, 8, 16])
def test_integer_sum_is_exact_against_numpy(bits: int) -> None:
    xs = _children(bits)
    s = levels_for_bits(bits)
    dtype = sum_dtype(bits, CHILDREN)
    shared = np.max([_np_absmax(x) for x in xs], axis=0)  # what a MAX allreduce returns
    scales = torch.from_numpy(shared)
    levels = [
        to_levels(torch.from_numpy(x), scales, s, _gen(bits, rank=c), dtype, bucket_size=B)
        for c, x in enumerate(xs)
    ]
    for lv in levels:
        assert lv.dtype == dtype and int(lv.abs().max()) <= s
    level_sum = np.sum([lv.numpy().astype(np.int64) for lv in levels], axis=0)
    assert np.abs(level_sum).max() <= CHILDREN * s
    summed = torch.from_numpy(level_sum).to(dtype)
    index = _bucket_index(xs.shape[1])
    step32 = shared / np.float32(s)
    out64 = from_level_sum(
        summed, scales, s, torch.empty(xs.shape[1], dtype=torch.float64), bucket_size=B
    )
    np.testing.assert_array_equal(out64.numpy(), level_sum * step32.astype(np.float64)[index])
    out32 = from_level_sum(summed, scales, s, bucket_size=B)
    assert out32.dtype == torch.float32
    np.testing.assert_array_equal(out32.numpy(), level_sum.astype(np.float32) * step32[index])
    assert np.all(out64.numpy()[index == 2] == 0.0)  # all children zero there


@pytest.mark.parametrize("bits, sign", [(3, False), (8, False), (1, True)])
def test_integer_sum_is_unbiased(bits: int, sign: bool) -> None:
    xs = _children(10 + bits)
    s = levels_for_bits(bits)
    scales = torch.from_numpy(np.max([_np_absmax(x) for x in xs], axis=0))
    tiled_scales = torch.from_numpy(np.tile(scales.numpy(), DRAWS))
    numel = tiled_scales.numel() * B
    workspace = new_workspace(numel)
    total = torch.zeros(numel, dtype=torch.int32)
    for c, x in enumerate(xs):  # each child rounds DRAWS tiled copies of its vector at once
        total += to_levels(
            torch.from_numpy(_tiled(x, DRAWS)),
            tiled_scales,
            s,
            _gen(bits, rank=c),
            bucket_size=B,
            sign=sign,
            workspace=workspace,
        )
    decoded = from_level_sum(total, tiled_scales, s, bucket_size=B).numpy()
    expected = xs.astype(np.float64).sum(axis=0)
    atol = 1e-6 * CHILDREN * scales.numpy().astype(np.float64)[_bucket_index(xs.shape[1])]
    assert_unbiased(_untiled(decoded, DRAWS, xs.shape[1]), expected, atol)


def test_to_levels_sign_grid_and_out_buffer() -> None:
    x = torch.from_numpy(_children(3)[0])
    scales = bucket_absmax(x, B)
    signs = to_levels(x, scales, 1, _gen(2), torch.int8, bucket_size=B, sign=True)
    assert set(signs.unique().tolist()) <= {-1, 1}
    out = torch.empty(x.numel(), dtype=torch.int16)
    result = to_levels(
        x, scales, 127, _gen(2), bucket_size=B, out=out, workspace=new_workspace(x.numel())
    )
    assert result is out
    assert torch.equal(out.to(torch.int32), to_levels(x, scales, 127, _gen(2), bucket_size=B))
    with pytest.raises(ValueError, match="sign grid has s=1"):
        to_levels(x, scales, 3, _gen(), bucket_size=B, sign=True)
    with pytest.raises(ValueError, match="cannot hold"):
        to_levels(x, scales, 32767, _gen(), torch.int8, bucket_size=B)
    with pytest.raises(ValueError, match="expected 6"):
        to_levels(x, scales[:3], 7, _gen(), bucket_size=B)


def test_shared_scales_below_local_max_clamp_into_range() -> None:
    x = torch.tensor([4.0, -4.0, 1.0, 0.5])
    levels = to_levels(x, torch.tensor([1.0]), 7, _gen(), bucket_size=4)
    assert levels[:2].tolist() == [7, -7] and int(levels.abs().max()) <= 7


def test_sum_dtype_boundaries() -> None:
    assert sum_dtype(8, 1) == torch.int8  # 127
    assert sum_dtype(8, 2) == torch.int16  # 254
    assert sum_dtype(2, 127) == torch.int8 and sum_dtype(2, 128) == torch.int16
    assert sum_dtype(1, 127) == torch.int8
    assert sum_dtype(8, 258) == torch.int16  # 258 * 127 = 32766 <= 32767
    assert sum_dtype(8, 259) == torch.int32  # 259 * 127 = 32893
    assert sum_dtype(16, 1) == torch.int16 and sum_dtype(16, 2) == torch.int32
    assert sum_dtype(16, 2**16) == torch.int32  # 32767 * 65536 = 2**31 - 2**16 + ... fits
    assert sum_dtype(16, 65538) == torch.int32  # 2147483646 <= 2**31 - 1
    assert sum_dtype(16, 65539) == torch.int64  # 2147516413 > 2**31 - 1
    limit = (2**63 - 1) // 32767
    assert sum_dtype(16, limit) == torch.int64
    with pytest.raises(OverflowError, match=r"fan_in=.*beyond int64"):
        sum_dtype(16, limit + 1)
    with pytest.raises(ValueError, match="fan_in=0"):
        sum_dtype(8, 0)


@pytest.mark.parametrize("bits", range(1, 17))
@pytest.mark.parametrize("fan_in", [2, 3, 4])
def test_gather_decoder_sums_the_levels_exactly(bits: int, fan_in: int) -> None:
    """The leader's own levels plus the packed rows of the others equal the integer level sum."""
    xs = _children(bits)[:fan_in]
    s = levels_for_bits(bits)
    scales = torch.from_numpy(np.max([_np_absmax(x) for x in xs], axis=0))
    dtype = integer_dtype(layer_wire(xs.shape[1], bits, fan_in, B, "gather").accumulator_nbytes)
    levels = [to_levels(torch.from_numpy(x), scales, s, _gen(bits, rank=c), dtype,
                        bucket_size=B, sign=bits == 1) for c, x in enumerate(xs)]
    expected = np.sum([lv.numpy().astype(np.int64) for lv in levels], axis=0)
    rows = torch.stack([pack_levels(lv, bits) for lv in levels[1:]])
    own = levels[0].clone()
    assert sum_packed_levels(rows, bits, own) is own
    np.testing.assert_array_equal(own.numpy().astype(np.int64), expected)
