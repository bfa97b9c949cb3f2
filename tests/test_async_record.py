"""The simulated clock in the run record: /metrics/sim_time, /metrics/late, /clients/late, in run
files written before those columns existed, and in ``hflmpi report``."""

from __future__ import annotations

import math
from pathlib import Path

import h5py
import numpy as np
import pytest

from hflmpi.record.reading import read_clients, read_metrics
from hflmpi.record.report import PLOT_NAMES, SIM_TIME_STEM, plot, summarize
from hflmpi.record.store import RoundMetrics, RunRecord

CONFIG = "[run]\nseed = 1\nrounds = 3\n\n[topology]\nfanouts = [2, 2]\n\n[schedule]\ntau = [2, 2]\n"
META = {"world_size": 4, "tree": {"fanouts": [2, 2]}}


def _round(r: int, sim_time: float = math.nan, late=None) -> RoundMetrics:
    return RoundMetrics(round=r, wall_time=float(r), train_loss=1.0 / r, test_loss=1.0 / r,
                        test_accuracy=0.3 * r, sim_time=sim_time, late=late)


def _clients(record: RunRecord, r: int, late=None) -> None:
    took_part = np.array([True, True, False, True])
    loss = np.where(took_part, 0.5, np.nan)
    record.append_clients(r, took_part, loss, np.full(4, np.nan), took_part.astype(np.int64),
                          late=late)


def _old_file(path: Path) -> Path:
    """A run file of one round as written before the simulated clock existed."""
    with RunRecord.create(path, CONFIG, META, layer_count=2) as record:
        record.append_round(_round(1))
        _clients(record, 1)
    with h5py.File(path, "a") as file:
        for name in ("metrics/sim_time", "metrics/late", "clients/late", "clients/staleness"):
            del file[name]
    return path


def test_an_old_run_file_takes_the_new_columns_on_resume(tmp_path):
    path = _old_file(tmp_path / "old.h5")
    assert "sim_time" not in read_metrics(path) and "late" not in read_clients(path)
    assert "staleness" not in read_clients(path)
    with RunRecord.open_append(path) as record:
        record.append_round(_round(2, sim_time=5.0, late=[3, 0]))
        _clients(record, 2, late=np.array([False, True, False, False]))
        record.append_round(_round(3))
        record.append_clients(3, np.ones(4, dtype=bool), np.full(4, 0.5), np.full(4, np.nan),
                              np.ones(4, dtype=np.int64), staleness=np.array([0, 2, np.nan, 1]))
    metrics = read_metrics(path)
    np.testing.assert_array_equal(metrics["sim_time"], [np.nan, 5.0, np.nan])
    np.testing.assert_array_equal(metrics["late"], [[np.nan, np.nan], [3, 0], [np.nan] * 2])
    clients = read_clients(path)
    np.testing.assert_array_equal(clients["late"], [[False] * 4, [False, True, False, False],
                                                    [False] * 4])
    np.testing.assert_array_equal(clients["staleness"], [[np.nan] * 4, [np.nan] * 4,
                                                         [0, 2, np.nan, 1]])
    with RunRecord.open_append(path) as record:  # the new columns truncate like the others
        record.truncate_to(1)
    assert read_metrics(path)["sim_time"].shape == (1,)
    assert read_clients(path)["late"].shape == (1, 4)


def test_late_flags_are_only_for_participants(tmp_path):
    with RunRecord.create(tmp_path / "r.h5", CONFIG, META, layer_count=2) as record:
        with pytest.raises(ValueError, match="set only for clients that took part"):
            _clients(record, 1, late=np.array([False, False, True, False]))


def test_report_shows_the_simulated_time_and_plots_accuracy_against_it(tmp_path):
    old = _old_file(tmp_path / "old.h5")
    timed = tmp_path / "timed.h5"
    with RunRecord.create(timed, CONFIG, META, layer_count=2) as record:
        for r in (1, 2, 3):
            record.append_round(_round(r, sim_time=2.5 * r, late=[r, 0]))
    lines = {line.split("  ")[0]: line for line in summarize([old, timed]).splitlines()}
    assert lines["simulated time"].split()[-3:] == ["-", "7.5", "s"]
    assert lines["late updates, layer 1"].split()[-2:] == ["-", "6"]
    written = plot([old, timed], tmp_path / "plots")
    assert [p.name for p in written] == [*PLOT_NAMES, f"{SIM_TIME_STEM}.png"]
    assert [p.name for p in plot([old], tmp_path / "old-plots")] == list(PLOT_NAMES)


def test_buffered_columns_in_an_old_file_and_in_the_report(tmp_path):
    old = _old_file(tmp_path / "old.h5")
    with h5py.File(old, "a") as file:
        for name in ("flushes", "staleness_count", "staleness_mean", "staleness_max"):
            del file[f"metrics/{name}"]
    assert "flushes" not in read_metrics(old)
    buffered = tmp_path / "buffered.h5"
    with RunRecord.create(buffered, CONFIG, META, layer_count=2) as record:
        for r, (count, mean, top) in enumerate([(4, 0.5, 1), (6, 2.0, 5)], start=1):
            record.append_round(RoundMetrics(
                round=r, test_accuracy=0.5, sim_time=float(r), late=[1, 0],
                flushes=[2, math.nan], staleness_count=[count, math.nan],
                staleness_mean=[mean, math.nan], staleness_max=[top, math.nan]))
    metrics = read_metrics(buffered)
    np.testing.assert_array_equal(metrics["staleness_mean"], [[0.5, np.nan], [2.0, np.nan]])
    with RunRecord.open_append(old) as record:  # a resume adds the columns, NaN before
        record.append_round(_round(2, sim_time=5.0, late=[0, 0]))
    np.testing.assert_array_equal(read_metrics(old)["flushes"], np.full((2, 2), np.nan))
    # old run first: the buffered rows still line up, "-" where a run has no buffered layer
    lines = {line.split("  ")[0]: line for line in summarize([old, buffered]).splitlines()}
    assert lines["flushes, layer 1"].split()[-2:] == ["-", "4"]
    # mean over the 10 applied updates: (4 * 0.5 + 6 * 2.0) / 10 = 1.4; max 5
    assert lines["staleness mean/max, layer 1"].split()[-4:] == ["-", "1.40", "/", "5"]
    assert "flushes, layer 2" not in lines
    assert "carried late updates, layer 1" not in lines


def test_the_report_shows_carried_late_updates_and_their_staleness(tmp_path):
    carried = tmp_path / "carried.h5"
    with RunRecord.create(carried, CONFIG, META, layer_count=2) as record:
        for r, (count, mean, top) in enumerate([(3, 1.0, 1), (1, 4.0, 4)], start=1):
            record.append_round(RoundMetrics(
                round=r, test_accuracy=0.5, sim_time=float(r), late=[5, 0],
                flushes=[math.nan, math.nan], staleness_count=[count, math.nan],
                staleness_mean=[mean, math.nan], staleness_max=[top, math.nan]))
    lines = {line.split("  ")[0]: line for line in summarize([carried]).splitlines()}
    assert lines["carried late updates, layer 1"].split()[-1] == "4"
    # (3 * 1 + 1 * 4) / 4 = 1.75; max 4
    assert lines["staleness mean/max, layer 1"].split()[-3:] == ["1.75", "/", "4"]
    assert "flushes, layer 1" not in lines and "carried late updates, layer 2" not in lines
