"""Deadline aggregation on the simulated clock, end to end under mpiexec -n 1, 2, 4.

* Exact layers: the model equals a serial re-implementation (torch SGD per client, float64
  weighted means) of the nested mean in which the updates that miss a layer-1 deadline are
  dropped: clients 1, 6 and 12-15 are 10^4 times slower (a profile file), so they are late in
  every period; edge 3 (clients 12-15) then has nothing to send and the root leaves it out.
  The record holds the simulated time (worked out by hand) and the late counts.
* Quantized layers (``jobs/async.toml``): the same model bits on every rank count, on a rerun
  and after a resume, and the same simulated times and late counts in the record.
* Bad input (a deadline shorter than one local step, a profile without some clients) stops
  every rank with a clear message.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("mpi4py")
from mpi4py import MPI  # noqa: E402

from hflmpi.config import ConfigError, config_from_dict, load_config  # noqa: E402
from hflmpi.core.devices import ProfileError  # noqa: E402
from hflmpi.core.rng import torch_generator  # noqa: E402
from hflmpi.federation import train  # noqa: E402
from hflmpi.learn.data import load_dataset  # noqa: E402
from hflmpi.learn.models import build_model  # noqa: E402
from hflmpi.learn.partition import make_partition  # noqa: E402
from hflmpi.mpi.guard import SetupError  # noqa: E402
from hflmpi.record.reading import read_clients, read_metrics  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

JOB = Path(__file__).resolve().parent.parent / "jobs" / "async.toml"
SLOW = (1, 6, 12, 13, 14, 15)


@contextlib.contextmanager
def _shared_dir(comm: MPI.Comm) -> Iterator[str]:
    """Rank 0's temporary directory, on every rank; removed when every rank is done."""
    path = comm.bcast(tempfile.mkdtemp(prefix="hflmpi-async-") if comm.Get_rank() == 0 else None,
                      root=0)
    try:
        yield path
    finally:
        comm.Barrier()
        if comm.Get_rank() == 0:
            shutil.rmtree(path, ignore_errors=True)


def _digest(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.detach().contiguous().numpy().tobytes()).hexdigest()


def _write_profile(comm: MPI.Comm, path: str, clients: int, slow: tuple[int, ...]) -> None:
    if comm.Get_rank() == 0:
        lines = ["client,step_seconds,uplink,latency"]
        lines += [f"{c},{100.0 if c in slow else 0.01},1e9,0" for c in range(clients)]
        Path(path).write_text("\n".join(lines) + "\n")
    comm.Barrier()


def _exact_config(out: str, profile: str, **run: Any):
    return config_from_dict({
        "run": {"seed": 4, "rounds": 2, "out": out, "progress": "off", **run},
        "topology": {"fanouts": [4, 4]},
        "schedule": {"tau": [2, 2]},
        "clients": {"count": 16},
        "clock": {"mode": ["deadline", "sync"], "deadline": [1.0, 0], "profile": profile},
        "data": {"name": "synthetic", "synthetic_samples": 640, "synthetic_features": 12,
                 "synthetic_classes": 3, "partition": "dirichlet", "alpha": 1.0},
        "model": {"name": "mlp", "hidden": [8]},
        "optim": {"lr": 0.1, "batch_size": 8},
    })


def _serial_deadline_reference(config, late: set[int]) -> torch.Tensor:
    """Nested FedAvg over 4 edges of 4 clients in which the ``late`` clients never count."""
    train_set, _ = load_dataset(config.data, config.run.seed)
    clients, (tau1, tau2) = config.clients.count, config.schedule.tau
    parts = make_partition(train_set.labels.numpy(), clients, config.data, config.run.seed)
    model = build_model(config.model, train_set.input_shape, train_set.num_classes,
                        seed=config.run.seed)
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    positions = {c: (0, 0) for c in range(clients)}

    def local(c: int, start: torch.Tensor) -> torch.Tensor:
        torch.nn.utils.vector_to_parameters(start.clone(), model.parameters())
        opt = torch.optim.SGD(model.parameters(), lr=config.optim.lr)
        epoch, offset = positions[c]
        indices = torch.as_tensor(parts[c])
        for _ in range(tau1):
            if offset >= len(indices):
                epoch, offset = epoch + 1, 0
            order = indices[torch.randperm(len(indices), generator=torch_generator(
                config.run.seed, purpose="batches", rank=c, round=epoch))]
            batch = order[offset:offset + config.optim.batch_size]
            offset += len(batch)
            opt.zero_grad()
            F.cross_entropy(model(train_set.features[batch]), train_set.labels[batch]).backward()
            opt.step()
        positions[c] = (epoch, offset)
        return torch.nn.utils.parameters_to_vector(model.parameters()).detach().clone()

    root = flat.clone()
    for _ in range(config.run.rounds):
        edges = [root.clone() for _ in range(4)]
        for _ in range(tau2):
            for e in range(4):
                on_time = [c for c in range(4 * e, 4 * e + 4) if c not in late]
                if on_time:
                    total = sum(len(parts[c]) for c in on_time)
                    edges[e] = sum(local(c, edges[e]).double() * (len(parts[c]) / total)
                                   for c in on_time).float()
        weight = [sum(len(parts[c]) for c in range(4 * e, 4 * e + 4) if c not in late)
                  for e in range(4)]
        root = sum(edges[e].double() * (weight[e] / sum(weight)) for e in range(4)
                   if weight[e]).float()
    return root


