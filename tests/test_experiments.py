"""Serial tests of :mod:`hflmpi.experiments`: specs, the time model, checks, tables and plots.

The MPI part (training the small sweeps) is in ``test_experiments_mpi.py``; here a results file
is written by hand in the documented layout.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest

from hflmpi.core.costmodel import round_time
from hflmpi.core.wire import bytes_ratio
from hflmpi.experiments import (
    ExperimentError,
    Timing,
    evaluate_checks,
    load_experiment,
    plot_results,
    results_markdown,
    summarize,
)

SPECS = sorted((Path(__file__).resolve().parents[1] / "experiments").glob("*.toml"))


@pytest.mark.parametrize("spec", SPECS, ids=[p.stem for p in SPECS])
@pytest.mark.parametrize("small", [False, True])
def test_every_shipped_spec_validates(spec, small):
    exp = load_experiment(spec, small=small)
    assert exp.seeds and (exp.variants or exp.plan is not None)
    for v in exp.variants:
        config = v.run_config(exp.seeds[0], "x.h5", exp.eval_every_steps)
        assert config.run.rounds * v.period == v.steps


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "spec.toml"
    path.write_text(text)
    return path


BASE = """
[experiment]
seeds = [0]
steps = 40
[[variant]]
name = "a"
schedule = { tau = [5] }
"""


def test_unknown_keys_and_bad_steps_are_named(tmp_path):
    with pytest.raises(ExperimentError, match=r"\[experiment\] has unknown key\(s\) \['stpes'\]"):
        load_experiment(_write(tmp_path, "[experiment]\nstpes = 3\n"))
    bad_steps = BASE.replace("tau = [5]", "tau = [3]")
    with pytest.raises(ExperimentError, match=r"steps=40 is not a multiple of prod\(tau\)=3"):
        load_experiment(_write(tmp_path, bad_steps))
    bad_config = BASE + 'optim = { lr = -1.0 }\n'
    with pytest.raises(ExperimentError, match=r"variant 'a': optim.lr=-1.0"):
        load_experiment(_write(tmp_path, bad_config))


def test_topology_is_replaced_and_other_sections_merged(tmp_path):
    text = BASE + """
