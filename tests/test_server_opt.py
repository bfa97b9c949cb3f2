"""Server optimizers (:mod:`hflmpi.core.server_opt`) against an independent numpy re-implementation.

The reference below follows Reddi et al., "Adaptive Federated Optimization" (ICLR 2021),
Algorithm 2, and FedAvgM (Hsu et al. 2019) line by line in float64 numpy, over several steps
with changing aggregates. FedAvgM must agree bit for bit (same IEEE operations in the same
order); the adaptive methods to 1e-12 relative, because torch's float64 ``sqrt`` on the CPU is
not always correctly rounded (1 ulp off numpy's on some inputs). Also: FedAvgM with eta = 1, beta = 0 is plain FedAvg bit for bit (float32),
the state survives a save/load round trip, and bad hyperparameters are refused with the key.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hflmpi.config import ConfigError, config_from_dict
from hflmpi.core.server_opt import ServerOptError, ServerOptimizer, ServerOptOptions


class NumpyServerOpt:
    """Independent float64 reference: one instance per layer leader."""

    def __init__(self, name: str, n: int, lr: float, momentum: float, b1: float, b2: float,
                 tau: float) -> None:
        self.name, self.lr, self.mom, self.b1, self.b2, self.tau = name, lr, momentum, b1, b2, tau
        self.m = np.zeros(n)
        self.v = np.full(n, tau * tau)

    def step(self, x_prev: np.ndarray, aggregate: np.ndarray) -> np.ndarray:
        x = x_prev.astype(np.float64)
        d = aggregate.astype(np.float64) - x
        if self.name == "avgm":
            self.m = self.mom * self.m + d
            return x + self.lr * self.m
        self.m = self.b1 * self.m + (1.0 - self.b1) * d
        if self.name == "adagrad":
            self.v = self.v + d * d
        elif self.name == "adam":
            self.v = self.b2 * self.v + (1.0 - self.b2) * (d * d)
        elif self.name == "yogi":
            self.v = self.v - (1.0 - self.b2) * (d * d) * np.sign(self.v - d * d)
        return x + self.lr * self.m / (np.sqrt(self.v) + self.tau)


HYPER = {"lr": 0.3, "momentum": 0.7, "beta1": 0.8, "beta2": 0.95, "tau": 0.05}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", ["avgm", "adagrad", "adam", "yogi"])
def test_matches_numpy_reference_over_several_steps(name, dtype):
    rng = np.random.default_rng(3)
    n = 1000
    opt = ServerOptimizer(ServerOptOptions(name, **HYPER), n)
    ref = NumpyServerOpt(name, n, HYPER["lr"], HYPER["momentum"], HYPER["beta1"],
                         HYPER["beta2"], HYPER["tau"])
    x = torch.tensor(rng.normal(size=n), dtype=dtype)
    moved = 0.0
    for _ in range(6):
        # aggregates at several scales, some coordinates unchanged (Delta = 0: sign(v) matters)
        aggregate = x + torch.tensor(rng.normal(scale=rng.choice([1e-3, 0.1, 2.0]), size=n),
                                     dtype=dtype)
        aggregate[:50] = x[:50]
        want = ref.step(x.numpy(), aggregate.numpy()).astype(x.numpy().dtype)
        model = aggregate.clone()
        opt.step(model, x)
        assert model.dtype == dtype
        if name == "avgm":
            np.testing.assert_array_equal(model.numpy(), want)
        else:
            np.testing.assert_allclose(model.numpy(), want, rtol=1e-12, atol=1e-15)
        moved = max(moved, float((model - aggregate).abs().max()))
        x = model
    np.testing.assert_allclose(opt.state["m"].numpy(), ref.m, rtol=1e-12, atol=1e-15)
    if name != "avgm":
        np.testing.assert_allclose(opt.state["v"].numpy(), ref.v, rtol=1e-12, atol=1e-15)
    assert moved > 1e-3, "the server step left the aggregate unchanged; the test proves nothing"


def test_yogi_and_adam_differ():
    """Guards the reference itself: Yogi's sign rule is not Adam's decay."""
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=100), rng.normal(size=100)
    a = NumpyServerOpt("adam", 100, 1.0, 0.0, 0.9, 0.99, 1e-3)
    b = NumpyServerOpt("yogi", 100, 1.0, 0.0, 0.9, 0.99, 1e-3)
    assert not np.array_equal(a.step(x, y), b.step(x, y))


def test_avgm_with_lr1_momentum0_is_fedavg_bit_for_bit():
    rng = np.random.default_rng(1)
    n = 100_000
    opt = ServerOptimizer(ServerOptOptions("avgm", lr=1.0, momentum=0.0), n)
    x = torch.tensor(rng.normal(size=n), dtype=torch.float32)
    for scale in (1e-6, 1e-2, 1.0, 50.0):
        aggregate = x + torch.tensor(rng.normal(scale=scale, size=n), dtype=torch.float32)
        model = aggregate.clone()
        opt.step(model, x)
        assert torch.equal(model, aggregate)
        x = model


def test_state_round_trip():
    rng = np.random.default_rng(2)
    options = ServerOptOptions("adam", lr=0.1, tau=0.01)
    a, b = ServerOptimizer(options, 64), ServerOptimizer(options, 64)
    x = torch.tensor(rng.normal(size=64))
    for _ in range(3):
        model = x + torch.tensor(rng.normal(size=64))
        a.step(model, x)
        x = model
    b.load_state_array(a.state_array())
    y = x + 1.0
    ya, yb = y.clone(), y.clone()
    a.step(ya, x)
    b.step(yb, x)
    assert torch.equal(ya, yb)
    with pytest.raises(ServerOptError, match=r"shape \(1, 64\), expected \(2, 64\)"):
        b.load_state_array(torch.zeros(1, 64))


@pytest.mark.parametrize("key, value, expected", [
    ("lr", 0.0, "must be finite and > 0"),
    ("lr", float("nan"), "must be finite and > 0"),
    ("beta1", 1.0, "must be in [0, 1)"),
    ("beta2", -0.1, "must be in [0, 1)"),
    ("momentum", 1.0, "must be in [0, 1)"),
    ("tau", 0.0, "must be finite and > 0"),
])
def test_api_refuses_out_of_range(key, value, expected):
    with pytest.raises(ServerOptError) as info:
        ServerOptOptions("adam", **{key: value})
    assert f"{key}=" in str(info.value) and expected in str(info.value)
    with pytest.raises(ServerOptError, match="not one of none, avgm"):
        ServerOptOptions("adamw")


@pytest.mark.parametrize("table, expected", [
    ({"optimizer": ["adam"], "lr": -1.0}, "server_opt.lr=-1.0 must be a number > 0"),
    ({"optimizer": ["adam"], "beta1": [0.9, 1.5]},
     "server_opt.beta1=[0.9, 1.5] has entry [1] = 1.5, which must be a number >= 0 and < 1"),
    ({"optimizer": ["yogi"], "tau": 0}, "server_opt.tau=0 must be a number > 0"),
    ({"optimizer": ["avgm"], "momentum": "high"}, "server_opt.momentum=\"high\" is a string"),
    ({"lr": 0.5}, "server_opt.lr=[0.5] is set but server_opt.optimizer names no optimizer"),
    ({"optimizer": ["fedadam"]}, "server_opt.optimizer=[\"fedadam\"] has entry [0]"),
])
def test_config_refuses_bad_values_with_key_and_fix(table, expected):
    with pytest.raises(ConfigError) as info:
        config_from_dict({"topology": {"fanouts": [2]}, "schedule": {"tau": [2]},
                          "server_opt": table})
    assert expected in str(info.value)
    assert "; " in str(info.value)  # a fix follows


def test_config_checks_lengths_against_depth():
    with pytest.raises(ConfigError, match=r"server_opt.optimizer=\[\"adam\"\] has 1 entries but "
                                          r"the tree has 2 layers"):
        config_from_dict({"topology": {"fanouts": [2, 2]}, "schedule": {"tau": [2, 2]},
                          "server_opt": {"optimizer": ["adam"]}})
    with pytest.raises(ConfigError, match=r"server_opt.lr=\[0.1, 0.2, 0.3\] has 3 entries"):
        config_from_dict({"topology": {"fanouts": [2, 2]}, "schedule": {"tau": [2, 2]},
                          "server_opt": {"optimizer": ["none", "adam"], "lr": [0.1, 0.2, 0.3]}})
    config = config_from_dict({"topology": {"fanouts": [2, 2]}, "schedule": {"tau": [2, 2]},
                               "server_opt": {"optimizer": ["avgm", "yogi"], "lr": [1.0, 0.1],
                                              "tau": 0.01}})
    low, top = config.server_opt.options_for(2)
    assert low == ServerOptOptions("avgm", lr=1.0, tau=0.01)
    assert top == ServerOptOptions("yogi", lr=0.1, tau=0.01)


@pytest.mark.parametrize("protect, optimizer, refused", [
    ({"privacy": {"layer": 2}}, ["adam", "none"], "below privacy.layer=2 (layer 2)"),
    ({"privacy": {"layer": 2}}, ["none", "adam"], None),  # post-noise: post-processing
    ({"privacy": {"layer": 1}}, ["avgm", "yogi"], None),
    ({"aggregation": {"secure": [False, True]}, "quantize": {"bits": [0, 8]}}, ["avgm", "none"],
     "below aggregation.secure[1]=true (layer 2)"),
    ({"aggregation": {"secure": [True, False]}, "quantize": {"bits": [8, 0]}}, ["avgm", "adam"],
     None),
])
def test_server_state_below_a_protected_layer_is_refused(protect, optimizer, refused):
    table = {"topology": {"fanouts": [3, 3]}, "schedule": {"tau": [2, 2]},
             "run": {"divergence": False}, "server_opt": {"optimizer": optimizer}, **protect}
    if refused is None:
        config_from_dict(table)
        return
    with pytest.raises(ConfigError) as info:
        config_from_dict(table)
    assert refused in str(info.value) and "every checkpoint gathers its state" in str(info.value)
