"""The ``[server_opt]`` section (server optimizers per layer) and the loading of rule plug-ins.

Server optimizers are :mod:`hflmpi.core.server_opt` (FedAvgM, FedAdagrad, FedAdam, FedYogi;
Reddi et al., ICLR 2021); their ranges are that module's :data:`HYPERPARAMETERS`, checked here
in the configuration's words. Plug-in rules (:mod:`hflmpi.core.strategy`) are named by import
path in ``aggregation.robust``; :func:`load_rules` imports them when the run sets up (never when
a config is only read, e.g. back from a run file).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Sequence

from hflmpi.config.checks import (
    ConfigError,
    _Check,
    _choice_list,
    _float,
    _fmt,
    _Invalid,
    _opt,
    _Section,
    _type_name,
)
from hflmpi.core.server_opt import HYPERPARAMETERS, SERVER_OPTIMIZERS, ServerOptOptions
from hflmpi.core.strategy import AggregationRule, PluginError, is_import_path, load_rule

__all__ = ["ServerOptConfig", "load_rules"]


def _per_layer(name: str) -> _Check:
    """Check a hyperparameter given as one number (every layer) or one number per layer."""
    lo, lo_open, hi, _ = HYPERPARAMETERS[name]
    one = _float(lo, hi, lo_open=lo_open, hi_open=hi is not None)

    def check(value: Any) -> tuple[float, ...]:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return (one(value),)
        if not isinstance(value, (list, tuple)):
            raise _Invalid(f"is {_type_name(value)} but must be a number or a list of numbers, "
                           "one per layer")
        out = []
        for i, item in enumerate(value):
            try:
                out.append(one(item))
            except _Invalid as exc:
                raise _Invalid(f"has entry [{i}] = {_fmt(item)}, which {exc.constraint}") from None
        return tuple(out)

    return check


@dataclass(frozen=True)
class ServerOptConfig(_Section):
    """The ``[server_opt]`` section: a server optimizer at any layer of the tree.

    Attributes
    ----------
    optimizer : list of str
        Per layer, ``"none"`` (the aggregate is the new model, plain QMLHFL/FedAvg), ``"avgm"``
        (FedAvgM), ``"adagrad"``, ``"adam"`` or ``"yogi"``, applied by each group's leader to
        the pseudo-gradient ``aggregate - x_prev``. Empty (default) means none anywhere.
    lr : float or list of float
        Server step ``eta`` > 0; one value for every layer, or one per layer. Default 1.0.
    momentum : float or list of float
        FedAvgM's ``beta`` in [0, 1). Default 0.9.
    beta1, beta2 : float or list of float
        Moment decays in [0, 1) of the adaptive optimizers. Defaults 0.9 and 0.99.
    tau : float or list of float
        Adaptivity ``tau`` > 0 of the adaptive optimizers (``v`` starts at ``tau^2``).
        Default 1e-3.
    """

    section: ClassVar[str] = "server_opt"
    optimizer: tuple[str, ...] = _opt((), _choice_list(*SERVER_OPTIMIZERS), '["none", "adam"]')
    lr: tuple[float, ...] = _opt((), _per_layer("lr"), "[1.0, 0.1]")
    momentum: tuple[float, ...] = _opt((), _per_layer("momentum"), "0.9")
    beta1: tuple[float, ...] = _opt((), _per_layer("beta1"), "0.9")
    beta2: tuple[float, ...] = _opt((), _per_layer("beta2"), "0.99")
    tau: tuple[float, ...] = _opt((), _per_layer("tau"), "1e-3")

    def _cross_check(self) -> None:
        if any(o != "none" for o in self.optimizer):
            return
        for name in HYPERPARAMETERS:
            if getattr(self, name):
                raise self._error(name, "is set but server_opt.optimizer names no optimizer",
                                  'name one per layer, e.g. server_opt.optimizer=["none", '
                                  '"adam"], or delete the key')

    def options_for(self, depth: int) -> list[ServerOptOptions | None]:
        """Return one :class:`ServerOptOptions` (or None) per layer of a ``depth``-layer tree.

        Raises
        ------
        ConfigError
            A list whose length is neither 1 (hyperparameters only) nor ``depth``.
        """
        names = self.optimizer or ("none",) * depth
        if len(names) != depth:
            raise self._error("optimizer", f"has {len(names)} entries but the tree has {depth} "
                              "layers", "give one per layer (\"none\" where the layer keeps its "
                              "aggregate)")
        for name in HYPERPARAMETERS:
            values = getattr(self, name)
            if len(values) not in (0, 1, depth):
                raise self._error(name, f"has {len(values)} entries but the tree has {depth} "
                                  "layers", "give one number for every layer, or one per layer")
        out: list[ServerOptOptions | None] = []
        for n, name in enumerate(names):
            if name == "none":
                out.append(None)
                continue
            picked = {key: (vals[0] if len(vals) == 1 else vals[n])
                      for key in HYPERPARAMETERS if (vals := getattr(self, key))}
            out.append(ServerOptOptions(name, **picked))
        return out


def load_rules(robust: Sequence[str]) -> list[str | AggregationRule]:
    """Return ``aggregation.robust`` with every import path replaced by the plug-in it names.

    Imports code: call it where the run sets up, on every rank (never on a config read back from
    a run file that the user has not named the path in again).

    Raises
    ------
    ConfigError
        Naming the entry (``aggregation.robust[n]``) when the import or the protocol check fails.
    """
    out: list[str | AggregationRule] = []
    for n, rule in enumerate(robust):
        if not is_import_path(rule):
            out.append(rule)
            continue
        try:
            out.append(load_rule(rule, key=f"aggregation.robust[{n}]"))
        except PluginError as exc:
            raise ConfigError(str(exc)) from None
    return out
