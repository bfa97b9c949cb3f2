"""Deadline aggregation that carries late updates (``clock.late``), under mpiexec -n 1, 2, 4.

16 clients in 4 edges of 4 under a sync root, ``tau = [2, 3]``, a layer-1 deadline of 1 s,
free links (1e9 B/s, no latency). A profile file makes clients 1, 6 and 12-15 slow: 2 steps of
0.7 s, so their update arrives 1.4 s after they start; the fast ones take 0.02 s. Worked out by
hand, in every round:

* period 1: the slow updates miss the deadline (ready + 1) and are held; edge 3 (all slow)
  receives nothing and keeps its model;
* period 2: the slow clients are busy (they do not train); the edges close at ready + 0.4,
  when the held updates arrive, and apply them with staleness 1 (discount 2^-0.5), as the
  model ``x_edge + 2^-0.5 (x_trained - x_anchor)`` with their undiscounted weights;
* period 3 (the root closes too): the slow clients train again, miss the deadline again, and
  their updates are abandoned when the root's model comes down.

* Exact layers: the model equals a serial re-implementation (torch SGD per client, float64
  means); the record holds the late counts (each late update once), the staleness columns and
  the simulated times (worked out by hand).
* Quantized layers: the same bits on every rank count, on a rerun and after a resume.
* Bad input (carry on a sync layer) stops every rank with a clear message.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("mpi4py")
from mpi4py import MPI  # noqa: E402

from hflmpi.config import ConfigError, config_from_dict  # noqa: E402
from hflmpi.core.rng import torch_generator  # noqa: E402
from hflmpi.federation import train  # noqa: E402
from hflmpi.learn.data import load_dataset  # noqa: E402
from hflmpi.learn.models import build_model  # noqa: E402
from hflmpi.learn.partition import make_partition  # noqa: E402
from hflmpi.mpi.guard import SetupError  # noqa: E402
from hflmpi.record.reading import read_clients, read_metrics  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SLOW = (1, 6, 12, 13, 14, 15)


@contextlib.contextmanager
def _shared_dir(comm: MPI.Comm) -> Iterator[str]:
    """Rank 0's temporary directory, on every rank; removed when every rank is done."""
    path = comm.bcast(tempfile.mkdtemp(prefix="hflmpi-carry-") if comm.Get_rank() == 0 else None,
                      root=0)
    try:
        yield path
    finally:
        comm.Barrier()
        if comm.Get_rank() == 0:
            shutil.rmtree(path, ignore_errors=True)


def _digest(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.detach().contiguous().numpy().tobytes()).hexdigest()


def _write_profile(comm: MPI.Comm, path: str) -> None:
    if comm.Get_rank() == 0:
        lines = ["client,step_seconds,uplink,latency"]
        lines += [f"{c},{0.7 if c in SLOW else 0.01},1e9,0" for c in range(16)]
        Path(path).write_text("\n".join(lines) + "\n")
    comm.Barrier()


def _config(out: str, profile: str, rounds: int = 2, bits: tuple[int, int] = (0, 0),
            late: str = "carry", mode: str = "deadline"):
    return config_from_dict({
        "run": {"seed": 4, "rounds": rounds, "out": out, "progress": "off",
                "checkpoint_every": 1},
        "topology": {"fanouts": [4, 4]},
        "schedule": {"tau": [2, 3]},
        "clients": {"count": 16},
        "clock": {"mode": [mode, "sync"], "deadline": [1.0, 0], "profile": profile,
                  "late": [late, "drop"], "staleness_exponent": [0.5, 0]},
        "quantize": {"bits": list(bits)},
        "data": {"name": "synthetic", "synthetic_samples": 640, "synthetic_features": 12,
                 "synthetic_classes": 3, "partition": "dirichlet", "alpha": 1.0},
        "model": {"name": "mlp", "hidden": [8]},
        "optim": {"lr": 0.1, "batch_size": 8},
    })


def _serial_carry_reference(config) -> torch.Tensor:
    """Nested FedAvg over 4 edges of 4 clients with the slow updates carried one close on."""
    train_set, _ = load_dataset(config.data, config.run.seed)
    clients, tau1 = config.clients.count, config.schedule.tau[0]
    parts = make_partition(train_set.labels.numpy(), clients, config.data, config.run.seed)
    model = build_model(config.model, train_set.input_shape, train_set.num_classes,
                        seed=config.run.seed)
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    positions = {c: (0, 0) for c in range(clients)}
    size = {c: float(len(parts[c])) for c in range(clients)}

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

    def mean(parts_: list[tuple[float, torch.Tensor]], keep: torch.Tensor) -> torch.Tensor:
        total = sum(w for w, _ in parts_)
        return sum(x * (w / total) for w, x in parts_).float() if total else keep

    root = flat.clone()
    for _ in range(config.run.rounds):
        edges = [root.clone() for _ in range(4)]
        for e in range(4):
            members = range(4 * e, 4 * e + 4)
            fast = [c for c in members if c not in SLOW]
            slow = [c for c in members if c in SLOW]
            # period 1: the slow updates are held as differences from the edge's model
            x = edges[e]
            fresh = [(size[c], local(c, x).double()) for c in fast]
            held = {c: local(c, x).double() - x.double() for c in slow}
            x = mean(fresh, x)
            # period 2: the slow ones are busy; their held updates apply with staleness 1
            fresh = [(size[c], local(c, x).double()) for c in fast]
            fresh += [(size[c], x.double() + held[c] * 2 ** -0.5) for c in slow]
            x = mean(fresh, x)
            # period 3: the slow ones train again; their updates are late and abandoned
            for c in slow:
                local(c, x)
            edges[e] = mean([(size[c], local(c, x).double()) for c in fast], x)
        root = mean([(sum(size[c] for c in range(4 * e, 4 * e + 4)), edges[e].double())
                     for e in range(4)], root)
    return root


