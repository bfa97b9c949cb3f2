"""The example configs ship with the package: in a built wheel (with the license), through
``hflmpi init DIR`` and ``hflmpi run --example NAME``. The quick paths of the command line
(``--help``, ``--version``, a config error) never import torch.

The wheel test builds hflmpi from a copy of this checkout with the venv's setuptools (the test
extra brings setuptools >= 77), installs it into a folder of its own and loads every bundled
example there with hflmpi's own loaders.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import hflmpi
from hflmpi.cli import main as cli_main
from hflmpi.cli.init import EXAMPLES, PATTERNS, example_files, example_names

REPO = Path(__file__).resolve().parent.parent


def _documented_jobs() -> list[str]:
    """The job names in the first table of jobs/README.md (first column, without .toml)."""
    text = (REPO / "jobs" / "README.md").read_text()
    table = text[text.index("| job | what |"):].split("\n\n", 1)[0]
    return sorted(re.findall(r"^\| `([\w-]+?)(?:\.toml)?` \|", table, flags=re.MULTILINE))


def _setuptools_major() -> int:
    try:
        return int(importlib.metadata.version("setuptools").split(".")[0])
    except importlib.metadata.PackageNotFoundError:
        return 0


# ---------------------------------------------------------------------------------------------
# one copy: the package's examples are the repository's jobs/ and experiments/


def test_the_package_examples_are_the_repository_folders():
    for folder in PATTERNS:
        assert (EXAMPLES / folder).resolve() == REPO / folder
    expected = sorted({path.relative_to(REPO) for folder, patterns in PATTERNS.items()
                       for pattern in patterns for path in (REPO / folder).glob(pattern)})
    assert example_files() == expected
    assert len([p for p in expected if p.parts[0] == "jobs" and p.suffix == ".sbatch"]) >= 5
    assert len([p for p in expected if p.parts[0] == "experiments"]) >= 5


def test_example_names_are_the_documented_jobs():
    assert example_names() == _documented_jobs()
    assert "default" in example_names()


# ---------------------------------------------------------------------------------------------
# the wheel


INSTALLED_PROBE = """
import json, sys, tomllib
import hflmpi
from hflmpi.cli.init import EXAMPLES, example_files, example_names, example_path
from hflmpi.config import load_config
from hflmpi.experiments.spec import load_experiment
assert hflmpi.__file__.startswith(sys.argv[1]), hflmpi.__file__
assert not EXAMPLES.is_symlink() and not (EXAMPLES / "jobs").is_symlink()
configs = {name: load_config(example_path(name)).run.out for name in example_names()}
specs = [load_experiment(EXAMPLES / p, small=True).name for p in example_files()
         if p.parts[0] == "experiments"]
print(json.dumps({"configs": configs, "specs": specs,
                  "files": [p.as_posix() for p in example_files()]}))
