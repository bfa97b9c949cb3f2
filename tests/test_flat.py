"""Serial tests of the flat parameter buffer: views, gradients, in-place updates, signature."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hflmpi.config import ModelConfig, OptimConfig
from hflmpi.learn.flat import flatten_parameters
from hflmpi.learn.local import LocalSolver
from hflmpi.learn.models import build_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _cnn(seed=0):
    return build_model(ModelConfig(name="cnn", hidden=(16,)), (1, 8, 8), 10, seed=seed)


def _batch():
    g = torch.Generator().manual_seed(0)
    return torch.randn(4, 1, 8, 8, generator=g), torch.randint(0, 10, (4,), generator=g)


def test_flatten_keeps_values_and_binds_views():
    model = _cnn()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    params = list(model.parameters())
    fp = flatten_parameters(model)
    assert list(model.parameters()) == params  # same Parameter objects
    assert fp.flat.is_contiguous() and fp.flat.dim() == 1
    assert fp.numel == sum(p.numel() for p in params) == fp.flat.numel()
    assert fp.names == tuple(before) and fp.offsets[0] == 0
    for name, p, offset, shape in zip(fp.names, params, fp.offsets, fp.shapes):
        assert torch.equal(p.detach(), before[name]) and tuple(p.shape) == shape
        assert p.untyped_storage().data_ptr() == fp.flat.untyped_storage().data_ptr()
        assert p.data_ptr() == fp.flat[offset:].data_ptr()
        assert torch.equal(fp.view(name), before[name])
    assert torch.equal(fp.flat, torch.cat([t.flatten() for t in before.values()]))


def test_writing_the_buffer_changes_the_model():
    model = _cnn()
    fp = flatten_parameters(model)
    x, _ = _batch()
    fp.flat.zero_()
    with torch.no_grad():
        assert float(model(x).abs().max()) == 0.0
        assert all(float(p.abs().max()) == 0.0 for p in model.parameters())


def test_gradients_match_and_optimizer_updates_the_buffer():
    reference, model = _cnn(), _cnn()
    fp = flatten_parameters(model)
    x, y = _batch()
    nn.functional.cross_entropy(reference(x), y).backward()
    nn.functional.cross_entropy(model(x), y).backward()
    for p, q in zip(reference.parameters(), model.parameters()):
        assert q.grad is not None and torch.equal(p.grad, q.grad)
    before = fp.flat.clone()
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    grads = torch.cat([p.grad.flatten() for p in model.parameters()])
    torch.testing.assert_close(fp.flat, before - 0.1 * grads)


def test_local_solver_updates_the_buffer_in_place():
    model = _cnn()
    fp = flatten_parameters(model, dtype=torch.float64)
    solver = LocalSolver(model, OptimConfig(lr=0.05, momentum=0.9))
    storage = fp.flat.data_ptr()
    before = fp.flat.clone()
    x, y = _batch()
    for _ in range(2):
        solver.step(x.double(), y)
    assert fp.flat.data_ptr() == storage and not torch.equal(fp.flat, before)
    assert all(p.data_ptr() == fp.flat[o:].data_ptr()
               for p, o in zip(model.parameters(), fp.offsets))


def test_dtype_and_signature():
    a = flatten_parameters(_cnn(0))
    b = flatten_parameters(_cnn(1))
    c = flatten_parameters(_cnn(0), dtype=torch.float64)
    d = flatten_parameters(build_model(ModelConfig(name="cnn", hidden=(17,)), (1, 8, 8), 10))
    assert c.dtype == torch.float64 and all(p.dtype == torch.float64 for p in _params_of(c))
    assert a.signature() == b.signature() and a.signature_hash() == b.signature_hash()
    assert a.signature()[2] == "float32" and c.signature()[2] == "float64"
    assert len({a.signature_hash(), c.signature_hash(), d.signature_hash()}) == 3
    assert 0 <= a.signature_hash() < 2**63


def _params_of(fp):
    return [fp.view(name) for name in fp.names]


def test_tied_parameters_are_flattened_once_and_empty_model_rejected():
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3))
    model[1].weight = model[0].weight
    fp = flatten_parameters(model)
    assert fp.numel == 9 + 3 + 3 and model[0].weight is model[1].weight
    with pytest.raises(ValueError, match="no parameters"):
        flatten_parameters(nn.ReLU())
