"""ClientTrainer, both modes, against a replay with torch.optim.SGD; and which batched path runs.

The reference shares no training code with hflmpi: one model and one ``torch.optim.SGD`` per
client (momentum and weight decay as in :mod:`hflmpi.learn.local`, momentum kept across periods
as with ``momentum_reset = "never"``), batches replayed from the documented sampler keys.
Clients hold different sample counts, so epochs end with a short batch at different steps.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hflmpi.config import ModelConfig, OptimConfig
from hflmpi.core.rng import torch_generator
from hflmpi.learn.batched import BatchedSolver
from hflmpi.learn.clients import ClientTrainer
from hflmpi.learn.data import TensorDataset
from hflmpi.learn.flat import flatten_parameters
from hflmpi.learn.local import LocalSolver
from hflmpi.learn.models import MLP, build_model
from hflmpi.learn.stacked import stacked_plan

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SIZES = (3, 5, 11, 17, 4)  # batch 4: partial last batches, epochs ending at different steps
BATCH = 4
SEED = 7
PERIODS = 2
STEPS = 5
CONFIG = OptimConfig(lr=0.05, momentum=0.9, weight_decay=1e-3, momentum_reset="never",
                     batch_size=BATCH)
# float32 training of 10 steps; the batched arithmetic sums in another order than one model
TOLERANCE = {"rtol": 2e-5, "atol": 2e-6}


def _setup(name: str, shape: tuple[int, ...]):
    g = torch.Generator().manual_seed(0)
    n = sum(SIZES)
    data = TensorDataset(torch.randn(n, *shape, generator=g), torch.randint(0, 10, (n,),
                                                                            generator=g), 10)
    bounds = np.cumsum((0,) + SIZES)
    parts = [np.arange(bounds[c], bounds[c + 1]) for c in range(len(SIZES))]
    model = build_model(ModelConfig(name=name, hidden=(16,)), shape, 10, seed=0)
    base = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    starts = [[base + 0.05 * torch.randn(base.numel(), generator=g) for _ in SIZES]
              for _ in range(PERIODS)]
    return data, parts, model, starts


def _reference(model, data, parts, starts):
    """Each client replayed alone: final flat models, mean losses and samples per period."""
    periods = [({}, {}, {}) for _ in range(PERIODS)]
    for c, part in enumerate(parts):
        client = copy.deepcopy(model)
        opt = torch.optim.SGD(client.parameters(), lr=CONFIG.lr, momentum=CONFIG.momentum,
                              weight_decay=CONFIG.weight_decay)
        epoch, offset = 0, 0
        for period in range(PERIODS):
            with torch.no_grad():
                torch.nn.utils.vector_to_parameters(starts[period][c].clone(), client.parameters())
            total, samples = 0.0, 0
            for _ in range(STEPS):
                if offset >= len(part):
                    epoch, offset = epoch + 1, 0
                order = torch.as_tensor(part)[torch.randperm(len(part), generator=torch_generator(
                    SEED, purpose="batches", rank=c, round=epoch))]
                batch = order[offset:offset + BATCH]
                offset += len(batch)
                opt.zero_grad()
                loss = F.cross_entropy(client(data.features[batch]), data.labels[batch])
                loss.backward()
                opt.step()
                total += float(loss.detach())
                samples += len(batch)
            models, losses, counts = periods[period]
            models[c] = torch.nn.utils.parameters_to_vector(client.parameters()).detach()
            losses[c] = total / STEPS
            counts[c] = samples
    return periods


@pytest.mark.parametrize("mode", ["sequential", "batched"])
@pytest.mark.parametrize("name, shape", [("mlp", (64,)), ("cnn", (1, 8, 8))])
def test_client_trainer_matches_one_sgd_per_client(name, shape, mode):
    data, parts, model, starts = _setup(name, shape)
    want = _reference(model, data, parts, starts)
    clients = list(range(len(SIZES)))
    trainer = ClientTrainer(model, flatten_parameters(model), CONFIG, data, parts, clients,
                            SEED, mode=mode, batch_clients=4)  # batched: a group of 4, then 1
    for period in range(PERIODS):
        got = trainer.train(clients, lambda c, p=period: starts[p][c], STEPS)
        models, losses, samples = want[period]
        assert got.samples == samples
        for c in clients:
            torch.testing.assert_close(got.models[c], models[c], **TOLERANCE,
                                       msg=f"{mode} client {c} period {period}")
            assert got.losses[c] == pytest.approx(losses[c], rel=1e-5)
    assert not torch.allclose(got.models[0], starts[-1][0])


def _plan_kind(model: nn.Module) -> str:
    solver = BatchedSolver(model, OptimConfig(), max_clients=2, compile=False)
    return "dense" if solver.dense else "stacked" if solver.stacked else "vmap"


class _Shared(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(8, 8)
        self.net = nn.Sequential(nn.Flatten(), self.layer, nn.ReLU(), self.layer)


class _OwnForward(MLP):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * 2


@pytest.mark.parametrize("model, kind", [
    (build_model(ModelConfig(name="mlp", hidden=(16, 8)), (64,), 10, seed=0), "dense"),
    (build_model(ModelConfig(name="logreg"), (64,), 10, seed=0), "dense"),
    (nn.Sequential(nn.Flatten(), nn.Linear(8, 4), nn.Tanh(), nn.Linear(4, 3, bias=False)),
     "dense"),
    (build_model(ModelConfig(name="cnn", hidden=(16,)), (1, 8, 8), 10, seed=0), "stacked"),
    (nn.Sequential(nn.Linear(8, 4), nn.GELU(), nn.Linear(4, 3)), "stacked"),
    (nn.Sequential(nn.Linear(8, 4), nn.LayerNorm(4), nn.Linear(4, 3)), "vmap"),
    (nn.Sequential(nn.Conv2d(1, 2, 3, padding_mode="circular", padding=1), nn.Flatten(),
                   nn.Linear(32, 3)), "vmap"),
    (_Shared().net, "vmap"),
    (_OwnForward(8, (4,), 3), "vmap"),
])
def test_each_model_takes_the_expected_batched_path(model, kind):
    assert _plan_kind(model) == kind
    if kind == "vmap":
        assert stacked_plan(model, [n for n, _ in model.named_parameters()]) is None


def _custom(kind: str) -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(1)
        if kind == "conv":  # grouped, strided, no bias; pooling and flatten between
            return nn.Sequential(nn.Unflatten(1, (2, 4, 4)),
                                 nn.Conv2d(2, 4, 3, stride=2, padding=1, groups=2, bias=False),
                                 nn.Tanh(), nn.AvgPool2d(2), nn.Flatten(), nn.Linear(4, 6),
                                 nn.GELU(), nn.Linear(6, 10))
        return nn.Sequential(nn.Flatten(), nn.Linear(32, 12), nn.Sigmoid(), nn.Identity(),
                             nn.Linear(12, 8), nn.Tanh(), nn.Linear(8, 10, bias=False))


@pytest.mark.parametrize("kind, path", [("conv", "stacked"), ("dense", "dense")])
def test_custom_sequentials_match_independent_local_solvers(kind, path):
    model = _custom(kind)
    assert _plan_kind(model) == path
    config = OptimConfig(lr=0.2, momentum=0.5, weight_decay=1e-2)
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(40, 32, generator=g), torch.randint(0, 10, (40,), generator=g)
    lengths = (6, 2, 6, 1)
    steps = [[torch.randperm(40, generator=g)[:n] for n in lengths] for _ in range(3)]
    base = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    starts = base + 0.1 * torch.randn(len(lengths), base.numel(), generator=g)
    want = []
    for k in range(len(lengths)):
        client = copy.deepcopy(model)
        flat = flatten_parameters(client)
        with torch.no_grad():
            flat.flat.copy_(starts[k])
        local = LocalSolver(client, config)
        for step in steps:
            local.step(x[step[k]], y[step[k]])
        want.append(flat.flat.detach().clone())
    from hflmpi.learn.batched import stack_batches

    solver = BatchedSolver(model, config, max_clients=len(lengths), compile=False)
    solver.load(starts)
    for step in steps:
        solver.step(*stack_batches(x, y, step, width=6))
    torch.testing.assert_close(solver.flat(), torch.stack(want), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(solver.flat(), starts, atol=1e-3)
