"""The run file's life cycle on rank 0: start it, continue it, check a resume, rebuild it (no MPI).

* :func:`load_checked`: load the newest valid checkpoint and check that it may continue under the
  given config (world size, config hash, the keys a resume may change, tree depth).
* :func:`open_record`: create the run file, or append to it when resuming; a run file that is
  missing or unreadable (say truncated by a crash) is set aside, never deleted, and rebuilt at
  the checkpoint's round; with ``replace_unfinished`` a run file that has no checkpoint is
  replaced (a requeued job that was killed before its first checkpoint); with ``overwrite`` the
  old run's files are set aside (:mod:`hflmpi.record.replace`).
* :func:`config_from_run`: the config a ``--resume RUN.h5`` without CONFIG continues under, from
  the run file or, when it is lost, from a checkpoint; never imports a model module it names.
"""

from __future__ import annotations

import logging
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from hflmpi import __version__
from hflmpi.config import ConfigError, RunConfig, to_toml_string
from hflmpi.core.topology import TreePlan
from hflmpi.learn.data import TensorDataset
from hflmpi.learn.partition import partition_stats
from hflmpi.record.checkpoint import (
    Checkpoint,
    CheckpointError,
    CheckpointFallbackWarning,
    checkpoint_paths,
    config_digest,
    describe_os_error,
    load_latest_valid,
)
from hflmpi.record.marker import clear_marker
from hflmpi.record.reading import read_config_toml, read_run_info
from hflmpi.record.replace import set_aside
from hflmpi.record.resume import (
    ALLOW_FLAG,
    FREE_KEYS,
    ConfigChange,
    check_checkpoint_config,
    check_config_change,
    check_untrusted_imports,
    stored_config,
)
from hflmpi.record.store import RunRecord

__all__ = [
    "ConfigUpdate",
    "load_checked",
    "check_model_size",
    "open_record",
    "close_record",
    "record_error",
    "has_checkpoint",
    "config_from_run",
]

_log = logging.getLogger(__name__)  # notices; the command line shows them on stderr


@dataclass(frozen=True)
class ConfigUpdate:
    """Rank 0's note for the run file: the config a resume continues under, and what changed."""

    stored_toml: str
    changes: list[ConfigChange]


