"""The Python front door :func:`hflmpi.train`, callbacks, custom datasets and model factories.

Serial: ``hflmpi.train`` runs here on ``MPI.COMM_WORLD`` of this one process (a world of size 1,
as in a notebook). References are independent of the code under test: accuracy recomputed with
plain torch on the test arrays this file made, the aggregation schedule written out from the
definition of tau, TensorBoard's own event reader.
"""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import MPIEXEC
from torch import nn

import hflmpi
from hflmpi.api import resolve_config
from hflmpi.callbacks import Callback, CallbackList
from hflmpi.config import ConfigError, ModelConfig, load_config
from hflmpi.errors import HflmpiError
from hflmpi.learn.custom_data import check_arrays
from hflmpi.learn.data import DatasetError, load_dataset
from hflmpi.learn.models import build_model
from hflmpi.learn.partition import make_partition
from hflmpi.record.resume import check_untrusted_imports

pytest.importorskip("mpi4py")
pytestmark = pytest.mark.usefixtures("one_torch_thread")

FEATURES, CLASSES = 6, 3


def blobs(seed: int) -> tuple[np.ndarray, ...]:
    """A dataset function: three separable-ish Gaussian blobs, 240 train and 60 test samples."""
    rng = np.random.default_rng(1000 + seed)
    centres = rng.normal(0.0, 3.0, size=(CLASSES, FEATURES))

    def draw(n: int) -> tuple[np.ndarray, np.ndarray]:
        y = rng.integers(0, CLASSES, size=n)
        return (centres[y] + rng.normal(size=(n, FEATURES))).astype(np.float32), y

    x_train, y_train = draw(240)
    x_test, y_test = draw(60)
    return x_train, y_train, x_test, y_test


def base_config(out: Path, **run: Any) -> dict[str, Any]:
    return {
        "run": {"seed": 3, "rounds": 3, "out": str(out), "progress": "off", **run},
        "schedule": {"tau": [4]},
        "data": {"name": "test_api:blobs", "normalize": False},
        "model": {"name": "logreg"},
        "optim": {"lr": 0.1, "batch_size": 16},
    }


# ---------------------------------------------------------------------------------------------
# hflmpi.train


def test_train_returns_a_module_whose_accuracy_plain_torch_confirms(tmp_path):
    result = hflmpi.train(base_config(tmp_path / "r.h5"))
    assert isinstance(result.model, nn.Module) and not result.model.training
    x_train, y_train, x_test, y_test = blobs(3)
    with torch.no_grad():
        predicted = result.model(torch.from_numpy(x_test)).argmax(1).numpy()
    correct = int((predicted == y_test).sum())
    assert math.isclose(result.test_accuracy, correct / len(y_test), rel_tol=0, abs_tol=1e-12)
    assert result.test_accuracy > 0.5  # it learned something (3 classes: chance is 1/3)
    flat = torch.cat([p.detach().reshape(-1) for p in result.model.parameters()])
    assert torch.equal(flat, result.parameters)
    assert result.rounds == 3 and not result.preempted
    assert list(result.metrics["round"]) == [1, 2, 3]
    assert result.metrics["test_accuracy"][-1] == pytest.approx(result.test_accuracy)
    assert result.config.data.name == "test_api:blobs"
    # the model is the caller's own copy: changing it leaves the result's parameters alone
    with torch.no_grad():
        next(result.model.parameters()).add_(1.0)
    assert torch.equal(flat, result.parameters)


def test_a_dataset_function_passed_directly_is_recorded_by_its_import_path(tmp_path):
    data = base_config(tmp_path / "r.h5")
    data["data"] = {"name": "digits", "normalize": False}
    by_name = hflmpi.train(base_config(tmp_path / "a.h5"))
    passed = hflmpi.train(data, dataset=blobs, run={"out": str(tmp_path / "b.h5")})
    assert passed.config.data.name == "test_api:blobs"
    assert torch.equal(passed.parameters, by_name.parameters)
    with pytest.raises(ConfigError, match="has no import path .* define it as a function at module"):
        hflmpi.train(data, dataset=lambda: blobs(0))


