"""Read an experiment's results file, summarise it per variant and check the papers' claims (serial)."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hflmpi.experiments.spec import ExperimentError

__all__ = ["VariantResult", "CheckResult", "load_results", "summarize", "evaluate_checks",
           "first_time_at"]

# ---------------------------------------------------------------------------------------------
# Reading, summarising, checking (serial)


@dataclass
class VariantResult:
    """One variant's curves (one dict per seed) and attributes, as read from a results file."""

    name: str
    attrs: dict[str, Any]
    seeds: dict[int, dict[str, np.ndarray]]

    @property
    def label(self) -> str:
        """Return the variant's label for legends and tables (its name if none)."""
        return str(self.attrs.get("label", self.name))


def load_results(path: str | os.PathLike[str]) -> tuple[dict[str, Any], list[VariantResult]]:
    """Return the results file's root attributes and its variants in spec order."""
    import h5py

    if not Path(path).exists():
        raise ExperimentError(f"results file {path} does not exist; run the experiment first")
    with h5py.File(path, "r") as f:
        attrs = {k: (v.item() if isinstance(v, np.generic) else v) for k, v in f.attrs.items()}
        variants = []
        for name in json.loads(attrs["order"]):
            g = f["runs"][name]
            seeds = {int(k.split("_", 1)[1]): {d: g[k][d][()] for d in g[k]} for k in g}
            vattrs = {k: (v.item() if isinstance(v, np.generic) else v) for k, v in g.attrs.items()}
            variants.append(VariantResult(name, vattrs, seeds))
    return attrs, variants


def _seed_summary(c: dict[str, np.ndarray], last_steps: int) -> dict[str, float]:
    acc, steps = c["test_accuracy"], c["step"]
    finite = acc[np.isfinite(acc)]
    window = acc[np.isfinite(acc) & (steps > steps[-1] - last_steps)] if len(steps) else finite
    up, down = c["upward_divergence"], c["downward_divergence"]
    qe = c["quant_error"]
    qmeans = [float(np.nanmean(qe[:, j])) if np.isfinite(qe[:, j]).any() else math.nan
              for j in range(qe.shape[1])]
    return {
        "final_accuracy": float(finite[-1]) if finite.size else math.nan,
        "last_accuracy": float(window.mean()) if window.size else math.nan,
        "total_bytes": float(c["bytes_cum"][-1]) if len(c["bytes_cum"]) else math.nan,
        "model_time": float(c["model_time"][-1]) if len(c["model_time"]) else math.nan,
        "wall_time": float(c["wall_time"][-1]) if len(c["wall_time"]) else math.nan,
        "upward_divergence": float(np.nanmean(up)) if np.isfinite(up).any() else math.nan,
        "downward_divergence": float(np.nanmean(down)) if np.isfinite(down).any() else math.nan,
        "quant_error_max": max((q for q in qmeans if math.isfinite(q)), default=math.nan),
        **{f"quant_error_layer{j + 1}": q for j, q in enumerate(qmeans)},
        **_clock_summary(c),
    }


def _clock_summary(c: dict[str, np.ndarray]) -> dict[str, float]:
    """Return the final simulated time and the late updates (NaN where the run has no clock)."""
    sim = c.get("sim_time", np.array([]))
    late = c.get("late", np.array([]))
    finite = sim[np.isfinite(sim)]
    return {"sim_time": float(finite[-1]) if finite.size else math.nan,
            "late_total": float(np.nansum(late)) if np.isfinite(late).any() else math.nan}


def _time_axis(c: dict[str, np.ndarray]) -> np.ndarray:
    """Return the run's clock: the simulated time where recorded, else the modelled time."""
    sim = c.get("sim_time")
    return sim if sim is not None and np.isfinite(sim).any() else c["model_time"]


def first_time_at(c: dict[str, np.ndarray], target: float) -> float:
    """Return the time of the first evaluation whose test accuracy is >= ``target`` (NaN: never).

    The time is the simulated clock (``sim_time``) when the run records one, else the modelled
    time; a NaN target gives NaN.
    """
    acc = c["test_accuracy"]
    hits = np.flatnonzero(np.isfinite(acc) & (acc >= target))
    return float(_time_axis(c)[hits[0]]) if hits.size and math.isfinite(target) else math.nan


def _add_time_to_target(
    variants: list[VariantResult], per_seed: dict[str, dict[int, dict[str, float]]], target: float
) -> None:
    """Add ``target_accuracy``, ``time_to_target`` and ``time_ratio`` to every seed's summary.

    The target is ``target`` when finite, else the final accuracy of the variant's reference on
    the same seed. ``time_ratio`` divides the variant's time to that target by the reference's
    time to the same target on the same seed (a paired ratio; NaN without a reference).
    """
    by_name = {v.name: v for v in variants}
    for v in variants:
        ref = by_name.get(str(v.attrs.get("reference", "")))
        for seed, c in v.seeds.items():
            s = per_seed[v.name][seed]
            ref_run = ref.seeds.get(seed) if ref is not None else None
            goal = target if math.isfinite(target) else (
                per_seed[ref.name][seed]["final_accuracy"] if ref is not None and ref_run is not None
                else math.nan)
            s["target_accuracy"] = goal
            s["time_to_target"] = first_time_at(c, goal)
            ref_time = first_time_at(ref_run, goal) if ref_run is not None else math.nan
            s["time_ratio"] = (s["time_to_target"] / ref_time if ref_time > 0 else math.nan)


