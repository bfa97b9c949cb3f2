"""The forward pass of ``K`` clients' models at once, written out for standard layers.

:class:`hflmpi.learn.batched.BatchedSolver` holds ``K`` clients' parameters stacked along a
leading axis. For a model built only from the layers below, :func:`stacked_forward` runs all
``K`` forward passes as one batched operation per layer, with plain tensor ops that autograd
differentiates directly (no :func:`torch.func.vmap`, no :func:`~torch.func.functional_call`):

* ``nn.Linear``: ``x [K, B, in] @ W[k].T + b[k]`` as one ``baddbmm``;
* ``nn.Conv2d`` (zero padding): the ``K`` convolutions as one grouped convolution, client ``k``'s
  channels being groups ``k * groups .. (k + 1) * groups - 1`` of a ``[B, K * C, H, W]`` input;
* layers without parameters that treat samples independently (activations, pooling, flatten,
  identity): applied to the ``K * B`` samples as one batch;
* ``nn.Sequential`` of those, and hflmpi's own :class:`~hflmpi.learn.models.LogisticRegression`,
  :class:`~hflmpi.learn.models.MLP` and :class:`~hflmpi.learn.models.SmallCNN`, whose forward
  passes are known.

:func:`stacked_plan` returns ``None`` for any other model (a custom ``forward``, normalisation
layers, parameters shared between layers); those take the ``vmap`` path. Each client's output
depends only on its own parameters and samples, so the gradient of the sum of the clients'
losses with respect to client ``k``'s parameters is client ``k``'s own gradient. The arithmetic
of each layer is that of the unbatched layer, so results equal one model per client up to float
rounding (the summation order inside a batched matrix product may differ).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from hflmpi.learn.models import MLP, LogisticRegression, SmallCNN

__all__ = ["StackedOp", "stacked_plan", "stacked_forward", "is_dense", "dense_gradients"]

# Parameter-free modules that map each sample on its own: applying them to K * B samples at once
# is the same as K separate batches of B. Exact types only: a subclass may override forward.
_SAMPLEWISE: tuple[type[nn.Module], ...] = (
    nn.Identity, nn.Flatten, nn.Unflatten, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.CELU,
    nn.SELU, nn.GELU, nn.SiLU, nn.Mish, nn.Tanh, nn.Sigmoid, nn.Softplus, nn.Hardtanh,
    nn.Hardswish, nn.Hardsigmoid, nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d,
)


@dataclass(frozen=True)
class StackedOp:
    """One layer of a stacked forward pass.

    Attributes
    ----------
    kind : {"linear", "conv2d", "samplewise", "flatten"}
        What the layer does.
    weight, bias : str or None
        Parameter names (as in ``model.named_parameters()``) of ``linear`` and ``conv2d``.
    module : nn.Module or None
        The layer itself (its hyper-parameters; ``samplewise`` calls it).
    """

    kind: str
    weight: str | None = None
    bias: str | None = None
    module: nn.Module | None = None


def _ops(module: nn.Module, prefix: str) -> list[StackedOp] | None:
    """Return the ops of ``module`` (named ``prefix``), or ``None`` if one is not supported."""
    kind = type(module)
    if kind is nn.Sequential:
        if len(list(module.named_children())) != len(cast(nn.Sequential, module)):
            return None  # a layer used twice (named_children lists it once)
        ops: list[StackedOp] = []
        for name, child in module.named_children():
            child_ops = _ops(child, f"{prefix}{name}.")
            if child_ops is None:
                return None
            ops += child_ops
        return ops
    if kind is MLP:
        net = _ops(module.get_submodule("net"), f"{prefix}net.")
        return None if net is None else [StackedOp("flatten"), *net]
    if kind is LogisticRegression:
        linear = _ops(module.get_submodule("linear"), f"{prefix}linear.")
        return None if linear is None else [StackedOp("flatten"), *linear]
    if kind is SmallCNN:
        features = _ops(module.get_submodule("features"), f"{prefix}features.")
        head = _ops(module.get_submodule("head"), f"{prefix}head.")
        return None if features is None or head is None else features + head
    own = list(module.named_parameters(recurse=False))
    bias = f"{prefix}bias" if getattr(module, "bias", None) is not None else None
    if kind is nn.Linear:
        return [StackedOp("linear", f"{prefix}weight", bias, module)]
    if kind is nn.Conv2d and module.padding_mode == "zeros":
        return [StackedOp("conv2d", f"{prefix}weight", bias, module)]
    if kind is nn.Flatten and module.start_dim == 1 and module.end_dim == -1:
        return [StackedOp("flatten")]
    if kind in _SAMPLEWISE and not own and not list(module.buffers()):
        return [StackedOp("samplewise", module=module)]
    return None


def stacked_plan(model: nn.Module, names: Sequence[str]) -> tuple[StackedOp, ...] | None:
    """Return the ops of ``model``'s stacked forward pass, or ``None`` if it needs ``vmap``.

    Parameters
    ----------
    model : nn.Module
        The template model.
    names : sequence of str
        Its parameter names, ``model.named_parameters()`` order: each must be used by exactly
        one op (a parameter shared by two layers, or one the plan does not know, means ``None``).
    """
    ops = _ops(model, "")
    if not ops:
        return None
    used = [name for op in ops for name in (op.weight, op.bias) if name is not None]
    if sorted(used) != sorted(names):
        return None
    return tuple(ops)


def stacked_forward(ops: Sequence[StackedOp], params: dict[str, torch.Tensor],
                    x: torch.Tensor) -> torch.Tensor:
    """Return the ``K`` clients' outputs ``[K, B, ...]`` for their inputs ``x [K, B, ...]``.

    Parameters
    ----------
    ops : sequence of StackedOp
        From :func:`stacked_plan`.
    params : dict of str to torch.Tensor
        ``{name: [K, *shape]}`` stacked parameters.
    x : torch.Tensor
        ``[K, B, *sample_shape]`` inputs, one batch of ``B`` samples per client.
    """
    k, b = int(x.shape[0]), int(x.shape[1])
    for op in ops:
        if op.kind == "flatten":
            x = x.reshape(k, b, -1)
        elif op.kind == "linear":
            x = _linear(x, params[str(op.weight)], None if op.bias is None else params[op.bias])
        elif op.kind == "conv2d":
            x = _conv2d(op.module, x, params[str(op.weight)],
                        None if op.bias is None else params[op.bias])
        else:
            assert op.module is not None
            y = op.module(x.reshape(k * b, *x.shape[2:]))
            x = y.reshape(k, b, *y.shape[1:])
    return x


# The derivative of an activation from its output (the kernels autograd itself calls).
_BACKWARD_FROM_OUTPUT: dict[type[nn.Module], Any] = {
    nn.ReLU: lambda g, out: torch.ops.aten.threshold_backward(g, out, 0),
    nn.Tanh: torch.ops.aten.tanh_backward,
    nn.Sigmoid: torch.ops.aten.sigmoid_backward,
    nn.Identity: lambda g, out: g,
}


def is_dense(ops: Sequence[StackedOp]) -> bool:
    """Whether :func:`dense_gradients` can differentiate ``ops`` by hand.

    True for linear layers, per-sample flattening and ReLU, tanh, sigmoid or identity between.
    """
    return all(op.kind in ("linear", "flatten") or (
        op.kind == "samplewise" and type(op.module) in _BACKWARD_FROM_OUTPUT) for op in ops)


def dense_gradients(ops: Sequence[StackedOp], params: dict[str, torch.Tensor], x: torch.Tensor,
                    y: torch.Tensor, pad: torch.Tensor, counts: torch.Tensor,
                    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Return each client's gradient of its mean cross-entropy, and the losses, by hand.

    The backward pass of :func:`stacked_forward` written out (no autograd graph): for
    ``ops`` accepted by :func:`is_dense`. With ``p = softmax(logits)``, the gradient of client
    ``k``'s loss ``sum_j valid(j) * ce_j / counts[k]`` with respect to its logits is
    ``(p - onehot(y)) * valid / counts[k]``; it flows back through each layer with that
    layer's own derivative.

    Parameters
    ----------
    ops : sequence of StackedOp
        From :func:`stacked_plan`, with :func:`is_dense` true.
    params : dict of str to torch.Tensor
        ``{name: [K, *shape]}`` stacked parameters.
    x : torch.Tensor
        ``[K, B, *sample_shape]`` inputs; padding rows must be finite (zeroed).
    y : torch.Tensor
        ``[K, B]`` labels (in range also on padding rows).
    pad : torch.Tensor
        ``[K, B]`` bool, true on padding rows.
    counts : torch.Tensor
        ``[K]`` valid rows per client, the parameters' dtype.

    Returns
    -------
    grads : dict of str to torch.Tensor
        ``{name: [K, *shape]}`` gradients.
    losses : torch.Tensor
        ``[K]`` mean cross-entropies over the valid rows.
    """
    k, b = int(x.shape[0]), int(x.shape[1])
    with torch.no_grad():
        saved: list[Any] = []  # per op: its input (linear), output (activation) or input shape
        h = x
        for op in ops:
            if op.kind == "flatten":
                saved.append(h.shape)
                h = h.reshape(k, b, -1)
            elif op.kind == "linear":
                saved.append(h)
                h = _linear(h, params[str(op.weight)],
                            None if op.bias is None else params[op.bias])
            else:
                assert op.module is not None
                h = op.module(h)
                saved.append(h)
        log_probs = F.log_softmax(h, dim=-1)
        picked = log_probs.gather(-1, y.unsqueeze(-1))
        losses = picked.squeeze(-1).masked_fill(pad, 0).sum(dim=1).div(counts).neg()
        weight = (~pad).to(counts.dtype).div_(counts.unsqueeze(1)).unsqueeze(-1)
        g = log_probs.exp_().scatter_add_(-1, y.unsqueeze(-1), torch.full_like(picked, -1.0))
        g = g.mul_(weight)
        grads: dict[str, torch.Tensor] = {}
        first = min(i for i, op in enumerate(ops) if op.kind == "linear")
        for i in range(len(ops) - 1, first - 1, -1):
            op, kept = ops[i], saved[i]
            if op.kind == "flatten":
                g = g.reshape(kept)
            elif op.kind == "linear":
                weight_k = params[str(op.weight)]
                g3 = g.reshape(k, -1, g.shape[-1])
                inputs = kept.reshape(k, -1, kept.shape[-1])
                grads[str(op.weight)] = torch.bmm(g3.transpose(1, 2), inputs)
                if op.bias is not None:
                    grads[op.bias] = g3.sum(dim=1)
                if i > first:
                    g = torch.bmm(g3, weight_k).reshape(kept.shape)
            else:
                assert op.module is not None
                g = _BACKWARD_FROM_OUTPUT[type(op.module)](g, kept)
    return grads, losses


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``x [K, B, ..., in]`` times each client's ``weight [K, out, in]``, plus ``bias [K, out]``."""
    shape = x.shape
    flat = x.reshape(shape[0], -1, shape[-1])
    out = (torch.bmm(flat, weight.transpose(1, 2)) if bias is None
           else torch.baddbmm(bias.unsqueeze(1), flat, weight.transpose(1, 2)))
    return out.reshape(*shape[:-1], weight.shape[1])


def _conv2d(module: Any, x: torch.Tensor, weight: torch.Tensor,
            bias: torch.Tensor | None) -> torch.Tensor:
    """``K`` clients' ``Conv2d`` as one grouped convolution over ``x [K, B, C, H, W]``."""
    k, b, c = int(x.shape[0]), int(x.shape[1]), int(x.shape[2])
    inputs = x.transpose(0, 1).reshape(b, k * c, *x.shape[3:])
    out = F.conv2d(inputs, weight.reshape(-1, *weight.shape[2:]),
                   None if bias is None else bias.reshape(-1), module.stride, module.padding,
                   module.dilation, module.groups * k)
    return out.view(b, k, -1, *out.shape[2:]).transpose(0, 1)
