"""Resolve the user's import paths ``"package.module:name"`` (models, datasets, callbacks).

Importing a module runs its code, so every caller passes only names the user gave: a name read
back from a run file is refused unless the user names it again
(:func:`hflmpi.record.resume.check_untrusted_imports`).
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["import_object", "accepted_kwargs"]


def import_object(path: str, key: str) -> Any:
    """Import ``"package.module:qual.name"`` and return the object it names.

    Parameters
    ----------
    path : str
        The import path.
    key : str
        The config key that holds it (``model.name``), for messages.

    Raises
    ------
    ValueError
        If the module cannot be imported or has no such attribute; the message names the key.
    """
    module_name, sep, qualname = path.partition(":")
    if not sep or not module_name or not qualname:
        raise ValueError(f"{key}={path!r} is not an import path \"package.module:name\"")
    try:
        obj: object = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"{key}={path!r}: cannot import module {module_name!r} ({exc}); "
                         "check the name and that the package is on PYTHONPATH on every node") from None
    for part in qualname.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"{key}={path!r}: module {module_name!r} has no attribute "
                             f"{qualname!r}; check the name after the colon")
        obj = getattr(obj, part)
    return obj


def accepted_kwargs(function: Callable[..., Any], offered: Mapping[str, Any]) -> dict[str, Any]:
    """Return the entries of ``offered`` that ``function`` names as parameters.

    Only explicitly named parameters count (not ``**kwargs``), so a class that forwards its
    keyword arguments to a base class is never handed one it did not ask for.
    """
    try:
        parameters = inspect.signature(function).parameters
    except (TypeError, ValueError):  # some builtins have no signature
        return {}
    named = {name for name, p in parameters.items()
             if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return {name: value for name, value in offered.items() if name in named}
