"""The package layout holds its rules: the folder says the role, only the wiring talks MPI.

Checked on the source (AST), so a new module that breaks a rule fails here, not in review.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "hflmpi"
# Where mpi4py may be imported: the wiring, the round loop's entry points, commands and tools.
MPI_ALLOWED = ("mpi/", "cli/", "bench/", "experiments/runner.py", "federation.py", "__main__.py")
PURE = ("core/", "learn/", "record/")


def _modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def _imported(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def _relative(path: Path) -> str:
    return path.relative_to(PACKAGE).as_posix()


def test_only_the_wiring_loop_commands_and_tools_import_mpi4py():
    offenders = [
        _relative(p) for p in _modules()
        if any(n == "mpi4py" or n.startswith("mpi4py.") for n in _imported(p))
        and not _relative(p).startswith(MPI_ALLOWED)
    ]
    assert offenders == [], f"these modules import mpi4py outside the wiring: {offenders}"


@pytest.mark.parametrize("folder", PURE)
def test_pure_packages_import_neither_mpi_nor_the_wiring(folder):
    for path in (PACKAGE / folder).rglob("*.py"):
        bad = {n for n in _imported(path)
               if n.startswith(("mpi4py", "hflmpi.mpi", "hflmpi.federation", "hflmpi.cli"))}
        assert not bad, f"{_relative(path)} imports {sorted(bad)}"


def test_core_does_not_import_the_record_or_learn_packages():
    for path in (PACKAGE / "core").rglob("*.py"):
        bad = {n for n in _imported(path) if n.startswith(("hflmpi.record", "hflmpi.learn"))}
        assert not bad, f"{_relative(path)} imports {sorted(bad)}"


def test_front_door_names_resolve_without_importing_torch_or_mpi():
    code = (
        "import sys, hflmpi\n"
        "assert 'torch' not in sys.modules and 'mpi4py' not in sys.modules, 'import hflmpi is heavy'\n"
        "missing = [n for n in hflmpi.__all__ if getattr(hflmpi, n, None) is None]\n"
        "assert not missing, missing\n"
        "print(len(hflmpi.__all__))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout) >= 8


def test_unknown_front_door_name_is_an_attribute_error():
    import hflmpi

    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        hflmpi.nope  # noqa: B018
