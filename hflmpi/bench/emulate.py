"""``hflmpi bench aggregate --emulate-nodes N``: the aggregation benchmark across emulated nodes.

The command re-launches itself inside an :class:`hflmpi.bench.netem.EmulatedCluster` (one MPMD
``mpiexec``, ``N`` fake nodes of ``--ranks-per-node`` ranks, links shaped to ``--link``) with
``--link-iface hfl0``, a tree of one group per node (unless ``--fanouts`` is given) and without the
gloo baseline (it rendezvouses on 127.0.0.1, which the other nodes cannot reach).

Bytes per candidate come from one launch, not one launch per candidate: after the interleaved
timing, every candidate runs once more between two barriers while the first rank of each node
reads its own link's ``tc`` counter before and after; the sum over nodes, less what the two
barriers alone send (measured the same way), is the candidate's row. One launch keeps the time
ratios interleaved (this machine's speed drifts) and the counting free of start-up traffic.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from typing import Callable, Sequence

from mpi4py import MPI

from hflmpi.bench.netem import IFACE, EmulatedCluster, NetemError, available, parse_link, read_counters
from hflmpi.errors import report_user_error
from hflmpi.mpi.comm import node_names
from hflmpi.mpi.messages import allreduce_int

__all__ = ["LinkMeter", "run_emulated", "format_link_rows"]


class LinkMeter:
    """Count the bytes that cross the emulated links while a callable runs (collective).

    Parameters
    ----------
    comm : MPI.Comm
        All ranks of the emulated cluster.
    iface : str
        The link interface inside each node's namespace (:data:`hflmpi.bench.netem.IFACE`).
    """

    def __init__(self, comm: MPI.Comm, iface: str) -> None:
        names = node_names(comm)
        rank = comm.Get_rank()
        self.comm, self.iface = comm, iface
        self.reads = names.index(names[rank]) == rank  # one reader per node: its first rank

    def _read(self) -> tuple[int, int, int]:
        return read_counters(self.iface) if self.reads else (0, 0, 0)

    def measure(self, run: Callable[[], object]) -> tuple[int, int, int]:
        """Run ``run`` once on every rank and return what the links carried meanwhile.

        Returns
        -------
        (int, int, int)
            Bytes the nodes sent, summed, by ``tc`` and by ``ip`` counters, and the most bytes
            one direction of one link carried (``ip``: a node's sent or received bytes).
        """
        self.comm.Barrier()
        before = self._read()
        run()
        self.comm.Barrier()  # every rank has its result: every byte of the run has crossed
        tc, sent, received = (b - a for a, b in zip(before, self._read()))
        return (allreduce_int(self.comm, tc, MPI.SUM), allreduce_int(self.comm, sent, MPI.SUM),
                allreduce_int(self.comm, max(sent, received), MPI.MAX))

    def per_candidate(self, candidates: dict[str, Callable[[], object]]) -> dict[str, float]:
        """Return ``{name}_link`` (tc), ``{name}_link_ip`` and ``{name}_link_busiest`` bytes.

        One run of each candidate, less what the bracketing barriers alone send.
        """
        idle = self.measure(lambda: None)
        row: dict[str, float] = {}
        for name, run in candidates.items():
            counts = self.measure(run)
            for suffix, count, base in zip(("_link", "_link_ip", "_link_busiest"), counts, idle):
                row[name + suffix] = float(max(0, count - base))
        return row


def format_link_rows(rows: list[dict[str, float]]) -> str:
    """Return the table of bytes that crossed the links, per size and candidate."""
    lines = ["# bytes that crossed the emulated links in one run of each candidate (sum over nodes, "
             "tc qdisc counters; ip link counters as a check), the most one link carried one way "
             "(ip), and time and bytes / float32 Allreduce (a quantized width's time / the Allreduce "
             "timed beside it)",
             f"{'params':>10} {'candidate':>14} {'ms':>9} {'time/raw':>9} {'link MB':>9} "
             f"{'ip MB':>9} {'bytes/raw':>10} {'busiest MB':>11} {'busiest/raw':>12}"]
    for row in rows:
        raw = row["mpi_allreduce"], row["mpi_allreduce_link"], row["mpi_allreduce_link_busiest"]
        for name in [k[:-5] for k in row if k.endswith("_link")]:
            busiest = row[f"{name}_link_busiest"]
            lines.append(
                f"{int(row['numel']):>10} {name:>14} {row[name] * 1e3:>9.2f} "
                f"{row[name] / row.get(f'{name}_raw', raw[0]):>9.3f} {row[f'{name}_link'] / 1e6:>9.2f} "
                f"{row[f'{name}_link_ip'] / 1e6:>9.2f} {_ratio(row[f'{name}_link'], raw[1]):>10.3f} "
                f"{busiest / 1e6:>11.2f} {_ratio(busiest, raw[2]):>12.3f}")
    return "\n".join(lines)


def _ratio(value: float, base: float) -> float:
    return value / base if base else float("nan")


def _inner_args(raw: Sequence[str], nodes: int, ranks_per_node: int) -> list[str]:
    """Return the ``hflmpi bench aggregate`` arguments each emulated rank runs."""
    strip = argparse.ArgumentParser(add_help=False)
    for option in ("--emulate-nodes", "--ranks-per-node", "--link"):
        strip.add_argument(option)
    _, rest = strip.parse_known_args(list(raw))
    rest += ["--link-iface", IFACE]
    if "--no-gloo" not in rest:
        rest.append("--no-gloo")
    if not any(a == "--fanouts" or a.startswith("--fanouts=") for a in rest):
        rest += ["--fanouts", f"{ranks_per_node},{nodes}"]
    return rest


def run_emulated(raw: Sequence[str], nodes: int, ranks_per_node: int, link: str) -> int:
    """Run ``hflmpi bench RAW`` on an emulated cluster; return the launch's exit status.

    ``raw`` is the command line after ``bench`` (``aggregate ...``). Not under mpiexec: this
    process makes the cluster and launches the ranks itself.
    """
    if MPI.COMM_WORLD.Get_size() > 1:
        return report_user_error("bench aggregate", NetemError(
            "--emulate-nodes launches its own mpiexec; run it as a single process, as root"),
            show=MPI.COMM_WORLD.Get_rank() == 0)
    argv = [sys.executable, "-m", "mpi4py", "-m", "hflmpi", "bench",
            *_inner_args(raw, nodes, ranks_per_node)]
    try:
        rate, latency = parse_link(link)
        ok, why = available()
        if not ok:
            raise NetemError(f"cannot emulate nodes here: {why}")
        with EmulatedCluster(nodes, ranks_per_node, rate, latency) as cluster:
            print(f"# {cluster.describe()}", flush=True)
            env = cluster.env({**os.environ, "OMP_NUM_THREADS": "1"})
            code = subprocess.run(cluster.command(argv), env=env).returncode
            totals = cluster.link_bytes()
    except NetemError as exc:  # a refused set-up (e.g. no sch_netem for a latency): gone already
        return report_user_error("bench aggregate", exc)
    print("# whole launch (start-up included), per node: sent (tc / ip) and received bytes: " + ", ".join(
        f"{host} {b.sent / 1e6:.1f} / {b.sent_ip / 1e6:.1f} MB sent, {b.received / 1e6:.1f} MB received"
        for host, b in totals.items()), flush=True)
    return code
