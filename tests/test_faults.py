"""Injected faults end the job with a clear message (no hang) and lose no data.

Each case runs real processes: a stalled collective under the watchdog, and a rank killed with
SIGKILL in the middle of a run, after which ``--resume`` must reproduce the uninterrupted run's
final model bit for bit.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import MPIEXEC, preemptible_run, wait_for_rounds
from hflmpi.record.checkpoint import load_checkpoint
from hflmpi.record.store import read_metrics

pytestmark = pytest.mark.skipif(not MPIEXEC.exists(), reason="no mpiexec next to this python")

STALL = """
import time
from mpi4py import MPI
from hflmpi.mpi.guard import Watchdog
comm = MPI.COMM_WORLD
dog = Watchdog(comm, 1.0)
with dog.guard("the layer-2 aggregation of round 7"):
    if comm.Get_rank() == 1:
        time.sleep(60)      # a stuck rank: the others wait for it in the barrier
    comm.Barrier()
"""


def test_watchdog_aborts_a_stalled_collective_naming_rank_layer_round(tmp_path):
    script = tmp_path / "stall.py"
    script.write_text(STALL)
    start = time.monotonic()
    proc = subprocess.run([str(MPIEXEC), "-n", "2", sys.executable, str(script)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert time.monotonic() - start < 45, "the watchdog should end the job within seconds"
    assert "stalled for more than 1 s in the layer-2 aggregation of round 7" in proc.stderr


def _run_args(out: Path, rounds: int, *extra: str) -> list[str]:
    return preemptible_run(out, rounds, "--set", "quantize.bits=[4]",
                           "--set", "run.checkpoint_every=1", *extra)


def _rank_pids(marker: str) -> list[int]:
    """Return the PIDs of python ranks whose command line mentions ``marker``."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        text = b" ".join(cmdline).decode(errors="replace")
        if marker in text and "hflmpi" in text and "mpiexec" not in cmdline[0].decode(errors="replace") \
                and "hydra" not in text:
            pids.append(int(entry.name))
    return pids


def test_sigkill_of_one_rank_ends_the_job_and_resume_is_bit_exact(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    rounds = 300
    reference = tmp_path / "reference.h5"
    subprocess.run(_run_args(reference, rounds), check=True, env=env, timeout=600,
                   stdout=subprocess.DEVNULL)

    run = tmp_path / "killed.h5"
    proc = subprocess.Popen(_run_args(run, rounds), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    wait_for_rounds(run, 5)
    victims = _rank_pids(str(run))
    assert len(victims) == 2, f"expected the 2 rank processes, found {victims}"
    os.kill(max(victims), signal.SIGKILL)
    try:
        proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("the job hung after one rank was killed")
    assert proc.returncode != 0
    survived = load_checkpoint(run.with_name("killed.ckpt.h5")).round  # a valid checkpoint is left
    assert 1 <= survived < rounds

    subprocess.run(_run_args(run, rounds, "--resume-if-exists"), check=True, env=env, timeout=600,
                   stdout=subprocess.DEVNULL)
    resumed = load_checkpoint(run.with_name("killed.ckpt.h5"))
    expected = load_checkpoint(reference.with_name("reference.ckpt.h5"))
    assert resumed.round == expected.round == rounds
    assert np.array_equal(resumed.model, expected.model), "resume after a kill changed the bits"
    assert list(read_metrics(run)["round"]) == list(range(1, rounds + 1))
