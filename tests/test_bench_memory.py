"""``hflmpi bench aggregate`` fits the memory it has and streams its rows.

Serial: the sizing arithmetic (hflmpi.bench.memory) against hand-computed budgets, on fake
``/proc/meminfo`` and cgroup files. Under MPI: every phase's row is handed out as soon as it is
measured. As a job: a crash in the middle still leaves the rows measured before it on stdout.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import MPIEXEC

from hflmpi.bench.memory import (
    SAFETY,
    BenchMemoryError,
    available_bytes,
    check_sizes,
    copies_per_rank,
    default_sizes,
    max_params,
)

GIB = 2**30


def _meminfo(tmp_path, kib: int):
    path = tmp_path / "meminfo"
    path.write_text(f"MemTotal:       99999999 kB\nMemFree:  1 kB\nMemAvailable:   {kib} kB\n")
    return path


def test_copies_take_the_largest_phase_not_the_sum():
    # float phase: raw 2 + subtree 2 + tree 3.5 (+ gloo 2); one width at depth d: 2 + 7 + 5 (d - 1)
    assert copies_per_rank(1, [], gloo=True) == 9.5
    assert copies_per_rank(1, [], gloo=False) == 7.5
    assert copies_per_rank(1, [8, 4, 2], gloo=True) == 9.5  # 9 per width < the float phase
    assert copies_per_rank(1, [8, 4, 2], gloo=False) == 9.0
    assert copies_per_rank(2, [8, 4, 2], gloo=True) == 14.0  # the same as one width
    assert copies_per_rank(3, [8], gloo=False) == 19.0


def test_max_params_and_default_sizes():
    budget = 4 * 14.0 * 10_000_000  # exactly 10M parameters at depth 2 with bits
    assert max_params(budget, 2, [8], True) == 10_000_000
    assert max_params(budget - 1, 2, [8], True) == 9_999_999
    assert default_sizes(30_000_000) == [1_000_000, 10_000_000, 25_000_000]
    assert default_sizes(10_000_000) == [1_000_000, 10_000_000]
    assert default_sizes(987_654) == [980_000]
    assert default_sizes(1234) == [1200]
    with pytest.raises(BenchMemoryError, match="only 999 parameters fit"):
        default_sizes(999)


def test_a_size_above_the_limit_is_refused_naming_the_limit():
    check_sizes([1000, 5000], 5000, 1.0 * GIB, 54.0)
    with pytest.raises(BenchMemoryError, match=r"--sizes 25,000,000 needs about 1\.3 GiB per rank "
                       r"\(13\.5 float32 copies.*may use 0\.50 GiB; the largest that fits is 9,000,000"):
        check_sizes([1000, 25_000_000], 9_000_000, 0.5 * GIB, 54.0)
    with pytest.raises(BenchMemoryError, match="positive"):
        check_sizes([0], 10, 1.0, 54.0)


def test_available_bytes_divides_free_memory_among_the_node_ranks(tmp_path):
    meminfo = _meminfo(tmp_path, 8 * 1024 * 1024)  # 8 GiB available
    none = tmp_path / "no-cgroup"
    assert available_bytes(4, meminfo, tmp_path, none) == 8 * GIB / 4 * SAFETY


@pytest.mark.parametrize("version", [1, 2])
def test_a_cgroup_limit_below_free_memory_caps_the_budget(tmp_path, version):
    meminfo = _meminfo(tmp_path, 64 * 1024 * 1024)  # the node has 64 GiB free; the job may use 3
    root = tmp_path / "cgroup"
    if version == 2:
        folder, names, line = root / "slurm/job_7", ("memory.max", "memory.current"), "0::/slurm/job_7"
    else:
        folder, names = root / "memory/slurm/job_7", ("memory.limit_in_bytes", "memory.usage_in_bytes")
        line = "4:memory:/slurm/job_7\n3:cpu,cpuacct:/slurm/job_7"
    folder.mkdir(parents=True)
    (folder / names[0]).write_text(f"{4 * GIB}\n")
    (folder / names[1]).write_text(f"{GIB}\n")
    cgroup = tmp_path / "self-cgroup"
    cgroup.write_text(line + "\n")
    assert available_bytes(2, meminfo, root, cgroup) == 3 * GIB / 2 * SAFETY
    (folder / names[0]).write_text("max\n")  # no limit: free memory decides
    assert available_bytes(2, meminfo, root, cgroup) == 64 * GIB / 2 * SAFETY


@pytest.mark.mpi
def test_each_phase_is_handed_out_as_soon_as_it_is_measured(comm):
    from hflmpi.bench.aggregate import bench_aggregate, default_fanouts
    from hflmpi.core.topology import plan_fanouts

    plan = plan_fanouts(default_fanouts(comm.Get_size()), comm.Get_size())
    seen: list[tuple[int, int | None, tuple[str, ...]]] = []
    rows = bench_aggregate(comm, [600, 1000], plan, repeats=1, gloo=False, bits=[8, 2],
                           emit=lambda row, width: seen.append((int(row["numel"]), width, tuple(row))))
    assert [(n, w) for n, w, _ in seen] == [(600, None), (600, 8), (600, 2),
                                             (1000, None), (1000, 8), (1000, 2)]
    assert "q8" not in seen[0][2] and "q8_raw" in seen[1][2] and "q2" not in seen[1][2]
    assert set(seen[2][2]) == set(rows[0]) and rows[1]["q2_bytes"] > 0


CRASH_ON_SECOND_SIZE = """
import sys
import hflmpi.bench.aggregate as bench
original = bench.HierarchicalAggregator
class Crash(original):
    def __init__(self, comms, model, **kwargs):
        if model.numel() == 2000 and kwargs.get("bits"):
            raise MemoryError("simulated: out of memory at 2000 parameters, 8 bits")
        super().__init__(comms, model, **kwargs)
bench.HierarchicalAggregator = Crash
from hflmpi.cli import main
sys.exit(main(["bench", "aggregate", "--sizes", "1000,2000", "--bits", "8", "--repeats", "1",
               "--no-gloo"]))
"""


@pytest.mark.skipif(not MPIEXEC.exists(), reason="no mpiexec next to this python")
def test_a_crash_leaves_the_rows_measured_before_it(tmp_path):
    script = tmp_path / "crash.py"
    script.write_text(CRASH_ON_SECOND_SIZE)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(sys.path))
    proc = subprocess.run([str(MPIEXEC), "-n", "2", sys.executable, "-m", "mpi4py", str(script)],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode != 0 and "simulated: out of memory" in proc.stderr, proc.stderr
    rows = [line.split() for line in proc.stdout.splitlines() if not line.startswith("#")]
    numbers = [r for r in rows if r and r[0].isdigit()]
    assert [r[0] for r in numbers] == ["1000", "1000", "2000"], proc.stdout  # floats, 8 bits, floats
    assert numbers[1][1] == "8" and len(numbers[0]) == 8
    assert "# memory: each rank may use" in proc.stdout
