"""Tests of :mod:`hflmpi.core.tau_search` (the surrogate bound and the search) and of ``hflmpi plan``.

The round time ``T(tau)`` itself is tested with the cost model (tests/test_costmodel.py).
"""

from __future__ import annotations

import itertools
import json
import math
import shlex

import numpy as np
import pytest

from hflmpi.cli.plan import main
from hflmpi.core.costmodel import round_time
from hflmpi.core.quantize import variance_bound
from hflmpi.core.tau_search import (
    BoundConstants,
    PlanError,
    convergence_bound,
    feasible_taus,
    quantized_comm_time,
    search,
    step_condition,
    steps_within,
    variance_factors,
)
from hflmpi.core.wire import bytes_ratio


def test_steps_within_floors_whole_rounds():
    # T([5,2]) = 6 s; a 60 s deadline holds exactly 10 rounds of 10 steps (no float round-down)
    assert steps_within(60.0, [5, 2], 0.1, [1.0, 3.0]) == 100
    assert steps_within(59.9, [5, 2], 0.1, [1.0, 3.0]) == 90
    assert steps_within(0.3, [5, 2], 0.1, [1.0, 3.0]) == 0


def test_bytes_ratio_and_comm_scaling():
    assert bytes_ratio(0) == 1.0
    assert bytes_ratio(8, 512) == pytest.approx(8 / 32 + 1 / 512)
    assert bytes_ratio(4) == pytest.approx(4 / 32 + 1 / 1024)  # auto bucket at 4 bits
    assert quantized_comm_time(1.0, 8, 512) == pytest.approx(0.25 + 1 / 512)
    assert quantized_comm_time(1.0, 8, 512, latency=0.2) == pytest.approx(0.2 + 0.8 * (0.25 + 1 / 512))
    assert quantized_comm_time(1.0, 0) == 1.0
    with pytest.raises(PlanError):
        quantized_comm_time(1.0, 17)


def test_variance_factors_use_the_quantizer_bound():
    assert variance_factors([0, 8, 4], 256) == [0.0, variance_bound(8, 256), variance_bound(4, 256)]


def test_bound_terms_by_hand_two_layers():
    c = BoundConstants(lipschitz=2.0, sigma2=3.0, gap=5.0, lr=0.1, grad2=0.5, zeta2=0.7)
    tau, fan, q, k = [3, 2], [2, 4], [0.2, 0.1], 600
    m0, m1, m2 = 1, 2, 8
    p0, p1, p2 = 1, 3, 6
    eta, lip = 0.1, 2.0
    opt = 2 * 5.0 / (eta * k)
    noise = eta * lip * 3.0 / m2
    drift = lip**2 * eta**2 * (
        3.0 * ((p1 - p0) / 2 * (1 / m0 - 1 / m2) + (p2 - p1) / 2 * (1 / m1 - 1 / m2))
        + 0.7 * ((p1**2 - p0**2) / 3 * (1 - m0 / m2) + (p2**2 - p1**2) / 3 * (1 - m1 / m2)))
    quant = (eta * lip / m2 * (0.2 * (3.0 + m0 * p1 * 0.5) + 0.1 * (3.0 + m1 * p2 * 0.5))
             + lip**2 * eta**2 * 0.2 * (p1 * 3.0 / m0 + p1**2 * 0.5) / 2 * (1 - m1 / m2) * (2 - 1) / 2)
    terms = convergence_bound(tau, k, fan, q, c)
    assert terms.optimisation == pytest.approx(opt)
    assert terms.noise == pytest.approx(noise)
    assert terms.drift == pytest.approx(drift)
    assert terms.quantization == pytest.approx(quant)
    assert terms.total == pytest.approx(opt + noise + drift + quant)


