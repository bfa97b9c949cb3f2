"""Figures and the markdown table of an experiment's results (serial)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from hflmpi.experiments.results import VariantResult, evaluate_checks, load_results, summarize
from hflmpi.record.report import check_formats

__all__ = ["plot_results", "results_markdown"]

# ---------------------------------------------------------------------------------------------
# Figures and the markdown table (serial)


def _figure(title: str, panels: int = 1) -> tuple[Any, list[Any]]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.0 * panels + 1.0, 3.8), layout="constrained")
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(1, panels, i + 1) for i in range(panels)]
    fig.suptitle(title, fontsize="medium")
    for ax in axes:
        ax.grid(True, alpha=0.3)
    return fig, axes


def _mean_curve(v: VariantResult, xkey: str, ykey: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Return x and the seed mean, min and max of y at the rows where y is finite for every seed."""
    runs = [c for _, c in sorted(v.seeds.items())]
    n = min(len(c[ykey]) for c in runs)
    ys = np.stack([c[ykey][:n] for c in runs])
    xs = np.stack([c[xkey][:n] for c in runs]).astype(np.float64).mean(axis=0)
    mask = np.isfinite(ys).all(axis=0)
    ys = ys[:, mask]
    return xs[mask], ys.mean(axis=0), ys.min(axis=0), ys.max(axis=0)


def _curves(ax: Any, variants: Sequence[VariantResult], xkey: str, ykey: str, scale: float = 1.0) -> None:
    for i, v in enumerate(variants):
        x, mean, lo, hi = _mean_curve(v, xkey, ykey)
        if not x.size:
            continue
        ax.plot(x, mean * scale, color=f"C{i}", label=v.label, marker="o" if x.size < 25 else None,
                markersize=3)
        if len(v.seeds) > 1:
            ax.fill_between(x, lo * scale, hi * scale, color=f"C{i}", alpha=0.15, linewidth=0)


#: The x axis (results column, label) of each "accuracy_vs_*" figure kind.
_ACCURACY_AXES = {"accuracy_vs_steps": ("step", "SGD steps per device"),
                  "accuracy_vs_bytes": ("bytes_cum", "cumulative bytes sent, summed over all devices "
                                        "and layers"),
                  "accuracy_vs_time": ("model_time", "modelled wall time [s]"),
                  "accuracy_vs_sim_time": ("sim_time", "simulated time [s] (device profiles, "
                                           "mean over seeds)")}


_SUBTITLES = {"accuracy_vs_steps": "test accuracy vs SGD steps",
              "accuracy_vs_bytes": "test accuracy vs bytes sent",
              "accuracy_vs_time": "test accuracy vs modelled time",
              "accuracy_vs_sim_time": "test accuracy vs simulated time",
              "divergence": "H-SGD divergences", "quant_vs_bits": "quantization error and accuracy vs bits"}


def _titles(experiment_title: str, figures: Sequence[dict[str, Any]], small: bool) -> list[str]:
    """Return one distinct title per figure: its own, or the experiment's plus what it shows."""
    titles: list[str] = []
    for spec in figures:
        shows = _SUBTITLES.get(spec["kind"]) or (
            f"{spec.get('metric', 'last_accuracy').replace('_', ' ')} vs {spec.get('xlabel', 'x')}")
        title = spec.get("title") or f"{experiment_title}: {shows}"
        if title in titles:
            title += f" ({spec['name']})"
        titles.append(title + (" (small)" if small else ""))
    return titles


def plot_results(
    path: str | os.PathLike[str], out_dir: str | os.PathLike[str], formats: Sequence[str] = ("png",),
) -> list[Path]:
    """Draw the spec's ``[[figure]]`` entries as ``<experiment>_<figure>.<format>`` in ``out_dir``.

    ``formats`` holds any of png, pdf, svg (one file per figure and format); series are labelled
    by variant, and every figure gets a distinct title.
    """
    formats = check_formats(formats)
    attrs, variants = load_results(path)
    by_name = {v.name: v for v in variants}
    summary = summarize(path)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    figures = json.loads(attrs["figures"]) or [{"name": "accuracy", "kind": "accuracy_vs_steps"}]
    written = []
    for spec, title in zip(figures, _titles(str(attrs["title"]), figures, bool(attrs.get("small")))):
        chosen = [by_name[n] for n in spec.get("variants", list(by_name)) if n in by_name]
        if not chosen:
            continue
        kind = spec["kind"]
        if kind in _ACCURACY_AXES:
            fig = _draw_accuracy(kind, title, chosen)
        elif kind == "divergence":
            fig = _draw_divergence(title, chosen)
        elif kind == "quant_vs_bits":
            fig = _draw_quant_vs_bits(title, chosen, summary)
        else:  # metric_vs_x
            fig = _draw_metric_vs_x(title, chosen, summary, spec)
        if kind != "quant_vs_bits" and spec.get("yscale"):
            fig.axes[0].set_yscale(spec["yscale"])
        for fmt in formats:
            target = out / f"{attrs['experiment']}_{spec['name']}.{fmt}"
            fig.savefig(target, dpi=90)
            written.append(target)
    return written


