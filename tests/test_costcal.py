"""``hflmpi bench calibrate``: the fit recovers known networks; predictions by hand; emulated run.

Synthetic timings are written from the alpha-beta-gamma formulas by hand (TRG05: MPICH's
Rabenseifner allreduce/reduce above 2 KiB, recursive doubling below, binomial bcast and gather),
not from :func:`hflmpi.core.costmodel.coefficients`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import MPIEXEC

from hflmpi.bench.calibrate import DEFAULT_SIZES, codec_costs, fit_layers, nearest_codec, predictions
from hflmpi.core.costmodel import Network, Sample
from hflmpi.core.netfile import read_networks


def _by_hand(op, p, n, a, b, c):
    lg = {2: 1, 4: 2}[p]
    if op in ("allreduce", "reduce"):
        if n <= 2048:
            return lg * (a + n * b + n * c)
        return 2 * lg * a + 2 * (p - 1) / p * n * b + (p - 1) / p * n * c
    if op == "bcast":
        return lg * (a + n * b)
    return lg * a + (p - 1) * n * b  # gather


def _samples(p, params, ops=("allreduce", "reduce", "bcast", "gather")):
    sizes = [int(s) for s in DEFAULT_SIZES.split(",")]
    return [Sample(op, p, n, _by_hand(op, p, n, *params)) for n in sizes for op in ops]


def test_fit_recovers_the_networks_of_each_layer():
    node, link = (10e-6, 0.3e-9, 0.6e-9), (30e-6, 8e-9, 1.5e-9)
    nets = fit_layers([_samples(2, node), _samples(2, link) + _samples(4, link, ("allreduce",))], "1gbit")
    assert [n.name for n in nets] == ["layer1-1gbit", "layer2-1gbit"]
    for net, truth in zip(nets, (node, link)):
        assert (net.alpha, net.beta, net.gamma) == pytest.approx(truth, rel=1e-6)


def test_predictions_of_the_bench_candidates_by_hand():
    a, b, c = 20e-6, 8e-9, 1e-9
    net = Network("link", a, b, c)
    numel = 1_000_000
    pred = predictions({"numel": float(numel)}, [2, 2], [net, net], bits=[])
    n = 4 * numel
    # flat float32 Allreduce over 4 ranks (Rabenseifner)
    assert pred["mpi_allreduce"] == pytest.approx(4 * a + 1.5 * n * b + 0.75 * n * c)
    # subtree: the 8-byte weight allreduce (recursive doubling, lg 4 = 2) + the model's allreduce
    assert pred["hfl_subtree"] == pytest.approx(2 * (a + 8 * b + 8 * c) + 4 * a + 1.5 * n * b + 0.75 * n * c)
    # tree: per layer (p = 2) weight allreduce + reduce of the model + binomial bcast of the model
    per_layer = (a + 8 * b + 8 * c) + (2 * a + n * b + 0.5 * n * c) + (a + n * b)
    assert pred["hfl_tree"] == pytest.approx(2 * per_layer)


def test_codec_cost_is_what_the_networks_leave_unexplained():
    net = Network("link", 0.0, 1e-9, 0.0)
    numel = 1_000_000
    comm = predictions({"numel": float(numel)}, [2, 2], [net, net], bits=[8])["q8"]
    codec = codec_costs({8: comm + 0.2}, numel, [2, 2], [net, net])
    assert codec[8] == pytest.approx(0.2 / (numel * 2))  # per parameter and per layer
    assert codec_costs({8: comm / 2}, numel, [2, 2], [net, net])[8] == 0.0  # never negative
    with_codec = predictions({"numel": 3e6}, [2, 2], [net, net], bits=[8], codec=codec)["q8"]
    without = predictions({"numel": 3e6}, [2, 2], [net, net], bits=[8])["q8"]
    assert with_codec - without == pytest.approx(0.2 * 3)
    sized = {2_000_000: {8: 1.0}, 6_000_000: {8: 2.0}}
    assert [nearest_codec(sized, n)[8] for n in (10**6, 3 * 10**6, 4 * 10**6, 25 * 10**6)] == [1, 1, 2, 2]
    assert nearest_codec({}, 10) == {}


@pytest.fixture
def can_emulate():
    from hflmpi.bench.netem import available

    if not MPIEXEC.exists():
        pytest.skip("no mpiexec next to this python")
    ok, why = available(MPIEXEC)
    if not ok:
        pytest.skip(f"cannot emulate nodes here: {why}")


def test_calibrate_on_emulated_nodes_writes_a_network_file_plan_reads(can_emulate, tmp_path):
    from hflmpi.bench.netem import leftover_namespaces

    out = tmp_path / "net.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "hflmpi", "bench", "calibrate", "--emulate-nodes", "2",
                           "--link", "1gbit", "--sizes", "8,2097152", "--repeats", "1", "--out", str(out),
                           "--bits", "8", "--codec-numel", "100000,200000"],
                          env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert leftover_namespaces(owner=os.getpid()) == []
    nets = read_networks(out)
    assert [n.name for n in nets] == ["layer1-1gbit", "layer2-1gbit"]
    meta = json.loads(out.read_text())["meta"]
    assert meta["fanouts"] == [2, 2] and meta["label"] == "1gbit"
    assert set(meta["codec"]) == {"8"} and [n for n, _ in meta["codec"]["8"]] == [100000, 200000]
    assert min(c for _, c in meta["codec"]["8"]) >= 0
    # layer 1: 4 ops x 2 sizes on the node; layer 2: the same across the link + the 4-rank Allreduce
    assert [len(s) for s in meta["samples"]] == [8, 10]
    assert {s["p"] for s in meta["samples"][1]} == {2, 4}
    plan = subprocess.run([sys.executable, "-m", "hflmpi", "plan", "--network", str(out), "--numel",
                           "1000000", "--fanouts", "2,2", "--t-cp", "0.01", "--deadline", "60",
                           "--random", "0", "--choose-bits", "0,8", "--max-variance", "0.05"],
                          env=env, capture_output=True, text=True, timeout=60)
    assert plan.returncode == 0 and "CHOSEN" in plan.stdout, plan.stdout + plan.stderr


def test_bad_options_are_one_clear_error(capsys):
    from mpi4py import MPI

    from hflmpi.bench.calibrate import main

    assert main(["--sizes", "0"], MPI.COMM_SELF) == 2
    assert main(["--bits", "8", "--codec-numel", "many"], MPI.COMM_SELF) == 2
    assert main(["--fanouts", "3"], MPI.COMM_SELF) == 2
    err = capsys.readouterr().err
    assert "--sizes" in err and "many" in err and "fanouts" in err
