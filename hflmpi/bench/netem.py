"""An emulated cluster on one machine: fake nodes as network namespaces joined by shaped links.

Shared memory moves bytes at several GB/s, so how a tree or a compressor behaves across a slow
link cannot be seen on one machine as it is. :class:`EmulatedCluster` makes ``nodes`` fake nodes:
each is a network namespace holding one interface, ``hfl0``, the end of a veth pair whose other
end sits on a bridge in a "switch" namespace of its own. Both ends of every link are shaped with a
token bucket (``tc qdisc ... tbf``) at the link rate, so a byte from node A to node B crosses A's
uplink and B's downlink, as through a switch; a latency adds a ``netem`` delay of half of it at
each end (where the kernel has ``sch_netem``). The addresses (``10.213.0.0/24``) exist only inside
these namespaces, so they can collide neither with the host's networks nor with another cluster.

Ranks are launched with an MPMD ``mpiexec``, one part per node, each rank under
``ip netns exec NODE unshare --uts sh -c 'hostname NAME && exec "$@"'``, so
``MPI_Get_processor_name`` returns the fake host's name. MPICH is told to treat every rank as
remote (``MPIR_CVAR_NOLOCAL=1``; otherwise hydra puts all ranks on one node and shared memory
carries everything) and to use its network module over TCP on ``hfl0``. With NOLOCAL,
``MPI_COMM_TYPE_SHARED`` gives every rank a node of its own, so a node-aware tree must group ranks
by processor name (:func:`hflmpi.mpi.comm.node_names` does so when ``MPIR_CVAR_NOLOCAL`` is set).

Every namespace is named ``hflnet-<owner pid>-<tag>-<role>``. Teardown kills what still runs
inside them and deletes them, in ``finally`` and on SIGINT, SIGTERM and SIGHUP; a new cluster
first removes the namespaces of owners that no longer exist (a run killed with SIGKILL).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any, Sequence

from hflmpi.errors import HflmpiError

__all__ = ["EmulatedCluster", "LinkBytes", "NetemError", "available", "parse_link", "read_counters",
           "leftover_namespaces", "remove_stale", "IFACE", "PREFIX", "LAUNCH_ENV"]

PREFIX = "hflnet"
"""Namespace names start with this, then the owner's pid: ``hflnet-<pid>-<tag>-<role>``."""
IFACE = "hfl0"
"""Each node's link interface; the same name in every node namespace."""
SUBNET = "10.213.0"
LAUNCH_ENV = {
    "MPIR_CVAR_NOLOCAL": "1",  # every rank remote: traffic between fake nodes crosses the links
    "MPIR_CVAR_CH4_NETMOD": "ofi",
    "FI_PROVIDER": "tcp",
    "FI_TCP_IFACE": IFACE,
}
"""The environment that keeps MPICH off shared memory and on TCP over the emulated links."""
_QUEUE = "200ms"  # tbf queue bound (not a delay): bulk transfers wait, never drop
_NAME = re.compile(rf"^{PREFIX}-(\d+)-([0-9a-z]+)-(sw|n\d+)$")
_TIMEOUT = 30.0
_UNITS = {"bit": 1, "kbit": 10**3, "mbit": 10**6, "gbit": 10**9, "tbit": 10**12}
_TIMES = {"s": 1.0, "ms": 1e-3, "us": 1e-6}


class NetemError(HflmpiError, RuntimeError):
    """The emulated cluster cannot be made here, or its link was given wrongly."""


@dataclass(frozen=True)
class LinkBytes:
    """Bytes one fake node's link carried since the cluster was made.

    ``sent`` and ``sent_ip`` count what the node sent into the switch, by the token bucket's
    ``tc -s qdisc`` statistics and by the interface's counters (``ip -s link``); ``received``
    counts what the switch delivered to the node (its port's ``tc`` statistics).
    """

    sent: int
    sent_ip: int
    received: int


