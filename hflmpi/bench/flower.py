"""FedAvg round time: hflmpi over MPI versus Flower's simulation (``hflmpi bench flower``).

The same job on both sides (McMahan et al., "Communication-efficient learning of deep networks
from decentralized data", AISTATS 2017): ``clients`` clients (8 by default), an MLP of about 1M
parameters (784-1024-256-10: 1,068,810) on hflmpi's synthetic data split IID, one local epoch of
SGD per round (``samples_per_client / batch`` steps), sample-weighted averaging. Both sides use
hflmpi's dataset, partition, initial model, batch sampler and :class:`hflmpi.learn.local.LocalSolver`,
so they run the same arithmetic and should end at (nearly) the same accuracy; only the
aggregation and the runtime differ:

* hflmpi: ``mpiexec -n 8 python -m mpi4py -m hflmpi bench flower``, one rank per client, tree
  ``[clients]`` (FedAvg) with ``tau = [steps per epoch]``, an ``Allreduce`` per round;
* Flower (``flwr``, https://flower.ai): ``flwr.simulation.run_simulation`` with the Message API
  (``ClientApp``/``ServerApp``, ``flwr.serverapp.strategy.FedAvg``) on the Ray backend, the
  clients as Ray actors sharing the machine's cores.

With ``population`` (``hflmpi bench flower --clients 256 --cohort 0.1``) the job is a population:
``clients`` clients, of which a uniformly drawn cohort trains ``local_steps`` steps per round
(FedAvg over the cohort). hflmpi runs them as ``[clients] count`` on however many ranks there are
(``clients.training`` as given); Flower simulates ``clients`` supernodes, samples the same number
per round (``fraction_train``, ``min_train_nodes``) and runs them on ``actors`` Ray actors (default:
as many as MPI ranks), so both sides train with the same parallelism. The cohorts differ (each
side draws its own), the data, partition, model and solver are the same; the bundled digits
(``data = "digits"``) suit a population (1,437 training images).

Per-round time is the median over rounds 2..R (round 1 holds start-up: MPI/Ray actor warm-up).
On hflmpi the last round (evaluation + checkpoint) is left out as well; on Flower each round is
the time between two calls of the strategy's ``evaluate_fn`` (called before round 1 and after
every round), measured before the evaluation runs. Under ``mpiexec`` rank 0 runs the Flower side
after the hflmpi side while the other ranks wait in a sleeping ``Ibarrier`` loop (a busy MPI wait
would steal the cores Flower needs). Without ``flwr`` the Flower side is skipped with a message.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import statistics
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from typing import Any, Sequence

__all__ = ["Job", "job_config", "flower_available", "run_hflmpi", "run_flower", "wait_sleeping"]


@dataclass(frozen=True)
class Job:
    """The FedAvg job both sides run."""

    clients: int = 8
    rounds: int = 6
    samples_per_client: int = 256
    batch: int = 32
    features: int = 784
    hidden: tuple[int, ...] = (1024, 256)
    lr: float = 0.05
    seed: int = 0
    population: bool = False
    cohort: float = 1.0
    data: str = "synthetic"
    local_steps: int = 0
    training: str = "sequential"

    @property
    def steps_per_epoch(self) -> int:
        """Local SGD steps per round: ``local_steps``, else one epoch over a client's samples."""
        return self.local_steps or -(-self.samples_per_client // self.batch)

    @property
    def cohort_size(self) -> int:
        """Clients trained per round: ``cohort`` is a fraction in (0, 1] or a count > 1."""
        if not self.population or self.cohort == 1.0:
            return self.clients
        from hflmpi.core.selection import SelectionOptions, cohort_size

        return int(cohort_size(SelectionOptions("uniform", self.cohort), self.clients))

    @property
    def numel(self) -> int:
        """Model parameters."""
        widths = [self.features, *self.hidden, 10]
        return sum(a * b + b for a, b in zip(widths, widths[1:]))


def job_config(job: Job, out: str) -> Any:
    """Return the hflmpi :class:`~hflmpi.config.RunConfig` of ``job`` (FedAvg, one layer)."""
    from hflmpi.config import config_from_dict

    test_fraction = 0.2
    data: dict[str, Any] = (
        {"name": "digits", "partition": "iid"} if job.data == "digits" else
        {"name": "synthetic", "partition": "iid", "test_fraction": test_fraction,
         "synthetic_samples": math.ceil(job.samples_per_client * job.clients / (1 - test_fraction)),
         "synthetic_features": job.features, "synthetic_classes": 10})
    sections: dict[str, Any] = {
        "run": {"seed": job.seed, "rounds": job.rounds, "out": out, "progress": "off",
                "eval_every": 0, "checkpoint_every": 0, "divergence": False},
        "topology": {"fanouts": [job.clients]},
        "schedule": {"tau": [job.steps_per_epoch]},
        "data": data,
        "model": {"name": "mlp", "hidden": list(job.hidden)},
        "optim": {"lr": job.lr, "batch_size": job.batch},
    }
    if job.population:
        every = job.cohort_size == job.clients
        sections["clients"] = {"count": job.clients, "training": job.training,
                               "selection": "all" if every else "uniform",
                               "cohort": float(job.cohort_size)}
    return config_from_dict(sections)


def flower_available() -> tuple[bool, str]:
    """Return whether ``flwr`` with its simulation engine imports, and why not."""
    try:
        import flwr  # noqa: F401
        import ray  # noqa: F401
        from flwr.simulation import run_simulation  # noqa: F401
    except ImportError as exc:
        return False, f"{exc}; install it with pip install 'hflmpi[flower]' (flwr[simulation])"
    return True, ""


def _inner(values: Sequence[float], drop_last: bool) -> list[float]:
    values = list(values)
    end = len(values) - 1 if drop_last and len(values) >= 3 else len(values)
    return values[1:end] if end > 1 else values


# ---------------------------------------------------------------------------------------------
# hflmpi side


def run_hflmpi(comm: Any, job: Job) -> dict[str, Any]:
    """Train ``job`` with :func:`hflmpi.federation.train` over ``comm`` (one rank per client).

    Collective. Returns (on every rank) the per-round seconds from the run record, their median
    over the timed rounds, and the final test accuracy.
    """
    import numpy as np

    from hflmpi.federation import train
    from hflmpi.mpi.messages import bcast_array, bcast_text
    from hflmpi.record.reading import read_metrics

    if not job.population and comm.Get_size() != job.clients:
        raise ValueError(f"the hflmpi side needs one rank per client: run under mpiexec -n "
                         f"{job.clients} (got {comm.Get_size()} ranks), or pass --clients "
                         f"{comm.Get_size()}")
    workdir = bcast_text(comm, tempfile.mkdtemp(prefix="hflmpi-flower-") if comm.Get_rank() == 0
                         else None, max_bytes=4096, what="sharing rank 0's work directory")
    assert workdir is not None
    try:
        path = os.path.join(workdir, "fedavg.h5")
        with open(os.devnull, "w") as quiet:
            result = train(job_config(job, path), comm, stream=quiet)  # all ranks
        wall = None
        if comm.Get_rank() == 0:
            wall = np.asarray(read_metrics(path)["wall_time"], dtype=np.float64)
        wall = bcast_array(comm, wall, root=0, max_elements=job.rounds, dtypes=(np.float64,),
                           shape=(None,), what="sharing rank 0's round times")  # all ranks
        rounds = np.diff(np.concatenate([[0.0], wall])).tolist()
        timed = _inner(rounds, drop_last=True)
        name = (f"hflmpi (MPI, {comm.Get_size()} ranks, {job.training})" if job.population
                else "hflmpi (MPI)")
        return {"framework": name, "round_seconds": rounds,
                "median_round_seconds": statistics.median(timed), "rounds_timed": len(timed),
                "test_accuracy": result.test_accuracy}  # identical on every rank
    finally:
        comm.Barrier()
        if comm.Get_rank() == 0:
            shutil.rmtree(workdir, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# Flower side (imports flwr only when called)

_CLIENT_CACHE: dict[str, Any] = {}
_SERVER_LOG: dict[str, Any] = {}
_SERVER_LOCK = threading.Lock()


def _job_from(config: Any) -> Job:
    fields = json.loads(str(config["job"]))
    return Job(**{**fields, "hidden": tuple(fields["hidden"])})


def _job_record(job: Job) -> dict[str, Any]:
    return {"job": json.dumps(asdict(job))}


def _client_state(job: Job) -> dict[str, Any]:
    """Load (once per Ray actor) the dataset, partition and a model + solver for ``job``."""
    import torch

    from hflmpi.learn.data import load_dataset
    from hflmpi.learn.local import LocalSolver
    from hflmpi.learn.models import build_model
    from hflmpi.learn.partition import make_partition

    key = json.dumps(asdict(job), sort_keys=True)
    if key not in _CLIENT_CACHE:
        torch.set_num_threads(1)
        config = job_config(job, "unused.h5")
        train_set, _ = load_dataset(config.data, job.seed)
        parts = make_partition(train_set.labels.numpy(), job.clients, config.data, job.seed)
        model = build_model(config.model, train_set.input_shape, train_set.num_classes, seed=job.seed)
        _CLIENT_CACHE[key] = {"train": train_set, "parts": parts, "model": model,
                              "solver": LocalSolver(model, config.optim)}
    return _CLIENT_CACHE[key]


def _flower_train(msg: Any, context: Any) -> Any:
    """Flower ``ClientApp`` train handler: one local epoch with hflmpi's sampler and solver."""
    from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict

    from hflmpi.learn.local import BatchSampler

    config = msg.content["config"]
    job = _job_from(config)
    state = _client_state(job)
    client = int(context.node_config["partition-id"])
    model, solver, train_set = state["model"], state["solver"], state["train"]
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    solver.on_aggregation()
    sampler = BatchSampler(state["parts"][client], job.batch, seed=job.seed, client=client)
    sampler.load_state_dict({"epoch": int(config["server-round"]) - 1, "offset": 0})
    loss = 0.0
    for _ in range(job.steps_per_epoch):
        batch = next(sampler)
        loss += float(solver.step(train_set.features[batch], train_set.labels[batch]))
    content = RecordDict({
        "arrays": ArrayRecord(model.state_dict()),
        "metrics": MetricRecord({"train_loss": loss / max(job.steps_per_epoch, 1),
                                 "num-examples": len(state["parts"][client])}),
    })
    return Message(content=content, reply_to=msg)


def _flower_server(grid: Any, context: Any) -> None:
    """Flower ``ServerApp`` main: FedAvg over every client, timing each round."""
    from flwr.app import ArrayRecord, ConfigRecord, MetricRecord
    from flwr.serverapp.strategy import FedAvg

    from hflmpi.learn.data import load_dataset
    from hflmpi.learn.local import evaluate
    from hflmpi.learn.models import build_model

    job: Job = _SERVER_LOG["job"]
    config = job_config(job, "unused.h5")
    _, test_set = load_dataset(config.data, job.seed)
    model = build_model(config.model, test_set.input_shape, test_set.num_classes, seed=job.seed)
    stamps: list[float] = []

    def timer(server_round: int, arrays: Any) -> Any:
        stamps.append(time.perf_counter())  # before any evaluation work
        if server_round == job.rounds:
            model.load_state_dict(arrays.to_torch_state_dict())
            _SERVER_LOG["test_accuracy"] = evaluate(model, test_set)[1]
        return MetricRecord({"round": server_round})

    strategy = FedAvg(fraction_train=job.cohort_size / job.clients, fraction_evaluate=0.0,
                      min_train_nodes=job.cohort_size, min_available_nodes=job.clients)
    strategy.start(grid=grid, initial_arrays=ArrayRecord(model.state_dict()), num_rounds=job.rounds,
                   train_config=ConfigRecord(_job_record(job)), evaluate_fn=timer)
    _SERVER_LOG["stamps"] = stamps


def run_flower(job: Job, cpus: float | None = None, actors: int | None = None) -> dict[str, Any]:
    """Run ``job`` in Flower's simulation (Ray backend) in this process and time its rounds.

    Parameters
    ----------
    job : Job
    cpus : float, optional
        CPUs given to Ray (default: all cores); each client actor gets ``cpus / actors``.
    actors : int, optional
        Client actors running at once (default ``clients``: all clients of a round at once, like
        one MPI rank per client).
    """
    from flwr.clientapp import ClientApp
    from flwr.serverapp import ServerApp
    from flwr.simulation import run_simulation

    cpus = float(cpus or os.cpu_count() or 1)
    client_app = ClientApp()
    client_app.train()(_flower_train)
    server_app = ServerApp()
    server_app.main()(_flower_server)
    with _SERVER_LOCK:
        _SERVER_LOG.clear()
        _SERVER_LOG["job"] = job
        started = time.perf_counter()
        run_simulation(
            server_app=server_app, client_app=client_app, num_supernodes=job.clients,
            backend_config={"client_resources": {"num_cpus": cpus / (actors or job.clients),
                                                 "num_gpus": 0.0},
                            "init_args": {"num_cpus": cpus, "include_dashboard": False}},
        )
        total = time.perf_counter() - started
        stamps = list(_SERVER_LOG.get("stamps", []))
        accuracy = _SERVER_LOG.get("test_accuracy", math.nan)
    if len(stamps) != job.rounds + 1:
        raise RuntimeError(f"Flower's simulation finished {len(stamps) - 1} of {job.rounds} rounds; "
                           "see its log above")
    rounds = [b - a for a, b in zip(stamps, stamps[1:])]
    timed = _inner(rounds, drop_last=False)
    return {"framework": f"Flower {_flower_version()} simulation (Ray)", "round_seconds": rounds,
            "median_round_seconds": statistics.median(timed), "rounds_timed": len(timed),
            "test_accuracy": accuracy, "total_seconds": total}


def _flower_version() -> str:
    try:
        import flwr

        return str(flwr.__version__)
    except (ImportError, AttributeError):
        return "?"


# ---------------------------------------------------------------------------------------------
# CLI


def wait_sleeping(comm: Any, poll: float = 0.05) -> None:
    """Wait for rank 0 in an ``Ibarrier`` without spinning (all ranks)."""
    request = comm.Ibarrier()
    while not request.Test():
        time.sleep(poll)
