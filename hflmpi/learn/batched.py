"""Local steps of many clients at once: one vectorised computation over a leading client axis.

:class:`BatchedSolver` holds the parameters of ``K`` clients (one architecture, different values)
as rows of one ``[K, numel]`` buffer in the flat layout of :mod:`hflmpi.learn.flat`, and takes a
step for all of them at once, the update as one operation over the stacked rows. The update is
that of :class:`hflmpi.learn.local.LocalSolver`::

    d = g + weight_decay * w + mu * (w - w_anchor)
    b = momentum * b + d
    w = w - lr * b

Clients' minibatches may differ in length: they are padded to a common width ``B`` and each
client's loss is the mean cross-entropy over its first ``count`` rows. Padding rows are zeroed
before the forward pass, so whatever they hold (even non-finite values) cannot reach a gradient.

Only models without state shared across the samples of a batch can be vectorised this way: batch
norm mixes samples and updates running statistics, and dropout would draw the same mask stream for
every client. :func:`check_batchable` rejects them; train those in the sequential mode.

The gradient is taken in one of these ways, equal up to float rounding, the first that applies:

1. ``compile=True`` (or the environment variable ``HFLMPI_COMPILE_BATCHED=1``):
   ``vmap(grad_and_value(functional_call(...)))`` compiled by :func:`torch.compile` with dynamic
   shapes on first use, after a compilation of tens of seconds to minutes per process and per new
   shape (cached on disk by inductor). If compiling or running it fails, a warning is logged and
   the eager paths below run from then on.
2. Dense models (linear layers with ReLU, tanh, sigmoid or nothing between; hflmpi's MLP and
   logistic regression): :func:`hflmpi.learn.stacked.dense_gradients`, a batched forward pass
   and its backward pass written out, about 25 tensor operations per step whatever ``K``.
3. Other models of standard layers (convolutions, pooling, other activations; hflmpi's CNN):
   :func:`hflmpi.learn.stacked.stacked_forward` and one ``torch.autograd.grad`` of the summed
   client losses (clients share no parameter, so the sum's gradient with respect to client ``k``'s
   parameters is client ``k``'s own).
4. Anything else (custom ``forward``, normalisation layers): the forward pass vectorised with
   :func:`torch.func.vmap` over :func:`torch.func.functional_call`, then one
   ``torch.autograd.grad`` of the summed losses as in 3.

:attr:`BatchedSolver.dense` and :attr:`BatchedSolver.stacked` say which eager path a model takes.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad_and_value, vmap

from hflmpi.config import OptimConfig
from hflmpi.learn.stacked import dense_gradients, is_dense, stacked_forward, stacked_plan

__all__ = ["BatchedSolver", "stack_batches", "check_batchable", "COMPILE_ENV"]

COMPILE_ENV = "HFLMPI_COMPILE_BATCHED"

_log = logging.getLogger(__name__)


def check_batchable(model: nn.Module) -> None:
    """Raise ``ValueError`` if ``model`` cannot be trained by :class:`BatchedSolver`.

    Rejected: batch norm (any ``_BatchNorm``, including ``SyncBatchNorm``), instance norm with
    ``track_running_stats=True`` (both keep running statistics updated in the forward pass),
    dropout of any kind (vectorised clients would share one random stream) and frozen parameters
    (``requires_grad=False``). Group norm, layer norm and instance norm without running statistics
    are per sample and accepted.

    Parameters
    ----------
    model : nn.Module
        The template model.
    """
    for name, module in model.named_modules():
        where = f"module {name!r} ({type(module).__name__})" if name else type(module).__name__
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            raise ValueError(f"batched local training cannot vectorise {where}: batch norm mixes "
                             "the samples of a batch and updates running statistics; use the "
                             "sequential mode (one model per client)")
        if isinstance(module, nn.modules.instancenorm._InstanceNorm) and (
            module.track_running_stats
        ):
            raise ValueError(f"batched local training cannot vectorise {where} with "
                             "track_running_stats=True: its running statistics are updated in "
                             "the forward pass; use the sequential mode (one model per client)")
        if isinstance(module, nn.modules.dropout._DropoutNd):
            raise ValueError(f"batched local training cannot vectorise {where}: dropout needs "
                             "per-client randomness; use the sequential mode (one model per "
                             "client)")
    frozen = [name for name, p in model.named_parameters() if not p.requires_grad]
    if frozen:
        raise ValueError(f"batched local training updates every parameter, but {frozen} have "
                         "requires_grad=False; use the sequential mode (one model per client)")


def stack_batches(
    dataset_features: torch.Tensor,
    dataset_labels: torch.Tensor,
    batches: Sequence[torch.Tensor],
    *,
    width: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gather ``K`` clients' minibatches into padded tensors for :meth:`BatchedSolver.step`.

    Parameters
    ----------
    dataset_features : torch.Tensor
        ``[N, ...]`` features of the training set.
    dataset_labels : torch.Tensor
        ``[N]`` labels.
    batches : sequence of torch.Tensor
        ``K`` non-empty 1-D index tensors into the training set, e.g. from
        :class:`hflmpi.learn.local.BatchSampler`; their lengths may differ.
    width : int, optional
        Padded batch width ``B``; default the longest batch. A fixed width keeps the step's
        shapes the same across steps.

    Returns
    -------
    features : torch.Tensor
        ``[K, B, ...]``; row ``j >= counts[k]`` of client ``k`` repeats the client's first sample.
    labels : torch.Tensor
        ``[K, B]``, padded the same way.
    counts : torch.Tensor
        ``[K]`` int64, the number of valid rows of each client, on the features' device.
    """
    if len(batches) == 0:
        raise ValueError("stack_batches needs at least one client's batch")
    lengths = [int(b.numel()) for b in batches]
    if min(lengths) < 1:
        raise ValueError(f"every batch needs at least one index, got lengths {lengths}")
    b_max = max(lengths) if width is None else width
    if b_max < max(lengths):
        raise ValueError(f"width={width} is shorter than the longest batch ({max(lengths)})")
    device = dataset_features.device
    # One gather for all clients from the concatenated batches: row j of client k is its j-th
    # sample, or its first on padding rows.
    joined = torch.cat([b.reshape(-1) for b in batches]).to(device=device, dtype=torch.int64)
    sizes = torch.tensor(lengths, dtype=torch.int64, device=device)
    column = torch.arange(b_max, dtype=torch.int64, device=device)
    starts = (sizes.cumsum(0) - sizes).unsqueeze(1)
    inside = column < sizes.unsqueeze(1)
    flat_index = joined[(starts + torch.where(inside, column, 0)).reshape(-1)]
    features = dataset_features[flat_index].reshape(len(batches), b_max,
                                                    *dataset_features.shape[1:])
    labels = dataset_labels[flat_index.to(dataset_labels.device)].reshape(len(batches), b_max)
    return features, labels, sizes


