"""``hflmpi report``: summarise and plot one or more HDF5 run records side by side.

``summarize`` gives a text table with one column per run (rounds, final and best test accuracy,
final losses, wall time, throughput, total bytes per layer) followed by the config keys whose
values differ between the runs and, for runs that record a client population (``/clients``), how
often its clients took part. ``plot`` writes figures (PNG, PDF or SVG) with matplotlib's own
canvases (no pyplot, no global backend switch): accuracy vs round, accuracy vs wall time, loss vs
round and the mean bytes sent per round for each layer, summed over all devices and per device;
and, when a run records the simulated clock of a population (docs/async.md), accuracy vs
simulated time (``accuracy_vs_sim_time``), with the simulated time and the dropped (late)
updates in the table.
Series are labelled by the run's name (``run.name``, else the file's stem). Rounds without a value
(NaN, e.g. rounds between evaluations) are left out of the lines rather than breaking them.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from hflmpi.config import config_to_dict
from hflmpi.record.provenance import describe_provenance
from hflmpi.record.reading import read_metrics, read_participation, read_run_info
from hflmpi.record.run_config import read_run_config

__all__ = ["RunSummary", "load_runs", "summarize", "plot", "check_formats", "PLOT_FORMATS", "PLOT_STEMS",
           "PLOT_NAMES", "SIM_TIME_STEM"]

PLOT_STEMS = ("accuracy_vs_round", "accuracy_vs_time", "loss_vs_round", "bytes_per_layer")
PLOT_FORMATS = ("png", "pdf", "svg")
PLOT_NAMES = tuple(f"{stem}.png" for stem in PLOT_STEMS)  # the default format's file names
SIM_TIME_STEM = "accuracy_vs_sim_time"  # written when some run records the simulated clock
_UNSET = "(unset)"


class RunSummary:
    """One run's metrics, metadata and flattened config, as read from its file."""

    def __init__(self, path: Path, label: str) -> None:
        self.path = path
        self.label = label
        # The config first: a file that is not a run file gets read_run_config's clear message.
        self.config: dict[str, str] = _flatten_config(config_to_dict(read_run_config(path)))
        self.metrics: dict[str, np.ndarray] = read_metrics(path)
        self.info: dict[str, Any] = read_run_info(path)
        # (participants per round, rounds per client), or None without a /clients group
        self.participation: tuple[np.ndarray, np.ndarray] | None = read_participation(path)

    @property
    def rounds(self) -> np.ndarray:
        """Round numbers of the stored rows."""
        return self.metrics["round"]

    def last_finite(self, name: str) -> tuple[float, int | None]:
        """Return the last finite value of a scalar metric and its round (NaN, None if none)."""
        values = self.metrics[name]
        idx = np.flatnonzero(np.isfinite(values))
        if idx.size == 0:
            return math.nan, None
        return float(values[idx[-1]]), int(self.rounds[idx[-1]])

    def best(self, name: str) -> tuple[float, int | None]:
        """Return the largest finite value of a scalar metric and its round (NaN, None if none)."""
        values = self.metrics[name]
        if not np.isfinite(values).any():
            return math.nan, None
        i = int(np.nanargmax(values))
        return float(values[i]), int(self.rounds[i])


def _flatten_config(config: dict[str, Any]) -> dict[str, str]:
    """Return ``{"section.key": value as compact JSON}`` for every leaf of the nested config."""
    flat: dict[str, str] = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(f"{prefix}.{key}" if prefix else str(key), value)
        else:
            flat[prefix] = json.dumps(node, default=str, separators=(",", ":"))

    walk("", config)
    return flat


