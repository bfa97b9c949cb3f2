"""Serial tests of the simulated clock in :mod:`hflmpi.experiments`: time to target, ``at_most``.

A results file is written by hand in the documented layout, with curves whose times to target
are worked out by hand below; one small population experiment runs on one rank.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest

from hflmpi.experiments import (
    ExperimentError,
    evaluate_checks,
    load_experiment,
    plot_results,
    results_markdown,
    summarize,
)

NAN = math.nan
# variant: (reference, {seed: (test_accuracy, sim_time, late at layer 1)})
RUNS = {
    "sync": ("sync", {0: ([0.5, 0.7, NAN, 0.8], [2.0, 4.0, 6.0, 8.0], [0, 0, 0, 0]),
                      1: ([0.6, 0.9, 0.85, 0.85], [2.0, 4.0, 6.0, 8.0], [0, 0, 0, 0])}),
    "fast": ("sync", {0: ([0.6, 0.8, 0.9, 0.7], [1.0, 2.0, 3.0, 4.0], [1, 2, 0, 1]),
                      1: ([0.5, 0.84, 0.86, 0.9], [1.0, 2.0, 3.0, 4.0], [0, 3, 0, 0])}),
    "never": ("sync", {0: ([0.5] * 4, [1.0, 2.0, 3.0, 4.0], [0] * 4),
                       1: ([0.5] * 4, [1.0, 2.0, 3.0, 4.0], [0] * 4)}),
    "free": ("", {0: ([0.7, 0.8, 0.8, 0.9], [NAN] * 4, [NAN] * 4),
                  1: ([0.7, 0.75, 0.85, 0.9], [NAN] * 4, [NAN] * 4)}),
}


def _results(path: Path, checks: list[dict], target: float = NAN) -> Path:
    import h5py

    with h5py.File(path, "w") as f:
        f.attrs.update(experiment="clk", title="Clock", description="", spec_toml="", small=False,
                       world_size=2, hflmpi_version="0", last_steps=20, numel=10, timing="{}",
                       checks=json.dumps(checks), order=json.dumps(list(RUNS)),
                       target_accuracy=target,
                       figures=json.dumps([{"name": "sim", "kind": "accuracy_vs_sim_time"}]))
        for name, (reference, seeds) in RUNS.items():
            g = f.create_group(f"runs/{name}")
            g.attrs.update(label=name, tau="[5]", tree="fanouts [8]", bits="[0]", x=NAN, steps=40,
                           round_time=0.1, reference=reference,
                           clock="sync" if name == "sync" else "deadline 1 s")
            for seed, (acc, sim, late) in seeds.items():
                s = g.create_group(f"seed_{seed}")
                rounds = np.arange(1, 5)
                s["round"], s["step"] = rounds, rounds * 10
                s["test_accuracy"], s["sim_time"] = np.array(acc), np.array(sim)
                s["model_time"] = rounds * 0.1
                s["late"] = np.array(late, dtype=np.float64)[:, None]
                for key in ("test_loss", "train_loss", "wall_time", "upward_divergence",
                            "downward_divergence", "bytes_cum"):
                    s[key] = np.ones(4)
                for key in ("bytes_sent", "compute_seconds", "comm_seconds", "quant_error"):
                    s[key] = np.ones((4, 1))
    return path


def test_time_to_the_reference_final_accuracy_seed_by_seed(tmp_path):
    s = summarize(_results(tmp_path / "r.h5", []))
    # targets: sync's final accuracy on each seed (0.8 on seed 0, 0.85 on seed 1)
    assert s["fast"]["target_accuracy"][2] == pytest.approx([0.8, 0.85])
    # sync reaches 0.8 at t=8 (seed 0) and 0.85 at t=4 (seed 1); fast at t=2 and t=3
    assert s["sync"]["time_to_target"][2] == pytest.approx([8.0, 4.0])
    assert s["fast"]["time_to_target"][2] == pytest.approx([2.0, 3.0])
    assert s["sync"]["time_ratio"][2] == pytest.approx([1.0, 1.0])
    assert s["fast"]["time_ratio"][2] == pytest.approx([0.25, 0.75])  # paired, not 5/12
    assert s["fast"]["time_ratio"][0] == pytest.approx(0.5)
    assert s["fast"]["time_ratio"][1] == pytest.approx(0.25)
    assert all(math.isnan(x) for x in s["never"]["time_to_target"][2] + s["never"]["time_ratio"][2])
    assert math.isnan(s["free"]["time_to_target"][0]) and math.isnan(s["free"]["time_ratio"][0])
    assert s["fast"]["sim_time"][2] == [4.0, 4.0] and s["fast"]["late_total"][2] == [4.0, 3.0]
    assert math.isnan(s["free"]["sim_time"][0]) and math.isnan(s["free"]["late_total"][0])


def test_a_fixed_target_and_the_modelled_time_without_a_clock(tmp_path):
    s = summarize(_results(tmp_path / "r.h5", [], target=0.85))
    assert s["sync"]["time_to_target"][2] == pytest.approx([NAN, 4.0], nan_ok=True)
    assert s["fast"]["time_to_target"][2] == pytest.approx([3.0, 3.0])
    assert s["fast"]["time_ratio"][2] == pytest.approx([NAN, 0.75], nan_ok=True)
    # no simulated clock: the modelled time of the round (0.1 s a round) is the time axis
    assert s["free"]["time_to_target"][2] == pytest.approx([0.4, 0.3])


def test_at_most_check_and_the_time_to_target_table(tmp_path):
    checks = [
        {"claim": "fast within half", "kind": "at_most", "metric": "time_ratio",
         "variants": ["fast", "missing"], "threshold": 0.5},
        {"claim": "fast within 0.4", "kind": "at_most", "metric": "time_ratio",
         "variants": ["fast"], "threshold": 0.4},
        {"claim": "never fails", "kind": "at_most", "metric": "time_ratio",
         "variants": ["fast", "never"], "threshold": 0.5},
    ]
    path = _results(tmp_path / "r.h5", checks)
    assert {c.claim: c.passed for c in evaluate_checks(path)} == {
        "fast within half": True, "fast within 0.4": False, "never fails": False}
    text = results_markdown(path)
    rows = {line.split(" | ")[0]: line for line in text.splitlines() if line.startswith("| ")}
    assert rows["| fast: fast"] == ("| fast: fast | deadline 1 s | 40 | 80.0 ± 10.0 | 82.5 ± 2.5 | "
                                    "4.00 | 2.50 ± 0.50 | 0.50 ± 0.25 (of sync) | 3.5 ± 0.5 |")
    assert "| never on 2/2 seeds | never on 2/2 seeds (of sync) |" in rows["| never: never"]
    assert rows["| free: free"].endswith("| - | - | - | - | - |")


def test_accuracy_vs_sim_time_figure(tmp_path):
    pytest.importorskip("matplotlib")
    figures = plot_results(_results(tmp_path / "r.h5", []), tmp_path / "out", formats=["svg"])
    assert [p.name for p in figures] == ["clk_sim.svg"]
    comments = re.findall(r"<!-- (.*?) -->", figures[0].read_text())
    xlabel = "simulated time [s] (device profiles, mean over seeds)"
    assert "Clock: test accuracy vs simulated time" in comments
    # the x ticks span the simulated times (1 ... 8 s), not the modelled ones (0.1 ... 0.4 s)
    assert comments[:comments.index(xlabel)] == [str(t) for t in range(1, 9)]


SPEC = """
[experiment]
seeds = [3]
steps = 12
eval_every_steps = 4
reference = "sync"
[base.run]
divergence = false
[base.clients]
count = 6
online = 0.9
[base.clock]
slow_fraction = 0.34
[base.data]
name = "digits"
[base.model]
name = "logreg"
[base.optim]
batch_size = 8
[base.topology]
fanouts = [6]
[base.schedule]
tau = [4]
[[variant]]
name = "sync"
[[variant]]
name = "deadline"
clock = { mode = ["deadline"], deadline = [0.2] }
"""


def test_spec_keys_for_the_clock(tmp_path):
    path = tmp_path / "spec.toml"
    path.write_text(SPEC)
    exp = load_experiment(path)
    assert [v.reference for v in exp.variants] == ["sync", "sync"] and math.isnan(exp.target_accuracy)
    config = exp.variant("deadline").run_config(3, "d.h5", 4)
    assert config.clock.mode == ("deadline",) and config.clock.slow_fraction == 0.34
    path.write_text(SPEC.replace('reference = "sync"', 'reference = "synk"'))
    with pytest.raises(ExperimentError, match=r"variant 'sync': reference='synk' names no variant"):
        load_experiment(path)
    path.write_text(SPEC.replace('reference = "sync"', "target_accuracy = 90"))
    with pytest.raises(ExperimentError, match=r"experiment.target_accuracy=90 must be"):
        load_experiment(path)


def test_clock_curves_reach_the_results_file(tmp_path):
    """A deadline population on one rank: the results hold the run files' clock, verbatim."""
    pytest.importorskip("mpi4py")
    from mpi4py import MPI

    from hflmpi.experiments import load_results, run_experiment
    from hflmpi.record.reading import read_metrics

    spec = tmp_path / "spec.toml"
    spec.write_text(SPEC)
    out = run_experiment(spec, tmp_path / "r.h5", MPI.COMM_SELF, stream=open("/dev/null", "w"))
    _, variants = load_results(out)
    s = summarize(out)
    for v in variants:
        run = read_metrics(tmp_path / "r.runs" / f"{v.name}__seed3.h5")
        np.testing.assert_array_equal(v.seeds[3]["sim_time"], run["sim_time"])
        np.testing.assert_array_equal(v.seeds[3]["late"], run["late"])
        assert v.attrs["reference"] == "sync"
    sync = read_metrics(tmp_path / "r.runs" / "sync__seed3.h5")
    assert variants[1].attrs["clock"] == "deadline 0.2 s" and variants[0].attrs["clock"] == "sync"
    assert s["deadline"]["late_total"][0] > 0 and s["sync"]["late_total"][0] == 0
    # the sync run reaches its own final accuracy no later than its last round
    final = sync["test_accuracy"][np.isfinite(sync["test_accuracy"])][-1]
    first = int(np.argmax(sync["test_accuracy"] >= final))
    assert s["sync"]["time_to_target"][0] == sync["sim_time"][first]
