"""Serial tests of the HDF5 run record (hflmpi.record.store)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import h5py
import numpy as np
import pytest

import hflmpi
from hflmpi import __version__
from hflmpi.record.reading import read_config_toml, read_metrics, read_partition, read_run_info
from hflmpi.record.store import LAYER_METRICS, METHOD_CODES, SCALAR_METRICS, RoundMetrics, RunRecord

CONFIG = '[run]\nseed = 7\n\n[topology]\nfanouts = [4, 2]\n'
META = {"world_size": 8, "tree": {"fanouts": [4, 2]}, "start_time_unix": 1_700_000_000.0}


def _row(r: int, layers: int = 2) -> RoundMetrics:
    return RoundMetrics(
        round=r,
        wall_time=1.5 * r,
        train_loss=1.0 / r,
        test_loss=math.nan if r % 2 else 2.0 / r,
        test_accuracy=0.5 + 0.01 * r,
        samples_per_second=1000.0 + r,
        compute_seconds=[0.1 * r] * layers,
        comm_seconds=[0.01 * r, None][:layers],
        bytes_sent=[1000 * r, 10 * r][:layers],
        quant_error=[0.02, 0.0][:layers],
        method=["integer-sum", 2][:layers],
        upward_divergence=0.3 * r,
        downward_divergence=0.2 * r,
    )


@pytest.fixture
def run_path(tmp_path):
    return tmp_path / "run.h5"


def test_create_writes_attrs_and_layout(run_path):
    with RunRecord.create(run_path, CONFIG, {**META, "note": {"a": 1}}, layer_count=2) as rec:
        assert rec.row_count == 0 and rec.last_round is None
    with h5py.File(run_path, "r") as f:
        assert f.attrs["config_toml"] == CONFIG
        assert f.attrs["hflmpi_version"] == __version__
        assert f.attrs["world_size"] == 8
        assert json.loads(f.attrs["tree"]) == {"fanouts": [4, 2]}
        assert f.attrs["start_time"] == "2023-11-14T22:13:20+00:00"
        assert json.loads(f.attrs["note"]) == {"a": 1}
        for name in SCALAR_METRICS:
            ds = f["metrics"][name]
            assert ds.shape == (0,) and ds.maxshape == (None,) and ds.chunks is not None
        for name in LAYER_METRICS:
            ds = f["metrics"][name]
            assert ds.shape == (0, 2) and ds.maxshape == (None, 2) and ds.chunks is not None
        codes = json.loads(f["metrics/method"].attrs["codes"])
        assert codes == {"0": "none", "1": "integer-sum", "2": "gather", "3": "lanes"}
        assert "device models" in f["metrics/downward_divergence"].attrs["description"]
    assert read_config_toml(run_path) == CONFIG
    assert read_run_info(run_path)["tree"] == {"fanouts": [4, 2]}


def test_rows_round_trip(run_path):
    with RunRecord.create(run_path, CONFIG, META, layer_count=2) as rec:
        for r in range(1, 6):
            rec.append_round(_row(r))
        rec.append_round(RoundMetrics(round=6))  # everything missing
    m = read_metrics(run_path)
    assert set(m) == set(SCALAR_METRICS) | set(LAYER_METRICS)
    np.testing.assert_array_equal(m["round"], np.arange(1, 7))
    np.testing.assert_array_equal(m["wall_time"][:5], 1.5 * np.arange(1, 6))
    np.testing.assert_array_equal(m["train_loss"][:5], 1.0 / np.arange(1, 6))
    assert np.isnan(m["test_loss"][0]) and m["test_loss"][1] == 1.0
    np.testing.assert_array_equal(m["bytes_sent"][2], [3000.0, 30.0])
    assert np.isnan(m["comm_seconds"][0, 1])
    np.testing.assert_array_equal(m["method"][0], [METHOD_CODES["integer-sum"], 2])
    assert m["method"].dtype == np.int8
    np.testing.assert_allclose(m["upward_divergence"][:5], 0.3 * np.arange(1, 6))
    last = {k: v[5] for k, v in m.items()}
    assert all(np.isnan(last[k]) for k in SCALAR_METRICS if k != "round")
    assert np.isnan(last["bytes_sent"]).all() and (last["method"] == -1).all()


def test_rows_are_visible_to_a_reader_while_the_writer_is_open(run_path):
    with RunRecord.create(run_path, CONFIG, META, layer_count=1) as rec:
        rec.append_round(_row(1, layers=1))
        assert read_metrics(run_path)["round"].tolist() == [1]


def test_bad_rows_are_rejected_without_ragged_datasets(run_path):
    with RunRecord.create(run_path, CONFIG, META, layer_count=2) as rec:
        rec.append_round(_row(1))
        with pytest.raises(ValueError, match="not after the last stored round 1"):
            rec.append_round(_row(1))
        with pytest.raises(ValueError, match="bytes_sent has 3 values.*2 layers"):
            rec.append_round(RoundMetrics(round=2, bytes_sent=[1, 2, 3]))
        with pytest.raises(ValueError, match="method"):
            rec.append_round(RoundMetrics(round=2, method=["bogus", 0]))
    shapes = {k: v.shape[0] for k, v in read_metrics(run_path).items()}
    assert set(shapes.values()) == {1}


def test_truncate_to_and_resume_do_not_duplicate_rounds(run_path):
    with RunRecord.create(run_path, CONFIG, META, layer_count=2) as rec:
        for r in range(1, 8):
            rec.append_round(_row(r))
    with RunRecord.open_append(run_path) as rec:
        assert rec.truncate_to(4) == 4
        assert rec.last_round == 4
        for r in range(5, 9):
            rec.append_round(_row(r))
    m = read_metrics(run_path)
    np.testing.assert_array_equal(m["round"], np.arange(1, 9))
    assert all(v.shape[0] == 8 for v in m.values())
    np.testing.assert_array_equal(m["wall_time"], 1.5 * np.arange(1, 9))
    log = read_run_info(run_path)["resume_log"]
    assert log[0]["round"] == 4 and log[0]["dropped_rows"] == 3


def test_truncate_to_zero_empties(run_path):
    with RunRecord.create(run_path, CONFIG, META, layer_count=1) as rec:
        rec.append_round(_row(1, layers=1))
        assert rec.truncate_to(0) == 0
        rec.append_round(_row(1, layers=1))
    assert read_metrics(run_path)["round"].tolist() == [1]


def test_overwrite_refused_unless_asked(run_path):
    RunRecord.create(run_path, CONFIG, META, layer_count=1).close()
    with pytest.raises(FileExistsError, match=str(run_path)):
        RunRecord.create(run_path, CONFIG, META, layer_count=1)
    with RunRecord.create(run_path, "[run]\n", META, layer_count=3, overwrite=True) as rec:
        assert rec.layer_count == 3
    assert read_config_toml(run_path) == "[run]\n"


def test_open_append_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.h5"):
        RunRecord.open_append(tmp_path / "missing.h5")
    with h5py.File(tmp_path / "other.h5", "w"):
        pass
    with pytest.raises(ValueError, match="not an hflmpi run record"):
        RunRecord.open_append(tmp_path / "other.h5")


def test_partition_round_trip(run_path):
    sizes = [10, 20, 30]
    hist = np.array([[5, 5], [20, 0], [10, 20]])
    with RunRecord.create(run_path, CONFIG, META, layer_count=1) as rec:
        assert read_partition(run_path) is None
        rec.write_partition(sizes, hist)
        rec.write_partition(sizes, hist)  # replaced, not an error
        with pytest.raises(ValueError, match="clients"):
            rec.write_partition([1, 2], hist)
    got = read_partition(run_path)
    assert got is not None
    np.testing.assert_array_equal(got[0], sizes)
    np.testing.assert_array_equal(got[1], hist)


def test_live_run_is_readable_from_another_process(run_path):
    import subprocess
    import sys

    code = (
        "import sys; from hflmpi.record.reading import read_metrics; "
        "print(read_metrics(sys.argv[1])['round'].tolist())"
    )
    with RunRecord.create(run_path, CONFIG, META, layer_count=1) as rec:
        rec.append_round(_row(1, layers=1))
        rec.append_round(_row(2, layers=1))
        out = subprocess.run(
            [sys.executable, "-c", code, str(run_path)],
            capture_output=True, text=True, timeout=60, cwd=Path(hflmpi.__file__).parents[1],
        )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[1, 2]"


def test_replace_config_keeps_a_history(run_path):
    """A resume that changes the config stores the new one and logs the change."""
    RunRecord.create(run_path, CONFIG, META, layer_count=2).close()
    assert read_run_info(run_path)["config_history"] == []
    new = CONFIG.replace("seed = 7", "seed = 8")
    with RunRecord.open_append(run_path) as rec:
        rec.replace_config(new, {"round": 3, "changes": {"run.seed": {"stored": "7", "given": "8"}}})
    assert read_config_toml(run_path) == new
    history = read_run_info(run_path)["config_history"]
    assert len(history) == 1 and history[0]["round"] == 3 and "time" in history[0]
    assert history[0]["changes"] == {"run.seed": {"stored": "7", "given": "8"}}


def test_read_config_toml_of_a_file_without_one(tmp_path):
    path = tmp_path / "other.h5"
    with h5py.File(path, "w") as handle:
        handle.attrs["something"] = 1
    with pytest.raises(ValueError, match="stores no config"):
        read_config_toml(path)


def test_a_metric_column_added_later_is_created_on_resume_with_nan_before(run_path):
    """A run file written before ``mpi_bytes`` existed: resuming it adds the column, NaN for the
    rounds it did not measure."""
    with RunRecord.create(run_path, "", {"world_size": 1, "tree": []}, layer_count=2) as record:
        record.append_round(RoundMetrics(round=1, bytes_sent=[1.0, 2.0]))
        record.append_round(RoundMetrics(round=2, bytes_sent=[3.0, 4.0]))
    with h5py.File(run_path, "r+") as file:  # what an older hflmpi wrote
        del file["metrics/mpi_bytes"]
    with RunRecord.open_append(run_path) as record:
        record.append_round(RoundMetrics(round=3, bytes_sent=[5.0, 6.0], mpi_bytes=[0.5, 0.25]))
    metrics = read_metrics(run_path)
    expected = np.array([[np.nan, np.nan], [np.nan, np.nan], [0.5, 0.25]])
    np.testing.assert_array_equal(metrics["mpi_bytes"], expected)
    np.testing.assert_array_equal(metrics["bytes_sent"], [[1, 2], [3, 4], [5, 6]])
