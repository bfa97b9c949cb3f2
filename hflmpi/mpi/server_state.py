"""Server optimizer state in checkpoints: gather it from the layer leaders, hand it back on resume.

The state of a layer-``n`` server optimizer (:mod:`hflmpi.core.server_opt`) lives on the leader
of each layer-``n`` group. A checkpoint stores it as one float64 array per layer,
``server_opt_layer{n}`` of shape ``[groups, slots, numel]`` (groups in the order of their
leaders' ranks, slots ``m`` then ``v``), gathered over a communicator of that layer's leaders
that exists only while the checkpoint is written or read. Rank 0 leads every layer, so it is rank
0 of each such communicator and writes the file.

The state is a function of the layer's aggregates only (what the leader computes and sends on
anyway), never of one child's update, so it is kept on secure and private layers too: after DP
noise it is post-processing, and under secure aggregation the leader learns the group sum by
design. See docs/strategies.md.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import torch
from mpi4py import MPI

from hflmpi.mpi.aggregate import HierarchicalAggregator
from hflmpi.mpi.comm import LayerComms
from hflmpi.mpi.messages import gather_array, scatter_array

__all__ = ["state_name", "gather_server_state", "restore_server_state"]

_F64 = (np.dtype(np.float64),)


def state_name(n: int) -> str:
    """Return the checkpoint array name of layer ``n``'s server optimizer state."""
    return f"server_opt_layer{n}"


def _leaders(comms: LayerComms, n: int) -> MPI.Comm:
    """Split off the leaders of layer ``n`` (all ranks; COMM_NULL elsewhere); caller frees it."""
    return comms.comm.Split(0 if comms.leads(n) else MPI.UNDEFINED, comms.rank)


def _layers(aggregator: HierarchicalAggregator) -> list[int]:
    """Return the layers with a server optimizer (the same on every rank)."""
    return [n for n, o in enumerate(aggregator.server_opt, start=1)
            if o is not None and o.name != "none"]


def gather_server_state(aggregator: HierarchicalAggregator) -> dict[str, np.ndarray]:
    """Stack every leader's server optimizer state at rank 0, per layer (all ranks).

    Returns the arrays to checkpoint on rank 0 (see the module docstring), ``{}`` elsewhere.
    """
    comms, numel = aggregator.comms, aggregator.numel
    optimizers = aggregator.server_optimizers()
    out: dict[str, np.ndarray] = {}
    for n in _layers(aggregator):
        sub = _leaders(comms, n)
        if sub == MPI.COMM_NULL:
            continue
        try:
            mine = optimizers[n].state_array().cpu().numpy()
            stacked = gather_array(sub, mine, max_elements=mine.size, dtypes=_F64,
                                   shape=(mine.shape[0], numel),
                                   what=f"gathering the layer-{n} server optimizer state")
        finally:
            sub.Free()
        if stacked is not None:
            out[state_name(n)] = stacked
    return out


def restore_server_state(
    aggregator: HierarchicalAggregator, arrays: Mapping[str, Any] | None
) -> list[int]:
    """Send each leader its row of the checkpoint's state (all ranks; ``arrays`` read on rank 0).

    ``arrays`` is the checkpoint's ``extra_arrays``. A layer whose array the checkpoint lacks, or
    holds for an optimizer with other state vectors (a resume that changed ``[server_opt]`` with
    ``--allow-config-change``), keeps the fresh state (``m = 0``, ``v = tau^2``). Returns those
    layers (on the leaders).
    """
    comms, numel = aggregator.comms, aggregator.numel
    optimizers = aggregator.server_optimizers()
    fresh: list[int] = []
    for n in _layers(aggregator):
        sub = _leaders(comms, n)
        if sub == MPI.COMM_NULL:
            continue
        try:
            stacked = None if arrays is None else arrays.get(state_name(n))
            slots = len(optimizers[n].options.slots)
            if stacked is not None and np.ndim(stacked) == 3 and np.shape(stacked)[1] != slots:
                stacked = None  # another optimizer wrote it (a resume that changed the config)
            row = scatter_array(sub, None if stacked is None else np.asarray(stacked),
                                max_elements=slots * numel, dtypes=_F64, shape=(slots, numel),
                                what=f"sending the layer-{n} server optimizer state")
        finally:
            sub.Free()
        if row is None:
            fresh.append(n)
        else:
            optimizers[n].load_state_array(torch.from_numpy(row))
    return fresh
