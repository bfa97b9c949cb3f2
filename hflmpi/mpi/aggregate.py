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

Quantized layers (``bits[n-1] > 0``) need the nested form: each layer's participants send
``Q_n(a_c (x_c - x))`` to their leader (:mod:`hflmpi.mpi.uplink`, exact integer sums), layer by layer,
and the top leader's model is broadcast down, layer by layer. Each participant keeps the anchor
``x`` of every quantized layer it takes part in (the model at that layer's last aggregation).

Weights are re-read at every aggregation, so a device whose weight is zero (a dropped client)
simply leaves the average. The model buffer is aggregated in place (no copies on the CPU);
collectives use the upper-case buffer API with ``MPI.IN_PLACE``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Literal

import math
from typing import Sequence

import numpy as np
import torch
from mpi4py import MPI

from hflmpi.mpi.comm import LayerComms, cuda_aware_mpi
from hflmpi.mpi.guard import NonFiniteUpdateError, handshake, handshake_key
from hflmpi.mpi.messages import allgather_bigint, allreduce_float
from hflmpi.core.privacy import clip_update, gaussian_noise, noise_std
from hflmpi.core.rng import torch_generator
from hflmpi.core.robust import RULES, max_byzantine, robust_update
from hflmpi.core.secure import MODP_2048_P, DiffieHellmanSeeds, dh_keypair
from hflmpi.core.wire import METHOD_NAMES, Method, auto_bucket_size
from hflmpi.mpi.transport import MpiBuffer
from hflmpi.mpi.uplink import QuantizedUplink

__all__ = [
    "AggregationStats",
    "HierarchicalAggregator",
    "PrivacyOptions",
    "measure_divergences",
    "METHOD_NAMES",
]


@dataclass(frozen=True)
class PrivacyOptions:
    """Client-level differential privacy at one layer: clip each child's update, add noise.

    Attributes
    ----------
    layer : int
        The layer whose uplink is privatised (1..N).
    clip : float
        L2 bound ``C`` on each child's update ``x_c - x``.
    noise_multiplier : float
        ``sigma``: noise std over the sensitivity ``C * max_c a_c``.
    mode : {"central", "distributed"}
        The leader adds the noise once, or every child adds its ``1/sqrt(k)`` share.
    insecure_reproducible_noise : bool
        Draw the noise from generators keyed by the run seed instead of the OS CSPRNG. Anyone
        who knows the seed can then regenerate the noise and subtract it: **no privacy at all**.
        For tests that need bit-for-bit reproducible DP runs only.
    """

    layer: int
    clip: float
    noise_multiplier: float
    mode: str = "central"
    insecure_reproducible_noise: bool = False

Algorithm = Literal["subtree", "tree"]


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
    """

    seconds: list[float] = field(default_factory=list)
    bytes_sent: list[int] = field(default_factory=list)
    quant_error: list[float] = field(default_factory=list)
    methods: list[int] = field(default_factory=list)
    dropped: list[int] = field(default_factory=list)

    @classmethod
    def empty(cls, layers: int) -> "AggregationStats":
        """Return zeroed stats for ``layers`` layers."""
        return cls([0.0] * layers, [0] * layers, [math.nan] * layers, [0] * layers, [])


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
    method : {"auto", "sum", "gather"}
        Transport of quantized levels (see :mod:`hflmpi.mpi.uplink`).
    robust : sequence of str, optional
        Rule per layer from :data:`hflmpi.core.robust.RULES`; anything but ``"mean"`` gathers the
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
        robust: Sequence[str] | None = None,
        robust_params: dict[str, float] | None = None,
        weight_caps: Sequence[float] | None = None,
        secure: Sequence[bool] | None = None,
        allow_small_secure_groups: bool = False,
        privacy: PrivacyOptions | None = None,
        signature: int = 0,
        nonfinite: str = "raise",
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
        self.robust = ["mean"] * comms.depth if robust is None else list(robust)
        self.robust_params = dict(robust_params or {})
        self.secure = [False] * comms.depth if secure is None else [bool(x) for x in secure]
        self.allow_small_secure_groups = bool(allow_small_secure_groups)
        self.weight_caps = _check_caps(weight_caps, comms.comm.Get_size())
        self.privacy = privacy
        self.signature = signature
        if nonfinite not in ("raise", "drop"):
            raise ValueError(f"nonfinite={nonfinite!r} must be 'raise' or 'drop'")
        self.nonfinite = nonfinite
        self._validate_layers()
        cuda_aware = cuda_aware_mpi()
        self._mpi = MpiBuffer(flat, cuda_aware)
        self._uplinks: dict[int, QuantizedUplink] = {}
        self._anchors: dict[int, torch.Tensor] = {}
        self._special = [self._is_special(n) for n in range(1, self.depth + 1)]
        for n, width in enumerate(self.bits, start=1):
            if not comms.joins(n):
                continue
            if width > 0:
                bucket = bucket_size or auto_bucket_size(width)
                seeds = self._pair_seeds(comms.layer(n)) if self.secure[n - 1] else None
                self._uplinks[n] = QuantizedUplink(
                    comms.layer(n), self.numel, width, bucket, flat.device, cuda_aware,
                    "sum" if seeds is not None else method, seeds=seeds,
                )
            if self._special[n - 1]:
                self._anchors[n] = flat.detach().clone()

    def _validate_layers(self) -> None:
        depth = self.depth
        for name, values in (("robust", self.robust), ("secure", self.secure)):
            if len(values) != depth:
                raise ValueError(f"{name}={values} needs one entry per layer ({depth})")
        for n, (rule, width, masked) in enumerate(zip(self.robust, self.bits, self.secure), start=1):
            if rule not in RULES:
                raise ValueError(f"robust rule {rule!r} at layer {n} is not one of {RULES}")
            if rule != "mean" and width > 0:
                raise ValueError(
                    f"layer {n} has robust={rule!r} and bits={width}: robust rules need every "
                    "child's full-precision update; set that layer's bits to 0"
                )
            if rule != "mean" and masked:
                raise ValueError(f"layer {n}: secure aggregation hides the updates a robust rule needs")
            if masked and width == 0:
                raise ValueError(f"layer {n}: secure aggregation masks quantized levels; set bits > 0")
            if rule != "mean" and self.comms.joins(n):
                fan_in = self.comms.layer(n).Get_size()
                params = _rule_params(rule, self.robust_params)
                if fan_in > 1 and max_byzantine(rule, fan_in, **params) < 1:
                    raise ValueError(
                        f"robust={rule!r} with {params or 'no parameters'} at layer {n} tolerates "
                        f"no Byzantine child among {fan_in} (it would silently act as a plain "
                        f"average); {_tolerance_fix(rule, fan_in)}"
                    )
            if masked and self.comms.joins(n) and self.comms.layer(n).Get_size() == 2 \
                    and not self.allow_small_secure_groups:
                raise ValueError(
                    f"secure aggregation at layer {n} in a group of 2 participants hides nothing: "
                    "the leader subtracts its own levels from the sum and learns its partner's "
                    "exactly; use groups of at least 3, or pass allow_small_secure_groups=True "
                    "to accept that"
                )
        if self.privacy is not None and not 1 <= self.privacy.layer <= depth:
            raise ValueError(f"privacy layer {self.privacy.layer} is outside 1..{depth}")
        if self.privacy is not None and self.robust[self.privacy.layer - 1] != "mean":
            raise ValueError(
                f"privacy at layer {self.privacy.layer} calibrates the noise to the weighted "
                f"mean's sensitivity (clip * max a_c), which robust="
                f"{self.robust[self.privacy.layer - 1]!r} there does not have; use the robust "
                "rule at another layer"
            )

    def _is_special(self, n: int) -> bool:
        """Tell whether layer n needs the nested path (anything but an exact weighted mean)."""
        private = self.privacy is not None and self.privacy.layer == n
        return self.bits[n - 1] > 0 or self.robust[n - 1] != "mean" or private

    def _pair_seeds(self, comm: MPI.Comm) -> DiffieHellmanSeeds:
        private, public = dh_keypair()
        keys = allgather_bigint(  # layer participants, once at set-up: fixed 256-byte integers
            comm, public, nbytes=(MODP_2048_P.bit_length() + 7) // 8, low=2, high=MODP_2048_P - 2,
            what="exchanging Diffie-Hellman public keys (RFC 3526 group 14) for secure aggregation")
        return DiffieHellmanSeeds(comm.Get_rank(), private, keys)

    def methods(self) -> list[str]:
        """Return how each layer's uplink travels from this rank ("none" where exact or absent)."""
        return [
            METHOD_NAMES[self._uplinks[n].method if n in self._uplinks else Method.NONE]
            for n in range(1, self.depth + 1)
        ]

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
        if any(self._special[:layer]):
            stats = self._nested(layer, weight, step, measure_error)
            stats.seconds[layer - 1] += time.perf_counter() - start - sum(stats.seconds)
        else:
            share = weight / total
            if share != 1.0:
                self.flat.mul_(share)
            prepare_seconds = time.perf_counter() - start
            if self.algorithm == "subtree":
                stats = self._subtree_allreduce(layer)
            else:
                stats = self._tree_reduce_bcast(layer)
            stats.seconds[layer - 1] += prepare_seconds
        stats.dropped = dropped
        return stats

    def _check(self, layer: int, step: int) -> list[int]:
        """Handshake over the subtree; return the world ranks whose model is not finite."""
        comm = self.comms.subtree(layer)
        key = handshake_key(self.signature, self.numel, str(self.flat.dtype), step, layer)
        finite = _all_finite(self.flat)
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

    def _nested(self, layer: int, weight: float, step: int, measure_error: bool) -> AggregationStats:
        """Layer-by-layer uplink (quantized or exact per layer), then broadcast down."""
        stats = AggregationStats.empty(layer)
        rank = self.comms.rank
        child_weight = float(weight)
        for n in range(1, layer + 1):
            if not self.comms.joins(n):
                break
            start = time.perf_counter()
            comm = self.comms.layer(n)
            node_weight = allreduce_float(comm, child_weight, MPI.SUM)  # layer-n participants
            share = child_weight / node_weight if node_weight > 0 else 0.0
            private = self.privacy is not None and self.privacy.layer == n
            if private:
                max_share = allreduce_float(comm, share, MPI.MAX)  # layer participants
                self._clip_and_noise(n, comm, share, max_share, step)
            if self.robust[n - 1] != "mean":
                sent, trusted_weight = self._robust_layer(n, comm, child_weight)
                stats.bytes_sent[n - 1] += sent
                if comm.Get_rank() == 0:
                    node_weight = trusted_weight  # the clamped sum goes up, never the claims
            elif n in self._uplinks:
                generator = torch_generator(self.seed, purpose="quantize", rank=rank, round=step,
                                            layer=n, device=self.flat.device)
                result = self._uplinks[n].exchange(self.flat, self._anchors[n], share, generator,
                                                   measure_error, step=step, layer=n)
                stats.bytes_sent[n - 1] += result.bytes_sent
                stats.quant_error[n - 1] = result.quant_error
                stats.methods[n - 1] = int(self._uplinks[n].method)
            else:
                if share != 1.0:
                    self.flat.mul_(share)
                buf = self._mpi.outbound()
                if comm.Get_rank() == 0:
                    comm.Reduce(MPI.IN_PLACE, buf, op=MPI.SUM, root=0)
                    self._mpi.inbound()
                else:
                    comm.Reduce(buf, None, op=MPI.SUM, root=0)
                    stats.bytes_sent[n - 1] += self._mpi.nbytes
            if private and self.privacy is not None and self.privacy.mode == "central" \
                    and comm.Get_rank() == 0:
                self._central_noise(n, max_share, step)
            stats.seconds[n - 1] += time.perf_counter() - start
            child_weight = node_weight
            if comm.Get_rank() != 0:
                break
        buf = self._mpi.outbound()
        for n in range(layer, 0, -1):
            if self.comms.joins(n):
                start = time.perf_counter()
                self.comms.layer(n).Bcast(buf, root=0)
                stats.seconds[n - 1] += time.perf_counter() - start
        self._mpi.inbound()
        self.reset_anchors(layer)
        return stats

    def _robust_layer(self, n: int, comm: MPI.Comm, child_weight: float) -> tuple[int, float]:
        """Gather the children's updates to the leader and apply the layer's robust rule.

        Returns the bytes this rank sent and, at the leader, the sum of the clamped weights
        (:meth:`_trusted_weights`); 0.0 elsewhere.
        """
        anchor = self._anchors[n]
        update = (self.flat - anchor).to(torch.float32).contiguous()
        # Typed float64 claims; Byzantine values (NaN, Inf, negative, huge) are not an error here:
        # _trusted_weights clamps them, so one hostile child cannot stop the layer.
        mine = np.array([child_weight], dtype=np.float64)
        gathered = np.empty(comm.Get_size(), dtype=np.float64) if comm.Get_rank() == 0 else None
        comm.Gather(mine, gathered, root=0)  # layer participants
        claims = None if gathered is None else gathered.tolist()
        if comm.Get_rank() != 0:
            comm.Gather(update.cpu().numpy(), None, root=0)
            return update.numel() * 4, 0.0
        rows = torch.empty((comm.Get_size(), self.numel), dtype=torch.float32)
        comm.Gather(update.cpu().numpy(), rows.numpy(), root=0)
        weights = self._trusted_weights(n, claims or [])
        rule = self.robust[n - 1]
        params = _rule_params(rule, self.robust_params)
        combined = robust_update(rule, rows, torch.tensor(weights, dtype=torch.float64), **params)
        self.flat.copy_(anchor + combined.to(self.flat.device, self.flat.dtype))
        return 0, float(sum(weights))

    def _trusted_weights(self, n: int, claims: Sequence[float]) -> list[float]:
        """Clamp each layer-``n`` child's claimed weight to its subtree's cap (at the leader).

        A claim may be lower than the cap (0 drops the child) but never higher; a claim that is
        not a finite number >= 0 counts as 0. Children are in layer-communicator order, i.e. by
        the rank of their leader (``Split`` with ``key = rank``).
        """
        plan = self.comms.plan
        node = plan.node_of(self.comms.rank, n)
        children = sorted(plan.children[n - 1][node], key=lambda c: plan.leader(n - 1, c))
        caps = [plan.subtree_weight(n - 1, c, self.weight_caps) for c in children]
        weights = []
        for claim, cap in zip(claims, caps):
            value = float(claim) if isinstance(claim, (int, float)) else 0.0
            weights.append(min(value, cap) if math.isfinite(value) and value > 0 else 0.0)
        return weights

    def _clip_and_noise(
        self, n: int, comm: MPI.Comm, share: float, max_share: float, step: int
    ) -> None:
        """Clip this child's update to ``C``; in distributed mode add its share of the noise."""
        options = self.privacy
        assert options is not None
        anchor = self._anchors[n]
        update, _ = clip_update(self.flat - anchor, options.clip)
        if options.mode == "distributed" and share > 0:
            std = noise_std(options.noise_multiplier, options.clip, max_share=max_share,
                            mode="distributed", participants=comm.Get_size())
            # the uplink multiplies by the share, so the noise is pre-divided by it
            update += gaussian_noise(update.shape, std / share, 1.0, self._dp_generator(n, step),
                                     self.flat.device, update.dtype)
        self.flat.copy_(anchor + update)

    def _central_noise(self, n: int, max_share: float, step: int) -> None:
        """At the leader, add ``N(0, sigma^2 (C max a_c)^2)`` to the layer's aggregate."""
        options = self.privacy
        assert options is not None
        std = noise_std(options.noise_multiplier, options.clip, max_share=max_share, mode="central")
        self.flat.add_(gaussian_noise(self.flat.shape, std, 1.0, self._dp_generator(n, step),
                                      self.flat.device, self.flat.dtype))

    def _dp_generator(self, n: int, step: int) -> torch.Generator | None:
        """Return None (OS CSPRNG noise), or the seed-keyed generator of the insecure test mode."""
        assert self.privacy is not None
        if not self.privacy.insecure_reproducible_noise:
            return None
        return torch_generator(self.seed, purpose="dp", rank=self.comms.rank, round=step, layer=n,
                               device=self.flat.device)

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

    def _tree_reduce_bcast(self, layer: int) -> AggregationStats:
        stats = AggregationStats.empty(layer)
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


def measure_divergences(comms: LayerComms, flat: torch.Tensor, weight: float) -> tuple[float, float]:
    """Return H-SGD's (upward, downward) divergences of the current device models (all ranks).

    With groups = layer-1 nodes, group model ``x_g`` and global model ``x`` (weighted averages),
    upward ``= sum_g W_g ||x_g - x||^2 / W`` and downward ``= sum_i w_i ||x_i - x_g(i)||^2 / W``
    (Wang et al., AAAI 2022, Sec. 4). Costs two full-model allreduces; leaves ``flat`` unchanged.
    """
    group_comm, world_comm = comms.subtree(1), comms.subtree(comms.depth)
    group_weight = allreduce_float(group_comm, weight, MPI.SUM)
    total_weight = allreduce_float(world_comm, weight, MPI.SUM)
    if group_weight <= 0 or total_weight <= 0:
        return math.nan, math.nan
    host = flat.detach().to("cpu", torch.float64)
    group_model = (host * (weight / group_weight)).numpy()
    group_comm.Allreduce(MPI.IN_PLACE, group_model, op=MPI.SUM)
    global_model = (host * (weight / total_weight)).numpy()
    world_comm.Allreduce(MPI.IN_PLACE, global_model, op=MPI.SUM)
    mine = host.numpy()
    down = float(np.dot(mine - group_model, mine - group_model))
    up = float(np.dot(group_model - global_model, group_model - global_model))
    sums = np.array([weight * up, weight * down])
    world_comm.Allreduce(MPI.IN_PLACE, sums, op=MPI.SUM)
    return float(sums[0] / total_weight), float(sums[1] / total_weight)


def _all_finite(tensor: torch.Tensor) -> bool:
    """Tell whether ``tensor`` holds no NaN/Inf, in one reduction pass.

    A finite sum proves every element finite (NaN and Inf propagate through addition). A sum
    that overflowed from finite values is a false alarm, so a non-finite sum is confirmed with the
    exact element-wise check, which allocates a mask and is ~30x slower.
    """
    if bool(torch.isfinite(tensor.sum())):
        return True
    return bool(torch.isfinite(tensor).all())


def _check_caps(caps: Sequence[float] | None, size: int) -> list[float]:
    """Return one weight cap per device (1.0 each by default), validated."""
    if caps is None:
        return [1.0] * size
    values = [float(c) for c in caps]
    if len(values) != size or not all(math.isfinite(c) and c >= 0 for c in values):
        raise ValueError(
            f"weight_caps needs one finite value >= 0 per device ({size}), got {len(values)}"
        )
    return values


def _tolerance_fix(rule: str, fan_in: int) -> str:
    """Say how to make ``rule`` tolerate at least one Byzantine child among ``fan_in``."""
    if rule == "trimmed_mean":
        if fan_in < 3:
            return "a trimmed mean needs at least 3 children; use larger groups or robust 'mean'"
        return f"set trim >= 1/{fan_in} (e.g. {math.ceil(1000 / fan_in) / 1000}) and < 0.5"
    if rule == "median":
        return "the median of 2 is their mean; use groups of at least 3 children"
    return (f"set f >= 1 with more than 2f + 2 children (krum with f = 1 needs at least 5, "
            f"got {fan_in})")


def _rule_params(rule: str, params: dict[str, float]) -> dict[str, Any]:
    """Pick the parameters a robust rule takes from the configured ones."""
    if rule == "trimmed_mean":
        return {"trim": params.get("trim", 0.2)}
    if rule == "krum":
        return {"f": int(params.get("f", 1)), "m": int(params.get("m", 1))}
    return {}
