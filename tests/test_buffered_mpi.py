"""Buffered (FedBuff) layer-1 nodes end to end under mpiexec -n 1, 2, 4 (docs/async.md).

* Exact layers: the model equals a serial re-implementation (torch SGD per client, its own
  event loop over the simulated arrivals, float64 sums) of the documented semantics: K = 2,
  three flushes of each edge per round, updates discounted by ``(1 + s)^-a`` and divided by
  the buffer's undiscounted weight, a server learning rate, updates in flight dropped when the
  cloud's model comes down. On 4 ranks both edges span two ranks (their flushes are
  collectives). The record holds the same flushes and staleness.
* Quantized layers (``jobs/buffered.toml`` with two edges of 32, so that they span ranks on 4):
  the same model bits on every rank count, on a rerun and after a resume.
* Bad input stops every rank with a clear message.
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
from hflmpi.core.rng import torch_generator  # noqa: E402
from hflmpi.federation import train  # noqa: E402
from hflmpi.learn.data import load_dataset  # noqa: E402
from hflmpi.learn.models import build_model  # noqa: E402
from hflmpi.learn.partition import make_partition  # noqa: E402
from hflmpi.mpi.guard import SetupError  # noqa: E402
from hflmpi.record.reading import read_clients, read_metrics  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

JOB = Path(__file__).resolve().parent.parent / "jobs" / "buffered.toml"
# seconds per local step of clients 0..7: no two arrivals of an edge within 0.01 s of each other
STEP = [1.03, 1.51, 4.07, 0.71, 2.11, 0.53, 0.97, 3.13]
EXPONENT, SERVER_LR, K = 1.0, 0.8, 2


@contextlib.contextmanager
def _shared_dir(comm: MPI.Comm) -> Iterator[str]:
    """Rank 0's temporary directory, on every rank; removed when every rank is done."""
    path = comm.bcast(tempfile.mkdtemp(prefix="hflmpi-buffered-") if comm.Get_rank() == 0
                      else None, root=0)
    try:
        yield path
    finally:
        comm.Barrier()
        if comm.Get_rank() == 0:
            shutil.rmtree(path, ignore_errors=True)


def _digest(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.detach().contiguous().numpy().tobytes()).hexdigest()


def _exact_config(out: str, profile: str, **clock: Any):
    return config_from_dict({
        "run": {"seed": 3, "rounds": 2, "out": out, "progress": "off"},
        "topology": {"fanouts": [4, 2]},
        "schedule": {"tau": [2, 3]},
        "clients": {"count": 8},
        "clock": {"mode": ["buffered", "sync"], "buffer": [K, 0], "profile": profile,
                  "staleness_exponent": [EXPONENT, 0], "server_lr": SERVER_LR, **clock},
        "data": {"name": "synthetic", "synthetic_samples": 480, "synthetic_features": 10,
                 "synthetic_classes": 3, "partition": "dirichlet", "alpha": 1.0},
        "model": {"name": "logreg"},
        "optim": {"lr": 0.1, "batch_size": 8},
    })


def _write_profile(comm: MPI.Comm, path: str) -> None:
    if comm.Get_rank() == 0:
        lines = ["client,step_seconds,uplink,latency"]
        lines += [f"{c},{s},1e12,0" for c, s in enumerate(STEP)]
        Path(path).write_text("\n".join(lines) + "\n")
    comm.Barrier()


def _serial_buffered_reference(config) -> tuple[torch.Tensor, list[int], list[int]]:
    """Two edges of 4 clients run FedBuff for tau_2 flushes; the cloud averages the edges.

    Returns the final model, every applied update's staleness, the flushes per round and each
    round's per-client staleness of the last applied update (NaN: none).
    """
    train_set, _ = load_dataset(config.data, config.run.seed)
    tau1, flushes = config.schedule.tau
    parts = make_partition(train_set.labels.numpy(), 8, config.data, config.run.seed)
    model = build_model(config.model, train_set.input_shape, train_set.num_classes,
                        seed=config.run.seed)
    positions = {c: (0, 0) for c in range(8)}
    numel = sum(p.numel() for p in model.parameters())
    # 2 * (numel * 4 bytes / 1e12 B/s) + tau1 * step: the download and upload are ~free
    duration = [2 * (numel * 4 / 1e12) + tau1 * s for s in STEP]

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

    root = torch.nn.utils.parameters_to_vector(model.parameters()).detach().clone()
    staleness: list[int] = []
    counts: list[int] = []
    last = np.full((config.run.rounds, 8), np.nan)
    for rnd in range(config.run.rounds):
        edges, weight = [], []
        for e in range(2):
            x, version, applied = root.clone(), 0, set()
            members = list(range(4 * e, 4 * e + 4))
            # per busy client: (arrival time, downloaded version, downloaded model); it trains
            # when its update arrives (the same numbers; a dropped one is never trained)
            busy = {c: (duration[c], 0, x) for c in members}
            buffer: list[tuple[int, int, torch.Tensor]] = []
            done = 0
            while done < flushes:
                c = min(members, key=lambda m: (busy[m][0], m))
                now, v, start = busy.pop(c)
                buffer.append((c, v, local(c, start) - start))
                if len(buffer) == K:
                    w = np.array([len(parts[m]) for m, _, _ in buffer], dtype=np.float64)
                    total = torch.zeros_like(x, dtype=torch.float64)
                    for (m, vm, dm), wm in zip(buffer, w):
                        staleness.append(version - vm)
                        last[rnd, m] = version - vm
                        total += dm.double() * (SERVER_LR * wm * (1 + version - vm) ** -EXPONENT
                                                / w.sum())
                        applied.add(m)
                    x = (x.double() + total).float()
                    version, done, buffer = version + 1, done + 1, []
                if done < flushes:
                    busy[c] = (now + duration[c], version, x)
                else:  # the still-busy clients' work is dropped
                    members = []
            edges.append(x)
            weight.append(sum(len(parts[m]) for m in applied))
        counts.append(2 * flushes)
        root = sum(edges[e].double() * (weight[e] / sum(weight)) for e in range(2)).float()
    return root, staleness, counts, last


