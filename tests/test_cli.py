"""The ``hflmpi`` command line: usage, config errors (exit 2, one message naming the key), a tiny
run end to end (in-process on a one-rank world and under ``mpiexec -n 2``), ``--set``,
``--resume`` and ``hflmpi report``.

Serial tests: run with ``python -m pytest tests/test_cli.py``. The in-process runs use the
one-rank ``MPI.COMM_WORLD`` of a process started without mpiexec; two cases launch
``mpiexec -n 2 python -m mpi4py -m hflmpi run ...`` as a subprocess.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from hflmpi.cli import main as cli_main
from hflmpi.config import load_config
from hflmpi.record.checkpoint import load_checkpoint
from hflmpi.record.reading import read_config_toml, read_metrics, read_run_info

MPIEXEC = Path(sys.executable).with_name("mpiexec")
TINY = """\
[run]
rounds = 2
out = "{out}"
progress = "off"
seed = 3

[schedule]
tau = [2]

[data]
name = "synthetic"
synthetic_samples = 256
synthetic_features = 8
synthetic_classes = 3

[model]
name = "logreg"

[optim]
lr = 0.2
batch_size = 16
"""


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    """``hflmpi run`` sets torch's thread count for its rank; give the test process it back."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _keep_signal_handlers():
    """``hflmpi run`` ignores SIGTERM/SIGUSR1 on its way out (the process then exits); give the
    test process its handlers back."""
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    yield
    for sig, handler in before.items():
        signal.signal(sig, handler)


