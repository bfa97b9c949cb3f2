"""Load a run config: TOML file, ``--set`` overrides, validation; and write it back as TOML.

A run is described by a TOML file (read with the stdlib :mod:`tomllib`) plus command-line
overrides ``--set section.key=value``; ``to_toml_string`` writes the resolved config so that
:func:`load_config` reads it back unchanged.
"""

from __future__ import annotations

import dataclasses
import difflib
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from hflmpi.config.checks import _BARE_KEY, ConfigError, _fmt, _fmt_key, _thaw
from hflmpi.config.run_config import RunConfig
from hflmpi.config.sections import _SECTIONS

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10 needs the tomli backport
    import tomli as tomllib

__all__ = [
    "load_config",
    "parse_override",
    "apply_overrides",
    "config_from_dict",
    "config_to_dict",
    "to_toml_string",
]


def _unknown(kind: str, name: str, options: Sequence[str]) -> ConfigError:
    close = difflib.get_close_matches(name, options, n=1)
    hint = f"did you mean {close[0]}? " if close else ""
    return ConfigError(f"unknown {kind} {name}; {hint}valid: {', '.join(options)}")


def config_from_dict(data: Mapping[str, Any]) -> RunConfig:
    """Build and validate a :class:`RunConfig` from nested mappings (a parsed TOML document).

    Parameters
    ----------
    data : mapping
        ``{section: {key: value}}``; missing sections and keys take their defaults.

    Returns
    -------
    RunConfig

    Raises
    ------
    ConfigError
        On an unknown section or key, a wrong type, or a value out of range.
    """
    sections: dict[str, Any] = {}
    for name, table in data.items():
        if name not in _SECTIONS:
            if not isinstance(table, Mapping):
                raise ConfigError(
                    f"{name}={_fmt(table)} is a top-level key, but every setting belongs to a "
                    f"section; move it under one of [{'], ['.join(_SECTIONS)}]"
                )
            raise _unknown("section", f"[{name}]", [f"[{s}]" for s in _SECTIONS])
        if not isinstance(table, Mapping):
            raise ConfigError(f"{name}={_fmt(table)} must be a table [{name}] of keys, "
                              f"e.g. [{name}] followed by key = value lines")
        cls = _SECTIONS[name]
        keys = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
        for key in table:
            if key not in keys:
                raise _unknown("key", f"{name}.{key}", [f"{name}.{k}" for k in keys])
        sections[name] = cls(**table)
    return RunConfig(**sections)


def parse_override(text: str) -> tuple[tuple[str, ...], Any]:
    """Parse one ``--set`` override ``section.key=value`` into its key path and value.

    The value is read as a TOML value (``[5, 2]``, ``0.05``, ``true``, ``"x"``, ``{a = 1}``);
    anything that is not valid TOML is taken as a bare string (``data.name=mnist``).

    Parameters
    ----------
    text : str
        The override, e.g. ``"schedule.tau=[5,2]"``.

    Returns
    -------
    keys : tuple of str
        The dotted key split into parts, at least ``(section, key)``.
    value : Any
        The parsed value.
    """
    key, sep, raw = text.partition("=")
    parts = tuple(p.strip() for p in key.split("."))
    if not sep or len(parts) < 2 or not all(_BARE_KEY.match(p) for p in parts):
        raise ConfigError(
            f"--set {text!r} is not section.key=value; write e.g. --set optim.lr=0.05 "
            "or --set schedule.tau=[5,2]"
        )
    raw = raw.strip()
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return parts, value


def apply_overrides(data: Mapping[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Return a copy of the parsed TOML ``data`` with ``--set`` overrides merged in, in order.

    A string-valued setting keeps the override's raw text even when it parses as another TOML
    type, so ``--set run.out=2024`` names the file ``2024``.
    """
    merged: dict[str, Any] = _thaw(data)
    for text in overrides:
        parts, value = parse_override(text)
        cls = _SECTIONS.get(parts[0])
        if cls is not None and len(parts) == 2 and not isinstance(value, str):
            fields = dataclasses.fields(cls)  # type: ignore[arg-type]
            default = {f.name: f.default for f in fields}.get(parts[1])
            if isinstance(default, str) and not isinstance(value, (list, dict)):
                value = text.partition("=")[2].strip()
        node = merged
        for i, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                prefix = ".".join(parts[: i + 1])
                raise ConfigError(
                    f"--set {text}: {prefix}={_fmt(child)} is not a table, so it has no key "
                    f"{parts[i + 1]}; set {prefix}=VALUE instead"
                )
            node = child
        node[parts[-1]] = value
    return merged


def load_config(path: str | Path | None, overrides: Sequence[str] = ()) -> RunConfig:
    """Load a TOML run config, apply ``--set`` overrides, and validate everything.

    Parameters
    ----------
    path : str, Path or None
        The TOML file; None starts from the defaults.
    overrides : sequence of str
        ``section.key=value`` strings applied after the file, left to right.

    Returns
    -------
    RunConfig

    Raises
    ------
    ConfigError
        If the file is missing or not TOML, or any value is invalid.
    """
    data: dict[str, Any] = {}
    if path is not None:
        try:
            data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist; check the path, or start "
                              "from an example: hflmpi run --example NAME, hflmpi init DIR") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"config file {path} cannot be read ({exc})") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    return config_from_dict(apply_overrides(data, overrides))


def config_to_dict(config: RunConfig) -> dict[str, dict[str, Any]]:
    """Return the config as plain nested dicts and lists (unset keys left out), e.g. for HDF5.

    ``config_from_dict(config_to_dict(c)) == c`` for every valid config ``c``.
    """
    out: dict[str, dict[str, Any]] = {}
    for name in _SECTIONS:
        section = getattr(config, name)
        out[name] = {
            f.name: _thaw(getattr(section, f.name))
            for f in dataclasses.fields(section)
            if getattr(section, f.name) is not None
        }
    return out


def to_toml_string(config: RunConfig) -> str:
    """Return the resolved config as TOML text that :func:`load_config` reads back unchanged."""
    lines = ["# hflmpi resolved run config"]
    for name, table in config_to_dict(config).items():
        lines.append("")
        lines.append(f"[{name}]")
        lines.extend(f"{_fmt_key(key)} = {_fmt(value)}" for key, value in table.items())
    return "\n".join(lines) + "\n"