def test_overrides_mirror_set_in_every_form(tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_text('[run]\nrounds = 9\n[schedule]\ntau = [5]\n')
    want = load_config(toml, ["run.rounds=3", "schedule.tau=[4]", "run.out=2024", "optim.lr=0.05"])
    forms = [
        resolve_config(toml, ["run.rounds=3", "schedule.tau=[4]", "run.out=2024", "optim.lr=0.05"]),
        resolve_config(toml, {"run.rounds": 3, "schedule.tau": [4], "run.out": "2024",
                              "optim.lr": np.float64(0.05)}),
        resolve_config(toml, {"optim.lr": 0.05}, {"run": {"rounds": 3, "out": "2024"},
                                                  "schedule": {"tau": (4,)}}),
        resolve_config(load_config(toml), ["run.rounds=3", "schedule.tau=[4]", "run.out=2024",
                                           "optim.lr=0.05"]),
    ]
    assert all(form == want for form in forms)
    assert resolve_config(toml, {"run.rounds": None}).run.rounds == 20  # back to the default
    with pytest.raises(ConfigError) as from_cli:
        load_config(toml, ["optim.lrr=0.1"])
    with pytest.raises(ConfigError) as from_api:
        resolve_config(toml, {"optim.lrr": 0.1})
    assert str(from_api.value) == str(from_cli.value) and "did you mean optim.lr" in str(from_api.value)
    with pytest.raises(ConfigError, match="keyword arguments are whole config sections"):
        hflmpi.train(toml, rounds=3)
    with pytest.raises(ConfigError, match=r"unknown section \[optimizer\]"):
        hflmpi.train(toml, optimizer={"lr": 0.1})
    with pytest.raises(ConfigError, match="is one string"):
        resolve_config(toml, "run.rounds=3")


# ---------------------------------------------------------------------------------------------
# callbacks


class Recorder(Callback):
    """Keep what every hook saw."""

    def __init__(self) -> None:
        self.aggregations: list[tuple[int, int, int, int]] = []
        self.rounds: list[Any] = []
        self.closed = 0

    def on_aggregation(self, info):
        self.aggregations.append((info.round, info.step, info.global_step, info.layer))

    def on_round_end(self, info):
        self.rounds.append((info.round, info.metrics, info.parameters(), info.test_accuracy))

    def close(self):
        self.closed += 1


def expected_aggregations(tau: list[int], rounds: int) -> list[tuple[int, int, int, int]]:
    """(round, step, global step, highest layer) of every aggregation, from the definition of tau."""
    periods = list(np.cumprod(tau))
    out = []
    for rnd in range(1, rounds + 1):
        for step in range(1, periods[-1] + 1):
            layers = [n + 1 for n, period in enumerate(periods) if step % period == 0]
            if layers:
                out.append((rnd, step, (rnd - 1) * periods[-1] + step, max(layers)))
    return out


def test_callbacks_see_every_aggregation_and_round_of_the_schedule(tmp_path):
    recorder = Recorder()
    config = base_config(tmp_path / "r.h5", eval_every=2)
    result = hflmpi.train(config, callbacks=[recorder], topology={"fanouts": [1, 1]},
                          schedule={"tau": [2, 3]}, run={"rounds": 2})
    assert recorder.aggregations == expected_aggregations([2, 3], 2)
    assert [r[0] for r in recorder.rounds] == [1, 2] and recorder.closed == 1
    metrics = result.metrics
    for i, (rnd, row, params, accuracy) in enumerate(recorder.rounds):
        assert row["round"] == rnd and row["train_loss"] == pytest.approx(metrics["train_loss"][i])
        assert len(row["bytes_sent"]) == 2  # one column per layer
        assert math.isnan(accuracy) == (rnd % 2 == 1)  # evaluated every 2nd round and the last
    assert torch.equal(recorder.rounds[-1][2], result.parameters)


class Boom(Callback):
    def on_round_end(self, info):
        if info.round == 2:
            raise ZeroDivisionError("user code divided by zero")


def test_a_raising_callback_stops_the_run_with_its_name(tmp_path):
    recorder = Recorder()
    with pytest.raises(HflmpiError, match=r"callback Boom\.on_round_end raised ZeroDivisionError: "
                                          "user code divided by zero"):
        hflmpi.train(base_config(tmp_path / "r.h5"), callbacks=[recorder, Boom()])
    assert recorder.closed == 1  # closed on the way out
    assert list(hflmpi.read_metrics(tmp_path / "r.h5")["round"]) == [1, 2]  # the file is intact


BUILT: list[Any] = []


def make_recorder() -> Recorder:
    """What ``run.callbacks = ["test_api:make_recorder"]`` names."""
    BUILT.append(Recorder())
    return BUILT[-1]


def test_run_callbacks_names_callbacks_in_the_config(tmp_path):
    BUILT.clear()
    hflmpi.train(base_config(tmp_path / "r.h5", callbacks=["test_api:make_recorder"]))
    assert len(BUILT) == 1 and len(BUILT[0].aggregations) == 3 and BUILT[0].closed == 1
    with pytest.raises(HflmpiError, match="run.callbacks='test_api:nothing_here'.*no attribute"):
        hflmpi.train(base_config(tmp_path / "s.h5", callbacks=["test_api:nothing_here"]))
    with pytest.raises(ConfigError, match=r"run.callbacks=\[\"x y\"\] has entry \[0\]"):
        resolve_config(base_config(tmp_path / "t.h5", callbacks=["x y"]))
    with pytest.raises(TypeError, match="has none of the methods"):
        CallbackList([object()])


def test_tensorboard_writes_the_recorded_metrics(tmp_path):
    pytest.importorskip("tensorboard", reason="tensorboard is not installed (hflmpi[tensorboard])")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from hflmpi.callbacks import TensorBoard

    result = hflmpi.train(base_config(tmp_path / "r.h5"), callbacks=[TensorBoard()])
    events = EventAccumulator(str(tmp_path / "r.tb"))
    events.Reload()
    accuracy = [(e.step, e.value) for e in events.Scalars("test_accuracy")]
    assert [s for s, _ in accuracy] == [1, 2, 3]
    np.testing.assert_allclose([v for _, v in accuracy], result.metrics["test_accuracy"], rtol=1e-6)
    assert "bytes_sent/layer1" in events.Tags()["scalars"]


# ---------------------------------------------------------------------------------------------
# custom datasets


def good() -> list[Any]:
    x = np.arange(24, dtype=np.float64).reshape(6, 2, 2)
    return [x, np.array([0, 1, 2, 0, 1, 2]), x[:2], torch.tensor([1, 0])]


@pytest.mark.parametrize("change, message", [
    (lambda p: p[:3], "returned a list of 3 items; the function must return a tuple"),
    (lambda p: [p[0][:, :1], *p[1:]], r"x_train samples have shape \(1, 2\) but x_test samples \(2, 2\)"),
    (lambda p: [p[0], p[1][:5], *p[2:]], "x_train has 6 samples but y_train has 5 labels"),
    (lambda p: [np.where(p[0] == 5, np.nan, p[0]), *p[1:]], "holds NaN or Inf in 1 sample.*row 1"),
    (lambda p: [p[0], p[1].astype(float), *p[2:]], "has dtype float64; labels must be integers"),
    (lambda p: [p[0], np.eye(3, dtype=int)[p[1]], *p[2:]], r"has shape \(6, 3\); labels must be"),
    (lambda p: [p[0], p[1] - 1, *p[2:]], "holds the label -1"),
    (lambda p: [*p, 2], "holds the label 2 but num_classes is 2"),
    (lambda p: [*p, 2.5], "num_classes .* is 2.5"),
    (lambda p: [p[0], p[1] * 0, p[2], p[3] * 0], "every label is 0"),
    (lambda p: [p[0], p[1], p[2][:0], p[3][:0]], "the test part is empty"),
    (lambda p: [p[0].astype(str), *p[1:]], "features must be real numbers"),
    (lambda p: [p[0][:, 0, 0], *p[1:]], "features must be real numbers"),
])
def test_bad_custom_data_is_refused_with_what_to_fix(change, message):
    with pytest.raises(DatasetError, match=message):
        check_arrays(change(good()), "mine")


def test_custom_data_loads_partitions_and_counts_classes():
    train, test = check_arrays(good(), "mine")
    assert train.input_shape == (2, 2) and train.num_classes == 3 and len(test) == 2
    assert train.features.dtype == torch.float32 and train.labels.dtype == torch.int64
    assert check_arrays([*good(), 7], "mine")[0].num_classes == 7
    config = load_config(None, ['data.name="test_api:blobs"', 'data.partition="dirichlet"'])
    train, test = load_dataset(config.data, seed=3)
    assert torch.allclose(train.features.mean(0), torch.zeros(FEATURES), atol=1e-5)  # normalized
    parts = make_partition(train.labels.numpy(), 4, config.data, 3)
    assert sorted(np.concatenate(parts).tolist()) == list(range(240))
    with pytest.raises(DatasetError, match="cannot import module 'no_such_pkg'"):
        load_dataset(load_config(None, ['data.name="no_such_pkg:f"']).data, seed=0)
    with pytest.raises(ConfigError, match='data.name="mnst" must be one of .*did you mean "mnist"'):
        load_config(None, ['data.name="mnst"'])


# ---------------------------------------------------------------------------------------------
# import-path models receive the data's shapes


class ShapeNet(nn.Module):
    def __init__(self, input_shape: tuple[int, ...], num_classes: int, width: int = 4) -> None:
        super().__init__()
        self.input_shape = input_shape
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), width),
                                 nn.Linear(width, num_classes))

    def forward(self, x):
        return self.net(x)


