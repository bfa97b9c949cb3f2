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
    /clients                attrs: clients (population size); written by append_clients
    /clients/round          int64 [rows]            (strictly increasing, like /metrics/round)
    /clients/participated   uint8 [rows, ceil(clients / 8)]: client c took part in the row's round
                            iff bit c % 8 of byte c // 8 is set, least significant bit first
                            (``np.packbits(..., bitorder="little")``; the padding bits are 0)
    /clients/loss           float32 [rows, clients]   training loss (NaN: did not train)
    /clients/score          float32 [rows, clients]   selection score (NaN: none)
    /clients/samples        int32 [rows, clients]     samples trained on in the round (0: none)
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
from typing import Any, Literal, Mapping, Sequence

import h5py
import numpy as np

from hflmpi import __version__
from hflmpi.core.wire import Method

__all__ = [
    "FORMAT_VERSION",
    "METHOD_CODES",
    "SCALAR_METRICS",
    "LAYER_METRICS",
    "RoundMetrics",
    "RunRecord",
]

FORMAT_VERSION = 1

METHOD_CODES: Mapping[str, int] = {m.label: int(m) for m in Method}
"""Integer code of the aggregation method stored in ``/metrics/method`` (-1 = not recorded):
:class:`hflmpi.core.wire.Method` by its label,
``{"none": 0, "integer-sum": 1, "gather": 2, "lanes": 3}``."""

_METHOD_MISSING = -1

# name -> (dtype, units, description)
SCALAR_METRICS: Mapping[str, tuple[str, str, str]] = {
    "round": ("int64", "1", "global round that this row closes (strictly increasing)"),
    "wall_time": ("float64", "s", "seconds since the run started, at the end of the round"),
    "train_loss": ("float64", "1", "sample-weighted mean training loss over the round"),
    "test_loss": ("float64", "1", "loss of the global model on the test set"),
    "test_accuracy": ("float64", "1", "accuracy of the global model on the test set, in [0, 1]"),
    "samples_per_second": ("float64", "1/s", "training samples processed per second, all ranks"),
    "upward_divergence": (
        "float64",
        "1",
        "H-SGD upward divergence: weighted mean of ||x_g - x||^2 over the group models x_g "
        "around the global model x, just before the global aggregation (Wang et al., AAAI 2022); "
        "measured on evaluated rounds when run.divergence is on",
    ),
    "downward_divergence": (
        "float64",
        "1",
        "H-SGD downward divergence: weighted mean of ||x_i - x_g(i)||^2 over the device models "
        "x_i around their group model x_g(i), just before the group aggregation",
    ),
}

LAYER_METRICS: Mapping[str, tuple[str, str, str]] = {
    "compute_seconds": ("float64", "s", "seconds of computation attributed to the layer"),
    "comm_seconds": ("float64", "s", "seconds spent in the layer's collectives"),
    "bytes_sent": ("float64", "B", "payload bytes sent up and down the layer in the round"),
    "quant_error": (
        "float64",
        "1",
        "relative squared quantization error ||Q(d) - d||^2 / ||d||^2 of the uplink differences "
        "(worst participant; measured on evaluated rounds only, NaN otherwise)",
    ),
    "method": ("int8", "1", "aggregation method code, see attr 'codes' (-1: not recorded)"),
}

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
# /clients chunks: a row of a million float32 values is 4 MiB, so a chunk holds at most this many
# bytes (one row split across chunks for wide rows, many rows per chunk for small populations).
_CLIENT_CHUNK_BYTES = 1 << 20
_CLIENT_BITORDER: Literal["little"] = "little"
# name -> (dtype, fill, description) of the per-client datasets; "participated" is packed bits.
_CLIENT_DATASETS: Mapping[str, tuple[str, float | int, str]] = {
    "participated": (
        "uint8", 0,
        "client c took part in the round iff bit c % 8 (least significant first) of byte c // 8 is "
        "set: np.unpackbits(row, count=clients, bitorder='little')",
    ),
    "loss": ("float32", np.nan, "training loss of the client in the round (NaN: did not train)"),
    "score": ("float32", np.nan, "selection score of the client in the round (NaN: none)"),
    "samples": ("int32", 0, "samples the client trained on in the round (0: none)"),
}


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
    quant_error: Sequence[float] | None = None
    method: Sequence[int | str] | None = None
    upward_divergence: float = math.nan
    downward_divergence: float = math.nan


