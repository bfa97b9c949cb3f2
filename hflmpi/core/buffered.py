"""The event schedule of a buffered (FedBuff) layer-1 node on the simulated clock.

FedBuff (Nguyen et al., "Federated Learning with Buffered Asynchronous Aggregation", AISTATS
2022, Algorithm 1): the participants of a node train asynchronously; the node applies a buffer
as soon as ``K`` updates have arrived, each discounted by its staleness. Here the arrivals come
from the device profiles only, so every rank computes the same schedule up front (docs/async.md).

For one period of the layer above (``flushes`` applications of the buffer), a node whose model
is ready at ``R``:

* every participant ``c`` downloads the node's current model (version ``v``) at ``R``, trains
  ``tau_1`` steps and uploads; its update arrives ``duration_c = 2 L_c + tau_1 step_c`` later;
* an arrival joins the buffer; when the buffer holds ``K`` updates the node applies it (its
  version goes up by one) and every update in it has staleness ``s = version - v``;
* after its arrival (and the flush it may complete) the client downloads the current model and
  starts again, until the node has applied ``flushes`` buffers; updates still in flight then are
  dropped (the model from above replaces the node's).

Ties in time go to the lower client id. Pure: numpy and the standard library only.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

__all__ = ["Flush", "NodeSchedule", "Upload", "discount", "node_schedule"]


@dataclass(frozen=True)
class Upload:
    """One download-train-upload of a client.

    Attributes
    ----------
    client : int
        The client.
    index : int
        Its uploads before this one in the period (0, 1, ...).
    version : int
        The node's version the client downloaded (buffers applied before its download).
    dispatch, arrival : float
        Simulated times of the download and of the update's arrival at the node.
    """

    client: int
    index: int
    version: int
    dispatch: float
    arrival: float


@dataclass(frozen=True)
class Flush:
    """One application of the buffer: the uploads in it (ids into ``uploads``) and their staleness."""

    time: float
    uploads: tuple[int, ...]
    staleness: tuple[int, ...]


@dataclass
class NodeSchedule:
    """What one buffered node does in a period, in causal order.

    Attributes
    ----------
    uploads : list of Upload
        Every upload that the node applies (dropped ones are not listed).
    events : list of (str, int)
        ``("train", upload id)`` at the upload's dispatch and ``("flush", flush id)``, in the
        order they happen (a flush at time ``t`` comes before a download at ``t``).
    flushes : list of Flush
        The buffers applied, in order.
    dropped : int
        Updates in flight when the last buffer was applied.
    close : float
        Time of the last flush (the node's ready time when it has no participant).
    """

    uploads: list[Upload] = field(default_factory=list)
    events: list[tuple[str, int]] = field(default_factory=list)
    flushes: list[Flush] = field(default_factory=list)
    dropped: int = 0
    close: float = 0.0

    def applied_clients(self) -> list[int]:
        """Return the clients with at least one applied update, ascending."""
        return sorted({self.uploads[u].client for f in self.flushes for u in f.uploads})


def discount(staleness: Sequence[int] | np.ndarray, exponent: float) -> np.ndarray:
    """Return the FedBuff staleness discount ``(1 + s) ** -exponent`` (float64)."""
    return (1.0 + np.asarray(staleness, dtype=np.float64)) ** -float(exponent)


def node_schedule(ready: float, clients: Sequence[int], durations: Sequence[float], buffer: int,
                  flushes: int) -> NodeSchedule:
    """Return the schedule of one buffered node over one period of the layer above.

    Parameters
    ----------
    ready : float
        Simulated time at which the node's model is ready.
    clients : sequence of int
        The node's participants this round (any order).
    durations : sequence of float
        Per participant (same order), seconds from download to arrival: ``2 L_c + tau_1 step_c``.
    buffer : int
        ``K``, updates per application; taken as ``min(K, len(clients))``.
    flushes : int
        Buffers to apply in the period.
    """
    out = NodeSchedule(close=float(ready))
    if not clients or flushes < 1:
        return out
    if buffer < 1:
        raise ValueError(f"buffer={buffer} must be >= 1")
    size = min(int(buffer), len(clients))
    duration = {int(c): float(d) for c, d in zip(clients, durations)}
    count = {c: 0 for c in duration}
    heap: list[tuple[float, int, int]] = []
    pending: list[Upload] = []  # every dispatched upload; the applied ones are kept at the end
    order: list[tuple[str, int]] = []
    version = 0

    def dispatch(client: int, time: float) -> None:
        upload = Upload(client, count[client], version, time, time + duration[client])
        count[client] += 1
        order.append(("train", len(pending)))
        heapq.heappush(heap, (upload.arrival, client, len(pending)))
        pending.append(upload)

    for client in sorted(duration):
        dispatch(client, float(ready))
    arrived: list[int] = []
    raw: list[tuple[float, list[int]]] = []
    while len(raw) < flushes:
        time, client, uid = heapq.heappop(heap)
        arrived.append(uid)
        if len(arrived) == size:
            raw.append((time, arrived))
            order.append(("flush", len(raw) - 1))
            version += 1
            arrived = []
        if len(raw) < flushes:
            dispatch(client, time)
    out.dropped = len(heap)
    applied = sorted(u for _, ids in raw for u in ids)
    new_id = {u: i for i, u in enumerate(applied)}
    out.uploads = [pending[u] for u in applied]
    for time, ids in raw:
        out.flushes.append(Flush(time, tuple(new_id[u] for u in ids),
                                 tuple(len(out.flushes) - pending[u].version for u in ids)))
    out.events = [(kind, new_id[i]) if kind == "train" else (kind, i) for kind, i in order
                  if kind == "flush" or i in new_id]
    out.close = raw[-1][0]
    return out
