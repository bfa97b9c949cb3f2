"""``hflmpi bench population`` and the population option of ``bench flower``.

Serial: option parsing into jobs (tree, tau and cohort defaults against hand-worked values), the
round-time window, the report's fields and ratio, the Flower job's round trip through its record,
and the batched solver's fallback from a failing compiled step and its zero gradient for an
unused parameter (against hand arithmetic). Under MPI (2 ranks): a tiny run of both modes prints
every field, a finite ratio, equal accuracies, and the per-client and MPI bytes that the tree and
placement imply.
"""

from __future__ import annotations

import logging
import math
import re

import pytest
import torch
from torch import nn

from hflmpi.bench.flower import Job, _job_from, _job_record, job_config
from hflmpi.bench.population import PopulationJob, format_report, population_config, timed_rounds
from hflmpi.cli.bench import flower_job, flower_parser, population_job, population_parser
from hflmpi.config import OptimConfig
from hflmpi.learn.batched import BatchedSolver

MLP_16 = 64 * 16 + 16 + 16 * 10 + 10  # digits MLP 64-16-10


def test_population_defaults_and_options():
    job = population_job(population_parser().parse_args([]))
    assert (job.clients, job.fanouts, job.tau, job.steps) == (256, (16, 4, 4), (5, 2, 2), 20)
    assert job.cohort_size == 26  # round(25.6)
    job = population_job(population_parser().parse_args(
        ["--clients", "8", "--cohort", "1", "--hidden", "32,16", "--bits", "8"]))
    assert (job.fanouts, job.tau, job.cohort, job.cohort_size) == ((8,), (5,), 8.0, 8)
    assert (job.hidden, job.bits) == ((32, 16), (8,))
    config = population_config(job, "batched", "x.h5")
    assert (config.clients.selection, config.clients.training) == ("all", "batched")
    job = population_job(population_parser().parse_args(
        ["--clients", "16", "--fanouts", "4,4", "--tau", "3,2", "--cohort", "0.25"]))
    assert (job.tau, job.steps, job.cohort_size) == ((3, 2), 6, 4)
    config = population_config(job, "sequential", "x.h5")
    assert (config.clients.selection, config.clients.count) == ("uniform", 16)
    with pytest.raises(SystemExit):
        population_parser().parse_args(["--mode", "fast"])


def test_timed_rounds_drop_the_first_and_last():
    assert timed_rounds([1.0, 1.5, 2.5, 3.0, 6.0]) == [0.5, 1.0, 0.5]
    assert timed_rounds([2.0, 3.0]) == [2.0, 1.0]  # too few rounds to drop any


def _result(mode, seconds, steps_per_second, accuracy):
    return {"mode": mode, "median_round_seconds": seconds, "rounds_timed": 6,
            "client_steps_per_second": steps_per_second, "test_accuracy": accuracy,
            "client_bytes": [100.0, 20.0], "mpi_bytes": [0.0, 40.0]}


def test_report_has_every_field_and_the_ratio():
    job = PopulationJob(clients=8, fanouts=(4, 2), tau=(2, 2), cohort=0.5)
    text = format_report(job, 2, [_result("sequential", 2.0, 8.0, 0.5),
                                  _result("batched", 1.0, 16.0, 0.5)], cores=2)
    assert "8 clients on 2 ranks (2 cores)" in text and "4 clients per round" in text
    assert "client-steps/s" in text and "L2: 20 / 40" in text
    assert "batched / sequential client-steps/s: 2.00x" in text
    one = format_report(job, 2, [_result("batched", 1.0, 16.0, 0.5)], cores=2)
    assert "batched / sequential" not in one