class Forwarding(nn.Linear):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)


def shape_net_factory(num_classes: int) -> nn.Module:
    return nn.Linear(4, num_classes)


def not_a_model() -> int:
    return 3


def test_import_path_models_receive_input_shape_and_num_classes():
    model = build_model(ModelConfig(name="test_api:ShapeNet", kwargs={"width": 3}), (1, 2, 2), 5)
    assert model.input_shape == (1, 2, 2) and model.net[2].out_features == 5
    assert model.net[1].out_features == 3
    assert build_model(ModelConfig(name="test_api:shape_net_factory"), (4,), 7).out_features == 7
    # a **kwargs catch-all is not handed them: only what model.kwargs says
    fwd = build_model(ModelConfig(name="test_api:Forwarding",
                                  kwargs={"in_features": 2, "out_features": 9}), (4,), 7)
    assert fwd.out_features == 9
    with pytest.raises(ValueError, match="model.kwargs.num_classes=4 but the data gives num_classes=5"):
        build_model(ModelConfig(name="test_api:ShapeNet", kwargs={"num_classes": 4}), (3,), 5)
    with pytest.raises(ValueError, match="returned int, not an nn.Module"):
        build_model(ModelConfig(name="test_api:not_a_model"), (3,), 5)


# ---------------------------------------------------------------------------------------------
# a run file's import paths are never imported unless the user names them again


