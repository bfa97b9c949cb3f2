"""The start-up rules of :mod:`hflmpi.mpi.placement`, serially, with recorded and injected inputs.

The Slurm environments below were recorded on the CI cluster (Slurm 22.05, the MPICH wheel): a
batch shell, a task of ``srun --mpi=pmi2 -n 2``, and a rank of the wheel's ``mpiexec -n 2`` run
inside the allocation (Hydra starts one ``hydra_pmi_proxy`` per node with srun, so its ranks carry
that one-task step's variables). The expected answers are written out by hand.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from hflmpi.errors import HflmpiError
from hflmpi.mpi.guard import SetupError
from hflmpi.mpi.placement import (
    LaunchError,
    check_srun_world,
    choose_gpu,
    srun_world_problem,
    thread_share,
)

BATCH_SHELL = {  # pid 6938
    "SLURM_JOB_ID": "50618567", "SLURM_NTASKS": "2", "SLURM_NPROCS": "2", "SLURM_PROCID": "0",
    "SLURM_LOCALID": "0", "SLURM_CPUS_PER_TASK": "1", "SLURM_TASK_PID": "6938",
}
SRUN_TASK_1 = {  # pid 6960, srun --mpi=pmi2, task 1 of 2
    **BATCH_SHELL, "SLURM_PROCID": "1", "SLURM_LOCALID": "1", "SLURM_STEP_ID": "0",
    "SLURM_STEPID": "0", "SLURM_STEP_NUM_TASKS": "2", "SLURM_STEP_NUM_NODES": "1",
    "SLURM_TASK_PID": "6960", "PMI_RANK": "1", "PMI_SIZE": "2", "PMI_FD": "13",
}
MPIEXEC_RANK_1 = {  # pid 6989, child of hydra_pmi_proxy (pid 6987, the step's only task)
    **BATCH_SHELL, "SLURM_NTASKS": "1", "SLURM_NPROCS": "1", "SLURM_STEP_ID": "1",
    "SLURM_STEPID": "1", "SLURM_STEP_NUM_TASKS": "1", "SLURM_STEP_NUM_NODES": "1",
    "SLURM_TASK_PID": "6987", "PMI_RANK": "1", "PMI_SIZE": "2", "MPI_LOCALRANKID": "1",
    "MPI_LOCALNRANKS": "2",
}


# -- srun's step vs the MPI world ----------------------------------------------------------------
def test_srun_task_in_the_right_world_passes():
    assert srun_world_problem(2, SRUN_TASK_1, pid=6960) is None


def test_wrong_pmi_plugin_is_caught_with_both_numbers_and_the_fix():
    problem = srun_world_problem(1, SRUN_TASK_1, pid=6960)  # each task alone: a 1-rank world
    assert problem is not None
    assert "srun started 2 tasks (SLURM_STEP_NUM_TASKS=2)" in problem
    assert "the MPI world has 1 rank (each task runs alone)" in problem
    for fix in ("srun --mpi=pmi2", "srun --mpi=pmix", "srun --mpi=list", "HFLMPI_SRUN_MPI"):
        assert fix in problem
    assert "\n" not in problem
    assert "MPI world has 3 ranks:" in str(srun_world_problem(3, SRUN_TASK_1, pid=6960))


def test_mpirun_ranks_inside_the_allocation_are_not_compared():
    """The proxy's step has 1 task (one per node) and a 2-rank world is right: not srun's task."""
    assert srun_world_problem(2, MPIEXEC_RANK_1, pid=6989) is None
    # 4 nodes x 4 ranks under mpirun: a 4-task daemon step, a 16-rank world.
    four_nodes = {**MPIEXEC_RANK_1, "SLURM_STEP_NUM_TASKS": "4", "SLURM_STEP_NUM_NODES": "4"}
    assert srun_world_problem(16, four_nodes, pid=7001) is None


@pytest.mark.parametrize("env,pid", [
    ({}, 1234),                                         # no Slurm at all
    (BATCH_SHELL, 6938),                                # python exec'd by the batch shell itself
    ({**SRUN_TASK_1, "SLURM_TASK_PID": "x"}, 6960),     # unreadable
    ({**SRUN_TASK_1, "SLURM_STEP_NUM_TASKS": "?"}, 6960),
    ({**SRUN_TASK_1, "SLURM_HET_SIZE": "2"}, 6960),     # heterogeneous step: not compared
    (SRUN_TASK_1, 7000),                                # a child of the srun task (a wrapper)
])
def test_no_comparison_without_a_plain_srun_task(env, pid):
    assert srun_world_problem(1, env, pid=pid) is None


def test_check_raises_a_user_error():
    with pytest.raises(LaunchError, match="SLURM_STEP_NUM_TASKS=2") as info:
        check_srun_world(1, env=SRUN_TASK_1, pid=6960)
    assert isinstance(info.value, SetupError) and isinstance(info.value, HflmpiError)
    check_srun_world(2, env=SRUN_TASK_1, pid=6960)


def _as_srun_task(tmp_path: Path, name: str) -> subprocess.Popen[str]:
    """``hflmpi run`` as srun would start it with a PMI plugin MPICH cannot use: a singleton
    (no mpiexec) whose environment says task 0 of a 2-task step, SLURM_TASK_PID its own pid."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "PMI_", "MPI_"))}
    env.update(SLURM_STEP_NUM_TASKS="2", SLURM_NTASKS="2", SLURM_PROCID="0", SLURM_STEP_ID="0",
               OMP_NUM_THREADS="1")
    out = tmp_path / f"{name}.h5"
    run = [sys.executable, "-m", "mpi4py", "-m", "hflmpi", "run", "jobs/cpu-node.toml",
           "--set", f'run.out="{out}"']
    # exec keeps the pid, as slurmstepd's exec of the task does.
    script = 'export SLURM_TASK_PID=$$; exec "$@"'
    return subprocess.Popen(["bash", "-c", script, "bash", *run], env=env, text=True,
                            cwd=Path(__file__).resolve().parent.parent,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_each_lone_task_of_a_wrong_pmi_step_exits_2_with_one_line(tmp_path):
    tasks = [_as_srun_task(tmp_path, f"task{i}") for i in range(2)]
    for proc in tasks:
        stdout, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 2, (stdout, stderr)
        lines = [line for line in stderr.splitlines() if line.strip()]
        assert lines == [lines[0]] and lines[0].startswith("hflmpi: error: srun started 2 tasks"), \
            stderr
        assert "the MPI world has 1 rank" in lines[0] and "--mpi=pmi2" in lines[0]
    assert not list(tmp_path.iterdir()), "no run may start"


# -- GPU choice ----------------------------------------------------------------------------------
def test_mpirun_case_gives_every_rank_of_a_node_its_own_gpu():
    """mpirun copies SLURM_LOCALID=0 to every rank: the MPI node-local rank decides."""
    env = {"SLURM_LOCALID": "0"}
    choices = [choose_gpu(r, 4, env) for r in range(4)]
    assert [c.index for c in choices] == [0, 1, 2, 3]
    assert [c.disagrees for c in choices] == [False, True, True, True]
    assert {c.variable for c in choices} == {"SLURM_LOCALID"}


def test_the_launchers_own_local_rank_is_preferred_for_the_cross_check():
    # Hydra (MPICH, Intel MPI) and Open MPI set their own per-rank variable next to the copied one.
    for name in ("MPI_LOCALRANKID", "OMPI_COMM_WORLD_LOCAL_RANK"):
        choice = choose_gpu(3, 4, {"SLURM_LOCALID": "0", name: "3"})
        assert (choice.index, choice.variable, choice.variable_value, choice.disagrees) == \
            (3, name, 3, False)


def test_srun_case_agrees_with_slurm_localid():
    assert [choose_gpu(r, 4, {"SLURM_LOCALID": str(r)}).index for r in range(4)] == [0, 1, 2, 3]
    assert not any(choose_gpu(r, 4, {"SLURM_LOCALID": str(r)}).disagrees for r in range(4))


def test_an_env_local_rank_never_overrides_mpi():
    choice = choose_gpu(1, 4, {"SLURM_LOCALID": "3"})
    assert (choice.index, choice.disagrees) == (1, True)
    assert choose_gpu(2, 4, {}).index == 2 and choose_gpu(2, 4, {}).variable is None
    assert choose_gpu(2, 4, {"SLURM_LOCALID": "not a number"}).variable is None


def test_visible_devices_bound_the_index():
    # CUDA_VISIBLE_DEVICES=2,3 (two visible): ranks share them round-robin.
    assert [choose_gpu(r, 2, {}).index for r in range(4)] == [0, 1, 0, 1]
    # srun --gpus-per-task=1 / --gpu-bind=single: one device each, always index 0.
    assert [choose_gpu(r, 1, {"SLURM_LOCALID": str(r)}).index for r in range(4)] == [0, 0, 0, 0]
    with pytest.raises(ValueError, match="no visible CUDA device"):
        choose_gpu(0, 0, {})
    with pytest.raises(ValueError, match=">= 0"):
        choose_gpu(-1, 2, {})


# -- threads -------------------------------------------------------------------------------------
def _shares(affinities: list[set[int]], env: dict[str, str] | None = None) -> list[int]:
    """Every rank's share on a node whose ranks may run on ``affinities``."""
    counts = Counter(cpu for cpus in affinities for cpu in cpus)
    users = [counts.get(cpu, 0) for cpu in range(max(counts) + 1)]
    return [thread_share(cpus, users, env or {}) for cpus in affinities]


def test_unbound_ranks_split_the_cpus_they_may_use():
    # A 64-core node, the job's cpuset holds CPUs 8..15 (what sched_getaffinity reports): not 64/2.
    assert _shares([set(range(8, 16))] * 2) == [4, 4]
    assert _shares([set(range(8))] * 3) == [2, 2, 2]       # floor(8 / 3)
    assert _shares([{0, 1}] * 4) == [1, 1, 1, 1]           # never below one


def test_bound_ranks_keep_their_own_cpus():
    # srun --cpus-per-task=2 with task/affinity: 4 ranks, 2 CPUs each, on a 64-core node.
    assert _shares([{2 * r, 2 * r + 1} for r in range(4)]) == [2, 2, 2, 2]


def test_partly_shared_cpus_count_by_halves():
    # A: 0..3, B: 2..5 -> CPUs 2 and 3 are shared: 1 + 1 + 1/2 + 1/2 = 3 each.
    assert _shares([{0, 1, 2, 3}, {2, 3, 4, 5}]) == [3, 3]


def test_slurm_cpus_per_task_caps_the_share():
    assert _shares([set(range(16))] * 2, {"SLURM_CPUS_PER_TASK": "3"}) == [3, 3]
    assert _shares([set(range(4))] * 2, {"SLURM_CPUS_PER_TASK": "8"}) == [2, 2]
    assert _shares([set(range(16))] * 2, {"SLURM_CPUS_PER_TASK": "junk"}) == [8, 8]


def test_a_cpu_without_this_rank_among_its_users_is_an_error():
    with pytest.raises(ValueError, match="users"):
        thread_share({0, 1}, [1, 0], {})
    assert thread_share(set(), [], {}) == 1
