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

__all__ = ["VariantResult", "CheckResult", "load_results", "summarize", "evaluate_checks"]

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
    }


def summarize(path: str | os.PathLike[str]) -> dict[str, dict[str, tuple[float, float, list[float]]]]:
    """Return ``{variant: {metric: (mean, std, per-seed values)}}`` over seeds."""
    attrs, variants = load_results(path)
    last_steps = int(attrs.get("last_steps", 1))
    out: dict[str, dict[str, tuple[float, float, list[float]]]] = {}
    for v in variants:
        per_seed = [_seed_summary(c, last_steps) for _, c in sorted(v.seeds.items())]
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
    ``at_least``: every variant's metric is >= ``threshold``. ``above_median``: the first
    variant's metric minus the median of the others is >= ``margin``. Checks naming a variant
    the results lack (e.g. a small run) are skipped; ``finite`` and ``at_least`` use the
    variants present.
    """
    attrs, _ = load_results(path)
    summary = summarize(path)
    results = []
    for c in json.loads(attrs["checks"]):
        names, metric, kind = list(c["variants"]), c.get("metric", "last_accuracy"), c["kind"]
        margin = float(c.get("ci_margin", c.get("margin", 0.0)) if ci else c.get("margin", 0.0))
        if kind in ("finite", "at_least"):
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
