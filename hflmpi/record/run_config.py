"""Read the resolved config a run file stores, as a validated :class:`~hflmpi.config.RunConfig`.

Every run file stores the config it runs under as TOML text (the ``config_toml`` attribute, see
:mod:`hflmpi.record.store`). :func:`read_run_config` is the one reader of it: ``hflmpi report``,
``hflmpi plan --from-run``, the experiment results writer and ``hflmpi run --resume RUN.h5`` all
go through it (or, holding the text already, through :func:`parse_stored_config`), so a stored
config is validated the same way everywhere and a file without one gets the same message.

Nothing is imported here: an import-path ``model.name`` is only checked as a string (see
:func:`hflmpi.record.resume.check_untrusted_imports` before building the model).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from hflmpi.config import ConfigError, RunConfig, apply_overrides, config_from_dict
from hflmpi.record.reading import read_config_toml

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10 needs the tomli backport
    import tomli as tomllib

__all__ = ["read_run_config", "parse_stored_config"]


def parse_stored_config(text: str, where: str, overrides: Sequence[str] = ()) -> RunConfig:
    """Return the validated config of a stored TOML ``text``, with ``--set`` overrides applied.

    Parameters
    ----------
    text : str
        The stored config (TOML).
    where : str
        What the text came from, starting every message, e.g. ``"runs/a.h5"`` or
        ``"--resume runs/a.h5"``.
    overrides : sequence of str
        ``section.key=value`` strings applied after the stored config, left to right.

    Raises
    ------
    ConfigError
        If the text is not TOML, or the config (with the overrides) is not valid.
    """
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{where}: the stored config is not valid TOML: {exc}") from None
    try:
        return config_from_dict(apply_overrides(data, overrides))
    except ConfigError as exc:
        with_overrides = " with the --set overrides" if overrides else ""
        raise ConfigError(f"{where}: the stored config{with_overrides} is not valid: "
                          f"{exc}") from None


def read_run_config(
    path: str | os.PathLike[str], overrides: Sequence[str] = ()
) -> RunConfig:
    """Return the validated config stored in run file ``path``, with ``--set`` overrides applied.

    Parameters
    ----------
    path : str or PathLike
        An hflmpi run file (HDF5).
    overrides : sequence of str
        ``section.key=value`` strings applied after the stored config, left to right.

    Returns
    -------
    RunConfig

    Raises
    ------
    FileNotFoundError, OSError
        If the file does not exist or is not readable HDF5.
    ConfigError
        If the file stores no config (not an hflmpi run file, e.g. a checkpoint), or the stored
        config is not valid TOML or not a valid config.
    """
    try:
        text = read_config_toml(path)
    except ValueError as exc:  # no config_toml attribute: the message names the file and why
        raise ConfigError(str(exc)) from None
    return parse_stored_config(text, os.fspath(path), overrides)
