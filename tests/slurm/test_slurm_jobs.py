"""Submit the jobs/ scripts to a real Slurm cluster and check what they produce.

Needs a running cluster: ``bash .ci/slurm/run.sh`` starts a private one-node cluster
(``.ci/slurm/cluster.sh``), runs this module with ``HFLMPI_SLURM=1`` and ``SLURM_CONF`` set, and
stops the cluster. Without ``HFLMPI_SLURM=1`` (the normal serial and MPI suites) the module is
skipped at import, before anything touches Slurm.

The scripts are submitted unedited; they are scaled down only by what jobs/README.md documents:
``sbatch`` options on the command line (``--ntasks=2``, ``--array=0-1``, ``--gpus-per-node=0``)
and the ``HFLMPI_*`` environment variables (exported to the job by sbatch's default
``--export=ALL``). Each job runs in a scratch directory holding a ``jobs`` link to the repository's
jobs/, so ``runs/`` outputs never land in the checkout.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest

if os.environ.get("HFLMPI_SLURM") != "1":
    pytest.skip("Slurm stage only: run `bash .ci/slurm/run.sh` (sets HFLMPI_SLURM=1 and starts a "
                "private one-node cluster)", allow_module_level=True)


def _sinfo_problem() -> str | None:
    if shutil.which("sinfo") is None or shutil.which("sbatch") is None:
        return "sinfo/sbatch are not on PATH"
    try:
        proc = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True,
                              timeout=20)
    except subprocess.TimeoutExpired:
        return "sinfo timed out after 20 s"
    if proc.returncode != 0 or not proc.stdout.strip():
        return f"sinfo failed (exit {proc.returncode}): {proc.stderr.strip()}"
    return None


_PROBLEM = _sinfo_problem()
if _PROBLEM is not None:
    pytest.skip(f"HFLMPI_SLURM=1 but no usable Slurm cluster: {_PROBLEM}", allow_module_level=True)

import numpy as np  # noqa: E402

from hflmpi.record.checkpoint import Checkpoint, load_checkpoint  # noqa: E402
from hflmpi.record.marker import marker_path  # noqa: E402
from hflmpi.record.reading import read_metrics, read_run_info  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
JOBS = REPO / "jobs"
PYTHON = sys.executable
MPIEXEC = str(Path(sys.executable).with_name("mpiexec"))
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
            "BOOT_FAIL", "DEADLINE", "PREEMPTED", "SPECIAL_EXIT"}
JOB_TIMEOUT = float(os.environ.get("HFLMPI_SLURM_JOB_TIMEOUT", "240"))

# The preemption job: the scaled-down preemptible.toml of tests/test_jobs.py (2 ranks, one
# group, tau [3]), long enough that a signal after a few rounds lands mid-run.
PREEMPT_ROUNDS = 400
PREEMPT_ARGS = [
    f"--set run.rounds={PREEMPT_ROUNDS}", "--set topology.fanouts=[2]", "--set schedule.tau=[3]",
    "--set quantize.bits=[8]", "--set run.checkpoint_every=1000", '--set run.progress="off"',
    "--set run.divergence=false",
]


# -- helpers -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A submit directory: ``jobs`` links to the repository's jobs/, ``runs/`` exists already
    (Slurm opens ``--output=runs/...`` before the script's ``mkdir -p runs`` runs)."""
    root = tmp_path_factory.mktemp("slurm-submit")
    (root / "jobs").symlink_to(JOBS, target_is_directory=True)
    (root / "runs").mkdir()
    return root


def job_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, HFLMPI_PYTHON=PYTHON, HFLMPI_SRUN_MPI="pmi2", OMP_NUM_THREADS="1",
               MKL_NUM_THREADS="1")
    for key in ("HFLMPI_ARGS", "HFLMPI_SCALING_RANKS", "HFLMPI_MPIRUN", "HFLMPI_MPIRUN_ARGS",
                "HFLMPI_RUN", "HFLMPI_SETUP"):
        env.pop(key, None)
    env.update(extra)
    return env


def sbatch(workdir: Path, script: str, options: list[str], env: dict[str, str],
           script_args: tuple[str, ...] = ()) -> str:
    """Submit ``jobs/SCRIPT`` (with ``script_args``) from ``workdir``; return the job id."""
    proc = subprocess.run(["sbatch", "--parsable", *options, str(JOBS / script), *script_args],
                          cwd=workdir, env=env, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, f"sbatch {script} failed: {proc.stderr}"
    return proc.stdout.strip().split(";")[0]


def job_records(job_id: str) -> list[dict[str, str]]:
    """``scontrol show job -o`` as dicts (one per array task). Finished jobs stay visible for
    MinJobAge (600 s in the CI cluster); there is no accounting, so no sacct."""
    proc = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True,
                          text=True, timeout=20)
    if proc.returncode != 0:
        return []
    records = []
    for line in proc.stdout.splitlines():
        if line.strip():
            records.append(dict(re.findall(r"(\w+)=(\S*)", line)))
    return records


