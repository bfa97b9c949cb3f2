"""``hflmpi init [DIR] [--force]``: write the bundled example configs and Slurm scripts into DIR.

The package carries the repository's ``jobs/`` (run configs ``NAME.toml`` with their Slurm
scripts ``NAME.sbatch`` and ``README.md``) and ``experiments/`` (the papers' experiment specs) as
``hflmpi/examples/jobs`` and ``hflmpi/examples/experiments``: links to those folders in a
checkout, copies in a wheel (``[tool.setuptools.package-data]`` in ``pyproject.toml`` lists the
same patterns as :data:`PATTERNS`). ``hflmpi init`` lays them out as in the repository, so the
scripts run unchanged from DIR; ``hflmpi run --example NAME`` runs ``jobs/NAME.toml`` in place.

A file in DIR that differs from the bundled one is never overwritten without ``--force``; a file
equal to it is left as it is, so running ``init`` again is harmless.
"""

from __future__ import annotations

import argparse
import difflib
import shutil
import sys
from pathlib import Path
from typing import Sequence

from hflmpi.config import ConfigError
from hflmpi.errors import HflmpiError, report_user_error

__all__ = [
    "EXAMPLES", "PATTERNS", "example_files", "example_names", "example_path", "write_examples", "main",
]

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
"""Where the examples lie in the installed package."""

PATTERNS = {"jobs": ("*.toml", "*.sbatch", "README.md"), "experiments": ("*.toml",)}
"""The bundled files per folder (the package data of ``pyproject.toml``)."""


def example_files() -> list[Path]:
    """Return the bundled files as paths relative to :data:`EXAMPLES`, e.g. ``jobs/default.toml``."""
    found = {path.relative_to(EXAMPLES) for folder, patterns in PATTERNS.items()
             for pattern in patterns for path in (EXAMPLES / folder).glob(pattern)}
    return sorted(found)


def example_names() -> list[str]:
    """Return the names ``hflmpi run --example`` accepts: the run configs ``jobs/NAME.toml``."""
    return sorted(path.stem for path in example_files()
                  if path.parent.name == "jobs" and path.suffix == ".toml")


def example_path(name: str) -> Path:
    """Return the bundled run config ``jobs/NAME.toml``.

    Raises
    ------
    ConfigError
        If there is no example of that name; the message lists the names.
    """
    names = example_names()
    if name in names:
        return EXAMPLES / "jobs" / f"{name}.toml"
    if not names:
        raise ConfigError(f"--example {name}: this installation of hflmpi has no examples (no "
                          f"{EXAMPLES / 'jobs'}); reinstall it, or give a CONFIG.toml")
    close = difflib.get_close_matches(name, names, n=1)
    hint = f"did you mean {close[0]}? " if close else ""
    raise ConfigError(f"--example {name} is not a bundled example; {hint}examples: "
                      f"{', '.join(names)} (hflmpi init DIR writes them into DIR to edit)")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hflmpi init",
        description="Write the example run configs, Slurm scripts and experiment specs into DIR "
                    "(as jobs/ and experiments/, laid out as in the hflmpi repository).")
    parser.add_argument("dir", nargs="?", default=".", metavar="DIR",
                        help="where to write them (default: the current directory)")
    parser.add_argument("--force", action="store_true",
                        help="overwrite files in DIR that differ from the bundled ones")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``hflmpi init``; returns the exit status (0 ok, 2 user error)."""
    args = _parser().parse_args(argv)
    target = Path(args.dir)
    try:
        written = write_examples(target, force=args.force)
    except (HflmpiError, OSError) as exc:
        return report_user_error("init", exc)
    print(f"hflmpi init: wrote {len(written)} file(s) into {target}"
          + ("" if written else " (the bundled examples were there already)"))
    for path in written:
        print(f"  {path}")
    python = sys.executable or "python"
    mpiexec = Path(python).with_name("mpiexec")  # the MPICH wheel's launcher, next to python
    print(f"next:\n  cd {target}\n"
          f"  {mpiexec if mpiexec.exists() else 'mpiexec'} -n 8 {python} -m mpi4py -m hflmpi run "
          "jobs/default.toml\n"
          f"  HFLMPI_PYTHON={python} sbatch jobs/cpu-node.sbatch   # on a Slurm cluster; see "
          "jobs/README.md")
    return 0


def write_examples(target: Path, *, force: bool = False) -> list[Path]:
    """Copy the bundled examples into ``target`` (``jobs/...``, ``experiments/...``, and ``runs/``).

    Parameters
    ----------
    target : Path
        The folder to write into; created if missing.
    force : bool
        Overwrite files that differ from the bundled ones. Without it such a file is an error
        and nothing is written.

    Returns
    -------
    list of Path
        The files written (files already equal to the bundled ones are left out).

    Raises
    ------
    ConfigError
        If files in ``target`` differ from the bundled ones and ``force`` is false, or no
        examples are bundled.
    """
    files = example_files()
    if not files:
        raise ConfigError(f"this installation of hflmpi has no examples (nothing under "
                          f"{EXAMPLES}); reinstall it")
    todo = [rel for rel in files if not _same(target / rel, EXAMPLES / rel)]
    clashes = [target / rel for rel in todo if (target / rel).exists()]
    if clashes and not force:
        more = f" (and {len(clashes) - 1} more)" if len(clashes) > 1 else ""
        raise ConfigError(f"{clashes[0]}{more} already exists and differs from the bundled "
                          "example; pass --force to overwrite, or choose another DIR")
    for rel in todo:
        (target / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(EXAMPLES / rel, target / rel)
    # Slurm opens the scripts' --output=runs/... before they run: the folder must exist.
    (target / "runs").mkdir(exist_ok=True)
    return [target / rel for rel in todo]


def _same(mine: Path, bundled: Path) -> bool:
    return mine.is_file() and mine.read_bytes() == bundled.read_bytes()
