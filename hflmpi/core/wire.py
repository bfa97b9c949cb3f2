"""What one layer's aggregation puts on the wire: the one byte model, in plain integers.

Pure module (no torch, no MPI). Every byte count of hflmpi comes from here: the quantized uplink
(:mod:`hflmpi.mpi.uplink`) sizes its buffers with it, the cost model (:mod:`hflmpi.core.costmodel`)
predicts ``/metrics/bytes_sent`` and collective times with it, the tau planner
(:mod:`hflmpi.core.tau_search`) and the experiments scale float32 times by :func:`bytes_ratio`.

A ``bits``-wide quantizer (QSGD's stochastic uniform grid, the ``Q_n`` of QMLHFL, arXiv
2505.08145) has levels in ``[-s, s]`` with ``s = 2**(bits-1) - 1`` (``bits = 1``: the sign grid
``{-1, +1}``, ``s = 1``). A layer of ``fan_in`` participants aggregating ``numel`` entries with
buckets of ``B`` entries moves, per aggregation:

* scales: every participant takes part in a ``MAX`` allreduce of ``4 ceil(numel/B)`` bytes
  (one float32 per bucket);
* payload: every non-leader participant sends either ``numel`` integers of the smallest signed
  container that holds ``fan_in * s`` (``Method.INTEGER_SUM``, a ``Reduce``), or the levels
  bit-packed to ``ceil(numel bits / 8)`` bytes (``Method.GATHER``, a ``Gather``); ``"auto"`` picks
  the smaller, ties going to the integer sum. An exact layer (``bits = 0``, ``Method.NONE``)
  sends ``numel`` model values (``itemsize`` bytes each, float32 by default);
* lanes (``Method.LANES``): every participant packs its offset codes ``level + s`` into lanes
  of ``L = bit_length(2 fan_in s)`` bits, ``k = floor(64 / L)`` lanes per 64-bit word
  (:func:`lane_width`, :func:`lanes_per_word`), and the words are summed by a plain
  ``Reduce(SUM)`` on unsigned 64-bit integers: a lane's sum stays below ``2^L``, so no carry
  crosses into the next lane and the sum of words is the word of the sums
  (:mod:`hflmpi.core.lanes`);
* downlink: the leader broadcasts the new model, ``numel * itemsize`` bytes (``"float32"``),
  or, on a quantized layer, the level sum in lanes plus the scales (``"levels"``,
  :func:`levels_downlink_nbytes`), from which every member rebuilds the same model bit for bit.

``"auto"`` compares what the leader receives: a gather brings ``fan_in - 1`` packed payloads
to it, a reduction ``ceil(log2 fan_in)`` (a binomial tree; every other rank forwards one
partial sum), so lanes win from a fan-in of about 4 and gather below; ties go to the integer
sum, then lanes.

The leader of the gather path adds the children's *codes* (``level + s``, each up to ``2s``)
before removing the offsets, so its accumulator holds ``2 fan_in s``
(:attr:`LayerWire.accumulator_nbytes`).

A secure layer (pairwise masking, :mod:`hflmpi.core.secure`) always takes the integer sum and
sends residues modulo ``2^w`` with ``w = masked_modulus_bits(bits, fan_in)``, the fewest bits
that hold the signed group sum. Residues lie in ``[0, 2^w)``, so their sum reaches
``fan_in (2^w - 1)``: the container is the smallest signed integer that holds *that*
(:func:`masked_container_nbytes`), so the MPI sum never overflows and hflmpi never depends on
how an MPI library treats integer overflow (Open MPI 5 saturates 8- and 16-bit sums instead of
wrapping). It can be one size wider than the plain sum's container; the payload counts it.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

__all__ = [
    "MAX_BITS",
    "SCALE_NBYTES",
    "Method",
    "METHOD_NAMES",
    "LayerWire",
    "check_bits",
    "check_bucket_size",
    "levels_for_bits",
    "auto_bucket_size",
    "resolve_bucket_size",
    "num_buckets",
    "packed_nbytes",
    "scale_nbytes",
    "container_nbytes",
    "masked_modulus_bits",
    "masked_container_nbytes",
    "lane_width",
    "lanes_per_word",
    "lane_words",
    "levels_downlink_nbytes",
    "choose_downlink",
    "choose_method",
    "layer_wire",
    "bytes_ratio",
]

MAX_BITS = 16
"""Widest supported quantizer, in bits per element."""

SCALE_NBYTES = 4
"""Bytes of one bucket scale (float32)."""

_CONTAINERS = (1, 2, 4, 8)  # int8, int16, int32, int64
_METHOD_ARGS = ("auto", "sum", "gather", "lanes")
_DOWNLINK_ARGS = ("auto", "float32", "levels")
WORD_BITS = 64
"""Bits of one lane word (an unsigned 64-bit integer)."""


class Method(enum.IntEnum):
    """How a layer's uplink travels; the integers are what the run record stores per layer."""

    NONE = 0
    INTEGER_SUM = 1
    GATHER = 2
    LANES = 3

    @property
    def label(self) -> str:
        """Return the name written in reports: ``"none"``, ``"integer-sum"``, ``"gather"``, ``"lanes"``."""
        return self.name.lower().replace("_", "-")


