"""Bit packing of quantization levels, checked against a numpy bit-level reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hflmpi.core.packing import (
    code_scratch,
    pack_codes,
    pack_levels,
    sum_packed_levels,
    unpack_codes,
    unpack_levels,
)
from hflmpi.core.wire import levels_for_bits, packed_nbytes

ALL_BITS = list(range(1, 17))
NUMELS = [0, 1, 7, 8, 9, 15, 17, 1001]


def _reference_pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack codes LSB first into a little-endian bit stream, one bit at a time (numpy)."""
    codes = codes.astype(np.int64)
    stream = ((codes[:, None] >> np.arange(bits)) & 1).astype(np.uint8).reshape(-1)
    return np.packbits(stream, bitorder="little")


def _reference_unpack(packed: np.ndarray, bits: int, numel: int) -> np.ndarray:
    stream = np.unpackbits(packed, bitorder="little")[: numel * bits].astype(np.int64)
    return (stream.reshape(numel, bits) << np.arange(bits)).sum(axis=1)


def _random_levels(bits: int, numel: int, seed: int) -> np.ndarray:
    """Random levels on the ``bits`` grid that include both extremes (and 0) when room allows."""
    rng = np.random.default_rng(seed)
    s = levels_for_bits(bits)
    if bits == 1:
        levels = rng.choice(np.array([-1, 1]), size=numel)
    else:
        levels = rng.integers(-s, s + 1, size=numel)
        levels[: min(numel, 3)] = np.array([-s, s, 0])[: min(numel, 3)]
    if bits == 1 and numel >= 2:
        levels[:2] = [-1, 1]
    return levels


def _codes(levels: np.ndarray, bits: int) -> np.ndarray:
    s = levels_for_bits(bits)
    return (levels + 1) // 2 if bits == 1 else levels + s


