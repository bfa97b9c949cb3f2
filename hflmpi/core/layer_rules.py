"""Which per-layer aggregation options go together: one pure rule set for config and aggregator.

Pure module (no torch, no MPI). A layer of the tree aggregates its children's updates exactly,
quantized (``bits > 0``), with a Byzantine-robust rule (``robust != "mean"``), with secure
masking of the quantized levels, and optionally privately (clip + noise). Not every combination
makes sense; :func:`check_layer_options` says which do not, in the configuration's terms
(``key=value``, the constraint, the fix), so :mod:`hflmpi.config` reports a bad job file and
:class:`hflmpi.mpi.aggregate.HierarchicalAggregator` refuses a bad call with the same words.
Layer ``n`` of the tree is entry ``n - 1`` of every per-layer list, as in the job file.
"""

from __future__ import annotations

import json
import math
from typing import Any, Sequence

from hflmpi.errors import HflmpiError

__all__ = ["LayerOptionsError", "check_layer_options", "format_value"]


class LayerOptionsError(HflmpiError, ValueError):
    """A combination of per-layer aggregation options is refused (the message says the fix)."""


def format_value(value: Any) -> str:
    """Return ``value`` in TOML syntax, as the configuration's messages print it."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(format_value(v) for v in value) + "]"
    return repr(value) if isinstance(value, float) else str(value)


def check_layer_options(
    depth: int,
    bits: Sequence[int],
    robust: Sequence[str] = (),
    secure: Sequence[bool] = (),
    *,
    method: str = "auto",
    privacy_layer: int = 0,
    group_sizes: Sequence[Sequence[int]] | None = None,
    trim: float = 0.2,
    krum_f: int = 1,
    allow_small_secure_groups: bool = False,
) -> None:
    """Check the per-layer robust/secure/privacy options against a tree of ``depth`` layers.

    Parameters
    ----------
    depth : int
        Number of aggregation layers.
    bits : sequence of int
        ``quantize.bits`` per layer (0 = exact), ``depth`` entries.
    robust : sequence of str
        ``aggregation.robust`` per layer; empty means ``"mean"`` everywhere.
    secure : sequence of bool
        ``aggregation.secure`` per layer; empty means no masking.
    method : {"auto", "sum", "gather", "lanes"}
        ``quantize.method``.
    privacy_layer : int
        ``privacy.layer`` (0 = no privacy).
    group_sizes : sequence of sequences of int, optional
        Per layer, the number of participants of each of its groups (the fan-ins, known once
        the tree is planned); enables the checks that depend on them.
    trim, krum_f : float, int
        ``aggregation.trim`` and ``aggregation.krum_f``.
    allow_small_secure_groups : bool
        ``aggregation.allow_small_secure_groups``.

    Raises
    ------
    LayerOptionsError
        The first refused combination, naming key, value, constraint and fix.
    """
    for name, values in (("robust", robust), ("secure", secure)):
        if values and len(values) != depth:
            raise LayerOptionsError(
                f"aggregation.{name}={format_value(list(values))} has {len(values)} entries but "
                f"the tree has {depth} layers; give one per layer (or leave it out)"
            )
    for n in range(depth):
        _check_layer(n, bits[n], robust[n] if robust else "mean",
                     bool(secure[n]) if secure else False, method)
    if privacy_layer > depth:
        raise LayerOptionsError(f"privacy.layer={privacy_layer} but the tree has {depth} layers; "
                                f"use 1..{depth} (or 0 to turn privacy off)")
    if privacy_layer and robust and robust[privacy_layer - 1] != "mean":
        n = privacy_layer - 1
        raise LayerOptionsError(
            f"aggregation.robust[{n}]={format_value(robust[n])} at privacy.layer="
            f"{privacy_layer}: the noise is calibrated to the weighted mean's "
            "sensitivity (clip * max a_c), which a robust rule does not have, so the stated "
            "epsilon would be false; put the robust rule on another layer"
        )
    if group_sizes is not None:
        for n, sizes in enumerate(group_sizes[:depth]):
            rule = robust[n] if robust else "mean"
            masked = bool(secure[n]) if secure else False
            for k in sorted(set(int(k) for k in sizes)):
                _check_group(n, k, rule, masked, trim, krum_f, allow_small_secure_groups)


def _check_layer(n: int, width: int, rule: str, masked: bool, method: str) -> None:
    """Check layer ``n + 1``'s robust rule, quantizer and masking against each other."""
    if rule != "mean" and width > 0:
        raise LayerOptionsError(
            f"aggregation.robust[{n}]={rule!r} with quantize.bits[{n}]={width}: robust "
            f"rules need full-precision updates; set quantize.bits[{n}] = 0"
        )
    if masked and width == 0:
        raise LayerOptionsError(
            f"aggregation.secure[{n}]=true with quantize.bits[{n}]=0: secure aggregation "
            f"masks quantized integer levels; set quantize.bits[{n}] to 1..16"
        )
    if masked and rule != "mean":
        raise LayerOptionsError(f"aggregation.secure[{n}] and robust[{n}]={rule!r} exclude "
                                "each other: masking hides the updates the rule needs")
    if masked and method in ("gather", "lanes"):
        raise LayerOptionsError('aggregation.secure needs quantize.method = "auto" or "sum"')


def _check_group(
    n: int, k: int, rule: str, masked: bool, trim: float, krum_f: int, allow_small: bool
) -> None:
    """Check layer ``n + 1``'s robust rule and secure masking against one group size ``k``."""
    if k < 2:
        return  # a group of one: the leader alone, nothing to defend or hide
    if masked and k == 2 and not allow_small:
        raise LayerOptionsError(
            f"aggregation.secure[{n}]=true with a layer-{n + 1} group of 2 participants: "
            "its leader subtracts its own levels from the sum and learns its partner's "
            "exactly; use groups of at least 3 (topology), or set "
            "aggregation.allow_small_secure_groups=true to accept that"
        )
    if rule == "trimmed_mean" and math.floor(trim * k) < 1:
        fix = (f"set aggregation.trim >= 1/{k} (e.g. aggregation.trim="
               f"{math.ceil(1000 / k) / 1000})" if k >= 3 else
               "use groups of at least 3 children (topology)")
        raise LayerOptionsError(
            f"aggregation.trim={format_value(trim)} trims floor({format_value(trim)} * {k}) = "
            f"{math.floor(trim * k)} of the {k} children of a layer-{n + 1} group, so "
            f"aggregation.robust[{n}]=\"trimmed_mean\" would tolerate no Byzantine child "
            f"and silently average them all; {fix}"
        )
    if rule == "median" and k == 2:
        raise LayerOptionsError(
            f"aggregation.robust[{n}]=\"median\" with a layer-{n + 1} group of 2 "
            "children tolerates no Byzantine child (the median of two is their mean); "
            "use groups of at least 3 children (topology) or \"mean\" there"
        )
    if rule == "krum" and (krum_f < 1 or k <= 2 * krum_f + 2):
        raise LayerOptionsError(
            f"aggregation.krum_f={krum_f} with a layer-{n + 1} group of {k} children: "
            f"krum needs f >= 1 Byzantine children tolerated and more than 2f + 2 = "
            f"{2 * krum_f + 2} children; set aggregation.krum_f=1 with groups of at "
            "least 5 children, or use \"median\" there"
        )
