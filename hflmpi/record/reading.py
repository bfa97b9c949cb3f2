"""Read a run file (any rank, any time, also while a run writes it): metrics, config, attributes.

The writer is :class:`hflmpi.record.store.RunRecord`; the file layout is described there.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from hflmpi.record.checkpoint import _FORMAT as _CHECKPOINT_FORMAT

__all__ = ["read_metrics", "read_config_toml", "read_run_info", "read_partition", "read_provenance",
           "read_clients", "read_participation"]

# Rows of /clients/participated unpacked at a time by read_participation: 64 rows of a million
# clients are 64 MB of bools.
_PARTICIPATION_BLOCK_ROWS = 64


def _open_read(path: str | os.PathLike[str]) -> h5py.File:
    """Open a run file read-only without HDF5 file locking, so a live run can be read."""
    if not Path(path).exists():
        raise FileNotFoundError(f"run record {os.fspath(path)} does not exist")
    try:
        return h5py.File(path, "r", locking=False)
    except OSError as err:
        # The same process already has the file open (with locking): HDF5 shares that handle and
        # insists on matching flags.
        if "locking flag" in str(err):
            return h5py.File(path, "r")
        if not h5py.is_hdf5(path):
            raise OSError(f"{os.fspath(path)} is not an HDF5 file, so not an hflmpi run record; "
                          f"{_PASS_A_RUN_RECORD}") from None
        raise


def read_metrics(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """Return every ``/metrics`` dataset of a run file as an array (rows = rounds)."""
    with _open_read(path) as file:
        return {name: ds[()] for name, ds in file["metrics"].items()}


def read_config_toml(path: str | os.PathLike[str]) -> str:
    """Return the resolved configuration (TOML text) stored in a run file.

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    ValueError
        If the file holds no ``config_toml`` (not an hflmpi run file).
    """
    with _open_read(path) as file:
        if "config_toml" not in file.attrs:
            raise ValueError(_not_a_run_record(Path(path), file.attrs))
        value = file.attrs["config_toml"]
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


_PASS_A_RUN_RECORD = "pass the run record `hflmpi run` writes at run.out (e.g. runs/default.h5)"


def _not_a_run_record(path: Path, attrs: Any) -> str:
    """Say what an HDF5 file without a stored config is, and what to pass instead."""
    if attrs.get("format") == _CHECKPOINT_FORMAT:
        name = path.name
        stem = name[: name.index(".ckpt.")] if ".ckpt." in name else path.stem
        candidates = [path.with_name(stem + suffix) for suffix in (".h5", ".hdf5", "")]
        run = next((p for p in candidates if p.is_file()), candidates[0])
        return (f"{path} is a checkpoint (round {attrs.get('round')}), not a run record; pass its "
                f"run record {run} instead")
    return (f"{path} stores no config (no config_toml attribute): an HDF5 file, but not an hflmpi "
            f"run record; {_PASS_A_RUN_RECORD}")


def _plain(attrs: Any, parsed: tuple[str, ...]) -> dict[str, Any]:
    info = {key: value.item() if isinstance(value, np.generic) else value
            for key, value in attrs.items()}
    for key in parsed:
        if isinstance(info.get(key), str):
            try:
                info[key] = json.loads(info[key])
            except json.JSONDecodeError:
                pass
    return info


def read_run_info(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Return the root attributes of a run file, and ``provenance`` (:func:`read_provenance`).

    ``tree``, ``resume_log`` and ``config_history`` come parsed from JSON.
    """
    with _open_read(path) as file:
        info = _plain(file.attrs, ("tree", "resume_log", "config_history"))
        info["provenance"] = _legs(file)
    return info


def read_provenance(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Return one dict per leg of the run (start, then each resume), oldest first.

    Keys as :func:`hflmpi.record.provenance.provenance` made them plus ``time`` and
    ``first_round``; ``host_names`` and ``argv`` come parsed from JSON. Empty for a run file
    written before provenance was recorded.
    """
    with _open_read(path) as file:
        return _legs(file)


def _legs(file: h5py.File) -> list[dict[str, Any]]:
    if "provenance" not in file:
        return []
    group = file["provenance"]
    return [_plain(group[leg].attrs, ("host_names", "argv")) for leg in sorted(group, key=int)]


def read_partition(path: str | os.PathLike[str]) -> tuple[np.ndarray, np.ndarray] | None:
    """Return ``(sizes, label_histograms)`` of a run file, or None if none was written."""
    with _open_read(path) as file:
        if "partition" not in file:
            return None
        group = file["partition"]
        return group["sizes"][()], group["label_histograms"][()]



def _client_rows(group: h5py.Group) -> int:
    # A live writer stores the round last, so rows past it may still hold fill values.
    return min(int(ds.shape[0]) for ds in group.values())


def _unpack(packed: np.ndarray, clients: int, bitorder: Any) -> np.ndarray:
    order = bitorder.decode() if isinstance(bitorder, bytes) else str(bitorder)
    if order not in ("little", "big"):
        raise ValueError(f"/clients has bitorder {order!r}; expected 'little' or 'big'")
    bits = np.unpackbits(packed, axis=1, count=clients,
                         bitorder="little" if order == "little" else "big")
    return bits.view(np.bool_)


def read_clients(path: str | os.PathLike[str]) -> dict[str, np.ndarray] | None:
    """Return the per-client rows of a run file, or None if it has no ``/clients`` group.

    Keys: ``round`` int64 [rows], ``participated`` bool [rows, clients] (unpacked from the
    stored bits), ``loss`` and ``score`` float32 [rows, clients] (NaN: none), ``samples`` int32
    [rows, clients], ``late`` bool [rows, clients] where recorded (updates dropped at a
    deadline) and ``staleness`` float32 [rows, clients] where recorded (buffered layer 1). Everything is read whole; :func:`read_participation` only counts.
    """
    with _open_read(path) as file:
        if "clients" not in file:
            return None
        group = file["clients"]
        rows = _client_rows(group)
        out = {name: group[name][:rows] for name in ("round", "loss", "score", "samples",
                                                     "staleness") if name in group}
        for name in ("participated", "late"):
            if name in group:  # "late": absent in files written before it existed
                out[name] = _unpack(group[name][:rows], int(group.attrs["clients"]),
                                    group.attrs.get("bitorder", "little"))
    return out


def read_participation(path: str | os.PathLike[str]) -> tuple[np.ndarray, np.ndarray] | None:
    """Return ``(participants per round [rows], rounds taken part in per client [clients])``.

    Both int64, counted from ``/clients/participated`` a block of rows at a time (so also for
    populations whose per-client arrays would not fit in memory); None if the run has no
    ``/clients`` group.
    """
    with _open_read(path) as file:
        if "clients" not in file:
            return None
        group = file["clients"]
        clients = int(group.attrs["clients"])
        bitorder = group.attrs.get("bitorder", "little")
        rows = _client_rows(group)
        per_round = np.zeros(rows, dtype=np.int64)
        per_client = np.zeros(clients, dtype=np.int64)
        packed = group["participated"]
        for start in range(0, rows, _PARTICIPATION_BLOCK_ROWS):
            stop = min(rows, start + _PARTICIPATION_BLOCK_ROWS)
            block = _unpack(packed[start:stop], clients, bitorder)
            per_round[start:stop] = block.sum(axis=1)
            per_client += block.sum(axis=0)
    return per_round, per_client
