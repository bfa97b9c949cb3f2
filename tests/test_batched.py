"""The batched solver against K independent LocalSolver runs, one model per client."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from hflmpi.config import ModelConfig, OptimConfig
from hflmpi.learn.batched import BatchedSolver, check_batchable, stack_batches
from hflmpi.learn.flat import flatten_parameters
from hflmpi.learn.local import LocalSolver
from hflmpi.learn.models import build_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")

K = 5
WIDTH = 8
LENGTHS = (8, 3, 8, 5, 1)  # ragged: three clients shorter than the padded width
STEPS = 3
TOLERANCE = {torch.float32: {"rtol": 1e-5, "atol": 1e-6},
             torch.float64: {"rtol": 1e-12, "atol": 1e-12}}

MODELS = [("logreg", (64,)), ("mlp", (64,)), ("cnn", (1, 8, 8))]
SOLVERS = {
    "sgd": OptimConfig(lr=0.1),
    "momentum_wd": OptimConfig(lr=0.1, momentum=0.9, weight_decay=1e-2),
    "fedprox": OptimConfig(lr=0.1, solver="fedprox", mu=0.1),
    "fedprox_momentum": OptimConfig(lr=0.1, solver="fedprox", mu=0.1, momentum=0.9,
                                    weight_decay=1e-3),
}


def _data(shape, n=60, classes=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=g), torch.randint(0, classes, (n,), generator=g)


def _batches(n, seed):
    """STEPS rounds of K index tensors with the ragged LENGTHS."""
    g = torch.Generator().manual_seed(100 + seed)
    return [[torch.randperm(n, generator=g)[:length] for length in LENGTHS]
            for _ in range(STEPS)]


def _starts(model, dtype, seed=1):
    """K different flat starting points around the model's own initialisation."""
    base = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).to(dtype)
    g = torch.Generator().manual_seed(seed)
    return base + 0.05 * torch.randn(K, base.numel(), generator=g, dtype=dtype)


def _reference(model, config, starts, x, y, batches):
    """K sequential LocalSolver runs on the unpadded batches: final flats and losses."""
    flats, losses = [], []
    for k in range(K):
        client = copy.deepcopy(model)
        flat = flatten_parameters(client)
        with torch.no_grad():
            flat.flat.copy_(starts[k])
        solver = LocalSolver(client, config)
        client_losses = []
        for step in batches:
            client_losses.append(solver.step(x[step[k]], y[step[k]]))
        flats.append(flat.flat.detach().clone())
        losses.append(torch.stack(client_losses))
    return torch.stack(flats), torch.stack(losses, dim=1)  # [K, numel], [STEPS, K]


def _batched(model, config, starts, x, y, batches):
    solver = BatchedSolver(model, config, max_clients=K + 2)
    solver.load(starts)
    losses = [solver.step(*stack_batches(x, y, step, width=WIDTH)) for step in batches]
    return solver.flat().clone(), torch.stack(losses)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("solver", sorted(SOLVERS))
@pytest.mark.parametrize("name, shape", MODELS)
def test_batched_steps_equal_independent_local_solvers(name, shape, solver, dtype):
    config = SOLVERS[solver]
    model = build_model(ModelConfig(name=name, hidden=(16,)), shape, 10, seed=0).to(dtype)
    x, y = _data(shape)
    batches = _batches(len(x), seed=len(name))
    starts = _starts(model, dtype)
    want_flat, want_losses = _reference(model, config, starts, x, y, batches)
    got_flat, got_losses = _batched(model, config, starts, x, y, batches)
    assert got_flat.dtype == dtype and got_flat.shape == want_flat.shape
    torch.testing.assert_close(got_flat, want_flat, **TOLERANCE[dtype])
    torch.testing.assert_close(got_losses, want_losses, **TOLERANCE[dtype])
    # The clients really moved, and apart: equality above is not just "nothing happened".
    assert not torch.allclose(got_flat, starts)
    assert not torch.allclose(got_flat[0], got_flat[1])


def test_padding_garbage_changes_nothing():
    model = build_model(ModelConfig(name="mlp", hidden=(16,)), (64,), 10, seed=0)
    config = SOLVERS["momentum_wd"]
    x, y = _data((64,))
    starts = _starts(model, torch.float32)
    results = []
    for garbage in (False, True):
        solver = BatchedSolver(model, config, max_clients=K)
        solver.load(starts)
        losses = []
        for step in _batches(len(x), seed=3):
            features, labels, counts = stack_batches(x, y, step, width=WIDTH)
            if garbage:
                pad = torch.arange(WIDTH).unsqueeze(0) >= counts.unsqueeze(1)
                assert pad.any()
                features[pad] = 1e30
                features[pad.nonzero()[0, 0], pad.nonzero()[0, 1], 0] = float("nan")
                labels[pad] = 10**6
            losses.append(solver.step(features, labels, counts))
        results.append((solver.flat().clone(), torch.stack(losses)))
    assert torch.isfinite(results[1][0]).all()
    assert torch.equal(results[0][0], results[1][0])
    assert torch.equal(results[0][1], results[1][1])


