"""Where a rank runs: its launcher, its slot on the node, its CPUs and its GPU.

Three start-up decisions that batch systems get subtly wrong, each a pure rule (testable
serially with plain sets and environment dicts) plus a thin collective that feeds it:

* :func:`srun_world_problem` / :func:`check_srun_world`: a task started by ``srun`` whose MPI
  world is not srun's step (the PMI plugin does not match the MPI library: every task then runs
  as a world of size 1 and "succeeds" alone) is stopped with one clear line.
* :func:`choose_gpu` / :func:`cuda_device_index`: the GPU comes from the MPI node-local rank.
  ``SLURM_LOCALID`` is only right for tasks srun started itself; under ``mpirun`` inside an
  allocation every rank inherits the launcher daemon's value (0), so it is only a cross-check.
* :func:`thread_share` / :func:`limit_threads`: a rank's torch threads are its fair share of the
  CPUs it may run on (``os.sched_getaffinity``, which reflects the job's cpuset and any binding),
  not of every core of the node, and never more than ``SLURM_CPUS_PER_TASK``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from typing import Collection, Mapping, Sequence

import numpy as np
from mpi4py import MPI

from hflmpi.mpi.guard import SetupError

__all__ = [
    "LaunchError",
    "GpuChoice",
    "LOCAL_RANK_VARIABLES",
    "srun_world_problem",
    "check_srun_world",
    "node_local",
    "choose_gpu",
    "cuda_device_index",
    "thread_share",
    "limit_threads",
]

_log = logging.getLogger(__name__)  # notices; the command line shows them on stderr

LOCAL_RANK_VARIABLES = ("OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "SLURM_LOCALID")
"""Launcher variables naming a node-local rank, in the order they are trusted for the
cross-check: Open MPI's and Hydra's (MPICH, Intel MPI) are set by the MPI launcher for each rank;
``SLURM_LOCALID`` is srun's, and a rank started by ``mpirun`` inherits its launcher daemon's."""


class LaunchError(SetupError):
    """The launcher and the MPI library disagree about the job (reported once per world, exit 2)."""


# -- srun and the MPI world ----------------------------------------------------------------------
def _int(env: Mapping[str, str], name: str) -> int | None:
    try:
        return int(env[name])
    except (KeyError, ValueError):
        return None


def srun_world_problem(world_size: int, env: Mapping[str, str], pid: int) -> str | None:
    """Return why this srun task's MPI world is not srun's step, or ``None`` if it is (or if unsure).

    The comparison is only made for a process that srun started itself: ``SLURM_STEP_NUM_TASKS``
    is set (srun sets it for its step; a batch shell has none) and ``SLURM_TASK_PID`` is this
    process. Ranks of ``mpirun``/``mpiexec`` inside an allocation fail the second test: they are
    children of the launcher's daemon, which srun started as a one-task-per-node step
    (``SLURM_STEP_NUM_TASKS`` = number of nodes), and inherit its variables. Heterogeneous steps
    (``SLURM_HET_SIZE``) are not compared.

    Parameters
    ----------
    world_size : int
        ``MPI.COMM_WORLD.Get_size()``.
    env : mapping of str to str
        The process environment.
    pid : int
        This process's id (``os.getpid()``).

    Returns
    -------
    str or None
        One line naming both numbers and the fix, or ``None``.
    """
    tasks = _int(env, "SLURM_STEP_NUM_TASKS")
    if tasks is None or _int(env, "SLURM_TASK_PID") != pid or "SLURM_HET_SIZE" in env:
        return None
    if tasks == world_size:
        return None
    alone = " (each task runs alone)" if world_size == 1 else ""
    return (
        f"srun started {tasks} tasks (SLURM_STEP_NUM_TASKS={tasks}) but the MPI world has "
        f"{world_size} rank{'s' if world_size != 1 else ''}{alone}: srun's PMI plugin does not "
        "match this MPI library; launch with `srun --mpi=pmi2` for PyPI's MPICH wheel or "
        "`srun --mpi=pmix` for an Open MPI or other PMIx build (`srun --mpi=list` shows the "
        "plugins; the jobs/ scripts read HFLMPI_SRUN_MPI)"
    )


def check_srun_world(world_size: int, env: Mapping[str, str] | None = None,
                     pid: int | None = None) -> None:
    """Raise :class:`LaunchError` if srun's step and the MPI world disagree (see :func:`srun_world_problem`).

    Local (no communication): with a mismatched PMI plugin every task is a world of its own and
    each raises, prints and exits 2 by itself; with a matched one no rank raises.
    """
    problem = srun_world_problem(world_size, os.environ if env is None else env,
                                 os.getpid() if pid is None else pid)
    if problem is not None:
        raise LaunchError(problem)


# -- the node-local rank and the GPU -------------------------------------------------------------
def node_local(comm: MPI.Comm) -> tuple[int, int]:
    """Return this rank's index among the ranks sharing its node, and their count (collective)."""
    local = comm.Split_type(MPI.COMM_TYPE_SHARED, key=comm.Get_rank())
    try:
        return local.Get_rank(), local.Get_size()
    finally:
        local.Free()


@dataclasses.dataclass(frozen=True)
class GpuChoice:
    """A rank's GPU and how it was found.

    Attributes
    ----------
    index : int
        Index into the devices this process sees (``CUDA_VISIBLE_DEVICES`` applied).
    local_rank : int
        The MPI node-local rank it was derived from.
    variable : str or None
        The first launcher variable of :data:`LOCAL_RANK_VARIABLES` that was set, if any.
    variable_value : int or None
        Its value.
    """

    index: int
    local_rank: int
    variable: str | None = None
    variable_value: int | None = None

    @property
    def disagrees(self) -> bool:
        """Tell whether the launcher variable names another local rank than MPI does."""
        return self.variable_value is not None and self.variable_value != self.local_rank