def parse_link(text: str) -> tuple[int, float]:
    """Parse ``RATE[,LATENCY]`` (e.g. ``"10gbit"``, ``"1gbit,200us"``) into bit/s and seconds.

    Rates take tc's units (bit, kbit, mbit, gbit, tbit); the latency, node to node one way, takes
    s, ms or us.

    Raises
    ------
    NetemError
        If either part does not parse or the rate is not positive.
    """
    rate_text, _, latency_text = text.strip().lower().partition(",")
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(bit|kbit|mbit|gbit|tbit)", rate_text.strip())
    if match is None or float(match[1]) <= 0:
        raise NetemError(f"--link {text!r}: the rate must be a positive number with one of "
                         f"{', '.join(_UNITS)} (e.g. 1gbit or 10gbit,100us)")
    rate = int(float(match[1]) * _UNITS[match[2]])
    latency = 0.0
    if latency_text.strip():
        found = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(s|ms|us)", latency_text.strip())
        if found is None:
            raise NetemError(f"--link {text!r}: the latency after the comma must be a number "
                             "with s, ms or us (e.g. 1gbit,200us)")
        latency = float(found[1]) * _TIMES[found[2]]
    return rate, latency


def _run(args: Sequence[str], check: bool = True) -> subprocess.CompletedProcess[str]:
    try:
        done = subprocess.run(list(args), capture_output=True, text=True, timeout=_TIMEOUT)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise NetemError(f"`{' '.join(args)}` failed: {exc}") from exc
    if check and done.returncode != 0:
        raise NetemError(f"`{' '.join(args)}` failed: {done.stderr.strip() or done.returncode}")
    return done


def read_counters(iface: str = IFACE, namespace: str | None = None) -> tuple[int, int, int]:
    """Return ``(tc sent, ip sent, ip received)`` bytes of ``iface`` (in ``namespace``).

    The first is the ``Sent`` count of the interface's root qdisc (``tc -s qdisc show``), the
    others its transmit and receive counters (``ip -s link``). Without ``namespace`` it reads the
    namespace the caller runs in (a rank inside a fake node reads its own node's link).
    """
    where = ["-n", namespace] if namespace else []
    qdiscs = json.loads(_run(["tc", *where, "-s", "-j", "qdisc", "show", "dev", iface]).stdout)
    roots = [q for q in qdiscs if q.get("root")]
    if not roots:
        raise NetemError(f"{iface} has no root qdisc (is this inside an emulated node?)")
    link = json.loads(_run(["ip", *where, "-s", "-j", "link", "show", "dev", iface]).stdout)
    stats = link[0]["stats64"]
    return int(roots[0]["bytes"]), int(stats["tx"]["bytes"]), int(stats["rx"]["bytes"])


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def leftover_namespaces(owner: int | None = None) -> list[str]:
    """Return the namespaces made by emulated clusters (of the process ``owner`` if given)."""
    if shutil.which("ip") is None:
        return []
    listed = _run(["ip", "netns", "list"], check=False).stdout.splitlines()
    names = [line.split()[0] for line in listed if line.strip()]
    return [n for n in names if _owner(n) is not None and owner in (None, _owner(n))]


def _owner(namespace: str) -> int | None:
    """Return the pid in an emulated cluster's namespace name, or None for other namespaces."""
    match = _NAME.match(namespace)
    return int(match[1]) if match else None


def _remove(namespace: str) -> None:
    """Kill what runs inside ``namespace`` (processes of our own runs), then delete it."""
    deadline = time.monotonic() + _TIMEOUT
    while time.monotonic() < deadline:
        pids = [int(p) for p in _run(["ip", "netns", "pids", namespace], check=False).stdout.split()]
        if not pids:
            break
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.05)
    _run(["ip", "netns", "delete", namespace], check=False)


def remove_stale() -> list[str]:
    """Delete the namespaces of emulated clusters whose owning process no longer exists."""
    stale = [n for n in leftover_namespaces() if not _pid_alive(_owner(n) or 0)]
    for name in stale:
        _remove(name)
    return stale


