"""The local solver on each device: SGD with momentum and weight decay, or FedProx.

The update is written out as tensor operations on the parameters, in place, so the parameters can
stay views into one flat buffer (see :mod:`hflmpi.learn.flat`). For parameters ``w``, gradient ``g`` of
the minibatch cross-entropy, learning rate ``lr``::

    d = g + weight_decay * w + mu * (w - w_anchor)      # mu = 0 for plain SGD
    b = momentum * b + d                                 # b = d when momentum = 0
    w = w - lr * b

``w_anchor`` is the model received at the last aggregation: FedProx (Li et al., MLSys 2020) adds
``mu/2 ||w - w_anchor||^2`` to the local objective. Minibatches come from :class:`BatchSampler`,
whose per-epoch shuffles are keyed ``(seed, "batches", rank=client, round=epoch)`` so a serial
reference can replay a distributed run batch for batch.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from hflmpi.config import OptimConfig
from hflmpi.core.rng import torch_generator
from hflmpi.learn.data import TensorDataset

__all__ = ["LocalSolver", "BatchSampler", "lr_at", "evaluate"]


def lr_at(round: int, config: OptimConfig, total_rounds: int) -> float:
    """Return the learning rate for global round ``round`` (0-based).

    ``constant``: ``lr``. ``step``: ``lr * lr_gamma ** (round // lr_step_rounds)``.
    ``cosine``: ``lr * (1 + cos(pi * round / total_rounds)) / 2``, from ``lr`` at round 0 towards 0
    (positive for every round below ``total_rounds``).
    """
    if round < 0 or total_rounds < 1:
        raise ValueError(f"round={round} and total_rounds={total_rounds} must be >= 0 and >= 1")
    if config.lr_schedule == "constant":
        return config.lr
    if config.lr_schedule == "step":
        return config.lr * config.lr_gamma ** (round // config.lr_step_rounds)
    if config.lr_schedule == "cosine":
        return config.lr * 0.5 * (1.0 + math.cos(math.pi * min(round, total_rounds) / total_rounds))
    raise ValueError(f"unknown optim.lr_schedule {config.lr_schedule!r}")  # pragma: no cover


class LocalSolver:
    """SGD / FedProx steps on a model's parameters, updated in place.

    Parameters
    ----------
    model : nn.Module
        The device's model; its parameters are never replaced, only written in place.
    config : OptimConfig
        The ``[optim]`` section.

    Notes
    -----
    Build the solver after the model has its final dtype, device and flat binding
    (:func:`hflmpi.learn.flat.flatten_parameters`): momentum and anchor buffers are allocated here, like
    the parameters. The anchor starts as the model at construction.

    Attributes
    ----------
    lr : float
        Current learning rate; set it each round from :func:`lr_at`.
    steps : int
        Steps taken so far.
    """

    def __init__(self, model: nn.Module, config: OptimConfig) -> None:
        self.model = model
        self.config = config
        self.lr = config.lr
        self.steps = 0
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.mu = config.mu if config.solver == "fedprox" else 0.0
        self.momentum_buffers = (
            [torch.zeros_like(p) for p in self.params] if config.momentum > 0 else []
        )
        with torch.no_grad():
            self.anchor = [p.detach().clone() for p in self.params] if self.mu > 0 else []

    def loss(self, batch_x: torch.Tensor, batch_y: torch.Tensor) -> torch.Tensor:
        """Return the mean cross-entropy of the model on a batch (with autograd).

        The features are cast to the parameters' dtype first (a no-op when they match), so a
        float64 model (``run.dtype = "float64"``) accepts the float32 features of the loaders.
        """
        dtype = self.params[0].dtype if self.params else batch_x.dtype
        return F.cross_entropy(self.model(batch_x.to(dtype)), batch_y)

    def step(self, batch_x: torch.Tensor, batch_y: torch.Tensor) -> torch.Tensor:
        """Take one step on a minibatch and return its loss before the step.

        Returns
        -------
        torch.Tensor
            The detached 0-dim loss; kept as a tensor so a CUDA step needs no host sync
            (call ``float()`` on it when needed).
        """
        self.model.zero_grad(set_to_none=True)
        loss = self.loss(batch_x, batch_y)
        loss.backward()
        cfg = self.config
        with torch.no_grad():
            for i, p in enumerate(self.params):
                if p.grad is None:
                    continue
                d = p.grad
                if cfg.weight_decay != 0.0:
                    d = d.add(p, alpha=cfg.weight_decay)
                if self.mu != 0.0:
                    d = d.add(p - self.anchor[i], alpha=self.mu)
                if self.momentum_buffers:
                    d = self.momentum_buffers[i].mul_(cfg.momentum).add_(d)
                p.sub_(d, alpha=self.lr)
        self.steps += 1
        return loss.detach()

    def on_aggregation(self) -> None:
        """Note that the model was replaced by an aggregate.

        Sets the FedProx anchor to it and, with ``momentum_reset="aggregation"``, zeroes the
        momentum buffers.
        """
        with torch.no_grad():
            for anchor, p in zip(self.anchor, self.params):
                anchor.copy_(p)
            if self.config.momentum_reset == "aggregation":
                for buffer in self.momentum_buffers:
                    buffer.zero_()

    def state_dict(self) -> dict[str, Any]:
        """Return the solver state (momentum, anchor, lr, steps) for a checkpoint."""
        return {
            "lr": self.lr,
            "steps": self.steps,
            "momentum": [b.detach().clone() for b in self.momentum_buffers],
            "anchor": [a.detach().clone() for a in self.anchor],
        }

    def checkpoint_momentum(self) -> np.ndarray | None:
        """Return the momentum buffers as one flat array for a checkpoint, or ``None``.

        ``None`` when there is no momentum or it is zeroed at every aggregation (a checkpoint is
        always written right after one), so there is nothing to save.
        """
        if not self.momentum_buffers or self.config.momentum_reset == "aggregation":
            return None
        return torch.cat([b.detach().reshape(-1).cpu() for b in self.momentum_buffers]).numpy()

    def restore_momentum(self, flat: np.ndarray) -> None:
        """Load momentum buffers from the flat array :meth:`checkpoint_momentum` returned."""
        offset = 0
        with torch.no_grad():
            for buffer in self.momentum_buffers:
                n = buffer.numel()
                buffer.copy_(torch.from_numpy(np.asarray(flat[offset:offset + n])).view_as(buffer))
                offset += n

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the state written by :meth:`state_dict` (shapes must match)."""
        for key, mine in (("momentum", self.momentum_buffers), ("anchor", self.anchor)):
            theirs = state[key]
            if len(theirs) != len(mine):
                raise ValueError(
                    f"solver state has {len(theirs)} {key} tensors, expected {len(mine)}"
                )
            with torch.no_grad():
                for dst, src in zip(mine, theirs):
                    dst.copy_(torch.as_tensor(src))
        self.lr = float(state["lr"])
        self.steps = int(state["steps"])


class BatchSampler:
    """An endless stream of minibatch indices over one client's samples.

    Each local epoch is a fresh permutation of the client's indices drawn from
    ``torch_generator(seed, purpose="batches", rank=client, round=epoch)``; an epoch is cut into
    consecutive batches of ``batch_size`` (the last may be smaller) and batches never span two
    epochs. The sampler's position is ``(epoch, offset)``, saved by :meth:`state_dict`.

    Parameters
    ----------
    indices : array of int
        The client's sample indices into the training set.
    batch_size : int
        Samples per batch (clipped to the client's size).
    seed : int
        Run seed.
    client : int
        Client id (its rank).
    """

    def __init__(self, indices: np.ndarray | torch.Tensor, batch_size: int, *, seed: int,
                 client: int) -> None:
        self.indices = torch.as_tensor(np.asarray(indices), dtype=torch.int64)
        if self.indices.dim() != 1 or self.indices.numel() == 0:
            raise ValueError(f"client {client} has no samples; every client needs at least one")
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        self.batch_size = batch_size
        self.seed = seed
        self.client = client
        self.epoch = 0
        self.offset = 0
        self._order = self.epoch_order(0)

    def __len__(self) -> int:
        """Return the number of batches per epoch."""
        return -(-self.indices.numel() // self.batch_size)

    def epoch_order(self, epoch: int) -> torch.Tensor:
        """Return the client's indices in the order of local epoch ``epoch``."""
        generator = torch_generator(self.seed, purpose="batches", rank=self.client, round=epoch)
        return self.indices[torch.randperm(self.indices.numel(), generator=generator)]

    def __iter__(self) -> Iterator[torch.Tensor]:
        return self

    def __next__(self) -> torch.Tensor:
        if self.offset >= self._order.numel():
            self.epoch += 1
            self.offset = 0
            self._order = self.epoch_order(self.epoch)
        batch = self._order[self.offset:self.offset + self.batch_size]
        self.offset += batch.numel()
        return batch

    def state_dict(self) -> dict[str, int]:
        """Return the position ``{"epoch", "offset"}``."""
        return {"epoch": self.epoch, "offset": self.offset}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Resume at a position saved by :meth:`state_dict`."""
        self.epoch = int(state["epoch"])
        self.offset = int(state["offset"])
        self._order = self.epoch_order(self.epoch)


def evaluate(
    model: nn.Module, dataset: TensorDataset, batch_size: int = 1024
) -> tuple[float, float]:
    """Return the mean cross-entropy and the accuracy of ``model`` on ``dataset``.

    Batches are moved to the device of the model's first parameter; the model's training mode is
    restored afterwards.
    """
    if len(dataset) == 0:
        raise ValueError("cannot evaluate on an empty dataset")
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    was_training = model.training
    model.eval()
    total_loss = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    with torch.no_grad():
        for start in range(0, len(dataset), batch_size):
            x = dataset.features[start:start + batch_size].to(device=device, dtype=dtype)
            y = dataset.labels[start:start + batch_size].to(device)
            logits = model(x)
            total_loss += F.cross_entropy(logits, y, reduction="sum").double()
            correct += (logits.argmax(dim=1) == y).sum()
    model.train(was_training)
    n = len(dataset)
    return float(total_loss) / n, int(correct) / n
