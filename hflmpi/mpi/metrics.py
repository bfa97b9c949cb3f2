"""Per-round metrics: one rank's accumulators and the few small reductions that combine them.

A :class:`RoundMeter` collects what one rank measured in a global round (compute and
communication seconds, uplink bytes, quantization error and method per layer, the training loss)
and :meth:`RoundMeter.combine` turns every rank's values into the round's
:class:`~hflmpi.record.store.RoundMetrics` on rank 0 (sums of bytes and evaluation counts, the
slowest rank's seconds, the weighted mean loss) with four small buffer collectives.
:func:`end_of_round` is the one tiny allreduce per round that tells every rank whether any rank
got a stop signal and whether rank 0 could record the round.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from mpi4py import MPI

from hflmpi.mpi.aggregate import AggregationStats
from hflmpi.mpi.guard import SetupError
from hflmpi.mpi.messages import ERROR_TEXT_BYTES, bcast_text
from hflmpi.record.store import RoundMetrics

__all__ = ["RoundMeter", "RoundResult", "end_of_round"]



@dataclass(frozen=True)
class RoundResult:
    """What a round's reductions give every rank, and rank 0 the row for the run file."""

    train_loss: float
    test: tuple[float, float] | None  # (loss, accuracy) of the global model, if evaluated
    metrics: RoundMetrics | None  # rank 0 only


class RoundMeter:
    """One rank's measurements in global round ``rnd`` of a tree of ``depth`` layers.

    Parameters
    ----------
    depth : int
        Aggregation layers.
    rnd : int
        The global round (1-based).
    device : torch.device
        Where the training losses are summed (no host sync per step).
    """

    def __init__(self, depth: int, rnd: int, device: torch.device) -> None:
        self.depth = depth
        self.round = rnd
        self.started = time.perf_counter()
        self._period_start = self.started
        self.compute = np.zeros(depth)
        self.comm_seconds = np.zeros(depth)
        self.bytes_sent = np.zeros(depth)
        self.quant_error = np.full(depth, np.nan)
        self.methods = [0] * depth
        self.divergences = (math.nan, math.nan)
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=device)

    def add_loss(self, loss: torch.Tensor) -> None:
        """Add one local step's training loss."""
        self.loss_sum += loss

    def end_compute(self, layer: int) -> None:
        """Close the compute period that ends in a layer-``layer`` aggregation."""
        self.compute[layer - 1] += time.perf_counter() - self._period_start

    def add_aggregation(self, layer: int, stats: AggregationStats) -> None:
        """Add the cost of one aggregation of layers ``1..layer``; a new compute period starts."""
        self.comm_seconds[:layer] += stats.seconds
        self.bytes_sent[:layer] += stats.bytes_sent
        for n, (err, method) in enumerate(zip(stats.quant_error, stats.methods)):
            if not math.isnan(err):
                worst = self.quant_error[n]
                self.quant_error[n] = err if math.isnan(worst) else max(worst, err)
            self.methods[n] = method
        self._period_start = time.perf_counter()

    def combine(
        self, comm: MPI.Comm, weight: float, steps: int, evaluation: np.ndarray | None,
        samples_per_round: int, run_started: float,
    ) -> RoundResult:
        """Combine every rank's measurements (all ranks; four small buffer collectives).

        ``evaluation`` holds this rank's ``[loss * count, accuracy * count, count]`` on its slice
        of the test set (``None`` on rounds without evaluation: then no rank passes one).
        """
        test = None
        if evaluation is not None:
            comm.Allreduce(MPI.IN_PLACE, evaluation, op=MPI.SUM)
            test = (float(evaluation[0] / evaluation[2]), float(evaluation[1] / evaluation[2]))
        loss = np.array([float(self.loss_sum) / steps * weight, weight], dtype=np.float64)
        comm.Allreduce(MPI.IN_PLACE, loss, op=MPI.SUM)
        train_loss = float(loss[0] / loss[1]) if loss[1] > 0 else math.nan
        totals = _reduce(comm, self.bytes_sent, MPI.SUM)
        worst = np.concatenate([self.compute, self.comm_seconds,
                                np.nan_to_num(self.quant_error, nan=-1.0)])
        slowest = _reduce(comm, worst, MPI.MAX)
        if comm.Get_rank() != 0:
            return RoundResult(train_loss, test, None)
        depth, now = self.depth, time.perf_counter()
        metrics = RoundMetrics(
            round=self.round, wall_time=now - run_started, train_loss=train_loss,
            test_loss=test[0] if test else math.nan, test_accuracy=test[1] if test else math.nan,
            samples_per_second=samples_per_round / (now - self.started),
            compute_seconds=list(slowest[:depth]), comm_seconds=list(slowest[depth: 2 * depth]),
            bytes_sent=list(totals), mpi_bytes=list(totals), method=list(self.methods),
            quant_error=[math.nan if e < 0 else e for e in slowest[2 * depth:]],
            upward_divergence=self.divergences[0], downward_divergence=self.divergences[1],
        )
        return RoundResult(train_loss, test, metrics)


def _reduce(comm: MPI.Comm, values: np.ndarray, op: MPI.Op) -> np.ndarray:
    """Element-wise reduction of a small float64 vector to rank 0 (buffer API)."""
    values = np.ascontiguousarray(values, dtype=np.float64)
    out = np.empty_like(values) if comm.Get_rank() == 0 else None
    comm.Reduce(values, out, op=op, root=0)
    return out if out is not None else values


def end_of_round(
    comm: MPI.Comm, signalled: bool, record_error: str | None, record_path: Path,
    last_checkpoint: int | None,
) -> bool:
    """Return whether any rank got a stop signal; raise everywhere if rank 0's record failed.

    All ranks: one tiny MAX allreduce per round carries both flags, so a full disk on rank 0
    ends every rank with the same :class:`SetupError` instead of an exception on rank 0 alone.
    """
    flags = np.array([signalled, record_error is not None], dtype=np.int32)
    comm.Allreduce(MPI.IN_PLACE, flags, op=MPI.MAX)
    if flags[1]:
        message = bcast_text(comm, record_error, root=0, max_bytes=ERROR_TEXT_BYTES,
                             what="sharing rank 0's run-record error") or "writing the run record failed"
        kept = ("no checkpoint was written yet" if last_checkpoint is None else
                f"the round-{last_checkpoint} checkpoint is kept; free space and continue with "
                f"--resume {record_path}")
        raise SetupError(f"{message}; {kept}")
    return bool(flags[0])
