"""Pairwise masking: exact cancellation, uniformity of one contribution, keys, dropouts, DH."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch

from hflmpi.core.secure import (
    MODP_2048_G,
    MODP_2048_P,
    DiffieHellmanSeeds,
    PairwiseSeeds,
    SharedSecretSeeds,
    dh_keypair,
    dtype_bits,
    mask_correction,
    mask_levels,
    max_modulus_bits,
    pair_mask,
    required_modulus_bits,
    unmask_sum,
)

SEEDS = SharedSecretSeeds(bytes(range(32)))
DTYPES = [torch.int8, torch.int16, torch.int32, torch.int64]


def _exact_sum(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The exact integer sum (Python integers), checked to fit the container, in its dtype.

    An MPI SUM of in-range values gives exactly this; nothing may depend on overflow, which
    MPI libraries treat differently (Open MPI 5 saturates 8- and 16-bit sums).
    """
    dtype = tensors[0].dtype
    total = [sum(int(t.reshape(-1)[e]) for t in tensors) for e in range(tensors[0].numel())]
    info = torch.iinfo(dtype)
    assert all(info.min <= v <= info.max for v in total), "the sum overflowed the container"
    return torch.tensor(total, dtype=torch.int64).to(dtype).reshape(tensors[0].shape)


def _levels(k: int, n: int, dtype: torch.dtype, seed: int) -> list[torch.Tensor]:
    """Random levels whose true sum fits the modulus, including both extremes."""
    s = (2 ** (max_modulus_bits(dtype, k) - 1) - 1) // k
    g = torch.Generator().manual_seed(seed)
    out = [
        torch.randint(-s, s + 1, (n,), generator=g, dtype=torch.int64).to(dtype) for _ in range(k)
    ]
    for t in out:
        t[:2] = torch.tensor([-s, s])
    return out


def _chi_square_pvalue(counts: np.ndarray) -> float:
    """Return the p-value of Pearson's uniformity test (chi^2 survival = upper incomplete gamma)."""
    expected = counts.sum() / counts.size
    statistic = float(((counts - expected) ** 2 / expected).sum())
    dof = counts.size - 1
    return float(
        torch.special.gammaincc(
            torch.tensor(dof / 2.0, dtype=torch.float64),
            torch.tensor(statistic / 2.0, dtype=torch.float64),
        )
    )


# --------------------------------------------------------------------------------------------
# Cancellation
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k", [2, 3, 5])
def test_masked_sum_equals_plain_sum(dtype, k):
    levels = _levels(k, 1000, dtype, seed=k)
    w = max_modulus_bits(dtype, k)
    masked = [mask_levels(lv, i, k, SEEDS, step=7, layer=1, group=2) for i, lv in enumerate(levels)]
    plain = sum(lv.to(torch.int64) for lv in levels)
    assert all(m.dtype == dtype for m in masked)
    assert all(int(m.min()) >= 0 and int(m.max()) < 2**w for m in masked)  # residues
    assert not any(torch.equal(m, lv) for m, lv in zip(masked, levels))
    total = unmask_sum(_exact_sum(masked), w)
    assert total.dtype == dtype
    assert torch.equal(total.to(torch.int64), plain)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k", [1, 2, 3, 7, 64])
def test_residues_of_a_group_never_overflow_the_container(dtype, k):
    """The default modulus is the largest whose ``k`` residues sum exactly in the container."""
    w = max_modulus_bits(dtype, k)
    largest = torch.iinfo(dtype).max
    assert w == min(62, max(v for v in range(64) if k * (2**v - 1) <= largest))
    assert w <= dtype_bits(dtype) - 1
    zeros = torch.zeros(3, dtype=dtype)
    with pytest.raises(ValueError, match="must fit the container"):
        mask_levels(zeros, 0, k, SEEDS, w + 1, step=0, layer=1)
    if w < 2:  # 64 int8 residues of even 2 bits would overflow: no modulus fits
        with pytest.raises(ValueError, match="must fit the container"):
            mask_levels(zeros, 0, k, SEEDS, step=0, layer=1)


