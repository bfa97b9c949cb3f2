"""Serial tests of the rank-0 progress line (hflmpi.record.progress)."""

from __future__ import annotations

import io
import math

import pytest

from hflmpi.record.progress import Progress, format_progress, is_ci, resolve_style


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


def test_live_line_on_a_tty():
    stream = FakeTTY()
    progress = Progress(stream, "auto", total_rounds=10, env={})
    assert progress.style == "live"
    _drive(progress, 3)
    text = stream.getvalue()
    assert text.count("\r") == 3 and text.endswith("\n") and text.count("\n") == 1
    assert "\rround  1/10  loss 1.0000  acc 51.00%  1,234 samples/s" in text
    assert text.rstrip("\n").split("\r")[-1].startswith("round  3/10  loss 0.3333  acc 53.00%")


def test_live_line_pads_over_a_longer_previous_line():
    stream = FakeTTY()
    progress = Progress(stream, "on", env={})
    progress.update(1, loss=1.0, accuracy=0.5, samples_per_second=1e6)
    progress.update(2)
    first, second = stream.getvalue().split("\r")[1:]
    assert len(second) == len(first) and second.startswith("round 2  loss -  acc -  - samples/s")


def test_plain_lines_every_n_rounds_when_not_a_tty():
    stream = io.StringIO()
    progress = Progress(stream, "auto", every=4, total_rounds=10, env={"CI": "false"})
    assert progress.style == "plain"
    _drive(progress, 10)
    lines = stream.getvalue().splitlines()
    assert "\r" not in stream.getvalue()
    assert [line.split()[1] for line in lines] == ["4/10", "8/10", "10/10"]


def test_tty_under_ci_gets_plain_lines_with_on():
    stream = FakeTTY()
    progress = Progress(stream, "on", every=2, env={"CI": "true"})
    _drive(progress, 4)
    assert progress.style == "plain" and stream.getvalue().count("\n") == 2
    assert "\r" not in stream.getvalue()


def test_off_is_silent_even_on_a_tty():
    stream = FakeTTY()
    _drive(Progress(stream, "off", env={}), 3)
    assert stream.getvalue() == ""


def test_resolve_style_and_ci_detection():
    assert resolve_style("auto", FakeTTY(), {"CI": "0"}) == "live"
    assert resolve_style("auto", FakeTTY(), {"CI": "true"}) == "off"
    assert resolve_style("on", io.StringIO(), {}) == "plain"
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
