"""One object per aggregation layer: how this rank's model travels up one layer of the tree.

Every layer a rank takes part in is one of

* :class:`ExactLayer`: ``Reduce(SUM)`` of ``a_c x_c`` (the full-precision weighted mean);
* :class:`QuantizedLayer`: ``Q_n(a_c (x_c - x))`` as exact integer sums (:mod:`hflmpi.mpi.uplink`);
* :class:`RobustLayer`: the children's updates gathered to the leader, combined by a
  Byzantine-robust rule (:mod:`hflmpi.core.robust`) or a plug-in (:mod:`hflmpi.core.strategy`)
  with weights the leader clamps;

optionally wrapped in :class:`PrivateLayer` (clip each child's update, add Gaussian noise), and
then in :class:`ServerOptLayer` (the leader turns the aggregate into a server optimizer's step,
:mod:`hflmpi.core.server_opt`, before anything goes up or down). They
share one method, ``up(share, child_weight, step, measure_error) -> LayerResult``: collective
over the layer communicator, it leaves the layer's aggregate in the model buffer at the leader
(rank 0 of the communicator). :class:`hflmpi.mpi.aggregate.HierarchicalAggregator` builds them
once and runs one up-loop over them, then one broadcast down.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch
from mpi4py import MPI

from hflmpi.core.privacy import clip_update, gaussian_noise, noise_std
from hflmpi.core.rng import torch_generator
from hflmpi.core.robust import robust_update
from hflmpi.core.secure import MODP_2048_P, DiffieHellmanSeeds, dh_keypair
from hflmpi.core.server_opt import ServerOptimizer, ServerOptOptions
from hflmpi.core.strategy import apply_rule, rule_name
from hflmpi.core.wire import Method, auto_bucket_size
from hflmpi.errors import HflmpiError
from hflmpi.mpi.comm import LayerComms
from hflmpi.mpi.exact_sum import check_integer_sum
from hflmpi.mpi.messages import allgather_bigint, allreduce_float
from hflmpi.mpi.transport import MpiBuffer
from hflmpi.mpi.uplink import QuantizedUplink

__all__ = [
    "LayerFailedError",
    "LayerResult",
    "Layer",
    "ExactLayer",
    "QuantizedLayer",
    "RobustLayer",
    "PrivateLayer",
    "ServerOptLayer",
    "PrivacyOptions",
    "LayerOptions",
    "build_layer",
    "check_caps",
    "rule_params",
]


class LayerFailedError(HflmpiError, ValueError):
    """A layer's leader could not aggregate (e.g. a robust rule left with too few weights).

    Raised on every rank of the aggregating subtree, with the leader's reason.
    """


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


@dataclass
class LayerResult:
    """What one ``up`` cost this rank and what it reports upward.

    Attributes
    ----------
    bytes_sent : int
        Uplink bytes this rank sent (0 at the leader, whose contribution stays local).
    quant_error : float
        ``||Q(d) - d||^2 / ||d||^2`` of this rank's update (NaN where not measured or exact).
    method : Method
        How the uplink travelled.
    node_weight : float or None
        At a leader that must not trust the children's claims: the weight to report upward
        instead of their sum.
    failure : str or None
        Why the leader could not aggregate (it alone knows); the aggregator makes every rank of
        the subtree raise it after the up-loop instead of leaving them in the broadcast.
    """

    bytes_sent: int = 0
    quant_error: float = math.nan
    method: Method = Method.NONE
    node_weight: float | None = None
    failure: str | None = None


class Layer:
    """One layer this rank takes part in: ``n`` (1..N), its communicator and its anchor.

    ``anchor`` is the model at the layer's last aggregation (identical on all participants), or
    ``None`` for an exact layer, which needs none. Only a robust layer can fail on its leader
    alone; it says so in :attr:`LayerResult.failure` instead of raising.
    """

    def __init__(self, n: int, comm: MPI.Comm, flat: torch.Tensor,
                 anchor: torch.Tensor | None) -> None:
        self.n = n
        self.comm = comm
        self.flat = flat
        self.anchor = anchor
        self.is_leader = comm.Get_rank() == 0

    @property
    def method(self) -> Method:
        """Return how this layer's uplink travels."""
        """How this layer's uplink travels."""
        return Method.NONE

    def up(self, share: float, child_weight: float, step: int, measure_error: bool) -> LayerResult:
        """Send this child's share of the update to the leader (see :class:`Layer`)."""
        """Send this child's model up one layer (collective over the layer communicator).

        Parameters
        ----------
        share : float
            ``a_c = W_c / W_node`` of this child (1.0 where the model is already scaled).
        child_weight : float
            ``W_c``, the weight this child claims.
        step : int
            Global step; keys the random streams with (seed, rank, layer).
        measure_error : bool
            Measure the quantization error (quantized layers).
        """
        raise NotImplementedError