def wait_for(job_id: str, count: int = 1, timeout: float = JOB_TIMEOUT) -> list[dict[str, str]]:
    """Poll until ``count`` records of ``job_id`` are in a terminal state; release held jobs."""
    deadline = time.monotonic() + timeout
    records: list[dict[str, str]] = []
    while time.monotonic() < deadline:
        records = job_records(job_id)
        for rec in records:  # a requeued job may come back held: let it go
            if rec.get("JobState") == "PENDING" and "Held" in rec.get("Reason", ""):
                subprocess.run(["scontrol", "release", rec["JobId"]], capture_output=True,
                               timeout=20)
        if len(records) >= count and all(r.get("JobState") in TERMINAL for r in records):
            return records
        time.sleep(0.5)
    pytest.fail(f"job {job_id} not finished after {timeout:.0f} s: "
                f"{[(r.get('JobId'), r.get('JobState'), r.get('Reason')) for r in records]}")


def describe(workdir: Path, job_id: str) -> str:
    """Every output file of the job and its scontrol record, for failure messages."""
    parts = [f"scontrol: {job_records(job_id)}"]
    for out in sorted((workdir / "runs").glob(f"*-{job_id}*.out")):
        parts.append(f"--- {out.name}\n{out.read_text(errors='replace')[-4000:]}")
    return "\n".join(parts)


@contextlib.contextmanager
def cpu_hog(seconds: float) -> Iterator[int]:
    """Keep every core busy (one spinning process per core) while the block runs.

    A busy machine is where ranks stop finishing together. Each spinner also stops by itself after
    ``seconds``, so a test killed from outside cannot leave the machine loaded for long.
    """
    spin = ("import time\nend = time.monotonic() + float(__import__('sys').argv[1])\n"
            "while time.monotonic() < end:\n    pass\n")
    procs = [subprocess.Popen([PYTHON, "-c", spin, str(seconds)]) for _ in range(os.cpu_count() or 2)]
    try:
        yield len(procs)
    finally:
        for proc in procs:  # only the processes started here, by PID
            proc.kill()
        for proc in procs:
            proc.wait(timeout=30)


def assert_completed(workdir: Path, job_id: str, records: list[dict[str, str]]) -> None:
    for rec in records:
        assert rec.get("JobState") == "COMPLETED" and rec.get("ExitCode") == "0:0", \
            describe(workdir, job_id)


def check_record(path: Path, rounds: int, world_size: int) -> dict:
    """A valid run record: one metrics row per round, finite accuracy, the right world size."""
    assert path.exists(), f"no run record {path}"
    metrics = read_metrics(path)
    assert list(metrics["round"]) == list(range(1, rounds + 1))
    final = float(metrics["test_accuracy"][-1])
    assert math.isfinite(final) and 0.0 < final <= 1.0, metrics["test_accuracy"]
    assert np.all(np.isfinite(metrics["train_loss"]))
    info = read_run_info(path)
    assert int(info["world_size"]) == world_size
    return info


# -- tests ---------------------------------------------------------------------------------------
def test_the_node_is_up_with_two_cpus():
    out = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %c %t"], capture_output=True, text=True,
                         timeout=20, check=True).stdout.split()
    assert len(out) == 3 and int(out[1]) >= 2 and out[2] in {"idle", "mix", "alloc"}, out


def test_cpu_node_srun_pmi2_one_group_per_node(workdir):
    env = job_env(HFLMPI_ARGS='--set run.rounds=3 --set run.progress="off"')
    job = sbatch(workdir, "cpu-node.sbatch", ["--ntasks=2"], env)
    assert_completed(workdir, job, wait_for(job))
    info = check_record(workdir / "runs" / f"cpu-node-{job}.h5", rounds=3, world_size=2)
    # topology.nodes = true on one node: a single group holding both ranks (flat FedAvg).
    assert info["tree"]["groups_per_layer"] == [1], info["tree"]
    assert info["tree"]["children"] == [[[0, 1]]], info["tree"]
    assert "3 rounds done" in (workdir / "runs" / f"hflmpi-cpu-{job}.out").read_text()


