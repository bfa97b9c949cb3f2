"""Serial tests of atomic, checksummed checkpoints (hflmpi.record.checkpoint)."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

import hflmpi
from hflmpi.record.checkpoint import (
    CheckpointError,
    CheckpointFallbackWarning,
    CheckpointNotFoundError,
    checkpoint_paths,
    config_digest,
    load_checkpoint,
    load_latest_valid,
    save_checkpoint,
)

WORLD, N = 4, 1000


def _payload(round_: int) -> dict:
    rng = np.random.default_rng(round_)
    return dict(
        round=round_,
        model_flat=rng.standard_normal(N).astype(np.float32),
        extra_arrays={
            "momentum": rng.standard_normal((WORLD, N)).astype(np.float32),
            "batch_position": np.arange(WORLD, dtype=np.int64) * round_,
        },
        state={"round": round_, "config_hash": config_digest("[run]\n"), "seed": np.int64(7)},
    )


def _save(run: Path, round_: int) -> dict:
    payload = _payload(round_)
    save_checkpoint(run, **payload)
    return payload


def _assert_matches(ckpt, payload) -> None:
    assert ckpt.round == payload["round"]
    assert ckpt.model.dtype == payload["model_flat"].dtype
    assert ckpt.model.tobytes() == payload["model_flat"].tobytes()
    assert set(ckpt.extra_arrays) == set(payload["extra_arrays"])
    for name, array in payload["extra_arrays"].items():
        assert ckpt.extra_arrays[name].dtype == array.dtype
        assert ckpt.extra_arrays[name].tobytes() == array.tobytes()
    assert ckpt.state["round"] == payload["round"] and ckpt.state["seed"] == 7


def _flip_model_byte(path: Path, index: int = 123) -> None:
    """Flip one raw byte of the model's data in the file (contiguous layout)."""
    with h5py.File(path, "r") as f:
        offset = f["model"].id.get_offset()
    assert offset is not None
    with open(path, "r+b") as fh:
        fh.seek(offset + index)
        byte = fh.read(1)
        fh.seek(offset + index)
        fh.write(bytes([byte[0] ^ 0x01]))


@pytest.fixture
def run(tmp_path) -> Path:
    return tmp_path / "run.h5"


def test_checkpoint_paths():
    assert checkpoint_paths("a/run.h5") == (Path("a/run.ckpt.h5"), Path("a/run.ckpt.prev.h5"))
    assert checkpoint_paths("a/run.ckpt.h5") == (Path("a/run.ckpt.h5"), Path("a/run.ckpt.prev.h5"))
    assert checkpoint_paths("a/my.run") == (Path("a/my.run.ckpt.h5"), Path("a/my.run.ckpt.prev.h5"))


def test_round_trip_and_rotation(run):
    latest, prev = checkpoint_paths(run)
    first = _save(run, 1)
    assert latest.exists() and not prev.exists()
    _assert_matches(load_checkpoint(latest), first)
    second = _save(run, 2)
    _assert_matches(load_checkpoint(latest), second)
    _assert_matches(load_checkpoint(prev), first)
    _assert_matches(load_latest_valid(run), second)
    assert sorted(p.name for p in run.parent.iterdir()) == ["run.ckpt.h5", "run.ckpt.prev.h5"]
    with h5py.File(latest, "r") as f:
        assert len(f.attrs["sha256"]) == 64 and f["extra/momentum"].shape == (WORLD, N)


def test_torch_tensors_round_trip_with_their_dtype(run):
    model = torch.randn(257).to(torch.bfloat16)
    momentum = torch.randn(WORLD, 257)
    ckpt_path = save_checkpoint(run, round=3, model_flat=model, extra_arrays={"m": momentum})
    ckpt = load_checkpoint(ckpt_path)
    assert ckpt.torch_dtypes == {"model": "torch.bfloat16", "m": "torch.float32"}
    assert torch.equal(ckpt.tensor(), model) and ckpt.tensor().dtype == torch.bfloat16
    assert torch.equal(ckpt.tensor("m"), momentum)


def test_bad_inputs_fail_before_touching_files(run):
    with pytest.raises(TypeError, match="not JSON-serialisable"):
        save_checkpoint(run, round=1, model_flat=np.zeros(3), state={"x": np.zeros(2)})
    with pytest.raises(ValueError, match="1-D"):
        save_checkpoint(run, round=1, model_flat=np.zeros((2, 2)))
    with pytest.raises(ValueError, match="no '/'"):
        save_checkpoint(run, round=1, model_flat=np.zeros(2), extra_arrays={"a/b": np.zeros(1)})
    assert list(run.parent.iterdir()) == []


