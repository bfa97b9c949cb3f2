"""Map a :class:`~hflmpi.core.topology.TreePlan` onto MPI communicators, one group per layer.

For every layer n = 1..N two communicators are made with ``Comm.Split`` (``key = rank``, so the
lowest rank, the node's leader, is rank 0 in each):

* the *layer* communicator joins the leaders of the layer-(n-1) nodes inside one layer-n node
  (every device at n = 1). Ranks that lead nothing at layer n-1 get ``MPI.COMM_NULL``. This is
  where the uplink of layer n is reduced (or gathered) to the layer-n leader.
* the *subtree* communicator joins every device under one layer-n node. Full-precision
  aggregation of layers 1..n collapses into one weighted allreduce over it (see
  :mod:`hflmpi.mpi.aggregate`).

This module and :mod:`hflmpi.mpi.aggregate` are the only places that talk MPI; the communicator is
always passed in explicitly.
"""

from __future__ import annotations

import ctypes
import os
from typing import Sequence

from mpi4py import MPI

from hflmpi.core.topology import TopologyError, TreePlan, plan_nodes
from hflmpi.mpi.messages import allgather_text, bcast_int
from hflmpi.mpi.placement import limit_threads, node_local  # re-exported: one home, old import path

__all__ = ["library_name", "LayerComms", "node_local", "node_names", "plan_from_nodes", "cuda_aware_mpi", "limit_threads",
           "world", "mpi_provenance"]

_NODE_NAME_BYTES = 1024  # longest node name (UTF-8 bytes) a rank may report


class LayerComms:
    """Per-layer communicators of one rank for a planned tree.

    Parameters
    ----------
    comm : MPI.Comm
        The communicator whose ranks are the devices (usually ``MPI.COMM_WORLD``).
    plan : TreePlan
        The tree; ``plan.world_size`` must equal ``comm.Get_size()``.

    Notes
    -----
    Collective: every rank of ``comm`` must construct it with the same plan. Use as a context
    manager (or call :meth:`free`) so the split communicators are released.
    """

    def __init__(self, comm: MPI.Comm, plan: TreePlan) -> None:
        if plan.world_size != comm.Get_size():
            raise TopologyError(
                f"the tree has {plan.world_size} devices but the communicator has "
                f"{comm.Get_size()} ranks; launch with mpiexec -n {plan.world_size} or change the tree"
            )
        self.comm = comm
        self.plan = plan
        self.rank = comm.Get_rank()
        self._layer: list[MPI.Comm] = []
        self._subtree: list[MPI.Comm] = []
        for n in range(1, plan.depth + 1):
            node = plan.node_of(self.rank, n)
            joins = plan.is_leader(self.rank, n - 1)
            self._layer.append(comm.Split(node if joins else MPI.UNDEFINED, self.rank))
            self._subtree.append(comm.Split(node, self.rank))

    @property
    def depth(self) -> int:
        """Number of aggregation layers."""
        return self.plan.depth

    def layer(self, n: int) -> MPI.Comm:
        """Return the layer-``n`` communicator (``MPI.COMM_NULL`` if this rank does not join it)."""
        return self._layer[n - 1]

    def subtree(self, n: int) -> MPI.Comm:
        """Return the communicator of all devices under this rank's layer-``n`` node."""
        return self._subtree[n - 1]

    def joins(self, n: int) -> bool:
        """Tell whether this rank takes part in the layer-``n`` communicator."""
        return self._layer[n - 1] != MPI.COMM_NULL

    def leads(self, n: int) -> bool:
        """Tell whether this rank leads its layer-``n`` node (rank 0 of the layer-``n`` communicator)."""
        return self.plan.is_leader(self.rank, n)

    def free(self) -> None:
        """Free every communicator this object split (idempotent)."""
        for comm in self._layer + self._subtree:
            if comm != MPI.COMM_NULL:
                comm.Free()
        self._layer = [MPI.COMM_NULL] * len(self._layer)
        self._subtree = [MPI.COMM_NULL] * len(self._subtree)

    def __enter__(self) -> "LayerComms":
        return self

    def __exit__(self, *exc: object) -> None:
        self.free()