def test_config_error_fails_the_job_with_exit_2(workdir):
    """A collective config error exits 2 on every rank; through srun (PMI2) the job must end
    FAILED with exit code 2, not an MPI_Abort that srun reports as 137."""
    env = job_env(HFLMPI_ARGS="--set schedule.tau=[5,2]")  # one layer on one node: one tau
    job = sbatch(workdir, "cpu-node.sbatch", ["--ntasks=2"], env)
    (record,) = wait_for(job)
    assert (record.get("JobState"), record.get("ExitCode")) == ("FAILED", "2:0"), \
        describe(workdir, job)
    assert "hflmpi: error: ConfigError: schedule.tau" in \
        (workdir / "runs" / f"hflmpi-cpu-{job}.out").read_text()


def test_wrong_pmi_plugin_fails_the_job_with_exit_2(workdir):
    """``srun --mpi=none`` gives the MPICH wheel no PMI: each task starts as a 1-rank world (as
    with any plugin the library cannot use). Every task must stop with the one-line error and
    exit 2, not train alone and "succeed"."""
    env = job_env(HFLMPI_SRUN_MPI="none", HFLMPI_ARGS="--set run.rounds=2")
    job = sbatch(workdir, "cpu-node.sbatch", ["--ntasks=2"], env)
    (record,) = wait_for(job)
    assert (record.get("JobState"), record.get("ExitCode")) == ("FAILED", "2:0"), \
        describe(workdir, job)
    out = (workdir / "runs" / f"hflmpi-cpu-{job}.out").read_text()
    assert ("hflmpi: error: srun started 2 tasks (SLURM_STEP_NUM_TASKS=2) but the MPI world has "
            "1 rank") in out and "srun --mpi=pmi2" in out, out
    assert "rounds done" not in out and not (workdir / "runs" / f"cpu-node-{job}.h5").exists()


def test_arguments_with_spaces_setup_file_and_cpus_per_task(workdir):
    """HFLMPI_ARGS words with spaces, sbatch script arguments, HFLMPI_SETUP and
    ``srun --cpus-per-task`` (passed on from sbatch's) in one real job."""
    setup = workdir / "site-setup.sh"
    setup.write_text('module() { echo "site setup: module $*"; }\nmodule load mpi "$UNSET_IN_JOB"\n')
    name = "runs/with space-%s.h5" % time.monotonic_ns()
    env = job_env(HFLMPI_ARGS=f'--set run.rounds=2 --set "run.out={name}"', HFLMPI_SETUP=str(setup))
    job = sbatch(workdir, "cpu-node.sbatch", ["--ntasks=2", "--cpus-per-task=1"], env,
                 script_args=("--set", 'run.progress="off"'))
    assert_completed(workdir, job, wait_for(job))
    check_record(workdir / name, rounds=2, world_size=2)
    out = (workdir / "runs" / f"hflmpi-cpu-{job}.out").read_text()
    assert "site setup: module load mpi" in out and f"run record {name}" in out, out


def test_scaling_array_scaled_down(workdir):
    env = job_env(HFLMPI_SCALING_RANKS="1 2",
                  HFLMPI_ARGS="--set run.rounds=2 --set run.eval_every=1 "
                              "--set data.synthetic_samples=2000")
    job = sbatch(workdir, "scaling-array.sbatch", ["--array=0-1", "--ntasks=2"], env)
    records = wait_for(job, count=2)
    assert sorted(r.get("ArrayTaskId") for r in records) == ["0", "1"], records
    assert_completed(workdir, job, records)
    for ranks in (1, 2):
        check_record(workdir / "runs" / f"scaling-{job}-n{ranks}.h5", rounds=2, world_size=ranks)


def test_mpiexec_inside_the_allocation(workdir):
    """gpu-nodes-mpirun.sbatch on CPU: the MPICH wheel's mpiexec (Hydra, which bootstraps through
    Slurm inside an allocation) as HFLMPI_MPIRUN, no GPUs requested, run.device overridden."""
    env = job_env(
        HFLMPI_MPIRUN=MPIEXEC,
        HFLMPI_ARGS='--set run.device="cpu" --set data.name="digits" --set model.name="mlp" '
                    '--set schedule.tau=[5] --set quantize.bits=[8] --set run.rounds=3 '
                    '--set run.progress="off"',
    )
    options = ["--nodes=1", "--ntasks=2", "--ntasks-per-node=2", "--cpus-per-task=1",
               "--gpus-per-node=0"]
    job = sbatch(workdir, "gpu-nodes-mpirun.sbatch", options, env)
    assert_completed(workdir, job, wait_for(job))
    info = check_record(workdir / "runs" / f"gpu-nodes-mpirun-{job}.h5", rounds=3, world_size=2)
    assert info["tree"]["groups_per_layer"] == [1], info["tree"]