METHOD_NAMES = tuple(m.label for m in Method)
"""``("none", "integer-sum", "gather", "lanes")``, indexed by :class:`Method`."""


def _check_int(name: str, value: int, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name}={value!r} must be an integer >= {low}")
    return int(value)


def check_bits(bits: int) -> int:
    """Validate a quantizer width and return it as an ``int``.

    Raises
    ------
    ValueError
        If ``bits`` is not an integer in ``[1, 16]``.
    """
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= MAX_BITS:
        raise ValueError(
            f"quantizer bits={bits!r} is not supported: use an integer in [1, {MAX_BITS}] "
            "(1 = stochastic sign, 2..16 = 2**(bits-1)-1 levels per sign), or no quantization"
        )
    return int(bits)


def check_bucket_size(bucket_size: int) -> int:
    """Validate a bucket size (``>= 1``) and return it as an ``int``."""
    if isinstance(bucket_size, bool) or not isinstance(bucket_size, int) or bucket_size < 1:
        raise ValueError(f"bucket_size={bucket_size!r} must be an integer >= 1")
    return int(bucket_size)


def levels_for_bits(bits: int) -> int:
    """Return ``s``, the largest level magnitude of a ``bits``-wide quantizer.

    ``s = 2**(bits-1) - 1`` for ``2 <= bits <= 16`` (levels ``[-s, s]``); ``s = 1`` for
    ``bits == 1`` (the sign grid ``{-1, +1}``, no level 0).

    Raises
    ------
    ValueError
        If ``bits`` is outside ``[1, 16]``.
    """
    bits = check_bits(bits)
    return 1 if bits == 1 else (1 << (bits - 1)) - 1


def auto_bucket_size(bits: int) -> int:
    """Return the default bucket size for ``bits``: the power of two ``>= 4096 / bits``.

    One float32 scale per bucket then costs ``32 / (bits * B) <= 0.8%`` of the packed payload
    (512 at 8 bits, 1024 at 4, 2048 at 2, 4096 at 1, 256 at 16), keeping the wire within 2% of
    ``bits / 32`` of float32 even with the scales exchanged by every participant. Smaller
    buckets lower the variance bound (``min(B/s^2, sqrt(B)/s)``) at the price of more scales.
    """
    bits = check_bits(bits)
    size = 1
    while size * bits < 4096:
        size *= 2
    return size


def resolve_bucket_size(bits: int, bucket_size: int = 0) -> int:
    """Return ``bucket_size``, or :func:`auto_bucket_size` when it is 0 (the config's "auto")."""
    if bucket_size == 0:
        return auto_bucket_size(bits)
    return check_bucket_size(bucket_size)


