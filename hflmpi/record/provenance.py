"""Where and with what a run ran: library versions, MPI library, hosts, Slurm job, command, git.

A result means little without the stack that produced it: Open MPI's MPI library, for one,
saturated the integer sums of secure aggregation where MPICH did not, so the MPI library's own
version string belongs in the record next to torch's. :func:`provenance` collects one entry per
leg of a run (a resumed run may continue on another cluster); :class:`hflmpi.record.store.RunRecord`
appends it under ``/provenance/<leg>``. The MPI facts (library string, standard, every rank's host
name) are gathered by the caller (:func:`hflmpi.mpi.comm.mpi_provenance`); this module imports no
MPI and reads the environment, the command line and the working directory only from its arguments.
"""

from __future__ import annotations

import importlib.metadata
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

__all__ = ["SLURM_VARIABLES", "describe_provenance", "git_state", "library_versions", "provenance"]

SLURM_VARIABLES = {
    "slurm_job_id": "SLURM_JOB_ID",
    "slurm_array_job_id": "SLURM_ARRAY_JOB_ID",
    "slurm_array_task_id": "SLURM_ARRAY_TASK_ID",
    "slurm_step_id": "SLURM_STEP_ID",
    "slurm_job_nodelist": "SLURM_JOB_NODELIST",
    "slurm_cluster_name": "SLURM_CLUSTER_NAME",
}
_SOURCE = Path(__file__).resolve().parent.parent  # the hflmpi package directory
_GIT_SECONDS = 10.0


def _version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def library_versions() -> dict[str, str]:
    """Return the versions of Python, torch (and its CUDA build), numpy, h5py, HDF5 and mpi4py.

    Reads installed metadata (and the already imported torch and h5py); imports no MPI.
    """
    import h5py
    import numpy
    import torch

    from hflmpi import __version__

    cuda = torch.version.cuda
    return {
        "hflmpi_version": __version__,
        "python_version": f"{platform.python_implementation()} {platform.python_version()}",
        "torch_version": str(torch.__version__),
        "torch_build": f"CUDA {cuda}" if cuda else "cpu",
        "numpy_version": numpy.__version__,
        "h5py_version": h5py.version.version,
        "hdf5_version": h5py.version.hdf5_version,
        "mpi4py_version": _version("mpi4py"),
        "platform": platform.platform(),
    }


def git_state(source: Path = _SOURCE) -> dict[str, Any]:
    """Return ``{"git_commit": sha, "git_dirty": bool}`` of the checkout holding ``source``.

    Empty when ``source`` is not in a git checkout, git is not installed, or it fails or takes
    longer than 10 s: provenance never stops a run.
    """
    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", "-C", str(source), *args], capture_output=True, text=True,
                                  timeout=_GIT_SECONDS, check=False)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if not commit or not commit.strip():
        return {}
    status = git("status", "--porcelain", "--untracked-files=no", "--", ".")
    state: dict[str, Any] = {"git_commit": commit.strip()}
    if status is not None:
        state["git_dirty"] = bool(status.strip())
    return state


def provenance(
    mpi: Mapping[str, Any], env: Mapping[str, str], argv: Sequence[str], cwd: str,
    *, versions: Mapping[str, str] | None = None, git: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Return one provenance entry of a run leg.

    Parameters
    ----------
    mpi : mapping
        ``mpi_library`` (first line of ``MPI.Get_library_version()``), ``mpi_standard``
        (e.g. ``"4.1"``), ``host_names`` (one per rank) and ``world_size``.
    env : mapping
        The environment (Slurm job id, array task id, step id and node list are read from it).
    argv : sequence of str
        The command line (``sys.argv``).
    cwd : str
        The working directory.
    versions, git : mapping, optional
        :func:`library_versions` and :func:`git_state` (computed when not given).

    Returns
    -------
    dict
        Keys of ``versions``, ``git``, ``mpi`` and the Slurm variables that are set, plus
        ``argv`` (list), ``cwd`` and ``executable``. Values are str, int, bool or list of str.
    """
    entry: dict[str, Any] = dict(library_versions() if versions is None else versions)
    entry.update(dict(mpi))
    entry["host_names"] = [str(h) for h in mpi.get("host_names", [])]
    entry["argv"] = [str(a) for a in argv]
    entry["cwd"] = str(cwd)
    entry["executable"] = sys.executable
    for key, variable in SLURM_VARIABLES.items():
        if env.get(variable):
            entry[key] = env[variable]
    entry.update(git_state() if git is None else git)
    return entry


def _hosts(names: Sequence[str]) -> str:
    counts: dict[str, int] = {}
    for name in names:
        counts[name] = counts.get(name, 0) + 1
    shown = [f"{name} x{n}" if n > 1 else name for name, n in list(counts.items())[:8]]
    more = f", ... ({len(counts) - 8} more hosts)" if len(counts) > 8 else ""
    return f"{len(names)} ranks on {len(counts)} hosts: {', '.join(shown)}{more}"


def describe_provenance(legs: Sequence[Mapping[str, Any]]) -> list[str]:
    """Return text lines describing each leg (as :func:`hflmpi.record.reading.read_provenance` gives)."""
    lines: list[str] = []
    for i, leg in enumerate(legs):
        get = leg.get
        lines.append(f"  leg {i}: started {get('time', '-')} at round {get('first_round', '-')}")
        lines.append(f"    hflmpi {get('hflmpi_version', '-')}, {get('python_version', 'python -')}, "
                     f"torch {get('torch_version', '-')} ({get('torch_build', '-')}), numpy "
                     f"{get('numpy_version', '-')}, h5py {get('h5py_version', '-')} (HDF5 "
                     f"{get('hdf5_version', '-')}), mpi4py {get('mpi4py_version', '-')}")
        library = " ".join(str(get("mpi_library", "-")).split())
        lines.append(f"    MPI: {library} (MPI standard {get('mpi_standard', '-')})")
        lines.append(f"    hosts: {_hosts(list(get('host_names', [])))}")
        slurm = [f"{key.removeprefix('slurm_').replace('_', ' ')} {leg[key]}"
                 for key in SLURM_VARIABLES if key in leg]
        if slurm:
            lines.append(f"    slurm: {', '.join(slurm)}")
        lines.append(f"    command: {' '.join(str(a) for a in get('argv', []))}")
        lines.append(f"    cwd: {get('cwd', '-')}")
        if "git_commit" in leg:
            flag = get("git_dirty")
            dirty = " (state unknown)" if flag is None else " (uncommitted changes)" if flag else ""
            lines.append(f"    git: {leg['git_commit']}{dirty}")
    return lines
