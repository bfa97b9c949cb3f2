"""A population of clients on ranks, end to end under mpiexec -n 1, 2, 4, 8.

* Placement invariance: every layer quantized, the same 16 clients trained on 1, 2, 4 and 8 ranks
  (sub-communicators of the world) end with the same model bits; with exact layers, within the
  float64-sum bound (:mod:`hflmpi.mpi.population`).
* One client per rank: the population engine reproduces the rank engine (an independent
  implementation of the same nested aggregation) bit for bit on a quantized tree.
* FedAvg over a population equals a serial reference that trains each client with
  ``torch.optim.SGD`` and averages by samples in float64.
* Partial participation: a cohort per round; resume is bitwise.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from typing import Any, Iterator

import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("mpi4py")
from mpi4py import MPI  # noqa: E402

from hflmpi.config import config_from_dict  # noqa: E402
from hflmpi.core.rng import torch_generator  # noqa: E402
from hflmpi.federation import train  # noqa: E402
from hflmpi.learn.data import load_dataset  # noqa: E402
from hflmpi.learn.models import build_model  # noqa: E402
from hflmpi.learn.partition import make_partition  # noqa: E402
from hflmpi.record.reading import read_clients  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _config(out: str, fanouts: list[int], tau: list[int], **sections: dict[str, Any]):
    data: dict[str, dict[str, Any]] = {
        "run": {"seed": 11, "rounds": 2, "out": out, "progress": "off"},
        "topology": {"fanouts": fanouts},
        "schedule": {"tau": tau},
        "data": {"name": "synthetic", "synthetic_samples": 640, "synthetic_features": 12,
                 "synthetic_classes": 3, "partition": "dirichlet", "alpha": 1.0},
        "model": {"name": "mlp", "hidden": [8]},
        "optim": {"lr": 0.1, "batch_size": 8},
    }
    for name, table in sections.items():
        data[name] = {**data.get(name, {}), **table}
    return config_from_dict(data)


def _digest(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.detach().contiguous().numpy().tobytes()).hexdigest()


@contextlib.contextmanager
def _shared_dir(comm: MPI.Comm) -> Iterator[str]:
    """Rank 0's temporary directory, on every rank; removed when every rank is done."""
    path = comm.bcast(tempfile.mkdtemp(prefix="hflmpi-pop-") if comm.Get_rank() == 0 else None,
                      root=0)
    try:
        yield path
    finally:
        comm.Barrier()
        if comm.Get_rank() == 0:
            shutil.rmtree(path, ignore_errors=True)


def _final_models_by_size(config_of, sizes: list[int]) -> dict[int, torch.Tensor]:
    """Train on sub-communicators of each size; return each size's final model (on every rank)."""
    world = MPI.COMM_WORLD
    models = {}
    with _shared_dir(world) as base:
        for size in sizes:
            color = 0 if world.Get_rank() < size else MPI.UNDEFINED
            sub = world.Split(color, world.Get_rank())
            model = None
            if sub != MPI.COMM_NULL:
                result = train(config_of(os.path.join(base, f"n{size}.h5")), sub)
                model = result.model.numpy()
                sub.Free()
            models[size] = torch.from_numpy(world.bcast(model, root=0))
    return models


def _sizes() -> list[int]:
    return [n for n in (1, 2, 4, 8) if n <= MPI.COMM_WORLD.Get_size()]


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize("selection", [{"selection": "all"},
                                       {"selection": "uniform", "cohort": 0.5},
                                       {"selection": "priority", "cohort": 6, "exploration": 0.3}])
def test_quantized_population_gives_the_same_bits_on_any_rank_count(selection):
    models = _final_models_by_size(lambda out: _config(
        out, [2, 4, 2], [2, 2, 1], quantize={"bits": [8, 4, 8]},
        clients={"count": 16, **selection}), _sizes())
    digests = {size: _digest(m) for size, m in models.items()}
    assert len(set(digests.values())) == 1, digests


