"""hflmpi.record.h5sink: HDF5 files written through a file object that hides failed writes from
HDF5 and raises them afterwards (the reference: the same file written by h5py's own driver)."""

from __future__ import annotations

import errno
import os

import h5py
import numpy as np
import pytest

from hflmpi.record import h5sink
from hflmpi.record.h5sink import create_h5


def _fill(file: h5py.File) -> None:
    file.attrs["note"] = "x" * 5000
    file.create_dataset("a", data=np.arange(300_000, dtype=np.float64))
    group = file.create_group("g")
    for i in range(50):
        group.create_dataset(f"d{i}", data=np.full((i + 1, 3), i, dtype=np.int32))
    chunked = file.create_dataset("c", shape=(0,), maxshape=(None,), chunks=(64,), dtype="f4")
    chunked.resize((1000,))
    chunked[:] = np.linspace(0, 1, 1000, dtype=np.float32)


def _open_ids() -> int:
    return h5py.h5f.get_obj_count(h5py.h5f.OBJ_ALL, h5py.h5f.OBJ_FILE | h5py.h5f.OBJ_DATASET
                                  | h5py.h5f.OBJ_GROUP | h5py.h5f.OBJ_ATTR)


def _contents(path) -> dict:
    out = {}
    with h5py.File(path, "r") as file:
        out["note"] = file.attrs["note"]
        file.visititems(lambda name, obj: out.__setitem__(name, obj[()])
                        if isinstance(obj, h5py.Dataset) else None)
    return out


def test_file_written_through_the_sink_reads_back_like_one_written_by_h5py(tmp_path):
    with h5py.File(tmp_path / "ref.h5", "w") as file:
        _fill(file)
    with create_h5(tmp_path / "sink.h5") as file:
        _fill(file)
    ref, got = _contents(tmp_path / "ref.h5"), _contents(tmp_path / "sink.h5")
    assert sorted(ref) == sorted(got) and len(ref) == 53
    for key in ref:
        np.testing.assert_array_equal(got[key], ref[key], err_msg=key)


@pytest.mark.parametrize("fail_after", [0, 4096, 1_000_000])
def test_a_failed_write_is_raised_after_hdf5_closed_the_file(tmp_path, monkeypatch, fail_after):
    """Writes fail with ENOSPC once ``fail_after`` bytes are on disk (short writes before that):
    create_h5 raises that OSError; HDF5 saw no error, so no id is left open."""
    written = {"bytes": 0}
    real_pwrite = os.pwrite

    def pwrite(fd, data, offset):
        room = fail_after - written["bytes"]
        if room <= 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        data = memoryview(data)[: min(len(data), room, 1000)]  # short writes, like a full disk
        written["bytes"] += len(data)
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(h5sink.os, "pwrite", pwrite)
    open_before = _open_ids()
    with pytest.raises(OSError) as info:
        with create_h5(tmp_path / "full.h5") as file:
            _fill(file)
    assert info.value.errno == errno.ENOSPC
    assert _open_ids() == open_before  # HDF5 holds nothing of the failed file open


def test_an_error_in_the_body_closes_the_file_and_propagates(tmp_path):
    open_before = _open_ids()
    with pytest.raises(KeyError):
        with create_h5(tmp_path / "x.h5") as file:
            file.create_dataset("a", data=np.zeros(3))
            raise KeyError("body")
    assert _open_ids() == open_before