@pytest.mark.mpi(min_size=1)
def test_deadline_aggregation_drops_late_updates_like_a_serial_reference():
    world = MPI.COMM_WORLD
    with _shared_dir(world) as base:
        profile = os.path.join(base, "devices.csv")
        _write_profile(world, profile, 16, SLOW)
        out = os.path.join(base, "deadline.h5")
        config = _exact_config(out, profile)
        result = train(config, world)
        expected = _serial_deadline_reference(config, set(SLOW))
        np.testing.assert_allclose(result.model.numpy(), expected.numpy(), rtol=1e-5, atol=1e-6)
        if world.Get_rank() == 0:
            metrics = read_metrics(out)
            # every period: edges 0 and 1 wait for their deadline (1 s after their model came),
            # edge 2 closes early, edge 3 has nothing; the root waits for edges 0-2. One hop
            # between edge and root: 524 bytes (131 float32) at 1.25e8 B/s + 0.01 s.
            hop = 524 / 1.25e8 + 0.01
            np.testing.assert_allclose(metrics["sim_time"], np.array([1, 2]) * (2 * hop + 2.0))
            np.testing.assert_array_equal(metrics["late"], [[12, 0], [12, 0]])
            record = read_clients(out)
            assert record is not None
            np.testing.assert_array_equal(record["late"].any(axis=0),
                                          [c in SLOW for c in range(16)])


def _job(out: str, rounds: int):
    return load_config(JOB, [f"run.out={out!r}".replace("'", '"'), f"run.rounds={rounds}",
                             "run.checkpoint_every=1", 'run.progress="off"'])


def _final_models_by_size(base: str, sizes: list[int]) -> dict[int, torch.Tensor]:
    world = MPI.COMM_WORLD
    models = {}
    for size in sizes:
        sub = world.Split(0 if world.Get_rank() < size else MPI.UNDEFINED, world.Get_rank())
        model = None
        if sub != MPI.COMM_NULL:
            model = train(_job(os.path.join(base, f"n{size}.h5"), 3), sub).model.numpy()
            sub.Free()
        models[size] = torch.from_numpy(world.bcast(model, root=0))
    return models


@pytest.mark.mpi(min_size=1)
def test_the_async_job_gives_the_same_bits_on_any_rank_count_rerun_and_resume():
    world = MPI.COMM_WORLD
    sizes = [n for n in (1, 2, 4) if n <= world.Get_size()]
    with _shared_dir(world) as base:
        models = _final_models_by_size(base, sizes)
        digests = {size: _digest(m) for size, m in models.items()}
        assert len(set(digests.values())) == 1, digests
        again = train(_job(os.path.join(base, "again.h5"), 3), world)
        assert _digest(again.model) == digests[sizes[0]]
        part = os.path.join(base, "part.h5")
        train(_job(part, 1), world)
        resumed = train(_job(part, 3), world, resume=part)
        assert _digest(resumed.model) == digests[sizes[0]]
        if world.Get_rank() == 0:
            whole, parted = read_metrics(os.path.join(base, "again.h5")), read_metrics(part)
            times = whole["sim_time"]
            assert np.all(np.diff(times) > 0) and times[0] > 0
            assert whole["late"][:, 0].sum() > 0 and (whole["late"][:, 1] == 0).all()
            np.testing.assert_array_equal(parted["sim_time"], times)
            np.testing.assert_array_equal(parted["late"], whole["late"])
            late = read_clients(part)["late"]
            # the job's slow clients miss the deadline in both layer-1 periods of a round, the
            # fast ones never (a period takes them ~1.5 s and ~0.15 s; the deadline is 0.3 s)
            np.testing.assert_array_equal(2 * late.sum(axis=1), whole["late"][:, 0])
            np.testing.assert_array_equal(late, read_clients(os.path.join(base, "again.h5"))
                                          ["late"])


@pytest.mark.mpi(min_size=1)
def test_bad_clock_input_fails_on_every_rank_with_a_clear_message():
    world = MPI.COMM_WORLD
    with _shared_dir(world) as base:
        profile = os.path.join(base, "devices.csv")
        _write_profile(world, profile, 16, SLOW)
        with pytest.raises((ConfigError, SetupError),
                           match="shorter than one local step of the fastest client"):
            train(config_from_dict({**_dict(_exact_config(os.path.join(base, "a.h5"), profile)),
                                    "clock": {"mode": ["deadline", "sync"],
                                              "deadline": [0.001, 0], "profile": profile}}),
                  world)
        short = os.path.join(base, "short.csv")
        _write_profile(world, short, 12, ())
        with pytest.raises((ProfileError, SetupError), match=r"no line for clients \[12, 13, "
                                                             r"14, 15\] \(4 of 16 missing\)"):
            train(_exact_config(os.path.join(base, "b.h5"), short), world)


def _dict(config) -> dict[str, Any]:
    from hflmpi.config import config_to_dict

    return config_to_dict(config)
