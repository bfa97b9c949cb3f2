"""What a population's round loop hands to the user's callbacks (:mod:`hflmpi.callbacks`).

The protocol is the engine's: the ranks agree at set-up on which hook points any rank has
(:class:`hflmpi.mpi.hooks.Hooks`), every rank calls its own callbacks at those points, and an
exception on one rank stops the run on every rank with a :class:`hflmpi.callbacks.CallbackError`.
What differs is what "this rank's model" means when a rank holds many clients:

* ``on_aggregation`` runs after every aggregation (layers ``1..layer``), on every rank; the
  model is the one this rank's **lowest client** starts its next period from (its layer-1 node's
  model, which the aggregation has just set to its layer-``layer`` node's model). ``dropped`` is
  always empty (a population leaves clients out by selection, recorded in the run file).
* ``on_round_end`` runs after each global round is recorded, on every rank; the model is the
  global model (the same bits on every rank). ``train_loss`` is the mean training loss over the
  round's participants, weighted like the aggregation (samples, or one per client), the same
  value on every rank; ``metrics`` is the run file's row, on rank 0 only.

Both are built only when some rank has a callback for the hook (the model is copied into the
rank's working parameters, which the next period overwrites anyway).
"""

from __future__ import annotations

import math
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from hflmpi.callbacks import AggregationInfo, RoundInfo
from hflmpi.learn.flat import FlatParameters
from hflmpi.record.store import RoundMetrics

__all__ = ["aggregation_info", "round_info", "weighted_loss"]


def weighted_loss(losses: np.ndarray, weights: np.ndarray) -> float:
    """Return the mean of the non-NaN ``losses`` weighted by ``weights`` (NaN if there is none)."""
    trained = ~np.isnan(losses)
    total = weights[trained].sum()
    return float(np.dot(losses[trained], weights[trained]) / total) if total > 0 else math.nan


def aggregation_info(module: torch.nn.Module, params: FlatParameters, model: torch.Tensor,
                     rnd: int, step: int, steps: int, layer: int, depth: int, rank: int,
                     size: int) -> AggregationInfo:
    """Describe one aggregation; ``model`` (this rank's lowest client's start) goes into ``params``."""
    params.flat.copy_(model)
    return AggregationInfo(module, params.flat, rnd, step, (rnd - 1) * steps + step, layer,
                           depth, rank, size, ())


def round_info(module: torch.nn.Module, params: FlatParameters, model: torch.Tensor, rnd: int,
               rounds: int, rank: int, size: int, train_loss: float,
               test: tuple[float, float] | None, metrics: RoundMetrics | None,
               record_path: Path) -> RoundInfo:
    """Describe a finished round; the global ``model`` goes into ``params``."""
    params.flat.copy_(model)
    test_loss, test_accuracy = test if test is not None else (math.nan, math.nan)
    return RoundInfo(module, params.flat, rnd, rounds, rank, size, train_loss, test_loss,
                     test_accuracy, asdict(metrics) if metrics is not None else None, record_path)