@pytest.mark.parametrize("dtype", DTYPES)
def test_masked_sum_is_the_modular_sum_of_any_levels(dtype):
    """Masking commutes with the sum modulo 2^w for any levels, even ones whose sum needs more."""
    k = 4
    w = max_modulus_bits(dtype, k)
    info = torch.iinfo(dtype)
    g = torch.Generator().manual_seed(1)
    levels = [torch.randint(info.min, info.max, (300,), generator=g, dtype=dtype) for _ in range(k)]
    for t in levels:
        t[0], t[1] = info.min, info.max
    masked = [mask_levels(lv, i, k, SEEDS, step=0, layer=3) for i, lv in enumerate(levels)]
    expected = [sum(int(lv[e]) for lv in levels) % 2**w for e in range(300)]
    got = [int(v) % 2**w for v in _exact_sum(masked)]
    assert got == expected


@pytest.mark.parametrize("w", [5, 9, 12, 20])
def test_modulus_smaller_than_the_container(w):
    k = 6
    bound = 2 ** (w - 1) // k - 1
    g = torch.Generator().manual_seed(w)
    levels = [
        torch.randint(-bound, bound + 1, (500,), generator=g, dtype=torch.int32) for _ in range(k)
    ]
    masked = [mask_levels(lv, i, k, SEEDS, w, step=1, layer=1) for i, lv in enumerate(levels)]
    assert all(int(m.min()) >= 0 and int(m.max()) < 2**w for m in masked)
    total = unmask_sum(_exact_sum(masked), w)
    assert torch.equal(total, sum(levels))
    assert required_modulus_bits(k * bound) <= w


def test_in_place_and_shapes():
    levels = _levels(3, 24, torch.int16, seed=0)
    shaped = [lv.reshape(4, 6).clone() for lv in levels]
    masked = [mask_levels(lv, i, 3, SEEDS, step=2, layer=1, out=lv) for i, lv in enumerate(shaped)]
    assert all(m is lv and m.shape == (4, 6) for m, lv in zip(masked, shaped))
    w = max_modulus_bits(torch.int16, 3)
    assert torch.equal(unmask_sum(_exact_sum(masked), w).reshape(-1), sum(levels))


def test_group_of_one_is_not_masked():
    levels = torch.arange(-5, 5, dtype=torch.int32)
    residues = mask_levels(levels, 0, 1, SEEDS, 8, step=0, layer=1)
    assert residues.tolist() == [v % 256 for v in range(-5, 5)]
    assert torch.equal(unmask_sum(residues, 8), levels)


def test_long_vectors_cross_prg_blocks():
    """Masks of vectors longer than one PRG block (2**20 elements) still cancel."""
    n, k = (1 << 20) + 40, 2
    levels = [torch.full((n,), 3, dtype=torch.int8), torch.full((n,), -5, dtype=torch.int8)]
    masked = [mask_levels(lv, i, k, SEEDS, step=0, layer=1) for i, lv in enumerate(levels)]
    assert max_modulus_bits(torch.int8, 2) == 6  # 2 * 63 <= 127
    total = unmask_sum(masked[0] + masked[1], 6)  # residues < 64: no overflow in int8
    assert torch.equal(total, torch.full((n,), -2, dtype=torch.int8))
    key = SEEDS.pair_key(0, 1, step=0, layer=1, group=0)
    whole = pair_mask(key, n, 8)
    np.testing.assert_array_equal(
        pair_mask(key, 40, 8, start=(1 << 20) - 20), whole[(1 << 20) - 20 : (1 << 20) + 20]
    )


# --------------------------------------------------------------------------------------------
# Uniformity of one contribution
# --------------------------------------------------------------------------------------------


def test_single_masked_contribution_is_uniform():
    """Chi-square over 256 bins: masked levels pass, the raw levels fail the same test."""
    n = 256 * 200
    g = torch.Generator().manual_seed(0)
    # levels concentrated like real quantized updates: small values around 0
    levels = torch.randint(-3, 4, (n,), generator=g, dtype=torch.int8)
    masked = mask_levels(levels, 1, 3, SEEDS, step=11, layer=1)

    def counts(t: torch.Tensor, shift: int = 0, bits: int = 8) -> np.ndarray:
        v = t.to(torch.int64).numpy() >> shift
        return np.bincount(v & (2**bits - 1), minlength=2**bits)

    # int8 residues of a group of 3: w = 5 (3 * 31 <= 127), uniform over 32 values
    assert _chi_square_pvalue(counts(masked, bits=5)) > 1e-3
    assert _chi_square_pvalue(counts(levels, bits=5)) < 1e-12
    assert int(masked.min()) >= 0 and int(masked.max()) < 32
    # every byte of the w = 29 bits of a 32-bit container (4 * (2^29 - 1) <= 2^31 - 1)
    wide = mask_levels(levels.to(torch.int32), 2, 4, SEEDS, step=11, layer=1)
    for shift, bits in ((0, 8), (8, 8), (16, 8), (24, 5)):
        assert _chi_square_pvalue(counts(wide, shift, bits)) > 1e-3
    assert int(wide.max()) < 2**29
    # and across releases for one fixed element: its masked value is uniform over 2^8
    one = torch.tensor([127], dtype=torch.int16)  # an extreme level
    draws = torch.cat([mask_levels(one, 0, 2, SEEDS, 8, step=t, layer=1) for t in range(256 * 20)])
    assert _chi_square_pvalue(counts(draws)) > 1e-3


