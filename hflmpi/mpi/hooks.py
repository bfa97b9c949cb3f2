"""Calling the user's callbacks from the round loop without letting one rank's error hang the rest.

The ranks agree once, at set-up, on which hook points any rank has callbacks for (ranks may hold
different callbacks, e.g. a writer on rank 0 only); at each such point every rank runs its own
callbacks under :func:`hflmpi.mpi.guard.agree`, so an exception on one rank is raised on all of
them before anyone enters the next collective. See :mod:`hflmpi.callbacks` for the user's side.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from mpi4py import MPI

from hflmpi.callbacks import HOOKS, CallbackList
from hflmpi.importing import import_object
from hflmpi.mpi.guard import Watchdog, agree
from hflmpi.mpi.messages import allgather_text

__all__ = ["Hooks"]


@dataclass
class Hooks:
    """One rank's callbacks and, per hook point, whether any rank has a callback for it.

    Attributes
    ----------
    callbacks : CallbackList
        This rank's callbacks: those ``run.callbacks`` names, then those passed in.
    aggregation, round_end : bool
        Whether any rank has an ``on_aggregation`` / ``on_round_end`` callback (equal on every
        rank; the round loop calls :meth:`call` at exactly these points, on every rank).
    """

    callbacks: CallbackList
    aggregation: bool
    round_end: bool

    @classmethod
    def build(cls, comm: MPI.Comm, named: Sequence[str], given: Sequence[Any]) -> Hooks:
        """Build the ``named`` callbacks (import paths), add ``given``; agree on the hooks (all ranks)."""
        def build() -> CallbackList:
            built = []
            for path in named:
                factory = import_object(path, "run.callbacks")
                if not callable(factory):
                    raise ValueError(f"run.callbacks entry {path!r} is not callable; name a class "
                                     "or a function returning a callback")
                built.append(factory())
            return CallbackList([*built, *given])

        callbacks = agree(comm, "building the callbacks", build)
        masks = allgather_text(comm, callbacks.mask(), max_bytes=len(HOOKS),
                               what="sharing which callback hooks each rank has")
        wanted = [any(m is not None and m[i : i + 1] == "1" for m in masks) for i in range(len(HOOKS))]
        return cls(callbacks, *wanted)

    def call(self, comm: MPI.Comm, watchdog: Watchdog, hook: str, info: Any, what: str) -> None:
        """Run this rank's ``hook`` callbacks; a failure on any rank raises on every rank (all ranks)."""
        with watchdog.guard(what):
            agree(comm, what, lambda: self.callbacks.call(hook, info))

    def close(self) -> None:
        """Close this rank's callbacks (never raises; see :meth:`CallbackList.close`)."""
        self.callbacks.close()