def node_names(comm: MPI.Comm) -> list[str]:
    """Return, for every rank of ``comm``, a name for the shared-memory node it runs on.

    Collective. Ranks that share memory (``MPI.COMM_TYPE_SHARED``) get the same name: the host
    name of the node's lowest rank, suffixed with that rank so two shared-memory domains on one
    host stay apart. Under MPICH's ``MPIR_CVAR_NOLOCAL`` (every rank its own shared-memory
    domain, as in :mod:`hflmpi.bench.netem`'s emulated nodes) the processor name alone names the
    node. ``HFLMPI_NODE_NAME`` overrides the detected name (for testing "nodes" trees on a single
    machine). Names travel as UTF-8 of at most 1024 bytes.

    Raises
    ------
    hflmpi.mpi.messages.MessageError
        On every rank, if a name is longer or not UTF-8.
    """
    local = comm.Split_type(MPI.COMM_TYPE_SHARED, key=comm.Get_rank())
    try:
        first_rank = bcast_int(local, comm.Get_rank() if local.Get_rank() == 0 else None, root=0,
                               low=0, high=comm.Get_size() - 1, what="naming the node's first rank")
    finally:
        local.Free()
    domain = "" if _no_local() else f"#{first_rank}"
    name = os.environ.get("HFLMPI_NODE_NAME") or f"{MPI.Get_processor_name()}{domain}"
    names = allgather_text(comm, name, max_bytes=_NODE_NAME_BYTES, strict=True,
                           what="sharing the node names (HFLMPI_NODE_NAME or the processor name)")
    return [str(n) for n in names]  # strict: every entry is a validated text


def library_name() -> str:
    """Return the first line of ``MPI.Get_library_version()`` (e.g. ``"MPICH Version: 4.2.0"``).

    Open MPI ends the string with a NUL byte, which HDF5 refuses in a string attribute: NULs go.
    """
    lines = MPI.Get_library_version().replace("\x00", "").strip().splitlines()
    return lines[0].strip() if lines else "an unknown MPI library"


def mpi_provenance(comm: MPI.Comm) -> dict[str, object]:
    """Return the MPI facts of a run: library string, standard version, every rank's host name.

    Collective (one typed text allgather, no pickle). ``mpi_library`` is the first line of
    ``MPI.Get_library_version()`` (e.g. ``"MPICH Version:      4.3.0"``), the one that tells
    Open MPI from MPICH and their releases apart; ``host_names`` holds ``MPI.Get_processor_name()``
    of every rank, in rank order.
    """
    major, minor = MPI.Get_version()
    hosts = allgather_text(comm, MPI.Get_processor_name(), max_bytes=_NODE_NAME_BYTES,
                           what="sharing the host names for the run record")
    return {"mpi_library": library_name(), "mpi_standard": f"{major}.{minor}",
            "host_names": [h or "" for h in hosts], "world_size": comm.Get_size()}


def _no_local() -> bool:
    """Tell whether MPICH was told to treat every rank as remote (no shared-memory domains)."""
    names = ("MPIR_CVAR_NOLOCAL", "MPIR_PARAM_NOLOCAL", "MPICH_NOLOCAL")  # MPICH's spellings
    return any(os.environ.get(n, "").strip().lower() in ("1", "true", "yes", "on") for n in names)


def plan_from_nodes(comm: MPI.Comm, node_fanouts: Sequence[int] = ()) -> TreePlan:
    """Plan a tree with one layer-1 group per physical node (collective over ``comm``)."""
    return plan_nodes(node_names(comm), node_fanouts)


def cuda_aware_mpi() -> bool:
    """Tell whether the loaded MPI library accepts CUDA device buffers.

    ``HFLMPI_CUDA_AWARE=0|1`` overrides detection. Otherwise Open MPI's
    ``MPIX_Query_cuda_support`` or MPICH's ``MPIX_GPU_query_support`` is asked through ctypes;
    when neither exists the answer is ``False`` and device buffers are staged through pinned host
    memory.
    """
    forced = os.environ.get("HFLMPI_CUDA_AWARE")
    if forced is not None:
        return forced.strip() not in ("", "0", "false", "no")
    process = ctypes.CDLL(None)
    for handle in _mpi_library_handles(process):
        query = getattr(handle, "MPIX_Query_cuda_support", None)
        if query is not None:
            query.restype = ctypes.c_int
            return bool(query())
        gpu_query = getattr(handle, "MPIX_GPU_query_support", None)
        if gpu_query is not None:
            supported = ctypes.c_int(0)
            mpix_gpu_support_cuda = 1  # MPIX_GPU_SUPPORT_CUDA in MPICH's mpi_proto.h
            if gpu_query(ctypes.c_int(mpix_gpu_support_cuda), ctypes.byref(supported)) == 0:
                return bool(supported.value)
    return False


def _mpi_library_handles(process: ctypes.CDLL) -> list[ctypes.CDLL]:
    handles = [process]
    try:
        import mpi4py.MPI as mpi_module

        handles.append(ctypes.CDLL(mpi_module.__file__))
    except OSError:
        pass
    return handles


def world() -> MPI.Comm:
    """Return ``MPI.COMM_WORLD``: every process of ``mpiexec``, or this one alone (size 1)."""
    return MPI.COMM_WORLD
