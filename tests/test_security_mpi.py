"""End-to-end MPI checks of the security settings of :func:`hflmpi.federation.train` (issue 11).

* DP noise comes from the OS CSPRNG: two runs with the same seed release different models, and
  only the loudly-warned test override (``privacy.insecure_reproducible_noise``) makes them equal.
* Layer options that would silently protect nothing are refused on every rank once the tree is
  known: a secure group of 2, a trimmed mean that trims nobody.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

import pytest
from conftest import parallel_assert

pytest.importorskip("mpi4py")

from hflmpi.config import ConfigError, RunConfig, config_from_dict  # noqa: E402
from hflmpi.federation import train  # noqa: E402
from hflmpi.record.reading import read_run_info  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _config(out: str, topology: dict[str, Any], tau: list[int], **sections: Any) -> RunConfig:
    data: dict[str, dict[str, Any]] = {
        "run": {"seed": 5, "rounds": 2, "out": out, "progress": "off", "divergence": False,
                "checkpoint_every": 0},
        "topology": topology,
        "schedule": {"tau": tau},
        "data": {"name": "synthetic", "synthetic_samples": 256, "synthetic_features": 8,
                 "synthetic_classes": 3},
        "model": {"name": "logreg"},
        "optim": {"lr": 0.1, "batch_size": 8},
    }
    for name, table in sections.items():
        data[name] = {**data.get(name, {}), **table}
    return config_from_dict(data)


def _digest(result) -> str:
    return hashlib.sha256(result.model.numpy().tobytes()).hexdigest()


@pytest.mark.mpi(min_size=1)
def test_dp_runs_draw_fresh_noise_unless_the_test_override_is_set(comm, shared_dir, caplog):
    size = comm.Get_size()

    def run(name: str, insecure: bool):
        privacy = {"layer": 1, "clip": 1.0, "noise_multiplier": 5.0,
                   "insecure_reproducible_noise": insecure}
        path = os.path.join(shared_dir, name)
        result = train(_config(path, {"fanouts": [size]}, [2], privacy=privacy), comm)
        return _digest(result), path, result.privacy or ""

    fresh = [run(f"fresh{i}.h5", False) for i in range(2)]
    fresh_said = caplog.text  # the library's notices (the command line shows them on stderr)
    caplog.clear()
    seeded = [run(f"seeded{i}.h5", True) for i in range(2)]
    seeded_said = caplog.text
    parallel_assert(comm, fresh[0][0] != fresh[1][0],
                    "two DP runs with the same seed released the same model: the noise is a "
                    "function of the seed")
    parallel_assert(comm, seeded[0][0] == seeded[1][0],
                    "the insecure test override did not make DP runs reproducible")
    if comm.rank == 0:
        warned = seeded_said.count("has NO differential") == 2 and "WARNING" not in fresh_said
        stated = ("-DP per client at layer 1" in fresh[0][2]
                  and "NO differential privacy" in seeded[0][2]
                  and "-DP per client" not in seeded[0][2])
        recorded = (read_run_info(fresh[0][1])["dp_noise"].startswith("os.urandom")
                    and read_run_info(seeded[0][1])["dp_noise"].startswith("INSECURE"))
    else:
        warned = stated = recorded = True
    parallel_assert(comm, warned, f"override warning: {seeded_said!r}")
    parallel_assert(comm, stated, f"privacy summary: {fresh[0][2]!r} / {seeded[0][2]!r}")
    parallel_assert(comm, recorded, "the run file does not say where the DP noise came from")


@pytest.mark.mpi(min_size=3)
@pytest.mark.parametrize("case", ["secure-pair", "trim-nobody"])
def test_unprotective_layer_options_are_refused_on_every_rank(comm, shared_dir, case):
    size = comm.Get_size()
    path = os.path.join(shared_dir, f"{case}.h5")
    if case == "secure-pair":  # layer-1 group [0, 1]: its leader would learn rank 1's update
        groups = [[0, 1]] + [[r] for r in range(2, size)]
        sections = {"quantize": {"bits": [8, 0]}, "aggregation": {"secure": [True, False]}}
        expected = "aggregation.secure[0]=true with a layer-1 group of 2 participants"
    else:  # floor(0.2 * 3) = 0: the default trim would trim nobody in group [0, 1, 2]
        groups = [[0, 1, 2]] + [[r] for r in range(3, size)]
        sections = {"aggregation": {"robust": ["trimmed_mean", "mean"]}}
        expected = "aggregation.trim=0.2 trims floor(0.2 * 3) = 0 of the 3 children"
    config = _config(path, {"groups": groups}, [2, 1], **sections)
    try:
        train(config, comm)
        message = ""
    except ConfigError as exc:
        message = str(exc)
    parallel_assert(comm, expected in message, f"{case}: got {message!r}")
