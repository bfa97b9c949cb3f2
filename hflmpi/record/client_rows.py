"""The ``/clients`` rows of a run file: who took part in each round, their losses, scores, samples.

Written by :meth:`hflmpi.record.store.RunRecord.append_clients`; read by
:func:`hflmpi.record.reading.read_clients`. Layout::

    /clients                attrs: clients (population size); written by append_clients
    /clients/round          int64 [rows]            (strictly increasing, like /metrics/round)
    /clients/participated   uint8 [rows, ceil(clients / 8)]: client c took part in the row's round
                            iff bit c % 8 of byte c // 8 is set, least significant bit first
                            (``np.packbits(..., bitorder="little")``; the padding bits are 0)
    /clients/loss           float32 [rows, clients]   training loss (NaN: did not train)
    /clients/score          float32 [rows, clients]   selection score (NaN: none)
    /clients/samples        int32 [rows, clients]     samples trained on in the round (0: none)
    /clients/late           uint8 [rows, ceil(clients / 8)]: bits as ``participated``; the
                            client's update missed its layer-1 node's deadline in the round
                            (docs/async.md; absent in run files written before it existed)
    /clients/staleness      float32 [rows, clients]   staleness of the client's last update that
                            a buffered layer-1 node applied in the round (NaN: none; absent in
                            run files written before it existed)
"""

from __future__ import annotations

from typing import Any, Literal, Mapping

import h5py
import numpy as np

__all__ = ["CLIENT_BITORDER", "append_client_row", "checked_client_row", "create_client_group",
           "truncate_client_rows"]

_SCALAR_CHUNK = 1024
# /clients chunks: a row of a million float32 values is 4 MiB, so a chunk holds at most this many
# bytes (one row split across chunks for wide rows, many rows per chunk for small populations).
_CLIENT_CHUNK_BYTES = 1 << 20
CLIENT_BITORDER: Literal["little"] = "little"
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
    "late": (
        "uint8", 0,
        "the client's update reached its layer-1 node after the node closed (clock.mode "
        "\"deadline\") and was dropped (or, clock.late \"carry\", held for a later close); "
        "bits as in 'participated'",
    ),
    "staleness": (
        "float32", np.nan,
        "staleness (node versions applied since its download) of the client's last update that a "
        "buffered layer-1 node applied in the round (clock.mode \"buffered\"), or of its last "
        "carried late update (clock.late \"carry\"; NaN: none)",
    ),
}
_PACKED = ("participated", "late")


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


def create_client_group(file: h5py.File, clients: int) -> h5py.Group:
    """Create ``/clients`` for a population of ``clients`` (the first :func:`append_client_row`)."""
    group = file.create_group("clients")
    group.attrs["clients"] = clients
    group.attrs["bitorder"] = CLIENT_BITORDER
    ds = group.create_dataset(
        "round", shape=(0,), maxshape=(None,), dtype="int64", chunks=(_SCALAR_CHUNK,),
        fillvalue=-1,
    )
    ds.attrs["description"] = "global round of the row (strictly increasing)"
    for name in _CLIENT_DATASETS:
        _create_client_dataset(group, name, clients)
    return group


def _create_client_dataset(group: h5py.Group, name: str, clients: int, rows: int = 0) -> None:
    dtype, fill, text = _CLIENT_DATASETS[name]
    columns = (clients + 7) // 8 if name in _PACKED else clients
    ds = group.create_dataset(
        name, shape=(rows, columns), maxshape=(None, columns), dtype=dtype,
        chunks=_client_chunks(columns, np.dtype(dtype).itemsize), fillvalue=fill,
    )
    ds.attrs["description"] = text


def checked_client_row(round: int, participated: Any, losses: Any, scores: Any, samples: Any,
                       group: h5py.Group | None) -> tuple[np.ndarray, np.ndarray, np.ndarray,
                                                          np.ndarray]:
    """Check one row for :meth:`~hflmpi.record.store.RunRecord.append_clients`; return it typed."""
    if group is not None:
        rounds = group["round"]
        last = int(rounds[rounds.shape[0] - 1]) if rounds.shape[0] else None
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
    if group is not None and clients != int(group.attrs["clients"]):
        raise ValueError(
            f"append_clients: {clients} clients given; the run's /clients population has "
            f"{int(group.attrs['clients'])}"
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
    return mask, loss, score, count


def append_client_row(group: h5py.Group, round: int, mask: np.ndarray, loss: np.ndarray,
                      score: np.ndarray, count: np.ndarray, late: Any = None,
                      staleness: Any = None) -> None:
    """Append a checked row (:func:`checked_client_row`) to ``/clients``.

    ``late`` (bool per client, None: nobody) flags the participants whose update was dropped;
    ``staleness`` (per client, None: NaN) is that of the last applied buffered update.
    """
    late_mask = np.zeros_like(mask) if late is None else np.asarray(late, dtype=np.bool_)
    if late_mask.shape != mask.shape or (late_mask & ~mask).any():
        raise ValueError(f"append_clients: late must be a bool flag per client ({mask.shape}), "
                         "set only for clients that took part")
    rows = {
        "participated": np.packbits(mask, bitorder=CLIENT_BITORDER),
        "loss": loss,
        "score": score,
        "samples": count,
        "late": np.packbits(late_mask, bitorder=CLIENT_BITORDER),
        "staleness": (np.full(mask.shape, np.nan, dtype=np.float32) if staleness is None else
                      _client_vector("staleness", staleness, int(mask.shape[0]), "float32")),
    }
    n = int(group["round"].shape[0])
    for name in ("late", "staleness"):
        if name not in group:  # a run file written before the column existed
            _create_client_dataset(group, name, int(mask.shape[0]), rows=n)
    # The round last: truncate_to and readers go by it, so a failed write (full disk) leaves
    # at most a row that the next truncate_to drops.
    for name, row in rows.items():
        ds = group[name]
        ds.resize((n + 1, row.shape[0]))
        ds[n] = row
    rounds = group["round"]
    rounds.resize((n + 1,))
    rounds[n] = int(round)


def truncate_client_rows(group: h5py.Group, round: int) -> int:
    """Drop the rows past ``round``; return how many were dropped."""
    client_rounds = group["round"][:]
    keep = int(np.searchsorted(client_rounds, round, side="right"))
    for ds in group.values():
        ds.resize((keep,) + ds.shape[1:])
    return int(client_rounds.shape[0] - keep)
