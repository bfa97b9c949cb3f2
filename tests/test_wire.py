"""The one byte model (:mod:`hflmpi.core.wire`): hand-computed sizes, and the bytes a real uplink hands MPI.

The measurement test builds the job's :class:`hflmpi.mpi.uplink.QuantizedUplink` on a recording
single-process communicator of size ``k`` that plays one participant (a non-leader child, then the
leader) and records every buffer the uplink gives to a collective. This covers every width 1..16
and fan-in 2..9 in a serial test, independent of the MPI world size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
import torch

from hflmpi.core.rng import torch_generator
from hflmpi.core.wire import (
    METHOD_NAMES,
    LayerWire,
    Method,
    auto_bucket_size,
    bytes_ratio,
    choose_method,
    container_nbytes,
    layer_wire,
    levels_for_bits,
    masked_container_nbytes,
    masked_modulus_bits,
    num_buckets,
    packed_nbytes,
    resolve_bucket_size,
    scale_nbytes,
)

NUMEL = 1037  # not a multiple of any bucket: the last bucket is short


# ---------------------------------------------------------------------------------------------
# Hand-computed sizes


def test_levels_buckets_and_packed_sizes_by_hand() -> None:
    assert [levels_for_bits(b) for b in (1, 2, 3, 8, 16)] == [1, 1, 3, 127, 32767]
    assert [auto_bucket_size(b) for b in (1, 2, 4, 8, 16, 3)] == [4096, 2048, 1024, 512, 256, 2048]
    assert resolve_bucket_size(8, 0) == 512 and resolve_bucket_size(8, 100) == 100
    assert num_buckets(1000, 64) == 16 and num_buckets(1024, 64) == 16 and num_buckets(0, 64) == 0
    assert packed_nbytes(1000, 3) == 375 and packed_nbytes(1001, 3) == 376
    assert packed_nbytes(7, 1) == 1 and packed_nbytes(9, 1) == 2 and packed_nbytes(5, 16) == 10
    assert scale_nbytes(1000, 64) == 64 and scale_nbytes(1025, 64) == 68
    with pytest.raises(ValueError, match="bucket_size=0"):
        num_buckets(10, 0)
    with pytest.raises(ValueError, match="numel=-1"):
        packed_nbytes(-1, 8)


def test_container_boundaries() -> None:
    # the smallest signed integer holding fan_in * s, in bytes
    assert container_nbytes(8, 1) == 1  # 127
    assert container_nbytes(8, 2) == 2  # 254
    assert container_nbytes(2, 127) == 1 and container_nbytes(2, 128) == 2
    assert container_nbytes(1, 127) == 1
    assert container_nbytes(8, 258) == 2 and container_nbytes(8, 259) == 4  # 32766 | 32893
    assert container_nbytes(16, 1) == 2 and container_nbytes(16, 2) == 4
    assert container_nbytes(16, 65538) == 4 and container_nbytes(16, 65539) == 8
    limit = (2**63 - 1) // 32767
    assert container_nbytes(16, limit) == 8
    with pytest.raises(OverflowError, match=r"fan_in=.*beyond int64"):
        container_nbytes(16, limit + 1)
    with pytest.raises(ValueError, match="fan_in=0"):
        container_nbytes(8, 0)


def test_method_choice_and_codes() -> None:
    # the stored integers and names are part of the run-file format: never renumber them
    assert [int(m) for m in Method] == [0, 1, 2, 3]
    assert METHOD_NAMES == ("none", "integer-sum", "gather", "lanes")
    # one child: nothing reaches the leader; ties go to the sum
    assert choose_method(1000, 8, 1) == Method.INTEGER_SUM
    assert choose_method(1000, 16, 1) == Method.INTEGER_SUM
    # two or three children: one or two packed rows beat one or two wider sums
    for bits in range(1, 17):
        for fan_in in (2, 3):
            assert choose_method(1000, bits, fan_in) == Method.GATHER
    # 9 children at 8 bits: 8 packed rows (8000 bytes) against 4 tree hops of 12-bit lanes,
    # 5 a word (4 * 8 * 200 = 6400 bytes) and of int16 sums (8000 bytes)
    assert choose_method(1000, 8, 9) == Method.LANES
    for bits in range(1, 17):
        for fan_in in (2, 3, 4, 9, 17, 64):
            assert choose_method(1000, bits, fan_in) == _hand_sizes(bits, fan_in, 0, "auto")[0]
    assert choose_method(1000, 8, 4, "sum") == Method.INTEGER_SUM
    assert choose_method(1000, 8, 4, "lanes") == Method.LANES
    assert choose_method(1000, 8, 1, "gather") == Method.GATHER
    with pytest.raises(ValueError, match="quantize.method='fast'"):
        choose_method(1000, 8, 2, "fast")


def test_layer_wire_by_hand() -> None:
    # exact layer (quantization off, the old identity codec): the model values themselves
    exact = layer_wire(1000, 0, 4)
    assert (exact.method, exact.payload_nbytes, exact.scale_nbytes, exact.downlink_nbytes) == (
        Method.NONE, 4000, 0, 4000)
    assert exact.uplink_nbytes == 3 * 4000
    assert layer_wire(1000, 0, 4, itemsize=8).payload_nbytes == 8000
    # 3 bits, 5 children, buckets of 64: gather 375 packed bytes, 16 scales each
    gather = layer_wire(1000, 3, 5, 64)
    assert gather == LayerWire(1000, 3, 5, 64, Method.GATHER, 375, 64, 4000, 1)
    assert gather.uplink_nbytes == 4 * 375 + 5 * 64
    # forced integer sum at 8 bits over 2 children: int16 levels (254 > 127)
    summed = layer_wire(1000, 8, 2, 64, "sum")
    assert (summed.method, summed.payload_nbytes, summed.accumulator_nbytes) == (
        Method.INTEGER_SUM, 2000, 2)
    # the gather leader adds codes up to 2s: 8 bits, 2 children -> 508 needs int16
    assert layer_wire(1000, 8, 2).accumulator_nbytes == 2
    assert layer_wire(1000, 8, 2).bucket_size == 512  # auto
    with pytest.raises(ValueError, match="bits=17"):
        layer_wire(1000, 17, 2)


def test_secure_layers_send_residues_in_a_container_that_holds_their_sum() -> None:
    # by hand: 8 bits, 4 children: |sum| <= 508 -> w = 10; 4 * 1023 = 4092 -> int16
    assert (masked_modulus_bits(8, 4), masked_container_nbytes(8, 4)) == (10, 2)
    # 8 bits, 16 children: 2032 -> w = 12; 16 * 4095 = 65520 > 32767 -> int32 (plain sum: int16)
    assert (masked_modulus_bits(8, 16), masked_container_nbytes(8, 16)) == (12, 4)
    assert container_nbytes(8, 16) == 2
    # 4 bits, 2 children: 14 -> w = 5; 2 * 31 = 62 -> int8; 4 children: 4 * 63 = 252 -> int16
    assert masked_container_nbytes(4, 2) == 1 and masked_container_nbytes(4, 4) == 2
    secure = layer_wire(1000, 8, 16, 64, "auto", secure=True)
    assert secure == LayerWire(1000, 8, 16, 64, Method.INTEGER_SUM, 4000, 64, 4000, 4, 12)
    with pytest.raises(ValueError, match="needs method='sum'"):
        layer_wire(1000, 8, 4, 64, "gather", secure=True)
    for bits in range(1, 17):
        for fan_in in (*range(1, 70), 255, 256, 257, 4097, 65537):
            s = levels_for_bits(bits)
            w = masked_modulus_bits(bits, fan_in)
            assert -(2 ** (w - 1)) <= -fan_in * s and fan_in * s < 2 ** (w - 1) <= 2 * fan_in * s
            size = masked_container_nbytes(bits, fan_in)
            assert fan_in * (2**w - 1) <= 2 ** (8 * size - 1) - 1, (bits, fan_in)
            assert size == 1 or fan_in * (2**w - 1) > 2 ** (4 * size - 1) - 1, (bits, fan_in)
            assert size >= container_nbytes(bits, fan_in)


def test_bytes_ratio_is_the_large_model_limit_of_the_gather_path() -> None:
    assert bytes_ratio(0) == 1.0
    assert bytes_ratio(8, 512) == pytest.approx(8 / 32 + 1 / 512)
    assert bytes_ratio(4) == pytest.approx(4 / 32 + 1 / 1024)
    numel = 1 << 22
    for bits in (1, 2, 4, 8, 16):
        wire = layer_wire(numel, bits, 2)
        exact = (wire.payload_nbytes + wire.scale_nbytes) / (4 * numel)
        assert exact == pytest.approx(bytes_ratio(bits), rel=1e-6)
    with pytest.raises(ValueError, match="bits=17"):
        bytes_ratio(17, 512)


# ---------------------------------------------------------------------------------------------
# The wire model against the bytes a real uplink hands to MPI


pytest.importorskip("mpi4py")
from mpi4py import MPI  # noqa: E402

from hflmpi.mpi.uplink import QuantizedUplink  # noqa: E402


def _nbytes(buf: Any) -> int:
    if isinstance(buf, list):  # [buffer, MPI datatype]
        buf = buf[0]
    return int(np.asarray(buf).nbytes)


@dataclass
class RecordingComm:
    """A communicator of ``size`` ranks seen from ``rank``: it records, moves nothing real.

    ``sent`` lists ``(collective, bytes this rank contributes)``; a root's in-place contribution
    to a ``Reduce``/``Gather`` stays local (0 bytes), an in-place ``Allreduce`` contributes its
    buffer. ``received`` lists the root's receive-buffer sizes. Gathered rows of the other
    children are filled with ``rows`` (a real child's packed bytes) when given.
    """

    size: int
    rank: int
    rows: np.ndarray | None = None
    sent: list[tuple[str, int]] = field(default_factory=list)
    received: list[tuple[str, int]] = field(default_factory=list)

    def Get_size(self) -> int:  # noqa: N802 - mpi4py's names
        return self.size

    def Get_rank(self) -> int:  # noqa: N802
        return self.rank

    def Allreduce(self, sendbuf: Any, recvbuf: Any, op: Any = None) -> None:  # noqa: N802
        self.sent.append(("Allreduce", _nbytes(recvbuf if sendbuf is MPI.IN_PLACE else sendbuf)))

    def Reduce(self, sendbuf: Any, recvbuf: Any, op: Any = None, root: int = 0) -> None:  # noqa: N802
        if sendbuf is MPI.IN_PLACE:
            self.sent.append(("Reduce", 0))
            self.received.append(("Reduce", _nbytes(recvbuf)))
        else:
            self.sent.append(("Reduce", _nbytes(sendbuf)))

    def Gather(self, sendbuf: Any, recvbuf: Any, root: int = 0) -> None:  # noqa: N802
        if sendbuf is MPI.IN_PLACE:
            self.sent.append(("Gather", 0))
            self.received.append(("Gather", _nbytes(recvbuf)))
            if self.rows is not None:
                rows = np.asarray(recvbuf).reshape(self.size, -1)
                rows[1:] = self.rows
        else:
            self.sent.append(("Gather", _nbytes(sendbuf)))


def _hand_sizes(bits: int, fan_in: int, bucket: int, method: str) -> tuple[Method, int, int]:
    """Return (method, payload per child, scales per participant), computed from first principles."""
    s = 1 if bits == 1 else 2 ** (bits - 1) - 1
    container = next(c for c in (1, 2, 4, 8) if fan_in * s < 2 ** (8 * c - 1))
    packed = -(-NUMEL * bits // 8)
    b = bucket or next(2**e for e in range(20) if 2**e * bits >= 4096)
    scales = 4 * -(-NUMEL // b)
    width = (2 * fan_in * s).bit_length()  # lanes hold sums of fan_in codes in [0, 2s]
    lanes = 8 * -(-NUMEL // (64 // width))
    sizes = {Method.INTEGER_SUM: NUMEL * container, Method.LANES: lanes, Method.GATHER: packed}
    if method != "auto":
        chosen = {"sum": Method.INTEGER_SUM, "gather": Method.GATHER, "lanes": Method.LANES}[method]
        return chosen, sizes[chosen], scales
    hops = math.ceil(math.log2(fan_in)) if fan_in > 1 else 0  # binomial-tree reduction
    into_leader = {Method.INTEGER_SUM: hops * sizes[Method.INTEGER_SUM],
                   Method.LANES: hops * lanes, Method.GATHER: (fan_in - 1) * packed}
    chosen = min(into_leader, key=into_leader.__getitem__)  # dict order: sum, lanes, gather
    return chosen, sizes[chosen], scales


def _exchange(comm: RecordingComm, bits: int, bucket: int, method: str) -> tuple[QuantizedUplink, int]:
    generator = torch_generator(bits, purpose="test-wire", rank=comm.rank)
    uplink = QuantizedUplink(comm, NUMEL, bits, bucket, torch.device("cpu"), False, method)  # type: ignore[arg-type]
    anchor = torch.randn(NUMEL, generator=generator)
    child = anchor + torch.randn(NUMEL, generator=generator)
    result = uplink.exchange(child, anchor, 1.0 / comm.size, generator)
    assert torch.isfinite(child).all()
    return uplink, result.bytes_sent


@pytest.mark.parametrize("bits", range(1, 17))
def test_uplink_moves_the_bytes_the_wire_model_predicts(bits: int) -> None:
    for fan_in in range(2, 10):
        for method in ("auto", "sum", "gather", "lanes"):
            for bucket in (0, 64):
                wire = layer_wire(NUMEL, bits, fan_in, bucket, method)
                what = f"bits={bits} fan_in={fan_in} method={method} bucket={bucket}"
                assert (wire.method, wire.payload_nbytes, wire.scale_nbytes) == _hand_sizes(
                    bits, fan_in, bucket, method), what
                child_comm = RecordingComm(fan_in, rank=fan_in - 1)
                child, child_bytes = _exchange(child_comm, bits, bucket, method)
                uplink_op = "Gather" if wire.method == Method.GATHER else "Reduce"
                assert child.method == wire.method, what
                assert child_comm.sent == [("Allreduce", wire.scale_nbytes),
                                           (uplink_op, wire.payload_nbytes)], what
                assert child_bytes == wire.scale_nbytes + wire.payload_nbytes, what
                rows = (child._packed.numpy()[0] if wire.method == Method.GATHER else None)
                leader_comm = RecordingComm(fan_in, rank=0, rows=rows)
                _, leader_bytes = _exchange(leader_comm, bits, bucket, method)
                assert leader_comm.sent == [("Allreduce", wire.scale_nbytes), (uplink_op, 0)], what
                assert leader_bytes == wire.scale_nbytes, what
                gathered = fan_in if wire.method == Method.GATHER else 1
                assert leader_comm.received == [(uplink_op, gathered * wire.payload_nbytes)], what
                # together: what /metrics/bytes_sent sums over the group
                assert leader_bytes + (fan_in - 1) * child_bytes == wire.uplink_nbytes, what


@pytest.mark.parametrize("bits", [1, 2, 4, 8, 16])
def test_secure_uplink_moves_the_bytes_the_wire_model_predicts(bits: int) -> None:
    from hflmpi.core.secure import SharedSecretSeeds

    seeds = SharedSecretSeeds(bytes(range(32)))
    for fan_in in (2, 3, 5, 9, 17):
        wire = layer_wire(NUMEL, bits, fan_in, 0, "sum", secure=True)
        comm = RecordingComm(fan_in, rank=fan_in - 1)
        generator = torch_generator(bits, purpose="test-wire", rank=comm.rank)
        uplink = QuantizedUplink(comm, NUMEL, bits, 0, torch.device("cpu"), False, "sum",  # type: ignore[arg-type]
                                 seeds=seeds)
        anchor = torch.randn(NUMEL, generator=generator)
        sent = uplink.exchange(anchor + torch.randn(NUMEL, generator=generator), anchor, 0.5,
                               generator, step=1, layer=1).bytes_sent
        assert uplink.wire == wire and uplink.container.itemsize == wire.accumulator_nbytes
        assert comm.sent == [("Allreduce", wire.scale_nbytes), ("Reduce", wire.payload_nbytes)]
        assert sent == wire.scale_nbytes + wire.payload_nbytes == wire.scale_nbytes + NUMEL * (
            masked_container_nbytes(bits, fan_in))
        assert uplink.sum_range() == (0, 2 ** masked_modulus_bits(bits, fan_in) - 1)
        levels = uplink._levels.numpy()  # what went on the wire: residues modulo 2^w
        assert levels.min() >= 0 and levels.max() < 2 ** wire.modulus_bits