def test_chi_square_helper_is_calibrated():
    rng = np.random.default_rng(0)
    pvalues = [
        _chi_square_pvalue(np.bincount(rng.integers(0, 256, 25600), minlength=256))
        for _ in range(50)
    ]
    assert 0.2 < float(np.mean(pvalues)) < 0.8  # uniform p-values average 0.5


# --------------------------------------------------------------------------------------------
# Keys
# --------------------------------------------------------------------------------------------


def test_pair_keys_are_symmetric_and_context_bound():
    key = SEEDS.pair_key(1, 3, step=5, layer=2, group=0)
    assert len(key) == 32
    assert key == SEEDS.pair_key(3, 1, step=5, layer=2, group=0)
    others = {
        SEEDS.pair_key(1, 3, step=6, layer=2, group=0),
        SEEDS.pair_key(1, 3, step=5, layer=1, group=0),
        SEEDS.pair_key(1, 3, step=5, layer=2, group=1),
        SEEDS.pair_key(1, 2, step=5, layer=2, group=0),
        SharedSecretSeeds(bytes(32)).pair_key(1, 3, step=5, layer=2, group=0),
    }
    assert key not in others and len(others) == 5
    assert isinstance(SEEDS, PairwiseSeeds)


def test_masks_differ_across_steps_and_layers():
    levels = torch.zeros(64, dtype=torch.int32)
    a = mask_levels(levels, 0, 3, SEEDS, step=0, layer=1)
    b = mask_levels(levels, 0, 3, SEEDS, step=1, layer=1)
    c = mask_levels(levels, 0, 3, SEEDS, step=0, layer=2)
    d = mask_levels(levels, 0, 3, SEEDS, step=0, layer=1, group=1)
    assert torch.equal(a, mask_levels(levels, 0, 3, SEEDS, step=0, layer=1))  # deterministic
    for other in (b, c, d):
        assert int((a == other).sum()) < 4  # 64 random 32-bit values: collisions ~ 0


def test_validation():
    levels = torch.zeros(4, dtype=torch.int16)
    with pytest.raises(ValueError, match="16..64 bytes"):
        SharedSecretSeeds(b"short")
    with pytest.raises(ValueError, match="outside"):
        mask_levels(levels, 3, 3, SEEDS, step=0, layer=1)
    with pytest.raises(ValueError, match="modulus_bits"):
        mask_levels(levels, 0, 3, SEEDS, 17, step=0, layer=1)
    with pytest.raises(ValueError, match="modulus_bits"):
        unmask_sum(levels, 16)  # residues modulo 2^16 do not fit int16
    with pytest.raises(TypeError, match="int8/16/32/64"):
        mask_levels(levels.float(), 0, 3, SEEDS, step=0, layer=1)
    with pytest.raises(ValueError, match="step"):
        mask_levels(levels, 0, 3, SEEDS, step=-1, layer=1)
    with pytest.raises(TypeError):
        mask_levels(levels, 0, 3, SEEDS)  # the release must be named
    assert required_modulus_bits(0) == 1
    assert required_modulus_bits(127) == 8
    assert required_modulus_bits(128) == 9