@pytest.mark.mpi(min_size=1)
def test_exact_population_agrees_within_the_float64_sum_bound_on_any_rank_count():
    models = _final_models_by_size(lambda out: _config(
        out, [4, 4], [2, 2], clients={"count": 16}), _sizes())
    reference = models[1]
    for size, model in models.items():
        # float64 sums rounded once to float32: placements differ by at most one float32 ulp
        # per aggregation; two rounds of 2 periods leave a few ulps after training in between.
        np.testing.assert_allclose(model.numpy(), reference.numpy(), rtol=1e-5, atol=1e-6,
                                   err_msg=f"{size} ranks")


@pytest.mark.mpi(min_size=2)
def test_one_client_per_rank_reproduces_the_rank_engine_bit_for_bit():
    world = MPI.COMM_WORLD
    size = 4 if world.Get_size() >= 4 else 2
    fanouts = [2, 2] if size == 4 else [2, 1]
    color = 0 if world.Get_rank() < size else MPI.UNDEFINED
    sub = world.Split(color, world.Get_rank())
    with _shared_dir(world) as base:
        if sub != MPI.COMM_NULL:
            common = {"quantize": {"bits": [8, 4], "method": "sum", "downlink": "float32"},
                      "aggregation": {"algorithm": "subtree"}}
            ranks = train(_config(os.path.join(base, "ranks.h5"), fanouts, [2, 2], **common), sub)
            pop = train(_config(os.path.join(base, "pop.h5"), fanouts, [2, 2],
                                clients={"count": size}, **common), sub)
            assert _digest(pop.model) == _digest(ranks.model)
            sub.Free()


def _serial_fedavg(config) -> torch.Tensor:
    """FedAvg over the population, replayed serially with torch.optim.SGD (no hflmpi training)."""
    train_set, _ = load_dataset(config.data, config.run.seed)
    clients, tau = config.clients.count, config.schedule.tau[0]
    parts = make_partition(train_set.labels.numpy(), clients, config.data, config.run.seed)
    model = build_model(config.model, train_set.input_shape, train_set.num_classes,
                        seed=config.run.seed)
    global_state = [p.detach().clone() for p in model.parameters()]
    epochs = {c: (0, 0) for c in range(clients)}
    for _ in range(config.run.rounds):
        total = [torch.zeros_like(p, dtype=torch.float64) for p in global_state]
        weight = sum(len(p) for p in parts)
        for c in range(clients):
            with torch.no_grad():
                for p, g in zip(model.parameters(), global_state):
                    p.copy_(g)
            opt = torch.optim.SGD(model.parameters(), lr=config.optim.lr)
            epoch, offset = epochs[c]
            for _ in range(tau):
                indices = torch.as_tensor(parts[c])
                if offset >= len(indices):
                    epoch, offset = epoch + 1, 0
                order = indices[torch.randperm(len(indices), generator=torch_generator(
                    config.run.seed, purpose="batches", rank=c, round=epoch))]
                batch = order[offset:offset + config.optim.batch_size]
                offset += len(batch)
                opt.zero_grad()
                F.cross_entropy(model(train_set.features[batch]), train_set.labels[batch]).backward()
                opt.step()
            epochs[c] = (epoch, offset)
            for t, p in zip(total, model.parameters()):
                t += p.detach().double() * (len(parts[c]) / weight)
        global_state = [t.float() for t in total]
    return torch.cat([g.reshape(-1) for g in global_state])