class ExactLayer(Layer):
    """Full precision: scale by the share, then ``Reduce(SUM)`` to the leader.

    With ``share == 1.0`` nothing is scaled: the tree algorithm pre-scales the model once by
    ``w_r / W_subtree`` and then only sums, layer by layer.
    """

    def __init__(self, n: int, comm: MPI.Comm, flat: torch.Tensor, mpi: MpiBuffer) -> None:
        super().__init__(n, comm, flat, None)
        self._mpi = mpi

    def up(self, share: float, child_weight: float, step: int, measure_error: bool) -> LayerResult:
        """Send this child's share of the update to the leader (see :class:`Layer`)."""
        if share != 1.0:
            self.flat.mul_(share)
        buf = self._mpi.outbound()
        if self.is_leader:
            self.comm.Reduce(MPI.IN_PLACE, buf, op=MPI.SUM, root=0)
            self._mpi.inbound()
            return LayerResult()
        self.comm.Reduce(buf, None, op=MPI.SUM, root=0)
        return LayerResult(bytes_sent=self._mpi.nbytes)


class QuantizedLayer(Layer):
    """``Q_n(a_c (x_c - x))`` summed exactly at the leader (:class:`QuantizedUplink`)."""

    def __init__(self, n: int, uplink: QuantizedUplink, flat: torch.Tensor, anchor: torch.Tensor,
                 seed: int, rank: int) -> None:
        super().__init__(n, uplink.comm, flat, anchor)
        self.uplink = uplink
        self._seed = seed
        self._rank = rank

    @property
    def method(self) -> Method:
        """Return how this layer's uplink travels."""
        return Method(self.uplink.method)

    def up(self, share: float, child_weight: float, step: int, measure_error: bool) -> LayerResult:
        """Send this child's share of the update to the leader (see :class:`Layer`)."""
        assert self.anchor is not None
        generator = torch_generator(self._seed, purpose="quantize", rank=self._rank, round=step,
                                    layer=self.n, device=self.flat.device)
        result = self.uplink.exchange(self.flat, self.anchor, share, generator, measure_error,
                                      step=step, layer=self.n)
        return LayerResult(result.bytes_sent, result.quant_error, self.method)


