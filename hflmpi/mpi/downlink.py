"""The integer downlink: a quantized layer's leader broadcasts the level sum, not the model.

After the up-loop of a layer-``n`` aggregation, the layer's leader holds

    x_new = x_n + from_level_sum(L, m) = x_n + L * (m / s)   (per bucket),

with ``x_n`` the anchor (the model every device of the subtree received at the last layer-``n``
aggregation, or at the start), ``L`` the group's exact integer level sum and ``m`` the shared
scales. Instead of ``x_new`` in float32, :class:`LevelsDownlink` broadcasts ``L`` in lanes of
``bit_length(2 fan_in s)`` bits (:mod:`hflmpi.core.lanes`, offset ``fan_in s``) followed by
the float32 scales, down the same layer communicators the float32 model takes (layer ``n``,
then ``n - 1``, ..., 1). Every device of the subtree, the leader included, then rebuilds
``x_new`` from the anchor with the same elementwise operations (exact conversions, one float32
multiply per element, one add), so all of them hold the same bits as the float32 broadcast
would have given them.

That needs every device of the layer-``n`` subtree to hold ``x_n``: a device keeps one anchor
per levels-downlink layer above the ones it joins (the layers it joins share their quantized
layer's anchor). :class:`hflmpi.mpi.aggregate.HierarchicalAggregator` resets them all with the
layers' own anchors: after every layer-``n`` aggregation, after :meth:`broadcast` and on resume.

Only a bare quantized layer broadcasts levels: where the leader changes the aggregate after
dequantization (central DP noise, a server optimizer; a robust rule is never quantized), the
model itself goes down in float32. A privacy layer keeps float32 in both DP modes (distributed
noise would allow levels; the safe choice keeps one rule).
"""

from __future__ import annotations

from typing import Sequence

import torch
from mpi4py import MPI

from hflmpi.core.lanes import LaneFormat, pack_lanes, unpack_lanes
from hflmpi.core.quantize import from_level_sum, integer_dtype
from hflmpi.core.wire import (
    SCALE_NBYTES,
    Method,
    choose_downlink,
    container_nbytes,
    levels_for_bits,
    num_buckets,
    resolve_bucket_size,
)
from hflmpi.mpi.comm import LayerComms
from hflmpi.mpi.layers import Layer, LayerOptions, QuantizedLayer
from hflmpi.mpi.transport import MpiBuffer

__all__ = ["LevelsDownlink", "Downlinks"]

_CHUNK = 1 << 20  # entries rebuilt per pass (rounded to whole buckets): small scratch buffers


