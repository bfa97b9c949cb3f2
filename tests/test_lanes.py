"""Summable packing (hflmpi.core.lanes): word sums equal lane sums, checked against numpy int64."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hflmpi.core.lanes import LaneFormat, pack_lanes, unpack_lanes
from hflmpi.core.wire import (
    Method,
    choose_method,
    lane_width,
    lanes_per_word,
    layer_wire,
    levels_for_bits,
)


def _word_sum(rows: list[np.ndarray]) -> np.ndarray:
    """Add words as unsigned 64-bit integers, as MPI_SUM on MPI_UINT64_T does (wrapping)."""
    total = np.zeros_like(rows[0].view(np.uint64))
    for row in rows:
        total += row.view(np.uint64)
    return total.view(np.int64)


@pytest.mark.parametrize("bits,fan_in", [(1, 2), (1, 5), (2, 3), (3, 64), (4, 2), (4, 17),
                                          (8, 1), (8, 2), (8, 8), (8, 64), (12, 5), (16, 64)])
def test_word_sums_are_exact_lane_sums(bits: int, fan_in: int) -> None:
    s = levels_for_bits(bits)
    numel = 1000 + 7 * fan_in  # a ragged last lane
    fmt = LaneFormat(numel, bits, fan_in)
    rng = np.random.default_rng(bits * 100 + fan_in)
    levels = rng.integers(-s, s, size=(fan_in, numel), endpoint=True)
    levels[:, :50] = s  # every lane at its largest sum somewhere
    levels[:, 50:100] = -s
    scratch = torch.empty(fmt.words, dtype=torch.int64)
    rows = []
    for row in levels:
        words = torch.empty(fmt.words, dtype=torch.int64)
        pack_lanes(torch.from_numpy(row).to(torch.int32), fmt, words, offset=s, scratch=scratch)
        rows.append(words.numpy().copy())
    out = torch.empty(numel, dtype=torch.int64)
    unpack_lanes(torch.from_numpy(_word_sum(rows)), fmt, out, offset=fan_in * s,
                 scratch=scratch)
    np.testing.assert_array_equal(out.numpy(), levels.sum(axis=0, dtype=np.int64))


def test_group_sum_round_trips_through_lanes() -> None:
    """The downlink packs a level sum in [-fan_in s, fan_in s] with offset fan_in s."""
    bits, fan_in = 8, 4
    s = levels_for_bits(bits)
    fmt = LaneFormat(777, bits, fan_in)
    sums = torch.randint(-fan_in * s, fan_in * s + 1, (777,), dtype=torch.int16)
    sums[:3] = torch.tensor([-fan_in * s, fan_in * s, 0])
    words = torch.empty(fmt.words, dtype=torch.int64)
    scratch = torch.empty(fmt.words, dtype=torch.int64)
    pack_lanes(sums, fmt, words, offset=fan_in * s, scratch=scratch)
    back = torch.empty(777, dtype=torch.int16)
    unpack_lanes(words, fmt, back, offset=fan_in * s, scratch=scratch)
    assert torch.equal(back, sums)


def test_lane_width_follows_the_fan_in() -> None:
    assert lane_width(8, 1) == 8 and lanes_per_word(8, 1) == 8
    assert lane_width(8, 2) == 9 and lanes_per_word(8, 2) == 7
    assert lane_width(8, 4) == 10 and lanes_per_word(8, 4) == 6
    assert lane_width(4, 2) == 5 and lanes_per_word(4, 2) == 12
    for bits in range(2, 17):
        for fan_in in (1, 2, 3, 4, 7, 64):
            width = lane_width(bits, fan_in)
            assert 2 * fan_in * levels_for_bits(bits) < 1 << width
            assert width <= bits + (fan_in - 1).bit_length()


def test_too_narrow_lanes_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(OverflowError, match="64-bit word"):
        lane_width(16, 1 << 49)
    import hflmpi.core.lanes as lanes

    monkeypatch.setattr(lanes, "lane_width", lambda bits, fan_in: 8)  # 2*2*127 needs 9 bits
    with pytest.raises(OverflowError, match="cannot hold sums up to 508"):
        LaneFormat(10, 8, 2)


def test_auto_picks_by_the_bytes_into_the_leader() -> None:
    numel = 1 << 20
    assert choose_method(numel, 8, 2) == Method.GATHER
    assert choose_method(numel, 8, 4) == Method.LANES
    assert choose_method(numel, 8, 64) == Method.INTEGER_SUM  # 16-bit lanes tie with int16
    assert choose_method(numel, 8, 1) == Method.INTEGER_SUM
    wire = layer_wire(numel, 8, 4, method="lanes")
    assert wire.payload_nbytes == 8 * -(-numel // 6)


def test_levels_downlink_is_a_quarter_or_less_of_float32_at_8_bits() -> None:
    numel = 25_000_000
    assert layer_wire(numel, 8, 2).downlink_nbytes == 4 * numel  # the float32 default
    levels = layer_wire(numel, 8, 2, downlink="auto").downlink_nbytes
    assert levels == 8 * -(-numel // 7) + 4 * -(-numel // 512)
    assert levels / (4 * numel) < 0.3
    assert layer_wire(numel, 0, 2, downlink="auto").downlink_nbytes == 4 * numel
    with pytest.raises(ValueError, match="needs a quantized layer"):
        layer_wire(numel, 0, 2, downlink="levels")
    with pytest.raises(ValueError, match="downlink"):
        layer_wire(numel, 8, 2, downlink="int")


def test_unpacking_in_chunks_reads_the_same_entries() -> None:
    bits, fan_in, numel = 4, 3, 1001
    s = levels_for_bits(bits)
    fmt = LaneFormat(numel, bits, fan_in)
    sums = torch.randint(-fan_in * s, fan_in * s + 1, (numel,), dtype=torch.int64)
    words = torch.empty(fmt.words, dtype=torch.int64)
    scratch = torch.empty(fmt.words, dtype=torch.int64)
    pack_lanes(sums, fmt, words, offset=fan_in * s, scratch=scratch)
    for chunk in (1, 64, 83, 1000, 1001):
        back = torch.empty(numel, dtype=torch.int64)
        for start in range(0, numel, chunk):
            stop = min(start + chunk, numel)
            unpack_lanes(words, fmt, back[start:stop], offset=fan_in * s, scratch=scratch,
                         start=start, stop=stop)
        assert torch.equal(back, sums)