# Rank 0 prints every rank's line: two ranks writing to one job output interleave their bytes.
GPU_PROBE = """
import os
import numpy as np
from mpi4py import MPI
from hflmpi.mpi.placement import cuda_device_index
comm = MPI.COMM_WORLD
index = cuda_device_index(comm, visible=comm.Get_size())
mine = np.array([int(os.environ.get('SLURM_LOCALID', -1)), index], dtype=np.int64)
every = np.empty((comm.Get_size(), 2), dtype=np.int64)
comm.Allgather(mine, every)
if comm.Get_rank() == 0:
    print("\\n".join(f"rank {r} SLURM_LOCALID={l} gpu={g}" for r, (l, g) in enumerate(every)), flush=True)
"""


def test_mpiexec_ranks_get_distinct_gpus_although_slurm_localid_is_0(workdir):
    """Inside an allocation mpiexec's ranks inherit the SLURM_LOCALID of the daemon srun started
    (0 on every rank): the GPU choice must come from the MPI node-local rank instead."""
    probe = workdir / "gpu_probe.py"
    probe.write_text(GPU_PROBE)
    proc = subprocess.run(["sbatch", "--parsable", "--ntasks=2", "--output=runs/gpu-probe-%j.out",
                           f"--wrap={MPIEXEC} -n 2 {PYTHON} {probe}"], cwd=workdir,
                          env=job_env(PYTHONPATH=str(REPO)), capture_output=True, text=True,
                          timeout=30)
    assert proc.returncode == 0, proc.stderr
    job = proc.stdout.strip().split(";")[0]
    assert_completed(workdir, job, wait_for(job))
    lines = sorted(line for line in (workdir / "runs" / f"gpu-probe-{job}.out").read_text()
                   .splitlines() if line.startswith("rank "))
    assert lines == ["rank 0 SLURM_LOCALID=0 gpu=0", "rank 1 SLURM_LOCALID=0 gpu=1"], lines


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> Checkpoint:
    """The reference for the preemption tests: the same overrides, plain mpiexec, outside Slurm."""
    reference = tmp_path_factory.mktemp("reference") / "reference.h5"
    args = " ".join(PREEMPT_ARGS).split()
    subprocess.run([MPIEXEC, "-n", "2", PYTHON, "-m", "mpi4py", "-m", "hflmpi", "run",
                    str(JOBS / "preemptible.toml"), "--set", f'run.out="{reference}"', *args],
                   check=True, env=job_env(), timeout=600, stdout=subprocess.DEVNULL)
    expected = load_checkpoint(reference.with_name("reference.ckpt.h5"))
    assert expected.round == PREEMPT_ROUNDS
    return expected


@pytest.mark.timeout(1200)
@pytest.mark.parametrize("load", ["idle", "cpu-hog"])
def test_preemption_signal_checkpoints_requeues_and_resumes_bit_exactly(workdir, uninterrupted,
                                                                        load):
    """Signal, checkpoint, requeue, resume: the final model has the uninterrupted run's bits.

    ``cpu-hog`` runs the whole job next to one spinning process per core: on a busy machine the
    ranks reach the exit at different moments, and under srun (KillOnBadExit) the first one out
    used to get its sibling killed, ending the step 143 instead of 75 and the job FAILED.
    """
    stack = contextlib.ExitStack()
    timeout = JOB_TIMEOUT
    if load == "cpu-hog":
        timeout = 3 * JOB_TIMEOUT  # every step of the job runs at about a third of the speed
        stack.enter_context(cpu_hog(seconds=timeout))
    with stack:
        job, log, run = _preempt_and_requeue(workdir, timeout)
    expected = uninterrupted
    stopped = re.search(r"checkpointed round (\d+)", log)
    assert stopped and f"requeueing job {job}" in log, describe(workdir, job)
    assert 3 <= int(stopped.group(1)) < PREEMPT_ROUNDS, "the signal must land mid-run"
    assert f"{PREEMPT_ROUNDS} rounds done" in log, describe(workdir, job)

    info = check_record(run, rounds=PREEMPT_ROUNDS, world_size=2)
    assert [entry["round"] for entry in info["resume_log"]] == [int(stopped.group(1))], info
    resumed = load_checkpoint(run.with_name(f"preemptible-{job}.ckpt.h5"))
    assert resumed.round == PREEMPT_ROUNDS
    assert np.array_equal(resumed.model, expected.model), "requeue + resume changed the model bits"
    assert not marker_path(run).exists(), "the resumed run must remove the preemption marker"


