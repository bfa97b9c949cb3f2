"""The experiment spec: one TOML file under ``experiments/`` parsed into variants, seeds and a time model.

See :mod:`hflmpi.experiments` for the format and ``docs/experiments.md`` for the keys.
"""

from __future__ import annotations

import copy
import math
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from hflmpi.config import ConfigError, RunConfig, apply_overrides, config_from_dict
from hflmpi.errors import HflmpiError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


__all__ = ["ExperimentError", "merge_sections", "Timing", "Variant", "Experiment", "load_experiment"]

_EXPERIMENT_KEYS = {"name", "title", "description", "seeds", "steps", "eval_every_steps",
                    "last_steps", "small", "reference", "target_accuracy"}
_SMALL_KEYS = {"seeds", "steps", "eval_every_steps", "last_steps", "variants", "base", "plan"}
_VARIANT_KEYS = {"name", "label", "x", "steps", "eval_every_steps", "reference"}
_SECTIONS = ("run", "topology", "schedule", "aggregation", "quantize", "data", "model", "optim",
             "privacy", "server_opt", "clients", "clock")
_FIGURE_KINDS = ("accuracy_vs_steps", "accuracy_vs_bytes", "accuracy_vs_time",
                 "accuracy_vs_sim_time", "divergence", "quant_vs_bits", "metric_vs_x")
_CHECK_KINDS = ("order", "close", "finite", "at_least", "at_most", "above_median")


class ExperimentError(HflmpiError, ValueError):
    """An experiment spec or results file is invalid; the message names the key and a fix."""



# ---------------------------------------------------------------------------------------------
# The spec


@dataclass(frozen=True)
class Timing:
    """The stated alpha-beta time model (see the module docstring); seconds and bytes/s."""

    t_cp: float = 0.002
    edge_alpha: float = 0.001
    edge_bandwidth: float = 1e8
    root_alpha: float = 0.05
    root_bandwidth: float = 1e6

    def layer_costs(self, depth: int, numel: int, bits: Sequence[int], bucket: int = 0) -> list[float]:
        """Return ``t_cm,n`` (seconds of one layer-n aggregation) for ``n = 1..depth``."""
        from hflmpi.core.wire import bytes_ratio

        costs = []
        for n in range(1, depth + 1):
            alpha, bw = ((self.root_alpha, self.root_bandwidth) if n == depth
                         else (self.edge_alpha, self.edge_bandwidth))
            costs.append(alpha + 4.0 * numel * bytes_ratio(int(bits[n - 1]), bucket) / bw)
        return costs

    def round_time(self, tau: Sequence[int], numel: int, bits: Sequence[int], bucket: int = 0) -> float:
        """Return the modelled seconds of one global round, ``T(tau)``."""
        from hflmpi.core.costmodel import round_time

        return round_time(list(tau), self.t_cp, self.layer_costs(len(tau), numel, bits, bucket))