class RobustLayer(Layer):
    """Gather the children's updates to the leader and combine them with a robust rule.

    The leader never trusts a claimed weight: it clamps each child's claim to ``caps`` (the
    sum of the weight caps over that child's subtree, in layer-communicator order) and reports
    the clamped sum upward.
    """

    def __init__(self, n: int, comm: MPI.Comm, flat: torch.Tensor, anchor: torch.Tensor,
                 rule: Any, params: dict[str, Any], caps: Sequence[float]) -> None:
        super().__init__(n, comm, flat, anchor)
        self.rule = rule
        self.params = params
        self.caps = list(caps)

    def up(self, share: float, child_weight: float, step: int, measure_error: bool) -> LayerResult:
        """Send this child's share of the update to the leader (see :class:`Layer`)."""
        assert self.anchor is not None
        update = (self.flat - self.anchor).to(torch.float32).contiguous()
        # Typed float64 claims; Byzantine values (NaN, Inf, negative, huge) are not an error here:
        # trusted_weights clamps them, so one hostile child cannot stop the layer.
        mine = np.array([child_weight], dtype=np.float64)
        size = self.comm.Get_size()
        gathered = np.empty(size, dtype=np.float64) if self.is_leader else None
        self.comm.Gather(mine, gathered, root=0)  # layer participants
        if not self.is_leader:
            self.comm.Gather(update.cpu().numpy(), None, root=0)
            return LayerResult(bytes_sent=update.numel() * 4)
        rows = torch.empty((size, update.numel()), dtype=torch.float32)
        self.comm.Gather(update.cpu().numpy(), rows.numpy(), root=0)
        weights = self.trusted_weights(gathered.tolist() if gathered is not None else [])
        tensor_weights = torch.tensor(weights, dtype=torch.float64)
        try:
            combined = (robust_update(self.rule, rows, tensor_weights, **self.params)
                        if isinstance(self.rule, str) else
                        apply_rule(self.rule, rows, tensor_weights))
        except ValueError as exc:  # only the leader knows: the aggregator tells the subtree
            shown = ", ".join(f"{w:g}" for w in weights[:16]) + (", ..." if size > 16 else "")
            what = (f"robust={self.rule!r}" if isinstance(self.rule, str)
                    else f"the {rule_name(self.rule)}")
            return LayerResult(node_weight=float(sum(weights)), failure=(
                f"{what} at layer {self.n} could not combine its {size} children "
                f"with clamped weights [{shown}]: {str(exc)[:1000]}"))
        self.flat.copy_(self.anchor + combined.to(self.flat.device, self.flat.dtype))
        return LayerResult(node_weight=float(sum(weights)))

    def trusted_weights(self, claims: Sequence[float]) -> list[float]:
        """Clamp each child's claim to its cap (at the leader).

        A claim may be lower than the cap (0 drops the child) but never higher; a claim that is
        not a finite number >= 0 counts as 0.
        """
        weights = []
        for claim, cap in zip(claims, self.caps):
            value = float(claim) if isinstance(claim, (int, float)) else 0.0
            weights.append(min(value, cap) if math.isfinite(value) and value > 0 else 0.0)
        return weights


class PrivateLayer(Layer):
    """Clip every child's update to ``C`` around ``inner.up`` and add Gaussian noise.

    Central mode: the leader adds ``N(0, sigma^2 (C max a_c)^2)`` to the aggregate. Distributed
    mode: every child adds its ``1/sqrt(k)`` share before sending.
    """

    def __init__(self, inner: Layer, anchor: torch.Tensor, options: PrivacyOptions, seed: int,
                 rank: int) -> None:
        super().__init__(inner.n, inner.comm, inner.flat, anchor)
        self.inner = inner
        self.options = options
        self._seed = seed
        self._rank = rank

    @property
    def method(self) -> Method:
        """Return how this layer's uplink travels."""
        return self.inner.method

    def up(self, share: float, child_weight: float, step: int, measure_error: bool) -> LayerResult:
        """Send this child's share of the update to the leader (see :class:`Layer`)."""
        max_share = allreduce_float(self.comm, share, MPI.MAX)  # layer participants
        self._clip_and_noise(share, max_share, step)
        result = self.inner.up(share, child_weight, step, measure_error)
        if self.options.mode == "central" and self.is_leader:
            options = self.options
            std = noise_std(options.noise_multiplier, options.clip, max_share=max_share,
                            mode="central")
            self.flat.add_(gaussian_noise(self.flat.shape, std, 1.0, self._generator(step),
                                          self.flat.device, self.flat.dtype))
        return result

    def _clip_and_noise(self, share: float, max_share: float, step: int) -> None:
        """Clip this child's update to ``C``; in distributed mode add its share of the noise."""
        options, anchor = self.options, self.anchor
        assert anchor is not None
        update, _ = clip_update(self.flat - anchor, options.clip)
        if options.mode == "distributed" and share > 0:
            std = noise_std(options.noise_multiplier, options.clip, max_share=max_share,
                            mode="distributed", participants=self.comm.Get_size())
            # the uplink multiplies by the share, so the noise is pre-divided by it
            update += gaussian_noise(update.shape, std / share, 1.0, self._generator(step),
                                     self.flat.device, update.dtype)
        self.flat.copy_(anchor + update)

    def _generator(self, step: int) -> torch.Generator | None:
        """Return None (OS CSPRNG noise), or the seed-keyed generator of the insecure test mode."""
        if not self.options.insecure_reproducible_noise:
            return None
        return torch_generator(self._seed, purpose="dp", rank=self._rank, round=step,
                               layer=self.n, device=self.flat.device)