def test_load_momentum_and_reload_fewer_clients():
    model = build_model(ModelConfig(name="logreg"), (64,), 10, seed=0)
    config = OptimConfig(lr=0.1, momentum=0.5)
    x, y = _data((64,))
    starts = _starts(model, torch.float32)
    momentum = 0.01 * torch.ones_like(starts)
    solver = BatchedSolver(model, config, max_clients=K)
    solver.load(starts, momentum)
    batch = [torch.arange(4) + k for k in range(K)]
    solver.step(*stack_batches(x, y, batch))
    # Reference for client 2 with the same incoming momentum.
    client = copy.deepcopy(model)
    flat = flatten_parameters(client)
    with torch.no_grad():
        flat.flat.copy_(starts[2])
    local = LocalSolver(client, config)
    local.restore_momentum(momentum[2].numpy())
    local.step(x[batch[2]], y[batch[2]])
    torch.testing.assert_close(solver.flat()[2], flat.flat, rtol=1e-5, atol=1e-6)
    got_momentum = solver.momentum()
    assert got_momentum is not None
    want_momentum = torch.cat([b.reshape(-1) for b in local.momentum_buffers])
    torch.testing.assert_close(got_momentum[2], want_momentum, rtol=1e-5, atol=1e-6)
    solver.load(starts[:2])  # fewer clients: momentum restarts at zero
    assert solver.flat().shape == (2, starts.shape[1])
    assert torch.equal(solver.momentum(), torch.zeros(2, starts.shape[1]))
    numel = starts.shape[1]
    assert solver.state_nbytes() == 3 * K * numel * 4  # params, gradient scratch, momentum


def test_bad_shapes_and_counts_are_rejected():
    model = build_model(ModelConfig(name="logreg"), (64,), 10, seed=0)
    solver = BatchedSolver(model, OptimConfig(lr=0.1), max_clients=2)
    x, y = _data((64,))
    with pytest.raises(ValueError, match="load"):
        solver.step(x[:4].view(2, 2, 64), y[:4].view(2, 2), torch.tensor([2, 2]))
    starts = _starts(model, torch.float32)
    with pytest.raises(ValueError, match="max_clients=2"):
        solver.load(starts[:3])
    with pytest.raises(ValueError, match="momentum"):
        solver.load(starts[:2], torch.zeros_like(starts[:2]))
    solver.load(starts[:2])
    for counts in ([0, 2], [2, 3]):
        with pytest.raises(ValueError, match="counts"):
            solver.step(x[:4].view(2, 2, 64), y[:4].view(2, 2), torch.tensor(counts))
    with pytest.raises(ValueError, match="width=1"):
        stack_batches(x, y, [torch.arange(2)], width=1)


class _Net(nn.Module):
    def __init__(self, middle: nn.Module) -> None:
        super().__init__()
        self.inp = nn.Linear(8, 4)
        self.middle = middle
        self.out = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.middle(self.inp(x)))


@pytest.mark.parametrize("middle, kind", [
    (nn.BatchNorm1d(4), "BatchNorm1d"),
    (nn.Sequential(nn.Unflatten(1, (4, 1)), nn.InstanceNorm1d(4, track_running_stats=True),
                   nn.Flatten()), "InstanceNorm1d"),
    (nn.Dropout(0.5), "Dropout"),
    (nn.AlphaDropout(0.5), "AlphaDropout"),
])
def test_cross_sample_state_and_dropout_are_rejected(middle, kind):
    with pytest.raises(ValueError, match=f"{kind}.*sequential mode"):
        check_batchable(_Net(middle))
    with pytest.raises(ValueError, match=kind):
        BatchedSolver(_Net(middle), OptimConfig(), max_clients=2)


def test_frozen_parameters_are_rejected():
    net = _Net(nn.Identity())
    net.inp.bias.requires_grad_(False)
    with pytest.raises(ValueError, match="inp.bias"):
        check_batchable(net)


def test_per_sample_norms_are_accepted_and_match():
    # Layer norm and group norm only look at one sample: vectorising them is exact.
    with torch.random.fork_rng():  # a fixed initialisation: the test must not depend on luck
        torch.manual_seed(3)
        model = _Net(nn.Sequential(nn.LayerNorm(4), nn.Unflatten(1, (4, 1)),
                                   nn.GroupNorm(2, 4), nn.Flatten(), nn.Tanh()))
    check_batchable(model)
    config = SOLVERS["momentum_wd"]
    x, y = _data((8,), classes=3)
    batches = _batches(len(x), seed=5)
    starts = _starts(model, torch.float32)
    want_flat, want_losses = _reference(model, config, starts, x, y, batches)
    got_flat, got_losses = _batched(model, config, starts, x, y, batches)
    # a norm over 2 values divides by a small spread, which magnifies float32 rounding
    torch.testing.assert_close(got_flat, want_flat, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got_losses, want_losses, rtol=1e-4, atol=1e-5)
