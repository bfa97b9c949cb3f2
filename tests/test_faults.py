"""Injected faults end the job with a clear message (no hang) and lose no data.

Each case runs real processes: a rank stopped (SIGSTOP) or busy while the others wait in a
collective, which the watchdog must end naming that rank, in every collective of a round; a
rank killed with SIGKILL in the middle of a run, after which ``--resume`` must reproduce the
uninterrupted run's final model bit for bit; and a disk that fills up under a run (a real, tiny
tmpfs).
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import JOBS, MPIEXEC, preemptible_run, wait_for_rounds

from hflmpi.record.checkpoint import load_checkpoint, load_latest_valid
from hflmpi.record.reading import read_metrics

pytestmark = pytest.mark.skipif(not MPIEXEC.exists(), reason="no mpiexec next to this python")

STALL = """
import os, signal, sys, time
from mpi4py import MPI
from hflmpi.mpi.guard import Watchdog
comm = MPI.COMM_WORLD
dog = Watchdog(comm, 1.0)
with dog.guard("the warm-up barrier"):
    comm.Barrier()
if comm.Get_rank() == 1:  # a stuck rank: the others wait for it in the next collective
    if sys.argv[1] == "stopped":
        os.kill(os.getpid(), signal.SIGSTOP)
    else:
        time.sleep(120)
with dog.guard("the layer-2 aggregation of round 7"):
    comm.Barrier()
"""


def _kill_ranks(pids: list[int], marker: str) -> None:
    """SIGCONT then SIGKILL the rank processes whose command line still mentions ``marker``."""
    for pid in pids:
        try:
            if marker not in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace"):
                continue  # gone (the pid may be someone else's now)
            os.kill(pid, signal.SIGCONT)
            os.kill(pid, signal.SIGKILL)
        except (OSError, ProcessLookupError):
            pass


def _watchdog_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("hflmpi: watchdog:")]


@pytest.mark.parametrize("how, reason", [
    ("stopped", "no answer within 2 s: stopped, dead, or stuck holding the GIL"),
    ("busy", "busy outside any collective since the warm-up barrier ended"),
])
def test_watchdog_names_the_rank_that_did_not_arrive(tmp_path, how, reason):
    script = tmp_path / "stall.py"
    script.write_text(STALL)
    proc = subprocess.Popen([str(MPIEXEC), "-n", "3", sys.executable, str(script), how],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _, stderr = proc.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"the watchdog did not end the job with rank 1 {how}")
    finally:
        _kill_ranks(_rank_pids(str(script), "stall.py"), str(script))
    lines = _watchdog_lines(stderr)
    assert proc.returncode != 0
    assert lines, stderr
    for line in lines:  # every rank that timed out (0 and 2) tells the same story
        assert "the layer-2 aggregation of round 7 stalled for more than 1 s on rank " in line, line
        assert f"rank 1 did not arrive ({reason}" in line, line


def test_watchdog_below_thread_multiple_still_aborts(tmp_path):
    script = tmp_path / "stall.py"
    script.write_text(STALL)
    env = dict(os.environ, MPI4PY_RC_THREAD_LEVEL="serialized")
    proc = subprocess.run([str(MPIEXEC), "-n", "2", sys.executable, str(script), "busy"],
                          capture_output=True, text=True, timeout=180, env=env)
    assert proc.returncode != 0
    assert ("the layer-2 aggregation of round 7 stalled for more than 1 s on rank 0; cannot tell "
            "which rank is missing (MPI runs below MPI_THREAD_MULTIPLE)") in proc.stderr


# `hflmpi run` with one rank SIGSTOPping itself on entry to the nth call of a function: the other
# ranks wait in the collective that follows, and the watchdog must name the stopped rank.
STOP_ON_ENTRY = """
import os, signal, sys
from pathlib import Path
from mpi4py import MPI
rank = MPI.COMM_WORLD.Get_rank()
Path(sys.argv[1], f"rank{rank}.pid").write_text(str(os.getpid()))
import hflmpi.federation
import hflmpi.cli.run
from hflmpi.mpi.aggregate import HierarchicalAggregator
victim, target, nth = int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
owner = {"aggregate": HierarchicalAggregator, "end_of_round": hflmpi.federation,
         "measure_divergences": hflmpi.federation, "write_checkpoint": hflmpi.federation}[target]
original = getattr(owner, target)
calls = [0]
def stop_on_entry(*args, **kwargs):
    calls[0] += 1
    if rank == victim and calls[0] == nth:
        os.kill(os.getpid(), signal.SIGSTOP)
    return original(*args, **kwargs)
