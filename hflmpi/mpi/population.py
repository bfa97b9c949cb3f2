"""Nested aggregation over a tree of clients placed on ranks (:mod:`hflmpi.core.population`).

Every rank keeps the model of each node it holds clients of (its anchor: the model of the node's
last aggregation). When layers ``1..L`` close, each layer ``n`` aggregates bottom-up, node by node,
over the children that took part (weight ``W_c > 0``, the participating samples or clients below
``c``) with ``a_c = W_c / W_node``:

* an exact layer: ``x_node = sum_c a_c x_c``, summed in float64 (locally, then ``Allreduce`` over
  the node's ranks when it spans several) and rounded once to the model's dtype;
* a quantized layer: ``x_node = x + sum_c Q_n(a_c (x_c - x))``: the scale of each bucket is the
  MAX over all children (locally, then ``Allreduce(MAX)``), each child is rounded with its own
  stream keyed by (seed, its lowest client, step, layer), and the integer levels are added in
  int64 (locally, then ``Allreduce(SUM)``);
* a robust layer, or the private layer: :mod:`hflmpi.mpi.population_rules` (a robust rule over
  the participants' rows, shared with ``Allgatherv`` on a spanning node; clipping and noise
  around the exact or quantized sum).

Integer sums are associative, so a quantized layer's result is the same bits whichever rank holds
which client; an exact layer differs between placements only by the order of a float64 sum,
``|err| <= (K - 1) 2^-53 sum_c |a_c x_c|`` for ``K`` children, below one float32 ulp before the
final rounding. A node with no participant keeps its model (its parent renormalises without it).
After the aggregation the new model of each closing node goes down to every node below it.

Bytes are counted twice: per client uplink, as if each child sent its own message (packed levels
plus its bucket scales on a quantized layer, the float32 model on an exact one), which is the
federated cost the papers model; and the bytes each rank handed to MPI collectives.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch
from mpi4py import MPI

from hflmpi.core.client_keys import PUBLIC_KEY_BYTES, ClientKeys, new_private_keys
from hflmpi.core.clock import carried_weights
from hflmpi.core.packing import packed_nbytes
from hflmpi.core.population import PopulationPlan
from hflmpi.core.quantize import bucket_absmax, from_level_sum, new_workspace, num_buckets, to_levels
from hflmpi.core.rng import torch_generator
from hflmpi.core.secure import PairwiseSeeds, mask_levels, required_modulus_bits, unmask_sum
from hflmpi.core.server_opt import ServerOptOptions
from hflmpi.core.wire import SCALE_NBYTES, auto_bucket_size, levels_for_bits
from hflmpi.mpi.population_opt import NodeOptimizers
from hflmpi.mpi.population_rules import PopulationRules

__all__ = ["PopulationAggregator", "PopulationStats", "node_weights"]


@dataclass
class PopulationStats:
    """What one aggregation of layers ``1..L`` cost (this rank's share), per layer.

    Attributes
    ----------
    client_bytes : list of float
        Uplink bytes of the children this rank owns, as if each sent its own message.
    mpi_bytes : list of float
        Bytes this rank handed to MPI collectives.
    quant_error : list of float
        Worst ``||Q(d) - d||^2 / ||d||^2`` over this rank's children (NaN: not measured).
    seconds : float
        Wall time of the aggregation on this rank.
    """

    client_bytes: list[float] = field(default_factory=list)
    mpi_bytes: list[float] = field(default_factory=list)
    quant_error: list[float] = field(default_factory=list)
    seconds: float = 0.0


def node_weights(plan: PopulationPlan, client_weights: np.ndarray) -> list[np.ndarray]:
    """Return, per layer ``0..N``, the weight of every node: the sum over its participants.

    ``client_weights`` holds each client's weight this round (0 for one that does not take
    part); every rank computes the same table.
    """
    weights = [np.asarray(client_weights, dtype=np.float64)]
    for n in range(1, plan.depth + 1):
        below = weights[-1]
        weights.append(np.array([below[list(plan.children(n, k))].sum()
                                 for k in range(plan.node_count(n))]))
    return weights


class PopulationAggregator:
    """The node models this rank keeps, and the nested aggregation over them.

    Collective over ``comm`` at construction (one ``Split`` per layer) and in
    :meth:`aggregate` (over the communicators of the spanning nodes this rank takes part in).

    Parameters
    ----------
    comm : MPI.Comm
        All ranks of the run.
    plan : PopulationPlan
        The tree of clients on the ranks.
    model : Tensor
        The initial global model (flat); every node starts from it.
    bits : sequence of int
        Quantizer width per layer (0 = exact).
    bucket_size : int
        Elements per shared scale (0: :func:`hflmpi.core.wire.auto_bucket_size` per layer).
    seed : int
        Run seed (keys the quantizer streams).
    secure : sequence of bool, optional
        Per layer: mask each participant's levels pairwise among the participants of its node
        (Bonawitz et al. 2017), with keys agreed between clients (:mod:`hflmpi.core.client_keys`);
        the masks cancel in the node's sum, which is the same bits as without them.
    rules : PopulationRules, optional
        Robust layers and the private layer (:mod:`hflmpi.mpi.population_rules`).
    server_opt : sequence of ServerOptOptions or None, optional
        Per layer: each node of the layer steps its own server optimizer from its aggregate
        (:mod:`hflmpi.mpi.population_opt`).
    """

    def __init__(self, comm: MPI.Comm, plan: PopulationPlan, model: torch.Tensor,
                 bits: Sequence[int], bucket_size: int, seed: int,
                 secure: Sequence[bool] = (), rules: PopulationRules | None = None,
                 server_opt: Sequence[ServerOptOptions | None] = ()) -> None:
        self.comm = comm
        self.plan = plan
        self.rank = comm.Get_rank()
        self.bits = list(bits)
        self.seed = seed
        self.numel = model.numel()
        self.dtype = model.dtype
        self.device = model.device
        self.bucket_sizes = [bucket_size or auto_bucket_size(b) if b else 0 for b in self.bits]
        self.nodes = [plan.nodes_on(self.rank, n) for n in range(plan.depth + 1)]
        self.models: list[dict[int, torch.Tensor]] = [{}] + [
            {k: model.detach().clone() for k in self.nodes[n]} for n in range(1, plan.depth + 1)]
        self.comms: list[MPI.Comm | None] = [None]
        for n in range(1, plan.depth + 1):
            node = plan.spanning_node(self.rank, n)
            sub = comm.Split(MPI.UNDEFINED if node is None else node, self.rank)  # all ranks
            self.comms.append(None if sub == MPI.COMM_NULL else sub)
        self._workspace = new_workspace(self.numel, self.device)
        self._levels = torch.empty(self.numel, dtype=torch.int32, device=self.device)
        self.secure = [bool(on) for on in secure] or [False] * plan.depth
        self.keys = _agree_client_keys(comm, plan, self.rank) if any(self.secure) else None
        self.rules = rules
        self.optimizers = NodeOptimizers(plan, self.rank, server_opt, self.numel, self.device)

    @property
    def global_model(self) -> torch.Tensor:
        """The root's model (the same bits on every rank after a top-layer aggregation)."""
        return self.models[self.plan.depth][0]

    def start_of(self, client: int) -> torch.Tensor:
        """Return the model ``client`` starts its next period from: its layer-1 node's."""
        return self.models[1][self.plan.node_of(client, 1)]

    def set_all(self, model: torch.Tensor) -> None:
        """Set every node's model to ``model`` (the start of a run, or a resume)."""
        for layer in self.models[1:]:
            for node_model in layer.values():
                node_model.copy_(model)

    def free(self) -> None:
        """Free the layer communicators (collective over each)."""
        for sub in self.comms:
            if sub is not None:
                sub.Free()
        self.comms = [None] * len(self.comms)

    def aggregate(self, top: int, trained: dict[int, torch.Tensor], weights: list[np.ndarray],
                  step: int, measure_error: bool = False,
                  carried: Sequence[np.ndarray] | None = None, bottom: int = 1) -> PopulationStats:
        """Aggregate layers ``1..top`` bottom-up, then send the new models down.

        Collective over the communicators of the spanning nodes of layers ``1..top`` this rank
        takes part in (every rank of a node calls it at the same step).

        Parameters
        ----------
        top : int
            The highest layer that closes at this step.
        trained : dict of int to Tensor
            The trained model of every participating client on this rank.
        weights : list of arrays
            :func:`node_weights` of this round.
        step : int
            Global step (keys the quantizer streams).
        measure_error : bool
            Measure the quantization error of this rank's children.
        carried : sequence of arrays, optional
            Per layer ``0..top-1``, the weight each node's update carries into its parent
            (:class:`hflmpi.core.clock.SimulatedClock`; 0: late, dropped); a node aggregates
            its children by these weights, renormalised over them. ``None``: ``weights``.
        bottom : int
            The lowest layer to aggregate (2: layer 1 was applied by buffered nodes).
        """
        import time

        started = time.perf_counter()
        stats = PopulationStats([0.0] * self.plan.depth, [0.0] * self.plan.depth,
                                [math.nan] * self.plan.depth)
        for n in range(bottom, top + 1):
            layer = weights if carried is None else carried_weights(self.plan, weights, carried, n)
            for k in self.nodes[n]:
                if layer[n][k] > 0:
                    self.optimizers.before(n, k, self.models[n][k])
                    self._aggregate_node(n, k, trained, layer, step, measure_error, stats)
                    self.optimizers.after(n, k, self.models[n][k])
        if self.rules is not None:  # all ranks: a node's failure stops every rank together
            self.rules.raise_failures(self.comm, top, step)
        for n in range(top - 1, 0, -1):
            for k in self.nodes[n]:
                self.models[n][k].copy_(self.models[n + 1][self.plan.parent(n, k)])
        stats.seconds = time.perf_counter() - started
        return stats

    def _children(self, n: int, k: int, trained: dict[int, torch.Tensor],
                  weights: list[np.ndarray]) -> list[tuple[int, float, torch.Tensor]]:
        """Return this rank's participating children of node ``k``: (lowest client, a_c, model)."""
        plan, out = self.plan, []
        for child in plan.children(n, k):
            w = weights[n - 1][child]
            if w <= 0 or plan.owner(n - 1, child) != self.rank:
                continue
            model = trained[child] if n == 1 else self.models[n - 1][child]
            out.append((plan.members(n - 1, child)[0], w / weights[n][k], model))
        return out

    def _aggregate_node(self, n: int, k: int, trained: dict[int, torch.Tensor],
                        weights: list[np.ndarray], step: int, measure_error: bool,
                        stats: PopulationStats) -> None:
        children = self._children(n, k, trained, weights)
        sub = self.comms[n] if self.plan.spans(n, k) else None
        rules = self.rules
        if rules is not None:  # the private layer clips (and noises) the children first
            children = rules.privatize(n, k, children, self.models[n][k], weights, step)
        if rules is not None and rules.robust_at(n):
            stats.mpi_bytes[n - 1] += rules.combine(n, k, children, self.models[n][k], weights, sub)
            stats.client_bytes[n - 1] += len(children) * self.numel * 4
        elif self.bits[n - 1] == 0:
            total = torch.zeros(self.numel, dtype=torch.float64, device=self.device)
            for _, share, model in children:
                total.add_(model.to(torch.float64), alpha=share)
            if sub is not None:
                self._allreduce(sub, total, MPI.SUM, stats, n)
            self.models[n][k].copy_(total)
            stats.client_bytes[n - 1] += len(children) * self.numel * 4
        else:
            self._aggregate_quantized(n, k, children, sub, step, measure_error, stats, weights)
        if rules is not None:
            stats.mpi_bytes[n - 1] += rules.add_central_noise(n, k, self.models[n][k], weights,
                                                              step, sub)

    def _masking(self, n: int, k: int,
                 weights: list[np.ndarray]) -> tuple[list[int], int, PairwiseSeeds]:
        """Return node ``k``'s participants (lowest clients), the modulus bits and pair keys."""
        plan, keys = self.plan, self.keys
        assert keys is not None
        ids = [plan.members(n - 1, c)[0] for c in plan.children(n, k) if weights[n - 1][c] > 0]
        width = required_modulus_bits(len(ids) * levels_for_bits(self.bits[n - 1]))
        return ids, width, keys.among(ids)

    def _aggregate_quantized(self, n: int, k: int, children: list[tuple[int, float, torch.Tensor]],
                             sub: MPI.Comm | None, step: int, measure_error: bool,
                             stats: PopulationStats, weights: list[np.ndarray]) -> None:
        bits, bucket = self.bits[n - 1], self.bucket_sizes[n - 1]
        s = levels_for_bits(bits)
        anchor = self.models[n][k]
        diffs = [((model - anchor).to(torch.float32) * share) for _, share, model in children]
        scales = torch.zeros(num_buckets(self.numel, bucket), dtype=torch.float32,
                             device=self.device)
        for d in diffs:
            torch.maximum(scales, bucket_absmax(d, bucket), out=scales)
        if not bool(torch.isfinite(scales).all()):
            scales.fill_(float("inf"))  # MAX keeps +inf: every rank of the node fails together
        if sub is not None:
            self._allreduce(sub, scales, MPI.MAX, stats, n)
        if not bool(torch.isfinite(scales).all()):
            raise FloatingPointError(
                f"a model update below layer-{n} group {k} holds NaN or Inf; check the learning "
                "rate and the data of its clients")
        level_sum = torch.zeros(self.numel, dtype=torch.int64, device=self.device)
        masking = self._masking(n, k, weights) if self.secure[n - 1] else None
        for (client, _, _), d in zip(children, diffs):
            generator = torch_generator(self.seed, purpose="quantize", rank=client, round=step,
                                        layer=n, device=self.device)
            levels = to_levels(d, scales, s, generator, bucket_size=bucket, sign=bits == 1,
                               out=self._levels, workspace=self._workspace)
            if masking is not None:  # residues mod 2^w, masked among the node's participants
                ids, width, seeds = masking
                level_sum.add_(mask_levels(levels.to(torch.int64), ids.index(client), len(ids),
                                           seeds, width, step=step, layer=n, group=k))
            else:
                level_sum.add_(levels)
            if measure_error:
                decoded = from_level_sum(levels, scales, s, bucket_size=bucket)
                norm = float(torch.dot(d, d))
                error = float(torch.sum((decoded - d) ** 2)) / norm if norm else 0.0
                worst = stats.quant_error[n - 1]
                stats.quant_error[n - 1] = error if math.isnan(worst) else max(worst, error)
        if sub is not None:
            self._allreduce(sub, level_sum, MPI.SUM, stats, n)
        if masking is not None:  # the masks cancel modulo 2^w
            level_sum = unmask_sum(level_sum, masking[1])
        update = from_level_sum(level_sum, scales, s, bucket_size=bucket)
        self.models[n][k].copy_(anchor + update.to(self.dtype))
        per_child = packed_nbytes(self.numel, bits) + scales.numel() * SCALE_NBYTES
        stats.client_bytes[n - 1] += len(children) * per_child

    def _allreduce(self, sub: MPI.Comm, tensor: torch.Tensor, op: Any, stats: PopulationStats,
                   n: int) -> None:
        host = tensor.cpu() if tensor.device.type != "cpu" else tensor
        sub.Allreduce(MPI.IN_PLACE, host.numpy(), op=op)
        if host is not tensor:
            tensor.copy_(host)
        stats.mpi_bytes[n - 1] += tensor.numel() * tensor.element_size()


def _agree_client_keys(comm: MPI.Comm, plan: PopulationPlan, rank: int) -> ClientKeys:
    """Make key pairs for this rank's clients and publish the public keys (all ranks, once)."""
    pairs = new_private_keys(plan.placement.clients_on(rank))
    table = np.zeros((plan.clients, PUBLIC_KEY_BYTES), dtype=np.uint8)
    for client, (_, public) in pairs.items():
        table[client] = np.frombuffer(public.to_bytes(PUBLIC_KEY_BYTES, "big"), dtype=np.uint8)
    comm.Allreduce(MPI.IN_PLACE, table, op=MPI.MAX)  # every row is one rank's, zeros elsewhere
    publics = [int.from_bytes(row.tobytes(), "big") for row in table]
    return ClientKeys({c: private for c, (private, _) in pairs.items()}, publics)