class ServerOptLayer(Layer):
    """Run ``inner.up``; the leader then replaces the aggregate by a server optimizer's step.

    ``x' = x + step(y - x)`` with ``y`` the inner layer's aggregate (after dequantization, the
    robust rule or the DP noise) and ``x`` the anchor, the model the layer last broadcast. The
    state lives on the leader only; the aggregator broadcasts ``x'`` down, so every member gets
    the same bits. A leader whose inner rule failed leaves its state untouched.
    """

    def __init__(self, inner: Layer, anchor: torch.Tensor, options: ServerOptOptions) -> None:
        super().__init__(inner.n, inner.comm, inner.flat, anchor)
        self.inner = inner
        self.optimizer = ServerOptimizer(options, inner.flat.numel(), inner.flat.device) \
            if self.is_leader else None

    @property
    def method(self) -> Method:
        """Return how this layer's uplink travels."""
        return self.inner.method

    def up(self, share: float, child_weight: float, step: int, measure_error: bool) -> LayerResult:
        """Send this child's share of the update to the leader (see :class:`Layer`)."""
        result = self.inner.up(share, child_weight, step, measure_error)
        if self.optimizer is not None and result.failure is None:
            assert self.anchor is not None
            self.optimizer.step(self.flat, self.anchor)
        return result


@dataclass(frozen=True)
class LayerOptions:
    """How one layer aggregates: the aggregator's arguments for that layer.

    ``bits > 0`` makes it a :class:`QuantizedLayer` (``secure`` masks its levels), ``rule``
    other than ``"mean"`` (a robust rule's name or a plug-in object) a :class:`RobustLayer`
    (with ``rule_params``), otherwise an :class:`ExactLayer`; ``privacy`` wraps it in a
    :class:`PrivateLayer`, ``server_opt`` (other than "none") in a :class:`ServerOptLayer`.
    """

    bits: int = 0
    bucket_size: int = 0
    method: str = "auto"
    secure: bool = False
    rule: Any = "mean"
    rule_params: dict[str, Any] = field(default_factory=dict)
    privacy: PrivacyOptions | None = None
    seed: int = 0
    server_opt: ServerOptOptions | None = None

    @property
    def server_step(self) -> bool:
        """Whether the leader applies a server optimizer to the aggregate."""
        return self.server_opt is not None and self.server_opt.name != "none"

    @property
    def special(self) -> bool:
        """Whether the layer needs the nested path (anything but an exact weighted mean)."""
        return (self.bits > 0 or not _is_mean(self.rule) or self.privacy is not None
                or self.server_step)


