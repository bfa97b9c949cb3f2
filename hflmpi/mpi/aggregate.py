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

Any other layer (quantized, robust, private: :mod:`hflmpi.mpi.layers`) needs the nested form:
one up-loop in which each layer's object sends its participant's contribution to the leader
(e.g. ``Q_n(a_c (x_c - x))``, :mod:`hflmpi.mpi.uplink`), layer by layer, then the top leader's
model is broadcast down, layer by layer (a bare quantized top layer sends its level sum and
scales instead, :mod:`hflmpi.mpi.downlink`). The ``"tree"`` algorithm is that same up-loop over exact
layers fed the pre-scaled model (``a_c = 1``: they only sum), and the same broadcast down. Each
participant keeps the anchor ``x`` of every such layer it takes part in (the model at that
layer's last aggregation).

Weights are re-read at every aggregation, so a device whose weight is zero (a dropped client)
simply leaves the average. The model buffer is aggregated in place (no copies on the CPU);
collectives use the upper-case buffer API with ``MPI.IN_PLACE``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Literal, Sequence

import torch
from mpi4py import MPI

from hflmpi.core.layer_rules import check_layer_options
from hflmpi.core.robust import RULES, max_byzantine
from hflmpi.core.server_opt import ServerOptimizer, ServerOptOptions
from hflmpi.core.strategy import AggregationRule, rule_name
from hflmpi.core.wire import METHOD_NAMES, Method
from hflmpi.mpi.comm import LayerComms, cuda_aware_mpi
from hflmpi.mpi.divergence import measure_divergences
from hflmpi.mpi.downlink import Downlinks
from hflmpi.mpi.guard import NonFiniteUpdateError, all_finite, handshake, handshake_key
from hflmpi.mpi.layers import (
    Layer,
    LayerFailedError,
    LayerOptions,
    PrivacyOptions,
    ServerOptLayer,
    build_layer,
    check_caps,
    rule_params,
)
from hflmpi.mpi.messages import allreduce_float, allreduce_int, bcast_text
from hflmpi.mpi.transport import MpiBuffer

__all__ = [
    "AggregationStats",
    "HierarchicalAggregator",
    "LayerFailedError",
    "PrivacyOptions",
    "measure_divergences",
    "METHOD_NAMES",
]


Algorithm = Literal["subtree", "tree"]

_FAILURE_BYTES = 8192  # a leader's failure text, shared with its subtree


@dataclass
class AggregationStats:
    """What one aggregation cost this rank, per layer (index 0 is layer 1).

    Attributes
    ----------
    seconds : list of float
        Wall time this rank spent in each layer's collectives.
    bytes_sent : list of int
        Uplink bytes this rank sent in each layer: its payload (0 at a leader, whose own
        contribution stays local, and at ranks that do not join the layer) plus, on quantized
        layers, its share of the scales exchange.
    quant_error : list of float
        ``||Q(d) - d||^2 / ||d||^2`` of this rank's quantized update per layer (NaN where it
        was not measured, not quantized, or this rank did not take part).
    methods : list of int
        Index into :data:`METHOD_NAMES` of how each layer's uplink travelled.
    bytes_received : list of int
        Downlink bytes this rank received from each layer's leader: the model, or the level sum
        and scales (:mod:`hflmpi.mpi.downlink`); 0 where it leads or does not join the layer.
    """

    seconds: list[float] = field(default_factory=list)
    bytes_sent: list[int] = field(default_factory=list)
    quant_error: list[float] = field(default_factory=list)
    methods: list[int] = field(default_factory=list)
    dropped: list[int] = field(default_factory=list)
    bytes_received: list[int] = field(default_factory=list)

    @classmethod
    def empty(cls, layers: int) -> "AggregationStats":
        """Return zeroed stats for ``layers`` layers."""
        return cls([0.0] * layers, [0] * layers, [math.nan] * layers, [0] * layers, [],
                   [0] * layers)


class HierarchicalAggregator:
    """Weighted aggregation of one flat model buffer over a :class:`LayerComms` tree.

    Parameters
    ----------
    comms : LayerComms
        Communicators of this rank.
    flat : torch.Tensor
        The model as one contiguous 1-D float32/float64 tensor (CPU or CUDA), aggregated in
        place. Bind the model's parameters to it (:func:`hflmpi.learn.flat.flatten_parameters`) so
        training and aggregation share memory and nothing is copied.
    algorithm : {"subtree", "tree"}
        How full-precision aggregation is carried out (see the module docstring).
    bits : sequence of int, optional
        Uplink quantizer width per layer (0 = exact); default exact everywhere.
    bucket_size : int
        Elements per quantization scale; 0 picks :func:`~hflmpi.core.wire.auto_bucket_size`
        per layer.
    seed : int
        Run seed; quantization noise is keyed by (seed, rank, step, layer).
    method : {"auto", "sum", "gather", "lanes"}
        Transport of quantized levels (see :mod:`hflmpi.mpi.uplink`).
    downlink : {"auto", "float32", "levels"}
        What a quantized layer's leader broadcasts down: the float32 model, or the level sum
        and scales every device rebuilds it from (:mod:`hflmpi.mpi.downlink`).
    robust : sequence of str or AggregationRule, optional
        Rule per layer from :data:`hflmpi.core.robust.RULES`, or a plug-in object
        (:class:`hflmpi.core.strategy.AggregationRule`); anything but ``"mean"`` gathers the
        children's full-precision updates to the leader (such a layer must not be quantized).
    robust_params : dict, optional
        Parameters of the rules (``trim``, ``f``, ``m``). A rule that would tolerate no
        Byzantine child at a layer's fan-in (``trim`` below ``1/k``, ``median`` of 2, ``krum``
        with ``f = 0``) is an error.
    weight_caps : sequence of float, optional
        Per device (rank of ``comms.comm``), the largest weight it can honestly claim (its
        sample count, known to every rank from the partition). Robust layers never trust a
        claimed weight: the leader clamps each child's claim to the sum of the caps over that
        child's subtree, and reports the clamped sum upward. Default: 1 per device, so robust
        layers weigh children by their device count.
    secure : sequence of bool, optional
        Per layer: mask the integer levels pairwise (Diffie-Hellman pair keys) so the leader
        learns only the group sum. Needs a quantized layer; forces the integer-sum transport.
    allow_small_secure_groups : bool
        Accept secure layers with groups of 2 participants, where the leader learns its
        partner's update exactly from the sum (an error otherwise).
    privacy : PrivacyOptions, optional
        Clip and noise the uplink of one layer.
    server_opt : sequence of ServerOptOptions or None, optional
        Per layer, a server optimizer its leaders apply to the aggregate
        (:mod:`hflmpi.core.server_opt`); None or name "none" keeps the aggregate.
    signature : int
        Hash of the model layout, checked by the pre-collective handshake.
    nonfinite : {"raise", "drop"}
        What a NaN/Inf in a device's model does: raise on every rank, or drop that device from
        the aggregation (weight 0) and report it in :attr:`AggregationStats.dropped`.
    """

    def __init__(
        self,
        comms: LayerComms,
        flat: torch.Tensor,
        *,
        algorithm: Algorithm = "subtree",
        bits: Sequence[int] | None = None,
        bucket_size: int = 0,
        seed: int = 0,
        method: str = "auto",
        robust: Sequence[str | AggregationRule] | None = None,
        robust_params: dict[str, float] | None = None,
        weight_caps: Sequence[float] | None = None,
        secure: Sequence[bool] | None = None,
        allow_small_secure_groups: bool = False,
        privacy: PrivacyOptions | None = None,
        server_opt: Sequence[ServerOptOptions | None] | None = None,
        signature: int = 0,
        nonfinite: str = "raise",
        downlink: str = "auto",
    ) -> None:
        if flat.dtype not in (torch.float32, torch.float64):
            raise ValueError(f"dtype={flat.dtype} is not supported; use torch.float32 or torch.float64")
        if flat.dim() != 1 or not flat.is_contiguous() or flat.numel() < 1:
            raise ValueError("the model buffer must be a non-empty contiguous 1-D tensor")
        if algorithm not in ("subtree", "tree"):
            raise ValueError(f"algorithm={algorithm!r} must be 'subtree' or 'tree'")
        self.comms = comms
        self.flat = flat
        self.numel = flat.numel()
        self.algorithm: Algorithm = algorithm
        self.bits = [0] * comms.depth if bits is None else [int(b) for b in bits]
        if len(self.bits) != comms.depth:
            raise ValueError(f"bits={self.bits} needs one entry per layer ({comms.depth})")
        self.seed = seed
        self.robust: list[Any] = ["mean"] * comms.depth if robust is None else list(robust)
        self.server_opt = [None] * comms.depth if server_opt is None else list(server_opt)
        self.robust_params = dict(robust_params or {})
        self.secure = [False] * comms.depth if secure is None else [bool(x) for x in secure]
        self.allow_small_secure_groups = bool(allow_small_secure_groups)
        self.weight_caps = check_caps(weight_caps, comms.comm.Get_size())
        self.privacy = privacy
        self.signature = signature
        if nonfinite not in ("raise", "drop"):
            raise ValueError(f"nonfinite={nonfinite!r} must be 'raise' or 'drop'")
        self.nonfinite = nonfinite
        self._validate_layers(method)
        cuda_aware = cuda_aware_mpi()
        self._mpi = MpiBuffer(flat, cuda_aware)
        options = [
            LayerOptions(
                bits=self.bits[n - 1], bucket_size=bucket_size, method=method,
                secure=self.secure[n - 1], rule=self.robust[n - 1],
                rule_params=rule_params(self.robust[n - 1], self.robust_params), seed=seed,
                privacy=privacy if privacy is not None and privacy.layer == n else None,
                server_opt=self.server_opt[n - 1],
            ) for n in range(1, self.depth + 1)
        ]
        self._special = [o.special for o in options]
        self._layers: dict[int, Layer] = {
            n: build_layer(comms, n, flat, self._mpi, options[n - 1], self.weight_caps, cuda_aware)
            for n in range(1, self.depth + 1) if comms.joins(n)
        }
        self._anchors = {n: layer.anchor for n, layer in self._layers.items()
                         if layer.anchor is not None}
        self._downlinks = Downlinks(comms, flat, options, self._layers, downlink, cuda_aware)
        self._anchors.update(self._downlinks.anchors())

    def _validate_layers(self, method: str) -> None:
        """Refuse bad per-layer options on every rank, in the configuration's words.

        The rules are :func:`hflmpi.core.layer_rules.check_layer_options` (the ones the config
        applies), with this rank's own group sizes; then the robust rules' parameters.
        """
        depth = self.depth
        for name, values in (("robust", self.robust), ("secure", self.secure),
                             ("server_opt", self.server_opt)):
            if len(values) != depth:
                raise ValueError(f"{name}={values} needs one entry per layer ({depth})")
        for n, rule in enumerate(self.robust, start=1):
            if isinstance(rule, str) and rule not in RULES or not isinstance(
                    rule, (str, AggregationRule)):
                raise ValueError(f"robust rule {rule!r} at layer {n} is not one of {RULES} "
                                 "(nor a plug-in object with aggregate(updates, weights))")
        if self.privacy is not None and self.privacy.layer < 1:
            raise ValueError(f"privacy layer {self.privacy.layer} is outside 1..{depth}")
        fan_ins = [[self.comms.layer(n).Get_size()] if self.comms.joins(n) else []
                   for n in range(1, depth + 1)]
        check_layer_options(
            depth, self.bits, [rule_name(r) for r in self.robust], self.secure, method=method,
            privacy_layer=self.privacy.layer if self.privacy is not None else 0,
            group_sizes=fan_ins, trim=self.robust_params.get("trim", 0.2),
            krum_f=int(self.robust_params.get("f", 1)),
            allow_small_secure_groups=self.allow_small_secure_groups,
        )
        for n, rule in enumerate(self.robust, start=1):
            if rule in RULES[1:] and fan_ins[n - 1] and fan_ins[n - 1][0] > 1:
                # the parameters themselves (trim in [0, 0.5), krum's m, ...)
                max_byzantine(rule, fan_ins[n - 1][0], **rule_params(rule, self.robust_params))

    def methods(self) -> list[str]:
        """Return how each layer's uplink travels from this rank ("none" where exact or absent)."""
        return [METHOD_NAMES[self._layers[n].method if n in self._layers else Method.NONE]
                for n in range(1, self.depth + 1)]

    def server_optimizers(self) -> dict[int, ServerOptimizer]:
        """Return, by layer, the server optimizers of the layers this rank leads (their state)."""
        return {n: layer.optimizer for n, layer in self._layers.items()
                if isinstance(layer, ServerOptLayer) and layer.optimizer is not None}

    def reset_anchors(self, up_to: int | None = None) -> None:
        """Make the current model the anchor of layers ``1..up_to`` (all by default).

        Called after every aggregation of layer ``up_to``, and after a broadcast or resume.
        """
        for n, anchor in self._anchors.items():
            if up_to is None or n <= up_to:
                anchor.copy_(self.flat)

    @property
    def depth(self) -> int:
        """Number of aggregation layers of the tree."""
        return self.comms.depth

    def aggregate(
        self, layer: int, weight: float, *, step: int = 0, measure_error: bool = False
    ) -> AggregationStats:
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
        step : int
            Global step count; keys the quantization noise with (seed, rank, layer).
        measure_error : bool
            Measure each quantized uplink's relative error (one extra pass).

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
        dropped = self._check(layer, step)  # all ranks of the subtree: handshake + NaN check
        if self.comms.rank in dropped:
            weight = 0.0
            self.flat.zero_()  # finite, and weight 0 keeps it out of every sum
        # all ranks of the subtree: learn W_node first (8 bytes), so the model is scaled by
        # w / W_node in one pass and the big collective needs no division afterwards.
        total = allreduce_float(self.comms.subtree(layer), weight, MPI.SUM)
        if not math.isfinite(total):  # the same value on every rank, so every rank raises
            raise ValueError(
                f"layer-{layer} aggregation: the subtree's total weight is {total}; every weight "
                "must be finite and >= 0 (a rank sent a non-finite weight)"
            )
        if not total > 0:
            raise ValueError(
                f"layer-{layer} aggregation over a subtree whose devices all have weight 0 "
                "(every client dropped?)"
            )
        nested = any(self._special[:layer])
        if not nested:  # exact everywhere: scale by w / W_subtree once, then only sum
            share = weight / total
            if share != 1.0:
                self.flat.mul_(share)
        if nested or self.algorithm == "tree":
            stats, failure = self._up(layer, weight, step, measure_error, prescaled=not nested)
            if any(not isinstance(rule, str) or rule != "mean" for rule in self.robust[:layer]):
                self._share_failure(layer, failure, step)
            self._down(layer, stats)
        else:
            stats = self._subtree_allreduce(layer)
        stats.seconds[layer - 1] += time.perf_counter() - start - sum(stats.seconds)
        stats.dropped = dropped
        return stats

    def _check(self, layer: int, step: int) -> list[int]:
        """Handshake over the subtree; return the world ranks whose model is not finite."""
        comm = self.comms.subtree(layer)
        key = handshake_key(self.signature, self.numel, str(self.flat.dtype), step, layer)
        finite = all_finite(self.flat)
        what = f"layer-{layer} aggregation at step {step}"
        bad = handshake(comm, key, finite, what)
        if not bad:
            return []
        world = MPI.Group.Translate_ranks(comm.Get_group(), bad, self.comms.comm.Get_group())
        if self.nonfinite == "raise" or len(bad) == comm.Get_size():
            raise NonFiniteUpdateError(
                f"{what}: the model of rank(s) {list(world)} holds NaN or Inf (diverged? lower "
                "optim.lr); set run.nonfinite = \"drop\" to leave such devices out instead"
            )
        return [int(r) for r in world]

    def broadcast(self, layer: int | None = None) -> None:
        """Copy the layer-``layer`` leader's model to every device of its subtree (collective).

        Used to start all devices from rank 0's initial model (``layer = depth``).
        """
        layer = self.depth if layer is None else layer
        comm = self.comms.subtree(layer)
        buf = self._mpi.outbound(copy=comm.Get_rank() == 0)
        comm.Bcast(buf, root=0)
        self._mpi.inbound()
        self.reset_anchors(layer)

    def _up(
        self, layer: int, weight: float, step: int, measure_error: bool, *, prescaled: bool
    ) -> tuple[AggregationStats, str | None]:
        """Send this rank's model up layers ``1..layer``, as far as it takes part (the up-loop).

        Each layer learns ``W_node`` (an 8-byte allreduce over its participants) and its
        :class:`~hflmpi.mpi.layers.Layer` sends ``a_c`` times the child's model (or update) to
        the leader, who goes on to the next layer with the node's weight. With ``prescaled`` the
        model already holds ``(w_r / W_subtree) x_r`` (every layer exact): the layers only sum,
        with ``a_c = 1``, which is the tree algorithm.

        Returns the stats and the first failure a leader reported on this rank (or None).
        """
        stats = AggregationStats.empty(layer)
        child_weight = float(weight)
        failure: str | None = None
        for n in range(1, layer + 1):
            if not self.comms.joins(n):
                break
            start = time.perf_counter()
            node = self._layers[n]
            if prescaled:
                node_weight, share = child_weight, 1.0
            else:
                node_weight = allreduce_float(node.comm, child_weight, MPI.SUM)  # participants
                share = child_weight / node_weight if node_weight > 0 else 0.0
            result = node.up(share, child_weight, step, measure_error)
            stats.bytes_sent[n - 1] += result.bytes_sent
            stats.quant_error[n - 1] = result.quant_error
            stats.methods[n - 1] = int(result.method)
            if result.node_weight is not None:
                node_weight = result.node_weight  # the clamped sum goes up, never the claims
            failure = failure or result.failure
            stats.seconds[n - 1] += time.perf_counter() - start
            child_weight = node_weight
            if not node.is_leader:
                break
        return stats, failure

    def _share_failure(self, layer: int, failure: str | None, step: int) -> None:
        """Raise a leader's failure on every rank of the subtree (collective over it).

        A robust leader alone knows when its rule cannot combine the clamped weights; it goes
        on with the up-loop (so no collective is left waiting) and the subtree then learns the
        verdict in one small allreduce, before anyone waits in the broadcast down.
        """
        comm = self.comms.subtree(layer)
        size = comm.Get_size()
        first = allreduce_int(comm, comm.Get_rank() if failure is not None else size, MPI.MIN)
        if first == size:
            return
        what = f"layer-{layer} aggregation at step {step}: sharing a leader's failure"
        text = bcast_text(comm, failure, root=first, max_bytes=_FAILURE_BYTES, what=what)
        (world,) = MPI.Group.Translate_ranks(comm.Get_group(), [first], self.comms.comm.Get_group())
        raise LayerFailedError(
            f"layer-{layer} aggregation at step {step} failed at the leader on rank {world}: "
            f"{text}; every device of the subtree stops here (check the clients' weights and the "
            "robust rule's parameters against the groups left after drops)"
        )

    def _down(self, layer: int, stats: AggregationStats) -> None:
        """Broadcast the top leader's model (or its levels) down, layer by layer; reset anchors."""
        start = time.perf_counter()
        if self._downlinks.down(layer, self.flat, stats.bytes_received):
            stats.seconds[layer - 1] += time.perf_counter() - start
            self.reset_anchors(layer)
            return
        buf = self._mpi.outbound()
        for n in range(layer, 0, -1):
            if self.comms.joins(n):
                start = time.perf_counter()
                self.comms.layer(n).Bcast(buf, root=0)
                stats.seconds[n - 1] += time.perf_counter() - start
                if self.comms.layer(n).Get_rank() != 0:
                    stats.bytes_received[n - 1] += self._mpi.nbytes
        self._mpi.inbound()
        self.reset_anchors(layer)

    def _subtree_allreduce(self, layer: int) -> AggregationStats:
        comm = self.comms.subtree(layer)
        start = time.perf_counter()
        buf = self._mpi.outbound()
        comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)
        self._mpi.inbound()
        seconds = time.perf_counter() - start
        # Accounting: the whole exchange is charged to the top layer, as one uplink per device.
        stats = AggregationStats.empty(layer)
        stats.seconds[layer - 1] = seconds
        stats.bytes_sent[layer - 1] = 0 if comm.Get_rank() == 0 else self._mpi.nbytes
        return stats
