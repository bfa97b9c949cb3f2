"""Server optimizers and plug-in rules under MPI, against independent serial references.

Run with ``mpiexec -n N python tests/mpi_pytest.py LOGDIR tests/test_server_opt_mpi.py`` for N in
1, 2, 4, 8. A 2-layer tree with FedAdam on the top layer must equal the serial H-SGD reference of
tests/test_train_mpi.py with an independent numpy FedAdam (tests/test_server_opt.py) applied to
each global mean; FedAvgM with eta = 1, beta = 0 must give plain FedAvg's bits; resuming must be
bitwise with the leaders' optimizer state restored (and differ without it); a plug-in rule plus a
server step at a leader must equal numpy's trimmed mean followed by numpy's FedAvgM.
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import parallel_assert
from test_server_opt import NumpyServerOpt
from test_strategy import numpy_trimmed_mean
from test_train_mpi import (
    RTOL,
    assert_close,
    assert_same_bits_everywhere,
    initial_model,
    make_config,
    serial_reference,
    tree_shape,
)

pytest.importorskip("mpi4py")

import hflmpi.federation  # noqa: E402
from hflmpi.core.server_opt import ServerOptOptions  # noqa: E402
from hflmpi.core.strategy import load_rule  # noqa: E402
from hflmpi.core.topology import plan_fanouts  # noqa: E402
from hflmpi.federation import train  # noqa: E402
from hflmpi.mpi.aggregate import HierarchicalAggregator  # noqa: E402
from hflmpi.mpi.comm import LayerComms  # noqa: E402
from hflmpi.mpi.layers import LayerFailedError  # noqa: E402
from hflmpi.record.checkpoint import load_latest_valid  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

EXAMPLES = str(Path(__file__).resolve().parents[1] / "docs" / "examples")
PLUGIN = "trimmed_mean_rule:TrimmedMean"
ADAM = {"lr": 1.0, "beta1": 0.9, "beta2": 0.99, "tau": 0.1}


@pytest.fixture
def examples_on_path():
    sys.path.insert(0, EXAMPLES)
    yield
    sys.path.remove(EXAMPLES)


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize("shape", ["singletons", "pairs", "uneven"])
def test_fedadam_on_the_top_layer_equals_serial_reference(comm, shared_dir, shape):
    planned = tree_shape(shape, comm.size)
    if planned is None:
        pytest.skip(f"tree shape {shape!r} does not fit {comm.size} ranks")
    topology, subtrees = planned
    sections = {"optim": {"momentum": 0.5, "lr": 0.1},
                "server_opt": {"optimizer": ["none", "adam"], **ADAM}}
    if shape == "uneven":
        sections["aggregation"] = {"algorithm": "tree"}
    config = make_config(os.path.join(shared_dir, "adam.h5"), topology, [3, 2], **sections)
    result = train(config, comm)
    assert_same_bits_everywhere(comm, result.model, shape)
    numel = result.model.numel()
    adam = NumpyServerOpt("adam", numel, ADAM["lr"], 0.0, ADAM["beta1"], ADAM["beta2"],
                          ADAM["tau"])
    reference = serial_reference(config, comm.size, subtrees, server=adam.step)
    assert_close(comm, result.model, reference, f"FedAdam on H-SGD {shape}")
    plain = serial_reference(config, comm.size, subtrees)
    gap = float((plain - reference).abs().max())
    parallel_assert(comm, gap > 100 * RTOL, f"FedAdam changed nothing (gap {gap:.3g})")


FEDAVG_CASES = {
    "exact-tree": {"aggregation": {"algorithm": "tree"}},
    "quantized": {"quantize": {"bits": [8], "bucket_size": 64}},
    "median": {"aggregation": {"robust": ["median"]}},
    "private": {"privacy": {"layer": 1, "clip": 0.5, "noise_multiplier": 0.3,
                            "insecure_reproducible_noise": True},
                "run": {"divergence": False}},
}


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize("case", sorted(FEDAVG_CASES))
def test_fedavgm_with_lr1_momentum0_is_fedavg_bit_for_bit(comm, shared_dir, case):
    """Same reduction order (depth 1: the nested path is the tree algorithm), same bits; also
    after the quantized sum, the robust rule or the DP noise (the aggregate the step starts from)."""
    if case == "median" and comm.size == 2:
        pytest.skip("the median of a group of 2 is refused (it tolerates no Byzantine child)")
    sections = FEDAVG_CASES[case]
    plain = make_config(os.path.join(shared_dir, "plain.h5"), {"fanouts": [comm.size]}, [3],
                        **sections)
    avgm = make_config(os.path.join(shared_dir, "avgm.h5"), {"fanouts": [comm.size]}, [3],
                       server_opt={"optimizer": ["avgm"], "lr": 1.0, "momentum": 0.0},
                       **sections)
    a, b = train(plain, comm), train(avgm, comm)
    moved = float((a.model - initial_model(plain)).abs().max())
    parallel_assert(comm, moved > 1e-3, f"training barely moved ({moved:.3g})")
    diff = float((a.model.double() - b.model.double()).abs().max())
    parallel_assert(comm, torch.equal(a.model, b.model),
                    f"FedAvgM(1, 0) differs from FedAvg by {diff:.3g}")


def _resume_config(comm, out: str, rounds: int):
    if comm.size % 2 == 0:
        topology, tau, bits = {"fanouts": [2, comm.size // 2]}, [2, 2], [4, 0]
        server = {"optimizer": ["avgm", "adam"], "lr": [1.0, 0.5], "momentum": 0.5, "tau": 0.1}
    else:
        topology, tau, bits = {"fanouts": [comm.size]}, [4], [8]
        server = {"optimizer": ["yogi"], "lr": 0.5, "tau": 0.1}
    return make_config(out, topology, tau, server_opt=server,
                       run={"rounds": rounds, "checkpoint_every": 1, "eval_every": 2},
                       quantize={"bits": bits, "bucket_size": 64}, optim={"lr": 0.05})


@pytest.mark.mpi(min_size=1)
def test_resume_restores_the_server_state_bit_for_bit(comm, shared_dir, monkeypatch):
    full = train(_resume_config(comm, os.path.join(shared_dir, "full.h5"), 4), comm)
    path = os.path.join(shared_dir, "part.h5")
    train(_resume_config(comm, path, 2), comm)
    if comm.rank == 0:
        arrays = load_latest_valid(path).extra_arrays
        layers = [1, 2] if comm.size % 2 == 0 else [1]
        groups = {1: comm.size // 2, 2: 1} if comm.size % 2 == 0 else {1: 1}
        slots = {1: 1, 2: 2} if comm.size % 2 == 0 else {1: 2}
        shapes = {n: arrays[f"server_opt_layer{n}"].shape for n in layers}
        ok = all(shapes[n] == (groups[n], slots[n], full.model.numel()) for n in layers)
        ok = ok and all(np.abs(arrays[f"server_opt_layer{n}"][:, 0]).max() > 0 for n in layers)
        message = f"checkpointed server state shapes {shapes} (or m all zero)"
    else:
        ok, message = True, ""
    parallel_assert(comm, ok, message)
    resumed = train(_resume_config(comm, path, 4), comm, resume=path)
    assert_same_bits_everywhere(comm, resumed.model, "resumed")
    diff = float((resumed.model.double() - full.model.double()).abs().max())
    parallel_assert(comm, torch.equal(resumed.model, full.model),
                    f"resumed model differs from the uninterrupted one by {diff:.3g}")

    # Without the restored state the run lands elsewhere: the state is what made it bitwise.
    path2 = os.path.join(shared_dir, "fresh.h5")
    train(_resume_config(comm, path2, 2), comm)
    monkeypatch.setattr(hflmpi.federation, "restore_server_state", lambda *args: [])
    fresh = train(_resume_config(comm, path2, 4), comm, resume=path2)
    parallel_assert(comm, not torch.equal(fresh.model, full.model),
                    "dropping the server state on resume changed nothing")


def _flat_aggregator(comm, rule, server, caps):
    comms = LayerComms(comm, plan_fanouts([comm.size], comm.size))
    flat = torch.tensor(np.random.default_rng(0).normal(size=40))  # rank 0's is broadcast
    agg = HierarchicalAggregator(comms, flat, robust=[rule], server_opt=[server], weight_caps=caps)
    agg.broadcast()
    return comms, flat, agg


@pytest.mark.mpi(min_size=1)
def test_plugin_rule_then_server_step_equals_numpy(comm, examples_on_path):
    weights = [float(r + 1) for r in range(comm.size)]
    server = ServerOptOptions("avgm", lr=0.5, momentum=0.9)
    comms, flat, agg = _flat_aggregator(comm, load_rule(PLUGIN), server, weights)
    try:
        x = flat.numpy().copy()
        reference = NumpyServerOpt("avgm", 40, 0.5, 0.9, 0.0, 0.0, 1.0)
        for step in range(3):
            updates = np.stack([np.random.default_rng(100 * step + r).normal(size=40) * (r + 1)
                                for r in range(comm.size)]).astype(np.float32)
            flat.copy_(torch.from_numpy(x + updates[comm.rank].astype(np.float64)))
            agg.aggregate(1, weights[comm.rank], step=step)
            # the layer gathers float32 updates (x_c - x), as the example receives them
            gathered = ((x + updates.astype(np.float64)) - x).astype(np.float32)
            combined = numpy_trimmed_mean(gathered, np.array(weights), 0.2)
            x = reference.step(x, x + combined)
            err = float(np.abs(flat.numpy() - x).max())
            parallel_assert(comm, err < 1e-12, f"step {step}: max |got - numpy| = {err:.3g}")
    finally:
        comms.free()


class _Broken:
    def aggregate(self, updates, weights):
        raise RuntimeError("user bug")


@pytest.mark.mpi(min_size=1)
def test_a_failing_plugin_stops_every_rank_with_its_reason(comm):
    comms, flat, agg = _flat_aggregator(comm, _Broken(), None, None)
    try:
        try:
            agg.aggregate(1, 1.0)
            message = "no error"
        except LayerFailedError as exc:
            message = str(exc)
        parallel_assert(comm, "plug-in _Broken" in message and "RuntimeError: user bug" in message,
                        message)
    finally:
        comms.free()


@pytest.mark.mpi(min_size=1)
def test_plugin_by_import_path_in_a_run(comm, shared_dir, examples_on_path):
    """The config path: the plug-in trims like the built-in rule (or, trimming none, is FedAvg)."""
    tau = [2]
    plugin = make_config(os.path.join(shared_dir, "plugin.h5"), {"fanouts": [comm.size]}, tau,
                         aggregation={"robust": [PLUGIN]}, run={"rounds": 2})
    builtin = ({"robust": ["trimmed_mean"], "trim": 0.2} if math.floor(0.2 * comm.size) >= 1
               else {"algorithm": "tree"})
    other = make_config(os.path.join(shared_dir, "other.h5"), {"fanouts": [comm.size]}, tau,
                        aggregation=builtin, run={"rounds": 2})
    a, b = train(plugin, comm), train(other, comm)
    assert_same_bits_everywhere(comm, a.model, "plug-in run")
    assert_close(comm, a.model, b.model, f"plug-in vs {builtin}")