def build_layer(
    comms: LayerComms, n: int, flat: torch.Tensor, mpi: MpiBuffer, options: LayerOptions,
    weight_caps: Sequence[float], cuda_aware: bool,
) -> Layer:
    """Return the object that carries this rank's model up layer ``n`` (which it must join).

    Collective over the layer's participants for a secure layer (the key exchange) and for an
    integer-sum layer (:func:`hflmpi.mpi.exact_sum.check_integer_sum`). Every
    layer but an exact one keeps an anchor, a copy of ``flat``.
    """
    comm, rank = comms.layer(n), comms.rank
    anchor = flat.detach().clone() if options.special else None
    layer: Layer
    if options.bits > 0:
        assert anchor is not None
        seeds = _pair_seeds(comm) if options.secure else None
        uplink = QuantizedUplink(
            comm, flat.numel(), options.bits, options.bucket_size or auto_bucket_size(options.bits),
            flat.device, cuda_aware, "sum" if seeds is not None else options.method, seeds=seeds,
        )
        if uplink.method == Method.INTEGER_SUM:  # the layer's participants, once
            low, high = uplink.sum_range()
            check_integer_sum(comm, torch.empty(0, dtype=uplink.container).numpy().dtype, low, high,
                              op=uplink.sum_op, what=f"the {options.bits}-bit integer sum of "
                              f"layer {n}{' (secure)' if options.secure else ''}")
        elif uplink.method == Method.LANES:  # words of lanes, summed as uint64
            check_integer_sum(comm, np.uint64, 0, uplink.lanes.max_word, op=uplink.sum_op,
                              what=f"the {options.bits}-bit lanes of layer {n} "
                              f"({uplink.lanes.lanes} lanes of {uplink.lanes.width} bits a word)")
        layer = QuantizedLayer(n, uplink, flat, anchor, options.seed, rank)
    elif not _is_mean(options.rule):
        assert anchor is not None
        layer = RobustLayer(n, comm, flat, anchor, options.rule, options.rule_params,
                            _child_caps(comms, n, weight_caps))
    else:
        layer = ExactLayer(n, comm, flat, mpi)
    if options.privacy is not None:
        assert anchor is not None
        layer = PrivateLayer(layer, anchor, options.privacy, options.seed, rank)
    if options.server_step:
        assert anchor is not None and options.server_opt is not None
        layer = ServerOptLayer(layer, anchor, options.server_opt)
    return layer


def _is_mean(rule: Any) -> bool:
    return isinstance(rule, str) and rule == "mean"


def _child_caps(comms: LayerComms, n: int, weight_caps: Sequence[float]) -> list[float]:
    """Per layer-``n`` child, in layer-communicator order, the sum of its devices' caps.

    Children are ordered by the rank of their leader (``Split`` with ``key = rank``).
    """
    plan = comms.plan
    node = plan.node_of(comms.rank, n)
    children = sorted(plan.children[n - 1][node], key=lambda c: plan.leader(n - 1, c))
    return [plan.subtree_weight(n - 1, c, weight_caps) for c in children]


def _pair_seeds(comm: MPI.Comm) -> DiffieHellmanSeeds:
    private, public = dh_keypair()
    keys = allgather_bigint(  # layer participants, once at set-up: fixed 256-byte integers
        comm, public, nbytes=(MODP_2048_P.bit_length() + 7) // 8, low=2, high=MODP_2048_P - 2,
        what="exchanging Diffie-Hellman public keys (RFC 3526 group 14) for secure aggregation")
    return DiffieHellmanSeeds(comm.Get_rank(), private, keys)


def rule_params(rule: Any, params: dict[str, float]) -> dict[str, Any]:
    """Pick the parameters a robust rule takes from the configured ones."""
    if rule == "trimmed_mean":
        return {"trim": params.get("trim", 0.2)}
    if rule == "krum":
        return {"f": int(params.get("f", 1)), "m": int(params.get("m", 1))}
    return {}


def check_caps(caps: Sequence[float] | None, size: int) -> list[float]:
    """Return one weight cap per device (1.0 each by default), validated."""
    if caps is None:
        return [1.0] * size
    values = [float(c) for c in caps]
    if len(values) != size or not all(math.isfinite(c) and c >= 0 for c in values):
        raise ValueError(
            f"weight_caps needs one finite value >= 0 per device ({size}), got {len(values)}"
        )
    return values