def _preempt_and_requeue(workdir: Path, timeout: float) -> tuple[str, str, Path]:
    """Submit preemptible.sbatch, signal it after 3 rounds, wait until it is done; return the
    job id, its output and its run file."""
    env = job_env(HFLMPI_ARGS=" ".join(PREEMPT_ARGS))
    job = sbatch(workdir, "preemptible.sbatch", ["--ntasks=2"], env)
    run = workdir / "runs" / f"preemptible-{job}.h5"
    deadline = time.monotonic() + timeout
    while True:  # wait until training is under way (signal handlers installed)
        try:
            if len(read_metrics(run)["round"]) >= 3:
                break
        except (OSError, KeyError):
            pass
        states = [r.get("JobState") for r in job_records(job)]
        assert not set(states) & TERMINAL, describe(workdir, job)
        assert time.monotonic() < deadline, f"no training rounds yet: {describe(workdir, job)}"
        time.sleep(0.2)
    # What `#SBATCH --signal=B:USR1@120` does at the deadline: USR1 to the batch shell only.
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], check=True, timeout=20)

    records = wait_for(job, timeout=timeout + 60)  # requeued (BeginTime delay), rerun, done
    assert_completed(workdir, job, records)
    assert records[0].get("Restarts") == "1", describe(workdir, job)
    log = (workdir / "runs" / f"hflmpi-preemptible-{job}.out").read_text()  # --open-mode=append
    return job, log, run


# A stand-in for python in jobs/preemptible.sbatch ($HFLMPI_PYTHON): no training, just the ways a
# step can end, so the script's requeue decision is tested exactly. Leg 1 (no restart yet): task
# 0 optionally writes the run's preemption marker, then dies of SIGTERM; task 1 is killed by
# Slurm (KillOnBadExit), so the step ends 143 and never 75, as in a race at the exit. Later legs
# succeed.
FAKE_STEP = """#!/bin/bash
if [[ ${SLURM_RESTART_COUNT:-0} -gt 0 ]]; then
    echo "fake step: leg $SLURM_RESTART_COUNT, task $SLURM_PROCID: done"
    exit 0
fi
if [[ $SLURM_PROCID -eq 0 ]]; then
    if [[ $FAKE_WRITES_MARKER == 1 ]]; then
        echo '{"round": 5, "checkpoint": "x.ckpt.h5", "signal": "SIGUSR1"}' > "$HFLMPI_RUN.preempted"
    fi
    echo "fake step: task 0 dies of SIGTERM (marker written: $FAKE_WRITES_MARKER)"
    kill -TERM $$
fi
exec sleep 300
"""


@pytest.mark.parametrize("case", ["marker", "no-marker", "stale-marker"])
def test_preemptible_script_requeues_on_the_marker_not_the_exit_code(workdir, case):
    """A step that ends 143 requeues the job exactly when this step left the preemption marker:
    the checkpoint is on disk, whatever a race did to the exit code. Without it (or with only a
    stale one from an earlier leg) the failure is a real one: the job ends FAILED, not requeued
    forever."""
    fake = workdir / f"fake-python-{case}"
    fake.write_text(FAKE_STEP)
    fake.chmod(0o755)
    run = workdir / "runs" / f"fake-{case}.h5"
    if case == "stale-marker":
        marker_path(run).write_text('{"round": 1}\n')
    env = job_env(HFLMPI_PYTHON=str(fake), HFLMPI_RUN=str(run),
                  FAKE_WRITES_MARKER="1" if case == "marker" else "0")
    job = sbatch(workdir, "preemptible.sbatch", ["--ntasks=2"], env)
    (record,) = wait_for(job, timeout=JOB_TIMEOUT + 60)
    log = (workdir / "runs" / f"hflmpi-preemptible-{job}.out").read_text()
    if case == "marker":
        assert (record.get("JobState"), record.get("Restarts")) == ("COMPLETED", "1"), \
            describe(workdir, job)
        assert "(step exit code 143); requeueing" in log and "leg 1, task 1: done" in log, log
    else:
        assert (record.get("JobState"), record.get("Restarts")) == ("FAILED", "0"), \
            describe(workdir, job)
        assert "requeueing" not in log, log
        assert not marker_path(run).exists(), "the stale marker must be removed before the step"