def _mpi_flavour(mpiexec: str) -> str:
    try:
        out = subprocess.run([mpiexec, "--version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unusable ({exc})"
    text = out.stdout + out.stderr
    if "HYDRA" in text:
        return "mpich"
    return "open-mpi" if "Open MPI" in text or "OpenRTE" in text else "unknown"


def available(mpiexec: str | os.PathLike[str] | None = None) -> tuple[bool, str]:
    """Tell whether an emulated cluster can be made here, and if not, why.

    Checks Linux, root, the tools (``ip``, ``tc``, ``unshare``, ``hostname``), MPICH's launcher
    (the flags here are MPICH's; Open MPI would need ``--mca btl tcp,self --mca
    btl_tcp_if_include hfl0`` and is not supported), and then really makes and removes a
    namespace with a shaped veth pair and a UTS namespace (containers often refuse these).

    Returns
    -------
    (bool, str)
        ``(True, "")``, or ``(False, reason)``.
    """
    if not sys.platform.startswith("linux"):
        return False, "network namespaces are Linux-only"
    if os.geteuid() != 0:
        return False, "needs root (network namespaces and tc shaping)"
    missing = [tool for tool in ("ip", "tc", "unshare", "hostname") if shutil.which(tool) is None]
    if missing:
        return False, f"missing tools: {', '.join(missing)} (iproute2, util-linux)"
    launcher = str(mpiexec or Path(sys.executable).with_name("mpiexec"))
    flavour = _mpi_flavour(launcher)
    if flavour != "mpich":
        return False, (f"{launcher} is {flavour}, not MPICH's hydra; the emulation launches with "
                       "MPICH's MPMD syntax and MPIR_CVAR_* settings (Open MPI would need "
                       "--mca btl tcp,self --mca btl_tcp_if_include hfl0: not supported)")
    probe = f"{PREFIX}-{os.getpid()}-probe{secrets.token_hex(2)}-sw"
    try:
        _run(["ip", "netns", "add", probe])
        _run(["ip", "-n", probe, "link", "add", "hflprobe0", "type", "veth", "peer", "name",
              "hflprobe1"])
        _run(["tc", "-n", probe, "qdisc", "add", "dev", "hflprobe0", "root", "tbf", "rate", "1gbit",
              "burst", "1mb", "latency", _QUEUE])
        _run(["ip", "netns", "exec", probe, "unshare", "--uts", "hostname", "probe"])
    except NetemError as exc:
        return False, f"this machine refuses the emulation: {exc}"
    finally:
        _run(["ip", "netns", "delete", probe], check=False)
    return True, ""


def _netem_delay(namespace: str, dev: str, seconds: float) -> None:
    try:
        _run(["tc", "-n", namespace, "qdisc", "add", "dev", dev, "parent", "1:1", "handle", "10:",
              "netem", "delay", f"{seconds * 1e6:.0f}us"])
    except NetemError as exc:
        raise NetemError(f"a link latency needs the kernel's sch_netem, which refused ({exc}); "
                         "give the rate alone, e.g. --link 1gbit") from exc


class EmulatedCluster:
    """``nodes`` fake nodes on this machine, ``ranks_per_node`` MPI ranks each (context manager).

    Parameters
    ----------
    nodes : int
        Fake nodes (>= 2), each a network namespace and host name ``node0``, ``node1``, ...
    ranks_per_node : int
        MPI ranks launched on each node by :meth:`command`.
    rate : int
        Link rate in bit/s, each direction of every node's link.
    latency : float
        One-way node-to-node latency in seconds (0: none; needs ``sch_netem``).
    mpiexec : path, optional
        MPICH's launcher; default the one next to this Python.

    Examples
    --------
    >>> with EmulatedCluster(2, 2, rate=10**9) as cluster:  # doctest: +SKIP
    ...     subprocess.run(cluster.command([sys.executable, "app.py"]), env=cluster.env())
    ...     print(cluster.link_bytes())
    """

    def __init__(self, nodes: int, ranks_per_node: int, rate: int, latency: float = 0.0,
                 mpiexec: str | os.PathLike[str] | None = None) -> None:
        if nodes < 2 or ranks_per_node < 1:
            raise NetemError(f"an emulated cluster needs >= 2 nodes and >= 1 rank per node, got "
                             f"{nodes} nodes x {ranks_per_node} ranks")
        if nodes > 250:
            raise NetemError(f"{nodes} nodes do not fit the emulated /24 subnet; use <= 250")
        self.nodes, self.ranks_per_node = nodes, ranks_per_node
        self.rate, self.latency = rate, latency
        self.mpiexec = str(mpiexec or Path(sys.executable).with_name("mpiexec"))
        base = f"{PREFIX}-{os.getpid()}-{secrets.token_hex(3)}"
        self.switch = f"{base}-sw"
        self.namespaces = [f"{base}-n{i}" for i in range(nodes)]
        self.hostnames = [f"node{i}" for i in range(nodes)]
        self._made: list[str] = []
        self._handlers: dict[int, Any] = {}

    def __enter__(self) -> "EmulatedCluster":
        self._catch_signals()
        try:
            remove_stale()
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _catch_signals(self) -> None:
        """Turn SIGTERM and SIGHUP into SystemExit (SIGINT is KeyboardInterrupt) so teardown runs."""
        try:
            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                self._handlers[sig] = signal.signal(sig, _raise_exit)
        except ValueError:  # not the main thread: the caller's own finally must do
            self._handlers.clear()

    def _build(self) -> None:
        burst = max(1 << 20, self.rate // 8 // 1000)  # >= 1 ms of traffic: the rate holds at 25 Gbit/s
        shape = ["tbf", "rate", f"{self.rate}bit", "burst", str(burst), "latency", _QUEUE]
        self._add_namespace(self.switch)
        _run(["ip", "-n", self.switch, "link", "add", "br0", "type", "bridge"])
        _run(["ip", "-n", self.switch, "link", "set", "br0", "up"])
        for i, ns in enumerate(self.namespaces):
            self._add_namespace(ns)
            port = f"p{i}"
            _run(["ip", "-n", self.switch, "link", "add", port, "type", "veth", "peer", "name",
                  IFACE, "netns", ns])
            _run(["ip", "-n", self.switch, "link", "set", port, "master", "br0", "up"])
            _run(["ip", "-n", ns, "addr", "add", f"{SUBNET}.{i + 1}/24", "dev", IFACE])
            _run(["ip", "-n", ns, "link", "set", IFACE, "up"])
            _run(["ip", "-n", ns, "link", "set", "lo", "up"])
            for where, dev in ((ns, IFACE), (self.switch, port)):
                _run(["tc", "-n", where, "qdisc", "add", "dev", dev, "root", "handle", "1:", *shape])
                if self.latency > 0:
                    _netem_delay(where, dev, self.latency / 2)

    def _add_namespace(self, name: str) -> None:
        _run(["ip", "netns", "add", name])
        self._made.append(name)

    def close(self) -> None:
        """Kill what runs inside the namespaces and delete them (idempotent; signals held off)."""
        held = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}
        signal.pthread_sigmask(signal.SIG_BLOCK, held)
        try:
            while self._made:
                _remove(self._made.pop())
        finally:
            for sig, handler in self._handlers.items():
                signal.signal(sig, handler)
            self._handlers.clear()
            signal.pthread_sigmask(signal.SIG_UNBLOCK, held)  # a signal that came now acts now

    def env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """Return ``base`` (default: this process's environment) plus :data:`LAUNCH_ENV`."""
        return {**(os.environ if base is None else base), **LAUNCH_ENV}

    def command(self, argv: Sequence[str]) -> list[str]:
        """Return the MPMD ``mpiexec`` command running ``argv`` as every rank, node by node.

        Ranks ``k * ranks_per_node ... (k + 1) * ranks_per_node - 1`` run on node ``k``.
        """
        cmd = [self.mpiexec]
        for k, (ns, host) in enumerate(zip(self.namespaces, self.hostnames)):
            cmd += [":"] if k else []
            cmd += ["-n", str(self.ranks_per_node), "ip", "netns", "exec", ns, "unshare", "--uts",
                    "sh", "-c", 'hostname "$0" && exec "$@"', host, *argv]
        return cmd

    def link_bytes(self) -> dict[str, LinkBytes]:
        """Return, per host name, the bytes its link carried since the cluster was made."""
        out = {}
        for i, (ns, host) in enumerate(zip(self.namespaces, self.hostnames)):
            sent, sent_ip, _ = read_counters(IFACE, ns)
            received = read_counters(f"p{i}", self.switch)[0]
            out[host] = LinkBytes(sent=sent, sent_ip=sent_ip, received=received)
        return out

    def describe(self) -> str:
        """Return one line saying what was emulated."""
        delay = f", {self.latency * 1e6:.0f} us one way" if self.latency else ""
        return (f"{self.nodes} emulated nodes x {self.ranks_per_node} ranks, links "
                f"{self.rate / 1e9:g} Gbit/s{delay} (tc tbf on both ends, bridge between)")


def _raise_exit(signum: int, frame: FrameType | None) -> None:
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    raise SystemExit(128 + signum)
