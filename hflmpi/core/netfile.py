"""Calibrated networks on disk: the JSON that ``hflmpi bench calibrate`` writes and ``hflmpi plan`` reads.

Pure module (no MPI). The file holds one :class:`hflmpi.core.costmodel.Network` per aggregation
layer (layer 1 first; e.g. the links inside a node, then the link between nodes) and free-form
metadata (the link, the fan-outs and the timed collectives it was fitted to)::

    {"format": "hflmpi-networks/1", "layers": [{"name": ..., "alpha": ..., "beta": ...,
     "gamma": ..., "family": "mpich", "note": ...}, ...], "meta": {...}}
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path
from typing import Any, Sequence

from hflmpi.core.costmodel import Network

__all__ = ["FORMAT", "networks_to_dict", "networks_from_dict", "write_networks", "read_networks",
           "read_codec"]

FORMAT = "hflmpi-networks/1"
"""The ``format`` tag of a network file."""

_FIELDS = ("name", "alpha", "beta", "gamma", "family", "note")


def networks_to_dict(layers: Sequence[Network], meta: dict[str, Any] | None = None) -> dict[str, Any]:
    """Return the JSON-ready dict of per-layer networks and metadata."""
    return {"format": FORMAT, "layers": [asdict(net) for net in layers], "meta": dict(meta or {})}


def networks_from_dict(data: Any, source: str = "network file") -> list[Network]:
    """Return the per-layer networks of a dict made by :func:`networks_to_dict`.

    Raises
    ------
    ValueError
        If the format tag, the layer list or a layer's fields are missing or wrong.
    """
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ValueError(f"{source}: not a network file (needs \"format\": \"{FORMAT}\"; "
                         "write one with `hflmpi bench calibrate --out FILE`)")
    layers = data.get("layers")
    if not isinstance(layers, list) or not layers:
        raise ValueError(f"{source}: \"layers\" must be a non-empty list of networks")
    nets = []
    for n, layer in enumerate(layers, start=1):
        if not isinstance(layer, dict) or set(layer) - set(_FIELDS) or not {"alpha", "beta", "gamma"} <= set(layer):
            raise ValueError(f"{source}: layer {n} needs alpha, beta, gamma (and optionally "
                             f"name, family, note), got {layer!r}")
        try:
            nets.append(Network(str(layer.get("name", f"layer{n}")), float(layer["alpha"]),
                                float(layer["beta"]), float(layer["gamma"]),
                                str(layer.get("family", "mpich")), str(layer.get("note", ""))))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{source}: layer {n}: {exc}") from None
    return nets


def write_networks(path: str | Path, layers: Sequence[Network], meta: dict[str, Any] | None = None) -> None:
    """Write per-layer networks (and metadata) to ``path`` as JSON."""
    Path(path).write_text(json.dumps(networks_to_dict(layers, meta), indent=2) + "\n")


def _load(path: str | Path) -> Any:
    text = Path(path).read_text()
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not JSON ({exc})") from None


def read_codec(path: str | Path, numel: int = 0) -> dict[int, float]:
    """Return ``meta.codec`` of a network file: seconds per parameter per quantized layer, by width.

    An entry is one number, or a list of ``[numel, seconds]`` measured at several model sizes;
    then the size nearest to ``numel`` (log scale) is taken (the quantizer's kernels change with
    the size: :data:`hflmpi.core.fused.COMPILE_MIN_NUMEL`). Empty if the file has none.

    Raises
    ------
    ValueError
        If the entries are malformed or negative.
    """
    data = _load(path)
    networks_from_dict(data, str(path))
    codec = data.get("meta", {}).get("codec", {})
    out = {}
    try:
        for width, entry in codec.items():
            pairs = [(1.0, float(entry))] if isinstance(entry, (int, float)) else [
                (float(n), float(c)) for n, c in entry]
            out[int(width)] = min(pairs, key=lambda nc: abs(math.log(max(numel, 1) / nc[0])))[1]
    except (AttributeError, TypeError, ValueError):
        raise ValueError(f"{path}: meta.codec must map widths to seconds per parameter, got {codec!r}") from None
    if any(c < 0 for c in out.values()):
        raise ValueError(f"{path}: meta.codec costs must be >= 0, got {codec!r}")
    return out


def read_networks(path: str | Path) -> list[Network]:
    """Read the per-layer networks of a file written by :func:`write_networks`.

    Raises
    ------
    OSError
        If the file cannot be read.
    ValueError
        If it is not valid JSON or not a network file.
    """
    return networks_from_dict(_load(path), str(path))