def test_flower_population_job():
    parser = flower_parser()
    job = flower_job(parser.parse_args([]), 8)
    assert not job.population and job.clients == 8 and job.cohort_size == 8
    job = flower_job(parser.parse_args(["--clients", "256", "--cohort", "0.1", "--data",
                                        "digits", "--local-steps", "20", "--hidden", "128",
                                        "--training", "batched"]), 8)
    assert job.population and job.cohort_size == 26 and job.steps_per_epoch == 20
    config = job_config(job, "x.h5")
    assert (config.clients.count, config.clients.cohort, config.clients.training) == (256, 26.0,
                                                                                       "batched")
    assert config.data.name == "digits" and list(config.schedule.tau) == [20]
    assert max(int(256 * job.cohort_size / 256), job.cohort_size) == 26  # Flower's sample size
    assert _job_from(_job_record(job)) == job
    assert _job_from(_job_record(Job())) == Job()


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(4, 3))


def test_a_failing_compiled_step_falls_back_to_eager(caplog):
    config = OptimConfig(lr=0.1)
    x, y = torch.randn(2, 5, 4), torch.randint(0, 3, (2, 5))
    counts = torch.tensor([5, 3])
    start = torch.cat([p.detach().reshape(-1) for p in _mlp().parameters()])
    eager = BatchedSolver(_mlp(), config, 2, compile=False)
    broken = BatchedSolver(_mlp(), config, 2, compile=False)

    def fail(*args):
        raise RuntimeError("no compiler here")

    broken._compiled = fail
    assert broken.compiled
    for solver in (eager, broken):
        solver.load(torch.stack([start, start + 0.01]))
    with caplog.at_level(logging.WARNING, logger="hflmpi.learn.batched"):
        torch.testing.assert_close(broken.step(x, y, counts), eager.step(x, y, counts))
    assert not broken.compiled and "running it eagerly" in caplog.text
    torch.testing.assert_close(broken.flat(), eager.flat())


class _Unused(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 3)
        self.spare = nn.Parameter(torch.full((2,), 2.0))

    def forward(self, x):
        return self.linear(x)


def test_an_unused_parameter_gets_a_zero_gradient():
    solver = BatchedSolver(_Unused(), OptimConfig(lr=0.5, weight_decay=0.1), 2)
    start = torch.zeros(2, 2 + 4 * 3 + 3)
    start[:, :2] = 2.0  # a module's own parameters come before its children's
    solver.load(start)
    solver.step(torch.randn(2, 3, 4), torch.randint(0, 3, (2, 3)), torch.tensor([3, 2]))
    # only weight decay moves it: w - lr * wd * w = 2 * (1 - 0.05)
    torch.testing.assert_close(solver.flat()[:, :2], torch.full((2, 2), 1.9))


@pytest.mark.mpi(min_size=2)
def test_tiny_population_bench_prints_finite_ratios(capsys):
    from mpi4py import MPI

    from hflmpi.cli.bench import main

    comm = MPI.COMM_WORLD
    if comm.Get_size() > 4:
        pytest.skip("8 clients: 2 or 4 ranks keep this short")
    code = main(["population", "--clients", "8", "--fanouts", "4,2", "--tau", "2,2", "--rounds",
                 "3", "--cohort", "0.5", "--hidden", "16"], comm)
    assert code == 0
    if comm.Get_rank() != 0:
        return
    out = capsys.readouterr().out
    rows = {m: out.split(f"\n{m} ")[1].split("\n")[0].split() for m in ("sequential", "batched")}
    for values in rows.values():
        seconds, timed, rate, accuracy, client_bytes, mpi_bytes = map(float, values)
        assert seconds > 0 and timed == 1 and math.isfinite(rate) and rate > 0
        assert 0 <= accuracy <= 1
        # 4 participants x 2 edge periods per round, each uplink a float32 model at layer 1
        if comm.Get_size() == 2:
            assert f"L1: {4 * 2 * MLP_16 * 4} / 0, " in out
            assert mpi_bytes == 2 * MLP_16 * 8  # the root spans both ranks: one float64 sum each
    assert abs(float(rows["sequential"][3]) - float(rows["batched"][3])) < 0.02
    ratio = float(re.search(r"batched / sequential client-steps/s: ([0-9.]+)x", out).group(1))
    assert math.isfinite(ratio) and ratio > 0
