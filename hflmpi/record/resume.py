"""What a resumed run may change, and the checks that a run file and its checkpoint belong together.

A run file stores the resolved config it was started with (``config_toml``); each checkpoint
stores the SHA-256 of the config it was written under (``state["config_sha256"]``). Resuming
compares three things before any data is loaded or any model code is imported:

1. the checkpoint's config hash against the run file's config (or a config the run file records
   it had before, in ``config_history``): a checkpoint of another run, or an edited run file, is
   refused;
2. the config of the resumed run against the stored one, key by key:

   * :data:`FREE_KEYS` (how long the run goes and what it reports, not what it computes) may
     change freely;
   * keys that decide the shape of what the checkpoint holds (:data:`FIXED_KEYS`: the model, the
     tree, the features and classes of the data; and the privacy accounting) never change;
   * every other key changes only when the user says so (``--allow-config-change``);

3. that the stored config does not make hflmpi import code: an import path read from a run file
   (``model.name``, ``data.name``, ``run.callbacks``) is only imported when the user names it
   again (:func:`check_untrusted_imports`).

Whatever changed is written to the run file (``config_toml`` becomes the config the run continues
under, and an entry in ``config_history`` lists the changes), so the stored config stays true.
Pure functions, no MPI; the caller runs them on rank 0 and shares the verdict.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from hflmpi.config import (
    BUILTIN_MODELS,
    ConfigError,
    RunConfig,
    config_to_dict,
    parse_override,
)
from hflmpi.config import (
    format_value as _fmt,
)
from hflmpi.core.strategy import is_import_path
from hflmpi.record.checkpoint import config_digest
from hflmpi.record.run_config import parse_stored_config

__all__ = [
    "ALLOW_FLAG",
    "FREE_KEYS",
    "FIXED_KEYS",
    "ConfigChange",
    "config_changes",
    "check_config_change",
    "check_checkpoint_config",
    "check_untrusted_imports",
    "stored_config",
]

ALLOW_FLAG = "--allow-config-change"

FREE_KEYS = (
    "run.rounds",
    "run.out",
    "run.progress",
    "run.eval_every",
    "run.checkpoint_every",
    "run.divergence",
    "run.watchdog_seconds",
    "run.callbacks",
    "run.name",
)
"""Keys a resume may change without asking: they say how long the run goes, where it is
reported and what is measured, never what is computed (``run.rounds`` also stretches a cosine
``lr_schedule`` over the new total)."""

FIXED_KEYS = (
    "model.",
    "topology.",
    "clients.count",
    "data.name",
    "data.synthetic_features",
    "data.synthetic_classes",
    "privacy.",
)
"""Keys (or ``section.`` prefixes) a resume can never change, even with ``--allow-config-change``:
the checkpoint and the run file hold a model, a tree (per-layer metric columns) and a data split
of the stored shape, and the privacy guarantee is accounted over the whole run."""


@dataclass(frozen=True)
class ConfigChange:
    """One key whose value differs; values are TOML text (``"(unset)"`` when left out)."""

    key: str
    stored: str
    given: str

    def __str__(self) -> str:
        return f"{self.key}: stored {self.stored}, given {self.given}"


def config_changes(stored: RunConfig, given: RunConfig) -> list[ConfigChange]:
    """Return every ``section.key`` whose value differs between two configs, in section order."""
    old, new = config_to_dict(stored), config_to_dict(given)
    changes = []
    for section in old:
        keys = list(old[section]) + [k for k in new[section] if k not in old[section]]
        for key in keys:
            a, b = old[section].get(key), new[section].get(key)
            if a != b:
                changes.append(ConfigChange(f"{section}.{key}", _fmt(a), _fmt(b)))
    return changes


def _fixed(key: str) -> bool:
    return any(key == k or (k.endswith(".") and key.startswith(k)) for k in FIXED_KEYS)


def check_config_change(
    stored: RunConfig, given: RunConfig, *, run_path: str, allow_change: bool,
    checkpoint_round: int,
) -> list[ConfigChange]:
    """Return the changes a resume of ``run_path`` makes to its stored config, or refuse them.

    Parameters
    ----------
    stored : RunConfig
        The config stored in the run file.
    given : RunConfig
        The config the resumed run would continue under.
    run_path : str
        The run file, for messages.
    allow_change : bool
        The user passed ``--allow-config-change``: keys outside :data:`FREE_KEYS` (but not
        :data:`FIXED_KEYS`) may change.
    checkpoint_round : int
        The round the run resumes after; ``run.rounds`` must not be below it.

    Returns
    -------
    list of ConfigChange
        Every differing key (all allowed), to record in the run file.

    Raises
    ------
    ConfigError
        Naming each refused key with its stored and given value, and the fix.
    """
    if given.run.rounds < checkpoint_round:
        raise ConfigError(
            f"--resume {run_path}: run.rounds={given.run.rounds} but the checkpoint is at round "
            f"{checkpoint_round}; give run.rounds >= {checkpoint_round}, e.g. --set "
            f"run.rounds={max(checkpoint_round, stored.run.rounds)}"
        )
    changes = config_changes(stored, given)
    fixed = [c for c in changes if _fixed(c.key)]
    if fixed:
        raise ConfigError(
            f"--resume {run_path}: {'; '.join(map(str, fixed))}: "
            f"{'this key' if len(fixed) == 1 else 'these keys'} cannot change on resume, not even "
            f"with {ALLOW_FLAG}: the checkpoint holds a model, a tree and a data split of the "
            "stored shape (and DP is accounted over the whole run); resume with the stored "
            f"values, or start a new run with another run.out"
        )
    asked = [c for c in changes if c.key not in FREE_KEYS]
    if asked and not allow_change:
        raise ConfigError(
            f"--resume {run_path}: the config differs from the one stored in the run file: "
            f"{'; '.join(map(str, asked))}. Only {', '.join(FREE_KEYS)} may change on resume "
            f"as they are. To continue the stored run, drop these changes (or resume without "
            f"a CONFIG: hflmpi run --resume {run_path}); to change them on purpose, add "
            f"{ALLOW_FLAG} (the changes are recorded in the run file)"
        )
    return changes


def check_checkpoint_config(
    state: Mapping[str, Any], run_info: Mapping[str, Any], *, checkpoint_path: str, run_path: str,
) -> None:
    """Refuse a checkpoint that was not written under a config the run file records.

    Accepted: the hash of the run file's ``config_toml``, or the hash a ``config_history`` entry
    says the run had before a recorded change (a checkpoint from before a resume that changed the
    config, e.g. when the job stopped again before its next checkpoint).

    Raises
    ------
    ConfigError
        On a missing or unknown hash, with the differing keys when the checkpoint stores its
        config text.
    """
    text = str(run_info.get("config_toml", ""))
    known = {config_digest(text)}
    for entry in run_info.get("config_history") or []:
        if isinstance(entry, Mapping) and isinstance(entry.get("previous_config_sha256"), str):
            known.add(entry["previous_config_sha256"])
    found = state.get("config_sha256")
    if isinstance(found, str) and found in known:
        return
    detail = ""
    theirs = state.get("config_toml")
    if isinstance(theirs, str):
        try:
            diff = config_changes(_parse(text, run_path), _parse(theirs, checkpoint_path))
            detail = " (" + "; ".join(
                f"{c.key}: run file {c.stored}, checkpoint {c.given}" for c in diff) + ")"
        except ConfigError:
            pass
    what = "has no config hash" if not isinstance(found, str) else (
        f"was written under a config (sha256 {found[:12]}...) that {run_path} does not record")
    raise ConfigError(
        f"--resume {run_path}: the checkpoint {checkpoint_path} {what}{detail}: it belongs to "
        "another run, or one of the files was edited; resume with the run file the checkpoint "
        "was written with (or start a new run)"
    )


def _parse(text: str, where: str) -> RunConfig:
    return parse_stored_config(text, where)


def stored_config(text: str, run_path: str, overrides: Sequence[str] = ()) -> RunConfig:
    """Return the config stored in a run file (TOML ``text``) with ``--set`` overrides applied.

    For the text already read (to hash it, too); from a path use
    :func:`hflmpi.record.run_config.read_run_config`. Nothing is imported: an import-path
    ``model.name`` is only validated as a string here (see :func:`check_untrusted_imports` before
    building the model).
    """
    return parse_stored_config(text, f"--resume {run_path}", overrides)


def check_untrusted_imports(config: RunConfig, overrides: Sequence[str], run_path: str) -> None:
    """Refuse to import code that only a run file names (model, data, callbacks, plug-in rules).

    The import paths are ``model.name``, ``data.name``, ``run.callbacks`` and plug-in rules in
    ``aggregation.robust``. A run file is data (it can come from anyone); importing ``package.module`` runs that
    module's code on every rank. So when the config is read back from a run file, each import
    path must be given again on the command line (``--set model.name=...``,
    ``--set aggregation.robust=[...]``, or the CONFIG); ``--set run.callbacks=[]`` drops stored
    callbacks.
    """
    named = set()
    for text in overrides:
        try:
            named.add(parse_override(text)[0])
        except ConfigError:
            continue
    stored = [(key, value) for key, value, imports in (
        ("model.name", config.model.name, config.model.name not in BUILTIN_MODELS),
        ("data.name", config.data.name, ":" in config.data.name),
        ("run.callbacks", list(config.run.callbacks), bool(config.run.callbacks)),
        ("aggregation.robust", list(config.aggregation.robust),
         any(is_import_path(r) for r in config.aggregation.robust)),
    ) if imports and tuple(key.split(".")) not in named]
    if not stored:
        return
    given = " and ".join(f"{key}={_fmt(value)}" for key, value in stored)
    fix = " ".join(f"--set {key}={_fmt(value)}" for key, value in stored)
    raise ConfigError(
        f"--resume {run_path}: the stored config names {given}, "
        f"{'an import path' if len(stored) == 1 else 'import paths'}; hflmpi never imports code "
        f"named by a run file (it may come from anyone). If you trust it, name it yourself: {fix} "
        "(or pass your CONFIG.toml)"
    )