def write_config(
    directory: Path, text: str = TINY, name: str = "tiny.toml", out: str = "run.h5"
) -> Path:
    path = directory / name
    path.write_text(text.format(out=(directory / out).as_posix()), encoding="utf-8")
    return path


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli_main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_error(err: str, *needles: str) -> str:
    """stderr must be exactly one ``hflmpi: error:`` line holding every needle."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one error line, got {lines!r}"
    assert lines[0].startswith("hflmpi: error: "), lines[0]
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    return lines[0]


# ---------------------------------------------------------------------------------------------
# usage


def test_no_arguments_prints_usage(capsys):
    code, out, err = run_cli(capsys)
    assert code == 2
    assert "usage: hflmpi" in out + err
    for command in ("run", "report"):
        assert command in out + err


def test_help_exits_zero_and_unknown_command_fails(capsys):
    code, out, _ = run_cli(capsys, "--help")
    assert code == 0 and "usage: hflmpi" in out
    code, _, err = run_cli(capsys, "trian")
    assert code == 2 and "unknown command 'trian'" in err


def test_python_dash_m_without_arguments(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "hflmpi"], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path)
    assert proc.returncode == 2
    assert "usage: hflmpi" in proc.stdout + proc.stderr


# ---------------------------------------------------------------------------------------------
# config errors: exit 2 and one message that names the key


@pytest.mark.parametrize(
    "edit, needles",
    [
        (("lr = 0.2", "lrr = 0.2"), ["optim.lrr", "did you mean optim.lr"]),
        (("[model]", "[modle]"), ["[modle]", "did you mean [model]"]),
        (("lr = 0.2", 'lr = "fast"'), ["optim.lr=\"fast\"", "a string", "must be a number"]),
        (("tau = [2]", "tau = [2, 3]"), ["schedule.tau=[2, 3]", "2 entries", "1 layer",
                                         "give one tau per layer"]),
        (('progress = "off"', 'progress = "off"\ndevice = "gpu"'), ["run.device=\"gpu\""]),
        (("[schedule]", "[topology]\nfanouts = [2, 2]\n\n[schedule]"),
         ["schedule.tau=[2]", "topology.fanouts=[2, 2]"]),
        (("lr = 0.2", "lr = inf"), ["optim.lr=inf", "finite number > 0 and <= 1000"]),
        (("lr = 0.2", "lr = 1e30"), ["optim.lr=1e+30", "<= 1000"]),
        (("tau = [2]", "tau = [1000000000000]"), ["schedule.tau=[1000000000000]", "prod(tau)"]),
    ],
    ids=["unknown-key", "unknown-section", "wrong-type", "tau-length", "bad-choice", "tau-vs-tree",
         "lr-inf", "lr-huge", "tau-huge"],
)
def test_config_error_names_the_key(tmp_path, capsys, edit, needles):
    old, new = edit
    assert old in TINY
    config = write_config(tmp_path, TINY.replace(old, new))
    code, out, err = run_cli(capsys, "run", str(config))
    assert code == 2, (out, err)
    assert_one_error(err, *needles)
    assert not (tmp_path / "run.h5").exists(), "a config error still created the run file"


def test_topology_mismatch_in_process(tmp_path, capsys):
    config = write_config(tmp_path)
    code, _, err = run_cli(capsys, "run", str(config), "--set", "topology.fanouts=[4,3]",
                           "--set", "schedule.tau=[2,1]")
    assert code == 2
    assert_one_error(err, "topology.fanouts=[4, 3] needs 12 ranks, got 1")


def test_bad_override_and_missing_file(tmp_path, capsys):
    config = write_config(tmp_path)
    code, _, err = run_cli(capsys, "run", str(config), "--set", "optim.lr")
    assert code == 2
    assert_one_error(err, "--set 'optim.lr'", "section.key=value")
    code, _, err = run_cli(capsys, "run", str(tmp_path / "nope.toml"))
    assert code == 2
    assert_one_error(err, "nope.toml", "does not exist")
    code, _, err = run_cli(capsys, "run")
    assert code == 2
    assert_one_error(err, "CONFIG.toml")


# ---------------------------------------------------------------------------------------------
# a tiny run in-process (one rank), --set, refusing to overwrite, --resume, report


def test_run_set_resume_and_report(tmp_path, capsys):
    config = write_config(tmp_path)
    run_file = tmp_path / "run.h5"
    code, out, err = run_cli(capsys, "run", str(config), "--set", "run.rounds=3",
                             "--set", "schedule.tau=[3]", "--set", "optim.momentum=0.5")
    assert code == 0, err
    assert "3 rounds done" in out
    assert list(read_metrics(run_file)["round"]) == [1, 2, 3]
    stored = load_config_text(read_config_toml(run_file), tmp_path)
    assert stored.run.rounds == 3 and stored.schedule.tau == (3,) and stored.optim.momentum == 0.5
    assert stored.optim.lr == 0.2  # from the file, untouched by the overrides

    # The run file exists: starting again without --resume must refuse, not clobber it.
    code, _, err = run_cli(capsys, "run", str(config))
    assert code == 2
    assert_one_error(err, "already exists")
    assert list(read_metrics(run_file)["round"]) == [1, 2, 3]

    # Resume with only the run file (its stored config) and more rounds.
    code, out, err = run_cli(capsys, "run", "--resume", str(run_file), "--set", "run.rounds=5")
    assert code == 0, err
    assert "5 rounds done" in out
    assert list(read_metrics(run_file)["round"]) == [1, 2, 3, 4, 5]
    assert [entry["round"] for entry in read_run_info(run_file)["resume_log"]] == [3]

    code, out, err = run_cli(capsys, "report", str(run_file))
    assert code == 0, err
    rows = dict(_split_row(line) for line in out.splitlines() if line.strip())
    assert rows["rounds"] == "5"
    assert rows["world size"] == "1"
    assert rows["layers"] == "1"
    assert rows["final test accuracy"].endswith("(r5)")


def test_overwrite_starts_afresh_and_drops_the_old_files_when_done(tmp_path, capsys):
    """Running the same command twice works with --overwrite; without it the refusal names
    --overwrite (also when only the checkpoints are left); the new run equals a fresh one."""
    expected = _reference_model(tmp_path / "reference", capsys, rounds=2)
    config = write_config(tmp_path)
    run_file = tmp_path / "run.h5"
    for rounds in (3, 2):  # the second run replaces a longer one
        code, out, err = run_cli(capsys, "run", str(config), "--overwrite",
                                 "--set", f"run.rounds={rounds}")
        assert code == 0, err
        assert f"{rounds} rounds done" in out
        assert list(read_metrics(run_file)["round"]) == list(range(1, rounds + 1))
        assert not list(tmp_path.glob("*.replaced")), "the old files must go once the run is done"
    assert np.array_equal(_final_model(run_file), expected), "old files changed the new run"
    assert load_checkpoint(tmp_path / "run.ckpt.h5").round == 2

    code, _, err = run_cli(capsys, "run", str(config))
    assert code == 2
    assert_one_error(err, f"run record {run_file} already exists", "pass --overwrite",
                     f"--resume {run_file}")
    run_file.unlink()  # only the checkpoint is left: a fresh start would mix two runs
    code, _, err = run_cli(capsys, "run", str(config))
    assert code == 2
    assert_one_error(err, f"its checkpoint {tmp_path / 'run.ckpt.h5'} exists", "--overwrite")
    code, _, err = run_cli(capsys, "run", str(config), "--overwrite", "--resume", str(run_file))
    assert code == 2
    assert_one_error(err, "--overwrite starts the run afresh but --resume continues it")


def test_overwrite_keeps_the_old_run_until_the_new_one_finishes(tmp_path, capsys, monkeypatch):
    """A crash of the new run leaves the old one whole under *.replaced, and the new one on disk."""
    import hflmpi.federation

    config = write_config(tmp_path)
    code, _, err = run_cli(capsys, "run", str(config), "--set", "run.rounds=3",
                           "--set", "run.checkpoint_every=1")
    assert code == 0, err
    old = {p.name: p.read_bytes() for p in tmp_path.glob("run*.h5")}
    assert sorted(old) == ["run.ckpt.h5", "run.ckpt.prev.h5", "run.h5"]

    def crash(*args, **kwargs):
        raise RuntimeError("simulated crash after round 1")

    monkeypatch.setattr(hflmpi.federation, "end_of_round", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        cli_main(["run", str(config), "--overwrite"])
    assert "kept as run.h5.replaced" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in tmp_path.glob("*.replaced")} == \
        {f"{name}.replaced": data for name, data in old.items()}
    assert list(read_metrics(tmp_path / "run.h5")["round"]) == [1]

    monkeypatch.undo()
    code, _, err = run_cli(capsys, "run", str(config), "--overwrite")
    assert code == 0, err
    assert not list(tmp_path.glob("*.replaced"))
    assert list(read_metrics(tmp_path / "run.h5")["round"]) == [1, 2]


def _final_model(run_file: Path):
    return load_checkpoint(run_file.with_name(run_file.stem + ".ckpt.h5")).model


def _reference_model(directory: Path, capsys, rounds: int):
    """The uninterrupted run of the same config, in a directory of its own."""
    directory.mkdir()
    code, _, err = run_cli(capsys, "run", str(write_config(directory)), "--set",
                           f"run.rounds={rounds}")
    assert code == 0, err
    return _final_model(directory / "run.h5")


@pytest.mark.parametrize("left_behind", ["record-without-checkpoint", "empty-file"])
def test_resume_if_exists_restarts_a_run_that_stopped_before_its_first_checkpoint(
        tmp_path, capsys, left_behind):
    """A requeued job whose last leg died before its first checkpoint left only a run file (or an
    empty one, killed while creating it): ``--resume-if-exists`` must start afresh, not fail with
    "already exists" on every requeue."""
    expected = _reference_model(tmp_path / "reference", capsys, rounds=3)
    config = write_config(tmp_path)
    run_file = tmp_path / "run.h5"
    if left_behind == "empty-file":
        run_file.write_bytes(b"")
    else:
        code, _, err = run_cli(capsys, "run", str(config), "--set", "run.rounds=2")
        assert code == 0, err
        for checkpoint in tmp_path.glob("run.ckpt*.h5"):
            checkpoint.unlink()
    code, out, err = run_cli(capsys, "run", str(config), "--set", "run.rounds=3",
                             "--resume-if-exists")
    assert code == 0, err
    assert "no checkpoint" in err and "3 rounds done" in out
    assert list(read_metrics(run_file)["round"]) == [1, 2, 3]
    assert read_run_info(run_file)["resume_log"] == []
    assert np.array_equal(_final_model(run_file), expected)
    if left_behind == "empty-file":  # set aside, never deleted
        assert [p.stat().st_size for p in tmp_path.glob("run.h5.unusable-*")] == [0]


@pytest.mark.parametrize("how", ["--resume", "--resume-if-exists", "run-file-missing"])
def test_a_truncated_run_file_is_rebuilt_from_the_checkpoint(tmp_path, capsys, how):
    """Two valid checkpoints must stay usable when the run file is truncated (or gone): resuming
    sets the broken file aside, starts a new record at the checkpoint's round, and ends with the
    uninterrupted run's bits."""
    expected = _reference_model(tmp_path / "reference", capsys, rounds=5)
    config = write_config(tmp_path)
    run_file = tmp_path / "run.h5"
    code, _, err = run_cli(capsys, "run", str(config), "--set", "run.rounds=3",
                           "--set", "run.checkpoint_every=1")
    assert code == 0, err
    assert load_checkpoint(tmp_path / "run.ckpt.prev.h5").round == 2
    if how == "run-file-missing":
        run_file.unlink()
    else:
        os.truncate(run_file, run_file.stat().st_size // 2)
    if how == "--resume":  # the config too comes from the checkpoint
        argv = ["run", "--resume", str(run_file), "--set", "run.rounds=5"]
    else:
        argv = ["run", str(config), "--set", "run.rounds=5", "--resume-if-exists"]
    code, out, err = run_cli(capsys, *argv)
    assert code == 0, err
    assert "5 rounds done" in out
    assert list(read_metrics(run_file)["round"]) == [4, 5]
    (entry,) = read_run_info(run_file)["resume_log"]
    assert entry["round"] == 3 and "rebuilt from the round-3 checkpoint" in entry["note"]
    assert np.array_equal(_final_model(run_file), expected), "the rebuilt run changed the bits"
    aside = list(tmp_path.glob("run.h5.unusable-*"))
    assert len(aside) == (0 if how == "run-file-missing" else 1)


def test_report_on_a_missing_file_fails(tmp_path, capsys):
    code, _, err = run_cli(capsys, "report", str(tmp_path / "missing.h5"))
    assert code == 2
    assert "missing.h5" in err


def load_config_text(text: str, directory: Path):
    path = directory / "stored.toml"
    path.write_text(text, encoding="utf-8")
    return load_config(path)


def _split_row(line: str) -> tuple[str, str]:
    name, _, value = line.partition("  ")
    return name.strip(), value.strip()


# ---------------------------------------------------------------------------------------------
# under mpiexec -n 2 (subprocess)

needs_mpiexec = pytest.mark.skipif(
    not MPIEXEC.exists() and shutil.which("mpiexec") is None, reason="no mpiexec"
)


def _mpiexec(n: int, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    launcher = str(MPIEXEC) if MPIEXEC.exists() else shutil.which("mpiexec")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [launcher, "-n", str(n), sys.executable, "-m", "mpi4py", "-m", "hflmpi", *args],
        capture_output=True, text=True, timeout=240, cwd=cwd, env=env,
    )


@needs_mpiexec
def test_mpiexec_topology_mismatch_says_ranks(tmp_path):
    config = write_config(tmp_path, TINY.replace(
        "[schedule]\ntau = [2]", "[topology]\nfanouts = [4, 3]\n\n[schedule]\ntau = [2, 1]"))
    proc = _mpiexec(2, "run", str(config), cwd=tmp_path)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("hflmpi: error:")]
    assert len(errors) == 1, proc.stderr
    assert "topology.fanouts=[4, 3] needs 12 ranks, got 2" in errors[0]
    assert not (tmp_path / "run.h5").exists()