def test_flipped_byte_fails_checksum_and_falls_back(run):
    latest, _ = checkpoint_paths(run)
    first = _save(run, 1)
    _save(run, 2)
    _flip_model_byte(latest)
    with pytest.raises(CheckpointError, match="checksum"):
        load_checkpoint(latest)
    with pytest.warns(CheckpointFallbackWarning, match="run.ckpt.h5.*checksum.*round 1"):
        ckpt = load_latest_valid(run)
    _assert_matches(ckpt, first)


def test_rewritten_dataset_fails_checksum(run):
    latest, _ = checkpoint_paths(run)
    _save(run, 1)
    with h5py.File(latest, "r+") as f:
        f["extra/momentum"][2, 5] += 1.0
    with pytest.raises(CheckpointError, match="failed its checksum"):
        load_checkpoint(latest)


def test_truncated_newest_falls_back_with_warning(run):
    latest, _ = checkpoint_paths(run)
    first = _save(run, 1)
    _save(run, 2)
    os.truncate(latest, latest.stat().st_size // 2)
    with pytest.warns(CheckpointFallbackWarning, match="not readable"):
        ckpt = load_latest_valid(run)
    _assert_matches(ckpt, first)


def test_missing_newest_falls_back(run):
    latest, _ = checkpoint_paths(run)
    first = _save(run, 1)
    _save(run, 2)
    latest.unlink()  # a crash between the two renames
    with pytest.warns(CheckpointFallbackWarning, match="does not exist"):
        _assert_matches(load_latest_valid(run), first)


def test_both_invalid_lists_both(run):
    latest, prev = checkpoint_paths(run)
    _save(run, 1)
    _save(run, 2)
    _flip_model_byte(prev)
    latest.write_bytes(b"not hdf5 at all")
    with pytest.raises(CheckpointError) as info:
        load_latest_valid(run)
    message = str(info.value)
    assert not isinstance(info.value, CheckpointNotFoundError)
    assert f"{latest}: {latest} is not readable" in message
    assert f"{prev}: {prev} failed its checksum" in message


def test_no_checkpoint_at_all(run):
    with pytest.raises(CheckpointNotFoundError, match="no checkpoint found.*does not exist"):
        load_latest_valid(run)


def test_corrupt_newest_is_not_rotated_over_a_good_previous(run):
    latest, prev = checkpoint_paths(run)
    first = _save(run, 1)
    _save(run, 2)
    os.truncate(latest, 100)
    third = _save(run, 3)
    _assert_matches(load_checkpoint(latest), third)
    _assert_matches(load_checkpoint(prev), first)


def _snapshot(run: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(run.parent.iterdir())}


def test_enospc_while_writing_arrays_keeps_old_checkpoints(run, monkeypatch):
    latest, prev = checkpoint_paths(run)
    _save(run, 1)
    second = _save(run, 2)
    before = _snapshot(run)
    real_create = h5py.Group.create_dataset

    def create_dataset(self, name, *args, **kwargs):
        if name == "momentum":  # the model is already written when the disk fills up
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_create(self, name, *args, **kwargs)

    monkeypatch.setattr(h5py.Group, "create_dataset", create_dataset)
    with pytest.raises(CheckpointError, match=r"disk full \(ENOSPC\).*left untouched"):
        _save(run, 3)
    monkeypatch.undo()
    assert _snapshot(run) == before  # identical bits, no stray .tmp
    _assert_matches(load_latest_valid(run), second)


def test_enospc_at_fsync_keeps_old_checkpoints(run, monkeypatch):
    _save(run, 1)
    before = _snapshot(run)

    def fsync(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(CheckpointError, match="disk full"):
        _save(run, 2)
    monkeypatch.undo()
    assert _snapshot(run) == before
    assert load_latest_valid(run).round == 1


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses RLIMIT_FSIZE")
def test_real_write_failure_inside_hdf5_keeps_old_checkpoint(run):
    """HDF5's own write() fails (file size limit): the error surfaces and nothing is lost."""
    small = np.arange(100, dtype=np.float64)
    save_checkpoint(run, round=1, model_flat=small)
    before = _snapshot(run)
    script = textwrap.dedent(
        """
        import resource, signal, sys
        import numpy as np
        from hflmpi.record.checkpoint import CheckpointError, save_checkpoint
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (256 * 1024, resource.RLIM_INFINITY))
        try:
            save_checkpoint(sys.argv[1], round=2, model_flat=np.ones(1_000_000))
        except CheckpointError as err:
            print("CheckpointError:", err)
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script, str(run)],
        capture_output=True, text=True, timeout=60, cwd=Path(hflmpi.__file__).parents[1],
    )
    assert out.returncode == 0, out.stderr
    assert "CheckpointError: could not write checkpoint" in out.stdout
    assert _snapshot(run) == before
    ckpt = load_latest_valid(run)
    assert ckpt.round == 1 and ckpt.model.tobytes() == small.tobytes()