[base.topology]
fanouts = [4, 2]
[base.optim]
lr = 0.2
batch_size = 16
[[variant]]
name = "b"
topology = { groups = [[0, 1], [2, 3]] }
schedule = { tau = [5, 2] }
optim = { lr = 0.1 }
"""
    text = text.replace('name = "a"\nschedule = { tau = [5] }', 'name = "a"\nschedule = { tau = [5, 8] }')
    exp = load_experiment(_write(tmp_path, text))
    b = exp.variant("b").run_config(0, "b.h5", 10)
    assert b.topology.groups == ((0, 1), (2, 3)) and b.topology.fanouts is None
    assert b.optim.lr == 0.1 and b.optim.batch_size == 16
    assert b.run.rounds == 4 and b.run.eval_every == 1 and b.run.seed == 0


def test_timing_matches_the_plan_round_time():
    timing = Timing(t_cp=0.002, edge_alpha=0.001, edge_bandwidth=1e8, root_alpha=0.05,
                    root_bandwidth=1e6)
    numel, tau, bits = 4810, [5, 2, 4], [0, 8, 4]
    costs = timing.layer_costs(3, numel, bits)
    assert costs[0] == pytest.approx(0.001 + 4 * numel / 1e8)
    assert costs[1] == pytest.approx(0.001 + 4 * numel * bytes_ratio(8) / 1e8)
    assert costs[2] == pytest.approx(0.05 + 4 * numel * bytes_ratio(4) / 1e6)
    expected = 0.002 * 40 + costs[0] * 8 + costs[1] * 4 + costs[2]
    assert timing.round_time(tau, numel, bits) == pytest.approx(expected)
    assert round_time(tau, 0.002, costs) == pytest.approx(expected)


def _fake_results(path: Path, checks: list[dict]) -> Path:
    """Write a results file: variants hi > mid > lo in accuracy, one quantized layer each."""
    import h5py

    variants = {"hi": (0.9, [0, 0], 0.1), "mid": (0.8, [8, 0], 0.5), "lo": (0.5, [2, 0], 2.0)}
    with h5py.File(path, "w") as f:
        f.attrs.update(experiment="fake", title="Fake", description="", spec_toml="", small=False,
                       world_size=8, hflmpi_version="0", last_steps=20, numel=10,
                       timing="{}", checks=json.dumps(checks), order=json.dumps(list(variants)),
                       figures=json.dumps([
                           {"name": "acc", "kind": "accuracy_vs_steps"},
                           {"name": "bytes", "kind": "accuracy_vs_bytes"},
                           {"name": "div", "kind": "divergence"},
                           {"name": "bits", "kind": "quant_vs_bits"},
                           {"name": "x", "kind": "metric_vs_x", "xscale": "log"}]))
        for i, (name, (acc, bits, div)) in enumerate(variants.items()):
            g = f.create_group(f"runs/{name}")
            g.attrs.update(label=name, tau="[5, 2]", tree="fanouts [4, 2]", bits=json.dumps(bits),
                           x=float(i + 1), steps=40, round_time=0.1)
            for seed, noise in ((0, -0.01), (1, 0.01)):
                s = g.create_group(f"seed_{seed}")
                rounds = np.arange(1, 5)
                s["round"], s["step"] = rounds, rounds * 10
                s["test_accuracy"] = np.array([acc - 0.2, np.nan, acc - 0.05, acc + noise])
                for key in ("test_loss", "train_loss", "wall_time"):
                    s[key] = np.ones(4)
                s["upward_divergence"] = np.full(4, div)
                s["downward_divergence"] = np.full(4, 2 * div)
                s["bytes_cum"] = np.cumsum(np.full(4, 100.0 * (i + 1)))
                s["model_time"] = rounds * 0.1
                q = np.full((4, 2), np.nan)
                if any(bits):
                    q[:, 0] = 1.0 / bits[0]
                s["quant_error"] = q
                for key in ("bytes_sent", "compute_seconds", "comm_seconds"):
                    s[key] = np.ones((4, 2))
    return path


def test_summary_window_and_checks(tmp_path):
    checks = [
        {"claim": "order", "kind": "order", "metric": "last_accuracy",
         "variants": ["hi", "mid", "lo"], "ci": True},
        {"claim": "order fails", "kind": "order", "metric": "last_accuracy",
         "variants": ["lo", "hi"]},
        {"claim": "close", "kind": "close", "metric": "final_accuracy",
         "variants": ["hi", "mid"], "margin": 0.05, "ci_margin": 0.2},
        {"claim": "finite", "kind": "finite", "metric": "downward_divergence",
         "variants": ["hi", "missing"]},
        {"claim": "at least", "kind": "at_least", "metric": "final_accuracy",
         "variants": ["hi", "mid", "lo"], "threshold": 0.6},
        {"claim": "median", "kind": "above_median", "metric": "final_accuracy",
         "variants": ["mid", "hi", "lo"], "margin": 0.0},
        {"claim": "skipped", "kind": "order", "variants": ["hi", "missing"]},
        {"claim": "quant", "kind": "order", "metric": "quant_error_layer1",
         "variants": ["lo", "mid"]},
    ]
    path = _fake_results(tmp_path / "r.h5", checks)
    s = summarize(path)
    # steps 30 and 40 are in the last-20-steps window: mean of acc - 0.05 and acc +- 0.01.
    assert s["hi"]["last_accuracy"][0] == pytest.approx(0.9 - 0.025)
    assert s["hi"]["final_accuracy"][0] == pytest.approx(0.9)
    assert s["hi"]["final_accuracy"][1] == pytest.approx(0.01)
    assert s["mid"]["quant_error_layer1"][0] == pytest.approx(1 / 8)
    assert math.isnan(s["hi"]["quant_error_max"][0])
    verdicts = {c.claim: c.passed for c in evaluate_checks(path)}
    assert verdicts == {"order": True, "order fails": False, "close": False, "finite": True,
                        "at least": False, "median": True, "quant": True}
    assert {c.claim: c.passed for c in evaluate_checks(path, ci=True)}["close"] is True


def test_markdown_and_plots(tmp_path):
    path = _fake_results(tmp_path / "r.h5", [
        {"claim": "hi beats lo", "kind": "order", "variants": ["hi", "lo"]}])
    pytest.importorskip("matplotlib")
    figures = plot_results(path, tmp_path / "out")
    assert [p.name for p in figures] == ["fake_acc.png", "fake_bytes.png", "fake_div.png",
                                         "fake_bits.png", "fake_x.png"]
    assert all(0 < p.stat().st_size < 200_000 for p in figures)
    text = results_markdown(path, figures)
    assert "| hi: hi | fanouts [4, 2] | [5, 2] | [0, 0] | 40 | 90.0 ± 1.0 |" in text
    assert "| hi beats lo | holds |" in text and "[fake_acc.png](fake_acc.png)" in text


def test_figures_in_pdf_and_svg_have_distinct_titles_and_say_what_bytes_sum(tmp_path):
    pytest.importorskip("matplotlib")
    path = _fake_results(tmp_path / "r.h5", [])
    figures = plot_results(path, tmp_path / "out", formats=["svg", "pdf"])
    assert [p.name for p in figures[:2]] == ["fake_acc.svg", "fake_acc.pdf"] and len(figures) == 10
    titles = []
    for p in figures:
        data = p.read_bytes()
        if p.suffix == ".pdf":
            assert data[:5] == b"%PDF-"
            continue
        comments = re.findall(r"<!-- (.*?) -->", data.decode("utf-8"))
        titles.append(next(c for c in comments if c.startswith("Fake: ")))
        if p.stem == "fake_bytes":
            assert "cumulative bytes sent, summed over all devices and layers" in comments
        if p.stem == "fake_acc":
            assert {"hi", "lo"} <= set(comments)  # series labelled by variant
    assert len(set(titles)) == 5, titles
    with pytest.raises(ValueError, match="not one of png, pdf, svg"):
        plot_results(path, tmp_path / "out", formats=["gif"])


POPULATION = """
[experiment]
seeds = [0]
steps = 20
eval_every_steps = 10
[base.run]
divergence = false
[base.clients]
count = 4
[base.data]
name = "digits"
[base.model]
name = "logreg"
[base.optim]
batch_size = 8
[[variant]]
name = "flat"
topology = {}
schedule = { tau = [5] }
[[variant]]
name = "pairs"
topology = { fanouts = [2, 2] }
schedule = { tau = [5, 2] }
clients = { selection = "uniform", cohort = 3 }
[[variant]]
name = "mixed"
topology = { groups = [[0, 2], [1, 3]] }
schedule = { tau = [5, 2] }
"""


def test_a_spec_with_clients_runs_its_variants_as_populations(tmp_path):
    exp = load_experiment(_write(tmp_path, POPULATION))
    configs = {v.name: v.run_config(0, f"{v.name}.h5", 10) for v in exp.variants}
    assert {n: c.clients.count for n, c in configs.items()} == {"flat": 4, "pairs": 4, "mixed": 4}
    # [clients] merges key by key: the variant's selection over the base's count
    assert configs["pairs"].clients.selection == "uniform" and configs["pairs"].clients.cohort == 3
    assert configs["flat"].clients.selection == "all"
    assert configs["mixed"].topology.groups == ((0, 2), (1, 3))
    assert [c.run.rounds for c in configs.values()] == [4, 2, 2]
    bad = POPULATION.replace("count = 4", "count = 4\ncohort = 5")
    with pytest.raises(ExperimentError, match=r"variant 'flat': clients.cohort"):
        load_experiment(_write(tmp_path, bad))
    with pytest.raises(ExperimentError, match=r"\[base\] has unknown key\(s\) \['client'\]"):
        load_experiment(_write(tmp_path, POPULATION.replace("[base.clients]", "[base.client]")))


def test_describe_tree_of_a_population():
    from hflmpi.config import config_from_dict
    from hflmpi.experiments.runner import _describe_tree

    def describe(topology: dict, count: int = 0, depth: int = 1) -> str:
        data = {"topology": topology, "clients": {"count": count},
                "schedule": {"tau": [2] * depth}}
        return _describe_tree(config_from_dict(data))

    assert describe({"groups": [[0, 2], [1, 3]]}, 0, 2) == "groups [[0,2],[1,3]]"
    assert describe({"groups": [[0, 2], [1, 3]]}, 4, 2) == "groups 2x2, 4 clients"
    assert describe({"groups": [[[0, 1], [2, 3]], [[4, 5], [6, 7]]]}, 8, 3) == \
        "groups 2x2x2, 8 clients"
    assert describe({"groups": [[0], [1, 2]]}, 3, 2) == "groups [1,2], 3 clients"
    assert describe({"fanouts": [8, 8]}, 64, 2) == "fanouts [8, 8], 64 clients"
    assert describe({}, 64) == "flat, 64 clients"


def test_population_experiment_on_one_rank(tmp_path):
    """The world-size check plans the tree of clients; the results say how many clients."""
    pytest.importorskip("mpi4py")
    import h5py
    from mpi4py import MPI

    from hflmpi.experiments import run_experiment
    from hflmpi.record.reading import read_clients

    spec = _write(tmp_path, POPULATION)
    out = run_experiment(spec, tmp_path / "r.h5", MPI.COMM_SELF, stream=open("/dev/null", "w"))
    with h5py.File(out, "r") as f:
        assert f.attrs["world_size"] == 1
        trees = {k: (g.attrs["tree"], int(g.attrs["clients"])) for k, g in f["runs"].items()}
        assert trees == {"flat": ("flat, 4 clients", 4), "pairs": ("fanouts [2, 2], 4 clients", 4),
                         "mixed": ("groups 2x2, 4 clients", 4)}
        assert list(f["runs/pairs/seed_0/step"][:]) == [10, 20]
    # the variant's cohort of 3 of 4 clients was used (a run with clients records participation)
    pairs = read_clients(tmp_path / "r.runs" / "pairs__seed0.h5")
    flat = read_clients(tmp_path / "r.runs" / "flat__seed0.h5")
    assert pairs is not None and flat is not None
    assert pairs["participated"].sum(axis=1).tolist() == [3, 3]
    assert flat["participated"].sum(axis=1).tolist() == [4, 4, 4, 4]
    # the placement is checked against the world size before anything trains
    bad = POPULATION + "[variant.clients]\nplacement = [0, 0, 1, 1]\n"
    with pytest.raises(ExperimentError, match=r"variant 'mixed': .*placement"):
        run_experiment(_write(tmp_path, bad), tmp_path / "bad.h5", MPI.COMM_SELF)
    assert not (tmp_path / "bad.runs").exists()


def test_shifted_digits_adds_four_one_pixel_shifts():
    pytest.importorskip("sklearn")
    from sklearn.datasets import load_digits

    from hflmpi.experiments.data import shift_images, shifted_digits

    x = np.arange(2 * 1 * 3 * 4, dtype=np.float32).reshape(2, 1, 3, 4) + 1
    for rows, cols in ((-1, 0), (1, 0), (0, -1), (0, 1), (1, -2)):
        expected = np.zeros_like(x)
        for r in range(3):
            for c in range(4):
                if 0 <= r - rows < 3 and 0 <= c - cols < 4:
                    expected[..., r, c] = x[..., r - rows, c - cols]
        np.testing.assert_array_equal(shift_images(x, rows, cols), expected)
    x_train, y_train, x_test, y_test, classes = shifted_digits(seed=3)
    n = len(x_train) // 5
    assert classes == 10 and len(x_train) == 5 * n and len(x_test) + n == 1797
    np.testing.assert_array_equal(y_train, np.tile(y_train[:n], 5))
    np.testing.assert_array_equal(x_train[n:2 * n, :, :-1], x_train[:n, :, 1:])  # shifted up
    np.testing.assert_array_equal(x_train[n:2 * n, :, -1], 0)
    # the untouched images are digits' own (pixel / 16), the test images are none of them
    images = load_digits().images.astype(np.float32)[:, None] / 16
    keys = {im.tobytes() for im in images}
    assert all(im.tobytes() in keys for im in x_train[:n])
    assert not {im.tobytes() for im in x_test} & {im.tobytes() for im in x_train[:n]}
