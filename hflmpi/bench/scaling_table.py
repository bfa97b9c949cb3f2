"""The scaling HDF5 file: one resizable 1-D dataset per column, one entry per row.

:mod:`hflmpi.bench.scaling` appends its rows to ``/runs/<column>`` and ``/collectives/<column>``
(rank 0 writes; PyPI h5py has no parallel HDF5); :mod:`hflmpi.bench.scaling_model` reads them back.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

__all__ = ["append_table", "read_table", "latest_rows"]



def append_table(path: str | Path, group: str, columns: dict[str, str], rows: Sequence[dict[str, Any]]) -> None:
    """Append ``rows`` to ``/group/<column>`` datasets of ``path`` (created resizable if missing)."""
    import h5py

    if not rows:
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "a") as file:
        table = file.require_group(group)
        start = None
        for name, kind in columns.items():
            dtype = h5py.string_dtype() if kind == "str" else np.dtype(kind)
            if name not in table:
                table.create_dataset(name, shape=(0,), maxshape=(None,), dtype=dtype, chunks=(256,))
            ds = table[name]
            start = ds.shape[0] if start is None else start
            if ds.shape[0] != start:
                raise ValueError(f"{path}:/{group} has columns of different lengths; the file is damaged")
            ds.resize((start + len(rows),))
            values = [row[name] for row in rows]
            ds[start:] = values if kind == "str" else np.asarray(values, dtype=kind)
        file.flush()


def read_table(path: str | Path, group: str) -> list[dict[str, Any]]:
    """Return the rows of ``/group`` in ``path`` (empty if the group does not exist)."""
    import h5py

    with h5py.File(path, "r") as file:
        if group not in file:
            return []
        table = file[group]
        columns = {}
        for name, ds in table.items():
            data = ds[()]
            if h5py.check_string_dtype(ds.dtype) is not None:
                data = [v.decode() if isinstance(v, bytes) else str(v) for v in data]
            else:
                data = data.tolist()
            columns[name] = data
    length = min(len(v) for v in columns.values()) if columns else 0
    return [{name: values[i] for name, values in columns.items()} for i in range(length)]


def latest_rows(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Keep the newest row per (world, depth, mode), sorted by mode, depth and world."""
    latest: dict[tuple[int, int, str], dict[str, Any]] = {}
    for row in rows:
        key = (int(row["world"]), int(row["depth"]), str(row["mode"]))
        if key not in latest or row["time_unix"] >= latest[key]["time_unix"]:
            latest[key] = row
    return sorted(latest.values(), key=lambda r: (r["mode"], r["depth"], r["world"]))
