"""The Slurm scripts parse, their configs load, and the preemption signal path really works.

The signal test launches real ``mpiexec`` runs: an uninterrupted one, and one that receives
SIGUSR1 mid-run (as Slurm's ``--signal=USR1@N`` would send), must checkpoint and exit with 75,
then resumes with ``--resume-if-exists``; both must end with the same model bits.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import JOBS, MPIEXEC, preemptible_run, wait_for_rounds

from hflmpi.config import load_config
from hflmpi.mpi.preempt import EXIT_PREEMPTED
from hflmpi.record.checkpoint import load_checkpoint
from hflmpi.record.marker import read_marker
from hflmpi.record.reading import read_metrics

SCRIPTS = sorted(JOBS.glob("*.sbatch"))


def test_there_are_job_scripts():
    assert len(SCRIPTS) >= 5


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_parses_and_has_a_matching_config(script):
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    assert text.startswith("#!/bin/bash")
    configs = set(re.findall(r"jobs/([\w-]+\.toml)", text))
    assert configs == {script.stem + ".toml"}, f"{script.name} should launch jobs/{script.stem}.toml"
    load_config(JOBS / f"{script.stem}.toml")
    assert "python -m mpi4py -m hflmpi" in text.replace('"$PYTHON"', "python")


def test_every_config_loads():
    for config in JOBS.glob("*.toml"):
        load_config(config)


def _run_args(out: Path, rounds: int) -> list[str]:
    return preemptible_run(out, rounds, "--set", "quantize.bits=[8]",
                           "--set", "run.checkpoint_every=1000", "--set", "run.divergence=false",
                           "--resume-if-exists")


@pytest.mark.skipif(not MPIEXEC.exists(), reason="no mpiexec next to this python")
def test_sigusr1_checkpoints_exits_75_and_resumes_bit_exactly(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    rounds = 400
    reference = tmp_path / "reference.h5"
    subprocess.run(_run_args(reference, rounds), check=True, env=env, timeout=600,
                   stdout=subprocess.DEVNULL)

    run = tmp_path / "preempted.h5"
    proc = subprocess.Popen(_run_args(run, rounds), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    wait_for_rounds(run, 3)
    proc.send_signal(signal.SIGUSR1)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == EXIT_PREEMPTED, stderr
    assert "SIGUSR1" in stderr and "checkpointed round" in stderr
    stopped_at = load_checkpoint(run.with_name("preempted.ckpt.h5")).round
    assert 3 <= stopped_at < rounds, "the signal must land mid-run"
    assert list(read_metrics(run)["round"]) == list(range(1, stopped_at + 1))
    # The durable note a job script trusts even when a race spoils the step's exit code.
    marker = read_marker(run)
    assert marker is not None, "no preemption marker next to the run file"
    assert (marker["round"], marker["checkpoint"], marker["signal"]) == \
        (stopped_at, "preempted.ckpt.h5", "SIGUSR1")

    subprocess.run(_run_args(run, rounds), check=True, env=env, timeout=600,
                   stdout=subprocess.DEVNULL)
    resumed = load_checkpoint(run.with_name("preempted.ckpt.h5"))
    expected = load_checkpoint(reference.with_name("reference.ckpt.h5"))
    assert resumed.round == expected.round == rounds
    assert np.array_equal(resumed.model, expected.model), "resume changed the model bits"
    assert list(read_metrics(run)["round"]) == list(range(1, rounds + 1))
    assert read_marker(run) is None, "the resumed run must remove the marker"


@pytest.mark.skipif(not MPIEXEC.exists(), reason="no mpiexec next to this python")
def test_nodes_topology_follows_the_node_names(tmp_path):
    """Two fake nodes (HFLMPI_NODE_NAME per rank, MPMD launch): one group per node, then a root."""
    from hflmpi.record.reading import read_run_info

    out = tmp_path / "nodes.h5"
    rank_cmd = [sys.executable, "-m", "mpi4py", "-m", "hflmpi", "run", str(JOBS / "cpu-node.toml"),
                "--set", f'run.out="{out}"', "--set", "run.rounds=2", "--set", "schedule.tau=[2, 2]",
                "--set", "quantize.bits=[8, 0]", "--set", 'run.progress="off"']
    cmd = [str(MPIEXEC), "-n", "2", "-env", "HFLMPI_NODE_NAME", "node-a", *rank_cmd,
           ":", "-n", "2", "-env", "HFLMPI_NODE_NAME", "node-b", *rank_cmd]
    subprocess.run(cmd, check=True, timeout=300, stdout=subprocess.DEVNULL,
                   env=dict(os.environ, OMP_NUM_THREADS="1"))
    tree = read_run_info(out)["tree"]
    assert tree["children"] == [[[0, 1], [2, 3]], [[0, 1]]]
    assert list(read_metrics(out)["round"]) == [1, 2]


# -- the launch lines, run outside Slurm with recording stand-ins for srun and mpirun -------------
RECORDER = """#!/bin/bash
# Record this call's argv (NUL-separated) in a file of its own, then succeed.
printf '%s\\0' "$(basename "$0")" "$@" > "$(mktemp "$LAUNCH_LOG/call.XXXXXX")"
"""
# Python for splitting HFLMPI_ARGS (`-c`), a recorder for anything else (experiments' plot step).
PYTHON_STUB = """#!/bin/bash
if [[ $1 == -c ]]; then exec {python} "$@"; fi
printf '%s\\0' python "$@" > "$(mktemp "$LAUNCH_LOG/call.XXXXXX")"
"""
SRUN_SCRIPTS = ["cpu-node", "experiments", "gpu-nodes", "preemptible", "scaling-array"]
SPACED_ARGS = '--set run.name="a b" --set \'data.path=/x/with "quotes" and spaces\' -k\\ v'
SPACED_WORDS = ["--set", "run.name=a b", "--set", 'data.path=/x/with "quotes" and spaces', "-k v"]


def _launch(tmp_path: Path, script: str, *script_args: str,
            **env_extra: str) -> tuple[subprocess.CompletedProcess[str], list[list[str]]]:
    """Run ``jobs/SCRIPT.sbatch`` as Slurm would (from a submit dir); return the result and
    the argv of every srun/mpirun/python call it made, in no particular order."""
    submit, bin_dir, log = tmp_path / "submit", tmp_path / "bin", tmp_path / "log"
    for d in (submit, bin_dir, log):
        d.mkdir(exist_ok=True)
    if not (submit / "jobs").exists():
        (submit / "jobs").symlink_to(JOBS, target_is_directory=True)
    for name, text in (("srun", RECORDER), ("mpirun", RECORDER),
                       ("python", PYTHON_STUB.format(python=sys.executable))):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "HFLMPI_", "SRUN_"))}
    env.update(PATH=f"{bin_dir}:{env['PATH']}", LAUNCH_LOG=str(log), SLURM_SUBMIT_DIR=str(submit),
               SLURM_JOB_ID="42", SLURM_NTASKS="4", SLURM_ARRAY_TASK_ID="1",
               SLURM_ARRAY_JOB_ID="41", HFLMPI_PYTHON=str(bin_dir / "python"), **env_extra)
    proc = subprocess.run(["bash", str(JOBS / f"{script}.sbatch"), *script_args], env=env,
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    calls = [f.read_text().split("\0")[:-1] for f in sorted(log.iterdir())]
    for f in log.iterdir():
        f.unlink()
    return proc, calls


def _launcher_call(calls: list[list[str]], launcher: str) -> list[str]:
    found = [call for call in calls if call[0] == launcher]
    assert len(found) == 1, calls
    return found[0]


@pytest.mark.parametrize("script", SRUN_SCRIPTS)
def test_srun_gets_pmi2_the_cpus_per_task_and_every_argument_intact(tmp_path, script):
    proc, calls = _launch(tmp_path, script, "--set", "run.note=c d", HFLMPI_ARGS=SPACED_ARGS,
                          SLURM_CPUS_PER_TASK="3")
    assert proc.returncode == 0, proc.stderr
    srun = _launcher_call(calls, "srun")
    assert srun[1:3] == ["--mpi=pmi2", "--cpus-per-task=3"], srun
    assert srun[-7:] == [*SPACED_WORDS, "--set", "run.note=c d"], srun
    assert f"jobs/{script}.toml" in srun
    assert "-m" in srun and srun[srun.index("-m") + 1] == "mpi4py"


@pytest.mark.parametrize("script", SRUN_SCRIPTS)
def test_srun_options_follow_the_environment(tmp_path, script):
    proc, calls = _launch(tmp_path, script, HFLMPI_SRUN_MPI="pmix")
    assert proc.returncode == 0, proc.stderr
    srun = _launcher_call(calls, "srun")
    assert srun[1] == "--mpi=pmix" and not any(a.startswith("--cpus-per-task") for a in srun), srun
    assert "" not in srun, "an empty HFLMPI_ARGS must add no (empty) word"


def test_mpirun_line_splits_both_variables_safely(tmp_path):
    proc, calls = _launch(tmp_path, "gpu-nodes-mpirun", HFLMPI_ARGS=SPACED_ARGS,
                          SLURM_NTASKS_PER_NODE="2")
    assert proc.returncode == 0, proc.stderr
    mpirun = _launcher_call(calls, "mpirun")
    assert mpirun[1:5] == ["-np", "4", "--map-by", "ppr:2:node"], mpirun
    assert mpirun[-5:] == SPACED_WORDS
    proc, calls = _launch(tmp_path, "gpu-nodes-mpirun", HFLMPI_MPIRUN=str(tmp_path / "bin/mpirun"),
                          HFLMPI_MPIRUN_ARGS='-bind-to core -env NAME "a b"')
    mpirun = _launcher_call(calls, "mpirun")
    assert mpirun[1:8] == ["-np", "4", "-bind-to", "core", "-env", "NAME", "a b"], mpirun


def _split(text: str) -> list[str]:
    """The words jobs/common.sh makes of HFLMPI_ARGS=text."""
    env = dict(os.environ, HFLMPI_PYTHON=sys.executable, HFLMPI_ARGS=text)
    proc = subprocess.run(["bash", "-c", 'source jobs/common.sh; for w in "${ARGS[@]}"; do printf "%s\\0" "$w"; done'],
                          cwd=JOBS.parent, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.split("\0")[:-1]


@pytest.mark.parametrize("text", [
    '--set run.name="a b"',
    "--set 'schedule.tau=[5, 2]' --set run.out=\"runs/x y.h5\"",
    r"a\ b 'c\d' \"e\" \\f 'it'\''s'",
    "  leading   and trailing\tspace  ",
    "'' \"\" x",
    "",
])
def test_hflmpi_args_split_like_the_shell(text):
    """The words are those bash makes of the same text typed after a command (the reference:
    bash's own parser, on texts without anything to expand)."""
    reference = subprocess.run(["bash", "-c", 'eval "set -- $TEXT"; for w in "$@"; do printf "%s\\0" "$w"; done'],
                               env={"TEXT": text}, capture_output=True, text=True, timeout=60,
                               check=True).stdout.split("\0")[:-1]
    assert _split(text) == reference


def test_hflmpi_args_expand_nothing():
    text = "$HOME `date` $(date) *.toml ~ {a,b}"
    assert _split(text) == ["$HOME", "`date`", "$(date)", "*.toml", "~", "{a,b}"]


def test_hflmpi_setup_is_sourced_first_and_errors_stop_the_job(tmp_path):
    setup = tmp_path / "site.sh"
    # A module system reading unset variables, and a setting the launch line must see.
    setup.write_text('module() { :; }\nmodule load cuda "$NOT_SET_ANYWHERE"\n'
                     "export HFLMPI_SRUN_MPI=pmix\n")
    proc, calls = _launch(tmp_path, "cpu-node", HFLMPI_SETUP=str(setup))
    assert proc.returncode == 0, proc.stderr
    assert _launcher_call(calls, "srun")[1] == "--mpi=pmix"

    for env, message in [({"HFLMPI_SETUP": str(tmp_path / "missing.sh")}, "is not a readable file"),
                         ({"HFLMPI_ARGS": '--set run.name="a b'}, "No closing quotation")]:
        proc, calls = _launch(tmp_path, "cpu-node", **env)
        assert proc.returncode == 2 and message in proc.stderr, (proc.returncode, proc.stderr)
        assert calls == [], "nothing may be launched"
    setup.write_text("false\n")
    proc, calls = _launch(tmp_path, "preemptible", HFLMPI_SETUP=str(setup))
    assert proc.returncode == 2 and "failed (exit 1)" in proc.stderr and calls == [], proc.stderr


def test_scripts_share_the_launch_logic():
    for script in SCRIPTS:
        text = script.read_text()
        assert "source jobs/common.sh" in text, script.name
        assert "${HFLMPI_ARGS" not in text, f"{script.name} expands HFLMPI_ARGS itself"
        assert '"${ARGS[@]}" "$@"' in text, script.name
        assert re.search(r"^\s*srun\b", text, re.M) is None, f"{script.name}: use \"${{SRUN[@]}}\""


@pytest.mark.skipif(not MPIEXEC.exists(), reason="no mpiexec next to this python")
def test_population_job_gives_the_same_model_bits_on_2_and_4_ranks(tmp_path):
    """jobs/population.toml: every layer quantized, so the placement of its 256 clients on the
    ranks does not change a bit of the model (docs/population.md)."""
    from hflmpi.record.checkpoint import load_checkpoint

    models = {}
    for ranks in (2, 4):
        out = tmp_path / f"pop{ranks}.h5"
        proc = subprocess.run(
            [str(MPIEXEC), "-n", str(ranks), sys.executable, "-m", "mpi4py", "-m", "hflmpi", "run",
             str(JOBS / "population.toml"), "--set", "run.rounds=2", "--set",
             f'run.out="{out}"', "--set", 'run.progress="off"'],
            env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        models[ranks] = load_checkpoint(tmp_path / f"pop{ranks}.ckpt.h5").model
    assert models[2].tobytes() == models[4].tobytes()
