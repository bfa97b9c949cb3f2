"""Provenance in the run record: every rank's host, the MPI library, one entry per leg.

The references are independent of hflmpi: ``MPI.Get_library_version()`` and
``MPI.Get_processor_name()`` asked directly on every rank (pickled by the test only), and the
installed packages' own version attributes.
"""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch
from conftest import parallel_assert

pytest.importorskip("mpi4py")
from mpi4py import MPI  # noqa: E402

from hflmpi.config import config_from_dict  # noqa: E402
from hflmpi.federation import train  # noqa: E402
from hflmpi.record.reading import read_provenance, read_run_info  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _config(out: str, rounds: int, size: int):
    return config_from_dict({
        "run": {"seed": 3, "rounds": rounds, "out": out, "progress": "off", "checkpoint_every": 1},
        "topology": {"fanouts": [size]},
        "schedule": {"tau": [2]},
        "data": {"name": "synthetic", "synthetic_samples": 64 * size, "synthetic_features": 8,
                 "synthetic_classes": 3},
        "model": {"name": "logreg"},
        "optim": {"lr": 0.1, "batch_size": 16},
    })


@pytest.mark.mpi
def test_run_record_holds_hosts_mpi_library_and_a_new_leg_per_resume(comm, shared_dir):
    size = comm.Get_size()
    path = f"{shared_dir}/run.h5"
    hosts = comm.allgather(MPI.Get_processor_name())
    library = MPI.Get_library_version().replace("\x00", "").strip().splitlines()[0].strip()
    train(_config(path, 2, size), comm)
    train(_config(path, 3, size), comm, resume=path)
    verdict, message = True, ""
    if comm.Get_rank() == 0:
        legs = read_provenance(path)
        first, second = legs if len(legs) == 2 else (legs + [{}, {}])[:2]
        checks = {
            "two legs (start, resume)": len(legs) == 2,
            "host names, one per rank": first.get("host_names") == hosts and len(hosts) == size,
            "MPI library string": first.get("mpi_library") == library,
            "MPI standard": first.get("mpi_standard") == "{}.{}".format(*MPI.Get_version()),
            "world size": first.get("world_size") == size,
            "torch": first.get("torch_version") == str(torch.__version__),
            "torch build": first.get("torch_build") == (f"CUDA {torch.version.cuda}"
                                                        if torch.version.cuda else "cpu"),
            "numpy": first.get("numpy_version") == np.__version__,
            "HDF5": first.get("hdf5_version") == h5py.version.hdf5_version,
            "command line": isinstance(first.get("argv"), list) and len(first["argv"]) >= 1,
            "first rounds": (first.get("first_round"), second.get("first_round")) == (1, 3),
            "resume kept leg 0": second.get("host_names") == hosts,
            "read_run_info has them": read_run_info(path)["provenance"] == legs,
        }
        failed = [name for name, ok in checks.items() if not ok]
        verdict, message = not failed, f"failed: {failed}; legs: {legs}"
    parallel_assert(comm, verdict, message)
