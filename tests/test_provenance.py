"""Serial tests of the run's provenance (hflmpi.record.provenance) and its place in the run file."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from hflmpi.record.provenance import describe_provenance, git_state, provenance
from hflmpi.record.reading import read_provenance, read_run_info
from hflmpi.record.report import summarize
from hflmpi.record.store import RunRecord

MPI_FACTS = {"mpi_library": "Open MPI v5.0.7, package: Open MPI", "mpi_standard": "3.1",
             "host_names": ["n1", "n1", "n2", "n2"], "world_size": 4}
VERSIONS = {"hflmpi_version": "0.1.0", "torch_version": "2.13.0", "torch_build": "cpu"}
SLURM = {"SLURM_JOB_ID": "9001", "SLURM_ARRAY_JOB_ID": "9000", "SLURM_ARRAY_TASK_ID": "1",
         "SLURM_STEP_ID": "0", "SLURM_JOB_NODELIST": "n[1-2]", "HOME": "/root"}


def test_entry_holds_slurm_ids_command_and_mpi_facts():
    entry = provenance(MPI_FACTS, SLURM, ["hflmpi", "run", "a.toml"], "/scratch/u",
                       versions=VERSIONS, git={"git_commit": "abc", "git_dirty": False})
    assert entry["slurm_job_id"] == "9001" and entry["slurm_array_task_id"] == "1"
    assert entry["slurm_step_id"] == "0" and entry["slurm_job_nodelist"] == "n[1-2]"
    assert entry["argv"] == ["hflmpi", "run", "a.toml"] and entry["cwd"] == "/scratch/u"
    assert entry["host_names"] == ["n1", "n1", "n2", "n2"] and entry["world_size"] == 4
    assert entry["git_commit"] == "abc" and "HOME" not in str(entry)
    assert "slurm_job_id" not in provenance(MPI_FACTS, {}, [], "/", versions=VERSIONS, git={})


def test_git_state_of_a_folder_outside_any_checkout_is_empty(tmp_path):
    assert git_state(tmp_path) == {}


def test_git_state_without_git_installed_is_empty(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no git executable anywhere on PATH
    assert git_state() == {}
    entry = provenance(MPI_FACTS, {}, ["x"], "/", versions=VERSIONS)
    assert "git_commit" not in entry and entry["argv"] == ["x"]


@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")
def test_git_state_reads_commit_and_dirty_flag(tmp_path):
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(tmp_path), *args], check=True, capture_output=True,
                              text=True, env={**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_COMMITTER_NAME": "t",
                                              "GIT_AUTHOR_EMAIL": "t@x", "GIT_COMMITTER_EMAIL": "t@x"}).stdout
    git("init", "-q")
    (tmp_path / "f.py").write_text("a = 1\n")
    git("add", "f.py")
    git("commit", "-qm", "one")
    head = git("rev-parse", "HEAD").strip()
    assert git_state(tmp_path) == {"git_commit": head, "git_dirty": False}
    (tmp_path / "f.py").write_text("a = 2\n")
    assert git_state(tmp_path) == {"git_commit": head, "git_dirty": True}


def test_each_leg_is_appended_and_read_back_in_order(tmp_path):
    path = tmp_path / "run.h5"
    first = provenance(MPI_FACTS, SLURM, ["a"], "/x", versions=VERSIONS, git={})
    second = provenance({**MPI_FACTS, "host_names": ["m1"], "world_size": 1}, {}, ["b"], "/y",
                        versions=VERSIONS, git={"git_commit": "def"})
    with RunRecord.create(path, "", {"world_size": 4, "tree": {}}, layer_count=1) as record:
        assert record.add_provenance(first, first_round=1) == 0
    with RunRecord.open_append(path) as record:
        assert record.add_provenance(second, first_round=7) == 1
    legs = read_provenance(path)
    assert [leg["first_round"] for leg in legs] == [1, 7]
    assert legs[0]["host_names"] == MPI_FACTS["host_names"] and legs[1]["host_names"] == ["m1"]
    assert legs[0]["argv"] == ["a"] and legs[1]["git_commit"] == "def"
    assert legs[0]["slurm_job_id"] == "9001" and "slurm_job_id" not in legs[1]
    assert read_run_info(path)["provenance"] == legs
    text = "\n".join(describe_provenance(legs))
    assert "leg 0: started" in text and "leg 1: started" in text
    assert "MPI: Open MPI v5.0.7, package: Open MPI (MPI standard 3.1)" in text
    assert "4 ranks on 2 hosts: n1 x2, n2 x2" in text and "job id 9001" in text
    assert "git: def (state unknown)" in text
    assert "provenance of run\n  leg 0: started" in summarize([path])  # what hflmpi report prints


def test_old_run_file_without_provenance_reads_empty(tmp_path):
    path = tmp_path / "old.h5"
    RunRecord.create(path, "", {"world_size": 1, "tree": {}}, layer_count=1).close()
    assert read_provenance(path) == [] and read_run_info(path)["provenance"] == []


def test_the_mpi_library_name_drops_the_nul_open_mpi_ends_it_with(monkeypatch):
    """Open MPI 5's MPI_Get_library_version ends with a NUL, which HDF5 string attributes refuse."""
    import hflmpi.mpi.comm as comm_module

    class FakeMPI:
        @staticmethod
        def Get_library_version() -> str:
            return "Open MPI v5.0.11, package: Open MPI, ident: 5.0.11, repo rev: v5.0.11rc1\x00"

    monkeypatch.setattr(comm_module, "MPI", FakeMPI)
    assert comm_module.library_name() == "Open MPI v5.0.11, package: Open MPI, ident: 5.0.11, repo rev: v5.0.11rc1"
    FakeMPI.Get_library_version = staticmethod(lambda: "MPICH Version:      4.3.0\nMPICH Release date: x\n")
    assert comm_module.library_name() == "MPICH Version:      4.3.0"