@pytest.mark.mpi(min_size=1)
def test_buffered_edges_match_a_serial_fedbuff_reference():
    world = MPI.COMM_WORLD
    with _shared_dir(world) as base:
        profile = os.path.join(base, "devices.csv")
        _write_profile(world, profile)
        out = os.path.join(base, "buffered.h5")
        config = _exact_config(out, profile)
        seen: list[tuple[int, int, int]] = []

        class Spy:
            def on_aggregation(self, info) -> None:
                seen.append((info.round, info.step, info.layer))

        result = train(config, world, callbacks=[Spy()])
        expected, staleness, flushes, last = _serial_buffered_reference(config)
        assert seen == [(1, 6, 2), (2, 6, 2)]  # after each cloud aggregation (tau = [2, 3])
        assert max(staleness) >= 2  # the example exercises the discount
        np.testing.assert_allclose(result.model.numpy(), expected.numpy(), rtol=1e-5, atol=1e-6)
        if world.Get_rank() == 0:
            metrics = read_metrics(out)
            per_round = len(staleness) // 2
            np.testing.assert_array_equal(metrics["flushes"][:, 0], flushes)
            np.testing.assert_array_equal(metrics["staleness_count"][:, 0], [per_round] * 2)
            np.testing.assert_allclose(metrics["staleness_mean"][:, 0],
                                       [np.mean(staleness[:per_round]),
                                        np.mean(staleness[per_round:])])
            np.testing.assert_array_equal(metrics["staleness_max"][:, 0],
                                          [max(staleness[:per_round]),
                                           max(staleness[per_round:])])
            assert np.isnan(metrics["flushes"][:, 1]).all()
            assert (metrics["late"][:, 0] > 0).all()  # in-flight work dropped at the cloud
            np.testing.assert_array_equal(read_clients(out)["staleness"], last)


def _job(out: str, rounds: int):
    return load_config(JOB, [f"run.out={out!r}".replace("'", '"'), f"run.rounds={rounds}",
                             "run.checkpoint_every=1", 'run.progress="off"',
                             "topology.fanouts=[32, 2]", "clock.buffer=[5, 0]"])


@pytest.mark.mpi(min_size=1)
def test_the_quantized_buffered_job_gives_the_same_bits_on_any_rank_count_rerun_and_resume():
    world = MPI.COMM_WORLD
    sizes = [n for n in (1, 2, 4) if n <= world.Get_size()]
    with _shared_dir(world) as base:
        digests = {}
        for size in sizes:
            sub = world.Split(0 if world.Get_rank() < size else MPI.UNDEFINED, world.Get_rank())
            digest = None
            if sub != MPI.COMM_NULL:
                digest = _digest(train(_job(os.path.join(base, f"n{size}.h5"), 3), sub).model)
                sub.Free()
            digests[size] = world.bcast(digest, root=0)
        assert len(set(digests.values())) == 1, digests
        again = train(_job(os.path.join(base, "again.h5"), 3), world)
        assert _digest(again.model) == digests[sizes[0]]
        part = os.path.join(base, "part.h5")
        train(_job(part, 1), world)
        resumed = train(_job(part, 3), world, resume=part)
        assert _digest(resumed.model) == digests[sizes[0]]
        if world.Get_rank() == 0:
            whole, parted = read_metrics(os.path.join(base, "again.h5")), read_metrics(part)
            for name in ("sim_time", "late", "flushes", "staleness_mean", "staleness_max"):
                np.testing.assert_array_equal(parted[name], whole[name])
            assert (whole["flushes"][:, 0] == 8).all()  # 2 edges x tau_2 = 4 flushes


@pytest.mark.mpi(min_size=1)
def test_bad_buffered_input_fails_on_every_rank_with_a_clear_message():
    world = MPI.COMM_WORLD
    with _shared_dir(world) as base:
        profile = os.path.join(base, "devices.csv")
        _write_profile(world, profile)
        with pytest.raises((ConfigError, SetupError), match="larger than layer-1 group"):
            train(_exact_config(os.path.join(base, "a.h5"), profile, buffer=[5, 0]), world)
        with pytest.raises((ConfigError, SetupError), match="aggregation.secure"):
            config = _exact_config(os.path.join(base, "b.h5"), profile)
            train(config_from_dict({**_dict(config), "quantize": {"bits": [8, 8]},
                                    "aggregation": {"secure": [True, False]}}), world)


def _dict(config) -> dict[str, Any]:
    from hflmpi.config import config_to_dict

    return config_to_dict(config)