def _draw_accuracy(kind: str, title: str, chosen: Sequence[VariantResult]) -> Any:
    """Draw test accuracy against steps, bytes or modelled time (``kind``); return the figure."""
    xkey, xlabel = _ACCURACY_AXES[kind]
    fig, (ax,) = _figure(title)
    _curves(ax, chosen, xkey, "test_accuracy", 100.0)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("test accuracy [%]")
    if kind == "accuracy_vs_bytes":
        ax.set_xscale("log")
    ax.legend(fontsize="x-small", loc="lower right")
    return fig


def _draw_divergence(title: str, chosen: Sequence[VariantResult]) -> Any:
    """Draw the upward and downward divergence against steps, one panel each; return the figure."""
    fig, axes = _figure(title, panels=2)
    for ax, key, name in zip(axes, ("upward_divergence", "downward_divergence"),
                             ("upward (groups vs global)", "downward (devices vs group)")):
        _curves(ax, chosen, "step", key)
        ax.set_yscale("log")
        ax.set_xlabel("SGD steps per device")
        ax.set_ylabel(f"{name} divergence")
    axes[0].legend(fontsize="x-small", loc="best")
    return fig


def _draw_quant_vs_bits(
    title: str, chosen: Sequence[VariantResult], summary: dict[str, dict[str, Any]]
) -> Any:
    """Draw quantization error and accuracy against the bits of the one quantized layer."""
    fig, axes = _figure(title, panels=2)
    points: dict[int, list[tuple[int, str]]] = {}
    for v in chosen:
        bits = json.loads(v.attrs["bits"])
        quantized = [j for j, b in enumerate(bits) if b]
        if len(quantized) == 1:
            points.setdefault(quantized[0] + 1, []).append((bits[quantized[0]], v.name))
    for i, (layer, pts) in enumerate(sorted(points.items())):
        pts.sort()
        b = [p[0] for p in pts]
        qe = [summary[n].get(f"quant_error_layer{layer}", (math.nan,))[0] for _, n in pts]
        acc = [100 * summary[n]["last_accuracy"][0] for _, n in pts]
        axes[0].plot(b, qe, marker="o", color=f"C{i}", label=f"layer {layer} quantized")
        axes[1].plot(b, acc, marker="o", color=f"C{i}", label=f"layer {layer} quantized")
    exact = [v.name for v in chosen if not any(json.loads(v.attrs["bits"]))]
    if exact:
        axes[1].axhline(100 * summary[exact[0]]["last_accuracy"][0], color="k",
                        linestyle="--", label="no quantization")
    axes[0].set_yscale("log")
    axes[0].set_ylabel("relative quantization error E||Q(d)-d||^2/||d||^2")
    axes[1].set_ylabel("test accuracy, mean of last evaluations [%]")
    for ax in axes:
        ax.set_xlabel("bits at the quantized layer")
        ax.set_xscale("log", base=2)
        ax.legend(fontsize="x-small")
    return fig


def _draw_metric_vs_x(
    title: str, chosen: Sequence[VariantResult], summary: dict[str, dict[str, Any]],
    spec: dict[str, Any],
) -> Any:
    """Draw a summary metric (mean and std over seeds) against each variant's ``x``."""
    metric = spec.get("metric", "last_accuracy")
    fig, (ax,) = _figure(title)
    xs = np.array([v.attrs.get("x", math.nan) for v in chosen], dtype=np.float64)
    ms = np.array([summary[v.name][metric][0] for v in chosen])
    sd = np.array([summary[v.name][metric][1] for v in chosen])
    scale = 100.0 if "accuracy" in metric else 1.0
    ax.errorbar(xs, ms * scale, yerr=sd * scale, marker="o", capsize=3)
    ax.set_xlabel(spec.get("xlabel", "x"))
    ax.set_ylabel(metric.replace("_", " ") + (" [%]" if scale == 100.0 else ""))
    ax.set_xscale(spec.get("xscale", "linear"))
    return fig