def num_buckets(numel: int, bucket_size: int) -> int:
    """Return ``ceil(numel / bucket_size)``, the number of scales for ``numel`` elements."""
    bucket_size = check_bucket_size(bucket_size)
    numel = _check_int("numel", numel, 0)
    return -(-numel // bucket_size)


def packed_nbytes(numel: int, bits: int) -> int:
    """Return the bytes that ``numel`` bit-packed ``bits``-wide codes take: ``ceil(numel bits / 8)``."""
    bits = check_bits(bits)
    numel = _check_int("numel", numel, 0)
    return (numel * bits + 7) // 8


def scale_nbytes(numel: int, bucket_size: int) -> int:
    """Return the bytes of the float32 scales of ``numel`` elements: ``4 ceil(numel / B)``."""
    return SCALE_NBYTES * num_buckets(numel, bucket_size)


def container_nbytes(bits: int, fan_in: int) -> int:
    """Return the bytes (1, 2, 4 or 8) of the smallest signed integer that holds ``fan_in * s``.

    A sum of ``fan_in`` levels lies in ``[-fan_in s, fan_in s]``.

    Raises
    ------
    OverflowError
        If even a 64-bit integer cannot hold ``fan_in * s``.
    """
    s = levels_for_bits(bits)
    fan_in = _check_int("fan_in", fan_in, 1)
    largest = fan_in * s
    for size in _CONTAINERS:
        if largest <= (1 << (8 * size - 1)) - 1:
            return size
    raise OverflowError(
        f"a sum of fan_in={fan_in} {bits}-bit levels reaches {largest} = fan_in*s (s={s}), "
        f"beyond int64 (max {(1 << 63) - 1}); use fewer bits or smaller groups"
    )


def masked_modulus_bits(bits: int, fan_in: int) -> int:
    """Return ``w``, the modulus bits of a secure layer: the fewest that hold its signed sum.

    The sum of ``fan_in`` levels lies in ``[-fan_in s, fan_in s]``, inside
    ``[-2^(w-1), 2^(w-1))`` for ``w = bit_length(fan_in s) + 1``
    (:func:`hflmpi.core.secure.required_modulus_bits`).
    """
    fan_in = _check_int("fan_in", fan_in, 1)
    return (fan_in * levels_for_bits(bits)).bit_length() + 1


def masked_container_nbytes(bits: int, fan_in: int) -> int:
    """Return the bytes of the smallest signed integer that holds ``fan_in (2^w - 1)``.

    That is the largest sum of ``fan_in`` masked residues in ``[0, 2^w)``
    (``w = masked_modulus_bits(bits, fan_in)``), so a secure layer's integer sum never overflows;
    every partial sum is smaller still (residues are non-negative).

    Raises
    ------
    OverflowError
        If even a 64-bit integer cannot hold it.
    """
    w = masked_modulus_bits(bits, fan_in)
    largest = fan_in * ((1 << w) - 1)
    for size in _CONTAINERS:
        if largest <= (1 << (8 * size - 1)) - 1:
            return size
    raise OverflowError(
        f"a secure sum of fan_in={fan_in} residues modulo 2^{w} reaches {largest}, beyond int64; "
        "use fewer bits or smaller groups"
    )


def lane_width(bits: int, fan_in: int) -> int:
    """Return ``L``, the bits of one lane: the fewest that hold a sum of ``fan_in`` codes.

    A code is ``level + s`` in ``[0, 2s]``, so the sum lies in ``[0, 2 fan_in s]`` and
    ``L = bit_length(2 fan_in s)`` (``bits + ceil(log2 fan_in)`` for ``bits >= 2``).

    Raises
    ------
    OverflowError
        If one lane would not fit a 64-bit word.
    """
    fan_in = _check_int("fan_in", fan_in, 1)
    width = (2 * fan_in * levels_for_bits(bits)).bit_length()
    if width > WORD_BITS:
        raise OverflowError(
            f"a lane for the sum of fan_in={fan_in} {bits}-bit codes needs {width} bits, more "
            f"than a {WORD_BITS}-bit word; use fewer bits or smaller groups"
        )
    return width


def lanes_per_word(bits: int, fan_in: int) -> int:
    """Return ``k = floor(64 / L)``, the lanes of one 64-bit word (:func:`lane_width`)."""
    return WORD_BITS // lane_width(bits, fan_in)


def lane_words(numel: int, bits: int, fan_in: int) -> int:
    """Return the 64-bit words that hold ``numel`` lanes: ``ceil(numel / k)``."""
    numel = _check_int("numel", numel, 0)
    return -(-numel // lanes_per_word(bits, fan_in))


def levels_downlink_nbytes(numel: int, bits: int, fan_in: int, bucket_size: int) -> int:
    """Return the bytes of a ``"levels"`` downlink: the level sum in lanes plus the scales.

    ``8 lane_words(numel, bits, fan_in) + 4 ceil(numel / B)``: enough for every member to
    rebuild ``anchor + level_sum * scale / s`` exactly as the leader computed it.
    """
    bucket = resolve_bucket_size(bits, bucket_size)
    return 8 * lane_words(numel, bits, fan_in) + scale_nbytes(numel, bucket)


def choose_downlink(numel: int, bits: int, fan_in: int, bucket_size: int = 0,
                    downlink: str = "auto", itemsize: int = 4) -> str:
    """Return what a layer's leader broadcasts down: ``"float32"`` (the model) or ``"levels"``.

    ``"auto"`` takes ``"levels"`` on a quantized layer when it is smaller than the model
    (``numel * itemsize`` bytes), ``"float32"`` otherwise and on exact layers; ``"levels"``
    on an exact layer is an error.

    Raises
    ------
    ValueError
        If ``downlink`` is not ``"auto"``, ``"float32"`` or ``"levels"``, or asks for levels
        on an exact layer.
    """
    if downlink not in _DOWNLINK_ARGS:
        raise ValueError(
            f"quantize.downlink={downlink!r} must be 'auto', 'float32' or 'levels'")
    if bits == 0:
        if downlink == "levels":
            raise ValueError("quantize.downlink='levels' needs a quantized layer (bits > 0)")
        return "float32"
    if downlink != "auto":
        return downlink
    levels = levels_downlink_nbytes(numel, bits, fan_in, bucket_size)
    return "levels" if levels < numel * itemsize else "float32"


def _leader_inbound(method: Method, numel: int, bits: int, fan_in: int) -> int:
    """Return the bytes into the leader: ``fan_in - 1`` payloads, or ``ceil(log2 fan_in)`` sums.

    A gather brings every other participant's payload; a binomial-tree reduction brings one
    partial sum per round.
    """
    hops = (fan_in - 1).bit_length()
    if method == Method.GATHER:
        return (fan_in - 1) * packed_nbytes(numel, bits)
    if method == Method.LANES:
        return hops * 8 * lane_words(numel, bits, fan_in)
    return hops * numel * container_nbytes(bits, fan_in)


def choose_method(numel: int, bits: int, fan_in: int, method: str = "auto") -> Method:
    """Return how a quantized layer's levels travel.

    ``"sum"``, ``"gather"`` and ``"lanes"`` force :attr:`Method.INTEGER_SUM`,
    :attr:`Method.GATHER` and :attr:`Method.LANES`; ``"auto"`` picks the one whose bytes into
    the leader are fewest (:func:`_leader_inbound`; the same scales are exchanged by all), ties
    going to the integer sum, then lanes.

    Raises
    ------
    ValueError
        If ``method`` is not ``"auto"``, ``"sum"``, ``"gather"`` or ``"lanes"``.
    """
    if method not in _METHOD_ARGS:
        raise ValueError(
            f"quantize.method={method!r} must be 'auto', 'sum', 'gather' or 'lanes'")
    if method != "auto":
        return {"sum": Method.INTEGER_SUM, "gather": Method.GATHER,
                "lanes": Method.LANES}[method]
    candidates = [Method.INTEGER_SUM, Method.LANES, Method.GATHER]
    return min(candidates, key=lambda m: _leader_inbound(m, numel, bits, fan_in))


@dataclass(frozen=True)
class LayerWire:
    """The traffic of one aggregation of one layer (bytes per participant, not totals).

    Attributes
    ----------
    numel, bits, fan_in : int
        Entries aggregated, quantizer width (0 = exact) and participants of the layer group.
    bucket_size : int
        Entries per scale (the resolved value; 0 for exact layers).
    method : Method
        How the uplink travels.
    payload_nbytes : int
        Bytes every non-leader participant sends up (the leader's own share stays local).
    scale_nbytes : int
        Bytes every participant contributes to the scales' ``MAX`` allreduce (0 if exact).
    downlink_nbytes : int
        Bytes the leader broadcasts back down when the layer tops an aggregation: the model,
        or the level sum in lanes plus the scales (:func:`levels_downlink_nbytes`).
    accumulator_nbytes : int
        Element size of the leader's level accumulator, also the integer-sum path's container
        (0 if exact).
    modulus_bits : int
        ``w`` of a secure layer, whose participants send residues modulo ``2^w`` in that
        container (0 if not secure).
    """

    numel: int
    bits: int
    fan_in: int
    bucket_size: int
    method: Method
    payload_nbytes: int
    scale_nbytes: int
    downlink_nbytes: int
    accumulator_nbytes: int
    modulus_bits: int = 0

    @property
    def uplink_nbytes(self) -> int:
        """Return the layer group's uplink bytes: ``(fan_in - 1) payload + fan_in scales``.

        This is what the run record's ``/metrics/bytes_sent`` sums over a group's ranks.
        """
        return (self.fan_in - 1) * self.payload_nbytes + self.fan_in * self.scale_nbytes


def layer_wire(
    numel: int, bits: int, fan_in: int, bucket_size: int = 0, method: str = "auto",
    itemsize: int = 4, secure: bool = False, downlink: str = "float32",
) -> LayerWire:
    """Return the :class:`LayerWire` of one layer.

    Parameters
    ----------
    numel : int
        Entries of the model.
    bits : int
        Quantizer width, 0 (exact) or 1..16.
    fan_in : int
        Participants of the layer group (its leader included).
    bucket_size : int
        Entries per scale; 0 picks :func:`auto_bucket_size`.
    method : {"auto", "sum", "gather", "lanes"}
        The config's ``quantize.method`` (see :func:`choose_method`).
    itemsize : int
        Bytes of one model value (4 for float32, 8 for float64): the exact payload and the
        float32 downlink.
    secure : bool
        Masked levels (:mod:`hflmpi.core.secure`): the integer sum of residues in the
        :func:`masked_container_nbytes` container; needs ``method`` ``"auto"`` or ``"sum"``.
    downlink : {"float32", "levels", "auto"}
        What the leader broadcasts when this layer is the top of an aggregation
        (:func:`choose_downlink`); sizes :attr:`LayerWire.downlink_nbytes`.
    """
    numel = _check_int("numel", numel, 0)
    fan_in = _check_int("fan_in", fan_in, 1)
    itemsize = _check_int("itemsize", itemsize, 1)
    if bits == 0:
        choose_downlink(numel, 0, fan_in, downlink=downlink)
        model = numel * itemsize
        return LayerWire(numel, 0, fan_in, 0, Method.NONE, model, 0, model, 0)
    bucket = resolve_bucket_size(bits, bucket_size)
    down = numel * itemsize
    if choose_downlink(numel, bits, fan_in, bucket, downlink, itemsize) == "levels":
        down = levels_downlink_nbytes(numel, bits, fan_in, bucket)
    if secure:
        if method not in ("auto", "sum"):
            choose_method(numel, bits, fan_in, method)  # an unknown name says so first
            raise ValueError("secure aggregation masks integer sums: it needs method='sum'")
        container = masked_container_nbytes(bits, fan_in)
        return LayerWire(numel, bits, fan_in, bucket, Method.INTEGER_SUM, numel * container,
                         scale_nbytes(numel, bucket), down, container,
                         masked_modulus_bits(bits, fan_in))
    chosen = choose_method(numel, bits, fan_in, method)
    accumulator = container_nbytes(bits, fan_in)
    if chosen == Method.INTEGER_SUM:
        payload = numel * accumulator
    elif chosen == Method.LANES:
        payload = 8 * lane_words(numel, bits, fan_in)
    else:
        accumulator = container_nbytes(bits, 2 * fan_in)  # codes reach 2s before the offsets go
        payload = packed_nbytes(numel, bits)
    return LayerWire(numel, bits, fan_in, bucket, chosen, payload, scale_nbytes(numel, bucket),
                     down, accumulator)


def bytes_ratio(bits: int, bucket_size: int = 0) -> float:
    """Return the wire bytes of a ``bits``-bit payload relative to float32: ``bits/32 + 1/B``.

    ``bits`` packed bits per entry plus one float32 scale per bucket of ``B`` entries (``B = 0``
    picks :func:`auto_bucket_size`); ``bits = 0`` (exact) gives 1. This is the large-``numel``
    limit of ``(payload_nbytes + scale_nbytes) / (4 numel)`` of :func:`layer_wire` on the gather
    path (``"auto"`` takes it for groups of two or three; lanes and integer sums move a few
    bits more per entry); the tau planner and the experiments scale float32 aggregation times
    by it.
    """
    if bits == 0:
        return 1.0
    bits = check_bits(bits)
    return bits / 32 + 1 / resolve_bucket_size(bits, bucket_size)
