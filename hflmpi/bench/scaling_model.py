"""Cost-model predictions, tables and plots of the scaling rows (``hflmpi bench scaling plot``).

Serial. Fits the alpha-beta-gamma model to the timed collectives
(:func:`hflmpi.core.costmodel.calibrate`) and the compute per step to the runs that had a core per
rank, predicts rounds/second and bytes per round for 64..4096 ranks over named interconnects
(:data:`hflmpi.core.costmodel.INTERCONNECTS`), draws the measured points with the predictions to
PNGs and writes the tables. The rows come from :func:`hflmpi.bench.scaling.measure`.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from hflmpi.bench.scaling_table import latest_rows, read_table

__all__ = ["PREDICT_WORLDS", "predictions", "plot"]

PREDICT_WORLDS = [64, 128, 256, 512, 1024, 2048, 4096]



def predictions(
    rows: Sequence[dict[str, Any]], samples: Sequence[dict[str, Any]],
    worlds: Sequence[int] = PREDICT_WORLDS, numel: int | None = None,
    t_cp_override: float | None = None,
) -> dict[str, Any]:
    """Fit the cost model to the measurements and predict rounds/second and bytes per round.

    The fits: alpha-beta-gamma of shared memory from the collectives timed with ``p <= cores``
    ("shm-calibrated"; also over all samples and per ``p``, for the tables), compute per step
    ``t_cp(b) = c0 + c1 b`` and a fixed per-round overhead (round time minus compute minus
    communication) from the runs with ``world <= cores``. The predictions for ``worlds`` use
    :func:`hflmpi.core.costmodel.tree_for` trees with the measured schedule per depth, one core (or
    GPU) per rank, the per-rank batch of the mode (strong: the measured total batch split over
    the ranks, at least 1) and the named interconnects; "nvlink+ib-hdr" puts layer 1 (groups of
    8, one node) on NVLink and the layers above on InfiniBand. With ``numel`` (another model
    size) the per-sample compute term ``c1`` is scaled by ``numel / measured numel``;
    ``t_cp_override`` replaces the compute model by a fixed seconds per step (e.g. a GPU's).

    Returns ``{"network", "network_here", "per_world", "compute", "overhead", "networks",
    "measured_model", "predicted", "cores"}``; each prediction row has world, depth, mode,
    network, fanouts, batch, rounds_per_second, round_seconds, comm_seconds, bytes_per_round.
    """
    from hflmpi.core.costmodel import Sample

    rows = latest_rows(rows)
    if not rows:
        raise ValueError("no scaling rows to predict from")
    cores = int(rows[0].get("cores", 2))
    timed = [Sample(s["op"], int(s["world"]), float(s["nbytes"]), float(s["seconds"])) for s in samples]
    shm_here, shm, per_world = _fit_shared_memory(timed, cores)
    c0, c1, overhead = _fit_compute_and_overhead(rows, cores)
    networks = _networks(shm)

    def t_cp(batch: float, size: int | None = None, measured: int | None = None) -> float:
        # A different model size scales the per-sample term (MLP FLOPs ~ parameters).
        scale = size / measured if size and measured else 1.0
        return t_cp_override if t_cp_override is not None else c0 + c1 * batch * scale

    measured_model = []
    if shm_here is not None:
        measured_model = _measured_model(rows, cores, shm_here, per_world, (c0, c1), overhead)
    predicted = _predicted(rows, worlds, networks, numel, t_cp, overhead)
    return {"network": shm, "network_here": shm_here, "per_world": per_world, "compute": (c0, c1),
            "overhead": overhead,
            "networks": networks,
            "measured_model": measured_model, "predicted": predicted, "cores": cores}


def _fit_shared_memory(timed: Sequence[Any], cores: int) -> tuple[Any, Any, dict[int, Any]]:
    """Fit alpha-beta-gamma to the timed collectives: ``(shm_here, shm_calibrated, per_world)``.

    ``shm_here`` is fitted to all samples, ``per_world[p]`` to those at ``p`` ranks (when there
    are at least 3) and ``shm_calibrated`` to those with ``p <= cores``; all ``None`` (and an empty
    ``per_world``) with fewer than 3 samples of more than one rank.
    """
    from hflmpi.core.costmodel import calibrate

    # The predictions assume a core per rank, so they use the collectives timed with p <= cores;
    # the fits over all samples and per p (listed in the tables) show what oversubscription does.
    shm_here = shm = None
    per_world: dict[int, Any] = {}
    if sum(1 for s in timed if s.p > 1) >= 3:
        shm_here = calibrate(timed, "shm-here", note=f"fit to all {len(timed)} timed collectives")
        for p in sorted({s.p for s in timed if s.p > 1}):
            mine = [s for s in timed if s.p == p]
            if len(mine) >= 3:  # oversubscribed sizes get their own (much larger) alpha and beta
                per_world[p] = calibrate(mine, f"shm-here-{p}", note=f"fit to {len(mine)} collectives at p={p}")
        own_cores = [s for s in timed if 1 < s.p <= cores]
        shm = (calibrate(own_cores, "shm-calibrated",
                         note=f"fit to {len(own_cores)} timed collectives with p <= {cores} cores")
               if len(own_cores) >= 3 else replace(shm_here, name="shm-calibrated"))
    return shm_here, shm, per_world


def _fit_compute_and_overhead(rows: Sequence[dict[str, Any]], cores: int) -> tuple[float, float, float]:
    """Fit ``t_cp(b) = c0 + c1 b`` per SGD step and the per-round overhead: ``(c0, c1, overhead)``.

    From the runs with ``world <= cores`` (all runs if none); the overhead is the median of round
    time minus compute minus communication.
    """
    from hflmpi.core.costmodel import fit_compute

    own = [r for r in rows if int(r["world"]) <= cores] or rows
    steps = [math.prod(json.loads(r["tau"])) for r in own]
    c0, c1 = fit_compute([r["batch"] for r in own], [r["compute_seconds"] / s for r, s in zip(own, steps)])
    overhead = float(np.median([max(0.0, r["round_seconds"] - r["compute_seconds"] - r["comm_seconds"])
                                for r in own]))
    return c0, c1, overhead


def _networks(shm: Any) -> dict[str, Any]:
    """Return the interconnects to predict for, by name (a list: one network per layer group).

    The fitted shared memory (if any), InfiniBand HDR and 25 GbE with the fitted gamma, and
    "nvlink+ib-hdr" (layer 1 on NVLink inside the node, InfiniBand above).
    """
    from hflmpi.core.costmodel import INTERCONNECTS, with_gamma

    gamma = shm.gamma if shm is not None and shm.gamma > 0 else None
    networks: dict[str, Any] = {}
    if shm is not None:
        networks["shm-calibrated"] = shm
    for name in ("ib-hdr", "25gbe"):
        net = INTERCONNECTS[name]
        networks[name] = with_gamma(net, gamma) if gamma is not None else net
    networks["nvlink+ib-hdr"] = [INTERCONNECTS["nvlink"], networks["ib-hdr"]]  # layer 1 in the node
    return networks


def _measured_model(
    rows: Sequence[dict[str, Any]], cores: int, shm_here: Any, per_world: dict[int, Any],
    compute: tuple[float, float], overhead: float,
) -> list[dict[str, Any]]:
    """Return the model's prediction for each measured run with a core per rank (shared memory)."""
    from hflmpi.core.costmodel import predict

    c0, c1 = compute
    measured_model = []
    for r in rows:
        if int(r["world"]) > cores:
            continue  # oversubscribed: CPU time-slicing, not the network, sets the pace
        fanouts, tau, bits = json.loads(r["fanouts"]), json.loads(r["tau"]), json.loads(r["bits"])
        here = per_world.get(int(r["world"]), shm_here)
        out = predict(int(r["world"]), fanouts, tau, int(r["numel"]), c0 + c1 * r["batch"],
                      here, bits, overhead=overhead)
        measured_model.append({**_key(r), "network": "shm-here", **out})
    return measured_model


def _predicted(
    rows: Sequence[dict[str, Any]], worlds: Sequence[int], networks: dict[str, Any],
    numel: int | None, t_cp: Callable[[float, int | None, int | None], float], overhead: float,
) -> list[dict[str, Any]]:
    """Predict every (depth, mode) of ``rows`` at each of ``worlds`` ranks over each network."""
    from hflmpi.core.costmodel import predict, tree_for

    predicted = []
    reference = {(int(r["depth"]), r["mode"]): r for r in rows}
    for (depth, mode), r in sorted(reference.items()):
        tau, bits = json.loads(r["tau"]), json.loads(r["bits"])
        size = numel or int(r["numel"])
        total_batch = int(r["batch"]) * int(r["world"])
        for world in worlds:
            batch = max(1.0, total_batch / world) if mode == "strong" else float(r["batch"])
            fanouts = tree_for(world, depth)
            for name, net in networks.items():
                layer_nets = net
                if isinstance(net, list):
                    layer_nets = [net[0]] + [net[1]] * (depth - 1) if depth > 1 else [net[1]]
                out = predict(world, fanouts, tau, size, t_cp(batch, size, int(r["numel"])), layer_nets, bits,
                              overhead=overhead)
                out["world"] = world
                predicted.append({"world": world, "depth": depth, "mode": mode, "network": name,
                                  "fanouts": json.dumps(fanouts), "batch": batch, "numel": size, **out})
    return predicted


def _key(row: dict[str, Any]) -> dict[str, Any]:
    return {"world": int(row["world"]), "depth": int(row["depth"]), "mode": row["mode"],
            "fanouts": row["fanouts"]}


def _tables(rows: Sequence[dict[str, Any]], model: dict[str, Any]) -> str:
    lines = ["## Measured (this machine)", "",
             "| mode | ranks | depth | fanouts | batch/rank | rounds/s | compute s/round | comm s/round "
             "| bytes/round | model bytes/round | model rounds/s (P <= cores) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    fitted = {(m["world"], m["depth"], m["mode"]): m for m in model["measured_model"]}
    for r in latest_rows(rows):
        m = fitted.get((int(r["world"]), int(r["depth"]), r["mode"]))
        lines.append(
            f"| {r['mode']} | {r['world']} | {r['depth']} | {r['fanouts']} | {r['batch']} "
            f"| {r['rounds_per_second']:.1f} | {r['compute_seconds']:.4f} | {r['comm_seconds']:.4f} "
            f"| {r['bytes_per_round']:.0f} | {r['predicted_bytes_per_round']:.0f} "
            f"| {m['rounds_per_second']:.1f} |" if m else
            f"| {r['mode']} | {r['world']} | {r['depth']} | {r['fanouts']} | {r['batch']} "
            f"| {r['rounds_per_second']:.1f} | {r['compute_seconds']:.4f} | {r['comm_seconds']:.4f} "
            f"| {r['bytes_per_round']:.0f} | {r['predicted_bytes_per_round']:.0f} | oversubscribed |")
    c0, c1 = model["compute"]
    lines += ["", "## Fitted model", ""]
    for shm in [model["network"], model["network_here"], *model["per_world"].values()]:
        if shm is not None:
            lines.append(f"- {shm.name} ({shm.note}): alpha = {shm.alpha * 1e6:.2f} us, "
                         f"beta = {shm.beta * 1e9:.4f} ns/B "
                         f"({1 / shm.beta / 1e9 if shm.beta else math.inf:.2f} GB/s), "
                         f"gamma = {shm.gamma * 1e9:.4f} ns/B")
    lines.append(f"- compute per SGD step: t_cp(b) = {c0 * 1e3:.4f} ms + {c1 * 1e6:.3f} us x batch")
    lines.append(f"- fixed per-round overhead (metrics, HDF5 record): {model['overhead'] * 1e3:.2f} ms")
    lines += ["", "## Predicted rounds/second (bytes/round is network-independent)", ""]
    names = list(model["networks"])
    lines.append("| mode | depth | ranks | fanouts | batch/rank | " + " | ".join(names) + " | bytes/round |")
    lines.append("|---|---|---|---|---|" + "---|" * len(names) + "---|")
    grouped: dict[tuple[str, int, int], dict[str, Any]] = {}
    for p in model["predicted"]:
        grouped.setdefault((p["mode"], p["depth"], p["world"]), {})[p["network"]] = p
    for (mode, depth, world), by_net in sorted(grouped.items()):
        first = next(iter(by_net.values()))
        cells = " | ".join(f"{by_net[n]['rounds_per_second']:.2f}" for n in names)
        lines.append(f"| {mode} | {depth} | {world} | {first['fanouts']} | {first['batch']:g} | {cells} "
                     f"| {first['bytes_per_round']:.3g} |")
    return "\n".join(lines)


def plot(
    path: str | Path, plots: str | Path, numel: int | None = None,
    worlds: Sequence[int] = PREDICT_WORLDS, t_cp: float | None = None,
) -> tuple[list[Path], str]:
    """Draw measured scaling with the model's predictions to PNGs in ``plots``; return them and the tables."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_table(path, "runs")
    samples = read_table(path, "collectives")
    model = predictions(rows, samples, worlds=worlds, numel=numel, t_cp_override=t_cp)
    latest = latest_rows(rows)
    out_dir = Path(plots)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    depths = sorted({int(r["depth"]) for r in latest})
    for mode in sorted({r["mode"] for r in latest}):
        target = out_dir / f"scaling_{mode}_rounds.png"
        _plot_rounds(plt, latest, model, mode, depths, target)
        written.append(target)
    target = out_dir / "scaling_bytes.png"
    _plot_bytes(plt, latest, model, depths, target)
    written.append(target)
    return written, _tables(rows, model)


def _plot_rounds(
    plt: Any, latest: Sequence[dict[str, Any]], model: dict[str, Any], mode: str,
    depths: Sequence[int], target: Path,
) -> None:
    """Draw rounds/second against ranks for ``mode``, one panel per depth, to ``target``."""
    fig, axes = plt.subplots(1, len(depths), figsize=(5 * len(depths), 4), squeeze=False)
    for ax, depth in zip(axes[0], depths):
        mine = [r for r in latest if r["mode"] == mode and int(r["depth"]) == depth]
        ax.plot([r["world"] for r in mine], [r["rounds_per_second"] for r in mine], "ko",
                label="measured (2 cores)")
        fit = [m for m in model["measured_model"] if m["mode"] == mode and m["depth"] == depth]
        if fit:
            ax.plot([m["world"] for m in fit], [m["rounds_per_second"] for m in fit], "k--",
                    label="model, shm fit (P <= cores)")
        for name in model["networks"]:
            pts = [p for p in model["predicted"]
                   if p["mode"] == mode and p["depth"] == depth and p["network"] == name]
            ax.plot([p["world"] for p in pts], [p["rounds_per_second"] for p in pts], "-", label=name)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("ranks")
        ax.set_ylabel("rounds / second")
        ax.set_title(f"{mode} scaling, depth {depth}")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(target, dpi=110)
    plt.close(fig)


def _plot_bytes(
    plt: Any, latest: Sequence[dict[str, Any]], model: dict[str, Any], depths: Sequence[int],
    target: Path,
) -> None:
    """Draw uplink bytes per round against ranks (measured, model on ib-hdr) per mode to ``target``."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), squeeze=False)
    for ax, mode in zip(axes[0], ("strong", "weak")):
        for depth in depths:
            mine = [r for r in latest if r["mode"] == mode and int(r["depth"]) == depth]
            pts = [p for p in model["predicted"] if p["mode"] == mode and p["depth"] == depth
                   and p["network"] == "ib-hdr"]
            line, = ax.plot([p["world"] for p in pts], [p["bytes_per_round"] for p in pts], "-",
                            label=f"depth {depth} (model)")
            ax.plot([r["world"] for r in mine], [r["bytes_per_round"] for r in mine], "o",
                    color=line.get_color(), label=f"depth {depth} (measured)")
            ax.plot([r["world"] for r in mine], [r["predicted_bytes_per_round"] for r in mine], "x",
                    color="k", markersize=8)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("ranks")
        ax.set_ylabel("uplink bytes / round (all ranks)")
        ax.set_title(f"{mode} scaling (x: model at the measured trees)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(target, dpi=110)
    plt.close(fig)