def _labels(paths: Sequence[Path], names: Sequence[str] = ()) -> list[str]:
    """Return short unique labels: run names (or file stems), made unique where they clash.

    A clash adds the file stem to named runs, then parent folders, then the whole path.
    """
    names = list(names) or [""] * len(paths)
    tries = [
        [name or p.stem for p, name in zip(paths, names)],
        [f"{name} ({p.stem})" if name else p.stem for p, name in zip(paths, names)],
        [f"{name} ({p.parent.name}/{p.stem})" if name else f"{p.parent.name}/{p.stem}"
         for p, name in zip(paths, names)],
    ]
    for labels in tries:
        if len(set(labels)) == len(labels):
            return labels
    return [str(p) for p in paths]


def load_runs(paths: Sequence[str | os.PathLike[str]]) -> list[RunSummary]:
    """Read run files into :class:`RunSummary` objects labelled for tables and legends.

    The label is the run's ``run.name`` when it has one, else the file's stem (see :func:`_labels`).
    """
    runs = [RunSummary(Path(p), "") for p in paths]
    names = [str(json.loads(run.config.get("run.name", '""')) or "") for run in runs]
    for run, label in zip(runs, _labels([run.path for run in runs], names)):
        run.label = label
    return runs


# -- text summary ----------------------------------------------------------------------------------
def _fmt_bytes(value: float) -> str:
    if not math.isfinite(value):
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024.0 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.2f} {unit}"
        value /= 1024.0
    return "-"  # pragma: no cover


def _fmt(value: float, spec: str, suffix: str = "") -> str:
    return "-" if not math.isfinite(value) else f"{value:{spec}}{suffix}"


def _fmt_at(
    value: float, round_: int | None, spec: str, scale: float = 1.0, suffix: str = ""
) -> str:
    if round_ is None:
        return "-"
    return f"{value * scale:{spec}}{suffix} (r{round_})"


def _run_rows(run: RunSummary, layers: int) -> list[tuple[str, str]]:
    acc, acc_round = run.last_finite("test_accuracy")
    best, best_round = run.best("test_accuracy")
    train, _ = run.last_finite("train_loss")
    test, _ = run.last_finite("test_loss")
    wall, _ = run.last_finite("wall_time")
    sps = run.metrics["samples_per_second"]
    mean_sps = float(np.nanmean(sps)) if np.isfinite(sps).any() else math.nan
    rows = [
        ("rounds", str(run.rounds.shape[0])),
        ("world size", str(run.info.get("world_size", "-"))),
        ("layers", str(run.info.get("layer_count", "-"))),
        ("final test accuracy", _fmt_at(acc, acc_round, ".2f", 100.0, "%")),
        ("best test accuracy", _fmt_at(best, best_round, ".2f", 100.0, "%")),
        ("final train loss", _fmt(train, ".4f")),
        ("final test loss", _fmt(test, ".4f")),
        ("wall time", _fmt(wall, ".1f", " s")),
        ("simulated time", _fmt(run.last_finite("sim_time")[0], ".1f", " s")
         if "sim_time" in run.metrics else "-"),
        ("mean samples/s", _fmt(mean_sps, ",.0f")),
    ]
    sent = run.metrics["bytes_sent"]
    totals = [float(np.nansum(sent[:, j])) if np.isfinite(sent[:, j]).any() else math.nan
              for j in range(sent.shape[1])]
    for j in range(layers):
        total = _fmt_bytes(totals[j]) if j < len(totals) else "-"
        rows.append((f"bytes sent, layer {j + 1}", total))
    finite = [t for t in totals if math.isfinite(t)]
    rows.append(("bytes sent, total", _fmt_bytes(sum(finite)) if finite else "-"))
    late = run.metrics.get("late")
    for j in range(layers):
        known = late is not None and j < late.shape[1] and np.isfinite(late[:, j]).any()
        rows.append((f"late updates, layer {j + 1}",
                     f"{np.nansum(late[:, j]):.0f}" if known and late is not None else "-"))
    rows.extend(_staleness_rows(run.metrics, layers))
    return rows


