"""Run the schedule of a buffered (FedBuff) layer-1 node: train at dispatch, apply at each flush.

:func:`hflmpi.core.buffered.node_schedule` gives, the same on every rank, when each participant
downloads the node's model and which updates each flush applies with which staleness. This
module carries it out on the ranks that hold the node's clients:

* at a ``train`` event the rank owning the client trains it ``tau_1`` steps from the node's model
  of that moment and keeps its update ``d = x_trained - x_downloaded`` until the flush that
  applies it (one update per busy client, plus the K - 1 waiting in an unfilled buffer);
* at a ``flush`` event the node applies ``x <- x + sum_i a_i d_i``, ``a_i = lr w_i (1 + s_i)^-a /
  sum_j w_j`` over the buffer (FedBuff divides by the undiscounted total, so stale updates make
  the step smaller, not just re-mixed). An exact layer sums ``a_i d_i`` in float64 (locally, then
  ``Allreduce`` over a spanning node's communicator: ranks with no update in the buffer add
  zeros) and rounds ``x + sum`` once; a quantized layer rounds each ``a_i d_i`` on the buckets'
  shared MAX scale with its own stream keyed by (seed, client, period * 65536 + upload index,
  layer 1) and adds the integer levels, so its bits do not depend on the placement.

Every rank of a spanning node meets the same flushes in the same order, and a rank visits its
nodes in ascending order, so the collectives match without any other agreement.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
from mpi4py import MPI

from hflmpi.core.buffered import NodeSchedule, discount
from hflmpi.core.packing import packed_nbytes
from hflmpi.core.quantize import bucket_absmax, from_level_sum, new_workspace, num_buckets, to_levels
from hflmpi.core.rng import torch_generator
from hflmpi.core.wire import SCALE_NBYTES, levels_for_bits
from hflmpi.mpi.population import PopulationAggregator, PopulationStats

__all__ = ["BufferedNodes", "NodeWork", "UPLOAD_KEYS"]

UPLOAD_KEYS = 65536
"""Uploads of one client in one period that get distinct quantizer streams."""


@dataclass
class NodeWork:
    """What this rank did for the buffered nodes in one period.

    Attributes
    ----------
    losses, samples : dict of int
        Per client trained here: the summed mean losses of its trainings, the samples, and
        ``trainings`` the number of trainings.
    in_flight : int
        The most updates this rank held at once (kept until their flush).
    """

    losses: dict[int, float] = field(default_factory=dict)
    samples: dict[int, int] = field(default_factory=dict)
    trainings: dict[int, int] = field(default_factory=dict)
    in_flight: int = 0


class BufferedNodes:
    """The buffered layer-1 nodes this rank takes part in.

    Parameters
    ----------
    aggregator : PopulationAggregator
        Holds the node models and the layer-1 communicator of the spanning node.
    train : callable
        ``train(client, start) -> (model, mean loss, samples)``: ``tau_1`` steps from ``start``.
    exponent : float
        ``a`` of the staleness discount.
    server_lr : float
        FedBuff's server learning rate.
    """

    def __init__(self, aggregator: PopulationAggregator,
                 train: Callable[[int, torch.Tensor], tuple[torch.Tensor, float, int]],
                 exponent: float, server_lr: float) -> None:
        self.agg = aggregator
        self.train = train
        self.exponent = float(exponent)
        self.server_lr = float(server_lr)
        self.bits = aggregator.bits[0]
        self.bucket = aggregator.bucket_sizes[0]
        self._workspace = new_workspace(aggregator.numel, aggregator.device) if self.bits else None

    def run(self, k: int, schedule: NodeSchedule, weights: np.ndarray, period: int,
            work: NodeWork, stats: PopulationStats) -> None:
        """Carry out node ``k``'s schedule (every rank holding clients of ``k``, same order).

        ``weights`` are the clients' data weights; ``period`` numbers the period in the run
        (keys the quantizer streams).
        """
        agg, plan = self.agg, self.agg.plan
        model = agg.models[1][k]
        sub = agg.comms[1] if plan.spans(1, k) else None
        held: dict[int, torch.Tensor] = {}
        for kind, index in schedule.events:
            if kind == "train":
                upload = schedule.uploads[index]
                if plan.placement.rank_of[upload.client] != agg.rank:
                    continue
                trained, loss, samples = self.train(upload.client, model)
                held[index] = trained - model
                c = upload.client
                work.losses[c] = work.losses.get(c, 0.0) + loss
                work.samples[c] = work.samples.get(c, 0) + samples
                work.trainings[c] = work.trainings.get(c, 0) + 1
                work.in_flight = max(work.in_flight, len(held))
                continue
            flush = schedule.flushes[index]
            clients = [schedule.uploads[u].client for u in flush.uploads]
            w = np.asarray(weights, dtype=np.float64)[clients]
            shares = self.server_lr * w * discount(flush.staleness, self.exponent) / w.sum()
            mine = [(u, float(a)) for u, a in zip(flush.uploads, shares) if u in held]
            updates = [(schedule.uploads[u], a, held.pop(u)) for u, a in mine]
            keys = [period * UPLOAD_KEYS + up.index for up, _, _ in updates]
            if any(up.index >= UPLOAD_KEYS for up, _, _ in updates):
                raise ValueError(f"a client uploaded more than {UPLOAD_KEYS} times in one period")
            if self.bits:
                self._apply_quantized(model, [(up.client, key, a, d) for (up, a, d), key
                                              in zip(updates, keys)], sub, stats)
            else:
                total = torch.zeros(agg.numel, dtype=torch.float64, device=agg.device)
                for _, a, d in updates:
                    total.add_(d.to(torch.float64), alpha=a)
                if sub is not None:
                    _allreduce(sub, total, MPI.SUM, stats)
                model.copy_(model.to(torch.float64) + total)
                stats.client_bytes[0] += len(updates) * agg.numel * 4

    def _apply_quantized(self, model: torch.Tensor,
                         updates: list[tuple[int, int, float, torch.Tensor]],
                         sub: MPI.Comm | None, stats: PopulationStats) -> None:
        agg, bits, bucket = self.agg, self.bits, self.bucket
        s = levels_for_bits(bits)
        diffs = [(d.to(torch.float32) * a) for _, _, a, d in updates]
        scales = torch.zeros(num_buckets(agg.numel, bucket), dtype=torch.float32,
                             device=agg.device)
        for d in diffs:
            torch.maximum(scales, bucket_absmax(d, bucket), out=scales)
        if not bool(torch.isfinite(scales).all()):
            scales.fill_(float("inf"))  # MAX keeps +inf: every rank of the node fails together
        if sub is not None:
            _allreduce(sub, scales, MPI.MAX, stats)
        if not bool(torch.isfinite(scales).all()):
            raise FloatingPointError("a buffered update holds NaN or Inf; check the learning "
                                     "rate and the data of its clients")
        level_sum = torch.zeros(agg.numel, dtype=torch.int64, device=agg.device)
        for (client, key, _, _), d in zip(updates, diffs):
            generator = torch_generator(agg.seed, purpose="quantize-buffered", rank=client,
                                        round=key, layer=1, device=agg.device)
            level_sum.add_(to_levels(d, scales, s, generator, bucket_size=bucket,
                                     sign=bits == 1, workspace=self._workspace))
        if sub is not None:
            _allreduce(sub, level_sum, MPI.SUM, stats)
        update = from_level_sum(level_sum, scales, s, bucket_size=bucket)
        model.copy_(model + update.to(model.dtype))
        per_child = packed_nbytes(agg.numel, bits) + scales.numel() * SCALE_NBYTES
        stats.client_bytes[0] += len(updates) * per_child


def _allreduce(sub: MPI.Comm, tensor: torch.Tensor, op: Any, stats: PopulationStats) -> None:
    host = tensor.cpu() if tensor.device.type != "cpu" else tensor
    sub.Allreduce(MPI.IN_PLACE, host.numpy(), op=op)
    if host is not tensor:
        tensor.copy_(host)
    stats.mpi_bytes[0] += tensor.numel() * tensor.element_size()


def empty_stats(depth: int) -> PopulationStats:
    """Return zero counts for ``depth`` layers."""
    return PopulationStats([0.0] * depth, [0.0] * depth, [math.nan] * depth)
