"""Device profiles of a population: each client's compute speed and uplink, drawn or read from a file.

A profile gives every client ``c`` three numbers that drive the simulated clock
(:mod:`hflmpi.core.clock`): ``step_seconds[c]`` (simulated seconds per local SGD step),
``uplink[c]`` (bytes per second of its link to its layer-1 aggregator) and ``latency[c]``
(seconds added to every message on that link). They are drawn from the run seed
(:func:`draw_profiles`: a ``slow_fraction`` of the clients is ``slow_factor`` times slower in
compute and link, on top of an optional log-normal spread of compute speeds) or read from a
profile file (:func:`read_profiles`; CSV or HDF5, documented in docs/async.md). The relative
``speeds`` (1 = a client at the base step time) are what the priority selection reads.

Pure module (numpy; h5py only for HDF5 profile files); every rank computes the same profiles.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hflmpi.core.rng import numpy_generator
from hflmpi.errors import HflmpiError

__all__ = ["DeviceProfiles", "ProfileError", "draw_profiles", "read_profiles", "PROFILE_COLUMNS"]

PROFILE_COLUMNS = ("client", "step_seconds", "uplink", "latency")
"""The columns of a profile file (CSV header, or HDF5 dataset names), in this order."""

_HDF5_SUFFIXES = (".h5", ".hdf5", ".hdf")
_FIX = ("write a header line 'client,step_seconds,uplink,latency' and one line per client "
        "0..count-1 (step_seconds > 0 s, uplink > 0 bytes/s, latency >= 0 s)")


class ProfileError(HflmpiError, ValueError):
    """A device profile file or profile setting that cannot describe the population."""


@dataclass(frozen=True)
class DeviceProfiles:
    """Every client's simulated compute and link (float64 arrays of ``clients`` entries).

    Attributes
    ----------
    step_seconds : ndarray
        Simulated seconds per local SGD step.
    uplink : ndarray
        Bytes per second of the client's link to its layer-1 aggregator.
    latency : ndarray
        Seconds added to every message on that link.
    speeds : ndarray
        Relative compute speed (1: the base step time; larger is faster).
    """

    step_seconds: np.ndarray
    uplink: np.ndarray
    latency: np.ndarray
    speeds: np.ndarray

    @property
    def clients(self) -> int:
        """Return the population size."""
        return int(self.step_seconds.shape[0])

    def link_seconds(self, nbytes: float) -> np.ndarray:
        """Return each client's time to send ``nbytes`` over its link (transfer plus latency)."""
        return np.asarray(nbytes / self.uplink + self.latency, dtype=np.float64)


def draw_profiles(clients: int, seed: int, *, step_seconds: float, uplink: float, latency: float,
                  slow_fraction: float = 0.0, slow_factor: float = 1.0,
                  spread: float = 0.0) -> DeviceProfiles:
    """Draw every client's profile from the run seed.

    Client ``c`` has relative speed ``speeds[c] = g_c / f_c``: ``g_c`` log-normal with sigma
    ``spread`` (stream ``"speeds"``, the same draw the priority selection always used; 1 when
    ``spread`` is 0) and ``f_c = slow_factor`` for the ``round(slow_fraction * clients)`` slow
    clients (a uniform choice from stream ``"slow_devices"``), else 1. Then ``step_seconds[c] =
    step_seconds / speeds[c]``, ``uplink[c] = uplink / f_c`` and ``latency[c] = latency * f_c``.

    Raises
    ------
    ProfileError
        A non-positive base value, a fraction outside [0, 1] or a factor below 1.
    """
    for name, value in (("step_seconds", step_seconds), ("uplink", uplink)):
        if not (math.isfinite(value) and value > 0):
            raise ProfileError(f"device {name}={value!r} must be a finite number > 0")
    if not (math.isfinite(latency) and latency >= 0):
        raise ProfileError(f"device latency={latency!r} must be a finite number >= 0")
    if not 0.0 <= slow_fraction <= 1.0:
        raise ProfileError(f"slow_fraction={slow_fraction!r} must lie in [0, 1]")
    if not (math.isfinite(slow_factor) and slow_factor >= 1.0):
        raise ProfileError(f"slow_factor={slow_factor!r} must be a finite number >= 1")
    spreads = (numpy_generator(seed, purpose="speeds").lognormal(0.0, spread, clients)
               if spread > 0 else np.ones(clients))
    factor = np.ones(clients)
    slow = int(round(slow_fraction * clients))
    if slow:
        factor[numpy_generator(seed, purpose="slow_devices").permutation(clients)[:slow]] = \
            slow_factor
    speeds = spreads / factor
    return DeviceProfiles(step_seconds / speeds, uplink / factor, latency * factor, speeds)