setattr(owner, target, stop_on_entry)
sys.exit(hflmpi.cli.run.main(sys.argv[5:]))
"""

TAU, EVAL_EVERY, CHECKPOINT_EVERY, WATCHDOG = 3, 2, 3, 6.0


def _stop_points() -> list[tuple[int, str, int, str]]:
    """(victim rank, function, nth call, the phase the others wait in) from the run's schedule.

    One global round is one layer-1 aggregation after TAU steps; the divergences are measured
    before it in every EVAL_EVERY-th round; the preemption poll follows every round; checkpoints
    are written every CHECKPOINT_EVERY rounds.
    """
    return [
        (1, "aggregate", 2, f"the layer-1 aggregation of round 2 (step {TAU})"),
        (2, "measure_divergences", 1, f"the divergence measurement of round {EVAL_EVERY}"),
        (3, "write_checkpoint", 1, f"the round-{CHECKPOINT_EVERY} checkpoint"),
        (2, "end_of_round", 2, "the preemption poll after round 2"),
    ]


def _is_stopped(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] == "T"


@pytest.mark.parametrize("victim, target, nth, phase", _stop_points())
def test_watchdog_names_the_stopped_rank_in_every_collective(tmp_path, victim, target, nth, phase):
    script, piddir = tmp_path / "stop_on_entry.py", tmp_path / "pids"
    script.write_text(STOP_ON_ENTRY)
    piddir.mkdir()
    command = [
        str(MPIEXEC), "-n", "4", sys.executable, "-m", "mpi4py", str(script),
        str(piddir), str(victim), target, str(nth), str(JOBS / "preemptible.toml"),
        "--set", f'run.out="{tmp_path / "run.h5"}"', "--set", "run.rounds=6",
        "--set", "topology.fanouts=[4]", "--set", f"schedule.tau=[{TAU}]",
        "--set", "quantize.bits=[8]", "--set", 'run.progress="off"',
        "--set", f"run.eval_every={EVAL_EVERY}", "--set", "run.divergence=true",
        "--set", f"run.checkpoint_every={CHECKPOINT_EVERY}",
        "--set", f"run.watchdog_seconds={WATCHDOG}",
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    pidfile = piddir / f"rank{victim}.pid"
    try:
        deadline = time.monotonic() + 300  # start-up of 4 ranks on a busy machine
        while not (pidfile.exists() and pidfile.read_text() and _is_stopped(int(pidfile.read_text()))):
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"rank {victim} never stopped at call {nth} of {target}; exit code "
                            f"{proc.poll()}: {proc.communicate(timeout=60)[1] if proc.poll() else ''}")
            time.sleep(0.2)
        # the timeout, the grace period for answers, and generous slack for a busy machine
        _, stderr = proc.communicate(timeout=WATCHDOG + WATCHDOG + 90)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"the job hung with rank {victim} stopped at call {nth} of {target}")
    finally:
        pids = [int(f.read_text()) for f in piddir.glob("rank*.pid") if f.read_text()]
        _kill_ranks(pids, str(script))
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    lines = _watchdog_lines(stderr)
    assert proc.returncode != 0
    assert lines, stderr
    for line in lines:
        assert phase in line, line
        assert f"rank {victim} did not arrive (no answer" in line, line


def _run_args(out: Path, rounds: int, *extra: str) -> list[str]:
    return preemptible_run(out, rounds, "--set", "quantize.bits=[4]",
                           "--set", "run.checkpoint_every=1", *extra)


def _rank_pids(marker: str, program: str = "hflmpi") -> list[int]:
    """Return the PIDs of python ranks whose command line mentions ``marker`` and ``program``."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        text = b" ".join(cmdline).decode(errors="replace")
        if marker in text and program in text and "mpiexec" not in cmdline[0].decode(errors="replace") \
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


# -- a full disk ---------------------------------------------------------------------------------
@pytest.fixture
def small_disk(tmp_path):
    """A 2 MiB tmpfs mounted for the test: a real file system that runs out of space."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if not sys.platform.startswith("linux") or os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("mounting a tmpfs needs Linux and root")
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)],
                          capture_output=True, text=True, timeout=30)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    try:
        yield mount
    finally:
        if subprocess.run(["umount", str(mount)], capture_output=True, timeout=30).returncode:
            subprocess.run(["umount", "-l", str(mount)], capture_output=True, timeout=30)


def fill(directory: Path) -> None:
    """Write a filler file into ``directory`` until its file system reports ENOSPC."""
    block = b"\0" * 4096
    with open(directory / "filler", "wb", buffering=0) as handle:
        try:
            while True:
                handle.write(block)
        except OSError as err:
            assert err.errno == errno.ENOSPC, err


FULL_RECORD = """
import errno, os, sys
from hflmpi.record.store import RoundMetrics, RunRecord
run = sys.argv[1]
record = RunRecord.create(run, "", {"world_size": 1, "tree": []}, layer_count=2)
for r in range(1, 4):
    record.append_round(RoundMetrics(round=r, train_loss=1.0 / r))
with open(os.path.join(os.path.dirname(run), "filler"), "wb", buffering=0) as handle:
    try:
        while True:
            handle.write(bytes(4096))
    except OSError:
        pass
failed = None
for r in range(4, 5000):  # the metrics outgrow their first chunk: HDF5 needs more space
    try:
        record.append_round(RoundMetrics(round=r, train_loss=1.0 / r))
    except (OSError, RuntimeError) as err:
        failed = (r, type(err).__name__, getattr(err, "errno", None))
        break
try:
    record.close()
except (OSError, RuntimeError):
    pass