"""


@pytest.mark.skipif(_setuptools_major() < 77, reason="building the wheel needs setuptools >= 77 "
                    "(PEP 639 license metadata); the test extra installs it")
def test_the_wheel_carries_the_examples_and_the_license(tmp_path):
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "setup.cfg", "README.md", "LICENSE"):
        shutil.copy2(REPO / name, source / name)
    skip = shutil.ignore_patterns("__pycache__", "*.egg-info", "build", "*.h5")
    for folder in ("hflmpi", "jobs", "experiments"):
        shutil.copytree(REPO / folder, source / folder, symlinks=True, ignore=skip)
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(dist), str(source)], check=True, timeout=600, cwd=tmp_path)
    (wheel,) = dist.glob("hflmpi-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        bundled = {n for n in names if n.startswith("hflmpi/examples/")}
        assert bundled == {f"hflmpi/examples/{p.as_posix()}" for p in example_files()}
        for name in bundled:
            assert archive.read(name) == (REPO / name.removeprefix("hflmpi/examples/")).read_bytes()
        info = f"hflmpi-{hflmpi.__version__}.dist-info"
        assert archive.read(f"{info}/licenses/LICENSE") == (REPO / "LICENSE").read_bytes()
        metadata = archive.read(f"{info}/METADATA").decode()
    assert (REPO / "LICENSE").read_text().split()[:3] == ["Apache", "License", "Version"]
    assert "License-Expression: Apache-2.0" in metadata
    assert f"Version: {hflmpi.__version__}" in metadata

    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index",
                    "--target", str(site), str(wheel)], check=True, timeout=600, cwd=tmp_path)
    env = {**os.environ, "PYTHONPATH": str(site)}
    probe = subprocess.run([sys.executable, "-c", INSTALLED_PROBE, str(site)], capture_output=True,
                           text=True, timeout=300, cwd=tmp_path, env=env)
    assert probe.returncode == 0, probe.stderr
    found = json.loads(probe.stdout)
    assert sorted(found["configs"]) == _documented_jobs()
    assert found["configs"]["default"] == "runs/default.h5"
    assert len(found["specs"]) == len([p for p in example_files() if p.parts[0] == "experiments"])
    assert found["files"] == [p.as_posix() for p in example_files()]


# ---------------------------------------------------------------------------------------------
# hflmpi init


def test_init_lays_out_what_the_job_scripts_expect(tmp_path, capsys):
    target = tmp_path / "work"
    assert cli_main(["init", str(target)]) == 0
    assert f"wrote {len(example_files())} file(s) into {target}" in capsys.readouterr().out
    for rel in example_files():
        assert (target / rel).read_bytes() == (EXAMPLES / rel).read_bytes()
    assert (target / "runs").is_dir(), "Slurm opens --output=runs/... before the script runs"
    for script in (target / "jobs").glob("*.sbatch"):  # every path a script names is there
        for path in re.findall(r"\b((?:jobs|experiments)/[\w-]+\.toml)", script.read_text()):
            assert (target / path).is_file(), f"{script.name} names {path}"

    assert cli_main(["init", str(target)]) == 0  # again: nothing to do, nothing touched
    assert "wrote 0 file(s)" in capsys.readouterr().out


def test_init_never_overwrites_a_changed_file_without_force(tmp_path, capsys):
    target = tmp_path / "work"
    assert cli_main(["init", str(target)]) == 0
    edited, removed = target / "jobs" / "default.toml", target / "experiments" / "depth.toml"
    edited.write_text(edited.read_text() + "# mine\n")
    removed.unlink()
    capsys.readouterr()
    assert cli_main(["init", str(target)]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("hflmpi init: error: "), lines
    assert str(edited) in lines[0] and "--force" in lines[0]
    assert edited.read_text().endswith("# mine\n")
    assert not removed.exists(), "a refused init must write nothing"

    assert cli_main(["init", str(target), "--force"]) == 0
    assert edited.read_bytes() == (EXAMPLES / "jobs" / "default.toml").read_bytes()
    assert removed.read_bytes() == (EXAMPLES / "experiments" / "depth.toml").read_bytes()


# ---------------------------------------------------------------------------------------------
# hflmpi run --example, and what the quick paths import

PROBE = """
import sys
from hflmpi.cli import main
try:
    code = main(sys.argv[1:])
except SystemExit as exc:
    code = exc.code
print("IMPORTED", ",".join(m for m in ("torch", "mpi4py.MPI") if m in sys.modules))
sys.exit(code)
"""


def _probe(tmp_path: Path, *argv: str) -> tuple[int, set[str], str]:
    proc = subprocess.run([sys.executable, "-c", PROBE, *argv], capture_output=True, text=True,
                          timeout=300, cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"})
    (line,) = [x for x in proc.stdout.splitlines() if x.startswith("IMPORTED")]
    return proc.returncode, set(filter(None, line.split(" ", 1)[1].split(","))), proc.stderr


@pytest.mark.parametrize("argv", [["--version"], ["run", "--help"], ["init", "--help"]],
                         ids=["version", "run-help", "init-help"])
def test_help_and_version_import_neither_torch_nor_mpi(tmp_path, argv):
    code, imported, err = _probe(tmp_path, *argv)
    assert code == 0, err
    assert imported == set()


@pytest.mark.parametrize("argv, needle", [
    (["run", "{typo}"], "unknown key run.roundz; did you mean run.rounds?"),
    (["run", "{good}", "--set", "optim.lr=fast"], 'optim.lr="fast"'),
    (["run", "--example", "defualt"], "did you mean default? examples: " + ", ".join(example_names())),
    (["run", "--example", "default", "--resume", "x.h5", "--overwrite"], "give one of them"),
], ids=["unknown-key", "bad-value", "unknown-example", "overwrite-and-resume"])
def test_config_errors_are_one_line_before_torch_is_imported(tmp_path, argv, needle):
    typo, good = tmp_path / "typo.toml", tmp_path / "good.toml"
    typo.write_text("[run]\nrounds = 3\nroundz = 4\n")
    good.write_text("[run]\nrounds = 3\n")
    code, imported, err = _probe(tmp_path, *(a.format(typo=typo, good=good) for a in argv))
    assert code == 2, err
    assert "torch" not in imported, "a config error must be reported before torch is imported"
    errors = [line for line in err.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith("hflmpi: error: ") and needle in errors[0], err


def test_run_example_runs_the_bundled_config(tmp_path):
    """``--example default`` is jobs/default.toml: on one rank its 8-device tree is refused."""
    code, _, err = _probe(tmp_path, "run", "--example", "default")
    assert code == 2
    assert "topology.fanouts=[2, 2, 2] needs 8 ranks, got 1" in err
