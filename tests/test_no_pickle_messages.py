"""No module of hflmpi may call a pickle-based (lower-case) mpi4py communication method.

mpi4py's lower-case methods (``comm.bcast(obj)``, ``comm.allreduce(1.0)``, ...) pickle the object on
the sending rank and *unpickle* it on the receiving rank: any rank could run code on any other by
sending a crafted pickle. Every message between ranks must be a typed buffer (upper-case methods,
:mod:`hflmpi.mpi.messages`). This test scans the syntax tree of every module under ``hflmpi/`` and
fails on any attribute call whose name is one of those methods, whatever the receiver: a receiver
cannot be proven to be something other than a communicator by looking at the source, so a
non-MPI method of the same name (``torch.Tensor.gather``) must be listed, with its receiver and
reason, in :data:`ALLOWED`.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "hflmpi"

# Every lower-case method of mpi4py's Comm / Intracomm / Intercomm / Topocomm / Message that sends
# or receives a pickled Python object (mpi4py 4.1 MPI.pyi). ``barrier``, ``probe`` and
# ``iprobe`` are lower-case but carry no object, and are not listed.
PICKLE_METHODS = frozenset({
    "allgather", "allreduce", "alltoall", "bcast", "bsend", "exscan", "gather", "ibsend",
    "improbe", "irecv", "isend", "issend", "mprobe", "neighbor_allgather", "neighbor_alltoall",
    "recv", "reduce", "scan", "scatter", "send", "sendrecv", "ssend",
})

# (module, receiver source, method) -> why it is not an mpi4py call. Keep it short and exact.
ALLOWED: dict[tuple[str, str, str], str] = {
    ("core/robust.py", "values", "gather"): "torch.Tensor.gather(dim, index) on the sorted updates",
    ("core/robust.py", "cumulative", "gather"): "torch.Tensor.gather(dim, index) on cumulative weights",
    ("learn/batched.py", "log_probs", "gather"): "torch.Tensor.gather(dim, index): the label's log-probability",
    ("learn/stacked.py", "log_probs", "gather"): "torch.Tensor.gather(dim, index): the label's log-probability",
}


def pickle_calls(source: str, module: str) -> list[tuple[int, str, str]]:
    """Return ``(line, receiver, method)`` of every call to a listed method not in :data:`ALLOWED`."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                and node.func.attr in PICKLE_METHODS:
            receiver = ast.unparse(node.func.value)
            if (module, receiver, node.func.attr) not in ALLOWED:
                found.append((node.lineno, receiver, node.func.attr))
    return sorted(found)


def test_no_pickle_based_mpi_calls_in_hflmpi():
    modules = sorted(PACKAGE.rglob("*.py"))
    assert len(modules) > 20, f"found only {len(modules)} modules under {PACKAGE}"
    offenders = [
        f"hflmpi/{path.relative_to(PACKAGE)}:{line}: {receiver}.{method}(...)"
        for path in modules
        for line, receiver, method in pickle_calls(path.read_text(), str(path.relative_to(PACKAGE)))
    ]
    assert not offenders, (
        "pickle-based mpi4py calls (a receiving rank unpickles what another rank sent, which can "
        "run arbitrary code); send typed buffers with hflmpi.mpi.messages instead:\n  "
        + "\n  ".join(offenders)
    )


def test_allowlist_entries_are_still_used():
    """Each allowlisted call must still exist, so stale entries cannot hide a new call."""
    used = set()
    for path in PACKAGE.rglob("*.py"):
        module = str(path.relative_to(PACKAGE))
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                used.add((module, ast.unparse(node.func.value), node.func.attr))
    assert set(ALLOWED) <= used, f"unused ALLOWED entries: {sorted(set(ALLOWED) - used)}"


def test_scanner_catches_the_shapes_of_pickle_calls():
    """The scanner itself: every spelling of a communicator call is caught; the allowlist is exact."""
    source = "\n".join([
        "comm.bcast(x, root=0)",
        "self.comms.subtree(1).allreduce(float(w), op=MPI.SUM)",
        "MPI.COMM_WORLD.gather(obj)",
        "MPI.Comm.allgather(comm, obj)",
        "local.scatter(items, root=0)",
        "comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)",  # buffer API: fine
        "comm.barrier()",  # no object
        "values.gather(0, first)",  # allowed in robust.py only
    ])
    lines = [line for line, _, _ in pickle_calls(source, "mpi/aggregate.py")]
    assert lines == [1, 2, 3, 4, 5, 8]
    assert [line for line, _, _ in pickle_calls(source, "core/robust.py")] == [1, 2, 3, 4, 5]