def _staleness_rows(metrics: Mapping[str, np.ndarray], layers: int) -> list[tuple[str, str]]:
    """Flushes (or carried late updates) and staleness of the buffered or carrying layers."""
    rows = []
    for j in range(layers):
        flushes, count = metrics.get("flushes"), metrics.get("staleness_count")
        if count is None or j >= count.shape[1] or not np.isfinite(count[:, j]).any():
            continue
        n, mean, top = count[:, j], metrics["staleness_mean"][:, j], metrics["staleness_max"][:, j]
        applied = float(np.nansum(n))
        overall = float(np.nansum(n * np.nan_to_num(mean))) / applied if applied else math.nan
        worst = float(np.nanmax(top)) if np.isfinite(top).any() else math.nan
        if flushes is not None and np.isfinite(flushes[:, j]).any():
            rows.append((f"flushes, layer {j + 1}", f"{np.nansum(flushes[:, j]):.0f}"))
        else:  # a deadline layer carrying its late updates (clock.late = "carry")
            rows.append((f"carried late updates, layer {j + 1}", f"{applied:.0f}"))
        rows += [(f"staleness mean/max, layer {j + 1}",
                  f"{_fmt(overall, '.2f')} / {_fmt(worst, '.0f')}")]
    return rows


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = []
    for row in [header, *rows]:
        cells = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:])]
        lines.append("  ".join(cells).rstrip())
    return lines


def _config_differences(runs: Sequence[RunSummary]) -> list[list[str]]:
    views = []
    for run in runs:
        view = dict(run.config)
        for key in ("world_size", "tree"):
            if key in run.info:
                value = run.info[key]
                view[f"(meta) {key}"] = json.dumps(value, separators=(",", ":"), default=str)
        views.append(view)
    keys = sorted(set().union(*views))
    rows = []
    for key in keys:
        values = [view.get(key, _UNSET) for view in views]
        if len(set(values)) > 1:
            rows.append([f"  {key}", *values])
    return rows


def _participation_lines(run: RunSummary) -> list[str]:
    """Lines on a run's client population: size, participants per round, rounds per client."""
    if run.participation is None:
        return []
    per_round, per_client = run.participation
    clients = int(per_client.shape[0])
    ever = int(np.count_nonzero(per_client))
    mean = f"{float(per_round.mean()):.2f}" if per_round.size else "-"
    lines = ["", f"clients of {run.label}",
             f"  population: {clients}",
             f"  mean participants per round: {mean} (over {per_round.size} rounds)",
             f"  ever participated: {100.0 * ever / clients:.2f}% ({ever} of {clients})"]
    lines.append(f"  rounds per client: min {int(per_client.min())}, "
                 f"median {float(np.median(per_client)):g}, max {int(per_client.max())}")
    return lines


def summarize(paths: Sequence[str | os.PathLike[str]]) -> str:
    """Return a text table comparing the runs in ``paths`` (one column per run).

    Rows: rounds, world size, layers, final and best test accuracy (with their round), final
    train and test loss, wall time, mean throughput, total bytes sent per layer and overall; then,
    for two or more runs, every config key (and the world size/tree) whose value differs; then
    for each run with a client population, its size, the mean participants per round, the
    fraction of clients that ever took part and the min/median/max rounds per client; then
    each run's provenance, one block per start or resume (versions, MPI library, hosts, Slurm
    job, command line, git commit).
    """
    runs = load_runs(paths)
    if not runs:
        raise ValueError("summarize needs at least one run file")
    layers = max(int(r.metrics["bytes_sent"].shape[1]) for r in runs)
    per_run = [_run_rows(run, layers) for run in runs]
    names = list(dict.fromkeys(name for rr in per_run for name, _ in rr))  # buffered rows: some
    values = [dict(rr) for rr in per_run]
    rows = [[name, *(v.get(name, "-") for v in values)] for name in names]
    lines = _table(["run", *(r.label for r in runs)], rows)
    if len(runs) > 1:
        diffs = _config_differences(runs)
        lines.append("")
        if diffs:
            lines.append("config differences")
            lines.extend(_table(["  key", *(r.label for r in runs)], diffs)[1:])
        else:
            lines.append("config differences: none")
    for run in runs:
        lines += _participation_lines(run)
    for run in runs:
        legs = run.info.get("provenance") or []
        lines += ["", f"provenance of {run.label}" + ("" if legs else ": not recorded")]
        lines += describe_provenance(legs)
    return "\n".join(lines) + "\n"


