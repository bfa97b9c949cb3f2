"""The clients one rank holds: their samplers, optimizer state and local training.

A period of local training starts every participating client from its layer-1 node's model and
runs ``tau_1`` steps on its own minibatches (:class:`hflmpi.learn.local.BatchSampler`, keyed by
the client id, so a client draws the same batches on whichever rank it lives). Two modes:

* ``sequential``: one model; each client's parameters (and momentum, where the solver keeps it
  across aggregations) are copied in, trained with :class:`hflmpi.learn.local.LocalSolver`, and
  copied out. Works for any model; the result is the same bits as a rank that holds that client
  alone.
* ``batched``: up to ``batch_clients`` clients as one vectorised computation
  (:class:`hflmpi.learn.batched.BatchedSolver`); equal to sequential up to float rounding.

Per-client state is kept only where the solver needs it: the sampler position of every client
that has trained, and a momentum buffer per client only with ``optim.momentum > 0`` and
``momentum_reset = "never"``; :meth:`ClientTrainer.state_nbytes` reports its memory.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from hflmpi.config import OptimConfig
from hflmpi.learn.data import TensorDataset
from hflmpi.learn.flat import FlatParameters
from hflmpi.learn.local import BatchSampler, LocalSolver

__all__ = ["ClientTrainer", "PeriodResult"]


@dataclass
class PeriodResult:
    """What one period of local training gave on this rank.

    Attributes
    ----------
    models : dict of int to Tensor
        Each trained client's flat model.
    losses : dict of int to float
        Each trained client's mean training loss over the period.
    samples : dict of int to int
        Samples each client trained on.
    """

    models: dict[int, torch.Tensor]
    losses: dict[int, float]
    samples: dict[int, int]


class ClientTrainer:
    """Local training of the clients on this rank.

    Parameters
    ----------
    model : nn.Module
        The model, bound to ``params`` (:func:`hflmpi.learn.flat.flatten_parameters`).
    params : FlatParameters
        Its flat parameter buffer.
    config : OptimConfig
        The ``[optim]`` section.
    train_set : TensorDataset
        The training samples (every rank holds all; clients own index sets).
    parts : sequence of arrays
        ``parts[c]``: the sample indices of client ``c`` (the whole population's partition).
    clients : sequence of int
        The clients on this rank.
    seed : int
        Run seed (keys each client's batches).
    mode : {"sequential", "batched"}
        How a period trains several clients.
    batch_clients : int
        ``batched``: most clients per vectorised computation.
    """

    def __init__(self, model: torch.nn.Module, params: FlatParameters, config: OptimConfig,
                 train_set: TensorDataset, parts: Sequence[np.ndarray], clients: Sequence[int],
                 seed: int, mode: str = "sequential", batch_clients: int = 64) -> None:
        self.model = model
        self.params = params
        self.config = config
        self.train_set = train_set
        self.parts = parts
        self.clients = list(clients)
        self.seed = seed
        self.mode = mode
        self.batch_clients = batch_clients
        self.solver = LocalSolver(model, config)
        self.keeps_momentum = config.momentum > 0 and config.momentum_reset == "never"
        self.momentum: dict[int, torch.Tensor] = {}
        self._samplers: dict[int, BatchSampler] = {}
        self._batched = None
        if mode == "batched":
            from hflmpi.learn.batched import BatchedSolver, check_batchable

            check_batchable(model)
            self._batched = BatchedSolver(model, config, min(batch_clients, len(self.clients)))

    @property
    def lr(self) -> float:
        """The learning rate of the next steps."""
        return self.solver.lr

    @lr.setter
    def lr(self, value: float) -> None:
        self.solver.lr = value
        if self._batched is not None:
            self._batched.lr = value

    def sampler(self, client: int) -> BatchSampler:
        """Return ``client``'s batch sampler (made on first use)."""
        sampler = self._samplers.get(client)
        if sampler is None:
            sampler = BatchSampler(self.parts[client], self.config.batch_size, seed=self.seed,
                                   client=client)
            self._samplers[client] = sampler
        return sampler

    def positions(self) -> dict[int, tuple[int, int]]:
        """Return ``(epoch, offset)`` of every client on this rank that has a sampler."""
        return {c: (s.epoch, s.offset) for c, s in self._samplers.items()}

    def load_positions(self, positions: dict[int, tuple[int, int]]) -> None:
        """Restore sampler positions saved by :meth:`positions`."""
        for client, (epoch, offset) in positions.items():
            self.sampler(client).load_state_dict({"epoch": epoch, "offset": offset})

    def state_nbytes(self) -> int:
        """Return the bytes of per-client state this rank holds (momentum and sampler orders)."""
        momentum = sum(m.numel() * m.element_size() for m in self.momentum.values())
        orders = sum(s.indices.numel() * 16 for s in self._samplers.values())
        batched = self._batched.state_nbytes() if self._batched is not None else 0
        return momentum + orders + batched

    def train(self, clients: Sequence[int], start_of: Callable[[int], torch.Tensor],
              steps: int) -> PeriodResult:
        """Train ``clients`` (on this rank) for ``steps`` local steps each from their start models."""
        if self._batched is None or len(clients) < 2:
            return self._train_sequential(clients, start_of, steps)
        result = PeriodResult({}, {}, {})
        for first in range(0, len(clients), self.batch_clients):
            self._train_batched(clients[first:first + self.batch_clients], start_of, steps, result)
        return result

    def _train_sequential(self, clients: Sequence[int], start_of: Callable[[int], torch.Tensor],
                          steps: int) -> PeriodResult:
        result = PeriodResult({}, {}, {})
        flat, solver, data = self.params.flat, self.solver, self.train_set
        for client in clients:
            with torch.no_grad():
                flat.copy_(start_of(client))
            solver.on_aggregation()  # FedProx anchor; zeroes momentum with reset="aggregation"
            if self.keeps_momentum:
                self._load_momentum(client)
            sampler, total, samples = self.sampler(client), torch.zeros((), dtype=torch.float64), 0
            for _ in range(steps):
                batch = next(sampler)
                total += solver.step(data.features[batch], data.labels[batch]).double().cpu()
                samples += batch.numel()
            if self.keeps_momentum:
                self._save_momentum(client)
            result.models[client] = flat.detach().clone()
            result.losses[client] = float(total) / steps if steps else math.nan
            result.samples[client] = samples
        return result

    def _train_batched(self, clients: Sequence[int], start_of: Callable[[int], torch.Tensor],
                       steps: int, result: PeriodResult) -> None:
        from hflmpi.learn.batched import stack_batches

        batched = self._batched
        assert batched is not None
        starts = torch.stack([start_of(c) for c in clients])
        momentum = (torch.stack([self._momentum_of(c) for c in clients])
                    if self.keeps_momentum else None)
        batched.load(starts, momentum)
        total = torch.zeros(len(clients), dtype=torch.float64)
        samples = np.zeros(len(clients), dtype=np.int64)
        data, samplers = self.train_set, [self.sampler(c) for c in clients]
        for _ in range(steps):
            batches = [next(s) for s in samplers]
            features, labels, counts = stack_batches(data.features, data.labels, batches)
            total.add_(batched.step(features, labels, counts).cpu())
            samples += [b.numel() for b in batches]  # host sizes: no device sync on a GPU
        trained = batched.flat()
        kept = batched.momentum() if self.keeps_momentum else None
        for i, client in enumerate(clients):
            result.models[client] = trained[i].detach().clone()
            result.losses[client] = float(total[i]) / steps if steps else math.nan
            result.samples[client] = int(samples[i])
            if kept is not None:
                self.momentum[client] = kept[i].detach().clone()

    def _momentum_of(self, client: int) -> torch.Tensor:
        buffer = self.momentum.get(client)
        if buffer is None:
            buffer = torch.zeros_like(self.params.flat)
            self.momentum[client] = buffer
        return buffer

    def _load_momentum(self, client: int) -> None:
        flat, offset = self._momentum_of(client), 0
        with torch.no_grad():
            for buffer in self.solver.momentum_buffers:
                n = buffer.numel()
                buffer.copy_(flat[offset:offset + n].view_as(buffer))
                offset += n

    def _save_momentum(self, client: int) -> None:
        flat, offset = self._momentum_of(client), 0
        with torch.no_grad():
            for buffer in self.solver.momentum_buffers:
                n = buffer.numel()
                flat[offset:offset + n].copy_(buffer.reshape(-1))
                offset += n