@dataclass(frozen=True)
class Variant:
    """One point of the sweep: a full run config (as nested dicts) less seed, out and rounds."""

    name: str
    label: str
    config: dict[str, Any]
    steps: int
    x: float = math.nan
    eval_every_steps: int | None = None
    reference: str | None = None

    @property
    def tau(self) -> list[int]:
        """Return the variant's ``schedule.tau``."""
        return list(self.config.get("schedule", {}).get("tau", [5]))

    @property
    def period(self) -> int:
        """SGD steps per device in one global round, ``prod(tau)``."""
        return math.prod(self.tau)

    def run_config(self, seed: int, out: str | Path, eval_every_steps: int) -> RunConfig:
        """Return the validated config of this variant's run with ``seed`` into ``out``."""
        data = copy.deepcopy(self.config)
        run = data.setdefault("run", {})
        every = self.eval_every_steps or eval_every_steps
        run.update(seed=int(seed), out=str(out), rounds=self.steps // self.period,
                   eval_every=max(1, every // self.period), progress="off",
                   checkpoint_every=0)
        try:
            return config_from_dict(data)
        except ConfigError as exc:
            raise ExperimentError(f"variant {self.name!r}: {exc}") from None


@dataclass(frozen=True)
class Experiment:
    """A parsed experiment spec (one TOML file under ``experiments/``)."""

    name: str
    title: str
    description: str
    seeds: tuple[int, ...]
    steps: int
    eval_every_steps: int
    last_steps: int
    base: dict[str, Any]
    variants: tuple[Variant, ...]
    timing: Timing
    plan: dict[str, Any] | None
    figures: tuple[dict[str, Any], ...]
    checks: tuple[dict[str, Any], ...]
    small: bool
    text: str = field(repr=False, default="")
    target_accuracy: float = math.nan

    def variant(self, name: str) -> Variant:
        """Return the variant called ``name`` (an error names the ones there are)."""
        for v in self.variants:
            if v.name == name:
                return v
        raise ExperimentError(f"no variant named {name!r}; variants: "
                              f"{', '.join(v.name for v in self.variants)}")


def merge_sections(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """Merge config sections: ``topology`` is replaced whole, other sections key by key."""
    out = copy.deepcopy(dict(base))
    for section, table in over.items():
        if section == "topology" or not isinstance(table, Mapping):
            out[section] = copy.deepcopy(table)
        else:
            out[section] = {**out.get(section, {}), **copy.deepcopy(dict(table))}
    return out


def _unknown(where: str, keys: Any, allowed: set[str] | Sequence[str]) -> None:
    extra = sorted(set(keys) - set(allowed))
    if extra:
        raise ExperimentError(f"{where} has unknown key(s) {extra}; allowed: {sorted(allowed)}")


def _positive_int(value: Any, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ExperimentError(f"{key}={value!r} must be an integer >= 1")
    return int(value)


def load_experiment(
    path: str | os.PathLike[str],
    small: bool = False,
    *,
    base_file: str | os.PathLike[str] | None = None,
    overrides: Sequence[str] = (),
) -> Experiment:
    """Parse and validate an experiment spec; ``small`` applies its ``[experiment.small]`` table.

    ``base_file`` (a run config TOML, e.g. ``jobs/experiments.toml`` naming MNIST files) and then
    ``overrides`` (``--set section.key=value``) are merged into the spec's ``[base]`` before the
    variants apply theirs, so a cluster can swap data and model without editing the spec.
    Every variant's config is validated here (before any training); the plan-generated variants
    of a ``[plan]`` section are added later by :func:`run_experiment` (they need the model size).
    """
    text, doc = _read_spec(path)
    exp, base, plan, only = _experiment_tables(doc, small)
    base = _merge_base(base, base_file, overrides)
    name = str(exp.get("name", Path(path).stem))
    seeds = tuple(int(s) for s in exp.get("seeds", [0]))
    if not seeds:
        raise ExperimentError("[experiment] seeds is empty; give e.g. seeds = [0, 1, 2]")
    steps = _positive_int(exp.get("steps", 200), "experiment.steps")
    eval_steps = _positive_int(exp.get("eval_every_steps", steps), "experiment.eval_every_steps")
    last_steps = _positive_int(exp.get("last_steps", eval_steps), "experiment.last_steps")
    timing = _timing(doc)
    target = _target_accuracy(exp.get("target_accuracy"))
    variants = _variants(doc, base, steps, only, exp.get("reference"))
    if not variants and plan is None:
        raise ExperimentError(f"{path} defines no [[variant]] and no [plan]")
    for v in variants:
        if v.steps % v.period:
            raise ExperimentError(
                f"variant {v.name!r}: steps={v.steps} is not a multiple of prod(tau)="
                f"{v.period} (tau={v.tau}); change steps or tau")
        v.run_config(seeds[0], "check.h5", eval_steps)  # validate now, not after hours of runs
    _check_plan(plan)
    figures, checks = _figures_and_checks(doc)
    return Experiment(name, str(exp.get("title", name)), str(exp.get("description", "")).strip(),
                      seeds, steps, eval_steps, last_steps, base, tuple(variants), timing, plan,
                      figures, checks, small, text, target)


def _read_spec(path: str | os.PathLike[str]) -> tuple[str, dict[str, Any]]:
    try:
        text = Path(path).read_text(encoding="utf-8")
        doc = tomllib.loads(text)
    except FileNotFoundError:
        raise ExperimentError(f"experiment spec {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ExperimentError(f"experiment spec {path} is not valid TOML: {exc}") from None
    _unknown(str(path), doc, {"experiment", "timing", "base", "variant", "plan", "figure", "check"})
    return text, doc


def _experiment_tables(
    doc: dict[str, Any], small: bool
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any] | None, list[str] | None]:
    """Return the ``[experiment]``, ``[base]`` and ``[plan]`` tables (with ``small`` applied)."""
    exp = dict(doc.get("experiment", {}))
    _unknown("[experiment]", exp, _EXPERIMENT_KEYS)
    small_table = dict(exp.pop("small", {}))
    _unknown("[experiment.small]", small_table, _SMALL_KEYS)
    base = dict(doc.get("base", {}))
    _unknown("[base]", base, _SECTIONS)
    plan = dict(doc["plan"]) if "plan" in doc else None
    only: list[str] | None = None
    if small:
        for key in ("seeds", "steps", "eval_every_steps", "last_steps"):
            if key in small_table:
                exp[key] = small_table[key]
        base = merge_sections(base, small_table.get("base", {}))
        if plan is not None:
            plan.update(small_table.get("plan", {}))
        only = list(small_table["variants"]) if "variants" in small_table else None
    return exp, base, plan, only


def _merge_base(
    base: dict[str, Any], base_file: str | os.PathLike[str] | None, overrides: Sequence[str]
) -> dict[str, Any]:
    if base_file is not None:
        try:
            extra = tomllib.loads(Path(base_file).read_text(encoding="utf-8"))
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ExperimentError(f"--base {base_file}: cannot read it as TOML ({exc})") from None
        _unknown(f"--base {base_file}", extra, _SECTIONS)
        base = merge_sections(base, extra)
    if overrides:
        base = apply_overrides(base, overrides)
        _unknown("--set", base, _SECTIONS)
    return base


def _timing(doc: dict[str, Any]) -> Timing:
    t = dict(doc.get("timing", {}))
    _unknown("[timing]", t, {"t_cp", "edge", "root"})
    edge, root = dict(t.get("edge", {})), dict(t.get("root", {}))
    for where, table in (("[timing] edge", edge), ("[timing] root", root)):
        _unknown(where, table, {"alpha", "bandwidth"})
    defaults = Timing()
    return Timing(float(t.get("t_cp", defaults.t_cp)),
                  float(edge.get("alpha", defaults.edge_alpha)),
                  float(edge.get("bandwidth", defaults.edge_bandwidth)),
                  float(root.get("alpha", defaults.root_alpha)),
                  float(root.get("bandwidth", defaults.root_bandwidth)))


def _target_accuracy(value: Any) -> float:
    if value is None:
        return math.nan
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise ExperimentError(f"experiment.target_accuracy={value!r} must be a test accuracy in "
                              "(0, 1], e.g. 0.9; leave it out to use each variant's reference")
    return float(value)


def _variants(
    doc: dict[str, Any], base: dict[str, Any], steps: int, only: list[str] | None,
    reference: Any = None,
) -> list[Variant]:
    variants = []
    for i, raw in enumerate(doc.get("variant", [])):
        raw = dict(raw)
        vname = raw.get("name")
        if not isinstance(vname, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", vname):
            raise ExperimentError(f"[[variant]] #{i + 1} needs name = \"letters, digits, '-', "
                                  f"'_', '.'\", got {vname!r}")
        _unknown(f"variant {vname!r}", raw, _VARIANT_KEYS | set(_SECTIONS))
        over = {k: v for k, v in raw.items() if k in _SECTIONS}
        variants.append(Variant(
            name=vname, label=str(raw.get("label", vname)), config=merge_sections(base, over),
            steps=_positive_int(raw.get("steps", steps), f"variant {vname!r} steps"),
            x=float(raw.get("x", math.nan)),
            eval_every_steps=(_positive_int(raw["eval_every_steps"], f"variant {vname!r} "
                              "eval_every_steps") if "eval_every_steps" in raw else None),
            reference=raw.get("reference", reference),
        ))
    names = [v.name for v in variants]
    if len(set(names)) != len(names):
        raise ExperimentError(f"variant names must be unique: {names}")
    for v in variants:
        if v.reference is not None and v.reference not in names:
            raise ExperimentError(f"variant {v.name!r}: reference={v.reference!r} names no "
                                  f"variant; variants: {', '.join(names)}")
    if only is not None:
        missing = sorted(set(only) - set(names))
        if missing:
            raise ExperimentError(f"[experiment.small] variants names unknown variant(s) {missing}")
        variants = [v for v in variants if v.name in only]
    return variants


def _check_plan(plan: dict[str, Any] | None) -> None:
    if plan is not None:
        _unknown("[plan]", plan, {"deadline", "random", "tau_max", "seed", "strict", "sigma2",
                                  "grad2", "zeta2", "lipschitz", "gap", "evaluations"})
        if not isinstance(plan.get("deadline"), (int, float)) or plan["deadline"] <= 0:
            raise ExperimentError(f"[plan] deadline={plan.get('deadline')!r} must be a number of "
                                  "modelled seconds > 0, e.g. deadline = 2.0")


def _figures_and_checks(
    doc: dict[str, Any]
) -> tuple[tuple[dict[str, Any], ...], tuple[dict[str, Any], ...]]:
    figures = tuple(dict(f) for f in doc.get("figure", []))
    for f in figures:
        _unknown(f"[[figure]] {f.get('name')!r}", f,
                 {"name", "kind", "title", "variants", "metric", "xlabel", "xscale", "yscale"})
        if f.get("kind") not in _FIGURE_KINDS:
            raise ExperimentError(f"[[figure]] {f.get('name')!r}: kind={f.get('kind')!r} must be "
                                  f"one of {list(_FIGURE_KINDS)}")
    checks = tuple(dict(c) for c in doc.get("check", []))
    for c in checks:
        _unknown(f"[[check]] {c.get('claim')!r}", c,
                 {"claim", "kind", "metric", "variants", "margin", "ci", "ci_margin", "source",
                  "threshold"})
        if c.get("kind") not in _CHECK_KINDS:
            raise ExperimentError(f"[[check]] {c.get('claim')!r}: kind={c.get('kind')!r} must be "
                                  f"one of {list(_CHECK_KINDS)}")
    return figures, checks