def _now_iso(unix: float) -> str:
    return datetime.fromtimestamp(unix, tz=timezone.utc).isoformat(timespec="seconds")


def _attr_value(key: str, value: Any) -> Any:
    if isinstance(value, (str, bool, int, float, np.integer, np.floating)):
        return value
    try:
        return json.dumps(value, sort_keys=True)
    except TypeError as err:
        raise TypeError(f"run meta {key!r} must be a scalar or JSON-serialisable: {err}") from err


def _client_chunks(columns: int, itemsize: int) -> tuple[int, int]:
    """Return a chunk shape of at most ``_CLIENT_CHUNK_BYTES`` for a [rows, columns] dataset."""
    row_bytes = max(1, columns * itemsize)
    rows = max(1, min(_SCALAR_CHUNK, _CLIENT_CHUNK_BYTES // row_bytes))
    return rows, max(1, min(columns, _CLIENT_CHUNK_BYTES // itemsize))


def _client_vector(name: str, values: Any, clients: int, dtype: str) -> np.ndarray:
    arr = np.asarray(values)
    if arr.shape != (clients,):
        raise ValueError(
            f"append_clients: {name} has shape {arr.shape}; the population has {clients} clients "
            f"(shape ({clients},))"
        )
    return arr.astype(dtype, copy=False)


def _method_code(value: int | str, layer: int) -> int:
    if isinstance(value, str):
        if value not in METHOD_CODES:
            raise ValueError(
                f"method[{layer}]={value!r} is not one of {sorted(METHOD_CODES)}; "
                "use a name or code from METHOD_CODES"
            )
        return METHOD_CODES[value]
    code = int(value)
    if code != _METHOD_MISSING and code not in METHOD_CODES.values():
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
    def _create_metrics(group: h5py.Group, layers: int) -> None:
        group.attrs["layer_axis"] = (
            "column j is tree layer j + 1 (1: first aggregation above the devices, "
            f"{layers}: root)"
        )
        for name, (dtype, units, text) in SCALAR_METRICS.items():
            fill = -1 if dtype == "int64" else np.nan
            ds = group.create_dataset(
                name, shape=(0,), maxshape=(None,), dtype=dtype,
                chunks=(_SCALAR_CHUNK,), fillvalue=fill,
            )
            ds.attrs["units"], ds.attrs["description"] = units, text
        for name, (dtype, units, text) in LAYER_METRICS.items():
            fill = _METHOD_MISSING if dtype == "int8" else np.nan
            ds = group.create_dataset(
                name, shape=(0, layers), maxshape=(None, layers), dtype=dtype,
                chunks=(_LAYER_CHUNK_ROWS, layers), fillvalue=fill,
            )
            ds.attrs["units"], ds.attrs["description"] = units, text
        method = group["method"]
        method.attrs["codes"] = json.dumps({str(v): k for k, v in METHOD_CODES.items()})
        method.attrs["missing"] = _METHOD_MISSING

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
            fill = _METHOD_MISSING if dtype == "int8" else np.nan
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
            ds = self._metrics[name]
            ds.resize((n + 1,))
            ds[n] = scalar
        for name, row in layer_rows.items():
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

    def _create_clients(self, clients: int) -> h5py.Group:
        group = self._file.create_group("clients")
        group.attrs["clients"] = clients
        group.attrs["bitorder"] = _CLIENT_BITORDER
        ds = group.create_dataset(
            "round", shape=(0,), maxshape=(None,), dtype="int64", chunks=(_SCALAR_CHUNK,),
            fillvalue=-1,
        )
        ds.attrs["description"] = "global round of the row (strictly increasing)"
        for name, (dtype, fill, text) in _CLIENT_DATASETS.items():
            columns = (clients + 7) // 8 if name == "participated" else clients
            ds = group.create_dataset(
                name, shape=(0, columns), maxshape=(None, columns), dtype=dtype,
                chunks=_client_chunks(columns, np.dtype(dtype).itemsize), fillvalue=fill,
            )
            ds.attrs["description"] = text
        return group

    def append_clients(
        self,
        round: int,
        participated: np.ndarray,
        losses: np.ndarray,
        scores: np.ndarray,
        samples: np.ndarray,
        *,
        flush: bool = True,
    ) -> None:
        """Append one ``/clients`` row: who took part in ``round``, their losses, scores, samples.

        The group is created by the first call, with the population size taken from
        ``participated``; ``participated`` is stored as bits (see the module docstring).

        Parameters
        ----------
        round : int
            The global round; greater than the last ``/clients`` round (independent of
            :meth:`append_round`, which may come before or after).
        participated : ndarray of bool, shape (clients,)
            Whether each client trained in the round.
        losses : ndarray of float, shape (clients,)
            Training loss per client, NaN where not measured; stored as float32.
        scores : ndarray of float, shape (clients,)
            Selection score per client, NaN where none; stored as float32.
        samples : ndarray of int, shape (clients,)
            Samples each client trained on in the round, in ``[0, 2**31)``.
        flush : bool
            Flush the file afterwards.

        Raises
        ------
        ValueError
            If ``round`` is not after the last stored ``/clients`` round (call :meth:`truncate_to`
            first when rerunning rounds), an array has the wrong shape or kind, the population
            size differs from the run's, a sample count is out of range, or a client that did
            not take part has samples or a finite loss.
        """
        last = self.last_client_round
        if last is not None and round <= last:
            raise ValueError(
                f"append_clients: round {round} is not after the last stored clients round "
                f"{last}; call truncate_to({round - 1}) when rerunning rounds after a resume"
            )
        mask = np.asarray(participated)
        if mask.ndim != 1 or mask.dtype != np.bool_:
            raise ValueError(
                f"append_clients: participated must be a 1-D bool array (one flag per client); "
                f"got dtype {mask.dtype} and shape {mask.shape}"
            )
        clients = int(mask.shape[0])
        if self._clients is not None and clients != int(self._clients.attrs["clients"]):
            raise ValueError(
                f"append_clients: {clients} clients given; the run's /clients population has "
                f"{int(self._clients.attrs['clients'])}"
            )
        if clients == 0:
            raise ValueError("append_clients: the population is empty (participated has size 0)")
        loss = _client_vector("losses", losses, clients, "float32")
        score = _client_vector("scores", scores, clients, "float32")
        count = np.asarray(samples)
        if not np.issubdtype(count.dtype, np.integer):
            raise ValueError(f"append_clients: samples must be integers; got dtype {count.dtype}")
        if count.size and (count.min() < 0 or count.max() > np.iinfo(np.int32).max):
            raise ValueError(
                f"append_clients: samples must lie in [0, 2**31); got {count.min()}..{count.max()}"
            )
        count = _client_vector("samples", count, clients, "int32")
        absent = ~mask
        if (count[absent] != 0).any() or np.isfinite(loss[absent]).any():
            bad = np.flatnonzero(absent & ((count != 0) | np.isfinite(loss)))
            raise ValueError(
                f"append_clients: clients {bad[:8].tolist()} did not take part in round {round} "
                "but have samples or a finite loss"
            )
        rows = {
            "participated": np.packbits(mask, bitorder=_CLIENT_BITORDER),
            "loss": loss,
            "score": score,
            "samples": count,
        }
        group = self._clients if self._clients is not None else self._create_clients(clients)
        self._clients = group
        n = int(group["round"].shape[0])
        # The round last: truncate_to and readers go by it, so a failed write (full disk) leaves
        # at most a row that the next truncate_to drops.
        for name, row in rows.items():
            ds = group[name]
            ds.resize((n + 1, row.shape[0]))
            ds[n] = row
        rounds = group["round"]
        rounds.resize((n + 1,))
        rounds[n] = int(round)
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
            client_rounds = self._clients["round"][:]
            keep_clients = int(np.searchsorted(client_rounds, round, side="right"))
            for ds in self._clients.values():
                ds.resize((keep_clients,) + ds.shape[1:])
            entry["dropped_client_rows"] = client_rounds.shape[0] - keep_clients
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
