"""Serial tests of the per-client rows of the run record (RunRecord.append_clients, read_clients)."""

from __future__ import annotations

import math
import statistics
from pathlib import Path

import h5py
import numpy as np
import pytest

from hflmpi.record.reading import read_clients, read_metrics, read_participation, read_run_info
from hflmpi.record.report import summarize
from hflmpi.record.store import RoundMetrics, RunRecord

CONFIG = '[run]\nseed = 3\n\n[topology]\nfanouts = [2, 2]\n\n[schedule]\ntau = [5, 2]\n'
META = {"world_size": 4, "tree": {"fanouts": [2, 2]}}


def _pack_reference(bits: np.ndarray) -> bytes:
    """Client c is bit c % 8 of byte c // 8, least significant bit first; padding bits 0."""
    out = bytearray((len(bits) + 7) // 8)
    for c, flag in enumerate(bits.tolist()):
        if flag:
            out[c // 8] |= 1 << (c % 8)
    return bytes(out)


def _round_data(clients: int, r: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Participation, losses, scores and samples of round ``r``, consistent with each other."""
    rng = np.random.default_rng([seed, clients, r])
    mask = rng.random(clients) < 0.3
    loss = np.where(mask, rng.random(clients) * 3.0, np.nan)
    loss[np.flatnonzero(mask)[:1]] = np.nan  # a participant whose loss was not measured
    score = rng.random(clients)
    score[rng.random(clients) < 0.1] = np.nan
    samples = np.where(mask, rng.integers(1, 500, clients), 0)
    return {"participated": mask, "losses": loss, "scores": score, "samples": samples}


def _append(rec: RunRecord, r: int, data: dict[str, np.ndarray]) -> None:
    rec.append_clients(r, data["participated"], data["losses"], data["scores"], data["samples"])


def _check(path: Path, rounds: list[int], datas: list[dict[str, np.ndarray]]) -> None:
    got = read_clients(path)
    assert got is not None
    assert set(got) == {"round", "participated", "loss", "score", "samples", "late", "staleness"}
    assert not got["late"].any()  # appended without late flags: nobody was late
    assert got["staleness"].dtype == np.float32 and np.isnan(got["staleness"]).all()  # no buffer
    clients = len(datas[0]["participated"])
    assert got["round"].dtype == np.int64 and got["round"].tolist() == rounds
    assert got["participated"].dtype == np.bool_
    assert got["participated"].shape == (len(rounds), clients)
    for i, d in enumerate(datas):
        assert got["participated"][i].tolist() == d["participated"].tolist()
        np.testing.assert_array_equal(got["loss"][i], d["losses"].astype(np.float32))
        np.testing.assert_array_equal(got["score"][i], d["scores"].astype(np.float32))
        assert got["samples"][i].tolist() == d["samples"].tolist()
    assert got["loss"].dtype == got["score"].dtype == np.float32
    assert got["samples"].dtype == np.int32
    with h5py.File(path, "r") as f:
        group = f["clients"]
        assert int(group.attrs["clients"]) == clients
        packed = group["participated"]
        assert packed.dtype == np.uint8 and packed.shape == (len(rounds), math.ceil(clients / 8))
        for i, d in enumerate(datas):
            assert packed[i].tobytes() == _pack_reference(d["participated"])


@pytest.mark.parametrize("clients", [13, 5000])
def test_round_trip_against_a_bit_by_bit_packing(tmp_path, clients):
    path = tmp_path / "run.h5"
    rounds = [1, 2, 4, 7]
    datas = [_round_data(clients, r) for r in rounds]
    with RunRecord.create(path, CONFIG, META, layer_count=2) as rec:
        assert rec.last_client_round is None
        for r, d in zip(rounds, datas):
            _append(rec, r, d)
        assert rec.last_client_round == 7
        # Rows are on disk after each call, for a reader of the live run.
        live = read_clients(path)
        assert live is not None and live["round"].tolist() == rounds
    _check(path, rounds, datas)
    per_round, per_client = read_participation(path) or (None, None)
    masks = [d["participated"].tolist() for d in datas]
    assert per_round.tolist() == [sum(m) for m in masks]
    assert per_client.tolist() == [sum(m[c] for m in masks) for c in range(clients)]


def test_all_or_no_participants_and_a_multiple_of_eight(tmp_path):
    path = tmp_path / "run.h5"
    full = {"participated": np.ones(16, bool), "losses": np.arange(16.0),
            "scores": np.full(16, np.nan), "samples": np.full(16, 5, dtype=np.int64)}
    none = {"participated": np.zeros(16, bool), "losses": np.full(16, np.nan),
            "scores": np.ones(16), "samples": np.zeros(16, dtype=np.int16)}
    with RunRecord.create(path, CONFIG, META, layer_count=1) as rec:
        _append(rec, 1, full)
        _append(rec, 2, none)
    _check(path, [1, 2], [full, none])
    with h5py.File(path, "r") as f:
        assert f["clients/participated"][()].tolist() == [[255, 255], [0, 0]]


@pytest.mark.parametrize("clients", [13, 1024, 5000, 1 << 20])
def test_chunks_are_bounded_and_the_writer_keeps_no_chunk_cache(tmp_path, clients):
    path = tmp_path / "run.h5"
    mask = np.zeros(clients, bool)
    mask[::97] = True
    with RunRecord.create(path, CONFIG, META, layer_count=1) as rec:
        rec.append_clients(1, mask, np.where(mask, 1.0, np.nan), np.zeros(clients),
                           mask.astype(np.int32))
        # The full-disk rule of store.py (_CHUNK_CACHE_BYTES): no dirty chunks held in a cache.
        for name in ("round", "participated", "loss", "score", "samples"):
            ds = rec._file["clients"][name]
            assert ds.id.get_access_plist().get_chunk_cache()[1] == 0
    with h5py.File(path, "r") as f:
        for name in ("participated", "loss", "score", "samples"):
            ds = f["clients"][name]
            assert ds.maxshape == (None, ds.shape[1])
            rows, cols = ds.chunks
            assert rows * cols * ds.dtype.itemsize <= 1 << 20
            assert rows * cols * ds.dtype.itemsize >= min(ds.shape[1] * ds.dtype.itemsize, 1 << 16)
            if ds.shape[1] * ds.dtype.itemsize >= 1 << 20:
                assert rows == 1
        assert f["clients/round"].maxshape == (None,)
        assert f["clients/loss"].chunks[1] < clients or clients < 1 << 18
    got = read_clients(path)
    assert got is not None and got["participated"][0].tolist() == mask.tolist()


def test_truncate_to_drops_metrics_and_client_rows_and_resume_continues(tmp_path):
    path = tmp_path / "run.h5"
    clients = 21
    datas = {r: _round_data(clients, r, seed=5) for r in range(1, 10)}
    with RunRecord.create(path, CONFIG, META, layer_count=1) as rec:
        for r in range(1, 8):
            rec.append_round(RoundMetrics(round=r, train_loss=1.0 / r))
            _append(rec, r, datas[r])
    with RunRecord.open_append(path) as rec:
        assert rec.last_client_round == 7
        assert rec.truncate_to(4) == 4
        assert rec.last_round == 4 and rec.last_client_round == 4
        with pytest.raises(ValueError, match=r"not after the last stored clients round 4.*"
                                             r"truncate_to\(3\)"):
            _append(rec, 4, datas[4])
        for r in range(5, 10):
            rec.append_round(RoundMetrics(round=r, train_loss=2.0 / r))
            _append(rec, r, datas[r])
    assert read_metrics(path)["round"].tolist() == list(range(1, 10))
    _check(path, list(range(1, 10)), [datas[r] for r in range(1, 10)])
    log = read_run_info(path)["resume_log"]
    assert log[0]["dropped_rows"] == 3 and log[0]["dropped_client_rows"] == 3


def test_truncate_to_drops_client_rows_even_without_metrics_rows(tmp_path):
    path = tmp_path / "run.h5"
    with RunRecord.create(path, CONFIG, META, layer_count=1) as rec:
        for r in (2, 4, 6):
            _append(rec, r, _round_data(9, r))
        assert rec.truncate_to(5) == 0
        assert rec.last_client_round == 4
        assert rec.truncate_to(0) == 0
        assert rec.last_client_round is None
        _append(rec, 1, _round_data(9, 1))
    got = read_clients(path)
    assert got is not None and got["round"].tolist() == [1]
    assert {k: v.shape[0] for k, v in got.items()} == dict.fromkeys(got, 1)


def test_bad_rounds_and_wrong_sizes_raise_without_ragged_rows(tmp_path):
    path = tmp_path / "run.h5"
    good = _round_data(10, 3)
    with RunRecord.create(path, CONFIG, META, layer_count=1) as rec:
        _append(rec, 3, good)
        for r in (3, 2):
            with pytest.raises(ValueError, match="truncate_to"):
                _append(rec, r, good)
        with pytest.raises(ValueError, match="11 clients.*population has 10"):
            _append(rec, 4, _round_data(11, 4))
        bad_cases = [
            ({"losses": good["losses"][:9]}, "losses has shape"),
            ({"scores": np.zeros((10, 1))}, "scores has shape"),
            ({"samples": good["samples"][:9]}, "samples has shape"),
            ({"samples": good["samples"].astype(float)}, "samples must be integers"),
            ({"samples": np.where(good["participated"], -1, 0)}, r"\[0, 2\*\*31\)"),
            ({"samples": np.full(10, 2**31)}, r"\[0, 2\*\*31\)"),
            ({"participated": good["participated"].astype(np.int8)}, "1-D bool"),
            ({"participated": np.flatnonzero(good["participated"])}, "1-D bool"),
            ({"losses": np.where(good["participated"], 1.0, 0.5)}, "did not take part"),
            ({"samples": np.ones(10, dtype=np.int32)}, "did not take part"),
        ]
        for change, message in bad_cases:
            with pytest.raises(ValueError, match=message):
                _append(rec, 4, {**good, **change})
        _append(rec, 5, good)
    got = read_clients(path)
    assert got is not None and got["round"].tolist() == [3, 5]
    with h5py.File(path, "r") as f:
        assert {ds.shape[0] for ds in f["clients"].values()} == {2}


def test_an_empty_population_is_refused(tmp_path):
    with RunRecord.create(tmp_path / "run.h5", CONFIG, META, layer_count=1) as rec:
        with pytest.raises(ValueError, match="empty"):
            rec.append_clients(1, np.zeros(0, bool), np.zeros(0), np.zeros(0),
                               np.zeros(0, np.int32))
        assert rec.last_client_round is None


def test_a_run_without_clients(tmp_path):
    path = tmp_path / "run.h5"
    with RunRecord.create(path, CONFIG, META, layer_count=1) as rec:
        rec.append_round(RoundMetrics(round=1))
        assert rec.truncate_to(0) == 0
    assert read_clients(path) is None and read_participation(path) is None
    assert "dropped_client_rows" not in read_run_info(path)["resume_log"][0]
    assert "clients of" not in summarize([path])


def _section(text: str, label: str) -> dict[str, str]:
    lines = text.splitlines()
    start = lines.index(f"clients of {label}")
    out = {}
    for line in lines[start + 1:]:
        if not line.startswith("  "):
            break
        key, _, value = line.strip().partition(": ")
        out[key] = value
    return out


def test_report_section_numbers(tmp_path):
    plain = tmp_path / "plain.h5"
    with RunRecord.create(plain, CONFIG, META, layer_count=1) as rec:
        rec.append_round(RoundMetrics(round=1))
    path = tmp_path / "pop.h5"
    clients = 37
    masks = []
    with RunRecord.create(path, CONFIG, META, layer_count=1) as rec:
        for r in range(1, 9):
            d = _round_data(clients, r, seed=11)
            d["participated"][[0, 1]] = False  # clients 0 and 1 never take part
            d["losses"][[0, 1]] = np.nan
            d["samples"][[0, 1]] = 0
            _append(rec, r, d)
            masks.append(d["participated"].tolist())
        rec.truncate_to(6)  # the report sees the rows kept, not the dropped ones
    masks = masks[:6]
    per_client = [sum(m[c] for m in masks) for c in range(clients)]
    ever = sum(1 for n in per_client if n > 0)
    text = summarize([plain, path])
    assert "clients of plain" not in text
    section = _section(text, "pop")
    assert section["population"] == "37"
    mean = sum(sum(m) for m in masks) / len(masks)
    assert section["mean participants per round"] == f"{mean:.2f} (over 6 rounds)"
    assert section["ever participated"] == f"{100 * ever / clients:.2f}% ({ever} of 37)"
    assert section["rounds per client"] == (
        f"min 0, median {statistics.median(per_client):g}, max {max(per_client)}"
    )
    assert text.index("clients of pop") < text.index("provenance of plain")