@pytest.mark.parametrize("bits", ALL_BITS)
def test_round_trip_every_width(bits: int) -> None:
    for numel in NUMELS:
        levels = _random_levels(bits, numel, seed=bits * 100 + numel)
        packed = pack_levels(torch.from_numpy(levels), bits)
        assert packed.dtype == torch.uint8
        assert packed.numel() == -(-numel * bits // 8) == packed_nbytes(numel, bits)
        back = unpack_levels(packed, bits, numel)
        assert back.dtype == torch.int32
        np.testing.assert_array_equal(back.numpy(), levels)


@pytest.mark.parametrize("bits", ALL_BITS)
def test_matches_numpy_bit_reference(bits: int) -> None:
    for numel in (1, 9, 1001):
        levels = _random_levels(bits, numel, seed=7 + bits)
        packed = pack_levels(torch.from_numpy(levels), bits).numpy()
        reference = _reference_pack(_codes(levels, bits), bits)
        np.testing.assert_array_equal(packed, reference)
        # and the reverse: our unpacker reads the reference's stream
        np.testing.assert_array_equal(
            unpack_codes(torch.from_numpy(reference), bits, numel).numpy(),
            _reference_unpack(reference, bits, numel),
        )


def test_bit_order_by_hand() -> None:
    # 3-bit codes 1, 2, 3 -> stream bits (LSB first) 100 010 110 -> byte0 = 0b11010001, byte1 = 0
    assert pack_codes(torch.tensor([1, 2, 3]), 3).tolist() == [0b11010001, 0]
    # 16-bit codes are two bytes, little-endian
    assert pack_codes(torch.tensor([0x1234, 0xFFFE]), 16).tolist() == [0x34, 0x12, 0xFE, 0xFF]
    # 1-bit stores the sign: +1 -> 1, -1 -> 0; first level in the lowest bit
    assert pack_levels(torch.tensor([1, -1, -1, 1, 1]), 1).tolist() == [0b11001]
    # 2-bit: s = 1, codes = level + 1
    assert pack_levels(torch.tensor([-1, 0, 1, 1]), 2).tolist() == [0b10100100]


def test_padded_codes_with_numel() -> None:
    codes = torch.tensor([5, 1, 7, 0, 0, 0, 0, 0], dtype=torch.uint8)
    assert pack_codes(codes, 3, numel=3).tolist() == pack_codes(codes[:3], 3).tolist()
    with pytest.raises(ValueError, match="exceeds"):
        pack_codes(codes, 3, numel=9)


@pytest.mark.parametrize("dtype", [torch.int8, torch.int16, torch.int32, torch.int64])
def test_level_and_result_dtypes(dtype: torch.dtype) -> None:
    bits = 7 if dtype == torch.int8 else 12  # int8 holds s = 63 but not s = 2047
    levels = _random_levels(bits, 33, seed=3)
    packed = pack_levels(torch.from_numpy(levels).to(dtype), bits)
    np.testing.assert_array_equal(unpack_levels(packed, bits, 33, dtype=dtype).numpy(), levels)


def test_non_contiguous_and_misaligned_inputs() -> None:
    levels = _random_levels(16, 64, seed=5)
    strided = torch.from_numpy(levels)[::2]
    packed = pack_levels(strided, 16)
    np.testing.assert_array_equal(unpack_levels(packed, 16, 32).numpy(), levels[::2])
    shifted = torch.cat([torch.zeros(1, dtype=torch.uint8), packed])[1:]  # odd byte address
    np.testing.assert_array_equal(unpack_levels(shifted, 16, 32).numpy(), levels[::2])


def test_out_of_grid_levels_are_rejected() -> None:
    with pytest.raises(ValueError, match=r"\[-127, 127\]"):
        pack_levels(torch.tensor([0, 128]), 8)
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        pack_levels(torch.tensor([-2]), 2)
    with pytest.raises(ValueError, match=r"\{-1, \+1\}"):
        pack_levels(torch.tensor([1, 0, -1]), 1)
    with pytest.raises(TypeError, match="integer"):
        pack_levels(torch.tensor([0.5]), 4)


def test_unpack_argument_checks() -> None:
    packed = pack_levels(torch.tensor([1, -3, 2]), 3)
    with pytest.raises(ValueError, match="need 2 bytes"):
        unpack_levels(packed[:1], 3, 3)
    with pytest.raises(ValueError, match="cannot hold"):
        unpack_levels(pack_levels(torch.tensor([300]), 16), 16, 1, dtype=torch.int8)
    with pytest.raises(TypeError, match="signed"):
        unpack_levels(packed, 3, 3, dtype=torch.uint8)
    with pytest.raises(TypeError, match="uint8"):
        unpack_codes(packed.to(torch.int32), 3, 3)


@pytest.mark.parametrize("bad", [0, 17, -1, 2.5, True, None])
def test_bits_validation_message(bad) -> None:
    with pytest.raises(ValueError, match=r"bits=.*\[1, 16\]"):
        levels_for_bits(bad)
    with pytest.raises(ValueError, match=r"\[1, 16\]"):
        pack_levels(torch.tensor([0]), bad)


def test_levels_for_bits_values() -> None:
    assert [levels_for_bits(b) for b in (1, 2, 3, 4, 8, 16)] == [1, 1, 3, 7, 127, 32767]


@pytest.mark.parametrize("bits", ALL_BITS)
def test_uplink_form_writes_the_reference_stream_into_out(bits: int) -> None:
    # the uplink packs its clamped levels (no range check) into a row of its send buffer,
    # reusing one int32 scratch for the codes; rows of other children must stay untouched
    for numel in NUMELS:
        levels = _random_levels(bits, numel, seed=11 * bits + numel)
        nbytes = -(-numel * bits // 8)
        send = torch.full((3, nbytes), 0xAB, dtype=torch.uint8)
        codes = code_scratch(numel, bits)
        result = pack_levels(torch.from_numpy(levels).to(torch.int16 if bits < 16 else torch.int32),
                             bits, out=send[1], codes=codes, check=False)
        assert result.data_ptr() == send[1].data_ptr()
        np.testing.assert_array_equal(send[1].numpy(), _reference_pack(_codes(levels, bits), bits))
        assert bool((send[0] == 0xAB).all()) and bool((send[2] == 0xAB).all())
    with pytest.raises(ValueError, match="out must be a uint8 tensor of 2 elements"):
        pack_levels(torch.zeros(2, dtype=torch.int32), 8, out=torch.empty(3, dtype=torch.uint8))
    with pytest.raises(ValueError, match="codes must be a torch.uint8 tensor of 16 elements"):
        pack_levels(torch.zeros(9, dtype=torch.int32), 3, codes=torch.empty(9, dtype=torch.int32))


@pytest.mark.parametrize("bits", ALL_BITS)
def test_sum_packed_levels_against_numpy(bits: int) -> None:
    numel = 1001
    rows = [_random_levels(bits, numel, seed=bits + 50 * k) for k in range(4)]
    streams = torch.stack([torch.from_numpy(_reference_pack(_codes(r, bits), bits)) for r in rows])
    # the leader's form: its own levels are in the accumulator and count as one contribution
    own = torch.from_numpy(_random_levels(bits, numel, seed=999)).to(torch.int64)
    expected_with_own = own.numpy() + np.sum(rows, axis=0)
    np.testing.assert_array_equal(sum_packed_levels(streams, bits, own).numpy(), expected_with_own)
    # a plain decode: the accumulator's contents are ignored
    junk = torch.full((numel,), 12345, dtype=torch.int64)
    np.testing.assert_array_equal(sum_packed_levels(streams[:1], bits, junk, out_holds_levels=False)
                                  .numpy(), rows[0])
    with pytest.raises(ValueError, match="bit stream of >= "):
        sum_packed_levels([streams[0][:-1]], bits, torch.zeros(numel, dtype=torch.int64))
