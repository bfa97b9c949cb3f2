"""H-SGD's upward and downward divergences of the device models (a diagnostic, not aggregation)."""

from __future__ import annotations

import math

import numpy as np
import torch
from mpi4py import MPI

from hflmpi.mpi.comm import LayerComms
from hflmpi.mpi.messages import allreduce_float

__all__ = ["measure_divergences"]


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
