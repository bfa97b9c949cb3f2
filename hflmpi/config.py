"""Run configuration: one frozen dataclass per component, composed into :class:`RunConfig`.

A run is described by a TOML file (read with the stdlib :mod:`tomllib`) plus command-line
overrides ``--set section.key=value``. Unknown sections or keys, wrong types and out-of-range values
raise :class:`ConfigError`, whose message names the key, the value, the constraint and a fix, e.g.::

    schedule.tau=[5] has 1 entry but the tree has 2 layers (topology.fanouts=[4, 2]); give one tau
    per layer, e.g. tau=[5, 2]

Checks that need the world size (tree versus rank count) live in :mod:`hflmpi.core.topology`; the tau and
quantizer lengths are checked here whenever the tree depth is known from the config alone.

Layers follow the QMLHFL paper (arXiv 2505.08145): devices are layer 0, aggregators layers
1..N-1, the root layer N; ``schedule.tau[n-1]`` and ``quantize.bits[n-1]`` belong to layer n.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10 needs the tomli backport
    import tomli as tomllib

__all__ = [
    "ConfigError",
    "RunOptions",
    "TopologyConfig",
    "ScheduleConfig",
    "AggregationConfig",
    "QuantizeConfig",
    "DataConfig",
    "ModelConfig",
    "OptimConfig",
    "PrivacyConfig",
    "RunConfig",
    "BUILTIN_MODELS",
    "MAX_LR",
    "MAX_ROUNDS",
    "MAX_STEPS_PER_ROUND",
    "load_config",
    "parse_override",
    "apply_overrides",
    "config_from_dict",
    "config_to_dict",
    "format_value",
    "to_toml_string",
]

BUILTIN_MODELS = ("mlp", "logreg", "cnn")

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


class ConfigError(ValueError):
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


def _choice_list(*options: str) -> _Check:
    def check(value: Any) -> tuple[str, ...]:
        if not isinstance(value, (list, tuple)):
            raise _Invalid(f"is {_type_name(value)} but must be a list of strings, one per layer")
        for i, item in enumerate(value):
            if item not in options:
                raise _Invalid(f"has entry [{i}] = {_fmt(item)}; each entry must be one of "
                               f"{', '.join(repr(o) for o in options)}")
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


def _model_name(value: Any) -> str:
    if not isinstance(value, str):
        raise _Invalid(f"is {_type_name(value)} but must be a string")
    if value in BUILTIN_MODELS or _IMPORT_PATH.match(value):
        return value
    close = difflib.get_close_matches(value, BUILTIN_MODELS, n=1)
    example = 'e.g. model.name="mlp" or "mypkg.nets:Net"'
    fix = f"did you mean {_fmt(close[0])}?" if close else example
    raise _Invalid(
        "must be one of " + ", ".join(_fmt(m) for m in BUILTIN_MODELS)
        + ' or an import path "package.module:ClassName"',
        fix,
    )


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


# --------------------------------------------------------------------------------------------
# Sections


@dataclass(frozen=True)
class RunOptions(_Section):
    """The ``[run]`` section.

    Attributes
    ----------
    seed : int
        Root of every random stream (see :mod:`hflmpi.core.rng`). Default 0.
    rounds : int
        Global rounds, 1 to 10**7; one global round is ``prod(schedule.tau)`` SGD steps per
        device. Default 20.
    out : str
        HDF5 run file (metrics, resolved config, checkpoints). Default ``"runs/run.h5"``.
    device : {"cpu", "cuda", "auto"}
        Where tensors live; ``"auto"`` picks CUDA when available. Default ``"cpu"``.
    checkpoint_every : int
        Checkpoint every this many global rounds; 0 disables periodic checkpoints. Default 1.
    eval_every : int
        Evaluate the global model every this many global rounds; 0 disables periodic evaluation.
        Default 1.
    progress : {"auto", "on", "off"}
        Progress output on rank 0; ``"auto"`` shows it when stdout is a terminal.
        Default ``"auto"``.
    dtype : {"float32", "float64"}
        Parameter and aggregation dtype. Default ``"float32"``.
    divergence : bool
        Measure H-SGD's upward/downward divergences at every evaluation (two extra
        full-model allreduces per evaluated round). Default true. Must be false with a secure
        or private layer: the allreduces carry the raw device models.
    nonfinite : {"raise", "drop"}
        A device whose model holds NaN/Inf before an aggregation stops the job on every rank
        with its rank named (default), or is left out of that aggregation and logged.
    watchdog_seconds : float
        Abort the job if one collective (aggregation, divergence measurement, metrics,
        preemption poll, checkpoint) waits longer than this, naming the collective and the rank
        that did not arrive (see :class:`hflmpi.mpi.guard.Watchdog`); 0 (default) disables it.
    """

    section: ClassVar[str] = "run"
    seed: int = _opt(0, _int(0, 2**63 - 1), "0")
    rounds: int = _opt(20, _int(1, MAX_ROUNDS), "20")
    out: str = _opt("runs/run.h5", _nonempty_str, '"runs/run.h5"')
    device: str = _opt("cpu", _choice("cpu", "cuda", "auto"), '"cpu"')
    checkpoint_every: int = _opt(1, _int(0), "1")
    eval_every: int = _opt(1, _int(0), "1")
    progress: str = _opt("auto", _choice("auto", "on", "off"), '"auto"')
    dtype: str = _opt("float32", _choice("float32", "float64"), '"float32"')
    divergence: bool = _opt(True, _bool, "true")
    nonfinite: str = _opt("raise", _choice("raise", "drop"), '"raise"')
    watchdog_seconds: float = _opt(0.0, _float(0.0), "600")


@dataclass(frozen=True)
class TopologyConfig(_Section):
    """The ``[topology]`` section: the aggregation tree; give at most one of its three forms.

    Attributes
    ----------
    fanouts : tuple of int or None
        Fan-out per layer, bottom up: ``[4, 2]`` is 8 devices in 2 edge groups under 1 root
        (depth = number of entries). The product must equal the world size.
    groups : nested tuple of int or None
        Explicit groups, leaves are ranks, all at the same depth; uneven sizes are allowed:
        ``[[0, 1, 2], [3, 4, 5, 6, 7]]`` is depth 2, a flat ``[0, 1, 2, 3]`` is depth 1.
    nodes : bool
        One layer-1 group per physical node (host), found at run time. Default false.
    node_fanouts : tuple of int
        With ``nodes``: fan-outs of the layers above the node layer, the last one the root's; the
        product must equal the node count. Empty: a single root above all nodes (depth 2, or depth 1
        when the job runs on one node, so the depth is only known at run time).

    With none of the forms given the tree is flat: every rank under the root (depth 1, FedAvg).
    """

    section: ClassVar[str] = "topology"
    fanouts: tuple[int, ...] | None = _opt(None, _optional(_int_list(1)), "[4, 2]")
    groups: tuple[Any, ...] | None = _opt(None, _optional(_groups), "[[0, 1, 2], [3, 4, 5, 6, 7]]")
    nodes: bool = _opt(False, _bool, "true")
    node_fanouts: tuple[int, ...] = _opt((), _int_list(1, allow_empty=True), "[2]")

    def _cross_check(self) -> None:
        given = [name for name, on in (("fanouts", self.fanouts is not None),
                                       ("groups", self.groups is not None),
                                       ("nodes", self.nodes)) if on]
        if len(given) > 1:
            raise ConfigError(
                f"topology sets {' and '.join('topology.' + g for g in given)}, but the tree is "
                "given by exactly one of fanouts, groups or nodes; keep one and delete the others"
            )
        if self.node_fanouts and not self.nodes:
            raise self._error("node_fanouts", "only applies with topology.nodes=true",
                              "set topology.nodes=true or delete node_fanouts")

    @property
    def kind(self) -> str:
        """Return the form of the tree: ``"fanouts"``, ``"groups"``, ``"nodes"`` or ``"flat"``."""
        if self.fanouts is not None:
            return "fanouts"
        if self.groups is not None:
            return "groups"
        return "nodes" if self.nodes else "flat"

    @property
    def depth(self) -> int | None:
        """Return the number of aggregation layers, or None when only the run can tell (nodes)."""
        if self.fanouts is not None:
            return len(self.fanouts)
        if self.groups is not None:
            depth, node = 0, self.groups
            while isinstance(node, tuple):
                depth, node = depth + 1, node[0]
            return depth
        if self.nodes:
            return 1 + len(self.node_fanouts) if self.node_fanouts else None
        return 1

    def describe_depth(self) -> str:
        """Return where the depth comes from, for error messages."""
        kind = self.kind
        if kind == "fanouts":
            return f"topology.fanouts={_fmt(self.fanouts)}"
        if kind == "groups":
            return f"topology.groups nests {self.depth} levels"
        if kind == "nodes":
            return f"the node layer plus topology.node_fanouts={_fmt(self.node_fanouts)}"
        return "no [topology] given: one layer, every rank under the root"


@dataclass(frozen=True)
class ScheduleConfig(_Section):
    """The ``[schedule]`` section.

    Attributes
    ----------
    tau : tuple of int
        One entry per layer: ``tau[0]`` local SGD steps per layer-1 aggregation, ``tau[n]``
        layer-n aggregations per layer-(n+1) aggregation. Default ``(5,)``. ``prod(tau)``, the
        local steps of one global round, is at most 10**8 (:data:`MAX_STEPS_PER_ROUND`).
    """

    section: ClassVar[str] = "schedule"
    tau: tuple[int, ...] = _opt((5,), _int_list(1), "[5, 2]")

    def _cross_check(self) -> None:
        steps = math.prod(self.tau)
        if steps > MAX_STEPS_PER_ROUND:
            raise self._error(
                "tau", f"makes prod(tau) = {steps} local steps per global round, more than "
                f"{MAX_STEPS_PER_ROUND} (a round is the unit of checkpoints and metrics)",
                "use smaller tau entries and more run.rounds",
            )

    @property
    def steps_per_round(self) -> int:
        """Return ``prod(tau)``: local SGD steps per device in one global round."""
        return math.prod(self.tau)


@dataclass(frozen=True)
class AggregationConfig(_Section):
    """The ``[aggregation]`` section.

    Attributes
    ----------
    weighting : {"samples", "uniform"}
        Child weight in ``x + sum_c a_c Q(x_c - x)``: samples held in the child's subtree
        (FedAvg-style) or its device count (the paper's form). Default ``"samples"``.
    algorithm : {"subtree", "tree"}
        How full-precision layers are summed: one allreduce over the subtree (fastest, same
        result) or the literal reduce-up/broadcast-down tree. Default ``"subtree"``.
    robust : list of str
        Per layer, ``"mean"`` (the weighted mean of QMLHFL) or a Byzantine-robust rule that
        gathers every child's update at the leader: ``"median"`` (coordinate-wise),
        ``"trimmed_mean"``, ``"krum"``. Empty (default) means mean everywhere. Robust layers
        must not be quantized (``quantize.bits`` 0 there). A robust layer never trusts the
        weight a child claims: it is clamped to the child's true weight (partition sizes, which
        every rank computes from the seed). A rule that tolerates no Byzantine child at some
        group of its layer (e.g. ``trim`` below ``1/k``) is an error.
    trim : float
        Fraction trimmed at each end by ``"trimmed_mean"``: ``floor(trim * k)`` of the ``k``
        children, which must be >= 1 in every group. Default 0.2 (groups of 5 or more).
    krum_f : int
        Byzantine children tolerated by ``"krum"`` (>= 1, with more than ``2 f + 2`` children).
        Default 1.
    secure : list of bool
        Per layer: pairwise-masked secure aggregation of the quantized levels (the leader learns
        only the group sum; see docs/security.md). Needs ``quantize.bits > 0`` there, groups of
        at least 3 participants, and ``run.divergence = false``.
    allow_small_secure_groups : bool
        Accept secure groups of 2 participants, whose leader learns its partner's update
        exactly. Default false (such groups are an error).
    """

    section: ClassVar[str] = "aggregation"
    weighting: str = _opt("samples", _choice("samples", "uniform"), '"samples"')
    algorithm: str = _opt("subtree", _choice("subtree", "tree"), '"subtree"')
    robust: tuple[str, ...] = _opt(
        (), _choice_list("mean", "median", "trimmed_mean", "krum"), '["mean", "median"]')
    trim: float = _opt(0.2, _float(0.0, 0.5, hi_open=True), "0.2")
    krum_f: int = _opt(1, _int(0), "1")
    secure: tuple[bool, ...] = _opt((), _bool_list, "[true, false]")
    allow_small_secure_groups: bool = _opt(False, _bool, "false")


@dataclass(frozen=True)
class PrivacyConfig(_Section):
    """The ``[privacy]`` section: client-level differential privacy at one layer.

    Attributes
    ----------
    layer : int
        Layer whose uplink is clipped and noised; 0 (default) turns privacy off.
    mode : {"central", "distributed"}
        The layer's leader adds the noise, or each child adds a ``1/sqrt(k)`` share.
    clip : float
        L2 bound on each child's update. Default 1.0.
    noise_multiplier : float
        Noise std over the sensitivity ``clip * max_c a_c``. Default 1.0.
    delta : float
        The delta of the reported (epsilon, delta). Default 1e-5.
    insecure_reproducible_noise : bool
        TESTS ONLY. Draw the noise from generators keyed by ``run.seed`` (stored in the run
        file) instead of the OS CSPRNG, so a DP run is reproducible bit for bit, and anyone with
        the run file can subtract the noise: no privacy at all. Every run that sets it warns on
        stderr and records it in the run file. Default false.
    """

    section: ClassVar[str] = "privacy"
    layer: int = _opt(0, _int(0), "1")
    mode: str = _opt("central", _choice("central", "distributed"), '"central"')
    clip: float = _opt(1.0, _float(0.0, lo_open=True), "1.0")
    noise_multiplier: float = _opt(1.0, _float(0.0, lo_open=True), "1.0")
    delta: float = _opt(1e-5, _float(0.0, 1.0, lo_open=True, hi_open=True), "1e-5")
    insecure_reproducible_noise: bool = _opt(False, _bool, "false")


@dataclass(frozen=True)
class QuantizeConfig(_Section):
    """The ``[quantize]`` section.

    Attributes
    ----------
    bits : tuple of int
        Bits per entry of the uplink difference at each layer (``bits[n-1]`` for layer n);
        0 means no quantization, otherwise 1..16. Empty (the default) means 0 at every layer and is
        resolved to one 0 per layer in :class:`RunConfig` when the depth is known.
    bucket_size : int
        Entries sharing one scale; 0 (the default) picks per layer the smallest power of two
        that keeps the scales under ~1% of the payload: 512 at 8 bits, 1024 at 4, 2048 at 2
        (:func:`hflmpi.core.wire.auto_bucket_size`).
    method : {"auto", "sum", "gather"}
        How quantized levels travel: integer ``Reduce`` or ``Gather`` of packed bytes; ``"auto"``
        picks the one that moves fewer bytes. The result is the same bits either way.
    """

    section: ClassVar[str] = "quantize"
    bits: tuple[int, ...] = _opt((), _int_list(0, hi=16, allow_empty=True), "[8, 4]")
    bucket_size: int = _opt(0, _int(0), "0")
    method: str = _opt("auto", _choice("auto", "sum", "gather"), '"auto"')

    def bits_for(self, depth: int) -> tuple[int, ...]:
        """Return one bit width per layer for a tree of ``depth`` layers (empty means all 0)."""
        return self.bits if self.bits else (0,) * depth


@dataclass(frozen=True)
class DataConfig(_Section):
    """The ``[data]`` section.

    Attributes
    ----------
    name : {"digits", "mnist", "fashion_mnist", "cifar10", "synthetic"}
        ``digits`` ships inside scikit-learn; mnist/fashion_mnist/cifar10 are read from
        ``path``; nothing is ever downloaded. Default ``"digits"``.
    path : str
        Directory holding the local files (IDX files, or CIFAR-10 python batches).
    partition : {"iid", "dirichlet", "shards", "label_sorted"}
        How training samples are split over devices. Default ``"iid"``.
    alpha : float
        Dirichlet concentration (> 0; small is skewed). Default 0.5.
    shards_per_client : int
        Label-sorted shards dealt to each client. Default 2.
    test_fraction : float
        Held-out fraction for datasets without a test split (digits, synthetic). Default 0.2.
    synthetic_samples, synthetic_features, synthetic_classes : int
        Size of the synthetic task. Defaults 20000, 784, 10.
    normalize : bool
        Standardise features with training-set mean and std (per channel for images).
        Default true.
    """

    section: ClassVar[str] = "data"
    name: str = _opt("digits", _choice("digits", "mnist", "fashion_mnist", "cifar10", "synthetic"),
                     '"digits"')
    path: str = _opt("", _str, '"/data/mnist"')
    partition: str = _opt("iid", _choice("iid", "dirichlet", "shards", "label_sorted"), '"iid"')
    alpha: float = _opt(0.5, _float(0.0, lo_open=True), "0.5")
    shards_per_client: int = _opt(2, _int(1), "2")
    test_fraction: float = _opt(0.2, _float(0.0, 1.0, lo_open=True, hi_open=True), "0.2")
    synthetic_samples: int = _opt(20000, _int(2), "20000")
    synthetic_features: int = _opt(784, _int(1), "784")
    synthetic_classes: int = _opt(10, _int(2), "10")
    normalize: bool = _opt(True, _bool, "true")

    def _cross_check(self) -> None:
        if self.name in ("mnist", "fashion_mnist", "cifar10") and not self.path.strip():
            expected = ("the CIFAR-10 python batches (data_batch_1..5, test_batch)"
                        if self.name == "cifar10"
                        else "train-images-idx3-ubyte.gz and the other three IDX files")
            raise self._error(
                "path", f"is empty, but data.name={_fmt(self.name)} reads local files",
                f"set data.path to the directory holding {expected} (nothing is downloaded)",
            )


@dataclass(frozen=True)
class ModelConfig(_Section):
    """The ``[model]`` section.

    Attributes
    ----------
    name : str
        ``"mlp"``, ``"logreg"``, ``"cnn"`` or an import path ``"package.module:ClassName"`` of an
        ``nn.Module`` built as ``ClassName(**kwargs)``. Default ``"mlp"``.
    hidden : tuple of int
        Hidden layer widths of the MLP, and of the CNN's fully connected head. Default ``(128,)``.
    kwargs : dict
        Keyword arguments for an import-path model (only). Default ``{}``.
    """

    section: ClassVar[str] = "model"
    name: str = _opt("mlp", _model_name, '"mlp"')
    hidden: tuple[int, ...] = _opt((128,), _int_list(1, allow_empty=True), "[128]")
    kwargs: dict[str, Any] = _opt(dict, _table, "{width = 64}", factory=True)

    def _cross_check(self) -> None:
        if self.kwargs and self.name in BUILTIN_MODELS:
            raise self._error(
                "kwargs", f"is only for import-path models, not model.name={_fmt(self.name)}",
                "delete model.kwargs, or name a class as model.name=\"package.module:ClassName\"",
            )


@dataclass(frozen=True)
class OptimConfig(_Section):
    """The ``[optim]`` section: the local solver on every device.

    Attributes
    ----------
    solver : {"sgd", "fedprox"}
        Plain SGD, or SGD on the FedProx objective ``f(w) + mu/2 ||w - w_anchor||^2`` with
        ``w_anchor`` the model received at the last aggregation. Default ``"sgd"``.
    lr : float
        Learning rate at round 0, finite, in (0, 1000] (:data:`MAX_LR`). Default 0.05.
    momentum : float
        Heavy-ball momentum in [0, 1). Default 0.0.
    weight_decay : float
        L2 coefficient added to the gradient. Default 0.0.
    mu : float
        FedProx proximal coefficient; must be > 0 with ``fedprox`` and 0 with ``sgd``.
    batch_size : int
        Minibatch size. Default 32.
    lr_schedule : {"constant", "cosine", "step"}
        Learning-rate schedule over global rounds (see :func:`hflmpi.learn.local.lr_at`).
    lr_step_rounds : int
        ``step`` schedule: multiply by ``lr_gamma`` every this many rounds. Default 10.
    lr_gamma : float
        ``step`` schedule factor in (0, 1]. Default 0.5.
    momentum_reset : {"aggregation", "never"}
        By default the momentum buffer is reset to zero whenever the device's model is replaced
        by an aggregate (at any layer); ``"never"`` keeps it across aggregations.
    """

    section: ClassVar[str] = "optim"
    solver: str = _opt("sgd", _choice("sgd", "fedprox"), '"sgd"')
    lr: float = _opt(0.05, _float(0.0, MAX_LR, lo_open=True,
                                  why="a larger SGD step only diverges; published rates stay "
                                      "below ~50"), "0.05")
    momentum: float = _opt(0.0, _float(0.0, 1.0, hi_open=True), "0.9")
    weight_decay: float = _opt(0.0, _float(0.0), "0.0001")
    mu: float = _opt(0.0, _float(0.0), "0.01")
    batch_size: int = _opt(32, _int(1), "32")
    lr_schedule: str = _opt("constant", _choice("constant", "cosine", "step"), '"constant"')
    lr_step_rounds: int = _opt(10, _int(1), "10")
    lr_gamma: float = _opt(0.5, _float(0.0, 1.0, lo_open=True), "0.5")
    momentum_reset: str = _opt("aggregation", _choice("aggregation", "never"), '"aggregation"')

    def _cross_check(self) -> None:
        if self.solver == "sgd" and self.mu != 0.0:
            raise self._error("mu", 'has no effect with optim.solver="sgd"',
                              'set optim.solver="fedprox" or delete optim.mu')
        if self.solver == "fedprox" and self.mu == 0.0:
            raise self._error("mu", 'makes optim.solver="fedprox" plain SGD; FedProx needs mu > 0',
                              'e.g. optim.mu=0.01, or use optim.solver="sgd"')


# --------------------------------------------------------------------------------------------
# The composed run config


@dataclass(frozen=True)
class RunConfig:
    """The whole resolved configuration of a run, one attribute per TOML section."""

    run: RunOptions = field(default_factory=RunOptions)
    topology: TopologyConfig = field(default_factory=TopologyConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    aggregation: AggregationConfig = field(default_factory=AggregationConfig)
    quantize: QuantizeConfig = field(default_factory=QuantizeConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            expected = _SECTIONS[f.name]
            if not isinstance(getattr(self, f.name), expected):
                raise ConfigError(f"RunConfig.{f.name} must be a {expected.__name__}")
        depth = self.topology.depth
        if depth is None:  # nodes without node_fanouts: the run checks once it knows the hosts
            return
        tau, bits = self.schedule.tau, self.quantize.bits
        if len(tau) != depth:
            example = list(tau[:depth]) + [2] * (depth - len(tau))
            raise ConfigError(
                f"schedule.tau={_fmt(tau)} has {len(tau)} entr{'y' if len(tau) == 1 else 'ies'} "
                f"but the tree has {depth} layer{'' if depth == 1 else 's'} "
                f"({self.topology.describe_depth()}); give one tau per layer, "
                f"e.g. tau={_fmt(example)}"
            )
        if bits and len(bits) != depth:
            example = list(bits[:depth]) + [0] * (depth - len(bits))
            raise ConfigError(
                f"quantize.bits={_fmt(bits)} has {len(bits)} "
                f"entr{'y' if len(bits) == 1 else 'ies'} "
                f"but the tree has {depth} layer{'' if depth == 1 else 's'} "
                f"({self.topology.describe_depth()}); give one width per layer (0 = exact), "
                f"e.g. bits={_fmt(example)}"
            )
        if not bits:
            object.__setattr__(self, "quantize",
                               dataclasses.replace(self.quantize, bits=(0,) * depth))
        self.check_layer_options(depth)

    def check_layer_options(
        self, depth: int, group_sizes: Sequence[Sequence[int]] | None = None
    ) -> None:
        """Check the per-layer robust/secure/privacy options against a tree of ``depth`` layers.

        Parameters
        ----------
        depth : int
            Number of aggregation layers.
        group_sizes : sequence of sequences of int, optional
            Per layer, the number of participants of each of its groups (the fan-ins, known
            once the tree is planned); enables the checks that depend on them.
        """
        agg, bits = self.aggregation, self.quantize.bits_for(depth)
        for name, values in (("robust", agg.robust), ("secure", agg.secure)):
            if values and len(values) != depth:
                raise ConfigError(
                    f"aggregation.{name}={_fmt(values)} has {len(values)} entries but the tree has "
                    f"{depth} layers; give one per layer (or leave it out)"
                )
        for n in range(depth):
            rule = agg.robust[n] if agg.robust else "mean"
            masked = agg.secure[n] if agg.secure else False
            if rule != "mean" and bits[n] > 0:
                raise ConfigError(
                    f"aggregation.robust[{n}]={rule!r} with quantize.bits[{n}]={bits[n]}: robust "
                    f"rules need full-precision updates; set quantize.bits[{n}] = 0"
                )
            if masked and bits[n] == 0:
                raise ConfigError(
                    f"aggregation.secure[{n}]=true with quantize.bits[{n}]=0: secure aggregation "
                    f"masks quantized integer levels; set quantize.bits[{n}] to 1..16"
                )
            if masked and rule != "mean":
                raise ConfigError(f"aggregation.secure[{n}] and robust[{n}]={rule!r} exclude "
                                  "each other: masking hides the updates the rule needs")
            if masked and self.quantize.method == "gather":
                raise ConfigError('aggregation.secure needs quantize.method = "auto" or "sum"')
        if self.privacy.layer > depth:
            raise ConfigError(f"privacy.layer={self.privacy.layer} but the tree has {depth} layers; "
                              f"use 1..{depth} (or 0 to turn privacy off)")
        self._check_side_channels()
        if self.privacy.layer and agg.robust and agg.robust[self.privacy.layer - 1] != "mean":
            n = self.privacy.layer - 1
            raise ConfigError(
                f"aggregation.robust[{n}]={_fmt(agg.robust[n])} at privacy.layer="
                f"{self.privacy.layer}: the noise is calibrated to the weighted mean's "
                "sensitivity (clip * max a_c), which a robust rule does not have, so the stated "
                "epsilon would be false; put the robust rule on another layer"
            )
        if group_sizes is not None:
            for n, sizes in enumerate(group_sizes[:depth]):
                self._check_groups(n, sorted(set(int(k) for k in sizes)))

    def _check_side_channels(self) -> None:
        """Refuse the metrics and checkpoints that carry individual models past a protected layer."""
        agg = self.aggregation
        protected = []
        if any(agg.secure):
            protected.append(f"aggregation.secure[{list(agg.secure).index(True)}]=true")
        if self.privacy.layer:
            protected.append(f"privacy.layer={self.privacy.layer}")
        if not protected:
            return
        what = " and ".join(protected)
        if self.run.divergence:
            raise ConfigError(
                f"run.divergence=true with {what}: measuring the divergences allreduces every "
                "device's raw model (and gives every rank the un-noised average), which the "
                "protected layer is meant to hide; set run.divergence=false"
            )
        if self.optim.momentum > 0 and self.optim.momentum_reset == "never":
            raise ConfigError(
                f"optim.momentum_reset=\"never\" with {what}: every checkpoint gathers each "
                "device's momentum buffer (a running sum of its own gradients) to rank 0, which "
                "the protected layer is meant to hide; use optim.momentum_reset=\"aggregation\" "
                "or optim.momentum=0"
            )

    def _check_groups(self, n: int, sizes: list[int]) -> None:
        """Check layer ``n + 1``'s robust rule and secure masking against its group sizes."""
        agg = self.aggregation
        rule = agg.robust[n] if agg.robust else "mean"
        masked = agg.secure[n] if agg.secure else False
        for k in sizes:
            if k < 2:
                continue  # a group of one: the leader alone, nothing to defend or hide
            if masked and k == 2 and not agg.allow_small_secure_groups:
                raise ConfigError(
                    f"aggregation.secure[{n}]=true with a layer-{n + 1} group of 2 participants: "
                    "its leader subtracts its own levels from the sum and learns its partner's "
                    "exactly; use groups of at least 3 (topology), or set "
                    "aggregation.allow_small_secure_groups=true to accept that"
                )
            if rule == "trimmed_mean" and math.floor(agg.trim * k) < 1:
                fix = (f"set aggregation.trim >= 1/{k} (e.g. aggregation.trim="
                       f"{math.ceil(1000 / k) / 1000})" if k >= 3 else
                       "use groups of at least 3 children (topology)")
                raise ConfigError(
                    f"aggregation.trim={_fmt(agg.trim)} trims floor({_fmt(agg.trim)} * {k}) = "
                    f"{math.floor(agg.trim * k)} of the {k} children of a layer-{n + 1} group, so "
                    f"aggregation.robust[{n}]=\"trimmed_mean\" would tolerate no Byzantine child "
                    f"and silently average them all; {fix}"
                )
            if rule == "median" and k == 2:
                raise ConfigError(
                    f"aggregation.robust[{n}]=\"median\" with a layer-{n + 1} group of 2 "
                    "children tolerates no Byzantine child (the median of two is their mean); "
                    "use groups of at least 3 children (topology) or \"mean\" there"
                )
            if rule == "krum" and (agg.krum_f < 1 or k <= 2 * agg.krum_f + 2):
                raise ConfigError(
                    f"aggregation.krum_f={agg.krum_f} with a layer-{n + 1} group of {k} children: "
                    f"krum needs f >= 1 Byzantine children tolerated and more than 2f + 2 = "
                    f"{2 * agg.krum_f + 2} children; set aggregation.krum_f=1 with groups of at "
                    "least 5 children, or use \"median\" there"
                )

    @property
    def depth(self) -> int | None:
        """Return the tree depth if the config alone determines it (see TopologyConfig.depth)."""
        return self.topology.depth

    @property
    def steps_per_round(self) -> int:
        """Return the local SGD steps per device in one global round, ``prod(tau)``."""
        return self.schedule.steps_per_round


_SECTIONS: dict[str, type[_Section]] = {
    "run": RunOptions,
    "topology": TopologyConfig,
    "schedule": ScheduleConfig,
    "aggregation": AggregationConfig,
    "quantize": QuantizeConfig,
    "data": DataConfig,
    "model": ModelConfig,
    "optim": OptimConfig,
    "privacy": PrivacyConfig,
}


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
            raise ConfigError(f"config file {path} does not exist; check the path, "
                              "or start from an example in jobs/") from None
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
