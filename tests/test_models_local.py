"""Serial tests of the models and the local solver against hand-computed numpy updates."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from hflmpi.config import ModelConfig, OptimConfig
from hflmpi.learn.data import TensorDataset, load_digits
from hflmpi.learn.local import BatchSampler, LocalSolver, evaluate, lr_at
from hflmpi.learn.models import build_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class WithInit(nn.Module):
    """An import-path model that initialises itself (used via "test_models_local:WithInit")."""

    def __init__(self, width: int = 3) -> None:
        super().__init__()
        self.lin = nn.Linear(4, width)

    def init_parameters(self, generator: torch.Generator) -> None:
        self.lin.weight.fill_(0.5)
        self.lin.bias.normal_(generator=generator)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x)


def _params(model):
    return [p.detach().clone() for p in model.parameters()]


# --------------------------------------------------------------------------------------------
# models


@pytest.mark.parametrize("name, shape", [
    ("logreg", (20,)), ("mlp", (1, 8, 8)), ("mlp", (20,)),
    ("cnn", (1, 8, 8)), ("cnn", (1, 28, 28)), ("cnn", (3, 32, 32)),
])
def test_models_build_and_give_logits(name, shape):
    model = build_model(ModelConfig(name=name, hidden=(16,)), shape, 7, seed=0)
    assert model(torch.zeros(2, *shape)).shape == (2, 7)


def test_init_is_seeded_and_leaves_global_rng_alone():
    state = torch.get_rng_state()
    a = build_model(ModelConfig(name="cnn"), (1, 8, 8), 10, seed=1)
    assert torch.equal(torch.get_rng_state(), state)
    b = build_model(ModelConfig(name="cnn"), (1, 8, 8), 10, seed=1)
    c = build_model(ModelConfig(name="cnn"), (1, 8, 8), 10, seed=2)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
    assert not all(torch.equal(x, y) for x, y in zip(a.parameters(), c.parameters()))
    weight = a.head.net[0].weight.detach()  # fan_in = 64 * 2 * 2
    assert float(weight.abs().max()) <= 1 / math.sqrt(256) and float(weight.std()) > 0.01


def test_import_path_models():
    cfg = ModelConfig(name="torch.nn:Linear", kwargs={"in_features": 4, "out_features": 2})
    state = torch.get_rng_state()
    a = build_model(cfg, (4,), 2, seed=3)
    b = build_model(cfg, (4,), 2, seed=3)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a.weight, b.weight) and isinstance(a, nn.Linear)
    custom = build_model(ModelConfig(name="test_models_local:WithInit", kwargs={"width": 5}),
                         (4,), 5, seed=0)
    assert torch.equal(custom.lin.weight, torch.full((5, 4), 0.5))
    with pytest.raises(ValueError, match="cannot import module 'no_such_pkg.mod'"):
        build_model(ModelConfig(name="no_such_pkg.mod:Net"), (4,), 2)
    with pytest.raises(ValueError, match="has no attribute 'Nope'"):
        build_model(ModelConfig(name="torch.nn:Nope"), (4,), 2)
    with pytest.raises(ValueError, match="cannot be built"):
        build_model(ModelConfig(name="torch.nn:Linear", kwargs={"bogus": 1}), (4,), 2)


def test_cnn_rejects_flat_inputs():
    with pytest.raises(ValueError, match="needs image inputs"):
        build_model(ModelConfig(name="cnn"), (64,), 10)


# --------------------------------------------------------------------------------------------
# the solver against numpy


def _numpy_logreg_grad(w, b, x, y, classes):
    logits = x @ w.T + b
    logits -= logits.max(axis=1, keepdims=True)
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    probs[np.arange(len(y)), y] -= 1.0
    probs /= len(y)
    return probs.T @ x, probs.sum(axis=0)


def _logreg_problem(seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(8, 5, generator=g, dtype=dtype)
    y = torch.randint(0, 3, (8,), generator=g)
    model = build_model(ModelConfig(name="logreg"), (5,), 3, seed=seed).to(dtype)
    return model, x, y


def test_sgd_step_with_weight_decay_matches_numpy():
    model, x, y = _logreg_problem()
    cfg = OptimConfig(lr=0.3, weight_decay=0.01)
    solver = LocalSolver(model, cfg)
    w, b = (p.detach().numpy().copy() for p in (model.linear.weight, model.linear.bias))
    loss = solver.step(x, y)
    gw, gb = _numpy_logreg_grad(w, b, x.numpy(), y.numpy(), 3)
    np.testing.assert_allclose(model.linear.weight.detach().numpy(), w - 0.3 * (gw + 0.01 * w),
                               rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(model.linear.bias.detach().numpy(), b - 0.3 * (gb + 0.01 * b),
                               rtol=1e-12, atol=1e-12)
    assert isinstance(loss, torch.Tensor) and loss.dim() == 0 and not loss.requires_grad
    assert solver.steps == 1


def test_fedprox_term_matches_numpy():
    model, x, y = _logreg_problem(seed=1)
    solver = LocalSolver(model, OptimConfig(solver="fedprox", mu=0.7, lr=0.2))
    anchor = [p.detach().numpy().copy() for p in model.parameters()]
    with torch.no_grad():  # move away from the anchor so the proximal term is non-zero
        for p in model.parameters():
            p.add_(0.25)
    w, b = (p.detach().numpy().copy() for p in model.parameters())
    solver.step(x, y)
    gw, gb = _numpy_logreg_grad(w, b, x.numpy(), y.numpy(), 3)
    expected_w = w - 0.2 * (gw + 0.7 * (w - anchor[0]))
    expected_b = b - 0.2 * (gb + 0.7 * (b - anchor[1]))
    np.testing.assert_allclose(model.linear.weight.detach().numpy(), expected_w, atol=1e-12)
    np.testing.assert_allclose(model.linear.bias.detach().numpy(), expected_b, atol=1e-12)
    solver.on_aggregation()  # anchor := current parameters
    for a, p in zip(solver.anchor, model.parameters()):
        assert torch.equal(a, p.detach())


def test_momentum_heavy_ball_and_reset():
    model, x, y = _logreg_problem(seed=2)
    solver = LocalSolver(model, OptimConfig(lr=0.1, momentum=0.9))
    w, b = (p.detach().numpy().copy() for p in model.parameters())
    buf_w, buf_b = np.zeros_like(w), np.zeros_like(b)
    for _ in range(3):
        gw, gb = _numpy_logreg_grad(w, b, x.numpy(), y.numpy(), 3)
        buf_w, buf_b = 0.9 * buf_w + gw, 0.9 * buf_b + gb
        w, b = w - 0.1 * buf_w, b - 0.1 * buf_b
        solver.step(x, y)
    np.testing.assert_allclose(model.linear.weight.detach().numpy(), w, atol=1e-12)
    solver.on_aggregation()  # default momentum_reset="aggregation"
    assert all(float(buf.abs().max()) == 0.0 for buf in solver.momentum_buffers)
    gw, gb = _numpy_logreg_grad(w, b, x.numpy(), y.numpy(), 3)
    solver.step(x, y)  # fresh buffer: a plain gradient step
    np.testing.assert_allclose(model.linear.weight.detach().numpy(), w - 0.1 * gw, atol=1e-12)

    kept = LocalSolver(model, OptimConfig(lr=0.1, momentum=0.9, momentum_reset="never"))
    kept.step(x, y)
    before = [buf.clone() for buf in kept.momentum_buffers]
    kept.on_aggregation()
    assert all(torch.equal(a, c) for a, c in zip(before, kept.momentum_buffers))


def test_solver_state_dict_round_trip():
    model_a, x, y = _logreg_problem(seed=3)
    model_b, _, _ = _logreg_problem(seed=3)
    cfg = OptimConfig(solver="fedprox", mu=0.1, momentum=0.5, lr=0.1)
    a, b = LocalSolver(model_a, cfg), LocalSolver(model_b, cfg)
    a.step(x, y)
    a.lr = 0.05
    with torch.no_grad():
        for pa, pb in zip(model_a.parameters(), model_b.parameters()):
            pb.copy_(pa)
    b.load_state_dict(a.state_dict())
    assert b.lr == 0.05 and b.steps == 1
    a.step(x, y)
    b.step(x, y)
    assert all(torch.equal(pa, pb) for pa, pb in zip(model_a.parameters(), model_b.parameters()))


def test_lr_schedules():
    assert lr_at(7, OptimConfig(lr=0.1), 10) == 0.1
    step = OptimConfig(lr=0.1, lr_schedule="step", lr_step_rounds=3, lr_gamma=0.5)
    assert [lr_at(r, step, 10) for r in (0, 2, 3, 6)] == pytest.approx([0.1, 0.1, 0.05, 0.025])
    cos = OptimConfig(lr=0.1, lr_schedule="cosine")
    assert lr_at(0, cos, 10) == pytest.approx(0.1)
    assert lr_at(5, cos, 10) == pytest.approx(0.05)
    assert 0 < lr_at(9, cos, 10) < 0.01


# --------------------------------------------------------------------------------------------
# batches and evaluation


def test_batch_sampler_is_reproducible_and_covers_each_epoch():
    indices = np.arange(100, 123)  # 23 samples, batch 5: 4 full batches + 1 of 3 per epoch
    a = BatchSampler(indices, 5, seed=9, client=2)
    b = BatchSampler(indices, 5, seed=9, client=2)
    stream_a = [next(a) for _ in range(12)]
    assert all(torch.equal(u, v) for u, v in zip(stream_a, (next(b) for _ in range(12))))
    assert [len(t) for t in stream_a] == [5, 5, 5, 5, 3] * 2 + [5, 5] and len(a) == 5
    first, second = torch.cat(stream_a[:5]), torch.cat(stream_a[5:10])
    assert sorted(first.tolist()) == list(range(100, 123)) == sorted(second.tolist())
    assert not torch.equal(first, second)  # reshuffled per epoch
    other = BatchSampler(indices, 5, seed=9, client=3)
    assert not torch.equal(torch.cat([next(other) for _ in range(5)]), first)
    assert torch.equal(a.epoch_order(0), first)  # a replay needs only (seed, client, epoch)


def test_batch_sampler_resumes_from_state():
    a = BatchSampler(np.arange(17), 4, seed=1, client=0)
    for _ in range(7):
        next(a)
    resumed = BatchSampler(np.arange(17), 4, seed=1, client=0)
    resumed.load_state_dict(a.state_dict())
    assert all(torch.equal(next(a), next(resumed)) for _ in range(9))
    with pytest.raises(ValueError, match="no samples"):
        BatchSampler(np.array([], dtype=np.int64), 4, seed=0, client=5)


def test_evaluate_loss_and_accuracy():
    model = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.eye(2))
    x = torch.tensor([[2.0, 0.0], [0.0, 2.0], [2.0, 0.0]])
    ds = TensorDataset(x, torch.tensor([0, 1, 1]), 2)
    loss, acc = evaluate(model, ds, batch_size=2)
    expected = (2 * math.log(1 + math.exp(-2)) + math.log(1 + math.exp(2))) / 3
    assert acc == pytest.approx(2 / 3) and loss == pytest.approx(expected)
    assert model.training


def test_mlp_trains_on_digits_centrally():
    train, test = load_digits(seed=0)
    model = build_model(ModelConfig(name="mlp", hidden=(64,)), train.input_shape, 10, seed=0)
    solver = LocalSolver(model, OptimConfig(lr=0.1, momentum=0.9, batch_size=32))
    sampler = BatchSampler(np.arange(len(train)), 32, seed=0, client=0)
    for _ in range(400):  # about 9 epochs
        idx = next(sampler)
        solver.step(train.features[idx], train.labels[idx])
    loss, acc = evaluate(model, test)
    assert acc > 0.9, (loss, acc)


def test_float64_model_takes_the_loaders_float32_features():
    """run.dtype = "float64": the flat float64 model is fed the float32 features the loaders give;
    the step must run and match a float64 numpy step on the float32 values widened exactly."""
    from hflmpi.learn.flat import flatten_parameters

    model, x64, y = _logreg_problem(seed=2)
    flat = flatten_parameters(model, dtype=torch.float64)
    x32 = x64.float()
    solver = LocalSolver(model, OptimConfig(lr=0.3))
    w, b = (p.detach().numpy().copy() for p in (model.linear.weight, model.linear.bias))
    loss = solver.step(x32, y)
    assert loss.dtype == torch.float64 and flat.flat.dtype == torch.float64
    gw, gb = _numpy_logreg_grad(w, b, x32.numpy().astype(np.float64), y.numpy(), 3)
    np.testing.assert_allclose(model.linear.weight.detach().numpy(), w - 0.3 * gw,
                               rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(model.linear.bias.detach().numpy(), b - 0.3 * gb,
                               rtol=1e-12, atol=1e-12)


def test_dataset_to_model_dtype():
    data = TensorDataset(torch.arange(6, dtype=torch.float32).view(3, 2), torch.tensor([0, 1, 0]), 2)
    wide = data.to("cpu", torch.float64)
    assert wide.features.dtype == torch.float64 and wide.labels.dtype == torch.int64
    assert torch.equal(wide.features, data.features.double())
    assert data.to("cpu").features.dtype == torch.float32
