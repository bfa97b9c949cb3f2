"""Server optimizers at the nodes of a population's tree, and their state in checkpoints.

With ``server_opt.optimizer[n-1]`` set, every layer-``n`` node keeps its own
:class:`hflmpi.core.server_opt.ServerOptimizer`: after the node aggregates (exact or quantized)
to ``y``, its model becomes ``x + step(y - x)`` with ``x`` the node's model before the
aggregation (its anchor: what it last sent down or received from above). A node with no
participant does not aggregate and does not step (its model and its state stay as they are).

Every rank that holds clients of a node keeps a copy of its state and takes the same step on the
same bits (the aggregate of a spanning node is the same on each of its ranks after the
``Allreduce``), so the copies stay identical without any message. Memory: ``slots * numel``
float64 per node a rank holds at a layer with an optimizer (``slots`` = 1 for ``avgm``, 2 for the
adaptive methods).

Checkpoints hold one float64 array per such layer, ``server_opt_layer{n}`` of shape
``[nodes, slots, numel]`` (nodes in id order; the engine's name and layout with groups replaced
by nodes), sent to rank 0 by each node's owner (the rank of its lowest client). A resume sends
every node's row to all ranks and each keeps the rows of its own nodes.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import torch
from mpi4py import MPI

from hflmpi.core.population import PopulationPlan
from hflmpi.core.server_opt import ServerOptimizer, ServerOptOptions
from hflmpi.mpi.guard import agree
from hflmpi.mpi.server_state import state_name

__all__ = ["NodeOptimizers"]

_TAG = 7301


class NodeOptimizers:
    """The server optimizers of the nodes one rank holds (none at layers without one).

    Parameters
    ----------
    plan : PopulationPlan
        The tree of clients on the ranks.
    rank : int
        This rank.
    options : sequence of ServerOptOptions or None
        Per layer ``1..N`` (``None`` or ``"none"``: the layer keeps its aggregate).
    numel : int
        Length of the flat model.
    device : torch.device
        Where the state lives (the model's device).
    """

    def __init__(self, plan: PopulationPlan, rank: int,
                 options: Sequence[ServerOptOptions | None], numel: int,
                 device: torch.device) -> None:
        self.plan = plan
        self.numel = numel
        self.layers = [n for n, o in enumerate(options, start=1)
                       if o is not None and o.name != "none"]
        self.options: dict[int, ServerOptOptions] = {
            n: o for n, o in enumerate(options, start=1) if n in self.layers and o is not None}
        self.optimizers: dict[tuple[int, int], ServerOptimizer] = {
            (n, k): ServerOptimizer(self.options[n], numel, device)
            for n in self.layers for k in plan.nodes_on(rank, n)}
        self._anchor: torch.Tensor | None = None

    def before(self, n: int, k: int, model: torch.Tensor) -> None:
        """Remember node ``k``'s model before it aggregates (a no-op without an optimizer)."""
        if (n, k) not in self.optimizers:
            return
        if self._anchor is None or self._anchor.dtype != model.dtype:
            self._anchor = torch.empty_like(model)
        self._anchor.copy_(model)

    def after(self, n: int, k: int, model: torch.Tensor) -> None:
        """Replace node ``k``'s aggregate ``model`` (in place) by the server step from its anchor."""
        optimizer = self.optimizers.get((n, k))
        if optimizer is None:
            return
        assert self._anchor is not None
        optimizer.step(model, self._anchor)

    def collect_state(self, comm: MPI.Comm) -> dict[str, np.ndarray]:
        """Collect every node's state at rank 0 (all ranks); ``{}`` on the other ranks.

        Point to point: each node's owner sends its ``[slots, numel]`` float64 state to rank 0,
        which receives the nodes in id order.
        """
        rank, plan, out = comm.Get_rank(), self.plan, {}
        for n in self.layers:
            slots = len(self.options[n].slots)
            stacked = (np.empty((plan.node_count(n), slots, self.numel)) if rank == 0 else None)
            for k in range(plan.node_count(n)):
                owner = plan.owner(n, k)
                if owner == rank:
                    row = np.ascontiguousarray(self.optimizers[(n, k)].state_array().cpu().numpy())
                    if rank == 0:
                        assert stacked is not None
                        stacked[k] = row
                    else:
                        comm.Send(row, dest=0, tag=_TAG)
                elif rank == 0:
                    assert stacked is not None
                    comm.Recv(stacked[k], source=owner, tag=_TAG)
            if stacked is not None:
                out[state_name(n)] = stacked
        return out

    def restore(self, comm: MPI.Comm, arrays: Mapping[str, Any] | None, allow_fresh: bool) -> None:
        """Load every node's state from rank 0's checkpoint arrays (all ranks).

        A layer whose array is missing or of another shape is refused on every rank, unless
        ``allow_fresh`` (a resume that changed ``[server_opt]`` with ``--allow-config-change``):
        then its nodes keep the fresh state (``m = 0``, ``v = tau^2``), as the engine does.
        """
        plan, rank = self.plan, comm.Get_rank()

        def present() -> list[int]:
            found = []
            for n in self.layers:
                want = (plan.node_count(n), len(self.options[n].slots), self.numel)
                stacked = None if arrays is None else arrays.get(state_name(n))
                shape = None if stacked is None else tuple(np.shape(stacked))
                if shape == want:
                    found.append(n)
                elif not allow_fresh:
                    raise ValueError(
                        f"the checkpoint holds {state_name(n)} of shape {shape}, not {want} "
                        f"(server_opt.optimizer[{n - 1}]={self.options[n].name!r} over "
                        f"{want[0]} layer-{n} nodes): it was written without this server "
                        "optimizer; resume with the run's config, or pass "
                        "--allow-config-change to start the optimizer afresh")
            return found

        found = agree(comm, "checking the checkpoint's server optimizer state",
                      lambda: present() if rank == 0 else [])
        flags = np.array([n in found for n in self.layers], dtype=np.int32)
        comm.Bcast(flags, root=0)  # all ranks: which layers the checkpoint holds
        for n, flag in zip(self.layers, flags):
            if not flag:
                continue
            slots = len(self.options[n].slots)
            for k in range(plan.node_count(n)):
                row = (np.ascontiguousarray(np.asarray(arrays[state_name(n)][k]), dtype=np.float64)
                       if rank == 0 and arrays is not None
                       else np.empty((slots, self.numel), dtype=np.float64))
                comm.Bcast(row, root=0)  # all ranks; those holding node k keep it
                optimizer = self.optimizers.get((n, k))
                if optimizer is not None:
                    optimizer.load_state_array(torch.from_numpy(row))
