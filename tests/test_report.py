"""Serial tests of ``hflmpi report`` (hflmpi.record.report) on synthetic run files."""

from __future__ import annotations

import math
import re
import struct
from pathlib import Path

import numpy as np
import pytest

from hflmpi.cli.report import main
from hflmpi.record.report import PLOT_NAMES, PLOT_STEMS, plot, summarize
from hflmpi.record.store import RoundMetrics, RunRecord

ROUNDS = 12


def _make_run(
    path: Path, *, lr: float, acc_scale: float, bytes_l1: int, fanouts: list[int]
) -> Path:
    config = (
        f"[run]\nseed = 1\nrounds = {ROUNDS}\n\n[optim]\nlr = {lr}\n\n"
        f"[topology]\nfanouts = {fanouts}\n\n[schedule]\ntau = [5, 2]\n"
    )
    meta = {"world_size": int(np.prod(fanouts)), "tree": {"fanouts": fanouts}}
    with RunRecord.create(path, config, meta, layer_count=2) as rec:
        for r in range(1, ROUNDS + 1):
            evaluated = r % 3 == 0  # test metrics only every third round: NaN elsewhere
            rec.append_round(
                RoundMetrics(
                    round=r,
                    wall_time=2.0 * r,
                    train_loss=1.0 / r,
                    test_loss=1.5 / r if evaluated else math.nan,
                    test_accuracy=acc_scale * r / ROUNDS if evaluated else math.nan,
                    samples_per_second=500.0,
                    bytes_sent=[bytes_l1, 1024],
                    method=[1, 2],
                )
            )
    return path


@pytest.fixture
def runs(tmp_path) -> list[Path]:
    a = _make_run(tmp_path / "fedavg.h5", lr=0.1, acc_scale=0.9, bytes_l1=2048, fanouts=[4, 2])
    b = _make_run(tmp_path / "qmlhfl.h5", lr=0.05, acc_scale=0.8, bytes_l1=512, fanouts=[2, 2])
    with RunRecord.open_append(b) as rec:  # resumed: round 12 rerun, accuracy drops below r9
        rec.truncate_to(11)
        rec.append_round(RoundMetrics(round=12, wall_time=24.0, train_loss=0.05, test_loss=0.2,
                                      test_accuracy=0.55, bytes_sent=[512, 1024]))
    return [a, b]


def test_summary_numbers(runs):
    text = summarize(runs)
    lines = {line.strip().split("  ")[0]: line for line in text.splitlines()}
    assert lines["run"].split() == ["run", "fedavg", "qmlhfl"]
    assert lines["rounds"].split()[1:] == ["12", "12"]
    assert lines["world size"].split()[-2:] == ["8", "4"]
    assert "90.00% (r12)" in lines["final test accuracy"]
    assert "55.00% (r12)" in lines["final test accuracy"]
    assert "90.00% (r12)" in lines["best test accuracy"]
    assert "60.00% (r9)" in lines["best test accuracy"]
    assert lines["final train loss"].split()[-2:] == [f"{1 / 12:.4f}", "0.0500"]
    assert lines["wall time"].split()[-4:] == ["24.0", "s", "24.0", "s"]
    # layer 1: 12 * 2048 B = 24 KiB vs 12 * 512 B = 6 KiB; layer 2: 12 KiB each
    assert lines["bytes sent, layer 1"].split()[-4:] == ["24.00", "KiB", "6.00", "KiB"]
    assert lines["bytes sent, layer 2"].split()[-4:] == ["12.00", "KiB", "12.00", "KiB"]
    assert "config differences" in text
    assert lines["optim.lr"].split() == ["optim.lr", "0.1", "0.05"]
    assert lines["topology.fanouts"].split() == ["topology.fanouts", "[4,2]", "[2,2]"]
    assert "run.seed" not in text  # equal values are not differences
    assert "(meta) world_size" in text


def test_single_run_summary_has_no_diff_section(runs):
    text = summarize(runs[:1])
    assert "config differences" not in text and "fedavg" in text


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_plots_are_valid_pngs(runs, tmp_path):
    out = tmp_path / "plots"
    written = plot(runs, out)
    assert [p.name for p in written] == list(PLOT_NAMES)
    for path in written:
        assert path.parent == out and path.stat().st_size > 10_000
        width, height = _png_size(path)
        assert width > 300 and height > 200


def test_main_prints_summary_and_writes_plots(runs, tmp_path, capsys):
    out = tmp_path / "cli"
    assert main([str(p) for p in runs] + ["--out", str(out)]) == 0
    stdout = capsys.readouterr().out
    assert "best test accuracy" in stdout and stdout.count("wrote ") == len(PLOT_NAMES)
    assert sorted(p.name for p in out.iterdir()) == sorted(PLOT_NAMES)


def test_main_reports_missing_file(tmp_path, capsys):
    assert main([str(tmp_path / "nope.h5")]) == 2
    assert "nope.h5 does not exist" in capsys.readouterr().err


def _named_run(path: Path, name: str) -> Path:
    with RunRecord.create(path, f'[run]\nname = "{name}"\n', {"world_size": 4, "tree": {}},
                          layer_count=1) as rec:
        for r in (1, 2):
            rec.append_round(RoundMetrics(round=r, wall_time=r, train_loss=1.0 / r, test_loss=1.0,
                                          test_accuracy=0.5, bytes_sent=[4000]))
    return path


def test_pdf_and_svg_figures_label_series_by_run_name_with_distinct_titles(runs, tmp_path):
    named = _named_run(tmp_path / "exp3_seed1.h5", "FedAvg, 8-bit uplinks")
    written = plot([runs[0], named], tmp_path / "fig", formats=["pdf", "SVG", "pdf"])
    assert [p.name for p in written] == [f"{stem}.{fmt}" for stem in PLOT_STEMS for fmt in ("pdf", "svg")]
    titles = []
    for path in written:
        data = path.read_bytes()
        if path.suffix == ".pdf":
            assert data[:5] == b"%PDF-" and data.rstrip().endswith(b"%%EOF")
            continue
        assert data[:5] == b"<?xml" and b"<svg" in data[:1000]
        text = data.decode("utf-8")  # matplotlib writes each text as an XML comment above its glyphs
        comments = re.findall(r"<!-- (.*?) -->", text)
        assert any("FedAvg, 8-bit uplinks" in c for c in comments), comments  # the run's name
        assert any(c.startswith("fedavg") for c in comments)  # no name: the file's stem
        assert not any("exp3_seed1" in c for c in comments)
        titles.append(next(c for c in comments if c.startswith(("Test accuracy", "Training", "Bytes"))))
        if path.stem == "bytes_per_layer":
            assert "bytes per round, summed over all devices" in comments
            assert "bytes per round, per device (sum / world size)" in comments
    assert len(set(titles)) == len(titles) == len(PLOT_STEMS), titles


def test_unknown_figure_format_is_refused(runs, tmp_path, capsys):
    with pytest.raises(ValueError, match="'jpg'.*png, pdf, svg"):
        plot(runs, tmp_path / "f", formats=["jpg"])
    assert main([str(runs[0]), "--out", str(tmp_path / "g"), "--format", "eps"]) == 2
    assert "is not one of png, pdf, svg" in capsys.readouterr().err


def test_run_names_label_the_summary_and_clashes_add_the_file(tmp_path):
    a = _named_run(tmp_path / "a.h5", "same")
    b = _named_run(tmp_path / "b.h5", "same")
    header = summarize([a, b]).splitlines()[0].split()
    assert header == ["run", "same", "(a)", "same", "(b)"]