@needs_mpiexec
def test_mpiexec_two_ranks_end_to_end(tmp_path, capsys):
    config = write_config(tmp_path)
    proc = _mpiexec(2, "run", str(config), "--set", "run.rounds=3",
                    "--set", "topology.fanouts=[2]", cwd=tmp_path)
    assert proc.returncode == 0, (proc.stdout, proc.stderr)
    assert proc.stdout.count("3 rounds done") == 1, proc.stdout  # rank 0 only
    run_file = tmp_path / "run.h5"
    assert list(read_metrics(run_file)["round"]) == [1, 2, 3]
    assert read_run_info(run_file)["world_size"] == 2
    assert (tmp_path / "run.ckpt.h5").exists()
    code, out, err = run_cli(capsys, "report", str(run_file))
    assert code == 0, err
    rows = dict(_split_row(line) for line in out.splitlines() if line.strip())
    assert rows["rounds"] == "3" and rows["world size"] == "2"


@needs_mpiexec
def test_mpiexec_resume_with_other_rank_count_is_refused(tmp_path, capsys):
    config = write_config(tmp_path)
    code, _, err = run_cli(capsys, "run", str(config))
    assert code == 0, err
    run_file = tmp_path / "run.h5"
    proc = _mpiexec(2, "run", "--resume", str(run_file), "--set", "run.rounds=4", cwd=tmp_path)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("hflmpi: error:")]
    assert len(errors) == 1, proc.stderr
    assert "written by 1 ranks but this run has 2; resume with mpiexec -n 1" in errors[0]
    assert list(read_metrics(run_file)["round"]) == [1, 2]