class LevelsDownlink:
    """The levels downlink of one layer on one device of the layer's subtree.

    Parameters
    ----------
    numel : int
        Model size.
    bits, bucket_size : int
        The layer's quantizer width and (resolved) bucket size.
    fan_in : int
        Participants of this device's layer group (the top group of the aggregation).
    anchor : Tensor
        The layer's anchor on this device (shared with its quantized layer where it joins it).
    cuda_aware : bool
        Whether MPI may read device memory directly.
    """

    def __init__(self, numel: int, bits: int, bucket_size: int, fan_in: int,
                 anchor: torch.Tensor, cuda_aware: bool) -> None:
        self.bits = bits
        self.s = levels_for_bits(bits)
        self.bucket_size = bucket_size
        self.fan_in = fan_in
        self.anchor = anchor
        self.lanes = LaneFormat(numel, bits, fan_in)
        words = self.lanes.nbytes
        scales = SCALE_NBYTES * num_buckets(numel, bucket_size)
        device = anchor.device
        self.payload = torch.empty(words + scales, dtype=torch.uint8, device=device)
        self._words = self.payload[:words].view(torch.int64)
        self._scales = self.payload[words:].view(torch.float32)
        self._mpi = MpiBuffer(self.payload, cuda_aware)
        chunk = max(1, _CHUNK // bucket_size) * bucket_size
        self._chunk = min(chunk, numel)
        self._scratch = torch.empty(min(self._chunk, self.lanes.words) if numel else 0,
                                    dtype=torch.int64, device=device)
        self._pack_scratch: torch.Tensor | None = None
        self._sums = torch.empty(self._chunk, dtype=integer_dtype(container_nbytes(bits, fan_in)),
                                 device=device)
        self._update = torch.empty(self._chunk, dtype=torch.float32, device=device)

    @property
    def nbytes(self) -> int:
        """Bytes of the broadcast payload: lane words plus float32 scales."""
        return self.payload.numel()

    def load(self, level_sum: torch.Tensor, scales: torch.Tensor,
             words: torch.Tensor | None = None) -> None:
        """At the top leader: put the group's level sum and the scales into the payload.

        ``words``: the lanes uplink's summed words, already this payload's lanes (the sum of
        ``fan_in`` codes ``level + s`` is ``level_sum + fan_in s``): copied, not repacked.
        """
        self._scales.copy_(scales)
        if words is not None:
            self._words.copy_(words)
            return
        if self._pack_scratch is None:
            self._pack_scratch = torch.empty(self.lanes.words, dtype=torch.int64,
                                             device=self.payload.device)
        pack_lanes(level_sum, self.lanes, self._words, offset=self.fan_in * self.s,
                   scratch=self._pack_scratch)

    def broadcast(self, comm: MPI.Comm) -> None:
        """Broadcast the payload from rank 0 of ``comm`` (a layer communicator)."""
        buf = self._mpi.outbound(copy=comm.Get_rank() == 0)
        comm.Bcast(buf, root=0)
        self._mpi.inbound()

    def rebuild(self, flat: torch.Tensor) -> None:
        """Write ``anchor + from_level_sum(level_sum, scales)`` into ``flat``, chunk by chunk.

        The same operations as the uplink's leader (:meth:`QuantizedUplink.exchange`), on
        bucket-aligned chunks: every one of them is elementwise, so the bits do not depend on
        the chunking.
        """
        numel, bucket = flat.numel(), self.bucket_size
        for start in range(0, numel, self._chunk):
            stop = min(start + self._chunk, numel)
            size = stop - start
            sums = self._sums[:size]
            unpack_lanes(self._words, self.lanes, sums, offset=self.fan_in * self.s,
                         scratch=self._scratch, start=start, stop=stop)
            scales = self._scales[start // bucket: -(-stop // bucket)]
            update = from_level_sum(sums, scales, self.s, out=self._update[:size],
                                    bucket_size=bucket)
            torch.add(self.anchor[start:stop], update.to(flat.dtype), out=flat[start:stop])


class Downlinks:
    """The levels downlinks of every layer whose subtree this device belongs to.

    Parameters
    ----------
    comms : LayerComms
        This rank's communicators (the plan gives the fan-in of each of its layer-``n`` groups).
    flat : Tensor
        The model buffer.
    options : sequence of LayerOptions
        Per layer, how it aggregates.
    layers : dict
        This rank's layer objects by layer (the ones it joins).
    mode : {"auto", "float32", "levels"}
        ``quantize.downlink``: ``"levels"`` on every bare quantized layer, ``"auto"`` where that
        is smaller than the model (:func:`hflmpi.core.wire.choose_downlink`), ``"float32"``
        never.
    cuda_aware : bool
        Whether MPI may read device memory directly.
    """

    def __init__(self, comms: LayerComms, flat: torch.Tensor, options: Sequence[LayerOptions],
                 layers: dict[int, Layer], mode: str, cuda_aware: bool) -> None:
        choose_downlink(1, 1, 1, downlink=mode)  # validates the name
        self.comms = comms
        self.layers = layers
        self.by_layer: dict[int, LevelsDownlink] = {}
        plan, numel = comms.plan, flat.numel()
        for n, option in enumerate(options, start=1):
            fan_in = len(plan.participants(n, plan.node_of(comms.rank, n)))
            if not _bare_quantized(option) or choose_downlink(
                    numel, option.bits, fan_in, option.bucket_size,
                    mode, flat.element_size()) != "levels":
                continue
            joined = layers.get(n)
            if joined is not None and joined.comm.Get_size() != fan_in:
                raise RuntimeError(f"layer {n}: the plan's fan-in {fan_in} is not the "
                                   f"communicator's {joined.comm.Get_size()}")
            anchor = joined.anchor if joined is not None else None
            if anchor is None:
                anchor = flat.detach().clone()
            bucket = resolve_bucket_size(option.bits, option.bucket_size)
            self.by_layer[n] = LevelsDownlink(numel, option.bits, bucket, fan_in, anchor,
                                              cuda_aware)

    def anchors(self) -> dict[int, torch.Tensor]:
        """Return the anchors this device keeps for the levels downlinks, by layer."""
        return {n: d.anchor for n, d in self.by_layer.items()}

    def down(self, layer: int, flat: torch.Tensor, received: list[int]) -> bool:
        """Send the layer-``layer`` aggregate down as levels and rebuild it on every device.

        Collective over the layer's subtree, layer communicators from ``layer`` down to 1.
        Returns False (and does nothing) when this layer's downlink is the float32 model.
        ``received[n - 1]`` gains the payload bytes this rank received at layer ``n``.
        """
        downlink = self.by_layer.get(layer)
        if downlink is None:
            return False
        top = self.layers.get(layer)
        if top is not None and top.is_leader:
            assert isinstance(top, QuantizedLayer)
            uplink = top.uplink
            words = uplink.lane_sums if uplink.method == Method.LANES else None
            downlink.load(uplink.level_sum, uplink.scales, words)
        for n in range(layer, 0, -1):
            if self.comms.joins(n):
                comm = self.comms.layer(n)
                downlink.broadcast(comm)
                if comm.Get_rank() != 0:
                    received[n - 1] += downlink.nbytes
        downlink.rebuild(flat)
        return True


def _bare_quantized(option: LayerOptions) -> bool:
    """Whether the leader's aggregate is exactly ``anchor + from_level_sum`` (nothing after)."""
    return option.bits > 0 and option.privacy is None and not option.server_step