class BatchedSolver:
    """K clients' local steps at once: parameters stacked along a leading client axis.

    Parameters
    ----------
    model : nn.Module
        A template: its architecture, dtype and device. Its own parameter values are never used
        or changed. It must pass :func:`check_batchable`.
    config : OptimConfig
        The ``[optim]`` section.
    max_clients : int
        Most clients loaded at once; the buffers are allocated for this many.
    compile : bool, optional
        Compile the vectorised gradient with :func:`torch.compile` (falls back to eager on any
        failure). Default: whether the environment variable ``HFLMPI_COMPILE_BATCHED`` is ``1``.

    Attributes
    ----------
    lr : float
        Current learning rate; set it each round from :func:`hflmpi.learn.local.lr_at`.
    steps : int
        Steps taken since the last :meth:`load`.
    clients : int
        Clients loaded by the last :meth:`load` (0 before).
    plan : tuple of StackedOp or None
        The model's layers for :func:`hflmpi.learn.stacked.stacked_forward`, or ``None`` where
        the eager step vectorises it with ``vmap`` (see the module docstring).
    dense : bool
        Whether the eager step differentiates ``plan`` by hand
        (:func:`hflmpi.learn.stacked.dense_gradients`).

    Notes
    -----
    Parameters, momentum, FedProx anchors and one gradient scratch are each a
    ``[max_clients, numel]`` buffer allocated once; client ``k``'s row holds its flat parameters
    in ``model.parameters()`` order (the layout of :func:`hflmpi.learn.flat.flatten_parameters`).

    A parameter that takes no part in the loss gets a zero gradient here, so weight decay and the
    proximal term still move it, where :class:`~hflmpi.learn.local.LocalSolver` skips parameters
    whose ``grad`` is ``None``.
    """

    def __init__(self, model: nn.Module, config: OptimConfig, max_clients: int,
                 compile: bool | None = None) -> None:
        check_batchable(model)
        if max_clients < 1:
            raise ValueError(f"max_clients={max_clients} must be >= 1")
        named = list(model.named_parameters())
        if not named:
            raise ValueError("the model has no parameters to train")
        first = named[0][1]
        if not first.dtype.is_floating_point:
            raise ValueError(f"batched training needs floating parameters, got {first.dtype}")
        for name, p in named:
            if p.dtype != first.dtype or p.device != first.device:
                raise ValueError(f"parameter {name!r} is {p.dtype} on {p.device}, but "
                                 f"{named[0][0]!r} is {first.dtype} on {first.device}; "
                                 "all parameters need one dtype and device")
        self.model = model
        self.config = config
        self.lr = config.lr
        self.steps = 0
        self.clients = 0
        self.max_clients = max_clients
        self.mu = config.mu if config.solver == "fedprox" else 0.0
        self.names = tuple(name for name, _ in named)
        self.shapes = tuple(tuple(p.shape) for _, p in named)
        self.offsets: tuple[int, ...] = ()
        offsets: list[int] = []
        total = 0
        for _, p in named:
            offsets.append(total)
            total += p.numel()
        self.offsets = tuple(offsets)
        self.numel = total
        self.dtype = first.dtype
        self.device = first.device

        def zeros() -> torch.Tensor:
            return torch.zeros((max_clients, total), dtype=self.dtype, device=self.device)

        self._params = zeros()
        self._grad = zeros()
        self._momentum = zeros() if config.momentum > 0 else None
        self._anchor = zeros() if self.mu > 0 else None
        self._vmapped_loss = vmap(self._client_loss)
        if compile is None:
            compile = os.environ.get(COMPILE_ENV, "") == "1"
        self._compiled: Callable[..., Any] | None = (
            torch.compile(vmap(grad_and_value(self._client_loss)), dynamic=True)
            if compile else None)
        self.plan = stacked_plan(model, self.names)
        self.dense = self.plan is not None and is_dense(self.plan)
        self._leaves: dict[str, torch.Tensor] = {}

    @property
    def stacked(self) -> bool:
        """Whether eager steps use :func:`hflmpi.learn.stacked.stacked_forward` (not ``vmap``)."""
        return self.plan is not None and self._compiled is None

    @property
    def compiled(self) -> bool:
        """Whether steps run the compiled gradient (False after a fallback to eager)."""
        return self._compiled is not None

    def _gradients(self, params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor,
                   mask: torch.Tensor, counts: torch.Tensor,
                   ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Return every client's gradient ``{name: [k, *shape]}`` and loss ``[k]``."""
        if self._compiled is not None:
            try:
                grads, losses = self._compiled(params, x, y, mask, counts)
                return dict(grads), losses
            except Exception as exc:  # noqa: BLE001 - any compiler failure: run eagerly
                _log.warning("hflmpi: the compiled batched step failed (%s: %s); running it "
                             "eagerly from now on", type(exc).__name__, exc)
                self._compiled = None
        leaves = {name: p.detach().requires_grad_() for name, p in params.items()}
        with torch.enable_grad():
            losses = self._vmapped_loss(leaves, x, y, mask, counts)
            grads = torch.autograd.grad(losses.sum(), list(leaves.values()), allow_unused=True)
        return {name: torch.zeros_like(leaf) if g is None else g  # unused: a zero gradient
                for (name, leaf), g in zip(leaves.items(), grads)}, losses

    def _stacked_gradients(self, x: torch.Tensor, y: torch.Tensor, pad: torch.Tensor,
                           counts: torch.Tensor) -> tuple[list[torch.Tensor | None], torch.Tensor]:
        """Return every client's gradients (``[k, *shape]``, names order) and losses ``[k]``."""
        assert self.plan is not None
        with torch.enable_grad():
            logits = stacked_forward(self.plan, self._leaves, x)
            losses = _row_losses(logits, y).masked_fill(pad, 0).sum(dim=1) / counts
            grads = torch.autograd.grad(losses.sum(), list(self._leaves.values()),
                                        allow_unused=True)
        return list(grads), losses

    def _client_loss(self, params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor,
                     mask: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
        """Return one client's mean cross-entropy over its valid rows (vmapped over clients)."""
        per_row = _row_losses(functional_call(self.model, params, (x,)), y)
        return torch.where(mask, per_row, torch.zeros_like(per_row)).sum() / count

    def _views(self, buffer: torch.Tensor, k: int) -> dict[str, torch.Tensor]:
        """Return ``{name: [k, *shape] view}`` of the first ``k`` rows of ``buffer``."""
        return {
            name: buffer[:k, offset:offset + _prod(shape)].view(k, *shape)
            for name, shape, offset in zip(self.names, self.shapes, self.offsets)
        }

    def load(self, starts: torch.Tensor, momentum: torch.Tensor | None = None) -> None:
        """Load ``K`` clients' parameters (and momentum) and anchor FedProx at them.

        Parameters
        ----------
        starts : torch.Tensor
            ``[K, numel]`` flat parameter vectors, ``K <= max_clients``.
        momentum : torch.Tensor, optional
            ``[K, numel]`` momentum buffers; default zeros. Only with ``optim.momentum > 0``.
        """
        if starts.dim() != 2 or starts.shape[1] != self.numel:
            raise ValueError(f"starts must be [K, {self.numel}], got {list(starts.shape)}")
        k = int(starts.shape[0])
        if not 1 <= k <= self.max_clients:
            raise ValueError(f"{k} clients loaded, but max_clients={self.max_clients}")
        with torch.no_grad():
            self._params[:k].copy_(starts)
            if self._anchor is not None:
                self._anchor[:k].copy_(starts)
            if momentum is not None:
                if self._momentum is None:
                    raise ValueError("momentum given, but optim.momentum is 0")
                if tuple(momentum.shape) != tuple(starts.shape):
                    raise ValueError(f"momentum must be {list(starts.shape)}, "
                                     f"got {list(momentum.shape)}")
                self._momentum[:k].copy_(momentum)
            elif self._momentum is not None:
                self._momentum[:k].zero_()
        self.clients = k
        self.steps = 0
        if self.plan is not None:
            # Leaves aliasing the parameter rows: the in-place update of a step is what the
            # next step's forward pass reads.
            self._leaves = {name: view.detach().requires_grad_()
                            for name, view in self._views(self._params, k).items()}

    def step(self, features: torch.Tensor, labels: torch.Tensor,
             counts: torch.Tensor) -> torch.Tensor:
        """Take one step for every loaded client and return their losses before the step.

        Parameters
        ----------
        features : torch.Tensor
            ``[K, B, ...]``; rows ``j >= counts[k]`` of client ``k`` are padding.
        labels : torch.Tensor
            ``[K, B]`` class indices; padding entries may hold anything.
        counts : torch.Tensor
            ``[K]`` valid rows per client, each in ``[1, B]``.

        Returns
        -------
        torch.Tensor
            ``[K]`` detached mean cross-entropies, one per client, before the step.
        """
        k = self.clients
        if k == 0:
            raise ValueError("load() the clients' parameters before step()")
        if features.dim() < 2 or features.shape[0] != k or tuple(labels.shape) != tuple(
            features.shape[:2]
        ) or tuple(counts.shape) != (k,):
            raise ValueError(f"step needs features [{k}, B, ...], labels [{k}, B] and counts "
                             f"[{k}], got {list(features.shape)}, {list(labels.shape)} and "
                             f"{list(counts.shape)}")
        width = int(features.shape[1])
        # Checked only where it costs no device sync (counts on the host, as stack_batches
        # makes them for a CPU dataset).
        if counts.device.type == "cpu" and not bool(((counts >= 1) & (counts <= width)).all()):
            raise ValueError(f"counts must lie in [1, {width}], got {counts.tolist()}")
        counts = counts.to(device=self.device)
        pad = torch.arange(width, device=self.device).unsqueeze(0) >= counts.unsqueeze(1)
        # Zeroing padding rows (not just masking their loss) keeps non-finite garbage out of
        # the backward pass, where 0 * inf would still give NaN.
        x = features.to(device=self.device, dtype=self.dtype)
        x = x.masked_fill(pad.view(k, width, *([1] * (x.dim() - 2))), 0)
        y = labels.to(self.device).masked_fill(pad, 0)
        if self.stacked and self.dense:
            assert self.plan is not None
            by_name, losses = dense_gradients(self.plan, self._leaves, x, y, pad,
                                              counts.to(self.dtype))
            listed = [by_name.get(name) for name in self.names]
        elif self.stacked:
            listed, losses = self._stacked_gradients(x, y, pad, counts.to(self.dtype))
        else:
            grads, losses = self._gradients(self._views(self._params, k), x, y, ~pad,
                                            counts.to(self.dtype))
            listed = [grads[name] for name in self.names]
        cfg = self.config
        with torch.no_grad():
            d = self._grad[:k]
            torch.cat([torch.zeros((k, _prod(shape)), dtype=self.dtype, device=self.device)
                       if g is None else g.reshape(k, -1) for g, shape in zip(listed, self.shapes)],
                      dim=1, out=d)
            w = self._params[:k]
            if cfg.weight_decay != 0.0:
                d.add_(w, alpha=cfg.weight_decay)
            if self._anchor is not None:
                d.add_(w - self._anchor[:k], alpha=self.mu)
            if self._momentum is not None:
                d = self._momentum[:k].mul_(cfg.momentum).add_(d)
            w.sub_(d, alpha=self.lr)
        self.steps += 1
        return losses.detach()

    def flat(self) -> torch.Tensor:
        """Return the loaded clients' parameters, ``[K, numel]`` (a view; copy to keep)."""
        return self._params[:self.clients]

    def momentum(self) -> torch.Tensor | None:
        """Return the loaded clients' momentum, ``[K, numel]`` (a view), or ``None`` without."""
        return None if self._momentum is None else self._momentum[:self.clients]

    def state_nbytes(self) -> int:
        """Return the bytes held in buffers: parameters, momentum, anchors and gradient scratch.

        Each is ``max_clients * numel`` entries of the model's dtype (momentum only with
        ``optim.momentum > 0``, anchors only with FedProx).
        """
        buffers: list[Any] = [self._params, self._grad, self._momentum, self._anchor]
        return sum(b.numel() * b.element_size() for b in buffers if b is not None)


def _row_losses(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Return the cross-entropy of every row of ``logits [..., classes]`` at labels ``y [...]``."""
    # log_softmax + gather is cross_entropy's own arithmetic; vmap batches it natively, where
    # cross_entropy goes through a Python decomposition on every call.
    log_probs = F.log_softmax(logits, dim=-1)
    return -log_probs.gather(-1, y.unsqueeze(-1)).squeeze(-1)


def _prod(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