# -- plots -----------------------------------------------------------------------------------------
def _new_figure(title: str, xlabel: str, ylabel: str, panels: int = 1) -> tuple[Any, Any]:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ModuleNotFoundError as err:  # pragma: no cover - depends on the install
        raise ModuleNotFoundError(
            "hflmpi report plots need matplotlib: pip install 'hflmpi[report]'"
        ) from err
    fig = Figure(figsize=(7.0 * panels if panels > 1 else 7.0, 4.5), layout="constrained")
    FigureCanvasAgg(fig)  # savefig picks the canvas of the file's format (pdf, svg) itself
    axes = fig.subplots(1, panels, squeeze=False)[0]
    if panels > 1:
        fig.suptitle(title)
    else:
        axes[0].set_title(title)
    for ax in axes:
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
    return fig, axes[0] if panels == 1 else axes


def _line(ax: Any, x: np.ndarray, y: np.ndarray, **kwargs: Any) -> bool:
    mask = np.isfinite(x) & np.isfinite(y)
    if not mask.any():
        return False
    marker = "o" if mask.sum() < 30 else None
    ax.plot(x[mask], y[mask], marker=marker, markersize=3, **kwargs)
    return True


def _finish(fig: Any, axes: Any, drew: bool, out: Path, stem: str, formats: Sequence[str]) -> list[Path]:
    for ax in np.atleast_1d(axes):
        if drew:
            ax.legend(loc="best", fontsize="small")
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
    paths = [out / f"{stem}.{fmt}" for fmt in formats]
    for path in paths:
        fig.savefig(path, dpi=110)
    return paths


def check_formats(formats: Sequence[str]) -> list[str]:
    """Return the figure formats lower-cased, without dots or repeats; raise ValueError if unknown."""
    chosen = [f.lower().lstrip(".") for f in formats]
    bad = [f for f in chosen if f not in PLOT_FORMATS]
    if bad or not chosen:
        raise ValueError(f"plot format {bad or formats!r} is not one of {', '.join(PLOT_FORMATS)}; "
                         "give e.g. --format pdf,png")
    return list(dict.fromkeys(chosen))


def _accuracy_figures(runs: Sequence[RunSummary], out: Path, formats: Sequence[str]) -> list[Path]:
    written = []
    for stem, xkey, xlabel in ((PLOT_STEMS[0], "round", "global round"),
                               (PLOT_STEMS[1], "wall_time", "wall time [s]")):
        fig, ax = _new_figure(f"Test accuracy vs {xlabel.split(' [')[0]}", xlabel, "test accuracy [%]")
        drew = False
        for i, run in enumerate(runs):
            x = run.metrics[xkey].astype(np.float64)
            drew |= _line(ax, x, 100.0 * run.metrics["test_accuracy"], color=f"C{i}", label=run.label)
        written += _finish(fig, ax, drew, out, stem, formats)
    return written


def _sim_time_figure(runs: Sequence[RunSummary], out: Path,
                     formats: Sequence[str]) -> list[Path]:
    """Accuracy vs the simulated clock, for the runs that record it (none: no figure)."""
    timed = [(i, run) for i, run in enumerate(runs)
             if np.isfinite(run.metrics.get("sim_time", np.array([np.nan]))).any()]
    if not timed:
        return []
    fig, ax = _new_figure("Test accuracy vs simulated time", "simulated time [s]",
                          "test accuracy [%]")
    drew = False
    for i, run in timed:
        drew |= _line(ax, run.metrics["sim_time"], 100.0 * run.metrics["test_accuracy"],
                      color=f"C{i}", label=run.label)
    return _finish(fig, ax, drew, out, SIM_TIME_STEM, formats)