# ---------------------------------------------------------------------------------------------
# resuming: the stored config is compared, changes are refused or recorded, files are checked


def _finished_run(tmp_path, capsys, *settings: str) -> tuple[Path, Path]:
    config = write_config(tmp_path)
    code, _, err = run_cli(capsys, "run", str(config), *settings)
    assert code == 0, err
    return config, tmp_path / "run.h5"


def _stored(run_file: Path, directory: Path):
    return load_config_text(read_config_toml(run_file), directory)


@pytest.mark.parametrize("how", ["config", "set"])
def test_resume_refuses_a_changed_config_with_a_diff(tmp_path, capsys, how):
    """tau, lr, seed, bits, partition...: a resume that silently continued under another config
    would leave a run file whose stored config lies. Refused, naming stored and given values."""
    config, run_file = _finished_run(tmp_path, capsys)
    changes = ["--set", "schedule.tau=[3]", "--set", "optim.lr=0.1", "--set", "run.seed=4",
               "--set", "data.partition=dirichlet", "--set", "run.rounds=4"]
    if how == "config":
        argv = ["run", str(config), "--resume", str(run_file), *changes]
    else:
        argv = ["run", "--resume", str(run_file), *changes]
    code, _, err = run_cli(capsys, *argv)
    assert code == 2, err
    line = assert_one_error(err, "schedule.tau: stored [2], given [3]", "optim.lr: stored 0.2, "
                            "given 0.1", "run.seed: stored 3, given 4",
                            'data.partition: stored "iid", given "dirichlet"',
                            "--allow-config-change")
    assert "run.rounds: stored" not in line  # extending the run needs no permission
    assert list(read_metrics(run_file)["round"]) == [1, 2]
    assert _stored(run_file, tmp_path).schedule.tau == (2,)