def test_fedavg_special_case_and_edge_cases():
    c = BoundConstants()
    # tau = 1 everywhere, exact: no drift, no quantization (fully synchronous SGD)
    terms = convergence_bound([1, 1], 1000, [4, 4], [0.0, 0.0], c)
    assert terms.drift == 0 and terms.quantization == 0
    # one device: no consensus error whatever the period
    assert convergence_bound([7], 100, [1], [0.0], c).drift == 0
    # FedAvg drift = L^2 eta^2 sigma^2 (I - 1)/2 (1 - 1/n)
    d = convergence_bound([5], 100, [8], [0.0], c).drift
    assert d == pytest.approx(c.lipschitz**2 * c.lr**2 * c.sigma2 * 4 / 2 * (1 - 1 / 8))
    assert convergence_bound([3], 0, [2], [0.0], c).total == math.inf
    assert step_condition([1, 1], c) == pytest.approx(c.lr * c.lipschitz)
    assert step_condition([3, 2], c) == pytest.approx(
        c.lr * c.lipschitz + (c.lr * c.lipschitz) ** 2 * (3 + 9 * 1))


def _brute_force(t_cp, t_cm, deadline, tau_max, fanouts, bits, constants, strict=False):
    q = variance_factors(bits)
    best = None
    for tau in itertools.product(range(1, tau_max + 1), repeat=len(t_cm)):
        tau = list(tau)
        if round_time(tau, t_cp, t_cm) > deadline:
            continue
        if strict and step_condition(tau, constants) > 1:
            continue
        k = steps_within(deadline, tau, t_cp, t_cm)
        value = convergence_bound(tau, k, fanouts, q, constants).total
        if best is None or value < best[0]:
            best = (value, tau)
    return best


@pytest.mark.parametrize("case", range(12))
def test_search_finds_the_brute_force_optimum(case):
    rng = np.random.default_rng(case)
    depth = 1 + case % 3
    tau_max = [12, 7, 5][depth - 1]
    t_cp = float(rng.uniform(1e-3, 1e-2))
    t_cm = [float(x) for x in rng.uniform(1e-3, 0.2, size=depth)]
    deadline = float(rng.uniform(0.5, 20))
    fanouts = [int(x) for x in rng.integers(1, 6, size=depth)]
    bits = [int(x) for x in rng.choice([0, 2, 4, 8], size=depth)]
    constants = BoundConstants(lipschitz=float(rng.uniform(0.5, 5)), sigma2=float(rng.uniform(0.1, 5)),
                               lr=float(rng.uniform(0.01, 0.1)), grad2=float(rng.uniform(0, 2)),
                               zeta2=float(rng.uniform(0, 1)))
    strict = case % 4 == 3
    expected = _brute_force(t_cp, t_cm, deadline, tau_max, fanouts, bits, constants, strict)
    result = search(t_cp, t_cm, deadline, bits=bits, fanouts=fanouts, constants=constants,
                    tau_max=tau_max, strict=strict)
    assert result.bound.total == pytest.approx(expected[0], rel=1e-12)
    assert result.tau == expected[1]
    assert result.steps == steps_within(deadline, result.tau, t_cp, t_cm)
    assert result.round_time == pytest.approx(round_time(result.tau, t_cp, t_cm))


def test_pruned_enumeration_is_exactly_the_feasible_set():
    t_cp, t_cm, deadline = 0.01, [0.05, 0.3], 1.0
    got = {tuple(r) for r in feasible_taus(t_cp, t_cm, deadline, 15)}
    want = {t for t in itertools.product(range(1, 16), repeat=2)
            if round_time(t, t_cp, t_cm) <= deadline}
    assert got == want and len(got) < 15 * 15


def test_infeasible_deadline_is_a_clear_error():
    with pytest.raises(PlanError, match=r"deadline=0\.1 s is shorter than the fastest global round"):
        search(0.01, [0.05, 0.3], 0.1)


def test_chosen_bound_beats_every_random_feasible_tau():
    result = search(0.002, [0.01, 0.05], 60.0, bits=[8, 8], tau_max=20, random=200, seed=3)
    r = result.random
    assert r is not None and r.count == 200 and len(r.samples) == 200
    assert all(s["bound"] >= result.bound.total for s in r.samples)
    assert r.not_better == 1.0 and r.minimum >= result.bound.total
    for s in r.samples:
        assert round_time(s["tau"], 0.002, result.t_cm) <= 60.0


