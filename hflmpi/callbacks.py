"""Callbacks: user code called by the round loop after every aggregation and every round.

A callback is any object with some of these methods (subclassing :class:`Callback` is optional)::

    on_aggregation(info: AggregationInfo)   # every rank, after each aggregation of its subtree
    on_round_end(info: RoundInfo)           # every rank, after each global round
    close()                                 # every rank, once when the run ends (also on errors)

Pass them to :func:`hflmpi.train` (``callbacks=[...]``), or name them in the config as
``run.callbacks = ["package.module:name"]``: each name is called with no arguments on every rank
and must return a callback (a class, or a function returning an instance).

Where they run
    Every rank calls its own callbacks, and the ranks may hold different ones (e.g. a writer on
    rank 0 only): the ranks agree once at start-up on which hooks any rank has, and only those
    hook points cost a collective. ``RoundInfo.metrics`` (the row the run file records) exists on
    rank 0 only; ``None`` elsewhere.

Errors
    An exception in a callback on any rank stops the run on every rank at that hook point, with
    one error naming the rank, the callback and the exception (:class:`CallbackError`; the command
    line exits 2), never a hang: the outcome is shared through
    :func:`hflmpi.mpi.guard.agree` before any rank goes on to the next collective.

With a population (``clients.count > 0``)
    The same hooks, on every rank, at the same points; a rank holds many clients, so the model
    after an aggregation is the one this rank's lowest client starts its next period from, the
    round's ``train_loss`` is the participants' weighted mean, and ``dropped`` is empty (see
    :mod:`hflmpi.population_callbacks`).

The model
    ``info.model()`` and ``info.parameters()`` return copies on the CPU (made only when called),
    so a callback cannot change the run. After a layer-``n`` aggregation a rank holds its
    layer-``n`` subtree's model; after a round, the global model (identical on every rank).
"""

from __future__ import annotations

import logging
import math
import numbers
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hflmpi.errors import HflmpiError
from hflmpi.learn.flat import detached_copy

__all__ = [
    "Callback",
    "CallbackError",
    "AggregationInfo",
    "RoundInfo",
    "CallbackList",
    "TensorBoard",
    "HOOKS",
    "scalars",
]

HOOKS = ("on_aggregation", "on_round_end")
"""The hook points, in the order of the mask the ranks agree on."""

_log = logging.getLogger(__name__)


class CallbackError(HflmpiError, RuntimeError):
    """A user callback raised; the message names the callback, the hook and the exception."""


class Callback:
    """A callback that does nothing; subclass it and override the hooks you need."""

    def on_aggregation(self, info: AggregationInfo) -> None:
        """Run after each aggregation this rank takes part in."""

    def on_round_end(self, info: RoundInfo) -> None:
        """Run after each global round."""

    def close(self) -> None:
        """Release what the callback holds (files, writers); called once at the end of the run."""


@dataclass(frozen=True)
class _ModelAccess:
    """Read access to the live model, handed out as copies only."""

    module: nn.Module = field(repr=False)
    flat: torch.Tensor = field(repr=False)

    def model(self) -> nn.Module:
        """Return a copy of the rank's current model on the CPU (an ``nn.Module``)."""
        return detached_copy(self.module)

    def parameters(self) -> torch.Tensor:
        """Return a copy of the rank's current parameters, flat, on the CPU."""
        return self.flat.detach().cpu().clone()


@dataclass(frozen=True)
class AggregationInfo(_ModelAccess):
    """What ``on_aggregation`` sees.

    Attributes
    ----------
    round : int
        The global round (1-based).
    step : int
        The local SGD step within the round after which the aggregation ran (1-based).
    global_step : int
        ``(round - 1) * prod(schedule.tau) + step``.
    layer : int
        The highest layer that aggregated (layers ``1..layer`` did, bottom up).
    depth : int
        Layers in the tree.
    rank, size : int
        This rank and the number of ranks.
    dropped : tuple of int
        Ranks left out of this aggregation (``run.nonfinite = "drop"``), as this rank saw it.
    """

    round: int = 0
    step: int = 0
    global_step: int = 0
    layer: int = 0
    depth: int = 0
    rank: int = 0
    size: int = 1
    dropped: tuple[int, ...] = ()


