"""Alpha-beta(-gamma) cost model of hflmpi's hierarchical aggregation, calibration and prediction.

Pure module (no MPI). A message of ``n`` bytes between two processes costs ``alpha + n beta``;
reducing ``n`` bytes locally costs ``n gamma`` (Hockney's model, extended with gamma as in
Thakur, Rabenseifner & Gropp, "Optimization of collective communication operations in MPICH",
IJHPCA 19(1), 2005 - "TRG05" below). With ``p`` processes and ``lg = ceil(log2 p)``, the collective
algorithms and their costs (TRG05, Sec. 3-4; Patarasuk & Yuan, JPDC 2009 for the ring) are::

    bcast     binomial tree                 lg (alpha + n beta)
              scatter + recursive-doubling   2 lg alpha + 2 (p-1)/p n beta
              scatter + ring allgather       (lg + p - 1) alpha + 2 (p-1)/p n beta
    reduce    binomial tree                 lg (alpha + n beta + n gamma)
              Rabenseifner (RS + gather)    2 lg alpha + 2 (p-1)/p n beta + (p-1)/p n gamma
    allreduce recursive doubling            lg (alpha + n beta + n gamma)
              Rabenseifner (RS + allgather) 2 lg alpha + 2 (p-1)/p n beta + (p-1)/p n gamma
              ring                          2 (p-1) alpha + 2 (p-1)/p n beta + (p-1)/p n gamma
    gather    binomial tree (n per rank)    lg alpha + (p-1) n beta

``family="mpich"`` picks the algorithm the way MPICH's defaults do, by message size only
(allreduce/reduce short <= 2048 B; bcast short < 12288 B or p < 8, long >= 524288 B), so every
cost is *linear* in ``(alpha, beta, gamma)`` and :func:`calibrate` is an ordinary (weighted,
non-negative) least-squares fit. ``family="nccl"`` uses rings everywhere (NCCL's large-message
algorithms): allreduce as above, pipelined reduce/bcast ``(p-1) alpha + n beta (+ (p-1)/p n gamma)``
and gather ``(p-1) alpha + (p-1) n beta``.

One layer-n aggregation of hflmpi (:mod:`hflmpi.mpi.aggregate`) over a node with ``f`` participants
and a model of ``numel`` float32 entries costs the 8-byte weight allreduce, the uplink (exact:
``reduce(4 numel)``; quantized: the scales ``allreduce(4 ceil(numel/B))`` then either
``reduce(numel * container)`` ("sum") or ``gather(ceil(numel bits / 8))``, whichever moves
fewer bytes; every size comes from :func:`hflmpi.core.wire.layer_wire`) and the downlink
``bcast(4 numel)``. With quantization off the default ``"subtree"`` algorithm replaces a layer-L
event by one ``allreduce(4 numel)`` over the ``m_L`` devices of the subtree. A global round costs
:func:`round_time`, ``T(tau) = t_cp prod(tau) + sum_n t_cm,n prod_{m > n} tau_m`` (the round-time
formula of QMLHFL, arXiv 2505.08145, Sec. V): ``prod(tau)`` steps of compute plus, for every
event, the sum of its layers' costs. This is hflmpi's one round-time model: the tau planner,
the experiments and the scaling predictions all evaluate it.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, replace
from typing import Any, Iterable, Literal, Sequence

import numpy as np

from hflmpi.core.schedule import period_lengths, steps_per_round
from hflmpi.core.wire import Method, layer_wire

__all__ = [
    "Network",
    "INTERCONNECTS",
    "Sample",
    "coefficients",
    "collective_time",
    "layer_time",
    "aggregation_costs",
    "aggregation_counts",
    "event_counts",
    "round_time",
    "bytes_per_layer",
    "bytes_per_round",
    "predict",
    "tree_for",
    "calibrate",
    "fit_compute",
    "with_gamma",
]

Op = Literal["allreduce", "reduce", "bcast", "gather"]

_ALLREDUCE_SHORT = 2048
_REDUCE_SHORT = 2048
_BCAST_SHORT = 12288
_BCAST_LONG = 524288
_BCAST_MIN_PROCS = 8


@dataclass(frozen=True)
class Network:
    """Cost parameters of one interconnect.

    Attributes
    ----------
    name : str
        Short name used on plots and in tables.
    alpha : float
        Seconds per message (latency).
    beta : float
        Seconds per byte (inverse bandwidth).
    gamma : float
        Seconds per byte reduced locally (the reduction's arithmetic).
    family : {"mpich", "nccl"}
        Which algorithms the collectives use (see the module docstring).
    note : str
        Where the numbers come from.
    """

    name: str
    alpha: float
    beta: float
    gamma: float
    family: str = "mpich"
    note: str = ""

    def __post_init__(self) -> None:
        if min(self.alpha, self.beta, self.gamma) < 0:
            raise ValueError(f"{self.name}: alpha, beta and gamma must be >= 0")
        if self.family not in ("mpich", "nccl"):
            raise ValueError(f"family={self.family!r} must be 'mpich' or 'nccl'")


# Reduction arithmetic on a CPU core, when no calibration says otherwise: ~5 GB/s per core.
_CPU_GAMMA = 2e-10

INTERCONNECTS: dict[str, Network] = {
    "ib-hdr": Network("ib-hdr", 1.5e-6, 1 / 12.5e9, _CPU_GAMMA, "mpich",
                      "100 Gb/s InfiniBand HDR100: alpha = 1.5 us, beta = 1/(12.5 GB/s)"),
    "25gbe": Network("25gbe", 10e-6, 1 / 3e9, _CPU_GAMMA, "mpich",
                     "25 Gb/s Ethernet (TCP): alpha = 10 us, beta = 1/(3 GB/s)"),
    "nvlink": Network("nvlink", 5e-6, 1 / 150e9, 1 / 1e12, "nccl",
                      "NVLink/NCCL-like intra-node: alpha = 5 us per ring step, "
                      "beta = 1/(150 GB/s), gamma = 1/(1 TB/s) on the GPU"),
}
"""Named interconnects with stated (alpha, beta, gamma); calibrate shared memory with :func:`calibrate`."""


# ---------------------------------------------------------------------------------------------
# Collectives


def _lg(p: int) -> int:
    return max(0, math.ceil(math.log2(p))) if p > 1 else 0


def coefficients(op: Op, p: int, nbytes: float, family: str = "mpich") -> tuple[float, float, float]:
    """Return ``(a, b, c)`` with ``cost = a alpha + b beta + c gamma`` for one collective.

    Parameters
    ----------
    op : {"allreduce", "reduce", "bcast", "gather"}
    p : int
        Processes taking part (1 costs nothing).
    nbytes : float
        Message size per process (for ``gather``: what each process contributes).
    family : {"mpich", "nccl"}
        Algorithm selection (see the module docstring).
    """
    if p < 1 or nbytes < 0:
        raise ValueError(f"p={p} must be >= 1 and nbytes={nbytes} >= 0")
    if p == 1:
        return (0.0, 0.0, 0.0)
    lg, n, frac = _lg(p), float(nbytes), (p - 1) / p
    if family == "nccl":
        if op == "allreduce":
            return (2.0 * (p - 1), 2 * frac * n, frac * n)
        if op == "reduce":
            return (float(p - 1), n, frac * n)
        if op == "bcast":
            return (float(p - 1), n, 0.0)
        if op == "gather":
            return (float(p - 1), (p - 1) * n, 0.0)
        raise ValueError(f"unknown collective {op!r}")
    if op == "allreduce":
        if n <= _ALLREDUCE_SHORT:
            return (float(lg), lg * n, lg * n)
        return (2.0 * lg, 2 * frac * n, frac * n)
    if op == "reduce":
        if n <= _REDUCE_SHORT:
            return (float(lg), lg * n, lg * n)
        return (2.0 * lg, 2 * frac * n, frac * n)
    if op == "bcast":
        if n < _BCAST_SHORT or p < _BCAST_MIN_PROCS:
            return (float(lg), lg * n, 0.0)
        pof2 = p & (p - 1) == 0
        if n < _BCAST_LONG and pof2:
            return (2.0 * lg, 2 * frac * n, 0.0)
        return (float(lg + p - 1), 2 * frac * n, 0.0)
    if op == "gather":
        return (float(lg), (p - 1) * n, 0.0)
    raise ValueError(f"unknown collective {op!r}")


def collective_time(op: Op, p: int, nbytes: float, net: Network) -> float:
    """Return the modelled seconds of one collective on ``net``."""
    a, b, c = coefficients(op, p, nbytes, net.family)
    return a * net.alpha + b * net.beta + c * net.gamma


# ---------------------------------------------------------------------------------------------
# The round: T(tau) and how many aggregations it holds


def aggregation_counts(tau: Sequence[int]) -> list[int]:
    """Return, per layer n, the layer-n aggregations of one round: ``prod_{m > n} tau_m``.

    A round is ``prod(tau)`` SGD steps and a layer-n period ``prod_{m <= n} tau_m`` of them
    (:func:`hflmpi.core.schedule.period_lengths`).
    """
    steps = steps_per_round(tau)
    return [steps // length for length in period_lengths(tau)]


def event_counts(tau: Sequence[int]) -> list[int]:
    """Return, per layer L, how many aggregation events per round have top layer exactly L.

    Layer-L periods end :func:`aggregation_counts` times per round; those that are also a
    layer-(L+1) boundary belong to the higher layer. This counts the layers
    :func:`hflmpi.core.schedule.round_events` yields.
    """
    ends = aggregation_counts(tau)
    return [ends[n] - (ends[n + 1] if n + 1 < len(ends) else 0) for n in range(len(ends))]


def round_time(tau: Any, t_cp: float, t_cm: Sequence[float]) -> Any:
    """Return ``T(tau) = t_cp prod(tau) + sum_n t_cm[n] prod_{m > n} tau_m``: one global round.

    The round-time model of QMLHFL (arXiv 2505.08145, Sec. V) and the one hflmpi uses
    everywhere: the tau planner (:mod:`hflmpi.core.tau_search`) optimises it, the experiments
    report it, :func:`predict` fills ``t_cm`` from an interconnect (:func:`aggregation_costs`).

    Parameters
    ----------
    tau : sequence of int, or 2-D array
        Intra-layer iteration counts ``tau_1..tau_N``; or one schedule per row.
    t_cp : float
        Seconds of one local SGD step.
    t_cm : sequence of float
        Seconds that a layer-n aggregation adds, ``n = 1..N`` (a layer-L event costs
        ``sum_{n <= L} t_cm[n]``).

    Returns
    -------
    float, or an array with one value per row of ``tau``.
    """
    costs = [float(c) for c in t_cm]
    grid = np.atleast_2d(np.asarray(tau, dtype=np.int64))
    if grid.ndim != 2 or grid.shape[1] != len(costs) or (grid < 1).any():
        raise ValueError(f"tau={tau} needs {len(costs)} integers >= 1 per schedule (one per t_cm)")
    ones = np.ones((len(grid), 1), dtype=np.int64)
    after = np.cumprod(np.hstack([grid[:, 1:], ones])[:, ::-1], axis=1)[:, ::-1]  # prod_{m>n}
    total = t_cp * np.prod(grid, axis=1).astype(np.float64)
    for n, cost in enumerate(costs):
        total = total + cost * after[:, n].astype(np.float64)
    return float(total[0]) if np.ndim(tau) == 1 else total


# ---------------------------------------------------------------------------------------------
# hflmpi's aggregation


def _nets(net: Network | Sequence[Network], depth: int) -> list[Network]:
    nets = [net] * depth if isinstance(net, Network) else list(net)
    if len(nets) != depth:
        raise ValueError(f"give one network or one per layer ({depth}), got {len(nets)}")
    return nets


def layer_time(
    fanout: int, numel: int, bits: int, net: Network, bucket_size: int = 0, method: str = "auto",
    downlink: str = "float32",
) -> float:
    """Return the modelled seconds of one layer-n aggregation (tree/quantized path).

    Weight allreduce (8 B) + uplink (exact reduce, or scales allreduce + integer reduce / packed
    gather, sized by :func:`hflmpi.core.wire.layer_wire`) + the broadcast back down, all over the
    ``fanout`` participants. ``downlink`` is ``quantize.downlink`` (a run's default is ``"auto"``).
    """
    wire = layer_wire(numel, bits, fanout, bucket_size, method, downlink=downlink)
    seconds = collective_time("allreduce", fanout, 8, net)
    if wire.scale_nbytes:
        seconds += collective_time("allreduce", fanout, wire.scale_nbytes, net)
    uplink: Op = "gather" if wire.method == Method.GATHER else "reduce"
    seconds += collective_time(uplink, fanout, wire.payload_nbytes, net)
    return seconds + collective_time("bcast", fanout, wire.downlink_nbytes, net)


def _subtree_sizes(fanouts: Sequence[int]) -> list[int]:
    return [math.prod(fanouts[: n + 1]) for n in range(len(fanouts))]


def _exact_subtree(top: int, bits: Sequence[int], algorithm: str) -> bool:
    """Tell whether a layer-``top`` event is one exact allreduce over the subtree."""
    return algorithm == "subtree" and not any(bits[:top])


def _event_time(
    top: int, fanouts: Sequence[int], numel: int, bits: Sequence[int], nets: Sequence[Network],
    bucket_size: int, algorithm: str, method: str, downlink: str = "float32",
) -> float:
    if _exact_subtree(top, bits, algorithm):
        size = _subtree_sizes(fanouts)[top - 1]
        slowest = max(nets[:top], key=lambda n: (n.beta, n.alpha))
        model = layer_wire(numel, 0, size).payload_nbytes  # every device's float32 model
        return (collective_time("allreduce", size, 8, slowest)
                + collective_time("allreduce", size, model, slowest))
    return sum(layer_time(fanouts[n], numel, bits[n], nets[n], bucket_size, method, downlink)
               for n in range(top))


def _layers(fanouts: Sequence[int], bits: Sequence[int] | None) -> list[int]:
    depth = len(fanouts)
    widths = [0] * depth if bits is None else [int(b) for b in bits]
    if len(widths) != depth:
        raise ValueError(f"bits={widths} needs one entry per layer ({depth})")
    return widths


def aggregation_costs(
    fanouts: Sequence[int], numel: int, net: Network | Sequence[Network],
    bits: Sequence[int] | None = None, bucket_size: int = 0, algorithm: str = "subtree",
    method: str = "auto", downlink: str = "float32",
) -> list[float]:
    """Return ``t_cm,n``, the seconds a layer-n aggregation adds to an event, for :func:`round_time`.

    On the tree/quantized path this is :func:`layer_time` of layer n. With the exact ``"subtree"``
    algorithm a layer-L event is one allreduce over the ``m_L`` devices of the subtree (on the
    slowest of layers 1..L), so ``t_cm,n`` is what a layer-n event costs beyond a layer-(n-1)
    one; either way a layer-L event costs ``sum_{n <= L} t_cm,n``.

    ``fanouts`` (children per node per layer), ``numel`` (float32 parameters), ``net`` (one
    interconnect or one per layer), ``bits`` (default exact), ``bucket_size`` (0 = per-width
    default), ``algorithm`` and ``method`` are hflmpi's tree and ``aggregation``/``quantize``
    settings (``downlink``: ``quantize.downlink``).
    """
    widths = _layers(fanouts, bits)
    nets = _nets(net, len(fanouts))
    events = [_event_time(top, fanouts, numel, widths, nets, bucket_size, algorithm, method, downlink)
              for top in range(1, len(fanouts) + 1)]
    return [events[0]] + [events[n] - events[n - 1] for n in range(1, len(events))]


def bytes_per_layer(
    fanouts: Sequence[int], tau: Sequence[int], numel: int, bits: Sequence[int] | None = None,
    bucket_size: int = 0, algorithm: str = "subtree", method: str = "auto",
) -> list[float]:
    """Return the uplink bytes of one round per layer, summed over ranks, as hflmpi records them.

    This is the model of ``/metrics/bytes_sent`` (:mod:`hflmpi.record.store`). Exact subtree event at
    layer L: every device but the subtree's root sends ``4 numel``, charged to layer L.
    Nested/tree layer n: every non-leader participant sends its payload and, on quantized
    layers, every participant its scales (:attr:`hflmpi.core.wire.LayerWire.uplink_nbytes`).
    """
    widths = _layers(fanouts, bits)
    sizes = _subtree_sizes(fanouts)
    world = sizes[-1]
    totals = [0.0] * len(fanouts)
    for top, count in enumerate(event_counts(tau), start=1):
        if not count:
            continue
        if _exact_subtree(top, widths, algorithm):  # one exact "layer" over the whole subtree
            subtree = layer_wire(numel, 0, sizes[top - 1])
            totals[top - 1] += count * (world // sizes[top - 1]) * subtree.uplink_nbytes
            continue
        for n in range(top):
            wire = layer_wire(numel, widths[n], fanouts[n], bucket_size, method)
            totals[n] += count * (world // sizes[n]) * wire.uplink_nbytes
    return totals


def bytes_per_round(
    fanouts: Sequence[int], tau: Sequence[int], numel: int, bits: Sequence[int] | None = None,
    bucket_size: int = 0, algorithm: str = "subtree", method: str = "auto",
) -> float:
    """Return the uplink bytes of one round summed over layers and ranks (see :func:`bytes_per_layer`)."""
    return float(sum(bytes_per_layer(fanouts, tau, numel, bits, bucket_size, algorithm, method)))


def tree_for(world: int, depth: int, node: int = 8) -> list[int]:
    """Return fan-outs for ``world`` ranks and ``depth`` layers: groups of ``node`` first.

    The rest, ``world / node``, is split into ``depth - 1`` power-of-two factors as evenly as
    possible (larger last): ``tree_for(64, 3) == [8, 2, 4]``, ``tree_for(4096, 2) == [8, 512]``.
    Needs ``world`` to be a power of two times ``node`` (or ``depth == 1``).
    """
    if depth == 1:
        return [world]
    first = min(node, world)
    rest = world // first
    if first * rest != world or rest & (rest - 1):
        raise ValueError(f"world={world} is not node={node} times a power of two")
    exponent = int(math.log2(rest)) if rest > 1 else 0
    parts = [exponent // (depth - 1)] * (depth - 1)
    for i in range(exponent % (depth - 1)):
        parts[-1 - i] += 1
    return [first, *(2**e for e in parts)]


def predict(
    world: int, fanouts: Sequence[int], tau: Sequence[int], numel: int, t_cp: float,
    net: Network | Sequence[Network], bits: Sequence[int] | None = None, bucket_size: int = 0,
    algorithm: str = "subtree", overhead: float = 0.0,
) -> dict[str, float]:
    """Return predicted ``rounds_per_second``, ``round_seconds``, ``comm_seconds`` and ``bytes_per_round``.

    ``overhead`` adds fixed seconds per round (hflmpi's bookkeeping: the loss and metric
    reductions, rank 0's HDF5 append and flush), measured by :mod:`hflmpi.bench.scaling`.
    """
    if math.prod(fanouts) != world:
        raise ValueError(f"fanouts={list(fanouts)} do not multiply to world={world}")
    costs = aggregation_costs(fanouts, numel, net, bits, bucket_size, algorithm)
    comm = round_time(tau, 0.0, costs)
    seconds = round_time(tau, t_cp, costs) + overhead
    return {
        "world": float(world),
        "round_seconds": seconds,
        "comm_seconds": comm,
        "rounds_per_second": 1.0 / seconds if seconds > 0 else math.inf,
        "bytes_per_round": bytes_per_round(fanouts, tau, numel, bits, bucket_size, algorithm),
    }


# ---------------------------------------------------------------------------------------------
# Calibration


@dataclass(frozen=True)
class Sample:
    """One timed collective: ``seconds`` for ``op`` over ``p`` processes of ``nbytes`` each."""

    op: str
    p: int
    nbytes: float
    seconds: float


def _nnls(matrix: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Non-negative least squares for a few columns: best fit over all column subsets."""
    cols = matrix.shape[1]
    best, best_res = np.zeros(cols), float(np.sum(target**2))
    for k in range(1, cols + 1):
        for subset in itertools.combinations(range(cols), k):
            sub = matrix[:, subset]
            if np.linalg.matrix_rank(sub) < k:
                continue
            coef, *_ = np.linalg.lstsq(sub, target, rcond=None)
            if (coef < 0).any():
                continue
            res = float(np.sum((sub @ coef - target) ** 2))
            if res < best_res:
                best_res, best = res, np.zeros(cols)
                best[list(subset)] = coef
    return best


def calibrate(
    samples: Iterable[Sample], name: str = "shm-calibrated", family: str = "mpich",
    relative: bool = True, note: str = "",
) -> Network:
    """Fit ``(alpha, beta, gamma)`` to timed collectives by (weighted) non-negative least squares.

    Each sample gives one equation ``a alpha + b beta + c gamma = seconds`` with ``(a, b, c)``
    from :func:`coefficients`. With ``relative`` (the default) every equation is divided by its
    measured time, so the fit minimises relative error and the small, latency-bound messages
    weigh as much as the large ones. Samples with ``p = 1`` carry no information and are dropped.

    Raises
    ------
    ValueError
        If fewer than three informative samples remain.
    """
    rows, target = [], []
    for s in samples:
        if s.p < 2 or not s.seconds > 0:
            continue
        coef = coefficients(s.op, s.p, s.nbytes, family)  # type: ignore[arg-type]
        scale = 1 / s.seconds if relative else 1.0
        rows.append([x * scale for x in coef])
        target.append(s.seconds * scale)
    if len(rows) < 3:
        raise ValueError(f"calibration needs >= 3 timed collectives with p >= 2, got {len(rows)}")
    matrix, y = np.asarray(rows), np.asarray(target)
    col_scale = np.maximum(np.abs(matrix).max(axis=0), 1e-300)  # condition the columns
    alpha, beta, gamma = _nnls(matrix / col_scale, y) / col_scale
    return Network(name, float(alpha), float(beta), float(gamma), family,
                   note or f"least-squares fit to {len(rows)} timed collectives")


def fit_compute(batches: Sequence[float], seconds_per_step: Sequence[float]) -> tuple[float, float]:
    """Fit ``t_cp(b) = c0 + c1 b`` (seconds per SGD step at batch ``b``), non-negative.

    With a single distinct batch size the whole time goes to ``c1 b``.
    """
    b = np.asarray(batches, dtype=np.float64)
    t = np.asarray(seconds_per_step, dtype=np.float64)
    if b.size == 0:
        raise ValueError("no compute samples")
    if np.unique(b).size < 2:
        return 0.0, float(np.median(t / b))
    c0, c1 = _nnls(np.stack([np.ones_like(b), b], axis=1), t)
    return float(c0), float(c1)


def with_gamma(net: Network, gamma: float) -> Network:
    """Return ``net`` with its reduction cost replaced (e.g. by a calibrated CPU gamma)."""
    return replace(net, gamma=gamma)