def test_resume_with_allow_config_change_records_the_change(tmp_path, capsys):
    _, run_file = _finished_run(tmp_path, capsys)
    code, out, err = run_cli(capsys, "run", "--resume", str(run_file), "--set", "run.rounds=3",
                             "--set", "optim.lr=0.1", "--set", "schedule.tau=[3]",
                             "--allow-config-change")
    assert code == 0, err
    assert "3 rounds done" in out
    stored = _stored(run_file, tmp_path)
    assert stored.optim.lr == 0.1 and stored.schedule.tau == (3,) and stored.run.rounds == 3
    history = read_run_info(run_file)["config_history"]
    assert len(history) == 1 and history[0]["round"] == 2
    assert history[0]["allowed_by"] == "--allow-config-change"
    assert history[0]["changes"] == {"run.rounds": {"stored": "2", "given": "3"},
                                     "optim.lr": {"stored": "0.2", "given": "0.1"},
                                     "schedule.tau": {"stored": "[2]", "given": "[3]"}}
    # A free key alone (more rounds) needs no flag and is recorded too, so the file stays true.
    code, _, err = run_cli(capsys, "run", "--resume", str(run_file), "--set", "run.rounds=4")
    assert code == 0, err
    assert _stored(run_file, tmp_path).run.rounds == 4
    history = read_run_info(run_file)["config_history"]
    assert history[-1]["allowed_by"] == "free keys"
    assert history[-1]["changes"] == {"run.rounds": {"stored": "3", "given": "4"}}
    assert list(read_metrics(run_file)["round"]) == [1, 2, 3, 4]


