"""HDF5 run record: resolved config, run metadata, per-round metrics and the data partition.

One HDF5 file per run, written by rank 0 only with h5py's default (``sec2``) driver: PyPI h5py has
no MPI-IO, so the caller gathers what it needs to rank 0 first. Metrics live in pre-created,
resizable, chunked datasets (one row per global round) and the file is flushed after every round,
so a crash loses at most the round in flight and ``hflmpi report`` can read a live run.

File layout (``format_version`` 1)::

    /                       attrs: format_version, hflmpi_version, config_toml, world_size,
                                   tree (JSON), layer_count, start_time (ISO 8601, UTC),
                                   start_time_unix, resume_log (JSON list), config_history
                                   (JSON list: config changes made on resume), any extra meta keys
    /metrics/<scalar>       float64 [rounds]          (``round`` is int64)
    /metrics/<per-layer>    float64 [rounds, layers]  (``method`` is int8)
    /clients/...            who took part in each round (:mod:`hflmpi.record.client_rows`)
    /partition/sizes              int64 [clients]
    /partition/label_histograms   int64 [clients, classes]
    /provenance/<leg>       attrs of one start or resume (leg 0, 1, ...; never overwritten):
                            library and MPI versions, host_names, Slurm ids, argv, cwd, git
                            commit (:mod:`hflmpi.record.provenance`; lists as JSON), time,
                            first_round

Column ``j`` of a per-layer dataset is tree layer ``j + 1``: 1 is the first aggregation layer above
the devices, ``layer_count`` is the root (the notation of QMLHFL, arXiv 2505.08145, Sec. 3).
Missing values are NaN (``method``: -1; ``round`` is never missing).
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from types import TracebackType
from typing import Any, Mapping, Sequence

import h5py
import numpy as np

from hflmpi import __version__
from hflmpi.record.client_rows import (
    append_client_row,
    checked_client_row,
    create_client_group,
    truncate_client_rows,
)
from hflmpi.record.schema import LAYER_METRICS, METHOD_CODES, METHOD_MISSING, SCALAR_METRICS

__all__ = [
    "FORMAT_VERSION",
    "METHOD_CODES",
    "SCALAR_METRICS",
    "LAYER_METRICS",
    "RoundMetrics",
    "RunRecord",
]

FORMAT_VERSION = 1

_RESERVED_ATTRS = frozenset(
    {
        "format_version",
        "hflmpi_version",
        "config_toml",
        "world_size",
        "tree",
        "layer_count",
        "start_time",
        "start_time_unix",
        "resume_log",
        "config_history",
    }
)
_SCALAR_CHUNK = 1024
_LAYER_CHUNK_ROWS = 256
# No HDF5 chunk cache for the writer: every row goes to the file when it is appended. With a cache,
# a full disk (ENOSPC) leaves dirty chunks that cannot be written when a dataset is closed; HDF5
# then keeps those dataset ids alive after the file is gone, and its exit handler
# (H5_term_library) crashes on them (SIGSEGV/SIGBUS, h5py 3.16 / HDF5 2.0). Without one, the
# failed write raises OSError in append_round, where the caller can report it.
_CHUNK_CACHE_BYTES = 0


@dataclass(frozen=True)
class RoundMetrics:
    """Metrics of one global round; anything left as ``None``/NaN is stored as missing.

    Per-layer fields take one value per tree layer ``1..layer_count`` (column ``j`` is layer
    ``j + 1``). ``method`` takes codes from :data:`METHOD_CODES` or their names.
    """

    round: int
    wall_time: float = math.nan
    train_loss: float = math.nan
    test_loss: float = math.nan
    test_accuracy: float = math.nan
    samples_per_second: float = math.nan
    compute_seconds: Sequence[float] | None = None
    comm_seconds: Sequence[float] | None = None
    bytes_sent: Sequence[float] | None = None
    mpi_bytes: Sequence[float] | None = None
    quant_error: Sequence[float] | None = None
    method: Sequence[int | str] | None = None
    upward_divergence: float = math.nan
    downward_divergence: float = math.nan
    sim_time: float = math.nan
    late: Sequence[float] | None = None
    flushes: Sequence[float] | None = None
    staleness_count: Sequence[float] | None = None
    staleness_mean: Sequence[float] | None = None
    staleness_max: Sequence[float] | None = None


def _now_iso(unix: float) -> str:
    return datetime.fromtimestamp(unix, tz=timezone.utc).isoformat(timespec="seconds")


def _attr_value(key: str, value: Any) -> Any:
    if isinstance(value, (str, bool, int, float, np.integer, np.floating)):
        return value
    try:
        return json.dumps(value, sort_keys=True)
    except TypeError as err:
        raise TypeError(f"run meta {key!r} must be a scalar or JSON-serialisable: {err}") from err


def _method_code(value: int | str, layer: int) -> int:
    if isinstance(value, str):
        if value not in METHOD_CODES:
            raise ValueError(
                f"method[{layer}]={value!r} is not one of {sorted(METHOD_CODES)}; "
                "use a name or code from METHOD_CODES"
            )
        return METHOD_CODES[value]
    code = int(value)
    if code != METHOD_MISSING and code not in METHOD_CODES.values():
        raise ValueError(f"method[{layer}]={code} is not a code in {dict(METHOD_CODES)} or -1")
    return code


class RunRecord:
    """Writer of one run's HDF5 file (rank 0 only).

    Use :meth:`create` for a new run and :meth:`open_append` to resume one; both return an open
    record that is also a context manager.
    """

    def __init__(self, file: h5py.File) -> None:
        self._file = file
        self._metrics = file["metrics"]
        self._clients: h5py.Group | None = file["clients"] if "clients" in file else None
        self.layer_count = int(file.attrs["layer_count"])

    # -- opening ---------------------------------------------------------------------------------
    @classmethod
    def create(
        cls,
        path: str | os.PathLike[str],
        config_toml: str,
        meta: Mapping[str, Any],
        layer_count: int,
        overwrite: bool = False,
    ) -> RunRecord:
        """Create the run file and its metric datasets.

        Parameters
        ----------
        path : path-like
            The run file, conventionally ``<run>.h5``.
        config_toml : str
            The resolved configuration as TOML text.
        meta : mapping
            Must hold ``world_size`` (int) and ``tree`` (JSON-serialisable description, or a JSON
            string); may hold ``start_time_unix`` (float; default now). Other keys are stored as
            root attributes (JSON text for non-scalars).
        layer_count : int
            Number of aggregation layers N (columns of the per-layer datasets).
        overwrite : bool
            Replace an existing file. Without it an existing file is an error.

        Raises
        ------
        FileExistsError
            If ``path`` exists and ``overwrite`` is false.
        """
        target = Path(path)
        if layer_count < 1:
            raise ValueError(f"layer_count={layer_count} must be >= 1")
        for key in ("world_size", "tree"):
            if key not in meta:
                raise ValueError(f"run meta needs {key!r}; got keys {sorted(meta)}")
        if target.exists() and not overwrite:
            raise FileExistsError(
                f"run record {target} already exists; pass overwrite=True to replace it "
                "or resume the run from its checkpoint"
            )
        tree = meta["tree"]
        start = float(meta.get("start_time_unix", time.time()))
        file = h5py.File(target, "w" if overwrite else "w-", rdcc_nbytes=_CHUNK_CACHE_BYTES)
        try:
            attrs = file.attrs
            attrs["format_version"] = FORMAT_VERSION
            attrs["hflmpi_version"] = __version__
            attrs["config_toml"] = config_toml
            attrs["world_size"] = int(meta["world_size"])
            attrs["tree"] = tree if isinstance(tree, str) else json.dumps(tree, sort_keys=True)
            attrs["layer_count"] = int(layer_count)
            attrs["start_time"] = _now_iso(start)
            attrs["start_time_unix"] = start
            attrs["resume_log"] = "[]"
            attrs["config_history"] = "[]"
            for key, value in meta.items():
                if key not in _RESERVED_ATTRS:
                    attrs[key] = _attr_value(key, value)
            cls._create_metrics(file.create_group("metrics"), layer_count)
            file.flush()
        except BaseException:
            file.close()
            raise
        return cls(file)

    @classmethod
    def open_append(cls, path: str | os.PathLike[str]) -> RunRecord:
        """Open an existing run file for appending (resume); see :meth:`truncate_to`."""
        target = Path(path)
        if not target.exists():
            raise FileNotFoundError(f"run record {target} does not exist; nothing to resume")
        if not h5py.is_hdf5(target):  # "r+" would write a superblock into, say, an empty file
            raise ValueError(f"{target} is not an HDF5 file, so not an hflmpi run record "
                             f"({target.stat().st_size} bytes)")
        file = h5py.File(target, "r+", rdcc_nbytes=_CHUNK_CACHE_BYTES)
        version = file.attrs.get("format_version")
        if version != FORMAT_VERSION or "metrics" not in file:
            file.close()
            raise ValueError(
                f"{target} is not an hflmpi run record of format {FORMAT_VERSION} "
                f"(format_version={version!r})"
            )
        return cls(file)

    @staticmethod
    def _create_layer_metric(group: h5py.Group, name: str, layers: int, rows: int = 0) -> None:
        dtype, units, text = LAYER_METRICS[name]
        fill = METHOD_MISSING if dtype == "int8" else np.nan
        ds = group.create_dataset(
            name, shape=(rows, layers), maxshape=(None, layers), dtype=dtype,
            chunks=(_LAYER_CHUNK_ROWS, layers), fillvalue=fill,
        )
        ds.attrs["units"], ds.attrs["description"] = units, text

    @staticmethod
    def _create_scalar_metric(group: h5py.Group, name: str, rows: int = 0) -> None:
        dtype, units, text = SCALAR_METRICS[name]
        ds = group.create_dataset(name, shape=(rows,), maxshape=(None,), dtype=dtype,
                                  chunks=(_SCALAR_CHUNK,), fillvalue=-1 if dtype == "int64" else np.nan)
        ds.attrs["units"], ds.attrs["description"] = units, text

    @staticmethod
    def _create_metrics(group: h5py.Group, layers: int) -> None:
        group.attrs["layer_axis"] = (
            "column j is tree layer j + 1 (1: first aggregation above the devices, "
            f"{layers}: root)"
        )
        for name in SCALAR_METRICS:
            RunRecord._create_scalar_metric(group, name)
        for name in LAYER_METRICS:
            RunRecord._create_layer_metric(group, name, layers)
        method = group["method"]
        method.attrs["codes"] = json.dumps({str(v): k for k, v in METHOD_CODES.items()})
        method.attrs["missing"] = METHOD_MISSING

    # -- writing ---------------------------------------------------------------------------------
    @property
    def path(self) -> Path:
        """Path of the open file."""
        return Path(self._file.filename)

    @property
    def row_count(self) -> int:
        """Number of metric rows (rounds) stored."""
        return int(self._metrics["round"].shape[0])

    @property
    def last_round(self) -> int | None:
        """Round of the last stored row, or None when there is none."""
        n = self.row_count
        return None if n == 0 else int(self._metrics["round"][n - 1])

    def _layer_row(self, name: str, values: Sequence[Any] | None) -> np.ndarray:
        dtype = LAYER_METRICS[name][0]
        if values is None:
            fill = METHOD_MISSING if dtype == "int8" else np.nan
            return np.full(self.layer_count, fill, dtype=dtype)
        if len(values) != self.layer_count:
            raise ValueError(
                f"RoundMetrics.{name} has {len(values)} values; the run has "
                f"{self.layer_count} layers (one value per layer 1..{self.layer_count})"
            )
        if name == "method":
            return np.array([_method_code(v, j) for j, v in enumerate(values)], dtype=dtype)
        return np.array([np.nan if v is None else float(v) for v in values], dtype=dtype)

    def append_round(self, metrics: RoundMetrics, *, flush: bool = True) -> None:
        """Append one row and (by default) flush the file.

        Raises
        ------
        ValueError
            If ``metrics.round`` is not greater than the last stored round (rows are never
            duplicated; call :meth:`truncate_to` first when rerunning rounds) or a per-layer field
            has the wrong length.
        """
        last = self.last_round
        if last is not None and metrics.round <= last:
            raise ValueError(
                f"round {metrics.round} is not after the last stored round {last}; "
                f"call truncate_to({metrics.round - 1}) when rerunning rounds after a resume"
            )
        # Convert everything before resizing anything, so a bad value cannot leave ragged rows.
        scalars: dict[str, int | float] = {"round": int(metrics.round)}
        for name in SCALAR_METRICS:
            if name != "round":
                value = getattr(metrics, name)
                scalars[name] = np.nan if value is None else float(value)
        layer_rows = {name: self._layer_row(name, getattr(metrics, name)) for name in LAYER_METRICS}
        n = self.row_count
        for name, scalar in scalars.items():
            if name not in self._metrics:  # a column added since the run file was written
                self._create_scalar_metric(self._metrics, name, rows=n)
            ds = self._metrics[name]
            ds.resize((n + 1,))
            ds[n] = scalar
        for name, row in layer_rows.items():
            if name not in self._metrics:  # a column added since the run file was written
                self._create_layer_metric(self._metrics, name, self.layer_count, rows=n)
            ds = self._metrics[name]
            ds.resize((n + 1, self.layer_count))
            ds[n] = row
        if flush:
            self.flush()

    @property
    def last_client_round(self) -> int | None:
        """Round of the last ``/clients`` row, or None when there is none."""
        if self._clients is None:
            return None
        rounds = self._clients["round"]
        n = int(rounds.shape[0])
        return None if n == 0 else int(rounds[n - 1])

    def append_clients(
        self,
        round: int,
        participated: np.ndarray,
        losses: np.ndarray,
        scores: np.ndarray,
        samples: np.ndarray,
        *,
        late: np.ndarray | None = None,
        staleness: np.ndarray | None = None,
        flush: bool = True,
    ) -> None:
        """Append one ``/clients`` row: who took part in ``round``, their losses, scores, samples.

        ``participated`` (bool, one flag per client) is stored as bits; ``losses`` (NaN where not
        measured) and ``scores`` (NaN where none) as float32; ``samples`` (the samples each
        client trained on) as int32; ``late`` (bool, None: nobody) as bits; ``staleness`` (None:
        NaN) as float32. The group is created by the first call. Rounds must increase,
        independently of :meth:`append_round`.

        Raises
        ------
        ValueError
            A round not after the last ``/clients`` round (call :meth:`truncate_to` first when
            rerunning rounds), an array of the wrong shape or kind, another population size, a
            sample count outside ``[0, 2**31)``, or a client that did not take part with samples
            or a finite loss (:func:`hflmpi.record.client_rows.checked_client_row`).
        """
        mask, loss, score, count = checked_client_row(round, participated, losses, scores, samples,
                                                      self._clients)
        if self._clients is None:
            self._clients = create_client_group(self._file, int(mask.shape[0]))
        append_client_row(self._clients, round, mask, loss, score, count, late, staleness)
        if flush:
            self.flush()

    def truncate_to(self, round: int, note: str | None = None) -> int:
        """Drop every row whose round is after ``round`` (resume from a checkpoint of ``round``).

        Rows of ``/clients`` (:meth:`append_clients`) past ``round`` are dropped too.

        Parameters
        ----------
        round : int
            The round of the checkpoint the run resumes from.
        note : str, optional
            Stored with the ``resume_log`` entry (e.g. why the record was rebuilt).

        Returns
        -------
        int
            The number of ``/metrics`` rows kept.
        """
        rounds = self._metrics["round"][:]
        keep = int(np.searchsorted(rounds, round, side="right"))
        dropped = rounds.shape[0] - keep
        for ds in self._metrics.values():
            ds.resize((keep,) + ds.shape[1:])
        log = json.loads(self._file.attrs.get("resume_log", "[]"))
        entry: dict[str, Any] = {"time": _now_iso(time.time()), "round": int(round),
                                 "dropped_rows": dropped}
        if self._clients is not None:
            entry["dropped_client_rows"] = truncate_client_rows(self._clients, round)
        if note:
            entry["note"] = note
        log.append(entry)
        self._file.attrs["resume_log"] = json.dumps(log)
        self.flush()
        return keep

    def replace_config(self, config_toml: str, entry: Mapping[str, Any]) -> None:
        """Store the config a resumed run continues under and log why it changed.

        Parameters
        ----------
        config_toml : str
            The new resolved config (TOML text); replaces the ``config_toml`` attribute.
        entry : mapping
            JSON-serialisable record appended to the ``config_history`` attribute, e.g. the round,
            the changed keys with their old and new values and the previous config's hash.
        """
        history = json.loads(self._file.attrs.get("config_history", "[]"))
        history.append({"time": _now_iso(time.time()), **entry})
        self._file.attrs["config_history"] = json.dumps(history)
        self._file.attrs["config_toml"] = config_toml
        self.flush()

    def add_provenance(self, entry: Mapping[str, Any], first_round: int) -> int:
        """Append one leg's provenance (:func:`hflmpi.record.provenance.provenance`) as a group.

        A resume adds a new leg (the run may continue on another cluster); earlier legs stay.
        Returns the leg number (0 for the first start).
        """
        group = self._file.require_group("provenance")
        leg = len(group)
        attrs = group.create_group(str(leg)).attrs
        attrs["time"] = _now_iso(time.time())
        attrs["first_round"] = int(first_round)
        for key, value in entry.items():
            attrs[key] = _attr_value(key, value)
        self.flush()
        return leg

    def write_partition(self, sizes: Sequence[int] | np.ndarray, histograms: np.ndarray) -> None:
        """Store per-client sample counts [clients] and label histograms [clients, classes].

        An existing ``/partition`` group (from an earlier start of the same run) is replaced.
        """
        size_arr = np.asarray(sizes, dtype=np.int64)
        hist_arr = np.asarray(histograms, dtype=np.int64)
        if size_arr.ndim != 1 or hist_arr.ndim != 2 or hist_arr.shape[0] != size_arr.shape[0]:
            raise ValueError(
                f"partition sizes must be [clients] and histograms [clients, classes]; got "
                f"{size_arr.shape} and {hist_arr.shape}"
            )
        if "partition" in self._file:
            del self._file["partition"]
        group = self._file.create_group("partition")
        group.create_dataset("sizes", data=size_arr).attrs["description"] = "samples per client"
        group.create_dataset("label_histograms", data=hist_arr).attrs["description"] = (
            "samples per (client, label)"
        )
        self.flush()

    def flush(self) -> None:
        """Flush HDF5 buffers to the operating system."""
        self._file.flush()

    def close(self) -> None:
        """Flush and close the file (idempotent; the file is closed even if the flush fails)."""
        if self._file.id.valid:
            try:
                self._file.flush()
            finally:
                self._file.close()

    def __enter__(self) -> RunRecord:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