def summarize(path: str | os.PathLike[str]) -> dict[str, dict[str, tuple[float, float, list[float]]]]:
    """Return ``{variant: {metric: (mean, std, per-seed values)}}`` over seeds.

    Besides the per-run metrics (final and windowed accuracy, bytes, times, divergences,
    quantization errors, ``sim_time`` and ``late_total``), every variant gets
    ``target_accuracy``, ``time_to_target`` and ``time_ratio``: the spec's
    ``target_accuracy`` or, without one, the final accuracy of the variant's ``reference`` on
    the same seed; the first time (simulated clock, else modelled) the variant's test accuracy
    reaches it; and that time over the reference's time to the same target, seed by seed.
    """
    attrs, variants = load_results(path)
    last_steps = int(attrs.get("last_steps", 1))
    seeds = {v.name: {seed: _seed_summary(c, last_steps) for seed, c in v.seeds.items()}
             for v in variants}
    _add_time_to_target(variants, seeds, float(attrs.get("target_accuracy", math.nan)))
    out: dict[str, dict[str, tuple[float, float, list[float]]]] = {}
    for v in variants:
        per_seed = [s for _, s in sorted(seeds[v.name].items())]
        keys = sorted(set().union(*per_seed))
        out[v.name] = {}
        for key in keys:
            values = [s.get(key, math.nan) for s in per_seed]
            arr = np.asarray(values, dtype=np.float64)
            mean = float(np.mean(arr)) if arr.size else math.nan
            std = float(np.std(arr)) if arr.size > 1 else 0.0
            out[v.name][key] = (mean, std, values)
    return out


@dataclass(frozen=True)
class CheckResult:
    """The verdict on one ``[[check]]`` (a claim of a paper) for a results file."""

    claim: str
    kind: str
    passed: bool
    detail: str
    ci: bool


def evaluate_checks(path: str | os.PathLike[str], *, ci: bool = False) -> list[CheckResult]:
    """Evaluate the spec's claims on the seed means; ``ci`` uses each check's ``ci_margin``.

    ``order``: ``metric`` must not increase along ``variants`` by more than allowed: each value
    minus the next must be >= ``margin`` (negative margin = tolerance). ``close``: the two
    variants differ by at most ``margin``. ``finite``: the metric is finite for every seed.
    ``at_least``: every variant's metric is >= ``threshold``; ``at_most``: every one is <=
    ``threshold`` (e.g. ``time_ratio``). ``above_median``: the first
    variant's metric minus the median of the others is >= ``margin``. Checks naming a variant
    the results lack (e.g. a small run) are skipped; ``finite``, ``at_least`` and ``at_most``
    use the variants present.
    """
    attrs, _ = load_results(path)
    summary = summarize(path)
    results = []
    for c in json.loads(attrs["checks"]):
        names, metric, kind = list(c["variants"]), c.get("metric", "last_accuracy"), c["kind"]
        margin = float(c.get("ci_margin", c.get("margin", 0.0)) if ci else c.get("margin", 0.0))
        if kind in ("finite", "at_least", "at_most"):
            names = [n for n in names if n in summary]
        if not names or any(n not in summary for n in names):
            continue
        values = [summary[n].get(metric, (math.nan, 0.0, []))[0] for n in names]
        shown = ", ".join(f"{n}={val:.4g}" for n, val in zip(names, values))
        if kind == "order":
            passed = all(a - b >= margin for a, b in zip(values, values[1:]))
            detail = f"{metric}: {shown} (each minus the next >= {margin:g})"
        elif kind == "close":
            passed = abs(values[0] - values[1]) <= margin
            detail = f"{metric}: {shown} (|difference| {abs(values[0] - values[1]):.4g} <= {margin:g})"
        elif kind == "at_least":
            threshold = float(c.get("threshold", 0.0))
            passed = all(v >= threshold for v in values)
            detail = f"{metric}: {shown} (each >= {threshold:g})"
        elif kind == "at_most":
            threshold = float(c.get("threshold", 0.0))
            passed = all(v <= threshold for v in values)
            detail = f"{metric}: {shown} (each <= {threshold:g})"
        elif kind == "above_median":
            median = float(np.median(values[1:])) if len(values) > 1 else math.nan
            passed = values[0] - median >= margin
            detail = (f"{metric}: {names[0]}={values[0]:.4g}, median of the other "
                      f"{len(values) - 1} = {median:.4g} (difference >= {margin:g}); {shown}")
        else:
            seeds = [x for n in names for x in summary[n].get(metric, (0, 0, [math.nan]))[2]]
            passed = bool(seeds) and all(math.isfinite(x) for x in seeds)
            detail = f"{metric} finite for every seed: {shown}"
        results.append(CheckResult(str(c.get("claim", "")), kind, bool(passed), detail,
                                   bool(c.get("ci", False))))
    return results
