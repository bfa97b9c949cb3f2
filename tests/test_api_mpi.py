"""``hflmpi.train`` under mpiexec: one model on every rank, the same bits as ``hflmpi run``.

Run with ``mpiexec -n N python tests/mpi_pytest.py LOGDIR tests/test_api_mpi.py`` (N = 1, 2, 4, 8).
The reference for the model is the run file's own checkpoint and an ``hflmpi run`` of the same
config; for the callbacks, the schedule written out from the definition of tau.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import parallel_assert

pytest.importorskip("mpi4py")

import hflmpi  # noqa: E402
from hflmpi.cli.run import main as cli_main  # noqa: E402
from hflmpi.errors import HflmpiError  # noqa: E402
from hflmpi.record.checkpoint import load_latest_valid  # noqa: E402

pytestmark = [pytest.mark.mpi, pytest.mark.usefixtures("one_torch_thread")]

CONFIG = """
[run]
seed = 5
rounds = 3
progress = "off"
[schedule]
tau = [3]
[data]
name = "synthetic"
synthetic_samples = 400
synthetic_features = 8
synthetic_classes = 3
partition = "dirichlet"
[model]
name = "mlp"
hidden = [8]
[optim]
lr = 0.1
batch_size = 8
"""


def digest(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.detach().contiguous().numpy().tobytes()).hexdigest()


def test_train_gives_every_rank_the_model_hflmpi_run_gives(comm, shared_dir):
    path = Path(shared_dir) / "c.toml"
    if comm.rank == 0:
        path.write_text(CONFIG)
    comm.Barrier()
    api = hflmpi.train(path, comm, run={"out": f"{shared_dir}/api.h5"})
    flat = torch.cat([p.detach().reshape(-1) for p in api.model.parameters()])
    digests = comm.allgather(digest(api.parameters))
    parallel_assert(comm, len(set(digests)) == 1, f"ranks differ: {digests}")
    parallel_assert(comm, torch.equal(flat, api.parameters), "module and flat parameters differ")
    code = cli_main([str(path), "--set", f'run.out="{shared_dir}/cli.h5"'], comm)
    parallel_assert(comm, code == 0, f"hflmpi run exited {code}")
    cli = load_latest_valid(f"{shared_dir}/cli.h5")
    ours = load_latest_valid(f"{shared_dir}/api.h5")
    parallel_assert(comm, cli.round == ours.round == 3, f"rounds {cli.round}, {ours.round}")
    parallel_assert(comm, np.array_equal(ours.model, api.parameters.numpy()), "checkpoint != result")
    parallel_assert(comm, np.array_equal(cli.model, ours.model), "hflmpi run != hflmpi.train")
    metrics = api.metrics
    parallel_assert(comm, metrics["test_accuracy"][-1] == pytest.approx(api.test_accuracy),
                    "metrics and result disagree")


class Counter:
    def __init__(self):
        self.aggregations, self.rounds, self.metrics = 0, 0, []

    def on_aggregation(self, info):
        self.aggregations += 1

    def on_round_end(self, info):
        self.rounds += 1
        self.metrics.append(info.metrics)


def test_callbacks_on_some_ranks_only_and_a_failure_on_the_last_rank(comm, shared_dir):
    counter = Counter()
    # only rank 0 holds a callback; the others must still meet it at every hook point
    hflmpi.train(config_dict(shared_dir, "a.h5"), comm, callbacks=[counter] if comm.rank == 0 else [])
    if comm.rank == 0:
        parallel_assert(comm, (counter.aggregations, counter.rounds) == (3, 3),
                        f"{counter.aggregations} aggregations, {counter.rounds} rounds")
        parallel_assert(comm, [m["round"] for m in counter.metrics] == [1, 2, 3], str(counter.metrics))
    else:
        parallel_assert(comm, True)
        parallel_assert(comm, True)

    class FailLast:
        def on_round_end(self, info):
            if info.rank == info.size - 1 and info.round == 2:
                raise RuntimeError("disk quota")

    caught = ""
    try:
        hflmpi.train(config_dict(shared_dir, "b.h5"), comm, callbacks=[FailLast()])
    except HflmpiError as exc:
        caught = str(exc)
    want = ("CallbackError: callback test_callbacks_on_some_ranks_only_and_a_failure_on_the_last_"
            "rank.<locals>.FailLast.on_round_end raised RuntimeError: disk quota")
    where = f"the callbacks after round 2 failed on rank {comm.size - 1}: " if comm.size > 1 else ""
    parallel_assert(comm, where + want in caught, f"got {caught!r}")


def config_dict(shared_dir: str, name: str) -> dict:
    import tomllib

    data = tomllib.loads(CONFIG)
    data["run"]["out"] = f"{shared_dir}/{name}"
    return data