@pytest.mark.mpi(min_size=1)
def test_carried_late_updates_match_a_serial_reference_and_are_recorded():
    world = MPI.COMM_WORLD
    with _shared_dir(world) as base:
        profile = os.path.join(base, "devices.csv")
        _write_profile(world, profile)
        out = os.path.join(base, "carry.h5")
        config = _config(out, profile)
        result = train(config, world)
        expected = _serial_carry_reference(config)
        np.testing.assert_allclose(result.model.numpy(), expected.numpy(), rtol=1e-5, atol=1e-6)
        if world.Get_rank() == 0:
            metrics = read_metrics(out)
            # each round: the edges close at ready + 1, + 1.4 (the held arrivals, after their
            # download and upload of 524 bytes at 1e9 B/s) and + 1; one hop up and one down
            hop, link = 524 / 1.25e8 + 0.01, 524 / 1e9
            np.testing.assert_allclose(metrics["sim_time"],
                                       np.array([1, 2]) * (2 * hop + 2.4 + 2 * link))
            np.testing.assert_array_equal(metrics["late"], [[12, 0], [12, 0]])
            np.testing.assert_array_equal(metrics["staleness_count"][:, 0], [6, 6])
            np.testing.assert_array_equal(metrics["staleness_mean"][:, 0], [1, 1])
            np.testing.assert_array_equal(metrics["staleness_max"][:, 0], [1, 1])
            assert np.isnan(metrics["staleness_count"][:, 1]).all()
            assert np.isnan(metrics["flushes"]).all()
            record = read_clients(out)
            assert record is not None
            slow = np.array([c in SLOW for c in range(16)])
            np.testing.assert_array_equal(record["late"], [slow, slow])
            np.testing.assert_array_equal(record["staleness"],
                                          np.where([slow, slow], 1.0, math.nan))


def _final_models_by_size(base: str, profile: str, sizes: list[int]) -> dict[int, torch.Tensor]:
    world = MPI.COMM_WORLD
    models = {}
    for size in sizes:
        sub = world.Split(0 if world.Get_rank() < size else MPI.UNDEFINED, world.Get_rank())
        model = None
        if sub != MPI.COMM_NULL:
            config = _config(os.path.join(base, f"n{size}.h5"), profile, 3, (4, 8))
            model = train(config, sub).model.numpy()
            sub.Free()
        models[size] = torch.from_numpy(world.bcast(model, root=0))
    return models


@pytest.mark.mpi(min_size=1)
def test_quantized_carry_gives_the_same_bits_on_any_rank_count_rerun_and_resume():
    world = MPI.COMM_WORLD
    sizes = [n for n in (1, 2, 4) if n <= world.Get_size()]
    with _shared_dir(world) as base:
        profile = os.path.join(base, "devices.csv")
        _write_profile(world, profile)
        models = _final_models_by_size(base, profile, sizes)
        digests = {size: _digest(m) for size, m in models.items()}
        assert len(set(digests.values())) == 1, digests
        again = os.path.join(base, "again.h5")
        assert _digest(train(_config(again, profile, 3, (4, 8)), world).model) == digests[1]
        part = os.path.join(base, "part.h5")
        train(_config(part, profile, 1, (4, 8)), world)
        resumed = train(_config(part, profile, 3, (4, 8)), world, resume=part)
        assert _digest(resumed.model) == digests[1]
        dropped = train(_config(os.path.join(base, "drop.h5"), profile, 3, (4, 8), "drop"),
                        world)
        assert _digest(dropped.model) != digests[1]  # the carried updates made a difference
        if world.Get_rank() == 0:
            whole, parted = read_metrics(again), read_metrics(part)
            np.testing.assert_array_equal(whole["staleness_count"][:, 0], [6, 6, 6])
            for name in ("sim_time", "late", "staleness_count", "staleness_mean"):
                np.testing.assert_array_equal(parted[name], whole[name])


@pytest.mark.mpi(min_size=1)
def test_carry_on_a_layer_without_a_deadline_fails_on_every_rank():
    world = MPI.COMM_WORLD
    with _shared_dir(world) as base:
        profile = os.path.join(base, "devices.csv")
        _write_profile(world, profile)
        with pytest.raises((ConfigError, SetupError),
                           match=r"clock.late=\[\"carry\", \"drop\"\] carries the late updates "
                                 r"of layer 1, but clock.mode makes layer 1 'sync'"):
            train(_config(os.path.join(base, "bad.h5"), profile, mode="sync"), world)