def _pm(mean: float, std: float, scale: float = 1.0, spec: str = ".1f") -> str:
    if not math.isfinite(mean):
        return "-"
    return f"{mean * scale:{spec}} ± {std * scale:{spec}}" if std else f"{mean * scale:{spec}}"


def _seeds_pm(values: Sequence[float], scale: float = 1.0, spec: str = ".2f",
              missing: str = "never on {n}/{of} seeds") -> str:
    """Return mean ± std over seeds, or ``missing`` where some seed has no value."""
    arr = np.asarray(values, dtype=np.float64)
    n = int(np.count_nonzero(~np.isfinite(arr)))
    if n:
        return missing.format(n=n, of=arr.size)
    return _pm(float(arr.mean()), float(arr.std()) if arr.size > 1 else 0.0, scale, spec)


def _clock_table(variants: Sequence[VariantResult], summary: dict[str, dict[str, Any]]) -> list[str]:
    """Return the time-to-target table (simulated clock), or nothing when no run has a target."""
    if not any(math.isfinite(x) for v in variants
               for x in summary[v.name]["target_accuracy"][2] + summary[v.name]["sim_time"][2]):
        return []
    header = ["variant", "clock", "steps", "final acc [%]", "target acc [%]", "sim time [s]",
              "time to target [s]", "ratio to reference", "late updates"]
    lines = ["", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for v in variants:
        s = summary[v.name]
        ref = str(v.attrs.get("reference", ""))
        has_target = any(math.isfinite(x) for x in s["target_accuracy"][2])
        row = [f"{v.name}: {v.label}", str(v.attrs.get("clock", "")) or "-",
               str(v.attrs.get("steps", "")), _pm(s["final_accuracy"][0], s["final_accuracy"][1], 100.0),
               _seeds_pm(s["target_accuracy"][2], 100.0, ".1f", "-"),
               _seeds_pm(s["sim_time"][2], missing="-"),
               _seeds_pm(s["time_to_target"][2]) if has_target else "-",
               (_seeds_pm(s["time_ratio"][2]) + f" (of {ref})") if ref and has_target else "-",
               _seeds_pm(s["late_total"][2], spec=".1f", missing="-")]
        lines.append("| " + " | ".join(row) + " |")
    return lines + ["", "Time: the simulated clock where the runs record one (docs/async.md), "
                    "else the modelled time; target: the spec's target_accuracy, else the final "
                    "accuracy of the reference variant on the same seed; ratio: time to target "
                    "over the reference's time to the same target, seed by seed."]


def results_markdown(path: str | os.PathLike[str], figures: Sequence[Path] = ()) -> str:
    """Return the markdown table of a results file, with the checks' verdicts and figure links."""
    attrs, variants = load_results(path)
    summary = summarize(path)
    seeds = sorted(variants[0].seeds) if variants else []
    lines = [f"### {attrs['title']}{' (small)' if attrs.get('small') else ''}", ""]
    if attrs.get("description"):
        lines += [str(attrs["description"]), ""]
    lines += [f"Seeds {seeds}; accuracy = mean ± std over seeds of the final test accuracy and "
              f"of the mean over the evaluations in the last {attrs.get('last_steps', 1)} steps; bytes = all "
              "layers, all ranks; modelled time as stated in the spec's [timing].", ""]
    header = ["variant", "tree", "tau", "bits", "steps", "final acc [%]",
              f"acc, last {attrs.get('last_steps', 1)} steps [%]", "MB sent", "model time [s]",
              "up div", "down div", "max quant err"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for v in variants:
        s = summary[v.name]
        row = [f"{v.name}: {v.label}", str(v.attrs.get("tree", "")), str(v.attrs.get("tau", "")),
               str(v.attrs.get("bits", "")), str(v.attrs.get("steps", "")),
               _pm(*s["final_accuracy"][:2], 100.0), _pm(*s["last_accuracy"][:2], 100.0),
               f"{s['total_bytes'][0] / 1e6:.2f}", f"{s['model_time'][0]:.2f}",
               _pm(*s["upward_divergence"][:2], spec=".3g"),
               _pm(*s["downward_divergence"][:2], spec=".3g"),
               _pm(*s["quant_error_max"][:2], spec=".3g")]
        lines.append("| " + " | ".join(row) + " |")
    lines += _clock_table(variants, summary)
    checks = evaluate_checks(path)
    if checks:
        lines += ["", "| claim | verdict | values |", "|---|---|---|"]
        for c in checks:
            lines.append(f"| {c.claim} | {'holds' if c.passed else 'FAILS'} | {c.detail} |")
    if figures:
        lines += ["", "Figures: " + ", ".join(f"[{p.name}]({p.name})" for p in figures)]
    return "\n".join(lines) + "\n"