@pytest.mark.mpi(min_size=1)
def test_population_fedavg_matches_a_serial_reference():
    world = MPI.COMM_WORLD
    with _shared_dir(world) as base:
        config = _config(os.path.join(base, "fedavg.h5"), [12], [3], clients={"count": 12})
        result = train(config, world)
        expected = _serial_fedavg(config)
        np.testing.assert_allclose(result.model.numpy(), expected.numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.mpi(min_size=1)
def test_partial_participation_is_recorded_and_resume_is_bitwise():
    world = MPI.COMM_WORLD
    with _shared_dir(world) as base:
        def config(out: str, rounds: int):
            return _config(out, [4, 4], [2, 2], run={"rounds": rounds, "checkpoint_every": 1},
                           quantize={"bits": [8, 8]}, optim={"momentum": 0.9,
                                                               "momentum_reset": "never"},
                           clients={"count": 16, "selection": "weighted", "cohort": 5,
                                    "online": 0.8})
        whole = train(config(os.path.join(base, "whole.h5"), 4), world)
        part = os.path.join(base, "part.h5")
        train(config(part, 2), world)
        resumed = train(config(part, 4), world, resume=part)
        assert _digest(resumed.model) == _digest(whole.model)
        if world.Get_rank() == 0:
            record = read_clients(os.path.join(base, "whole.h5"))
            assert record is not None and list(record["round"]) == [1, 2, 3, 4]
            counts = record["participated"].sum(axis=1)
            assert ((counts >= 1) & (counts <= 5)).all(), counts
            trained = ~np.isnan(record["loss"])
            assert (trained == record["participated"]).all()
            again = read_clients(part)
            for key in ("participated", "loss", "samples"):
                np.testing.assert_array_equal(again[key], record[key], err_msg=key)


@pytest.mark.mpi(min_size=1)
def test_bad_population_input_fails_on_every_rank_with_a_clear_message():
    from hflmpi.config import ConfigError
    from hflmpi.mpi.guard import SetupError

    world = MPI.COMM_WORLD
    with _shared_dir(world) as base:
        trace = os.path.join(base, "trace.csv")
        if world.Get_rank() == 0:
            with open(trace, "w") as handle:  # 3 clients' rows for a population of 16
                handle.write("1,0\n1,1\n0,1\n")
        world.Barrier()
        with pytest.raises((ConfigError, SetupError), match="trace"):
            train(_config(os.path.join(base, "t.h5"), [16], [2],
                          clients={"count": 16, "trace": trace}), world)
        with pytest.raises(ConfigError, match="holds 400 samples but clients.count=600, and each client needs at least one"):
            train(_config(os.path.join(base, "s.h5"), [600], [2], clients={"count": 600},
                          data={"synthetic_samples": 500}), world)


@pytest.mark.mpi(min_size=1)
def test_a_group_whose_clients_are_all_offline_is_skipped_and_follows_its_parent():
    world = MPI.COMM_WORLD
    with _shared_dir(world) as base:
        trace = os.path.join(base, "trace.csv")
        if world.Get_rank() == 0:
            rows = ["0,0" if c < 4 else "1,1" for c in range(16)]  # edge group 0 never online
            with open(trace, "w") as handle:
                handle.write("# clients x rounds\n" + "\n".join(rows) + "\n")
        world.Barrier()
        out = os.path.join(base, "offline.h5")
        result = train(_config(out, [4, 4], [2, 2], quantize={"bits": [8, 8]},
                               clients={"count": 16, "trace": trace}), world)
        assert np.isfinite(result.model.numpy()).all() and np.isfinite(result.test_accuracy)
        if world.Get_rank() == 0:
            record = read_clients(out)
            assert not record["participated"][:, :4].any()
            assert record["participated"][:, 4:].all()


@pytest.mark.mpi(min_size=1)
def test_secure_population_masks_cancel_to_the_same_bits_on_any_rank_count():
    """Pairwise masks among each node's participants (partial participation) cancel: the model
    is the bits of the unmasked run, on every rank count."""
    def config_of(secure: bool):
        return lambda out: _config(out, [4, 4], [2, 2], quantize={"bits": [8, 8]},
                                   aggregation={"secure": [secure, secure]},
                                   run={"divergence": False},
                                   clients={"count": 16, "selection": "uniform", "cohort": 10})
    plain = _final_models_by_size(config_of(False), [1])[1]
    masked = _final_models_by_size(config_of(True), _sizes())
    for size, model in masked.items():
        assert _digest(model) == _digest(plain), f"{size} ranks"
