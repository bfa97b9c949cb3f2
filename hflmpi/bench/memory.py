"""How large a model ``hflmpi bench aggregate`` can time in the memory each rank has.

Each rank holds several copies of the model at once: the raw ``Allreduce`` buffer, the two
hierarchical aggregators (``subtree`` and ``tree``) and gloo's tensor while the float candidates
are timed, and, for each quantized width in turn, the model plus the quantizer's buffers (a layer
leader also receives and sums its children's payloads, so it holds more per layer). The counts
below are float32 model copies per rank, measured as the peak RSS growth (``VmHWM``) of the
busiest rank at 4M parameters, 2-8 ranks, trees ``[2]``, ``[2, 2]``, ``[4, 2]``:

====================  ==================================  ==============================
phase                 measured (busiest rank)             budgeted here (depth d)
====================  ==================================  ==============================
float candidates      raw 1.5, subtree 1.9, tree 3.4,     2 + 2 + 3.5 (+ 2 with gloo)
                      gloo 1.5
one quantized width   raw 1.5 + 6.4 at depth 1,           2 + 7 + 5 (d - 1)
                      + 5 per extra layer
====================  ==================================  ==============================

A whole ``bench aggregate --sizes 4e6 --bits 8,4,2 --no-gloo`` at 4 ranks (tree ``[2, 2]``)
peaked at 14.0 copies on the busiest rank (29.8 when every width's buffers lived at once).

The widths run one after another with their buffers freed in between, so the peak is the
largest phase, not their sum. The memory a rank may use is ``MemAvailable`` (``/proc/meminfo``),
capped by its cgroup's limit (a Slurm job's ``--mem``), divided among the ranks on its node, times
:data:`SAFETY`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

from hflmpi.errors import HflmpiError

__all__ = ["SAFETY", "BenchMemoryError", "copies_per_rank", "max_params", "default_sizes",
           "check_sizes", "available_bytes"]

SAFETY = 0.6  # of the memory a rank may use: the interpreter, torch and MPI need the rest
DEFAULT_SIZES = (1_000_000, 10_000_000, 25_000_000)
_FLOAT_COPIES = {"raw": 2.0, "subtree": 2.0, "tree": 3.5, "gloo": 2.0}
_QUANT_FIRST_LAYER, _QUANT_PER_LAYER = 7.0, 5.0
_SMALLEST = 1000


class BenchMemoryError(HflmpiError, ValueError):
    """The requested model sizes do not fit in the memory each rank has."""


def copies_per_rank(depth: int, bits: Sequence[int], gloo: bool) -> float:
    """Return the peak number of float32 model copies one rank holds (see the module table)."""
    floats = sum(v for k, v in _FLOAT_COPIES.items() if gloo or k != "gloo")
    quantized = _FLOAT_COPIES["raw"] + _QUANT_FIRST_LAYER + _QUANT_PER_LAYER * (depth - 1)
    return max(floats, quantized) if bits else floats


def max_params(budget_bytes: float, depth: int, bits: Sequence[int], gloo: bool) -> int:
    """Return the largest parameter count whose copies fit in ``budget_bytes`` per rank."""
    return max(0, int(budget_bytes // (4 * copies_per_rank(depth, bits, gloo))))


def default_sizes(limit: int) -> list[int]:
    """Return the default sizes (1M, 10M, 25M) that fit under ``limit``, or one smaller size.

    When not even 1M fits, the one size is ``limit`` rounded down to two significant digits.

    Raises
    ------
    BenchMemoryError
        If ``limit`` is below 1000 parameters.
    """
    fitting = [s for s in DEFAULT_SIZES if s <= limit]
    if fitting:
        return fitting
    if limit < _SMALLEST:
        raise BenchMemoryError(f"only {limit} parameters fit in the memory each rank has; "
                               "free memory or run fewer ranks per node")
    scale = 10 ** max(0, int(math.log10(limit)) - 1)
    return [limit // scale * scale]


def check_sizes(sizes: Sequence[int], limit: int, budget_bytes: float, per_param: float) -> None:
    """Raise :class:`BenchMemoryError` naming the first size above ``limit`` (before allocating)."""
    for size in sizes:
        if size < 1:
            raise BenchMemoryError(f"--sizes has {size}; every size must be a positive count")
        if size > limit:
            raise BenchMemoryError(
                f"--sizes {size:,} needs about {size * per_param / 2**30:.1f} GiB per rank "
                f"({per_param / 4:.1f} float32 copies of the model), but each rank may use "
                f"{budget_bytes / 2**30:.2f} GiB; the largest that fits is {limit:,}: give smaller "
                "--sizes, fewer --bits, fewer ranks per node or more memory")


def _meminfo_available(meminfo: Path) -> float:
    for line in meminfo.read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return float(line.split()[1]) * 1024
    raise OSError(f"{meminfo} has no MemAvailable line")


def _cgroup_room(root: Path, cgroup_file: Path) -> float:
    """Return the limit minus usage of this process's memory cgroup (v2 or v1); inf if none."""
    room = math.inf
    try:
        lines = cgroup_file.read_text().splitlines()
    except OSError:
        return room
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # v2
            pairs = [("memory.max", "memory.current")]
            folders = [root / path.lstrip("/"), root]
        elif "memory" in controllers.split(","):
            pairs = [("memory.limit_in_bytes", "memory.usage_in_bytes")]
            folders = [root / "memory" / path.lstrip("/"), root / "memory"]
        else:
            continue
        for folder in folders:
            for limit_name, usage_name in pairs:
                try:
                    limit = (folder / limit_name).read_text().strip()
                    usage = float((folder / usage_name).read_text().strip())
                except (OSError, ValueError):
                    continue
                if limit.isdigit() and int(limit) < 2**60:
                    room = min(room, float(limit) - usage)
    return room


def available_bytes(
    ranks_on_node: int, meminfo: Path = Path("/proc/meminfo"), cgroup_root: Path = Path("/sys/fs/cgroup"),
    cgroup_file: Path = Path("/proc/self/cgroup"),
) -> float:
    """Return the bytes one rank may use: free memory (cgroup-capped) / ranks on its node * SAFETY."""
    free = min(_meminfo_available(meminfo), _cgroup_room(cgroup_root, cgroup_file))
    return max(0.0, free) / max(1, ranks_on_node) * SAFETY
