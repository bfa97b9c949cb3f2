"""Nested weighted aggregation over the tree: reduce up to the leaders, broadcast back down.

A layer-n aggregation (QMLHFL, arXiv 2505.08145, Eq. (3)-(5)) replaces the model of every device
under a layer-n node with

    x_new = x + sum_c a_c * Q_n(x_c - x),    a_c = W_c / W_node,

applied layer by layer from 1 to n (children aggregate first), where ``W`` is the weight of a
subtree (samples held, or device count). With ``Q = identity`` the nesting collapses::

    x_new = sum_c a_c x_c = sum_{r in subtree} (w_r / W_node) x_r,

because the children's weights are the sums of their own children's. Full-precision layers
therefore need one weighted-sum collective over the subtree, whatever the depth. Each device
first learns ``W_node`` (an 8-byte allreduce), scales its model by ``w_r / W_node`` in one pass,
and then one of two algorithms sums the scaled models:

* ``"subtree"``: one ``Allreduce`` over the subtree communicator. It moves the same bytes as a
  flat Allreduce.
* ``"tree"``: ``Reduce`` to each layer's leader, layer by layer, then ``Bcast`` down, layer by
  layer. This is the literal tree (and the shape the quantized layers use).

Weights are re-read at every aggregation, so a device whose weight is zero (a dropped client)
simply leaves the average. The raw weight also rides in the last slot of the wire buffer, which
makes the subtree total visible in the result for checking. Buffers are allocated once;
collectives use the upper-case buffer API with ``MPI.IN_PLACE``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Literal

import torch
from mpi4py import MPI

from hflmpi.comm import LayerComms, cuda_aware_mpi
from hflmpi.transport import MpiBuffer

__all__ = ["AggregationStats", "HierarchicalAggregator"]

Algorithm = Literal["subtree", "tree"]


@dataclass
class AggregationStats:
    """What one aggregation cost this rank, per layer (index 0 is layer 1).

    Attributes
    ----------
    seconds : list of float
        Wall time this rank spent in each layer's collectives.
    bytes_sent : list of int
        Payload bytes this rank contributed to each layer's uplink (0 at a leader, whose own
        contribution stays local, and at ranks that do not join the layer).
    """

    seconds: list[float] = field(default_factory=list)
    bytes_sent: list[int] = field(default_factory=list)


class HierarchicalAggregator:
    """Weighted aggregation of one flat model buffer over a :class:`LayerComms` tree.

    Parameters
    ----------
    comms : LayerComms
        Communicators of this rank.
    numel : int
        Number of model parameters.
    dtype : torch.dtype
        ``torch.float32`` or ``torch.float64``.
    device : torch.device or str
        Where the buffer lives (``"cpu"`` or a CUDA device).
    algorithm : {"subtree", "tree"}
        How full-precision aggregation is carried out (see the module docstring).

    Attributes
    ----------
    flat : torch.Tensor
        The model, a view of the first ``numel`` slots of the wire buffer. Bind the model's
        parameters to it (:mod:`hflmpi.flat`) so training and aggregation share memory.
    """

    def __init__(
        self,
        comms: LayerComms,
        numel: int,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        algorithm: Algorithm = "subtree",
    ) -> None:
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"dtype={dtype} is not supported; use torch.float32 or torch.float64")
        if algorithm not in ("subtree", "tree"):
            raise ValueError(f"algorithm={algorithm!r} must be 'subtree' or 'tree'")
        if numel < 1:
            raise ValueError(f"numel={numel} must be >= 1")
        self.comms = comms
        self.numel = numel
        self.algorithm: Algorithm = algorithm
        self._wire = torch.zeros(numel + 1, dtype=dtype, device=device)
        self.flat = self._wire[:numel]
        self._mpi = MpiBuffer(self._wire, cuda_aware_mpi())

    @property
    def depth(self) -> int:
        """Number of aggregation layers of the tree."""
        return self.comms.depth

    def aggregate(self, layer: int, weight: float) -> AggregationStats:
        """Aggregate layers ``1..layer`` and leave the result in :attr:`flat` on every subtree device.

        Collective over the layer-``layer`` subtree communicator: every device of the subtree
        must call it with the same ``layer``.

        Parameters
        ----------
        layer : int
            Highest layer to aggregate (``depth`` = global aggregation at the root).
        weight : float
            This device's weight ``w_r`` (samples held, or 1 for uniform weighting); 0 drops the
            device from this aggregation.

        Returns
        -------
        AggregationStats
            Per-layer seconds and uplink bytes of this rank for layers ``1..layer``.

        Raises
        ------
        ValueError
            If ``layer`` is out of range, ``weight`` is negative or not finite, or the whole
            subtree has zero weight (raised on every rank of the subtree, after the collective).
        """
        if not 1 <= layer <= self.depth:
            raise ValueError(f"layer={layer} is outside 1..{self.depth}")
        if not weight >= 0 or weight == float("inf"):
            raise ValueError(f"weight={weight} must be finite and >= 0")
        start = time.perf_counter()
        # all ranks of the subtree: learn W_node first (8 bytes), so the model is scaled by
        # w / W_node in one pass and the big collective needs no division afterwards.
        total = self.comms.subtree(layer).allreduce(float(weight), op=MPI.SUM)
        if not total > 0:
            raise ValueError(
                f"layer-{layer} aggregation over a subtree whose devices all have weight 0 "
                "(every client dropped?)"
            )
        share = weight / total
        if share != 1.0:
            self.flat.mul_(share)
        self._wire[self.numel] = weight
        prepare_seconds = time.perf_counter() - start
        if self.algorithm == "subtree":
            stats = self._subtree_allreduce(layer)
        else:
            stats = self._tree_reduce_bcast(layer)
        stats.seconds[layer - 1] += prepare_seconds
        return stats

    def broadcast(self, layer: int | None = None) -> None:
        """Copy the layer-``layer`` leader's model to every device of its subtree (collective).

        Used to start all devices from rank 0's initial model (``layer = depth``).
        """
        layer = self.depth if layer is None else layer
        comm = self.comms.subtree(layer)
        buf = self._mpi.outbound(copy=comm.Get_rank() == 0)
        comm.Bcast(buf, root=0)
        self._mpi.inbound()

    def _subtree_allreduce(self, layer: int) -> AggregationStats:
        comm = self.comms.subtree(layer)
        start = time.perf_counter()
        buf = self._mpi.outbound()
        comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)
        self._mpi.inbound()
        seconds = time.perf_counter() - start
        # Accounting: the whole exchange is charged to the top layer, as one uplink per device.
        stats = AggregationStats([0.0] * layer, [0] * layer)
        stats.seconds[layer - 1] = seconds
        stats.bytes_sent[layer - 1] = 0 if comm.Get_rank() == 0 else self._mpi.nbytes
        return stats

    def _tree_reduce_bcast(self, layer: int) -> AggregationStats:
        stats = AggregationStats([0.0] * layer, [0] * layer)
        buf = self._mpi.outbound()
        for n in range(1, layer + 1):
            if not self.comms.joins(n):
                continue
            start = time.perf_counter()
            comm = self.comms.layer(n)
            if comm.Get_rank() == 0:
                comm.Reduce(MPI.IN_PLACE, buf, op=MPI.SUM, root=0)
            else:
                comm.Reduce(buf, None, op=MPI.SUM, root=0)
                stats.bytes_sent[n - 1] = self._mpi.nbytes
            stats.seconds[n - 1] += time.perf_counter() - start
        for n in range(layer, 0, -1):
            if not self.comms.joins(n):
                continue
            start = time.perf_counter()
            self.comms.layer(n).Bcast(buf, root=0)
            stats.seconds[n - 1] += time.perf_counter() - start
        self._mpi.inbound()
        return stats
