"""H-SGD divergences of a population (:mod:`hflmpi.mpi.population_divergence`), mpiexec -n 1, 2, 4, 8.

* The measurement on 1, 2, 4 and 8 ranks (layer-1 nodes inside a rank and spanning ranks, some
  clients out of the cohort) against numpy's weighted means of the same client models.
* End to end: with one client per rank the population records the rank engine's divergences.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

pytest.importorskip("mpi4py")
from conftest import parallel_assert  # noqa: E402
from mpi4py import MPI  # noqa: E402

from hflmpi.config import config_from_dict  # noqa: E402
from hflmpi.core.population import place_clients, plan_population  # noqa: E402
from hflmpi.core.topology import plan_fanouts  # noqa: E402
from hflmpi.federation import train  # noqa: E402
from hflmpi.mpi.population_divergence import population_divergences  # noqa: E402
from hflmpi.record.reading import read_metrics  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CLIENTS, NUMEL = 16, 37


def _client_models() -> np.ndarray:
    return np.random.default_rng(5).normal(size=(CLIENTS, NUMEL)).astype(np.float32)


def _weights() -> np.ndarray:
    weights = np.random.default_rng(6).integers(1, 9, CLIENTS).astype(np.float64)
    weights[[1, 6, 7, 13]] = 0.0  # not in the cohort
    return weights


def _reference(models: np.ndarray, weights: np.ndarray, group_size: int) -> tuple[float, float]:
    """Upward and downward divergences straight from their definitions (float64 numpy)."""
    x = models.astype(np.float64)
    total = weights.sum()
    global_model = (weights[:, None] * x).sum(axis=0) / total
    up = down = 0.0
    for start in range(0, CLIENTS, group_size):
        members = slice(start, start + group_size)
        w = weights[members]
        if w.sum() == 0:
            continue
        group = (w[:, None] * x[members]).sum(axis=0) / w.sum()
        up += w.sum() * float(np.sum((group - global_model) ** 2))
        down += float(np.sum(w * np.sum((x[members] - group) ** 2, axis=1)))
    return up / total, down / total


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize("fanouts", [[4, 4], [8, 2], [16]])
def test_divergences_match_numpy_on_any_placement(comm, fanouts):
    models, weights = _client_models(), _weights()
    expected = _reference(models, weights, fanouts[0])
    for size in (n for n in (1, 2, 4, 8) if n <= comm.Get_size()):
        sub = comm.Split(0 if comm.Get_rank() < size else MPI.UNDEFINED, comm.Get_rank())
        got = None
        if sub != MPI.COMM_NULL:
            rank = sub.Get_rank()
            plan = plan_population(plan_fanouts(fanouts, CLIENTS), place_clients(CLIENTS, size))
            node = plan.spanning_node(rank, 1)
            node_comm = sub.Split(MPI.UNDEFINED if node is None else node, rank)
            trained = {c: torch.from_numpy(models[c]) for c in plan.placement.clients_on(rank)
                       if weights[c] > 0}
            got = population_divergences(sub, None if node_comm == MPI.COMM_NULL else node_comm,
                                         plan, trained, weights, NUMEL)
            if node_comm != MPI.COMM_NULL:
                node_comm.Free()
            sub.Free()
        ok = got is None or bool(np.allclose(got, expected, rtol=1e-12, atol=1e-12))
        parallel_assert(comm, ok, f"{size} ranks, fan-outs {fanouts}: {got} != {expected}")
    # the case measures something (one group: no upward divergence by definition)
    assert expected[1] > 0 and (expected[0] > 0) == (len(fanouts) > 1)


def test_no_participant_gives_nan():
    plan = plan_population(plan_fanouts([4, 4], CLIENTS), place_clients(CLIENTS, 1))
    got = population_divergences(MPI.COMM_SELF, None, plan, {}, np.zeros(CLIENTS), NUMEL)
    assert np.isnan(got).all()


@pytest.mark.mpi(min_size=2)
def test_one_client_per_rank_records_the_rank_engines_divergences(comm, shared_dir):
    size = 4 if comm.Get_size() >= 4 else 2
    fanouts = [2, 2] if size == 4 else [2, 1]
    sub = comm.Split(0 if comm.Get_rank() < size else MPI.UNDEFINED, comm.Get_rank())
    metrics = {}
    if sub != MPI.COMM_NULL:
        for name, count in (("ranks", 0), ("pop", size)):
            out = os.path.join(shared_dir, f"{name}.h5")
            train(config_from_dict({
                "run": {"seed": 3, "rounds": 2, "out": out, "progress": "off"},
                "topology": {"fanouts": fanouts}, "schedule": {"tau": [2, 2]},
                "data": {"name": "synthetic", "synthetic_samples": 320,
                         "synthetic_features": 12, "synthetic_classes": 3},
                "model": {"name": "mlp", "hidden": [8]}, "optim": {"lr": 0.1, "batch_size": 8},
                "clients": {"count": count}}), sub)
            if sub.Get_rank() == 0:
                metrics[name] = read_metrics(out)
        sub.Free()
    keys = ("upward_divergence", "downward_divergence")
    ok = comm.Get_rank() != 0 or (
        all(np.allclose(metrics["pop"][key], metrics["ranks"][key], rtol=1e-6, atol=0.0,
                        equal_nan=True) for key in keys)
        and sum(float(metrics["pop"][key][-1]) for key in keys) > 0)  # the last round: measured
    parallel_assert(comm, ok, f"{metrics}")
