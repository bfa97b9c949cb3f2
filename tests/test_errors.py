"""One error base: every error meant for the user derives from :class:`hflmpi.errors.HflmpiError`,
and every command reports one as a single ``hflmpi <command>: error: ...`` line with exit 2.

The classes are listed here by hand, so a new exception class in hflmpi fails
``test_every_exception_class_is_classified`` until someone decides whether users see it.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import h5py
import numpy as np
import pytest

import hflmpi
from hflmpi.cli import main as cli_main
from hflmpi.errors import EXIT_USER_ERROR, HflmpiError, report_user_error

USER_ERRORS = {
    "hflmpi.config.checks.ConfigError",
    "hflmpi.core.topology.TopologyError",
    "hflmpi.core.tau_search.PlanError",
    "hflmpi.experiments.spec.ExperimentError",
    "hflmpi.mpi.guard.SetupError",
    "hflmpi.mpi.placement.LaunchError",
    "hflmpi.mpi.exact_sum.InexactSumError",
    "hflmpi.core.layer_rules.LayerOptionsError",
    "hflmpi.mpi.layers.LayerFailedError",
    "hflmpi.mpi.agreement.MessageError",
    "hflmpi.mpi.model_check.ModelMismatchError",
    "hflmpi.learn.data.DatasetError",
    "hflmpi.mpi.guard.HandshakeError",
    "hflmpi.mpi.guard.NonFiniteUpdateError",
    "hflmpi.record.checkpoint.CheckpointError",
    "hflmpi.record.checkpoint.CheckpointNotFoundError",
    "hflmpi.callbacks.CallbackError",
    "hflmpi.core.server_opt.ServerOptError",
    "hflmpi.core.strategy.PluginError",
    "hflmpi.bench.memory.BenchMemoryError",
    "hflmpi.bench.netem.NetemError",
    "hflmpi.core.selection.SelectionError",
    "hflmpi.core.devices.ProfileError",
}
# Exception classes that are not user errors, each with the reason.
NOT_USER_ERRORS = {
    "hflmpi.errors.HflmpiError": "the base itself",
    "hflmpi.record.checkpoint.CheckpointFallbackWarning": "a warning; the run goes on",
}
# The builtin base each user error kept, so ``except ValueError`` etc. still catch them.
KEPT_BASES = {
    "ConfigError": ValueError,
    "TopologyError": ValueError,
    "PlanError": ValueError,
    "ExperimentError": ValueError,
    "DatasetError": ValueError,
    "SetupError": RuntimeError,
    "LaunchError": RuntimeError,
    "InexactSumError": RuntimeError,
    "HandshakeError": RuntimeError,
    "MessageError": RuntimeError,
    "ModelMismatchError": RuntimeError,
    "CheckpointError": RuntimeError,
    "CheckpointNotFoundError": RuntimeError,
    "NonFiniteUpdateError": FloatingPointError,
    "LayerOptionsError": ValueError,
    "LayerFailedError": ValueError,
    "CallbackError": RuntimeError,
    "ServerOptError": ValueError,
    "PluginError": ValueError,
    "BenchMemoryError": ValueError,
    "NetemError": RuntimeError,
    "SelectionError": ValueError,
    "ProfileError": ValueError,
}


def _exception_classes() -> dict[str, type[BaseException]]:
    """Return every public exception class defined in an hflmpi module, by qualified name."""
    found: dict[str, type[BaseException]] = {}
    for info in pkgutil.walk_packages(hflmpi.__path__, "hflmpi."):
        if info.name.rsplit(".", 1)[-1] == "__main__":
            continue  # running it would start a command
        module = importlib.import_module(info.name)
        for name, obj in vars(module).items():
            if (inspect.isclass(obj) and issubclass(obj, BaseException)
                    and obj.__module__ == info.name and not name.startswith("_")):
                found[f"{info.name}.{name}"] = obj
    return found


def test_every_exception_class_is_classified():
    found = set(_exception_classes())
    unclassified = found - USER_ERRORS - set(NOT_USER_ERRORS)
    assert not unclassified, (f"classify {sorted(unclassified)} in tests/test_errors.py: a user "
                              "error derives from hflmpi.errors.HflmpiError")
    gone = (USER_ERRORS | set(NOT_USER_ERRORS)) - found
    assert not gone, f"listed but not found (moved or renamed?): {sorted(gone)}"


def test_every_user_error_derives_from_the_one_base_and_keeps_its_builtin_base():
    classes = _exception_classes()
    for name in sorted(USER_ERRORS):
        cls = classes[name]
        assert issubclass(cls, HflmpiError), f"{name} must derive from HflmpiError"
        assert issubclass(cls, KEPT_BASES[cls.__name__]), name
    assert not issubclass(classes["hflmpi.record.checkpoint.CheckpointFallbackWarning"],
                          HflmpiError)


def test_report_user_error_prints_one_line_once(capsys):
    assert report_user_error("plan", HflmpiError("first line\n  second line")) == EXIT_USER_ERROR
    assert capsys.readouterr().err == "hflmpi plan: error: first line second line\n"
    assert report_user_error("plan", HflmpiError("not rank 0"), show=False) == EXIT_USER_ERROR
    assert capsys.readouterr().err == ""


# ---------------------------------------------------------------------------------------------
# every command: a user error is one line and exit 2


def _one_error_line(capsys, command: str, *argv: str) -> str:
    code = cli_main([command, *argv])
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert code == 2, (code, captured.err)
    assert len(lines) == 1, f"expected one error line, got {lines!r}"
    prefix = f"hflmpi {command}: error: "
    assert lines[0].startswith(prefix), lines[0]
    return lines[0][len(prefix):]


def test_report_of_a_missing_file_is_one_line_and_exit_2(tmp_path, capsys):
    message = _one_error_line(capsys, "report", str(tmp_path / "missing.h5"))
    assert "missing.h5" in message and "does not exist" in message


def test_report_of_a_file_without_a_stored_config_is_one_line_and_exit_2(tmp_path, capsys):
    path = tmp_path / "other.h5"
    with h5py.File(path, "w") as f:
        f.create_group("metrics")
    message = _one_error_line(capsys, "report", str(path))
    assert str(path) in message and "stores no config" in message


def test_report_of_a_checkpoint_names_its_run_record(tmp_path, capsys):
    from hflmpi.record.checkpoint import save_checkpoint

    run = tmp_path / "job.h5"
    run.write_bytes(b"")  # the run record next to it: the message names it
    checkpoint = save_checkpoint(run, round=7, model_flat=np.zeros(3, dtype=np.float32))
    message = _one_error_line(capsys, "report", str(checkpoint))
    assert message == (f"{checkpoint} is a checkpoint (round 7), not a run record; pass its run "
                       f"record {run} instead")


def test_report_of_a_file_that_is_not_hdf5_is_one_line_and_exit_2(tmp_path, capsys):
    path = tmp_path / "notes.txt"
    path.write_text("not HDF5\n")
    message = _one_error_line(capsys, "report", str(path))
    assert message.startswith(f"{path} is not an HDF5 file") and "run.out" in message


def test_plan_without_times_is_one_line_and_exit_2(capsys):
    message = _one_error_line(capsys, "plan", "--deadline", "60")
    assert message.startswith("give --t-cp")


def test_plan_from_a_file_without_a_stored_config_is_one_line_and_exit_2(tmp_path, capsys):
    path = tmp_path / "other.h5"
    with h5py.File(path, "w") as f:
        f.attrs["note"] = "not a run file"
    message = _one_error_line(capsys, "plan", "--from-run", str(path), "--deadline", "60")
    assert str(path) in message and "stores no config" in message


def test_experiments_plot_of_a_missing_results_file_is_one_line_and_exit_2(tmp_path, capsys):
    message = _one_error_line(capsys, "experiments", "plot", str(tmp_path / "nope.h5"),
                              "--out", str(tmp_path / "figs"))
    assert "nope.h5" in message and "does not exist" in message


def test_experiments_run_of_a_missing_spec_is_one_line_and_exit_2(tmp_path, capsys):
    message = _one_error_line(capsys, "experiments", "run", str(tmp_path / "nope.toml"),
                              "--out", str(tmp_path / "r.h5"))
    assert "nope.toml" in message


@pytest.mark.parametrize(("command", "argv"), [
    ("aggregate", ["aggregate", "--fanouts", "3,7"]),
    ("aggregate", ["aggregate", "--sizes", "many"]),
    ("aggregate", ["aggregate", "--sizes", "1e15"]),  # more than any rank's memory holds
    ("scaling plot", ["scaling", "plot", "--out", "{tmp}/nope.h5"]),
])
def test_bench_with_bad_options_is_one_line_and_exit_2(tmp_path, capsys, command, argv):
    code = cli_main(["bench", *(a.format(tmp=tmp_path) for a in argv)])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1, err
    assert lines[0].startswith(f"hflmpi bench {command}: error: "), lines[0]