@pytest.mark.parametrize("change, needle", [
    (["--set", "model.name=mlp"], 'model.name: stored "logreg", given "mlp"'),
    (["--set", "topology.fanouts=[1, 1]", "--set", "schedule.tau=[2, 2]"],
     "topology.fanouts: stored (unset), given [1, 1]"),
    (["--set", "data.synthetic_features=9"], "data.synthetic_features: stored 8, given 9"),
], ids=["model", "depth", "features"])
def test_resume_never_changes_the_model_tree_or_data_shape(tmp_path, capsys, change, needle):
    """A different model size or tree depth would die in tracebacks on every rank (the checkpoint
    and the metric columns have the stored shape): one clear error, even with the flag."""
    config, run_file = _finished_run(tmp_path, capsys)
    code, _, err = run_cli(capsys, "run", str(config), "--resume", str(run_file), *change,
                           "--allow-config-change")
    assert code == 2, err
    assert_one_error(err, needle, "cannot change on resume, not even with --allow-config-change",
                     "start a new run")
    assert list(read_metrics(run_file)["round"]) == [1, 2]


def test_resume_refuses_rounds_below_the_checkpoint(tmp_path, capsys):
    _, run_file = _finished_run(tmp_path, capsys)
    code, _, err = run_cli(capsys, "run", "--resume", str(run_file), "--set", "run.rounds=1")
    assert code == 2
    assert_one_error(err, "run.rounds=1 but the checkpoint is at round 2")


def test_resume_detects_an_edited_run_file(tmp_path, capsys):
    """The checkpoint's config hash must match the run file's stored config."""
    import h5py

    _, run_file = _finished_run(tmp_path, capsys)
    with h5py.File(run_file, "r+") as handle:
        text = handle.attrs["config_toml"]
        handle.attrs["config_toml"] = text.replace("lr = 0.2", "lr = 0.5")
    code, _, err = run_cli(capsys, "run", "--resume", str(run_file), "--set", "run.rounds=3")
    assert code == 2
    assert_one_error(err, "run.ckpt.h5 was written under a config", "optim.lr: run file 0.5, "
                     "checkpoint 0.2", "one of the files was edited")
    assert list(read_metrics(run_file)["round"]) == [1, 2]


def test_resume_after_a_stop_before_the_next_checkpoint(tmp_path, capsys):
    """A resume that changed the config and stopped before its first checkpoint leaves the old
    checkpoint (written under the previous config) next to the updated run file: still valid."""
    _, run_file = _finished_run(tmp_path, capsys)
    saved = {p.name: p.read_bytes() for p in tmp_path.glob("run.ckpt*.h5")}
    code, _, err = run_cli(capsys, "run", "--resume", str(run_file), "--set", "run.rounds=3",
                           "--set", "optim.lr=0.1", "--allow-config-change")
    assert code == 0, err
    for name, blob in saved.items():  # as if the job had died before round 3's checkpoint
        (tmp_path / name).write_bytes(blob)
    code, out, err = run_cli(capsys, "run", "--resume", str(run_file), "--set", "run.rounds=4")
    assert code == 0, err
    assert "4 rounds done" in out
    assert _stored(run_file, tmp_path).optim.lr == 0.1  # the approved change stays
    assert list(read_metrics(run_file)["round"]) == [1, 2, 3, 4]


EVIL_MODEL = """\
import os
from pathlib import Path

from torch import nn

Path(os.environ["HFLMPI_TEST_MARKER"]).write_text("imported")


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 3)

    def forward(self, x):
        return self.lin(x.flatten(1))
"""


