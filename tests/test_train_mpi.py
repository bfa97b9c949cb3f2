"""End-to-end MPI tests of :func:`hflmpi.federation.train` against independent serial references.

Run with ``mpiexec -n N python tests/mpi_pytest.py LOGDIR tests/test_train_mpi.py`` for N in
1, 2, 4, 8. With quantization off the distributed run must reproduce, to float32 rounding,

* FedAvg (depth 1): every client takes ``tau_1`` SGD steps, then the sample-weighted mean;
* H-SGD (depth >= 2): group means every ``I = tau_1`` steps, larger subtrees at the longer periods.

The reference in this file shares no training code with hflmpi: it replays each client with
``torch.optim.SGD`` (FedProx as an autograd penalty in the loss), its own batch sampler (the
documented epoch permutation keyed ``(seed, "batches", rank, epoch)``), its own period arithmetic
and a float64 weighted mean over subtrees written out per tree shape. Only the inputs are shared:
the dataset, the partition and the initial model.

With quantization on, resuming from a checkpoint (including a fallback to the previous one
after the newest is corrupted) must be bitwise identical to an uninterrupted run, and every rank
must end with the same model bits.
"""

from __future__ import annotations

import copy
import hashlib
import math
import os
import shutil
import tempfile
from typing import Any, Callable

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import parallel_assert

pytest.importorskip("mpi4py")
from mpi4py import MPI  # noqa: E402

from hflmpi.config import RunConfig, config_from_dict  # noqa: E402
from hflmpi.core.rng import torch_generator  # noqa: E402
from hflmpi.federation import train  # noqa: E402
from hflmpi.learn.data import load_dataset  # noqa: E402
from hflmpi.learn.models import build_model  # noqa: E402
from hflmpi.learn.partition import make_partition  # noqa: E402
from hflmpi.record.reading import read_metrics, read_run_info  # noqa: E402

SAMPLES, FEATURES, CLASSES = 512, 20, 4
RTOL = 1e-5  # float32 training; reference means in float64


# ---------------------------------------------------------------------------------------------
# helpers


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make_config(
    out: str, topology: dict[str, Any], tau: list[int], **sections: dict[str, Any]
) -> RunConfig:
    """Return a tiny synthetic run config; ``sections`` are merged into the defaults below."""
    data: dict[str, dict[str, Any]] = {
        "run": {"seed": 7, "rounds": 3, "out": out, "progress": "off", "divergence": True},
        "topology": topology,
        "schedule": {"tau": tau},
        "data": {"name": "synthetic", "synthetic_samples": SAMPLES,
                 "synthetic_features": FEATURES, "synthetic_classes": CLASSES,
                 "partition": "dirichlet", "alpha": 1.0},
        "model": {"name": "mlp", "hidden": [16]},
        "optim": {"lr": 0.1, "batch_size": 16},
    }
    for name, table in sections.items():
        data[name] = {**data.get(name, {}), **table}
    return config_from_dict(data)


def digest(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.detach().cpu().contiguous().numpy().tobytes()).hexdigest()


def assert_same_bits_everywhere(comm, tensor: torch.Tensor, what: str) -> None:
    """Every rank must hold exactly the same bits (compared by SHA-256)."""
    digests = comm.allgather(digest(tensor))
    parallel_assert(comm, len(set(digests)) == 1,
                    f"{what}: model bits differ across ranks: {digests}")


def assert_close(
    comm, got: torch.Tensor, want: torch.Tensor, what: str, rtol: float = RTOL
) -> None:
    got64, want64 = got.double(), want.double()
    err = float((got64 - want64).abs().max())
    scale = max(1.0, float(want64.abs().max()))
    parallel_assert(comm, got.shape == want.shape and err <= rtol * scale,
                    f"{what}: max |train - reference| = {err:.3g} > {rtol * scale:.3g}")


# ---------------------------------------------------------------------------------------------
# tree shapes: the topology config and, independently, the subtrees of every layer


def _blocks(size: int, width: int) -> list[list[int]]:
    return [list(range(k, k + width)) for k in range(0, size, width)]