def choose_gpu(local_rank: int, visible: int, env: Mapping[str, str]) -> GpuChoice:
    """Pick the GPU of the rank with MPI node-local rank ``local_rank``.

    Rank r on a node takes visible device ``r % visible``: one GPU each when the node has as
    many visible devices as ranks, shared round-robin when it has fewer, and device 0 when srun
    or ``CUDA_VISIBLE_DEVICES`` hands each rank a single GPU of its own. The launcher variables
    are only read to report a disagreement: MPI's answer is used.

    Parameters
    ----------
    local_rank : int
        Index among the ranks sharing this node (``MPI.COMM_TYPE_SHARED``).
    visible : int
        Number of devices this process sees (``torch.cuda.device_count()``).
    env : mapping of str to str
        The process environment.
    """
    if visible < 1:
        raise ValueError(f"no visible CUDA device to choose from (visible={visible})")
    if local_rank < 0:
        raise ValueError(f"a node-local rank is >= 0, got {local_rank}")
    for name in LOCAL_RANK_VARIABLES:
        value = _int(env, name)
        if value is not None:
            return GpuChoice(local_rank % visible, local_rank, name, value)
    return GpuChoice(local_rank % visible, local_rank)


def cuda_device_index(comm: MPI.Comm, visible: int, env: Mapping[str, str] | None = None) -> int:
    """Return the index of this rank's GPU among the ``visible`` ones (collective over ``comm``).

    The node-local rank comes from ``comm.Split_type(MPI.COMM_TYPE_SHARED)``; see
    :func:`choose_gpu`. When a launcher variable disagrees with it on some rank, rank 0 of
    ``comm`` logs one notice saying how many and that the MPI rank was used.
    """
    local_rank, _ = node_local(comm)
    choice = choose_gpu(local_rank, visible, os.environ if env is None else env)
    if choice.disagrees:
        _log.debug("hflmpi: rank %d: %s=%s but the MPI node-local rank is %d; GPU %d",
                   comm.Get_rank(), choice.variable, choice.variable_value, local_rank, choice.index)
    count = np.array([int(choice.disagrees)], dtype=np.int64)
    comm.Allreduce(MPI.IN_PLACE, count, op=MPI.SUM)  # all ranks
    if count[0] and comm.Get_rank() == 0:
        _log.info("hflmpi: GPU choice: on %d of %d ranks the launcher's local rank (%s) is not the "
                  "MPI node-local rank (mpirun passes on its daemon's SLURM_LOCALID); used the MPI "
                  "node-local rank", int(count[0]), comm.Get_size(), "/".join(LOCAL_RANK_VARIABLES))
    return choice.index


# -- CPU threads ---------------------------------------------------------------------------------
def thread_share(mine: Collection[int], users: Sequence[int], env: Mapping[str, str]) -> int:
    """Return how many threads a rank may run on the CPUs ``mine``.

    Each CPU is split evenly among the node's ranks allowed to run on it, so the share is
    ``floor(sum(1 / users[c] for c in mine))``: ``len(mine) // k`` when k ranks have the same
    CPUs (no binding), ``len(mine)`` when every rank is bound to CPUs of its own. It is capped
    by ``SLURM_CPUS_PER_TASK`` (what the job asked per task) and is at least 1.

    Parameters
    ----------
    mine : collection of int
        The CPUs this process may run on (``os.sched_getaffinity(0)``).
    users : sequence of int
        For every CPU id, how many ranks of the node may run on it (>= 1 for each of ``mine``).
    env : mapping of str to str
        The process environment (``SLURM_CPUS_PER_TASK``).
    """
    if not mine:
        return 1
    if any(users[c] < 1 for c in mine):
        raise ValueError("every CPU of this rank must count this rank among its users")
    share = math.floor(sum(1.0 / users[c] for c in mine) + 1e-9)
    cap = _int(env, "SLURM_CPUS_PER_TASK")
    if cap is not None and cap >= 1:
        share = min(share, cap)
    return max(1, share)


def _affinity() -> set[int]:
    try:
        return set(os.sched_getaffinity(0))
    except AttributeError:  # not Linux: every core
        return set(range(os.cpu_count() or 1))


def limit_threads(comm: MPI.Comm, env: Mapping[str, str] | None = None) -> int:
    """Give each rank its share of the CPUs it may use (ranks oversubscribing cores crawl otherwise).

    Collective over ``comm`` (the ranks of each node count who may use which CPU), on every rank
    whatever its environment, so no rank can be left waiting. ``OMP_NUM_THREADS`` set by the
    user wins: torch's thread count is then left alone. Returns the thread count chosen (or
    torch's current one when ``OMP_NUM_THREADS`` is set). See :func:`thread_share`.
    """
    import torch

    env = os.environ if env is None else env
    mine = _affinity()
    local = comm.Split_type(MPI.COMM_TYPE_SHARED, key=comm.Get_rank())
    try:
        size = np.array([max(mine, default=0) + 1], dtype=np.int64)
        local.Allreduce(MPI.IN_PLACE, size, op=MPI.MAX)
        users = np.zeros(int(size[0]), dtype=np.int32)
        users[sorted(mine)] = 1
        local.Allreduce(MPI.IN_PLACE, users, op=MPI.SUM)
    finally:
        local.Free()
    if "OMP_NUM_THREADS" in env:
        return int(torch.get_num_threads())
    threads = thread_share(mine, users.tolist(), env)
    torch.set_num_threads(threads)
    return threads
