"""One contiguous buffer behind all parameters of a model.

:func:`flatten_parameters` allocates a single 1-D tensor, copies every parameter into it and rebinds
each ``param.data`` to a view of its slice. The model trains as before (autograd and in-place
updates work on the views), while aggregation reads and writes the whole model as one tensor that
MPI buffer collectives can send without packing.
"""

from __future__ import annotations

import hashlib
from copy import deepcopy as _deepcopy
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["FlatParameters", "flatten_parameters", "detached_copy"]


@dataclass(frozen=True)
class FlatParameters:
    """The flat buffer of a model's parameters and where each parameter lives in it.

    Attributes
    ----------
    flat : torch.Tensor
        1-D contiguous tensor of all parameters, in ``named_parameters`` order.
    names : tuple of str
        Parameter names.
    shapes : tuple of tuple of int
        Parameter shapes.
    offsets : tuple of int
        Start of each parameter in ``flat``.
    """

    flat: torch.Tensor
    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    offsets: tuple[int, ...]

    @property
    def numel(self) -> int:
        """Return the total number of entries."""
        return int(self.flat.numel())

    @property
    def dtype(self) -> torch.dtype:
        """Return the buffer's dtype."""
        return self.flat.dtype

    @property
    def device(self) -> torch.device:
        """Return the buffer's device."""
        return self.flat.device

    def view(self, name: str) -> torch.Tensor:
        """Return the slice of ``flat`` holding parameter ``name``, in its shape."""
        i = self.names.index(name)
        size = _numel(self.shapes[i])
        return self.flat[self.offsets[i]:self.offsets[i] + size].view(self.shapes[i])

    def signature(self) -> tuple[tuple[str, ...], tuple[tuple[int, ...], ...], str]:
        """Return ``(names, shapes, dtype)``: what every rank must agree on before aggregating."""
        return self.names, self.shapes, str(self.flat.dtype).removeprefix("torch.")

    def signature_hash(self) -> int:
        """Return a 63-bit hash of :meth:`signature`, equal on every machine for equal signatures.

        Compare it across ranks (e.g. MIN and MAX allreduce) as a cheap handshake.
        """
        digest = hashlib.sha256(repr(self.signature()).encode("utf-8")).digest()
        return int.from_bytes(digest[:8], "big") >> 1


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def flatten_parameters(
    model: nn.Module,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> FlatParameters:
    """Move all parameters of ``model`` into one contiguous buffer, in place.

    Parameters
    ----------
    model : nn.Module
        The model. Its ``Parameter`` objects are kept (optimisers holding them stay valid); only
        their ``.data`` is rebound to views of the new buffer, with the same values.
    dtype : torch.dtype, optional
        Buffer dtype; default the dtype of the first parameter. Floating buffers of the model
        are cast too.
    device : torch.device or str, optional
        Buffer device; default the device of the first parameter. Buffers of the model move too.

    Returns
    -------
    FlatParameters

    Notes
    -----
    Never assign new tensors to the parameters afterwards (``p.data = ...``, ``load_state_dict``
    with ``assign=True``, ``model.to(...)``): that would detach them from the buffer. Write values
    in place (``p.copy_``) or write ``flat`` directly.
    """
    named = list(model.named_parameters())
    if not named:
        raise ValueError("the model has no parameters to flatten")
    first = named[0][1]
    dtype = first.dtype if dtype is None else dtype
    device = first.device if device is None else torch.device(device)
    if not dtype.is_floating_point:
        raise ValueError(f"flat parameters need a floating dtype, got {dtype}")
    model.to(device=device, dtype=dtype)
    shapes = tuple(tuple(p.shape) for _, p in named)
    offsets: list[int] = []
    total = 0
    for shape in shapes:
        offsets.append(total)
        total += _numel(shape)
    flat = torch.empty(total, dtype=dtype, device=device)
    with torch.no_grad():
        for (_, p), offset, shape in zip(named, offsets, shapes):
            view = flat[offset:offset + _numel(shape)].view(shape)
            view.copy_(p.data)
            p.data = view
            p.grad = None
    return FlatParameters(
        flat=flat,
        names=tuple(name for name, _ in named),
        shapes=shapes,
        offsets=tuple(offsets),
    )


def detached_copy(model: nn.Module) -> nn.Module:
    """Return a deep copy of ``model`` on the CPU whose parameters own their memory.

    The copy shares nothing with ``model`` (not the flat buffer behind its parameters either),
    so the caller may train or change it without touching the run.
    """
    copy = _deepcopy(model).cpu()
    with torch.no_grad():
        for p in copy.parameters():
            p.data = p.data.clone()
    return copy