def read_profiles(path: str | os.PathLike[str], clients: int) -> DeviceProfiles:
    """Read every client's profile from a CSV or HDF5 file (see docs/async.md).

    CSV: a header line ``client,step_seconds,uplink,latency`` (the columns in any order, no
    others), then one line per client; blank lines and lines starting with ``#`` are skipped.
    HDF5 (``.h5``, ``.hdf5``, ``.hdf`` or any HDF5 file): four 1-D datasets of those names and
    equal length. Either way every client ``0..clients-1`` appears exactly once, ``step_seconds``
    and ``uplink`` are finite and > 0, ``latency`` finite and >= 0. ``speeds`` are
    ``median(step_seconds) / step_seconds``.

    Raises
    ------
    ProfileError
        A missing or unreadable file, wrong columns, a value that is not a number or out of
        range, a missing, repeated or unknown client; the message names the file and the fix.
    """
    path = Path(path)
    if not path.is_file():
        raise ProfileError(f"device profile file {path} does not exist (or is not a file); "
                           "check clock.profile")
    columns = _read_hdf5(path) if _is_hdf5(path) else _read_csv(path)
    ids = columns["client"]
    if not np.all(np.isfinite(ids)) or not np.all(ids == np.round(ids)):
        raise ProfileError(f"device profile {path}: client ids must be whole numbers; {_FIX}")
    ids = ids.astype(np.int64)
    unknown = ids[(ids < 0) | (ids >= clients)]
    if unknown.size:
        raise ProfileError(f"device profile {path} names client {int(unknown[0])}, but the "
                           f"population has clients 0..{clients - 1}; {_FIX}")
    counts = np.bincount(ids, minlength=clients)
    if (counts > 1).any():
        raise ProfileError(f"device profile {path} lists client {int(np.argmax(counts > 1))} "
                           f"{int(counts.max())} times; give every client exactly once")
    if (counts == 0).any():
        missing = np.flatnonzero(counts == 0)
        raise ProfileError(f"device profile {path} has no line for clients "
                           f"{missing[:8].tolist()}{' ...' if missing.size > 8 else ''} "
                           f"({missing.size} of {clients} missing); give every client exactly "
                           "once")
    order = np.argsort(ids, kind="stable")
    values = {name: columns[name][order] for name in PROFILE_COLUMNS[1:]}
    for name, low in (("step_seconds", 0.0), ("uplink", 0.0), ("latency", None)):
        data = values[name]
        bad = ~np.isfinite(data) | ((data <= low) if low is not None else (data < 0))
        if bad.any():
            client = int(np.flatnonzero(bad)[0])
            bound = "> 0" if low is not None else ">= 0"
            raise ProfileError(f"device profile {path}: client {client} has {name}="
                               f"{float(data[client])!r}; it must be a finite number {bound}")
    step = values["step_seconds"]
    return DeviceProfiles(step, values["uplink"], values["latency"], float(np.median(step)) / step)


def _is_hdf5(path: Path) -> bool:
    if path.suffix.lower() in _HDF5_SUFFIXES:
        return True
    try:
        with open(path, "rb") as file:
            return file.read(8) == b"\x89HDF\r\n\x1a\n"
    except OSError as err:
        raise ProfileError(f"device profile {path} cannot be read ({err})") from None


def _read_csv(path: Path) -> dict[str, np.ndarray]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ProfileError(f"device profile {path} cannot be read as CSV text ({err}); "
                           f"{_FIX}") from None
    lines = [(n, line.strip()) for n, line in enumerate(text.splitlines(), start=1)
             if line.strip() and not line.strip().startswith("#")]
    if not lines:
        raise ProfileError(f"device profile {path} is empty; {_FIX}")
    header = [cell.strip() for cell in lines[0][1].split(",")]
    if sorted(header) != sorted(PROFILE_COLUMNS):
        raise ProfileError(f"device profile {path}, line {lines[0][0]}: header {header} is not "
                           f"the columns {list(PROFILE_COLUMNS)}; {_FIX}")
    rows = []
    for number, line in lines[1:]:
        cells = [cell.strip() for cell in line.split(",")]
        if len(cells) != len(header):
            raise ProfileError(f"device profile {path}, line {number}: {len(cells)} values but "
                               f"the header has {len(header)}; {_FIX}")
        try:
            rows.append([float(cell) for cell in cells])
        except ValueError:
            raise ProfileError(f"device profile {path}, line {number}: {line!r} holds a value "
                               f"that is not a number; {_FIX}") from None
    table = np.array(rows, dtype=np.float64).reshape(len(rows), len(header))
    return {name: table[:, header.index(name)] for name in PROFILE_COLUMNS}


def _read_hdf5(path: Path) -> dict[str, np.ndarray]:
    import h5py  # only a profile file needs it

    fix = ("store four 1-D datasets of equal length named "
           f"{', '.join(PROFILE_COLUMNS)} (one entry per client)")
    try:
        with h5py.File(path, "r", locking=False) as file:
            found = sorted(file.keys())
            missing = [name for name in PROFILE_COLUMNS if not isinstance(file.get(name),
                                                                          h5py.Dataset)]
            if missing:
                raise ProfileError(f"device profile {path} has no dataset {missing[0]!r} "
                                   f"(found: {', '.join(found) or 'nothing'}); {fix}")
            out = {name: np.asarray(file[name][()]) for name in PROFILE_COLUMNS}
    except ProfileError:
        raise
    except (OSError, KeyError, ValueError) as err:
        raise ProfileError(f"device profile {path} cannot be read as HDF5 ({err}); "
                           f"{fix}") from None
    lengths = {name: data.shape for name, data in out.items()}
    if any(len(shape) != 1 for shape in lengths.values()) or len(set(lengths.values())) != 1:
        raise ProfileError(f"device profile {path}: dataset shapes {lengths} are not 1-D of "
                           f"one length; {fix}")
    try:
        return {name: data.astype(np.float64) for name, data in out.items()}
    except (TypeError, ValueError):
        raise ProfileError(f"device profile {path} holds non-numeric data; {fix}") from None