print("failed", failed, flush=True)
"""


def test_full_disk_fails_the_metrics_write_and_the_process_exits_cleanly(small_disk):
    """HDF5 2.0 crashed at exit (SIGSEGV/SIGBUS in H5_term_library) after a write failed on a full
    disk while dirty chunks sat in the chunk cache. The write must fail where it happens (ENOSPC,
    in ``append_round``) and the process must exit normally."""
    script = small_disk.parent / "full_record.py"
    script.write_text(FULL_RECORD)
    proc = subprocess.run([sys.executable, str(script), str(small_disk / "run.h5")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"exit {proc.returncode}; stderr: {proc.stderr[-3000:]}"
    assert f"'OSError', {errno.ENOSPC})" in proc.stdout, proc.stdout
    assert "Exception ignored" not in proc.stderr, proc.stderr[-3000:]


FULL_CHECKPOINT = """
import errno, os, sys
import numpy as np
from hflmpi.record.checkpoint import CheckpointError, load_latest_valid, save_checkpoint
disk = sys.argv[1]
run = os.path.join(disk, "run.h5")
for room in (0, 4096, 8192, 16384, 32768):  # bytes left free: HDF5's writes fail part-way
    for size in (100, 5000, 10000, 50000):
        for name in os.listdir(disk):
            os.unlink(os.path.join(disk, name))
        save_checkpoint(run, round=1, model_flat=np.arange(1000, dtype=np.float32))
        free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
        with open(os.path.join(disk, "filler"), "wb") as handle:
            handle.write(bytes(max(0, free - room)))
        try:
            save_checkpoint(run, round=2, model_flat=np.ones(size, dtype=np.float32))
            outcome = "written"
        except CheckpointError as err:
            outcome = "ENOSPC" if getattr(err.__cause__, "errno", None) == errno.ENOSPC else repr(err)
        files = sorted(os.listdir(disk))
        print(room, size, outcome, load_latest_valid(run).round, *files, flush=True)
"""


def test_full_disk_fails_the_checkpoint_write_and_the_process_exits_cleanly(small_disk):
    """A checkpoint write that ran out of space part-way (inside HDF5's metadata or sieve-buffer
    flush) raised ``Can't decrement id ref count`` from h5py finalisers and crashed at exit
    (SIGSEGV in H5_term_library; exit 11 under mpiexec). Each such write must fail as
    CheckpointError from ENOSPC, keep the previous checkpoint, leave no temporary file, and the
    process must exit normally."""
    script = small_disk.parent / "full_checkpoint.py"
    script.write_text(FULL_CHECKPOINT)
    proc = subprocess.run([sys.executable, str(script), str(small_disk)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"exit {proc.returncode}; stderr: {proc.stderr[-3000:]}"
    assert "Exception ignored" not in proc.stderr, proc.stderr[-3000:]
    rows = [line.split() for line in proc.stdout.splitlines()]
    assert len(rows) == 20, proc.stdout
    for room, size, outcome, kept, *files in rows:
        if outcome == "written":
            assert kept == "2" and files == ["filler", "run.ckpt.h5", "run.ckpt.prev.h5"], rows
        else:
            assert outcome == "ENOSPC" and kept == "1" and files == ["filler", "run.ckpt.h5"], rows
    failed_part_way = [row for row in rows if row[2] == "ENOSPC" and row[0] != "0"]
    assert len(failed_part_way) >= 5, proc.stdout


@pytest.mark.parametrize("every, filled_after", [(1, 3), (200, 201)],
                         ids=["checkpoint-fails-first", "metrics-fail-first"])
def test_full_disk_ends_the_run_with_exit_2_and_keeps_the_checkpoint(small_disk, every,
                                                                      filled_after):
    """``hflmpi run`` on a disk that fills up: one error naming the cause, exit 2 on every rank
    (no segfault, no MPI_Abort), and the checkpoints written before stay valid.

    With a checkpoint every round, the next checkpoint is the first write to fail. With one every
    200 rounds, the metrics fail first: their per-layer datasets need a new chunk at round 257.
    """
    run = small_disk / "run.h5"
    args = [*_run_args(run, 100_000), "--set", f"run.checkpoint_every={every}"]
    proc = subprocess.Popen(args, env=dict(os.environ, OMP_NUM_THREADS="1"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_rounds(run, filled_after)  # the checkpoint of the round before is complete
        fill(small_disk)
        _, stderr = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    errors = [line for line in stderr.splitlines() if line.startswith("hflmpi: error:")]
    assert proc.returncode == 2, f"exit {proc.returncode}; stderr: {stderr[-3000:]}"
    assert len(errors) == 1 and "disk full (ENOSPC)" in errors[0], stderr[-3000:]
    assert "Segmentation" not in stderr and "Exception ignored" not in stderr, stderr[-3000:]
    (small_disk / "filler").unlink()
    kept = load_latest_valid(run)
    assert kept.round >= filled_after - 1 and kept.round % every == 0, kept.round
    assert not list(small_disk.glob("*.tmp")), sorted(p.name for p in small_disk.iterdir())