@dataclass(frozen=True)
class RoundInfo(_ModelAccess):
    """What ``on_round_end`` sees.

    Attributes
    ----------
    round, rounds : int
        The global round just finished (1-based) and the run's last round.
    rank, size : int
        This rank and the number of ranks.
    train_loss : float
        Mean training loss of the round over all devices.
    test_loss, test_accuracy : float
        Of the global model, if this round evaluated it (``run.eval_every``); NaN otherwise.
    metrics : dict or None
        On rank 0, the round's row of the run file (:class:`hflmpi.record.store.RoundMetrics` as
        a dict: scalars, and per-layer lists); ``None`` on the other ranks.
    record_path : Path
        The HDF5 run file (rank 0 writes it).
    """

    round: int = 0
    rounds: int = 0
    rank: int = 0
    size: int = 1
    train_loss: float = math.nan
    test_loss: float = math.nan
    test_accuracy: float = math.nan
    metrics: dict[str, Any] | None = None
    record_path: Path = Path()


def _name(callback: Any) -> str:
    return type(callback).__qualname__


class CallbackList:
    """The callbacks of one rank, called in order; a raising callback becomes a CallbackError."""

    def __init__(self, callbacks: Iterable[Any] = ()) -> None:
        self.callbacks = list(callbacks)
        for callback in self.callbacks:
            if not any(callable(getattr(callback, hook, None)) for hook in (*HOOKS, "close")):
                raise TypeError(f"callback {callback!r} has none of the methods "
                                f"{', '.join(HOOKS)}, close; see hflmpi.callbacks")

    def mask(self) -> str:
        """Return ``"1"``/``"0"`` per hook in :data:`HOOKS`: whether any callback here has it."""
        return "".join("1" if any(callable(getattr(c, hook, None)) for c in self.callbacks) else "0"
                       for hook in HOOKS)

    def call(self, hook: str, info: Any) -> None:
        """Call ``hook(info)`` on every callback that has it."""
        for callback in self.callbacks:
            method = getattr(callback, hook, None)
            if not callable(method):
                continue
            try:
                method(info)
            except Exception as exc:  # any user error ends the run everywhere, not just here
                raise CallbackError(f"callback {_name(callback)}.{hook} raised "
                                    f"{type(exc).__name__}: {exc}") from exc

    def close(self) -> None:
        """Close every callback; a failure is logged, never raised (the run's outcome stands)."""
        for callback in self.callbacks:
            method = getattr(callback, "close", None)
            if callable(method):
                try:
                    method()
                except Exception as exc:  # noqa: BLE001 - reported, must not mask the run's end
                    _log.warning("hflmpi: warning: callback %s.close raised %s: %s",
                                 _name(callback), type(exc).__name__, exc)


class TensorBoard(Callback):
    """Write each round's metrics as TensorBoard scalars (rank 0; needs ``hflmpi[tensorboard]``).

    Parameters
    ----------
    logdir : str or Path, optional
        Event file directory; default: ``RUN.tb`` next to the run file ``RUN.h5``.

    Scalars are tagged by their run-file name (``test_accuracy``, ``train_loss``, ...); per-layer
    metrics as ``NAME/layerN``; the step is the global round. NaN values (rounds not evaluated)
    are left out.
    """

    def __init__(self, logdir: str | Path | None = None) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            raise ImportError("hflmpi.callbacks.TensorBoard needs the tensorboard package: "
                              f"pip install 'hflmpi[tensorboard]' ({exc})") from None
        self._writer_class = SummaryWriter
        self.logdir = None if logdir is None else Path(logdir)
        self._writer: Any = None

    def on_round_end(self, info: RoundInfo) -> None:
        """Write the round's scalars (rank 0, which holds ``info.metrics``)."""
        if info.metrics is None:
            return
        if self._writer is None:
            logdir = self.logdir or info.record_path.with_suffix(".tb")
            self._writer = self._writer_class(log_dir=str(logdir))
        for tag, value in scalars(info.metrics):
            self._writer.add_scalar(tag, value, info.round)
        self._writer.flush()

    def close(self) -> None:
        """Close the event file."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def scalars(metrics: dict[str, Any]) -> list[tuple[str, float]]:
    """Return ``(tag, value)`` for every finite number in a round's metrics row."""
    out: list[tuple[str, float]] = []
    for key, value in metrics.items():
        if key == "round" or isinstance(value, str):
            continue
        items = [(key, value)] if not isinstance(value, Sequence) else [
            (f"{key}/layer{j + 1}", v) for j, v in enumerate(value)]
        out.extend((tag, float(v)) for tag, v in items
                   if isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v))
    return out
