"""The Python front door: :func:`train` a config (object, dict or TOML path) and get a model back.

::

    import hflmpi

    result = hflmpi.train("jobs/default.toml", run={"rounds": 5}, overrides={"optim.lr": 0.05})
    result.model                    # the trained nn.Module (CPU, eval mode)
    result.metrics["test_accuracy"] # per-round metrics, as the run file holds them

The same call works in a notebook (``MPI.COMM_WORLD`` of one process: a world of size 1) and
under ``mpiexec -n N python script.py`` unchanged, where it is collective: every rank calls it with
the same config and gets the same model. ``hflmpi run`` (:mod:`hflmpi.cli.run`) is this call with
the overrides from ``--set``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import torch

from hflmpi.config import (
    ConfigError,
    RunConfig,
    apply_overrides,
    config_from_dict,
    config_to_dict,
    format_value,
    load_config,
)
from hflmpi.federation import train as run_federation
from hflmpi.mpi.comm import limit_threads, world
from hflmpi.record.reading import read_metrics

__all__ = ["RunResult", "train", "resolve_config"]

_IMPORTABLE = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")


@dataclass
class RunResult:
    """What :func:`hflmpi.train` returns (the same on every rank).

    Attributes
    ----------
    model : torch.nn.Module
        The final global model: the architecture the run built, holding the trained parameters,
        on the CPU, in eval mode. Its own copy: training it further does not touch the run.
        Buffers (e.g. batch-norm statistics) are this rank's own; hflmpi aggregates parameters.
    parameters : torch.Tensor
        The same parameters, flat (``named_parameters`` order), as the checkpoint stores them.
    rounds : int
        Last completed global round.
    test_accuracy, test_loss : float
        Of the final global model on the test set (NaN if never evaluated).
    record_path : Path
        The HDF5 run file (``run.out``): metrics, the resolved config, checkpoints.
    config : RunConfig
        The resolved config the run used.
    preempted : bool
        The run stopped on a signal after checkpointing round ``rounds``.
    privacy : str or None
        With a DP layer, the line stating the run's ``(epsilon, delta)``.
    """

    model: torch.nn.Module
    parameters: torch.Tensor
    rounds: int
    test_accuracy: float
    test_loss: float
    record_path: Path
    config: RunConfig = field(repr=False)
    preempted: bool = False
    privacy: str | None = None

    @cached_property
    def metrics(self) -> dict[str, np.ndarray]:
        """Return the per-round metrics of the run file, one array per name (rows = rounds).

        Read on first use from :attr:`record_path`, which rank 0 writes: other ranks see it
        where the file system is shared. Names as :func:`hflmpi.read_metrics` returns them
        (``round``, ``train_loss``, ``test_accuracy``, per-layer ``bytes_sent`` ...).
        """
        return read_metrics(self.record_path)


def train(
    config_or_path: RunConfig | Mapping[str, Any] | str | os.PathLike[str],
    comm: Any = None,
    *,
    overrides: Mapping[str, Any] | Sequence[str] = (),
    callbacks: Sequence[Any] = (),
    dataset: Callable[..., Any] | None = None,
    resume: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
    stream: TextIO | None = None,
    **sections: Mapping[str, Any],
) -> RunResult:
    """Train federatedly as the config says and return the trained model and its metrics.

    Collective over ``comm``: every rank calls it with the same config and overrides.

    Parameters
    ----------
    config_or_path : RunConfig, mapping or path
        A :class:`RunConfig`, a ``{section: {key: value}}`` mapping (a parsed TOML document), or
        the path of a TOML file.
    comm : MPI.Comm, optional
        The federation's ranks; default ``MPI.COMM_WORLD`` (a world of size 1 outside mpiexec).
    overrides : mapping or sequence of str
        Dotted keys applied after the config, as ``hflmpi run --set`` applies them (same
        validation and messages): ``{"run.rounds": 3, "schedule.tau": [5, 2]}``, or the command
        line's ``["run.rounds=3", "schedule.tau=[5,2]"]``. A value of ``None`` resets the key to
        its default.
    callbacks : sequence
        This rank's callbacks (:mod:`hflmpi.callbacks`), called after those ``run.callbacks``
        names. Ranks may pass different ones.
    dataset : callable, optional
        Your dataset function, returning ``(x_train, y_train, x_test, y_test)``
        (:mod:`hflmpi.learn.custom_data`); the run file records it as ``data.name`` (its import
        path ``module:qualname``, so it must be a named function, not a lambda).
    resume : path, optional
        Continue the run in this run file from its newest checkpoint (the config must match it,
        as for ``hflmpi run --resume``).
    overwrite : bool
        Start afresh even where ``run.out`` holds a run (``hflmpi run --overwrite``): its files
        are set aside and deleted once the new run finishes. Without it such a run is refused.
    stream : text stream, optional
        Where rank 0 writes progress (default stdout; see ``run.progress``).
    **sections : mapping
        Whole-section overrides, applied before ``overrides``: ``run={"rounds": 3}`` is
        ``overrides={"run.rounds": 3}``.

    Returns
    -------
    RunResult

    Raises
    ------
    HflmpiError
        :class:`ConfigError` for a bad config, :class:`hflmpi.mpi.guard.SetupError` for data,
        model or callback failures (:class:`hflmpi.callbacks.CallbackError` text inside): raised
        on every rank alike, never a hang.
    """
    comm = world() if comm is None else comm
    config = resolve_config(config_or_path, overrides, sections, dataset)
    if comm.Get_size() > 1:
        limit_threads(comm)  # collective; OMP_NUM_THREADS, when set, wins
    result = run_federation(config, comm, resume=resume, overwrite=overwrite, stream=stream,
                            callbacks=callbacks, dataset=dataset)
    return RunResult(result.module.eval(), result.model, result.rounds, result.test_accuracy,
                     result.test_loss, result.record_path, config, result.preempted,
                     result.privacy)


def resolve_config(
    config_or_path: RunConfig | Mapping[str, Any] | str | os.PathLike[str],
    overrides: Mapping[str, Any] | Sequence[str] = (),
    sections: Mapping[str, Mapping[str, Any]] | None = None,
    dataset: Callable[..., Any] | None = None,
) -> RunConfig:
    """Return the validated config :func:`train` runs (same arguments; no MPI, no data).

    Raises
    ------
    ConfigError
        On a bad file, key, type or value, with the message ``hflmpi run --set`` gives.
    """
    if isinstance(config_or_path, RunConfig):
        data: dict[str, Any] = config_to_dict(config_or_path)
    elif isinstance(config_or_path, Mapping):
        data = apply_overrides(config_or_path, [])  # a deep copy with lists for tuples
    elif isinstance(config_or_path, (str, os.PathLike)):
        data = config_to_dict(load_config(Path(config_or_path)))
    else:
        raise ConfigError(f"train() takes a RunConfig, a mapping or a TOML path, not "
                          f"{type(config_or_path).__name__}")
    for key, value in [*_section_items(sections or {}), *_override_items(overrides)]:
        data = _apply(data, key, value)
    if dataset is not None:
        data = _apply(data, "data.name", _import_path_of(dataset))
    return config_from_dict(data)


def _section_items(sections: Mapping[str, Any]) -> list[tuple[str, Any]]:
    items: list[tuple[str, Any]] = []
    for name, table in sections.items():
        if not isinstance(table, Mapping):
            raise ConfigError(
                f"train(..., {name}={format_value(table)}): keyword arguments are whole config "
                f"sections; write e.g. run={{'rounds': 3}}, or overrides={{'run.rounds': 3}}")
        items.extend((f"{name}.{key}", value) for key, value in table.items())
    return items


def _override_items(overrides: Mapping[str, Any] | Sequence[str]) -> list[tuple[str, Any]]:
    if isinstance(overrides, Mapping):
        return [(str(key), value) for key, value in overrides.items()]
    if isinstance(overrides, str):
        raise ConfigError(f"overrides={overrides!r} is one string; give a list of key=value "
                          "strings or a mapping {'section.key': value}")
    return [(text, _RAW) for text in overrides]


_RAW = object()  # marks a ``key=value`` string, parsed exactly as ``--set`` parses it


def _apply(data: dict[str, Any], key: str, value: Any) -> dict[str, Any]:
    """Merge one override into ``data`` (a copy), as ``--set`` would."""
    if value is _RAW:
        return apply_overrides(data, [key])
    if value is None:
        merged = apply_overrides(data, [])
        node: Any = merged
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(parts[-1], None)
        return merged
    if isinstance(value, np.generic):
        value = value.item()
    return apply_overrides(data, [f"{key}={format_value(value)}"])


def _import_path_of(function: Callable[..., Any]) -> str:
    """Return ``module:qualname`` of the dataset function, the name the run file records."""
    module = getattr(function, "__module__", None) or ""
    qualname = getattr(function, "__qualname__", "") or ""
    if not callable(function) or not _IMPORTABLE.match(module) or not _IMPORTABLE.match(qualname):
        raise ConfigError(
            f"dataset={function!r} has no import path (module {module!r}, name {qualname!r}) for "
            "the run file to record as data.name; define it as a function at module level")
    return f"{module}:{qualname}"
