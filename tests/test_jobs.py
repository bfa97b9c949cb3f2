"""The Slurm scripts parse, their configs load, and the preemption signal path really works.

The signal test launches real ``mpiexec`` runs: an uninterrupted one, and one that receives
SIGUSR1 mid-run (as Slurm's ``--signal=USR1@N`` would send), must checkpoint and exit with 75,
then resumes with ``--resume-if-exists``; both must end with the same model bits.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import JOBS, MPIEXEC, preemptible_run, wait_for_rounds

from hflmpi.config import load_config
from hflmpi.mpi.preempt import EXIT_PREEMPTED
from hflmpi.record.checkpoint import load_checkpoint
from hflmpi.record.marker import read_marker
from hflmpi.record.reading import read_metrics

SCRIPTS = sorted(JOBS.glob("*.sbatch"))


def test_there_are_job_scripts():
    assert len(SCRIPTS) >= 5


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_parses_and_has_a_matching_config(script):
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    assert text.startswith("#!/bin/bash")
    configs = set(re.findall(r"jobs/([\w-]+\.toml)", text))
    assert configs == {script.stem + ".toml"}, f"{script.name} should launch jobs/{script.stem}.toml"
    load_config(JOBS / f"{script.stem}.toml")
    assert "python -m mpi4py -m hflmpi" in text.replace('"$PYTHON"', "python")


def test_every_config_loads():
    for config in JOBS.glob("*.toml"):
        load_config(config)


def _run_args(out: Path, rounds: int) -> list[str]:
    return preemptible_run(out, rounds, "--set", "quantize.bits=[8]",
                           "--set", "run.checkpoint_every=1000", "--set", "run.divergence=false",
                           "--resume-if-exists")


@pytest.mark.skipif(not MPIEXEC.exists(), reason="no mpiexec next to this python")
def test_sigusr1_checkpoints_exits_75_and_resumes_bit_exactly(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    rounds = 400
    reference = tmp_path / "reference.h5"
    subprocess.run(_run_args(reference, rounds), check=True, env=env, timeout=600,
                   stdout=subprocess.DEVNULL)

    run = tmp_path / "preempted.h5"
    proc = subprocess.Popen(_run_args(run, rounds), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    wait_for_rounds(run, 3)
    proc.send_signal(signal.SIGUSR1)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == EXIT_PREEMPTED, stderr
    assert "SIGUSR1" in stderr and "checkpointed round" in stderr
    stopped_at = load_checkpoint(run.with_name("preempted.ckpt.h5")).round
    assert 3 <= stopped_at < rounds, "the signal must land mid-run"
    assert list(read_metrics(run)["round"]) == list(range(1, stopped_at + 1))
    # The durable note a job script trusts even when a race spoils the step's exit code.
    marker = read_marker(run)
    assert marker is not None, "no preemption marker next to the run file"
    assert (marker["round"], marker["checkpoint"], marker["signal"]) == \
        (stopped_at, "preempted.ckpt.h5", "SIGUSR1")

    subprocess.run(_run_args(run, rounds), check=True, env=env, timeout=600,
                   stdout=subprocess.DEVNULL)
    resumed = load_checkpoint(run.with_name("preempted.ckpt.h5"))
    expected = load_checkpoint(reference.with_name("reference.ckpt.h5"))
    assert resumed.round == expected.round == rounds
    assert np.array_equal(resumed.model, expected.model), "resume changed the model bits"
    assert list(read_metrics(run)["round"]) == list(range(1, rounds + 1))
    assert read_marker(run) is None, "the resumed run must remove the marker"


@pytest.mark.skipif(not MPIEXEC.exists(), reason="no mpiexec next to this python")
def test_nodes_topology_follows_the_node_names(tmp_path):
    """Two fake nodes (HFLMPI_NODE_NAME per rank, MPMD launch): one group per node, then a root."""
    from hflmpi.record.reading import read_run_info

    out = tmp_path / "nodes.h5"
    rank_cmd = [sys.executable, "-m", "mpi4py", "-m", "hflmpi", "run", str(JOBS / "cpu-node.toml"),
                "--set", f'run.out="{out}"', "--set", "run.rounds=2", "--set", "schedule.tau=[2, 2]",
                "--set", "quantize.bits=[8, 0]", "--set", 'run.progress="off"']
    cmd = [str(MPIEXEC), "-n", "2", "-env", "HFLMPI_NODE_NAME", "node-a", *rank_cmd,
           ":", "-n", "2", "-env", "HFLMPI_NODE_NAME", "node-b", *rank_cmd]
    subprocess.run(cmd, check=True, timeout=300, stdout=subprocess.DEVNULL,
                   env=dict(os.environ, OMP_NUM_THREADS="1"))
    tree = read_run_info(out)["tree"]
    assert tree["children"] == [[[0, 1], [2, 3]], [[0, 1]]]
    assert list(read_metrics(out)["round"]) == [1, 2]