def tree_shape(name: str, size: int) -> tuple[dict[str, Any], list[list[list[int]]]] | None:
    """Return ``(topology section, subtrees[layer-1] = list of rank lists)``, or None if n/a."""
    everyone = [list(range(size))]
    if name == "flat":
        return {"fanouts": [size]}, [everyone]
    if name == "singletons":  # layer 1 groups of one rank: H-SGD whose local average is a no-op
        return {"fanouts": [1, size]}, [_blocks(size, 1), everyone]
    if name == "pairs" and size % 2 == 0:
        return {"fanouts": [2, size // 2]}, [_blocks(size, 2), everyone]
    if name == "uneven" and size >= 3:  # non-contiguous, unequal groups
        groups = [[0, size - 1], list(range(1, size - 1))]
        return {"groups": groups}, [groups, everyone]
    if name == "depth3" and size % 4 == 0:
        return {"fanouts": [2, 2, size // 4]}, [_blocks(size, 2), _blocks(size, 4), everyone]
    return None


# ---------------------------------------------------------------------------------------------
# the independent serial reference


class _ReferenceSampler:
    """Client batches: epoch e is randperm(n) from the key (seed, "batches", client, e), cut into
    consecutive slices of batch_size (the last one shorter); a batch never spans two epochs."""

    def __init__(self, indices: np.ndarray, batch_size: int, seed: int, client: int) -> None:
        self.indices = torch.as_tensor(indices, dtype=torch.int64)
        self.batch_size, self.seed, self.client = batch_size, seed, client
        self.epoch, self.position = -1, 0
        self.order = torch.empty(0, dtype=torch.int64)

    def next(self) -> torch.Tensor:
        if self.position >= self.order.numel():
            self.epoch += 1
            g = torch_generator(self.seed, purpose="batches", rank=self.client, round=self.epoch)
            self.order = self.indices[torch.randperm(self.indices.numel(), generator=g)]
            self.position = 0
        batch = self.order[self.position:self.position + self.batch_size]
        self.position += self.batch_size
        return batch


def _reference_lr(config: RunConfig, round0: int) -> float:
    o, total = config.optim, config.run.rounds
    if o.lr_schedule == "constant":
        return o.lr
    if o.lr_schedule == "step":
        return o.lr * o.lr_gamma ** (round0 // o.lr_step_rounds)
    return o.lr * (1.0 + math.cos(math.pi * round0 / total)) / 2.0


def serial_reference(
    config: RunConfig, world: int, subtrees: list[list[list[int]]],
    dtype: torch.dtype = torch.float32,
    server: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None,
) -> torch.Tensor:
    """Replay the federation serially and return the final global model, flat, in ``dtype``.

    Every client trains its own copy with ``torch.optim.SGD``; after local step ``t`` of a round
    the highest layer ``L`` whose period ``tau_1 * ... * tau_L`` divides ``t`` averages each of
    its subtrees (float64, weights = samples or 1), and everyone in it continues from that mean.
    With ``dtype=torch.float64`` the models and the (float32-loaded) features are widened first.
    ``server(x_prev, mean)`` (flat numpy) replaces each global (top-layer) mean by its result,
    with ``x_prev`` the previous global model: a server optimizer on the top layer.
    """
    seed, optim = config.run.seed, config.optim
    train_set, _ = load_dataset(config.data, seed)
    features = train_set.features.to(dtype)
    parts = make_partition(train_set.labels.numpy(), world, config.data, seed)
    weights = [float(len(p)) if config.aggregation.weighting == "samples" else 1.0 for p in parts]
    start = build_model(config.model, train_set.input_shape, train_set.num_classes,
                        seed=seed).to(dtype)
    models = [copy.deepcopy(start) for _ in range(world)]
    previous = _flat(models[0])
    anchors = [[p.detach().clone() for p in m.parameters()] for m in models]
    mu = optim.mu if optim.solver == "fedprox" else 0.0

    def fresh_optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
        return torch.optim.SGD(model.parameters(), lr=optim.lr, momentum=optim.momentum,
                               weight_decay=optim.weight_decay)

    optimizers = [fresh_optimizer(m) for m in models]
    samplers = [_ReferenceSampler(parts[r], optim.batch_size, seed, r) for r in range(world)]
    tau = config.schedule.tau
    periods = [math.prod(tau[:n]) for n in range(1, len(tau) + 1)]  # steps per layer-n period
    for round0 in range(config.run.rounds):
        lr = _reference_lr(config, round0)
        for opt in optimizers:
            for group in opt.param_groups:
                group["lr"] = lr
        for t in range(1, periods[-1] + 1):
            for r in range(world):
                batch = samplers[r].next()
                logits = models[r](features[batch])
                loss = F.cross_entropy(logits, train_set.labels[batch])
                if mu:
                    pairs = zip(models[r].parameters(), anchors[r])
                    loss = loss + 0.5 * mu * sum(((p - a) ** 2).sum() for p, a in pairs)
                optimizers[r].zero_grad()
                loss.backward()
                optimizers[r].step()
            layer = max([n for n, period in enumerate(periods, 1) if t % period == 0], default=0)
            if layer == 0:
                continue
            for members in subtrees[layer - 1]:
                total = sum(weights[r] for r in members)
                params = [list(models[r].parameters()) for r in members]
                with torch.no_grad():
                    for i in range(len(params[0])):
                        mean = sum((weights[r] / total) * params[k][i].double()
                                   for k, r in enumerate(members))
                        for k in range(len(members)):
                            params[k][i].copy_(mean)
            if server is not None and layer == len(periods):
                new = server(previous.numpy(), _flat(models[0]).numpy())
                previous = torch.from_numpy(new).to(dtype)  # what the MPI run broadcasts
                with torch.no_grad():
                    for model in models:
                        for p, chunk in zip(model.parameters(),
                                            previous.split([p.numel() for p in model.parameters()])):
                            p.copy_(chunk.view_as(p))
            for r in range(world):
                anchors[r] = [p.detach().clone() for p in models[r].parameters()]
                if optim.momentum_reset == "aggregation":
                    optimizers[r] = fresh_optimizer(models[r])
                    for group in optimizers[r].param_groups:
                        group["lr"] = lr
    return _flat(models[0]).to(dtype)


def _flat(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def initial_model(config: RunConfig) -> torch.Tensor:
    train_set, _ = load_dataset(config.data, config.run.seed)
    model = build_model(config.model, train_set.input_shape, train_set.num_classes,
                        seed=config.run.seed)
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


# ---------------------------------------------------------------------------------------------
# 1-2. exactness against FedAvg / H-SGD with quantization off

DEPTH1_CASES = {
    "sgd": {"optim": {"lr": 0.1, "momentum": 0.0}},
    "fedprox-momentum-cosine-uniform": {
        "optim": {"solver": "fedprox", "mu": 0.5, "momentum": 0.5, "weight_decay": 1e-3,
                  "lr_schedule": "cosine", "lr": 0.1},
        "aggregation": {"weighting": "uniform"},
    },
    "momentum-never-step-tree": {
        "optim": {"momentum": 0.9, "momentum_reset": "never", "lr_schedule": "step",
                  "lr_step_rounds": 2, "lr_gamma": 0.5, "lr": 0.05},
        "aggregation": {"algorithm": "tree"},
        "run": {"dtype": "float32", "eval_every": 2},
    },
}


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize("case", sorted(DEPTH1_CASES))
def test_depth1_equals_serial_fedavg(comm, shared_dir, case):
    """fanouts=[size], tau=[k], no quantization: the result is FedAvg with k local steps."""
    topology, subtrees = tree_shape("flat", comm.size)
    config = make_config(os.path.join(shared_dir, "fedavg.h5"), topology, [4], **DEPTH1_CASES[case])
    result = train(config, comm)
    assert_same_bits_everywhere(comm, result.model, case)
    reference = serial_reference(config, comm.size, subtrees)
    start = initial_model(config)
    parallel_assert(comm, float((reference - start).abs().max()) > 100 * RTOL,
                    "the reference barely moved; the comparison would prove nothing")
    assert_close(comm, result.model, reference, f"FedAvg {case}")
    parallel_assert(comm, result.rounds == config.run.rounds, f"rounds={result.rounds}")
    if comm.rank == 0:
        metrics = read_metrics(result.record_path)
        ok = list(metrics["round"]) == list(range(1, config.run.rounds + 1))
    else:
        ok = True
    parallel_assert(comm, ok, "metrics rows are not rounds 1..R")


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize("shape", ["singletons", "pairs", "uneven", "depth3"])
def test_hierarchy_equals_serial_hsgd(comm, shared_dir, shape):
    """Depth >= 2, no quantization: group means every I = tau_1 steps, global every G steps."""
    planned = tree_shape(shape, comm.size)
    if planned is None:
        pytest.skip(f"tree shape {shape!r} does not fit {comm.size} ranks")
    topology, subtrees = planned
    tau = [3, 2] if len(subtrees) == 2 else [2, 2, 2]
    sections = {"optim": {"momentum": 0.5, "lr": 0.1}}
    if shape == "uneven":
        sections["aggregation"] = {"algorithm": "tree"}
    config = make_config(os.path.join(shared_dir, "hsgd.h5"), topology, tau, **sections)
    result = train(config, comm)
    assert_same_bits_everywhere(comm, result.model, shape)
    reference = serial_reference(config, comm.size, subtrees)
    assert_close(comm, result.model, reference, f"H-SGD {shape} tau={tau}")
    if any(len(g) > 1 for g in subtrees[0]):
        # The group averages must matter: FedAvg with G local steps lands elsewhere.
        fedavg_only_global = make_config("unused.h5", {"fanouts": [comm.size]}, [math.prod(tau)],
                                         **sections)
        plain = serial_reference(fedavg_only_global, comm.size, [[list(range(comm.size))]])
        gap = float((plain - reference).abs().max())
        parallel_assert(comm, gap > 100 * RTOL, f"group averaging changed nothing (gap {gap:.3g})")


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize("shape", ["flat", "pairs"])
def test_float64_run_equals_serial_float64_reference(comm, shared_dir, shape):
    """run.dtype = "float64" (a documented option) trains in float64 end to end: the float32
    features are widened for the float64 model and the result matches a float64 serial
    FedAvg / H-SGD to a tolerance no float32 computation could meet."""
    planned = tree_shape(shape, comm.size)
    if planned is None:
        pytest.skip(f"tree shape {shape!r} does not fit {comm.size} ranks")
    topology, subtrees = planned
    tau = [4] if len(subtrees) == 1 else [2, 2]
    config = make_config(os.path.join(shared_dir, f"f64-{shape}.h5"), topology, tau,
                         run={"dtype": "float64"}, optim={"momentum": 0.5, "lr": 0.1})
    result = train(config, comm)
    parallel_assert(comm, result.model.dtype == torch.float64, f"model dtype {result.model.dtype}")
    assert_same_bits_everywhere(comm, result.model, f"float64 {shape}")
    reference = serial_reference(config, comm.size, subtrees, dtype=torch.float64)
    start = initial_model(config).double()
    parallel_assert(comm, float((reference - start).abs().max()) > 1e-3,
                    "the reference barely moved; the comparison would prove nothing")
    assert_close(comm, result.model, reference, f"float64 {shape}", rtol=1e-10)
    float32 = serial_reference(config, comm.size, subtrees, dtype=torch.float32).double()
    gap = float((float32 - reference).abs().max())
    parallel_assert(comm, gap > 1e-10 * 100, f"float32 and float64 references agree to {gap:.3g}; "
                    "the tolerance would not tell them apart")
    parallel_assert(comm, math.isfinite(result.test_accuracy), "no evaluation in float64")


@pytest.mark.mpi(min_size=2)
def test_fewer_samples_than_clients_is_one_setup_error(comm, shared_dir):
    """Partitioning runs inside the collective set-up checks: every rank raises the same
    SetupError (naming the sample count, the ranks and the fix), none a bare ValueError."""
    from hflmpi.mpi.guard import SetupError

    config = make_config(os.path.join(shared_dir, "tiny.h5"), {"fanouts": [comm.size]}, [2],
                         data={"synthetic_samples": 2, "partition": "iid"})
    try:
        train(config, comm)
        message = "no error"
    except SetupError as exc:
        message = str(exc)
    except Exception as exc:  # noqa: BLE001 - the test reports what was raised instead
        message = f"{type(exc).__name__} instead of SetupError: {exc}"
    parallel_assert(comm, "holds 1 samples" in message and f"{comm.size} clients" in message
                    and "use fewer ranks or more data" in message, message)
    exists = os.path.exists(os.path.join(shared_dir, "tiny.h5"))
    parallel_assert(comm, not exists, "the refused run created its run file")


# ---------------------------------------------------------------------------------------------
# 3, 5, 6. bitwise resume with quantization and momentum, and fallback to the previous checkpoint


def _quantized_config(comm, out: str, rounds: int) -> RunConfig:
    if comm.size % 2 == 0:
        topology, tau, bits = {"fanouts": [2, comm.size // 2]}, [2, 2], [4, 8]
    else:
        topology, tau, bits = {"fanouts": [comm.size]}, [4], [8]
    return make_config(
        out, topology, tau,
        run={"rounds": rounds, "eval_every": 3, "checkpoint_every": 1},
        quantize={"bits": bits, "bucket_size": 64},
        optim={"momentum": 0.9, "momentum_reset": "never", "lr": 0.05,
               "lr_schedule": "step", "lr_step_rounds": 2, "lr_gamma": 0.5},
    )


ROUNDS = 4


@pytest.fixture(scope="module")
def uninterrupted():
    """The quantized run of ROUNDS rounds in one go (shared by the resume tests)."""
    comm = MPI.COMM_WORLD
    torch.set_num_threads(1)
    directory = comm.bcast(tempfile.mkdtemp(prefix="hflmpi-full-") if comm.rank == 0 else None)
    result = train(_quantized_config(comm, os.path.join(directory, "full.h5"), ROUNDS), comm)
    yield result
    comm.Barrier()
    if comm.rank == 0:
        shutil.rmtree(directory, ignore_errors=True)


def _rounds_in(comm, path) -> list[int]:
    rounds = [int(r) for r in read_metrics(path)["round"]] if comm.rank == 0 else None
    return comm.bcast(rounds, root=0)


@pytest.mark.mpi(min_size=1)
def test_resume_is_bitwise_identical(comm, shared_dir, uninterrupted):
    """R1 rounds, stop, resume to R: same bits as R rounds in one go; metrics rows 1..R once."""
    assert_same_bits_everywhere(comm, uninterrupted.model, "uninterrupted")
    path = os.path.join(shared_dir, "part.h5")
    first = train(_quantized_config(comm, path, 2), comm)
    parallel_assert(comm, first.rounds == 2, f"first leg ended at round {first.rounds}")
    parallel_assert(comm, not torch.equal(first.model, uninterrupted.model),
                    "the first leg already equals the full run")
    resumed = train(_quantized_config(comm, path, ROUNDS), comm, resume=path)
    assert_same_bits_everywhere(comm, resumed.model, "resumed")
    same = torch.equal(resumed.model, uninterrupted.model)
    diff = float((resumed.model.double() - uninterrupted.model.double()).abs().max())
    parallel_assert(comm, same,
                    f"resumed model differs from the uninterrupted one (max diff {diff:.3g})")
    parallel_assert(comm, resumed.rounds == ROUNDS, f"resumed run ended at {resumed.rounds}")
    rounds = _rounds_in(comm, path)
    parallel_assert(comm, rounds == list(range(1, ROUNDS + 1)), f"metrics rounds {rounds}")
    parallel_assert(comm, math.isclose(resumed.test_accuracy, uninterrupted.test_accuracy),
                    f"accuracy {resumed.test_accuracy} != {uninterrupted.test_accuracy}")


@pytest.mark.mpi(min_size=1)
def test_corrupt_newest_checkpoint_falls_back(comm, shared_dir, uninterrupted, caplog):
    """Truncate ``<run>.ckpt.h5``: resume starts from ``.ckpt.prev.h5`` (one round earlier),
    drops the metrics row past it, and still finishes with the uninterrupted run's bits."""
    path = os.path.join(shared_dir, "crash.h5")
    train(_quantized_config(comm, path, 3), comm)
    parallel_assert(comm, _rounds_in(comm, path) == [1, 2, 3],
                    "first leg did not record rounds 1..3")
    newest = os.path.join(shared_dir, "crash.ckpt.h5")
    previous = os.path.join(shared_dir, "crash.ckpt.prev.h5")
    if comm.rank == 0:
        size = os.path.getsize(newest)
        with open(newest, "r+b") as handle:
            handle.truncate(size // 2)
    comm.Barrier()
    parallel_assert(comm, os.path.exists(previous), "no previous checkpoint generation kept")
    resumed = train(_quantized_config(comm, path, ROUNDS), comm, resume=path)
    assert_same_bits_everywhere(comm, resumed.model, "resumed after fallback")
    rounds = _rounds_in(comm, path)
    parallel_assert(comm, rounds == list(range(1, ROUNDS + 1)), f"metrics rounds {rounds}")
    log = comm.bcast(read_run_info(path)["resume_log"] if comm.rank == 0 else None)
    parallel_assert(comm, len(log) == 1 and log[0]["round"] == 2 and log[0]["dropped_rows"] == 1,
                    f"resume log {log}: expected a restart from round 2 dropping one row")
    parallel_assert(comm, torch.equal(resumed.model, uninterrupted.model),
                    "resuming from the previous checkpoint changed the final model")
    said = caplog.text  # the library's notices (the command line shows them on stderr)
    parallel_assert(comm, comm.rank != 0 or "previous checkpoint" in said,
                    f"rank 0 did not warn about the fallback; notices: {said!r}")


# ---------------------------------------------------------------------------------------------
# 4. quantized training still learns; 8 bits stay close to full precision


@pytest.mark.mpi(min_size=1)
def test_quantized_training_learns(comm, shared_dir):
    if comm.size % 2 == 0:
        topology, tau = {"fanouts": [2, comm.size // 2]}, [2, 2]
    else:
        topology, tau = {"fanouts": [comm.size]}, [4]
    depth = len(topology.get("fanouts"))

    def run(bits: int, name: str):
        config = make_config(os.path.join(shared_dir, name), topology, tau,
                             run={"rounds": 6, "eval_every": 0},
                             quantize={"bits": [bits] * depth, "bucket_size": 64},
                             data={"partition": "iid"}, optim={"lr": 0.2})
        result = train(config, comm)
        assert_same_bits_everywhere(comm, result.model, f"bits={bits}")
        return result

    exact, eight, four = run(0, "q0.h5"), run(8, "q8.h5"), run(4, "q4.h5")
    start = initial_model(make_config("x.h5", topology, tau))
    chance = 1.0 / CLASSES
    parallel_assert(comm, exact.test_accuracy > 0.8,
                    f"full precision accuracy {exact.test_accuracy}")
    parallel_assert(comm, four.test_accuracy > 0.7,
                    f"4-bit accuracy {four.test_accuracy} "
                    f"(chance {chance}, exact {exact.test_accuracy})")
    moved = float((exact.model - start).norm())
    gap8 = float((eight.model - exact.model).norm())
    gap4 = float((four.model - exact.model).norm())
    parallel_assert(comm, 0.0 < gap8 < 0.05 * moved,
                    f"8-bit model is {gap8:.3g} from full precision "
                    f"(training moved it {moved:.3g})")
    parallel_assert(comm, gap8 < gap4, f"8 bits ({gap8:.3g}) not closer than 4 bits ({gap4:.3g})")


@pytest.mark.mpi(min_size=2)
def test_resume_over_a_different_rank_count_fails_everywhere(comm, shared_dir):
    """A checkpoint written by one rank cannot continue over ``size`` ranks: the partition, the
    batch positions and the momentum are per rank. Every rank must raise (not hang, not go on)."""
    from hflmpi.mpi.guard import SetupError

    path = os.path.join(shared_dir, "solo.h5")
    config = make_config(path, {"fanouts": [1]}, [2], run={"rounds": 1})
    if comm.rank == 0:
        train(config, MPI.COMM_SELF)
    comm.Barrier()
    wider = make_config(path, {"fanouts": [comm.size]}, [2], run={"rounds": 2})
    try:
        train(wider, comm, resume=path)
        message = None
    except SetupError as exc:
        message = str(exc)
    parallel_assert(comm, message is not None and f"written by 1 ranks but this run has {comm.size}"
                    in message, f"resume over {comm.size} ranks gave {message!r}")
    rounds = _rounds_in(comm, path)
    parallel_assert(comm, rounds == [1], f"the refused resume touched the metrics: {rounds}")


@pytest.mark.mpi(min_size=1)
def test_resume_with_a_changed_config_raises_everywhere(comm, shared_dir):
    """train(resume=...) compares the config with the stored one on rank 0 and refuses on every
    rank (before loading data); with allow_config_change the change goes into the run file."""
    from hflmpi.config import ConfigError

    path = os.path.join(shared_dir, "changed.h5")
    topology = {"fanouts": [comm.size]}
    train(make_config(path, topology, [2], run={"rounds": 1}), comm)
    changed = make_config(path, topology, [3], run={"rounds": 2})
    try:
        train(changed, comm, resume=path)
        message = "no error"
    except ConfigError as exc:
        message = str(exc)
    parallel_assert(comm, "schedule.tau: stored [2], given [3]" in message, message)
    parallel_assert(comm, _rounds_in(comm, path) == [1], "the refused resume touched the metrics")
    result = train(changed, comm, resume=path, allow_config_change=True)
    parallel_assert(comm, result.rounds == 2, f"resumed run ended at {result.rounds}")
    history = comm.bcast(read_run_info(path)["config_history"] if comm.rank == 0 else None)
    parallel_assert(comm, len(history) == 1 and "schedule.tau" in history[0]["changes"],
                    f"config history {history}")
