"""H-SGD's upward and downward divergences over a tree of clients placed on ranks.

The population twin of :func:`hflmpi.mpi.divergence.measure_divergences`: the device models are
the trained models of the round's participants just before the top-layer aggregation, the groups
are the layer-1 nodes. With ``w_c`` a participant's weight, ``x_g`` a layer-1 node's weighted mean
over its participants and ``x`` the weighted mean over all participants (both exact, unquantized):

    upward   = sum_g W_g ||x_g - x||^2 / W
    downward = sum_c w_c ||x_c - x_g(c)||^2 / W

(Wang et al., AAAI 2022, Sec. 4). Sums are in float64; placements differ only in the order of
those sums. Costs one full-model ``Allreduce`` over the world, one over this rank's spanning
layer-1 node (if any) and one of two scalars.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from mpi4py import MPI

from hflmpi.core.population import PopulationPlan

__all__ = ["population_divergences"]


def population_divergences(comm: MPI.Comm, node_comm: MPI.Comm | None, plan: PopulationPlan,
                           trained: dict[int, torch.Tensor], client_weights: np.ndarray,
                           numel: int) -> tuple[float, float]:
    """Return (upward, downward) divergences of this round's participants (all ranks).

    Parameters
    ----------
    comm : MPI.Comm
        All ranks of the run.
    node_comm : MPI.Comm or None
        The communicator of the one spanning layer-1 node this rank holds clients of, if any.
    plan : PopulationPlan
        The tree of clients on the ranks.
    trained : dict of int to Tensor
        The trained (flat) model of every participant on this rank.
    client_weights : ndarray
        Every client's weight this round, 0 for one that did not take part (the same on all ranks).
    numel : int
        Model size.

    Returns
    -------
    tuple of float
        ``(nan, nan)`` when no client took part.
    """
    rank = comm.Get_rank()
    weights = np.asarray(client_weights, dtype=np.float64)
    total = float(weights.sum())
    if total <= 0:
        return math.nan, math.nan
    mine = {c: trained[c].detach().to("cpu", torch.float64).numpy() for c in sorted(trained)
            if weights[c] > 0}
    global_model = np.zeros(numel)
    for c, x in mine.items():
        global_model += weights[c] * x
    comm.Allreduce(MPI.IN_PLACE, global_model, op=MPI.SUM)
    global_model /= total
    group_models = {}
    for k in plan.nodes_on(rank, 1):
        node_weight = float(weights[list(plan.children(1, k))].sum())
        partial = np.zeros(numel)
        for c in plan.children(1, k):
            if c in mine:
                partial += weights[c] * mine[c]
        if plan.spans(1, k):
            assert node_comm is not None
            node_comm.Allreduce(MPI.IN_PLACE, partial, op=MPI.SUM)
        if node_weight > 0:
            group_models[k] = partial / node_weight
    sums = np.zeros(2)
    for k, x_g in group_models.items():
        if plan.owner(1, k) == rank:  # each node counted once
            diff = x_g - global_model
            sums[0] += float(weights[list(plan.children(1, k))].sum()) * float(np.dot(diff, diff))
    for c, x in mine.items():
        diff = x - group_models[plan.node_of(c, 1)]
        sums[1] += weights[c] * float(np.dot(diff, diff))
    comm.Allreduce(MPI.IN_PLACE, sums, op=MPI.SUM)
    return float(sums[0] / total), float(sums[1] / total)