def _loss_figure(runs: Sequence[RunSummary], out: Path, formats: Sequence[str]) -> list[Path]:
    fig, ax = _new_figure("Training and test loss vs global round (solid: train, dashed: test)",
                          "global round", "loss")
    drew = False
    for i, run in enumerate(runs):
        x = run.rounds.astype(np.float64)
        drew |= _line(ax, x, run.metrics["train_loss"], color=f"C{i}", label=f"{run.label} train")
        drew |= _line(ax, x, run.metrics["test_loss"], color=f"C{i}", linestyle="--",
                      label=f"{run.label} test")
    return _finish(fig, ax, drew, out, PLOT_STEMS[2], formats)


def _bytes_figure(runs: Sequence[RunSummary], out: Path, formats: Sequence[str]) -> list[Path]:
    """Mean bytes per round and layer: summed over all devices (left), per device (right)."""
    fig, (total_ax, device_ax) = _new_figure("Bytes sent per global round, by tree layer", "tree layer",
                                             "", panels=2)
    total_ax.set_ylabel("bytes per round, summed over all devices")
    device_ax.set_ylabel("bytes per round, per device (sum / world size)")
    layers = max(int(r.metrics["bytes_sent"].shape[1]) for r in runs)
    width = 0.8 / max(len(runs), 1)
    drew = False
    for i, run in enumerate(runs):
        sent = run.metrics["bytes_sent"]  # summed over every rank (a SUM reduction per round)
        means = np.array([np.nanmean(sent[:, j]) if np.isfinite(sent[:, j]).any() else 0.0
                          for j in range(sent.shape[1])])
        devices = max(1, int(run.info.get("world_size", 1)))
        if sent.shape[1]:
            pos = np.arange(1, sent.shape[1] + 1) + (i - (len(runs) - 1) / 2) * width
            total_ax.bar(pos, means, width=width, color=f"C{i}", label=run.label)
            device_ax.bar(pos, means / devices, width=width, color=f"C{i}",
                          label=f"{run.label} ({devices} devices)")
            drew = True
    for ax in (total_ax, device_ax):
        ax.set_xticks(np.arange(1, layers + 1))
    return _finish(fig, (total_ax, device_ax), drew, out, PLOT_STEMS[3], formats)


def plot(
    paths: Sequence[str | os.PathLike[str]], out_dir: str | os.PathLike[str],
    formats: Sequence[str] = ("png",),
) -> list[Path]:
    """Write comparison figures of the runs into ``out_dir`` (created if needed).

    Parameters
    ----------
    paths : sequence of path-like
        Run files; each series is labelled by its run's name (``run.name``, else the file stem).
    out_dir : path-like
        Where the figures go.
    formats : sequence of {"png", "pdf", "svg"}
        One file per figure and format.

    Returns
    -------
    list of Path
        For each figure in :data:`PLOT_STEMS` order, one file per format: ``accuracy_vs_round``,
        ``accuracy_vs_time``, ``loss_vs_round`` and ``bytes_per_layer`` (grouped bars: mean bytes
        sent per round, per layer and run; summed over all devices and per device); then
        :data:`SIM_TIME_STEM` when some run records the simulated clock.

    Raises
    ------
    ValueError
        If a format is not one of :data:`PLOT_FORMATS`.
    """
    chosen = check_formats(formats)
    runs = load_runs(paths)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return [*_accuracy_figures(runs, out, chosen), *_loss_figure(runs, out, chosen),
            *_bytes_figure(runs, out, chosen), *_sim_time_figure(runs, out, chosen)]
