"""The simulated clock of a population: when each update arrives, when each node closes, who is late.

Every rank computes the same clock from the device profiles (:mod:`hflmpi.core.devices`), the
cohort and the schedule, so the order of arrivals, and with it the result, is reproducible bit
for bit on any machine (the FedScale idea). Times are simulated seconds; nothing here is measured.

A node's model is *ready* at some time (the run starts with every model ready at 0). For a
layer-1 period, participant ``c`` of layer-1 node ``k`` (ready at ``R_k``) downloads the model,
trains ``tau_1`` steps and uploads its update, which arrives at::

    A_c = R_k + L_c + tau_1 * step_seconds_c + L_c,     L_c = bytes_1 / uplink_c + latency_c

(the downlink is taken as long as the uplink: symmetric links, same payload). A node of layer
``n`` in mode

* ``"sync"`` closes at the latest arrival among its taking-part children;
* ``"deadline"`` closes at ``min(latest arrival, R_k + deadline_n)``.

A child arriving after the close is *late*: its update is dropped, the node renormalises over
the children that arrived, and a node where nothing arrived keeps its model. Each update carries
a weight: a client its own (samples or 1); a node the sum of the weights of the children that
arrived at it at least once since its model last came from above (so the nested mean over the
arrived updates is the flat weighted mean over the clients behind them). A node carrying weight
0 takes no part in its parent's aggregation. A layer-``n`` node's aggregate arrives at its
parent at ``close + bytes_{n+1} / node_uplink_n + node_latency_n``. When layers ``1..top``
have closed, the top nodes' models go back down, each hop taking as long as its uplink; a late
client or node abandons its work when the new model reaches it. A round ends when the root
closes.

With ``late = "carry"`` on a deadline layer 1 a late client keeps working instead: it is *busy*
until its update arrives, does not start the node's next period, and its update joins the first
close of its node at or after its arrival (a busy client's arrival counts among the node's
latest arrivals, so the node waits for it up to its deadline), with staleness ``s`` = the
node's closes it missed. When a layer above closes, the node's model comes from above and the
updates still held are abandoned (counted in :attr:`PeriodEvents.abandoned`).

Pure: numpy only (no torch, so the config can import :data:`MODES`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Sequence

import numpy as np

from hflmpi.core.wire import SCALE_NBYTES, num_buckets, packed_nbytes

if TYPE_CHECKING:  # the config imports MODES; keep it free of torch
    from hflmpi.core.devices import DeviceProfiles
    from hflmpi.core.population import PopulationPlan

__all__ = ["LATE", "MODES", "PeriodEvents", "SimulatedClock", "carried_weights", "message_bytes"]

MODES = ("sync", "deadline", "buffered")
"""Per-layer aggregation modes the clock knows (``"buffered"``: :mod:`hflmpi.core.buffered`)."""

LATE = ("drop", "carry")
"""What a deadline layer does with a late update: drop it, or carry it into a later close."""


def message_bytes(numel: int, bits: Sequence[int], bucket_sizes: Sequence[int]) -> list[float]:
    """Return, per layer ``1..N``, the bytes of one child's message into that layer.

    A quantized layer sends packed levels plus one scale per bucket, an exact one the float32
    model: what :class:`hflmpi.mpi.population.PopulationAggregator` counts as a client's uplink.
    """
    return [float(packed_nbytes(numel, b) + num_buckets(numel, size) * SCALE_NBYTES) if b
            else float(numel * 4) for b, size in zip(bits, bucket_sizes)]


def carried_weights(plan: PopulationPlan, weights: list[np.ndarray],
                    carried: Sequence[np.ndarray], n: int) -> list[np.ndarray]:
    """Return ``weights`` as layer ``n``'s aggregation sees them when some children were late.

    Layer ``n - 1`` takes ``carried[n - 1]`` (0 for a late child) and each layer-``n`` node the
    sum over its children (the expression of :func:`hflmpi.mpi.population.node_weights`); a
    late child still aggregated its own children with its own weight.
    """
    below = np.asarray(carried[n - 1], dtype=np.float64)
    layer = list(weights)
    layer[n - 1] = below
    layer[n] = np.array([below[list(plan.children(n, k))].sum()
                         for k in range(plan.node_count(n))])
    return layer


@dataclass
class PeriodEvents:
    """What one layer-1 period (and the layers closing with it) did on the clock.

    Attributes
    ----------
    carried : list of ndarray
        Per layer ``0..N-1``, the weight each node's update carried into its parent's
        aggregation in this period (0: late, or nothing to send; unchanged above the top).
    late : ndarray
        Per layer ``1..N``, the number of children that arrived after their node closed.
    late_clients : ndarray
        Per client, whether its update missed its layer-1 node's close.
    time : float
        The simulated time at which the top closing layer's models are ready.
    started : ndarray
        Per client, whether it took part and started this period from its node's model (with
        ``late = "drop"``: every participant).
    held : ndarray
        Per client, whether its update missed this close and is held for a later one (carry).
    applied : list of (int, int)
        The held updates this close applied: (client, staleness), ascending client.
    abandoned : int
        Held updates dropped because a layer above closed.
    """

    carried: list[np.ndarray]
    late: np.ndarray
    late_clients: np.ndarray
    time: float
    started: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))
    held: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))
    applied: list[tuple[int, int]] = field(default_factory=list)
    abandoned: int = 0


class SimulatedClock:
    """Per-node simulated times of a population, advanced one layer-1 period at a time.

    Parameters
    ----------
    plan : PopulationPlan
        The tree of clients.
    tau1 : int
        Local steps per layer-1 period.
    profiles : DeviceProfiles
        Every client's compute and link.
    modes : sequence of str
        Per layer, ``"sync"`` or ``"deadline"``.
    deadlines : sequence of float
        Per layer, seconds after a node's model is ready at which a ``"deadline"`` node closes
        (ignored for ``"sync"`` layers).
    payload : sequence of float
        Per layer ``1..N``, the bytes of one child's message into the layer
        (:func:`message_bytes`).
    node_uplink, node_latency : sequence of float
        Per layer ``1..N-1``, bytes per second and seconds of a node's link to its parent.
    start : float
        Simulated time at which the root's model is ready (0 for a new run; a resumed run's
        last round end).
    late : sequence of str
        Per layer, ``"drop"`` or ``"carry"`` (:data:`LATE`); only layer 1's is read (empty:
        drop).
    """

    def __init__(self, plan: PopulationPlan, tau1: int, profiles: DeviceProfiles,
                 modes: Sequence[str], deadlines: Sequence[float], payload: Sequence[float],
                 node_uplink: Sequence[float], node_latency: Sequence[float],
                 start: float = 0.0, late: Sequence[str] = ()) -> None:
        depth = plan.depth
        if not (len(modes) == len(deadlines) == len(payload) == depth):
            raise ValueError(f"modes, deadlines and payload need {depth} entries each")
        if not (len(node_uplink) == len(node_latency) == depth - 1):
            raise ValueError(f"node_uplink and node_latency need {depth - 1} entries each")
        bad = [m for m in modes if m not in MODES]
        if bad:
            raise ValueError(f"unknown clock mode {bad[0]!r}; one of {MODES}")
        if profiles.clients != plan.clients:
            raise ValueError(f"{profiles.clients} device profiles for {plan.clients} clients")
        self.depth = depth
        self.tau1 = int(tau1)
        self.profiles = profiles
        self.modes = list(modes)
        self.deadlines = [float(d) if m == "deadline" else math.inf
                          for m, d in zip(modes, deadlines)]
        self.client_link = profiles.link_seconds(payload[0])
        # node_link[n]: seconds for a layer-n node's message to its parent (n = 1..N-1)
        self.node_link = [0.0] + [payload[n] / node_uplink[n - 1] + node_latency[n - 1]
                                  for n in range(1, depth)]
        self.parents = [np.array([plan.parent(n, k) for k in range(plan.node_count(n))],
                                 dtype=np.int64) for n in range(depth)]
        self.counts = [plan.node_count(n) for n in range(depth + 1)]
        self.ready: list[np.ndarray] = [np.zeros(0)] + [np.zeros(self.counts[n])
                                                        for n in range(1, depth + 1)]
        self.closed: list[np.ndarray] = [np.zeros(0)] + [np.zeros(self.counts[n])
                                                         for n in range(1, depth + 1)]
        # carried[n]: the weight a layer-n node would carry up now; sent[n]: the weight each
        # layer-n node delivered to its parent since the parent's model last came from above
        self.carried = [np.zeros(self.counts[n]) for n in range(depth + 1)]
        self.sent = [np.zeros(self.counts[n]) for n in range(depth + 1)]
        self.carry = bool(late) and late[0] == "carry"
        if self.carry and (self.modes[0] != "deadline" or depth < 2):
            raise ValueError("late = \"carry\" needs a deadline layer 1 under a layer above")
        # carry: busy[c] while client c's late update is on its way; it arrives at pending[c]
        # and was started at layer-1 close number since[c]
        self.busy = np.zeros(self.counts[0], dtype=bool)
        self.pending = np.zeros(self.counts[0])
        self.since = np.zeros(self.counts[0], dtype=np.int64)
        self.closes = 0
        self.reset(start)

    @property
    def time(self) -> float:
        """Return the simulated time at which the root's current model was ready."""
        return float(self.ready[self.depth][0])

    def reset(self, time: float) -> None:
        """Make the root's model ready at ``time`` and send it down to every node."""
        self.ready[self.depth][:] = time
        self.closed[self.depth][:] = time
        self._send_down(self.depth)
        for n in range(self.depth + 1):
            self.carried[n][:] = 0.0
            self.sent[n][:] = 0.0
        self.busy[:] = False
        self.closes = 0

    def period(self, top: int, weights: Sequence[np.ndarray]) -> PeriodEvents:
        """Advance over one layer-1 period whose aggregation closes layers ``1..top``.

        Parameters
        ----------
        top : int
            The highest layer that closes at the end of the period.
        weights : sequence of ndarray
            Per layer ``0..N``, every node's weight this round
            (:func:`hflmpi.mpi.population.node_weights`); only the clients' (layer 0) are read.
        """
        depth = self.depth
        carried = [np.zeros(self.counts[n]) for n in range(depth)]
        late = np.zeros(depth, dtype=np.int64)
        self.carried[0] = np.asarray(weights[0], dtype=np.float64)
        taking = self.carried[0] > 0
        started = taking & ~self.busy
        arrival = (self.ready[1][self.parents[0]] + 2 * self.client_link
                   + self.tau1 * self.profiles.step_seconds)
        if not self.carry:
            late_clients = self._close_layers(1, top, arrival, carried, late)
            return PeriodEvents(carried, late, late_clients, self._open_below(top), started)
        busy = self.busy.copy()
        arrival = np.where(busy, self.pending, arrival)
        late_clients = self._close_layers(1, top, arrival, carried, late)  # taking & not arrived
        held = late_clients & ~busy
        applied = busy & (carried[0] > 0)
        late[0] = int(np.count_nonzero(held))  # each late update counts once, when it first misses
        events = PeriodEvents(carried, late, held, 0.0, started, held,
                              [(int(c), int(self.closes - self.since[c]))
                               for c in np.flatnonzero(applied)])
        self.busy = (busy & ~applied) | held
        self.pending = np.where(held, arrival, self.pending)
        self.since = np.where(held, self.closes, self.since)
        self.closes += 1
        if top > 1:  # the node's model comes from above: the updates still held are abandoned
            events.abandoned = int(np.count_nonzero(self.busy))
            self.busy[:] = False
        events.time = self._open_below(top)
        return events

    def buffered_period(self, top: int, closed: np.ndarray, weights: np.ndarray,
                        dropped: int) -> PeriodEvents:
        """Advance over one layer-2 period whose layer-1 nodes are buffered.

        Parameters
        ----------
        top : int
            The highest layer that closes at the end of the period (>= 2).
        closed : ndarray
            Per layer-1 node, the time of its last flush (its ready time without a flush).
        weights : ndarray
            Per layer-1 node, the weight it carries up: its clients with an applied update.
        dropped : int
            Updates still in flight at the nodes' last flushes (counted as late at layer 1).
        """
        depth = self.depth
        carried = [np.zeros(self.counts[n]) for n in range(depth)]
        late = np.zeros(depth, dtype=np.int64)
        late[0] = dropped
        self.closed[1][:] = closed
        self.carried[1] = np.asarray(weights, dtype=np.float64)
        self._close_layers(2, top, np.zeros(0), carried, late)
        return PeriodEvents(carried, late, np.zeros(self.counts[0], dtype=bool),
                            self._open_below(top))

    def _close_layers(self, first: int, top: int, arrival: np.ndarray, carried: list[np.ndarray],
                      late: np.ndarray) -> np.ndarray:
        """Close layers ``first..top``; fill ``carried`` and ``late``; return the late clients."""
        late_clients = np.zeros(self.counts[0], dtype=bool)
        for n in range(first, top + 1):
            if n > 1:
                arrival = self.closed[n - 1] + self.node_link[n - 1]
            taking = self.carried[n - 1] > 0
            on_time = self._close(n, taking, arrival)
            carried[n - 1] = np.where(on_time, self.carried[n - 1], 0.0)
            late[n - 1] = int(np.count_nonzero(taking & ~on_time))
            if n == 1:
                late_clients = taking & ~on_time
            self.sent[n - 1] = np.where(on_time, self.carried[n - 1], self.sent[n - 1])
            sums = np.zeros(self.counts[n])
            np.add.at(sums, self.parents[n - 1], self.sent[n - 1])
            self.carried[n] = sums
        return late_clients

    def _open_below(self, top: int) -> float:
        """Send the models of layer ``top`` down; return when the top's models were ready."""
        # the nodes below the top now take their model from above
        for n in range(1, top):
            self.sent[n - 1][:] = 0.0
            self.carried[n][:] = 0.0
        self.ready[top][:] = self.closed[top]
        self._send_down(top)
        return float(self.ready[top].max())

    def _close(self, n: int, taking: np.ndarray, arrival: np.ndarray) -> np.ndarray:
        """Close every layer-``n`` node; return which children arrived in time."""
        parents = self.parents[n - 1]
        latest = np.full(self.counts[n], -math.inf)
        np.maximum.at(latest, parents[taking], arrival[taking])
        opened = self.ready[n]
        close = np.where(np.isfinite(latest), np.minimum(latest, opened + self.deadlines[n - 1]),
                         opened)
        self.closed[n][:] = close
        return taking & (arrival <= close[parents])

    def _send_down(self, top: int) -> None:
        """Set the ready time of every node below ``top`` from its parent's, one hop down."""
        for n in range(top - 1, 0, -1):
            self.ready[n][:] = self.ready[n + 1][self.parents[n]] + self.node_link[n]
