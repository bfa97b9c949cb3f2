r"""Atomic, checksummed HDF5 checkpoints with one previous generation kept.

Rank 0 writes; per-rank state (optimizer momentum, RNG/batch positions) arrives gathered by the
caller as arrays stacked along a leading ``world_size`` axis. A run ``<run>.h5`` has its checkpoint
in ``<run>.ckpt.h5`` and the generation before it in ``<run>.ckpt.prev.h5``. A save

1. writes ``<run>.ckpt.h5.tmp`` through :func:`hflmpi.record.h5sink.create_h5` (a full disk is a
   plain ``OSError``, never a failed write inside HDF5), closes and ``fsync``\ s it;
2. renames the current checkpoint to ``<run>.ckpt.prev.h5`` (only if it looks valid, so a bad
   newest file never pushes out a good previous one);
3. renames the temporary file to ``<run>.ckpt.h5`` and ``fsync``\ s the directory.

A crash at any point leaves at least one complete checkpoint. Every file carries a SHA-256 over
the round, the state JSON and each array's name, dtype, shape and bytes; :func:`load_checkpoint`
recomputes it, and :func:`load_latest_valid` falls back to the previous generation with a warning.

File layout::

    /                attrs: format ("hflmpi-checkpoint"), format_version, hflmpi_version,
                            round, state_json, sha256, created (ISO 8601, UTC)
    /model           the flat model [n]        attrs: torch_dtype (only for torch input)
    /extra/<name>    one dataset per extra array, e.g. [world_size, n]
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import warnings
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Mapping

import h5py
import numpy as np

from hflmpi import __version__
from hflmpi.errors import HflmpiError
from hflmpi.record.h5sink import create_h5

__all__ = [
    "fsync_path",
    "Checkpoint",
    "CheckpointError",
    "CheckpointNotFoundError",
    "CheckpointFallbackWarning",
    "checkpoint_paths",
    "config_digest",
    "describe_os_error",
    "save_checkpoint",
    "load_checkpoint",
    "load_latest_valid",
]

_FORMAT = "hflmpi-checkpoint"
_FORMAT_VERSION = 1
_RUN_SUFFIXES = (".h5", ".hdf5")
_NUMERIC_KINDS = "biufc"


class CheckpointError(HflmpiError, RuntimeError):
    """A checkpoint could not be written, or no valid one could be read."""


class CheckpointNotFoundError(CheckpointError):
    """No checkpoint file exists at all (a fresh start, not a corruption)."""


class CheckpointFallbackWarning(UserWarning):
    """The newest checkpoint was unusable and the previous generation was loaded instead."""


@dataclass(frozen=True)
class Checkpoint:
    """A loaded, checksum-verified checkpoint.

    Attributes
    ----------
    path : Path
        The file it was read from.
    round : int
        The last completed global round.
    model : np.ndarray
        The flat model (float32 for torch bfloat16 input; see ``torch_dtypes``).
    extra_arrays : dict of str to np.ndarray
        Per-rank and other arrays, as saved.
    state : dict
        The JSON state, as saved.
    sha256 : str
        The verified checksum.
    torch_dtypes : dict of str to str
        Original torch dtype of each array saved from a tensor (``"model"`` or the extra's name).
    """

    path: Path
    round: int
    model: np.ndarray
    extra_arrays: dict[str, np.ndarray]
    state: dict[str, Any]
    sha256: str
    torch_dtypes: dict[str, str] = field(default_factory=dict)

    def tensor(self, name: str = "model") -> Any:
        """Return ``model`` or an extra array as a CPU torch tensor in its original torch dtype."""
        import torch

        array = self.model if name == "model" else self.extra_arrays[name]
        out = torch.from_numpy(np.array(array, copy=True))
        dtype_name = self.torch_dtypes.get(name)
        if dtype_name is not None:
            out = out.to(getattr(torch, dtype_name.removeprefix("torch.")))
        return out


# -- paths -----------------------------------------------------------------------------------------
def checkpoint_paths(run_path: str | os.PathLike[str]) -> tuple[Path, Path]:
    """Return ``(latest, previous)`` checkpoint paths of a run.

    ``run.h5`` (or ``run.hdf5``, or ``run``) gives ``run.ckpt.h5`` and ``run.ckpt.prev.h5``; a path
    that already ends in ``.ckpt.h5`` is taken as the latest checkpoint itself.
    """
    path = Path(run_path)
    if path.name.endswith(".ckpt.h5"):
        stem = path.name[: -len(".ckpt.h5")]
    elif path.suffix in _RUN_SUFFIXES:
        stem = path.stem
    else:
        stem = path.name
    return path.with_name(stem + ".ckpt.h5"), path.with_name(stem + ".ckpt.prev.h5")


def config_digest(config_toml: str) -> str:
    """Return the SHA-256 hex digest of a resolved config, for ``state["config_hash"]``."""
    return hashlib.sha256(config_toml.encode("utf-8")).hexdigest()


# -- conversion and checksum -----------------------------------------------------------------------
def _as_array(name: str, value: Any) -> tuple[np.ndarray, str | None]:
    """Return a C-contiguous little-endian numpy copy of ``value`` and its torch dtype, if any."""
    torch_dtype = None
    if type(value).__module__.startswith("torch"):
        import torch

        torch_dtype = str(value.dtype)
        tensor = value.detach().cpu()
        if tensor.dtype == torch.bfloat16:
            tensor = tensor.to(torch.float32)  # exact; numpy has no bfloat16
        value = tensor.numpy()
    array = np.asarray(value)
    if array.dtype.kind not in _NUMERIC_KINDS:
        raise TypeError(f"checkpoint array {name!r} has non-numeric dtype {array.dtype}")
    return np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")), torch_dtype


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(
        f"{type(value).__name__} is not JSON-serialisable; pass arrays in extra_arrays instead"
    )


def _state_json(state: Mapping[str, Any]) -> str:
    try:
        return json.dumps(dict(state), sort_keys=True, separators=(",", ":"), default=_json_default)
    except (TypeError, ValueError) as err:
        raise TypeError(f"checkpoint state is not JSON-serialisable: {err}") from err


def _digest(round_: int, state_json: str, arrays: Iterable[tuple[str, np.ndarray]]) -> str:
    """SHA-256 over the round, the state and each (name, dtype, shape, bytes), length-prefixed."""
    sha = hashlib.sha256(b"hflmpi-checkpoint-v1\0")

    def put(blob: bytes) -> None:
        sha.update(len(blob).to_bytes(8, "little"))
        sha.update(blob)

    put(int(round_).to_bytes(8, "little", signed=True))
    put(state_json.encode("utf-8"))
    for name, array in arrays:
        array = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
        put(name.encode("utf-8"))
        put(array.dtype.str.encode("ascii"))
        put(json.dumps(list(array.shape)).encode("ascii"))
        sha.update(int(array.nbytes).to_bytes(8, "little"))
        sha.update(array.reshape(-1).view(np.uint8).data)
    return sha.hexdigest()


# -- writing ---------------------------------------------------------------------------------------
def fsync_path(path: Path, *, directory: bool = False) -> None:
    """Flush ``path`` (a file, or with ``directory`` its entries) to the disk."""
    if directory and os.name == "nt":  # directories cannot be opened for fsync on Windows
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_file(
    tmp: Path,
    round_: int,
    state_json: str,
    digest: str,
    arrays: list[tuple[str, np.ndarray]],
    torch_dtypes: Mapping[str, str],
) -> None:
    with create_h5(tmp) as file:
        attrs = file.attrs
        attrs["format"] = _FORMAT
        attrs["format_version"] = _FORMAT_VERSION
        attrs["hflmpi_version"] = __version__
        attrs["round"] = int(round_)
        attrs["state_json"] = state_json
        attrs["sha256"] = digest
        attrs["created"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        extra = file.create_group("extra")
        for name, array in arrays:
            ds = file.create_dataset("model", data=array) if name == "model" else (
                extra.create_dataset(name, data=array)
            )
            if name in torch_dtypes:
                ds.attrs["torch_dtype"] = torch_dtypes[name]


def _looks_valid(path: Path) -> bool:
    """Cheap structural check (opens, has a checksum and a model); no full hash."""
    try:
        with h5py.File(path, "r", locking=False) as file:
            attrs = file.attrs
            return attrs.get("format") == _FORMAT and "sha256" in attrs and "model" in file
    except (OSError, RuntimeError, ValueError, KeyError):
        return False


def describe_os_error(err: BaseException) -> str:
    """Name the cause of a failed write on one line (disk full, file size limit, or the error)."""
    text = " ".join(str(err).split())  # HDF5's messages span lines
    if getattr(err, "errno", None) == errno.ENOSPC or "No space left" in text:
        return f"disk full (ENOSPC): {text}"
    if getattr(err, "errno", None) == errno.EFBIG or "File too large" in text:
        return f"file size limit reached (EFBIG): {text}"
    return f"{type(err).__name__}: {text}"


def save_checkpoint(
    path: str | os.PathLike[str],
    *,
    round: int,
    model_flat: Any,
    extra_arrays: Mapping[str, Any] | None = None,
    state: Mapping[str, Any] | None = None,
) -> Path:
    """Write a checkpoint atomically, keeping the previous one as ``<run>.ckpt.prev.h5``.

    Parameters
    ----------
    path : path-like
        The run file (``<run>.h5``) or the checkpoint itself (``<run>.ckpt.h5``); see
        :func:`checkpoint_paths`.
    round : int
        The last completed global round.
    model_flat : np.ndarray or torch.Tensor
        The flat (1-D) global model.
    extra_arrays : mapping of str to array, optional
        Further arrays, e.g. per-rank momentum stacked as ``[world_size, n]``. Names may not
        contain ``/``.
    state : mapping, optional
        JSON-serialisable state (round counter, RNG/optimizer summaries, config hash).

    Returns
    -------
    Path
        The checkpoint written.

    Raises
    ------
    CheckpointError
        If writing fails (e.g. disk full); the previous checkpoints are left untouched.
    """
    latest, previous = checkpoint_paths(path)
    tmp = latest.with_name(latest.name + ".tmp")
    model, model_torch = _as_array("model", model_flat)
    if model.ndim != 1:
        raise ValueError(f"model_flat must be 1-D (a flattened model); got shape {model.shape}")
    arrays = [("model", model)]
    torch_dtypes = {"model": model_torch} if model_torch else {}
    for name in sorted(extra_arrays or {}):
        if not name or "/" in name or name == "model":
            raise ValueError(f"extra array name {name!r} must be non-empty, not 'model', no '/'")
        array, torch_dtype = _as_array(name, (extra_arrays or {})[name])
        arrays.append((name, array))
        if torch_dtype:
            torch_dtypes[name] = torch_dtype
    state_json = _state_json(state or {})
    digest = _digest(round, state_json, arrays)

    try:
        _write_file(tmp, round, state_json, digest, arrays, torch_dtypes)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        if isinstance(err, (OSError, RuntimeError)):
            kept = [p.name for p in (latest, previous) if p.exists()]
            raise CheckpointError(
                f"could not write checkpoint {latest} (via {tmp.name}): {describe_os_error(err)}; "
                + (f"existing checkpoints left untouched: {', '.join(kept)}" if kept
                   else "no earlier checkpoint exists")
            ) from err
        raise
    try:
        if latest.exists() and _looks_valid(latest):
            os.replace(latest, previous)
        os.replace(tmp, latest)
        fsync_path(latest.parent, directory=True)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise CheckpointError(
            f"could not move checkpoint {tmp} into place as {latest}: {describe_os_error(err)}"
        ) from err
    return latest


# -- reading ---------------------------------------------------------------------------------------
def load_checkpoint(path: str | os.PathLike[str]) -> Checkpoint:
    """Read one checkpoint file and verify its checksum.

    Raises
    ------
    CheckpointNotFoundError
        If the file does not exist.
    CheckpointError
        If it is not a readable checkpoint (truncated, corrupt, wrong format) or the checksum
        does not match.
    """
    file_path = Path(path)
    if not file_path.exists():
        raise CheckpointNotFoundError(f"checkpoint {file_path} does not exist")
    try:
        with h5py.File(file_path, "r", locking=False) as file:
            attrs = file.attrs
            if attrs.get("format") != _FORMAT:
                raise CheckpointError(f"{file_path} is not an hflmpi checkpoint")
            round_ = int(attrs["round"])
            state_json = str(attrs["state_json"])
            stored = str(attrs["sha256"])
            model_ds = file["model"]
            model = model_ds[()]
            torch_dtypes = {}
            if "torch_dtype" in model_ds.attrs:
                torch_dtypes["model"] = str(model_ds.attrs["torch_dtype"])
            extra: dict[str, np.ndarray] = {}
            for name in sorted(file["extra"]):
                ds = file["extra"][name]
                extra[name] = ds[()]
                if "torch_dtype" in ds.attrs:
                    torch_dtypes[name] = str(ds.attrs["torch_dtype"])
    except CheckpointError:
        raise
    except (OSError, RuntimeError, KeyError, ValueError, TypeError) as err:
        raise CheckpointError(
            f"{file_path} is not readable (truncated or corrupt?): {type(err).__name__}: {err}"
        ) from err
    computed = _digest(round_, state_json, [("model", model), *extra.items()])
    if computed != stored:
        raise CheckpointError(
            f"{file_path} failed its checksum (stored sha256 {stored[:16]}..., "
            f"computed {computed[:16]}...): the file is corrupt"
        )
    return Checkpoint(
        path=file_path,
        round=round_,
        model=model,
        extra_arrays=extra,
        state=json.loads(state_json),
        sha256=stored,
        torch_dtypes=torch_dtypes,
    )


def load_latest_valid(run_path: str | os.PathLike[str]) -> Checkpoint:
    """Load the newest valid checkpoint of a run, falling back to the previous generation.

    Parameters
    ----------
    run_path : path-like
        The run file or its latest checkpoint path (see :func:`checkpoint_paths`).

    Warns
    -----
    CheckpointFallbackWarning
        When the newest checkpoint is missing or invalid and the previous one is used.

    Raises
    ------
    CheckpointNotFoundError
        If neither checkpoint file exists.
    CheckpointError
        If none is valid; the message lists each file tried and why it failed.
    """
    failures: list[tuple[Path, CheckpointError]] = []
    for candidate in checkpoint_paths(run_path):
        try:
            checkpoint = load_checkpoint(candidate)
        except CheckpointError as err:
            failures.append((candidate, err))
            continue
        if failures:
            newest, reason = failures[0]
            warnings.warn(
                f"newest checkpoint {newest} is unusable ({reason}); resuming from the previous "
                f"checkpoint {candidate} (round {checkpoint.round})",
                CheckpointFallbackWarning,
                stacklevel=2,
            )
        return checkpoint
    tried = "; ".join(f"{path}: {err}" for path, err in failures)
    if all(isinstance(err, CheckpointNotFoundError) for _, err in failures):
        raise CheckpointNotFoundError(f"no checkpoint found for {run_path}; tried {tried}")
    raise CheckpointError(f"no valid checkpoint for {run_path}; tried {tried}")
