"""Serial tests of the rank-0 progress line (hflmpi.record.progress)."""

from __future__ import annotations

import io
import math

import pytest

from hflmpi.record.progress import Progress, format_progress, interactive, is_ci, resolve_style


class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def _drive(progress: Progress, rounds: int) -> None:
    for r in range(1, rounds + 1):
        progress.update(r, loss=1.0 / r, accuracy=0.5 + r / 100, samples_per_second=1234.5)
    progress.close()


def test_silent_under_ci_non_tty_auto():
    stream = io.StringIO()
    progress = Progress(stream, "auto", every=1, total_rounds=5, env={"CI": "1"})
    assert progress.style == "off"
    _drive(progress, 5)
    assert stream.getvalue() == ""


def test_bar_line_on_a_tty():
    stream = FakeTTY()
    progress = Progress(stream, "auto", total_rounds=10, env={})
    assert progress.style == "bar"
    _drive(progress, 3)
    text = stream.getvalue()
    assert text.count("\r") == 3 and text.endswith("\n") and text.count("\n") == 1
    assert "\rround  1/10  loss 1.0000  acc 51.00%  1,234 samples/s" in text
    assert text.rstrip("\n").split("\r")[-1].startswith("round  3/10  loss 0.3333  acc 53.00%")


def test_bar_line_pads_over_a_longer_previous_line():
    stream = FakeTTY()
    progress = Progress(stream, "on", env={})
    progress.update(1, loss=1.0, accuracy=0.5, samples_per_second=1e6)
    progress.update(2)
    first, second = stream.getvalue().split("\r")[1:]
    assert len(second) == len(first) and second.startswith("round 2  loss -  acc -  - samples/s")


def test_lines_every_n_rounds_when_not_a_tty():
    stream = io.StringIO()
    progress = Progress(stream, "auto", every=4, total_rounds=10, env={"CI": "false"})
    assert progress.style == "lines"
    _drive(progress, 10)
    lines = stream.getvalue().splitlines()
    assert "\r" not in stream.getvalue()
    assert [line.split()[1] for line in lines] == ["4/10", "8/10", "10/10"]


def test_tty_under_ci_gets_plain_lines_with_on():
    stream = FakeTTY()
    progress = Progress(stream, "on", every=2, env={"CI": "true"})
    _drive(progress, 4)
    assert progress.style == "lines" and stream.getvalue().count("\n") == 2
    assert "\r" not in stream.getvalue()


def test_off_is_silent_even_on_a_tty():
    stream = FakeTTY()
    _drive(Progress(stream, "off", env={}), 3)
    assert stream.getvalue() == ""


def test_resolve_style_and_ci_detection():
    assert resolve_style("auto", FakeTTY(), {"CI": "0"}) == "bar"
    assert resolve_style("auto", FakeTTY(), {"CI": "true"}) == "off"
    assert resolve_style("on", io.StringIO(), {}) == "lines"
    assert is_ci({"CI": "yes"}) and not is_ci({}) and not is_ci({"CI": "False"})
    with pytest.raises(ValueError, match="'sometimes' is not one of"):
        resolve_style("sometimes", io.StringIO(), {})
    with pytest.raises(ValueError, match="every=0"):
        Progress(io.StringIO(), every=0, env={})


def test_format_progress_missing_values():
    assert format_progress(3) == "round 3  loss -  acc -  - samples/s"
    assert format_progress(3, 100, loss=math.nan, accuracy=0.9) == (
        "round   3/100  loss -  acc 90.00%  - samples/s"
    )


SLURM_BATCH = {"SLURM_JOB_ID": "4242", "SLURM_STEP_ID": "0"}
SLURM_PTY = {"SLURM_JOB_ID": "4242", "SLURM_PTY_PORT": "38211"}  # srun --pty: a person watches
OPEN_MPI = {"OMPI_COMM_WORLD_SIZE": "8", "OMPI_COMM_WORLD_RANK": "0"}
PMIX = {"PMIX_RANK": "0"}


@pytest.mark.parametrize("env, expected", [
    ({}, True), (SLURM_PTY, True), (SLURM_BATCH, False), (OPEN_MPI, False), (PMIX, False),
    ({**SLURM_PTY, **OPEN_MPI}, False), ({"SLURM_JOB_ID": ""}, True),
])
def test_interactive_only_on_a_tty_outside_slurm_batch_and_open_mpi(env, expected):
    assert interactive(FakeTTY(), env) is expected
    assert interactive(io.StringIO(), env) is False  # not a TTY: never interactive


@pytest.mark.parametrize("env", [SLURM_BATCH, OPEN_MPI, PMIX])
def test_auto_writes_lines_without_carriage_returns_in_batch_jobs_and_under_open_mpi(env):
    stream = FakeTTY()  # Open MPI gives each rank a pseudo-terminal even when output goes to a file
    progress = Progress(stream, "auto", every=2, total_rounds=4, env=env)
    assert progress.style == "lines"
    _drive(progress, 4)
    assert "\r" not in stream.getvalue()
    assert [line.split()[1] for line in stream.getvalue().splitlines()] == ["2/4", "4/4"]


@pytest.mark.parametrize("mode, env, stream, expected", [
    ("bar", SLURM_BATCH, io.StringIO(), "bar"),  # forced: rewrites even into a log file
    ("bar", {"CI": "true"}, io.StringIO(), "bar"),
    ("lines", {}, FakeTTY(), "lines"),  # forced: plain lines on a real terminal
    ("off", {}, FakeTTY(), "off"),
    ("on", OPEN_MPI, FakeTTY(), "lines"),
    ("on", SLURM_PTY, FakeTTY(), "bar"),
    ("auto", SLURM_PTY, FakeTTY(), "bar"),
    ("auto", {**SLURM_BATCH, "CI": "1"}, FakeTTY(), "off"),
])
def test_forced_modes_override_the_environment(mode, env, stream, expected):
    assert resolve_style(mode, stream, env) == expected


def test_forced_bar_rewrites_into_a_file():
    stream = io.StringIO()
    _drive(Progress(stream, "bar", total_rounds=3, env=SLURM_BATCH), 3)
    assert stream.getvalue().count("\r") == 3 and stream.getvalue().count("\n") == 1
