"""MPI test: the bytes a real run records equal the byte model (:func:`hflmpi.core.costmodel.bytes_per_layer`).

Short real runs (:func:`hflmpi.federation.train`, 2 rounds) over trees that fit the world size,
with every quantizer width 1..16 across the runs, forced integer sums, exact tree layers next to
quantized ones and the exact subtree allreduce; every round's ``/metrics/bytes_sent`` row must
equal the cost model's prediction exactly. Run with
``mpiexec -n N python tests/mpi_pytest.py LOGDIR tests/test_wire_mpi.py`` (N >= 2).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import parallel_assert

pytest.importorskip("mpi4py")
from mpi4py import MPI  # noqa: E402

from hflmpi.config import config_from_dict  # noqa: E402
from hflmpi.core.costmodel import bytes_per_layer  # noqa: E402
from hflmpi.federation import train  # noqa: E402
from hflmpi.record.reading import read_metrics  # noqa: E402

FEATURES, HIDDEN, CLASSES = 12, 9, 3
NUMEL = FEATURES * HIDDEN + HIDDEN + HIDDEN * CLASSES + CLASSES  # the MLP's parameters: 147

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def shared_dir():
    comm = MPI.COMM_WORLD
    path = comm.bcast(tempfile.mkdtemp(prefix="hflmpi-test-wire-") if comm.Get_rank() == 0 else None)
    yield Path(path)
    comm.Barrier()
    if comm.Get_rank() == 0:
        shutil.rmtree(path, ignore_errors=True)


def _cases(size: int) -> list[dict[str, Any]]:
    """Return (fanouts, bits, method, algorithm, bucket) cases covering widths 1..16."""
    fanouts = [2, size // 2] if size % 2 == 0 and size > 2 else [1, size]
    depth = len(fanouts)
    widths = list(range(1, 17))
    cases = [dict(fanouts=fanouts, bits=widths[i:i + depth], method="auto", algorithm="subtree",
                  bucket=16 if i % 4 else 0) for i in range(0, 16, depth)]
    cases += [
        dict(fanouts=fanouts, bits=[8, 16], method="sum", algorithm="subtree", bucket=0),
        dict(fanouts=fanouts, bits=[3, 1], method="gather", algorithm="subtree", bucket=7),
        dict(fanouts=fanouts, bits=[0, 8], method="auto", algorithm="tree", bucket=0),
        dict(fanouts=fanouts, bits=[0, 0], method="auto", algorithm="subtree", bucket=0),
        dict(fanouts=fanouts, bits=[0, 0], method="auto", algorithm="tree", bucket=0),
        dict(fanouts=[size], bits=[5], method="auto", algorithm="subtree", bucket=0),
    ]
    return cases


def _config(case: dict[str, Any], out: Path, size: int) -> Any:
    depth = len(case["fanouts"])
    return config_from_dict({
        "run": {"seed": 3, "rounds": 2, "out": str(out), "progress": "off", "eval_every": 0,
                "checkpoint_every": 0, "divergence": False},
        "topology": {"fanouts": case["fanouts"]},
        "schedule": {"tau": [2] + [2] * (depth - 1)},
        "aggregation": {"algorithm": case["algorithm"]},
        "quantize": {"bits": case["bits"], "bucket_size": case["bucket"], "method": case["method"]},
        "data": {"name": "synthetic", "partition": "iid", "synthetic_samples": 40 * size,
                 "synthetic_features": FEATURES, "synthetic_classes": CLASSES},
        "model": {"name": "mlp", "hidden": [HIDDEN]},
        "optim": {"lr": 0.05, "batch_size": 4},
    })


@pytest.mark.mpi(min_size=2)
def test_recorded_bytes_equal_the_byte_model(shared_dir):
    comm = MPI.COMM_WORLD
    size = comm.Get_size()
    for i, case in enumerate(_cases(size)):
        out = shared_dir / f"run{i}.h5"
        config = _config(case, out, size)
        with open(os.devnull, "w") as quiet:
            train(config, comm, stream=quiet)  # all ranks
        verdict, message = True, ""
        if comm.Get_rank() == 0:
            recorded = np.atleast_2d(read_metrics(out)["bytes_sent"])
            predicted = bytes_per_layer(case["fanouts"], list(config.schedule.tau), NUMEL,
                                        case["bits"], case["bucket"], case["algorithm"],
                                        case["method"])
            verdict = recorded.shape[0] == 2 and all(list(row) == predicted for row in recorded)
            message = f"{case}: recorded {recorded.tolist()} != model {predicted}"
        parallel_assert(comm, verdict, message)

