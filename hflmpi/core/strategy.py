"""Aggregation-rule plug-ins: a user's rule for a layer's leader, without forking hflmpi.

A plug-in is any object with a method ``aggregate(updates, weights) -> Tensor``:

* ``updates``: ``[k, n]`` float32 tensor on the CPU, row ``c`` the update ``x_c - x`` of the
  layer's ``c``-th child (children in the order of their leaders' ranks);
* ``weights``: ``[k]`` float64 tensor, each child's weight **clamped by the leader** to what the
  child's subtree can honestly claim (samples held, or devices), 0 for a dropped child;
* returns the combined update ``[n]`` (any float dtype); the leader sets ``x_new = x + result``.

It runs where the built-in robust rules run (:class:`hflmpi.mpi.layers.RobustLayer`): the
children's full-precision updates are gathered to the leader, so a plug-in layer cannot be
quantized, masked (``aggregation.secure``) or privatised, exactly like ``"median"``.
Configure it per layer by import path, ``aggregation.robust = ["mean", "mypkg.rules:MyRule"]``
(a class is instantiated with no arguments; any other attribute is used as is), or hand the
object itself to :class:`hflmpi.mpi.aggregate.HierarchicalAggregator` (``robust=[..., obj]``).
Importing runs the module's code on every rank, so an import path read back from a run file is
only honoured when the user names it again (:func:`hflmpi.record.resume.check_untrusted_imports`).
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from hflmpi.errors import HflmpiError
from hflmpi.importing import import_object

if TYPE_CHECKING:  # the config checks plug-in names with this module and must load without torch
    import torch

__all__ = ["AggregationRule", "PluginError", "is_import_path", "load_rule", "apply_rule",
           "rule_name"]

_IMPORT_PATH = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")


@runtime_checkable
class AggregationRule(Protocol):
    """What a plug-in rule provides (see the module docstring)."""

    def aggregate(self, updates: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Combine the children's ``[k, n]`` updates with their ``[k]`` weights into ``[n]``."""
        ...


class PluginError(HflmpiError, ValueError):
    """A plug-in rule cannot be imported, or does not satisfy :class:`AggregationRule`."""


def is_import_path(text: str) -> bool:
    """Tell whether ``text`` has the form ``package.module:Attribute``."""
    return bool(_IMPORT_PATH.match(text))


def load_rule(path: str, key: str = "aggregation.robust") -> AggregationRule:
    """Import ``package.module:Attribute`` and return the rule it names.

    A class is instantiated with no arguments; anything else must already have a callable
    ``aggregate``. ``key`` names the config entry in the messages.

    Raises
    ------
    PluginError
        The module cannot be imported, has no such attribute, the class cannot be built with
        no arguments, or the object has no callable ``aggregate``.
    """
    if not is_import_path(path):
        raise PluginError(f"{key}={path!r} is not an import path; write it as "
                          "\"package.module:ClassName\"")
    qualname = path.partition(":")[2]
    try:
        obj: Any = import_object(path, key)
    except ValueError as exc:  # one import rule for every import path (hflmpi.importing)
        raise PluginError(str(exc)) from None
    if isinstance(obj, type):
        try:
            obj = obj()
        except Exception as exc:  # user code: say what failed instead of a traceback
            raise PluginError(f"{key}={path!r}: {qualname}() failed ({type(exc).__name__}: "
                              f"{exc}); a plug-in class must be constructible with no "
                              "arguments") from None
    if not isinstance(obj, AggregationRule) or not callable(getattr(obj, "aggregate", None)):
        raise PluginError(f"{key}={path!r} has no callable aggregate(updates, weights); a "
                          "plug-in provides aggregate(updates [k, n], weights [k]) -> [n] "
                          "(see docs/strategies.md)")
    return obj


def rule_name(rule: Any) -> str:
    """Return how messages name a rule: its own text, or a plug-in object's class."""
    return rule if isinstance(rule, str) else f"plug-in {type(rule).__qualname__}"


def apply_rule(rule: AggregationRule, updates: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Call ``rule.aggregate`` and check what it returns: a finite float ``[n]`` tensor.

    Raises
    ------
    PluginError
        Whatever the plug-in raised, or a result of the wrong type, shape or with NaN/Inf.
    """
    import torch

    n = updates.shape[1]
    try:
        result = rule.aggregate(updates, weights)
    except Exception as exc:  # user code: the leader reports it to its subtree
        raise PluginError(f"its aggregate() raised {type(exc).__name__}: {exc}") from None
    if not isinstance(result, torch.Tensor) or not result.is_floating_point():
        raise PluginError(f"its aggregate() returned {type(result).__name__}, not a float "
                          f"torch.Tensor of shape [{n}]")
    if tuple(result.shape) != (n,):
        raise PluginError(f"its aggregate() returned shape {tuple(result.shape)}, expected ({n},)")
    if not bool(torch.isfinite(result).all()):
        raise PluginError("its aggregate() returned NaN or Inf")
    return result