# --------------------------------------------------------------------------------------------
# Dropouts
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dropped", [{2}, {0, 3}, {4}])
@pytest.mark.parametrize("dtype,w", [(torch.int16, None), (torch.int32, 13), (torch.int64, None)])
def test_mask_correction_removes_dropped_pairs(dropped, dtype, w):
    k, n = 5, 257
    levels = (
        _levels(k, n, dtype, seed=3)
        if w is None
        else [
            torch.randint(-100, 101, (n,), dtype=dtype, generator=torch.Generator().manual_seed(i))
            for i in range(k)
        ]
    )
    context = dict(step=4, layer=2, group=1)
    masked = [mask_levels(lv, i, k, SEEDS, w, **context) for i, lv in enumerate(levels)]
    survivors = [i for i in range(k) if i not in dropped]
    plain = sum(levels[i].to(torch.int64) for i in survivors)
    w = max_modulus_bits(dtype, k) if w is None else w
    garbage = unmask_sum(_exact_sum([masked[i].to(torch.int64) for i in survivors]), w)
    assert not torch.equal(
        garbage.to(torch.int64), plain
    )  # the round is garbage without correction
    corrections = [
        mask_correction(dropped, i, k, SEEDS, w, numel=n, dtype=dtype, **context) for i in survivors
    ]
    assert all(int(c.min()) >= 0 and int(c.max()) < 2**w for c in corrections)
    summands = [t.to(torch.int64) for t in [masked[i] for i in survivors] + corrections]
    total = unmask_sum(_exact_sum(summands), w)  # 2 k' residues: summed in int64
    assert torch.equal(total.to(torch.int64), plain)
    with pytest.raises(ValueError, match="survivors only"):
        mask_correction(dropped, min(dropped), k, SEEDS, w, numel=n, dtype=dtype, **context)


# --------------------------------------------------------------------------------------------
# Diffie-Hellman pair keys
# --------------------------------------------------------------------------------------------


def _is_probable_prime(n: int, rounds: int = 4) -> bool:
    d, r = n - 1, 0
    while d % 2 == 0:
        d, r = d // 2, r + 1
    rng = random.Random(0)
    for _ in range(rounds):
        x = pow(rng.randrange(2, n - 1), d, n)
        if x in (1, n - 1):
            continue
        for _ in range(r - 1):
            x = pow(x, 2, n)
            if x == n - 1:
                break
        else:
            return False
    return True


def test_modp_group_is_a_safe_prime_group():
    assert MODP_2048_P.bit_length() == 2048
    assert _is_probable_prime(MODP_2048_P) and _is_probable_prime((MODP_2048_P - 1) // 2)
    assert pow(MODP_2048_G, (MODP_2048_P - 1) // 2, MODP_2048_P) == 1  # g in the order-q subgroup


def test_diffie_hellman_seeds_agree_and_cancel():
    k = 4
    pairs = [dh_keypair() for _ in range(k)]
    publics = [public for _, public in pairs]
    seeds = [
        DiffieHellmanSeeds(i, private, publics, session=b"run-1")
        for i, (private, _) in enumerate(pairs)
    ]
    assert seeds[0].pair_key(0, 2, step=1, layer=1, group=0) == seeds[2].pair_key(
        2, 0, step=1, layer=1, group=0
    )
    with pytest.raises(PermissionError):
        seeds[0].pair_key(1, 2, step=1, layer=1, group=0)  # the leader cannot derive others' pairs
    levels = _levels(k, 100, torch.int16, seed=4)
    masked = [mask_levels(lv, i, k, seeds[i], step=9, layer=1) for i, lv in enumerate(levels)]
    w = max_modulus_bits(torch.int16, k)
    assert torch.equal(unmask_sum(_exact_sum(masked), w), sum(levels))
    corrections = [
        mask_correction({1}, i, k, seeds[i], numel=100, dtype=torch.int16, step=9, layer=1)
        for i in (0, 2, 3)
    ]
    total = unmask_sum(_exact_sum([t.to(torch.int64) for t in
                                   [masked[i] for i in (0, 2, 3)] + corrections]), w)
    assert torch.equal(total, levels[0] + levels[2] + levels[3])


def test_diffie_hellman_rejects_bad_public_keys():
    private, public = dh_keypair()
    q = (MODP_2048_P - 1) // 2
    non_residue = next(
        x for x in range(3, 100) if pow(x, q, MODP_2048_P) != 1
    )  # outside the subgroup
    for bad in (0, 1, MODP_2048_P - 1, MODP_2048_P, non_residue):
        with pytest.raises(ValueError, match="valid group element"):
            DiffieHellmanSeeds(0, private, [public, bad])
    with pytest.raises(ValueError, match="not this participant"):
        DiffieHellmanSeeds(0, private, [dh_keypair()[1], public])
    assert math.gcd(public, MODP_2048_P) == 1
