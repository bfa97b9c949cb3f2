"""The collective halves of :mod:`hflmpi.mpi.placement` under mpiexec, at any size.

Ranks are grouped by the host they report (``MPI.Get_processor_name``), independently of the
shared-memory split the code uses: on every host the GPU indices must be exactly 0..k-1 even
when every rank claims ``SLURM_LOCALID=0`` (what ``mpirun`` inside an allocation hands out).
"""

from __future__ import annotations

import os
from collections import Counter, defaultdict

import pytest
from conftest import parallel_assert

mpi4py = pytest.importorskip("mpi4py")
from mpi4py import MPI  # noqa: E402

from hflmpi.mpi.placement import cuda_device_index, limit_threads  # noqa: E402


def _by_host(comm, value):
    """``{host: [values of that host's ranks, in rank order]}`` on every rank."""
    pairs = comm.allgather((MPI.Get_processor_name(), value))
    hosts: dict[str, list] = defaultdict(list)
    for host, item in pairs:
        hosts[host].append(item)
    return hosts


@pytest.mark.mpi(min_size=1)
def test_gpu_indices_on_a_node_are_distinct_even_with_a_copied_slurm_localid(comm):
    per_host = _by_host(comm, None)
    k = len(per_host[MPI.Get_processor_name()])
    index = cuda_device_index(comm, visible=k, env={"SLURM_LOCALID": "0"})
    for host, indices in _by_host(comm, index).items():
        parallel_assert(comm, sorted(indices) == list(range(len(indices))),
                        f"{host}: GPU indices {indices}")


@pytest.mark.mpi(min_size=2)
def test_fewer_visible_gpus_are_shared_round_robin(comm):
    index = cuda_device_index(comm, visible=2, env={})
    for host, indices in _by_host(comm, index).items():
        counts = Counter(indices)
        parallel_assert(comm, set(counts) <= {0, 1} and abs(counts[0] - counts[1]) <= 1,
                        f"{host}: GPU indices {indices} with 2 visible devices")


@pytest.fixture
def keep_torch_threads():
    import torch

    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.mark.mpi(min_size=1)
def test_threads_are_the_share_of_the_cpus_each_rank_may_use(comm, keep_torch_threads):
    import torch

    mine = frozenset(os.sched_getaffinity(0))
    threads = limit_threads(comm, env={})  # no OMP_NUM_THREADS, no SLURM_CPUS_PER_TASK
    per_host = _by_host(comm, mine)
    affinities = per_host[MPI.Get_processor_name()]
    if len(set(affinities)) == 1:  # unbound (mpiexec's default): an even split, at least one
        expected = max(1, len(mine) // len(affinities))
    else:  # bound: each CPU split among the ranks allowed on it
        users = Counter(cpu for cpus in affinities for cpu in cpus)
        expected = max(1, int(sum(1 / users[cpu] for cpu in mine) + 1e-9))
    parallel_assert(comm, threads == expected == torch.get_num_threads(),
                    f"{threads} threads, expected {expected} ({len(mine)} CPUs, "
                    f"{len(affinities)} ranks on this host)")
    capped = limit_threads(comm, env={"SLURM_CPUS_PER_TASK": "1"})
    parallel_assert(comm, capped == 1 == torch.get_num_threads(), f"capped to {capped}")


@pytest.mark.mpi(min_size=2)
def test_omp_num_threads_on_some_ranks_only_does_not_hang(comm, keep_torch_threads):
    import torch

    torch.set_num_threads(1)
    env = {"OMP_NUM_THREADS": "1"} if comm.Get_rank() == 0 else {}
    threads = limit_threads(comm, env=env)  # every rank must still take part in the collective
    parallel_assert(comm, threads >= 1, f"{threads} threads")
    if comm.Get_rank() == 0:
        parallel_assert(comm, torch.get_num_threads() == 1, "OMP_NUM_THREADS must win")
    else:
        parallel_assert(comm, True)
