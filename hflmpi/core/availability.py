"""Which clients are online in each round: always, Bernoulli per round, or an availability trace.

Pure module (numpy, h5py for HDF5 traces). Bernoulli availability draws from the keyed stream
``(seed, "availability", round)`` of :mod:`hflmpi.core.rng`, so every rank gets the same flags.
``docs/population.md`` documents the trace formats (CSV and HDF5, client x round).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from hflmpi.core.rng import numpy_generator
from hflmpi.core.selection import SelectionError, _check_population, _check_round

__all__ = ["Availability"]

_HDF5_SUFFIXES = (".h5", ".hdf5", ".hdf")
_TRACE_DATASET = "available"


class Availability:
    """Which clients are online in each round: always, at random (Bernoulli), or from a trace.

    Build one with :meth:`always`, :meth:`bernoulli` or :meth:`from_trace`; then
    :meth:`online` gives round ``r``'s flags (rounds count from 1). A trace shorter than the run
    wraps around: round ``r`` uses column ``(r - 1) % trace_rounds``.
    """

    def __init__(self, population: int, *, p: float = 1.0, seed: int = 0,
                 trace: np.ndarray | None = None, source: str = "") -> None:
        self.population = _check_population(population)
        self.p = float(p)
        self.seed = int(seed)
        self.trace = trace
        self.source = source

    @classmethod
    def always(cls, population: int) -> Availability:
        """Return an availability where every client is online in every round."""
        return cls(population)

    @classmethod
    def bernoulli(cls, population: int, p: float, seed: int) -> Availability:
        """Return an availability where each client is online with probability ``p`` each round.

        Parameters
        ----------
        population : int
            Number of clients.
        p : float
            Probability in ``[0, 1]`` that a client is online in a round, independently per
            client and round (stream ``purpose="availability"`` keyed by ``seed`` and the round).
        seed : int
            The run's seed, ``>= 0``.
        """
        if not (0.0 <= p <= 1.0):
            raise SelectionError(f"availability probability p={p!r} must be in [0, 1]")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise SelectionError(f"seed {seed!r} must be an integer >= 0")
        return cls(population, p=p, seed=seed)

    @classmethod
    def from_trace(cls, path: str | os.PathLike[str], population: int,
                   rounds: int | None = None) -> Availability:
        """Return the availability recorded in a trace file (CSV or HDF5).

        CSV (``.csv``, or any file that is not HDF5): one line per client, one comma-separated
        0/1 value per round; lines starting with ``#`` (a header) and blank lines are skipped.
        HDF5 (``.h5``, ``.hdf5``, ``.hdf``, or any HDF5 file): a dataset ``available`` of shape
        ``[clients, rounds]``, bool or integers 0/1.

        Parameters
        ----------
        path : path-like
            The trace file.
        population : int
            Number of clients; the trace must have exactly this many rows.
        rounds : int, optional
            Keep only the first ``rounds`` columns (the run's length; a longer trace is cut, so
            the HDF5 reader reads no more). A trace with fewer columns wraps around.

        Raises
        ------
        SelectionError
            If the file is missing or unreadable, empty, has the wrong number of rows, ragged
            rows, values other than 0/1, or (HDF5) no ``available`` dataset.
        """
        population = _check_population(population)
        if rounds is not None and (isinstance(rounds, bool)
                                   or not isinstance(rounds, (int, np.integer)) or rounds < 1):
            raise SelectionError(f"rounds {rounds!r} must be an integer >= 1 (or None)")
        path = Path(path)
        if not path.is_file():
            raise SelectionError(f"availability trace {path} does not exist (or is not a file); "
                                 "check the path")
        if _is_hdf5(path):
            table = _read_hdf5_trace(path, rounds)
        else:
            table = _read_csv_trace(path)
            if rounds is not None:
                table = table[:, :rounds]
        if table.shape[0] != population:
            raise SelectionError(
                f"availability trace {path} has {table.shape[0]} client rows but the population "
                f"has {population} clients; give one row per client"
            )
        return cls(population, trace=np.ascontiguousarray(table), source=str(path))

    @property
    def trace_rounds(self) -> int | None:
        """The number of rounds (columns) of the trace, or None without one."""
        return None if self.trace is None else int(self.trace.shape[1])

    def online(self, round: int) -> np.ndarray:
        """Return which clients are online in round ``round`` (from 1), as a new bool array."""
        round = _check_round(round)
        if self.trace is not None:
            return self.trace[:, (round - 1) % self.trace.shape[1]].copy()
        if self.p >= 1.0:
            return np.ones(self.population, dtype=bool)
        rng = numpy_generator(self.seed, purpose="availability", round=round)
        return rng.random(self.population) < self.p

    def __repr__(self) -> str:
        if self.trace is not None:
            return (f"Availability.from_trace({self.source!r}, population={self.population}, "
                    f"trace_rounds={self.trace_rounds})")
        if self.p >= 1.0:
            return f"Availability.always({self.population})"
        return f"Availability.bernoulli({self.population}, p={self.p}, seed={self.seed})"


def _is_hdf5(path: Path) -> bool:
    if path.suffix.lower() in _HDF5_SUFFIXES:
        return True
    try:
        with open(path, "rb") as file:
            return file.read(8) == b"\x89HDF\r\n\x1a\n"
    except OSError as err:
        raise SelectionError(f"availability trace {path} cannot be read ({err}); check its "
                             "permissions") from None


def _read_csv_trace(path: Path) -> np.ndarray:
    """Return the [clients, rounds] bool table of a CSV trace, or raise naming the line."""
    fix = "write one line per client with one 0/1 value per round, separated by commas"
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise SelectionError(f"availability trace {path} cannot be read as a CSV text file "
                             f"({err}); {fix}") from None
    rows: list[np.ndarray] = []
    width = -1
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        cells = [cell.strip() for cell in stripped.split(",")]
        if width < 0:
            width = len(cells)
        elif len(cells) != width:
            raise SelectionError(f"availability trace {path}, line {number}: {len(cells)} values "
                                 f"but the first client row has {width}; {fix}")
        row = np.array(cells)
        bad = ~np.isin(row, ("0", "1"))
        if bad.any():
            column = int(np.flatnonzero(bad)[0])
            raise SelectionError(f"availability trace {path}, line {number}, column "
                                 f"{column + 1}: value {cells[column]!r} is not 0 or 1; {fix}")
        rows.append(row == "1")
    if not rows:
        raise SelectionError(f"availability trace {path} is empty (no client rows); {fix}")
    return np.stack(rows)


def _read_hdf5_trace(path: Path, rounds: int | None) -> np.ndarray:
    """Return the [clients, rounds] bool table of an HDF5 trace, or raise naming the problem."""
    import h5py  # only a trace file needs it

    fix = (f"store a dataset {_TRACE_DATASET!r} of shape [clients, rounds] holding bool or "
           "integer 0/1 values")
    try:
        with h5py.File(path, "r", locking=False) as file:
            node = file.get(_TRACE_DATASET)
            if not isinstance(node, h5py.Dataset):
                found = ", ".join(sorted(file.keys())) or "nothing"
                raise SelectionError(f"availability trace {path} has no dataset "
                                     f"{_TRACE_DATASET!r} (found: {found}); {fix}")
            if node.ndim != 2:
                raise SelectionError(f"availability trace {path}: dataset {_TRACE_DATASET!r} "
                                     f"has shape {node.shape}, not [clients, rounds]; {fix}")
            if node.dtype != np.bool_ and not np.issubdtype(node.dtype, np.integer):
                raise SelectionError(f"availability trace {path}: dataset {_TRACE_DATASET!r} "
                                     f"has dtype {node.dtype}; {fix}")
            data = node[:, :rounds] if rounds is not None else node[()]
    except SelectionError:
        raise
    except (OSError, KeyError, ValueError) as err:
        raise SelectionError(f"availability trace {path} cannot be read as HDF5 ({err}); "
                             f"{fix}") from None
    data = np.asarray(data)
    if data.size == 0:
        raise SelectionError(f"availability trace {path}: dataset {_TRACE_DATASET!r} is empty "
                             f"(shape {data.shape}); {fix}")
    if data.dtype != np.bool_:
        bad = (data != 0) & (data != 1)
        if bad.any():
            client, column = (int(i) for i in np.argwhere(bad)[0])
            raise SelectionError(f"availability trace {path}: {_TRACE_DATASET}[{client}, "
                                 f"{column}] = {data[client, column]} is not 0 or 1; {fix}")
    return data.astype(bool)