def load_checked(
    resume: Path, config: RunConfig, world_size: int, depth: int, allow_change: bool
) -> tuple[Checkpoint, ConfigUpdate]:
    """Load the newest valid checkpoint of ``resume`` and check it may continue as ``config``.

    Rank 0 only. Checks, in order: the world size; that the checkpoint was written under a config
    the run file records; the changes from the stored config
    (:func:`hflmpi.record.resume.check_config_change`); the tree depth (the metric columns). A run
    file that cannot be read is checked against the config the checkpoint stores instead (it is
    rebuilt by :func:`open_record`).
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", CheckpointFallbackWarning)
        checkpoint = load_latest_valid(resume)
    for warning in caught:
        _log.warning("hflmpi: warning: %s", warning.message)
    saved = int(checkpoint.state.get("world_size", world_size))
    if saved != world_size:  # partition, batch positions and momentum are per rank
        raise ValueError(
            f"{checkpoint.path} was written by {saved} ranks but this run has "
            f"{world_size}; resume with mpiexec -n {saved}"
        )
    info: dict[str, Any] | None
    try:
        info, text = read_run_info(resume), read_config_toml(resume)
    except (OSError, KeyError, ValueError):
        info, stored = None, checkpoint.state.get("config_toml")
        if not isinstance(stored, str):
            raise ValueError(f"{resume} cannot be read and {checkpoint.path} stores no config; "
                             "resume with the CONFIG.toml of the run") from None
        text = stored
    if info is not None:
        check_checkpoint_config(checkpoint.state, info, checkpoint_path=str(checkpoint.path),
                                run_path=str(resume))
    changes = check_config_change(stored_config(text, str(resume)), config, run_path=str(resume),
                                  allow_change=allow_change, checkpoint_round=checkpoint.round)
    layers = int(info.get("layer_count", depth)) if info is not None else depth
    if layers != depth:  # same config, other hosts: topology.nodes found another node count
        raise ConfigError(
            f"--resume {resume}: the run file has {layers} aggregation layers but the tree "
            f"planned for this job has {depth} ({config.topology.describe_depth()}); resume on "
            "the same layout of nodes and ranks"
        )
    return checkpoint, ConfigUpdate(text, changes)


def check_model_size(checkpoint: Checkpoint | None, numel: int, config: RunConfig) -> None:
    """Refuse a model whose size the checkpoint does not hold (rank 0, which holds it)."""
    if checkpoint is None:  # not rank 0
        return
    stored = int(np.asarray(checkpoint.model).size)
    if stored != numel:
        raise ValueError(
            f"the checkpoint holds a model of {stored} parameters but model.name="
            f"{config.model.name!r} builds one of {numel} for this data; resume with the model "
            "(and its code) the run was started with"
        )


def open_record(
    config: RunConfig, world_size: int, plan: TreePlan, path: Path, *, resuming: bool,
    last_round: int, parts: list[np.ndarray], train_set: TensorDataset,
    update: ConfigUpdate | None = None, allow_change: bool = False,
    replace_unfinished: bool = False, overwrite: bool = False,
    provenance: Mapping[str, Any] | None = None,
) -> RunRecord:
    """Open the run file on rank 0: append to it when resuming, else create it.

    Either way the run is starting: a preemption marker left by the previous leg is removed, and
    ``provenance`` (:func:`hflmpi.record.provenance.provenance`) is appended as a new leg.
    Starting afresh with ``overwrite``, the files of a run at ``path`` are set aside first
    (:func:`hflmpi.record.replace.set_aside`).
    """
    clear_marker(path)
    if not resuming:
        if overwrite:
            set_aside(path)
        replace = replace_unfinished and path.exists() and _unfinished(path)
        record = _new_record(config, world_size, plan, path, parts, train_set, overwrite=replace)
    else:
        record = _reopen(config, world_size, plan, path, parts, train_set, last_round, update,
                         allow_change)
    if provenance is not None:
        try:
            record.add_provenance(provenance, first_round=last_round + 1)
        except BaseException:
            record.close()
            raise
    return record


def record_error(doing: str, record_path: Path, exc: BaseException) -> str:
    """Return the one-line error of a failed write to the run file, e.g. ``doing="closing"``."""
    return f"{doing} the run record {record_path} failed: {describe_os_error(exc)}"


def close_record(record: RunRecord | None, record_path: Path) -> str | None:
    """Close the run file (rank 0); return what went wrong instead of raising (e.g. a full disk)."""
    if record is None:
        return None
    try:
        record.close()
    except (OSError, RuntimeError) as exc:
        return record_error("closing", record_path, exc)
    return None


def _reopen(
    config: RunConfig, world_size: int, plan: TreePlan, path: Path, parts: list[np.ndarray],
    train_set: TensorDataset, last_round: int, update: ConfigUpdate | None, allow_change: bool,
) -> RunRecord:
    try:
        record = RunRecord.open_append(path)
        note = None
    except (OSError, ValueError) as exc:
        note = _set_aside_unreadable(path, exc, last_round)
        record = _new_record(config, world_size, plan, path, parts, train_set, overwrite=False)
    record.truncate_to(last_round, note=note)
    text = to_toml_string(config)
    if update is not None and text != update.stored_toml:
        # The stored config must stay the one the run continues under; the history keeps the
        # previous hash so the checkpoints written before this resume still match the file.
        record.replace_config(text, {
            "round": last_round,
            "changes": {c.key: {"stored": c.stored, "given": c.given} for c in update.changes},
            "allowed_by": ALLOW_FLAG if allow_change and any(
                c.key not in FREE_KEYS for c in update.changes) else "free keys",
            "previous_config_sha256": config_digest(update.stored_toml),
            "config_sha256": config_digest(text),
        })
    return record


def _unfinished(path: Path) -> bool:
    """Tell whether the run file at ``path`` (which has no checkpoint) may be overwritten."""
    try:
        RunRecord.open_append(path).close()
        overwrite = True  # its rows were never checkpointed: a resume would drop them too
    except (OSError, ValueError) as exc:  # e.g. empty: killed while the file was created
        _set_aside_unreadable(path, exc, None)
        overwrite = False
    _log.warning("hflmpi: %s has no checkpoint (the run stopped before its first one): starting "
                 "it afresh", path)
    return overwrite


def _new_record(
    config: RunConfig, world_size: int, plan: TreePlan, path: Path, parts: list[np.ndarray],
    train_set: TensorDataset, overwrite: bool,
) -> RunRecord:
    path.parent.mkdir(parents=True, exist_ok=True)
    meta: dict[str, Any] = {"world_size": world_size, "tree": plan.describe(),
                            "hflmpi_version": __version__}
    if config.privacy.layer:
        meta["dp_noise"] = ("INSECURE: keyed by run.seed (privacy.insecure_reproducible_noise)"
                            if config.privacy.insecure_reproducible_noise
                            else "os.urandom (CSPRNG, not stored, not reproducible)")
    record = RunRecord.create(path, to_toml_string(config), meta, layer_count=plan.depth,
                              overwrite=overwrite)
    stats = partition_stats(parts, train_set.labels.cpu().numpy(), train_set.num_classes)
    record.write_partition(stats.sizes, stats.histograms)
    return record


def _set_aside_unreadable(path: Path, error: BaseException, last_round: int | None) -> str | None:
    """Move an unusable run file out of the way (never delete it); return a resume-log note."""
    if not path.exists():
        return f"run record {path.name} was missing; rebuilt from the round-{last_round} checkpoint"
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    aside = path.with_name(f"{path.name}.unusable-{stamp}")
    os.replace(path, aside)
    reason = describe_os_error(error)
    if last_round is None:
        _log.warning("hflmpi: warning: %s is not a usable run record (%s); moved it to %s", path,
                     reason, aside.name)
        return None
    note = (f"run record was unusable ({reason}); moved to {aside.name} and rebuilt from the "
            f"round-{last_round} checkpoint: metrics of rounds 1..{last_round} are only there")
    _log.warning("hflmpi: warning: %s: %s", path, note)
    return note


def has_checkpoint(run_path: Path) -> bool:
    """Tell whether the run has a checkpoint file to resume from (its run file may be lost)."""
    return any(path.exists() for path in checkpoint_paths(run_path))


def config_from_run(path: Path, overrides: Sequence[str]) -> RunConfig:
    """Return the config stored for run ``path`` with ``--set`` overrides (every rank reads it).

    From the run file, or from its newest valid checkpoint when the run file is lost or broken.
    The run file is data, not code: an import-path ``model.name`` it stores is refused unless
    the command line names it again (:func:`hflmpi.record.resume.check_untrusted_imports`).
    """
    text: str | None
    try:
        text = read_config_toml(path)
    except (OSError, KeyError, ValueError) as exc:
        text = _config_from_checkpoint(path)
        if text is None:
            raise ConfigError(f"--resume {path}: cannot read the stored config ({exc}) and no "
                              "valid checkpoint holds one; give the CONFIG.toml too") from None
    config = stored_config(text, str(path), overrides)
    check_untrusted_imports(config, overrides, str(path))
    return config


def _config_from_checkpoint(path: Path) -> str | None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CheckpointFallbackWarning)
        try:
            text = load_latest_valid(path).state.get("config_toml")
        except CheckpointError:
            return None
    return text if isinstance(text, str) else None
