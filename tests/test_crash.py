"""A bug during training prints one full traceback (rank 0's), a line per other rank, and ends the job.

Serial tests of the texts (hflmpi.mpi.crash), then real ``mpiexec ... hflmpi run`` jobs whose
import-path model raises in ``forward``: on every rank, and on one non-zero rank only.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
from conftest import MPIEXEC, preemptible_run

from hflmpi.mpi.crash import GRACE_SECONDS, TRACEBACK_ENV, crash_report, crash_summary
from hflmpi.record.checkpoint import CheckpointError

BOOM = '''
import os, time
from pathlib import Path
import torch
from torch import nn
from mpi4py import MPI


class Boom(nn.Module):
    """A model whose forward raises on the ranks listed; rank 0 (if listed) raises last."""

    def __init__(self, ranks, flags):
        super().__init__()
        self.linear = nn.Linear(64, 10)
        self.ranks, self.flags = list(ranks), Path(flags)

    def forward(self, x):
        comm = MPI.COMM_WORLD
        rank = comm.Get_rank()
        if rank in self.ranks:
            if rank == 0:  # let every other failing rank reach its handler first
                others = [r for r in self.ranks if r != 0]
                deadline = time.monotonic() + 120
                while time.monotonic() < deadline and not all(
                        (self.flags / f"{r}").exists() for r in others):
                    time.sleep(0.05)
                time.sleep(2)
            else:
                (self.flags / f"{rank}").touch()
            raise ValueError(f"shape mismatch in layer {rank}")
        return self.linear(x.reshape(x.shape[0], -1))
'''


def _raise(exc: BaseException) -> BaseException:
    try:
        raise exc
    except BaseException as caught:  # noqa: BLE001 - the test wants the traceback attached
        return caught


def test_summary_names_rank_type_message_and_innermost_frame():
    exc = _raise(ValueError("bad\n  shape"))
    line = crash_summary(3, exc)
    assert re.fullmatch(r"hflmpi: rank 3: ValueError: bad shape \(at .*test_crash\.py:\d+ in _raise\)",
                        line), line
    assert "\n" not in line
    assert crash_summary(1, _raise(KeyError())).startswith("hflmpi: rank 1: KeyError (at ")
    long = crash_summary(2, _raise(RuntimeError("x" * 1000)))
    assert len(long) < 500 and "xxx..." in long


def test_rank_zero_prints_the_traceback_others_one_line_unless_all():
    exc = _raise(ValueError("boom"))
    text, wait = crash_report(0, exc, {})
    assert not wait and "Traceback (most recent call last)" in text and "ValueError: boom" in text
    text, wait = crash_report(5, exc, {})
    assert wait and "Traceback" not in text and len(text.splitlines()) == 1
    assert text.startswith("hflmpi: rank 5: ValueError: boom (at ") and f"{TRACEBACK_ENV}=all" in text
    text, wait = crash_report(5, exc, {TRACEBACK_ENV: "all"})
    assert not wait and "Traceback (most recent call last)" in text


def test_a_user_error_reaching_the_handler_is_one_line_on_rank_zero():
    exc = _raise(CheckpointError("cannot write runs/a.ckpt: No space left on device"))
    assert crash_report(0, exc, {}) == ("hflmpi: error: cannot write runs/a.ckpt: No space left on "
                                        "device", False)
    assert "Traceback" in crash_report(0, exc, {TRACEBACK_ENV: "all"})[0]
    text, wait = crash_report(2, exc, {})
    assert wait and text.startswith("hflmpi: rank 2: CheckpointError: cannot write runs/a.ckpt")


def _boom_job(tmp_path, ranks, size):
    (tmp_path / "boom_model.py").write_text(BOOM)
    flags = tmp_path / "flags"
    flags.mkdir()
    command = preemptible_run(
        tmp_path / "run.h5", 2, "--set", 'model.name="boom_model:Boom"',
        "--set", f'model.kwargs={{ranks = {list(ranks)}, flags = "{flags}"}}',
        "--set", f"topology.fanouts=[{size}]", "--set", "quantize.bits=[0]")
    command[2] = str(size)  # mpiexec -n SIZE
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), *sys.path]), OMP_NUM_THREADS="1")
    env.pop(TRACEBACK_ENV, None)
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    except subprocess.TimeoutExpired:
        pytest.fail(f"a model failing on ranks {ranks} did not end the job")


@pytest.mark.skipif(not MPIEXEC.exists(), reason="no mpiexec next to this python")
def test_a_bug_on_every_rank_prints_one_traceback_and_one_line_per_other_rank(tmp_path):
    size = 3
    proc = _boom_job(tmp_path, range(size), size)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert out.count("Traceback (most recent call last)") == 1, out
    assert "hflmpi: rank 0: unexpected error, the job ends; traceback:" in out, out
    assert "ValueError: shape mismatch in layer 0" in out, out
    for rank in range(1, size):
        lines = [line for line in out.splitlines() if line.startswith(f"hflmpi: rank {rank}: ")]
        assert len(lines) == 1, out
        assert re.match(rf"hflmpi: rank {rank}: ValueError: shape mismatch in layer {rank} "
                        r"\(at .*boom_model\.py:\d+ in forward\)", lines[0]), lines[0]


@pytest.mark.skipif(not MPIEXEC.exists(), reason="no mpiexec next to this python")
def test_a_bug_on_one_nonzero_rank_is_named_and_ends_the_job(tmp_path):
    proc = _boom_job(tmp_path, [2], 3)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert re.search(r"hflmpi: rank 2: ValueError: shape mismatch in layer 2 \(at .*boom_model\.py:\d+ "
                     r"in forward\)", out), out
    # Rank 0 did not fail, so after the grace rank 2 gives its own traceback and ends the job.
    assert f"the job has not ended within {GRACE_SECONDS:g} s" in out, out
    assert out.count("Traceback (most recent call last)") == 1, out
    assert "rank 0: unexpected error" not in out