def test_resume_refuses_import_paths_only_the_run_file_names():
    stored = load_config(None, ['data.name="evil:load"', 'run.callbacks=["evil:Hook"]'])
    with pytest.raises(ConfigError, match=r'names data.name="evil:load" and run.callbacks=\["evil:Hook"\], '
                                          r"import paths;.*--set data.name=\"evil:load\" --set"):
        check_untrusted_imports(stored, [], "r.h5")
    with pytest.raises(ConfigError, match="names run.callbacks"):
        check_untrusted_imports(stored, ['data.name="evil:load"'], "r.h5")
    check_untrusted_imports(stored, ['data.name="evil:load"', "run.callbacks=[]"], "r.h5")
    check_untrusted_imports(load_config(None, []), [], "r.h5")


# ---------------------------------------------------------------------------------------------
# a callback raising on one rank ends every rank (separate mpiexec, so a hang fails, not blocks)

HOOK_MODULE = '''
from mpi4py import MPI


class FailOnLastRank:
    def on_aggregation(self, info):
        if info.rank == info.size - 1 and info.round == 2:
            raise KeyError("no such metric")
'''


@pytest.mark.skipif(not MPIEXEC.exists(), reason="no mpiexec next to this python")
def test_a_callback_failing_on_one_rank_ends_every_rank(tmp_path):
    (tmp_path / "failing_hook.py").write_text(textwrap.dedent(HOOK_MODULE))
    config = tmp_path / "c.toml"
    config.write_text(textwrap.dedent(f"""
        [run]
        rounds = 4
        out = "{tmp_path / 'r.h5'}"
        progress = "off"
        callbacks = ["failing_hook:FailOnLastRank"]
        [schedule]
        tau = [2]
        [data]
        name = "synthetic"
        synthetic_samples = 200
        synthetic_features = 5
        synthetic_classes = 2
        [model]
        name = "logreg"
    """))
    env = {"PYTHONPATH": f"{tmp_path}:{Path(__file__).resolve().parent.parent}",
           "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    done = subprocess.run([str(MPIEXEC), "-n", "2", sys.executable, "-m", "hflmpi", "run",
                           str(config)], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 2, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("hflmpi: error:")]
    assert len(errors) == 1, done.stderr
    assert ("the callbacks after the layer-1 aggregation of round 2 (step 2) failed on rank 1: "
            "CallbackError: callback FailOnLastRank.on_aggregation raised KeyError") in errors[0]
    assert list(hflmpi.read_metrics(tmp_path / "r.h5")["round"]) == [1]
