"""Field checks and value formatting shared by every config section.

Each check takes a raw value (from TOML or ``--set``) and returns the normalised value or raises
:class:`_Invalid`, whose ``constraint`` completes the message ``key=value ...``; the section that
owns the key turns it into a :class:`ConfigError` naming the key, the value, the constraint and
a fix. Values print in TOML syntax (:func:`format_value`), so a fix can be pasted back into a file
or ``--set``.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import field
from typing import Any, ClassVar

from hflmpi.errors import HflmpiError

__all__ = [
    "ConfigError",
    "BUILTIN_MODELS",
    "MAX_LR",
    "MAX_ROUNDS",
    "MAX_STEPS_PER_ROUND",
    "format_value",
]

BUILTIN_MODELS = ("mlp", "logreg", "cnn")
BUILTIN_DATASETS = ("digits", "mnist", "fashion_mnist", "cifar10", "synthetic")

MAX_LR = 1000.0
"""Largest accepted ``optim.lr``: an SGD step that large only diverges (published SGD learning
rates, large-batch ones included, stay below ~50), so a bigger value is a typo such as ``1e30``."""
MAX_ROUNDS = 10**7
"""Largest accepted ``run.rounds``."""
MAX_STEPS_PER_ROUND = 10**8
"""Largest accepted ``prod(schedule.tau)``: a global round is the unit of checkpoints, metrics and
evaluation, and 10**8 local steps already take days at a millisecond a step. With
:data:`MAX_ROUNDS` the global step counter ``rounds * prod(tau)`` stays below 10**15, exact in
float64 and far inside int64 (it keys the quantization and DP random streams)."""
_IMPORT_PATH = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")
_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


class ConfigError(HflmpiError, ValueError):
    """A configuration value is unknown, of the wrong type or out of range."""


class _Invalid(Exception):
    """Raised by a field check: ``constraint`` completes ``key=value ...``; ``fix`` is optional."""

    def __init__(self, constraint: str, fix: str | None = None) -> None:
        super().__init__(constraint)
        self.constraint = constraint
        self.fix = fix


# --------------------------------------------------------------------------------------------
# Value formatting (TOML syntax, so a message's fix can be pasted back into a file or --set)


def _fmt(value: Any) -> str:
    if value is None:
        return "(unset)"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_fmt(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{_fmt_key(str(k))} = {_fmt(v)}" for k, v in value.items()) + "}"
    return repr(value)


def format_value(value: Any) -> str:
    """Return ``value`` in TOML syntax, as every config message prints it (None: ``(unset)``)."""
    return _fmt(value)


def _fmt_key(key: str) -> str:
    return key if _BARE_KEY.match(key) else json.dumps(key, ensure_ascii=False)


def _type_name(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a float"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, Mapping):
        return "a table"
    return f"a {type(value).__name__}"


# --------------------------------------------------------------------------------------------
# Field checks: each takes the raw value and returns the normalised one or raises _Invalid.

_Check = Callable[[Any], Any]


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(float(x))


def _bounds_text(lo: float | None, hi: float | None, lo_open: bool, hi_open: bool) -> str:
    parts = []
    if lo is not None:
        parts.append(f"{'>' if lo_open else '>='} {_num(lo)}")
    if hi is not None:
        parts.append(f"{'<' if hi_open else '<='} {_num(hi)}")
    return " and ".join(parts)


def _in_bounds(x: float, lo: float | None, hi: float | None, lo_open: bool, hi_open: bool) -> bool:
    if lo is not None and (x <= lo if lo_open else x < lo):
        return False
    return not (hi is not None and (x >= hi if hi_open else x > hi))


def _int(lo: int | None = None, hi: int | None = None) -> _Check:
    bounds = _bounds_text(lo, hi, False, False)
    what = "an integer" + (" " + bounds if bounds else "")

    def check(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _Invalid(f"is {_type_name(value)} but must be {what}")
        if not _in_bounds(value, lo, hi, False, False):
            raise _Invalid(f"must be {what}")
        return int(value)

    return check


def _float(
    lo: float | None = None,
    hi: float | None = None,
    *,
    lo_open: bool = False,
    hi_open: bool = False,
    why: str = "",
) -> _Check:
    bounds = _bounds_text(lo, hi, lo_open, hi_open)
    what = "a number" + (" " + bounds if bounds else "")
    because = f" ({why})" if why else ""

    def check(value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _Invalid(f"is {_type_name(value)} but must be {what}")
        try:
            x = float(value)
        except OverflowError:  # an integer beyond float range
            raise _Invalid(f"must be a finite number{' ' + bounds if bounds else ''}"
                           f"{because if hi is not None and value > 0 else ''}") from None
        above = hi is not None and x > hi  # +inf included
        if not math.isfinite(x):  # nan and +-inf: no setting means "unbounded" by infinity
            raise _Invalid(f"must be a finite number{' ' + bounds if bounds else ''}"
                           f"{because if above else ''}")
        if not _in_bounds(x, lo, hi, lo_open, hi_open):
            raise _Invalid(f"must be {what}{because if above else ''}")
        return x

    return check


def _bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise _Invalid(f"is {_type_name(value)} but must be a boolean (true or false)")
    return value


def _str(value: Any) -> str:
    if not isinstance(value, str):
        raise _Invalid(f"is {_type_name(value)} but must be a string")
    return value


def _nonempty_str(value: Any) -> str:
    text = _str(value)
    if not text.strip():
        raise _Invalid("must be a non-empty string")
    return text


def _choice(*options: str) -> _Check:
    listed = ", ".join(_fmt(o) for o in options)

    def check(value: Any) -> str:
        if not isinstance(value, str):
            raise _Invalid(f"is {_type_name(value)} but must be one of {listed}")
        if value not in options:
            close = difflib.get_close_matches(value, options, n=1)
            fix = f"did you mean {_fmt(close[0])}?" if close else None
            raise _Invalid(f"must be one of {listed}", fix)
        return value

    return check


def _int_list(lo: int, *, hi: int | None = None, allow_empty: bool = False) -> _Check:
    bound = _bounds_text(lo, hi, False, False)

    def check(value: Any) -> tuple[int, ...]:
        if not isinstance(value, (list, tuple)):
            raise _Invalid(f"is {_type_name(value)} but must be a list of integers {bound}")
        if not value and not allow_empty:
            raise _Invalid(f"is empty but must be a non-empty list of integers {bound}")
        for i, item in enumerate(value):
            if isinstance(item, bool) or not isinstance(item, int):
                raise _Invalid(f"has entry [{i}] = {_fmt(item)}, {_type_name(item)}; "
                               f"every entry must be an integer {bound}")
            if not _in_bounds(item, lo, hi, False, False):
                raise _Invalid(f"has entry [{i}] = {item}; every entry must be an integer {bound}")
        return tuple(int(v) for v in value)

    return check


def _choice_list(*options: str, import_paths: bool = False) -> _Check:
    """Check a per-layer list of names; with ``import_paths`` also "package.module:Name"."""
    listed = "one of " + ", ".join(repr(o) for o in options) + (
        ' or an import path "package.module:Name"' if import_paths else "")

    def check(value: Any) -> tuple[str, ...]:
        if not isinstance(value, (list, tuple)):
            raise _Invalid(f"is {_type_name(value)} but must be a list of strings, one per layer")
        for i, item in enumerate(value):
            path = import_paths and isinstance(item, str) and bool(_IMPORT_PATH.match(item))
            if item not in options and not path:
                raise _Invalid(f"has entry [{i}] = {_fmt(item)}; each entry must be {listed}")
        return tuple(value)

    return check


def _bool_list(value: Any) -> tuple[bool, ...]:
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, bool) for v in value):
        raise _Invalid(f"is {_fmt(value)} but must be a list of true/false, one per layer")
    return tuple(value)


def _optional(check: _Check) -> _Check:
    def wrapped(value: Any) -> Any:
        return None if value is None else check(value)

    return wrapped


def _table(value: Any) -> dict[str, Any]:
    if not isinstance(value, Mapping):
        raise _Invalid(f"is {_type_name(value)} but must be a table, e.g. {{width = 64}}")
    for key in value:
        if not isinstance(key, str):
            raise _Invalid(f"has key {key!r}; table keys must be strings")
    return _thaw(dict(value))


def _groups(value: Any) -> tuple[Any, ...]:
    seen: set[int] = set()

    def walk(node: Any, path: str) -> tuple[int, Any]:
        if isinstance(node, bool) or not isinstance(node, (int, list, tuple)):
            raise _Invalid(
                f"has {path} = {_fmt(node)}, neither a rank (integer) nor a list of groups"
            )
        if isinstance(node, int):
            if node < 0:
                raise _Invalid(f"has rank {node} at {path}; ranks are integers >= 0")
            if node in seen:
                raise _Invalid(f"lists rank {node} twice", "list every rank exactly once")
            seen.add(node)
            return 0, node
        if not node:
            raise _Invalid(f"has an empty group at {path}", "every group needs >= 1 member")
        results = [walk(child, f"{path}[{i}]") for i, child in enumerate(node)]
        depths = sorted({d for d, _ in results})
        if len(depths) != 1:
            raise _Invalid(
                f"mixes ranks and groups at different depths at {path or 'the top level'}",
                "put every rank at the same depth: wrap a lone rank in its own group, e.g. "
                "[[0, 1], [2]] instead of [[0, 1], 2]",
            )
        return depths[0] + 1, tuple(n for _, n in results)

    if not isinstance(value, (list, tuple)):
        raise _Invalid(f"is {_type_name(value)} but must be a (nested) list of ranks")
    return walk(value, "")[1]


def _builtin_or_import_path(builtins: Sequence[str], key: str, form: str, example: str) -> _Check:
    """Check a name that is one of ``builtins`` or an import path ``"package.module:name"``."""
    listed = ", ".join(_fmt(m) for m in builtins)

    def check(value: Any) -> str:
        if not isinstance(value, str):
            raise _Invalid(f"is {_type_name(value)} but must be a string")
        if value in builtins or _IMPORT_PATH.match(value):
            return value
        close = difflib.get_close_matches(value, builtins, n=1)
        fix = (f"did you mean {_fmt(close[0])}?" if close
               else f"e.g. {key}={_fmt(builtins[0])} or {_fmt(example)}")
        raise _Invalid(f"must be one of {listed} or an import path {_fmt(form)}", fix)

    return check


_model_name = _builtin_or_import_path(BUILTIN_MODELS, "model.name", "package.module:ClassName",
                                      "mypkg.nets:Net")
_data_name = _builtin_or_import_path(BUILTIN_DATASETS, "data.name", "package.module:function",
                                     "mypkg.data:load")


def _import_path_list(value: Any) -> tuple[str, ...]:
    if not isinstance(value, (list, tuple)):
        raise _Invalid(f"is {_type_name(value)} but must be a list of import paths "
                       '"package.module:name"', 'e.g. ["mypkg.hooks:Logger"]')
    for i, item in enumerate(value):
        if not isinstance(item, str) or not _IMPORT_PATH.match(item):
            raise _Invalid(f"has entry [{i}] = {_fmt(item)}, not an import path "
                           '"package.module:name"', 'e.g. ["mypkg.hooks:Logger"]')
    return tuple(value)


def _thaw(value: Any) -> Any:
    """Return ``value`` with tuples turned into lists and mappings into dicts, recursively."""
    if isinstance(value, Mapping):
        return {str(k): _thaw(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_thaw(v) for v in value]
    return value


def _opt(default: Any, check: _Check, example: str, *, factory: bool = False) -> Any:
    """Declare a config field with its check and an example value used in error fixes."""
    meta = {"check": check, "example": example}
    if factory:
        return field(default_factory=default, metadata=meta)
    return field(default=default, metadata=meta)


class _Section:
    """Mixin for section dataclasses: run the field checks, then the section's cross-field rules."""

    section: ClassVar[str]

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            try:
                normalised = f.metadata["check"](value)
            except _Invalid as exc:
                key = f"{self.section}.{f.name}"
                fix = exc.fix or f"e.g. {key}={f.metadata['example']}"
                raise ConfigError(f"{key}={_fmt(value)} {exc.constraint}; {fix}") from None
            object.__setattr__(self, f.name, normalised)
        self._cross_check()

    def _cross_check(self) -> None:
        """Check rules that involve several keys of this section (override as needed)."""

    def _error(self, name: str, constraint: str, fix: str) -> ConfigError:
        return ConfigError(f"{self.section}.{name}={_fmt(getattr(self, name))} {constraint}; {fix}")