def test_resume_never_imports_a_model_named_only_by_the_run_file(tmp_path, capsys, monkeypatch):
    """A run file is data: its model.name import path is not imported (so its module's code does
    not run) unless the command line names it again."""
    module = f"hflmpi_test_net_{os.getpid()}"
    (tmp_path / f"{module}.py").write_text(EVIL_MODEL, encoding="utf-8")
    marker = tmp_path / "marker"
    monkeypatch.setenv("HFLMPI_TEST_MARKER", str(marker))
    monkeypatch.syspath_prepend(str(tmp_path))
    config, run_file = _finished_run(tmp_path, capsys, "--set", f'model.name="{module}:Net"')
    assert marker.exists()  # the user's own CONFIG named it: imported
    marker.unlink()
    monkeypatch.delitem(sys.modules, module)

    code, _, err = run_cli(capsys, "run", "--resume", str(run_file), "--set", "run.rounds=3")
    assert code == 2
    assert_one_error(err, f'model.name="{module}:Net", an import path',
                     "never imports code named by a run file",
                     f'--set model.name="{module}:Net"')
    assert not marker.exists(), "the module named by the run file was imported"

    # Refusals come before any import, also when the user's CONFIG names the model.
    code, _, err = run_cli(capsys, "run", str(config), "--resume", str(run_file),
                           "--set", f'model.name="{module}:Net"', "--set", "schedule.tau=[3]")
    assert code == 2
    assert_one_error(err, "schedule.tau: stored [2], given [3]")
    assert not marker.exists(), "the model module was imported before the resume was refused"

    code, out, err = run_cli(capsys, "run", "--resume", str(run_file), "--set", "run.rounds=3",
                             "--set", f"model.name={module}:Net")
    assert code == 0, err
    assert "3 rounds done" in out and marker.exists()


@needs_mpiexec
def test_mpiexec_resume_with_a_changed_config_is_one_clear_error(tmp_path):
    """Two ranks: a refused resume (another tau; another model size) exits 2 with one message
    and no traceback on any rank."""
    config = write_config(tmp_path)
    proc = _mpiexec(2, "run", str(config), "--set", "topology.fanouts=[2]", cwd=tmp_path)
    assert proc.returncode == 0, (proc.stdout, proc.stderr)
    run_file = tmp_path / "run.h5"
    for change, needle in ((["--set", "schedule.tau=[3]"], "schedule.tau: stored [2], given [3]"),
                           (["--set", "model.name=mlp", "--allow-config-change"],
                            'model.name: stored "logreg", given "mlp"')):
        proc = _mpiexec(2, "run", "--resume", str(run_file), "--set", "run.rounds=3", *change,
                        cwd=tmp_path)
        assert proc.returncode == 2, (proc.stdout, proc.stderr)
        errors = [line for line in proc.stderr.splitlines() if line.strip()]
        assert len(errors) == 1 and errors[0].startswith("hflmpi: error: "), proc.stderr
        assert needle in errors[0], errors[0]
    assert list(read_metrics(run_file)["round"]) == [1, 2]


def test_resume_with_a_model_whose_code_changed_is_one_error(tmp_path, capsys, monkeypatch):
    """Same config, but the import-path model now builds another size (its code changed): the
    checkpoint cannot be loaded into it. One clear error, not a shape traceback."""
    module = f"hflmpi_test_sized_{os.getpid()}"
    (tmp_path / f"{module}.py").write_text(
        "import os\nfrom torch import nn\n\n\n"
        "class Net(nn.Sequential):\n"
        "    def __init__(self):\n"
        "        width = int(os.environ['HFLMPI_TEST_WIDTH'])\n"
        "        super().__init__(nn.Flatten(), nn.Linear(8, width), nn.Linear(width, 3))\n",
        encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("HFLMPI_TEST_WIDTH", "4")
    config, run_file = _finished_run(tmp_path, capsys, "--set", f'model.name="{module}:Net"')
    monkeypatch.setenv("HFLMPI_TEST_WIDTH", "5")
    code, _, err = run_cli(capsys, "run", str(config), "--resume", str(run_file),
                           "--set", f'model.name="{module}:Net"', "--set", "run.rounds=3")
    assert code == 2, err
    assert_one_error(err, "the checkpoint holds a model of 51 parameters",
                     "builds one of 63", "resume with the model (and its code)")
    assert list(read_metrics(run_file)["round"]) == [1, 2]