def test_cli_prints_and_emits_json(capsys):
    assert main(["--t-cp", "0.002", "--t-cm", "0.01,0.05", "--deadline", "60", "--bits", "8,4",
                 "--tau-max", "10", "--random", "20"]) == 0
    text = capsys.readouterr().out
    assert "chosen tau" in text and "random feasible tau" in text
    assert main(["--t-cp", "0.002", "--t-cm", "0.01,0.05", "--deadline", "60", "--bits", "8,4",
                 "--tau-max", "10", "--random", "20", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["bits"] == [8, 4] and len(data["tau"]) == 2
    # t_cm was given for float32 and scaled to 8 and 4 bits
    assert data["t_cm"] == pytest.approx([0.01 * bytes_ratio(8), 0.05 * bytes_ratio(4)])
    assert data["random"]["not_better"] == 1.0
    assert main(["--t-cp", "0.002", "--t-cm", "0.01,0.05", "--deadline", "0.001"]) == 2
    assert "shorter than the fastest global round" in capsys.readouterr().err
    # the top-level command dispatches to the same entry point
    from hflmpi.cli import main as hflmpi_main

    assert hflmpi_main(["plan", "--t-cp", "0.002", "--t-cm", "0.01,0.05", "--deadline", "60",
                        "--random", "0", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["tau"]
    assert main(["--t-cp", "0.002", "--t-cm", "0.01", "--bits", "17", "--deadline", "60"]) == 2
    assert "bits=17" in capsys.readouterr().err


def test_cli_prints_the_set_line_that_applies_its_tau(tmp_path, capsys):
    """The printed ``--set`` line, split as a shell would and fed to the config loader as
    ``hflmpi run`` feeds it, gives the planned tau (also with a deeper tree and tau above 9)."""
    from hflmpi.config import load_config

    for fanouts, t_cm in (("4,2", "0.01,0.05"), ("2,2,2", "0.0001,0.0002,0.5")):
        argv = ["--t-cp", "0.002", "--t-cm", t_cm, "--deadline", "60", "--fanouts", fanouts,
                "--tau-max", "12", "--random", "0"]
        assert main(argv) == 0
        lines = [line for line in capsys.readouterr().out.splitlines() if "--set" in line]
        assert len(lines) == 1, lines
        words = shlex.split(lines[0].split("apply with", 1)[1])
        assert words[:3] == ["hflmpi", "run", "CONFIG.toml"] and words[3] == "--set"
        setting = words[4]
        assert main([*argv, "--json"]) == 0
        data = json.loads(capsys.readouterr().out)
        assert data["set"] == setting
        config = load_config(None, [setting, f"topology.fanouts=[{fanouts}]"])
        assert list(config.schedule.tau) == data["tau"]
    assert max(data["tau"]) >= 10, "the deep case should plan a tau of two digits"


def test_cli_reads_times_from_a_run_record(tmp_path, capsys):
    from hflmpi.config import config_from_dict, to_toml_string
    from hflmpi.record.store import RoundMetrics, RunRecord

    config = config_from_dict({"topology": {"fanouts": [2, 2]}, "schedule": {"tau": [4, 3]},
                               "quantize": {"bits": [8, 0]}})
    path = tmp_path / "run.h5"
    tree = {"world_size": 4, "depth": 2, "groups_per_layer": [2, 1]}
    with RunRecord.create(path, to_toml_string(config), {"world_size": 4, "tree": tree},
                          layer_count=2) as record:
        for rnd in (1, 2, 3):
            warm = 10.0 if rnd == 1 else 1.0  # first round skipped as warm-up
            record.append_round(RoundMetrics(
                round=rnd, compute_seconds=[warm * 0.9, warm * 0.3],  # 12 steps: 0.1 s/step
                comm_seconds=[warm * 0.6, warm * 0.5], bytes_sent=[1, 1]))
    from hflmpi.record.timings import times_from_run

    measured = times_from_run(path)
    assert measured.t_cp == pytest.approx(0.1)
    assert measured.t_cm == pytest.approx([0.6 / 3, 0.5])
    assert measured.fanouts == [2, 2] and measured.bits == [8, 0] and measured.tau == [4, 3]
    assert main(["--from-run", str(path), "--deadline", "100", "--random", "0", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["t_cp"] == pytest.approx(0.1)
    assert data["t_cm"] == pytest.approx([0.2, 0.5])  # same bits as the run: unchanged
