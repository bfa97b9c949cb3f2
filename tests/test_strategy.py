"""Aggregation-rule plug-ins (:mod:`hflmpi.core.strategy`): loading, checks, config and trust.

The example plug-in shipped in docs/examples (a coordinate-wise trimmed mean) is compared with an
independent numpy implementation (a loop over coordinates with ``numpy.sort``).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from hflmpi.config import ConfigError, config_from_dict
from hflmpi.config.strategy import load_rules
from hflmpi.core.strategy import AggregationRule, PluginError, apply_rule, load_rule
from hflmpi.record.resume import check_untrusted_imports

EXAMPLES = Path(__file__).resolve().parents[1] / "docs" / "examples"
PLUGIN = "trimmed_mean_rule:TrimmedMean"


@pytest.fixture
def examples_on_path(monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLES))
    yield
    sys.modules.pop("trimmed_mean_rule", None)


def numpy_trimmed_mean(updates: np.ndarray, weights: np.ndarray, trim: float) -> np.ndarray:
    """Independent reference: per coordinate, sort, cut b each end, weighted mean of the rest."""
    rows = updates[weights > 0].astype(np.float64)
    w = weights[weights > 0]
    k = rows.shape[0]
    b = math.floor(trim * k)
    out = np.empty(rows.shape[1])
    for j in range(rows.shape[1]):
        order = np.argsort(rows[:, j], kind="stable")[b:k - b]
        out[j] = np.sum(rows[order, j] * w[order]) / np.sum(w[order])
    return out


@pytest.mark.parametrize("k", [6, 8, 11])  # 5, 7, 10 after one drops out
def test_example_plugin_matches_numpy_trimmed_mean(examples_on_path, k):
    rule = load_rule(PLUGIN)
    assert isinstance(rule, AggregationRule)
    rng = np.random.default_rng(k)
    updates = rng.normal(size=(k, 300)).astype(np.float32)
    updates[0] *= 1000.0  # one Byzantine child
    weights = rng.integers(1, 50, size=k).astype(np.float64)
    weights[1] = 0.0  # a dropped child
    got = apply_rule(rule, torch.from_numpy(updates), torch.from_numpy(weights))
    want = numpy_trimmed_mean(updates, weights, 0.2)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-12, atol=1e-12)
    mean = (updates * weights[:, None]).sum(0) / weights.sum()
    assert np.abs(mean - want).max() > 10.0, "the attacker moved the mean as little as the rule"


def test_load_rule_errors_name_the_key(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "plugmod_x.py").write_text(
        "class NoMethod:\n    pass\n\n"
        "class NeedsArgs:\n    def __init__(self, a):\n        pass\n"
        "    def aggregate(self, u, w):\n        return u[0]\n\n"
        "class Good:\n    def aggregate(self, u, w):\n        return u.mean(0)\n\n"
        "instance = Good()\n", encoding="utf-8")
    key = "aggregation.robust[1]"
    cases = {
        "no_such_mod_zz:Rule": "cannot import module 'no_such_mod_zz'",
        "plugmod_x:Missing": "module 'plugmod_x' has no attribute 'Missing'",
        "plugmod_x:NoMethod": "has no callable aggregate(updates, weights)",
        "plugmod_x:NeedsArgs": "NeedsArgs() failed (TypeError",
        "not a path": "is not an import path",
    }
    for path, expected in cases.items():
        with pytest.raises(PluginError) as info:
            load_rule(path, key=key)
        assert str(info.value).startswith(f"{key}={path!r}") and expected in str(info.value)
    assert load_rule("plugmod_x:Good", key=key).aggregate(torch.ones(2, 3), torch.ones(2)).shape == (3,)
    assert load_rule("plugmod_x:instance", key=key) is sys.modules["plugmod_x"].instance
    sys.modules.pop("plugmod_x", None)


def test_apply_rule_refuses_bad_results():
    updates, weights = torch.ones(3, 4), torch.ones(3, dtype=torch.float64)

    class Rule:
        def __init__(self, fn):
            self.fn = fn

        def aggregate(self, u, w):
            return self.fn(u)

    for fn, expected in [
        (lambda u: u, "returned shape (3, 4), expected (4,)"),
        (lambda u: u.sum(0) * math.nan, "returned NaN or Inf"),
        (lambda u: u.sum(0).tolist(), "returned list, not a float torch.Tensor"),
        (lambda u: 1 / 0, "raised ZeroDivisionError"),
    ]:
        with pytest.raises(PluginError, match=expected.replace("(", r"\(").replace(")", r"\)")):
            apply_rule(Rule(fn), updates, weights)


def _config(robust, bits=(0, 0)):
    return config_from_dict({"topology": {"fanouts": [2, 2]}, "schedule": {"tau": [2, 2]},
                             "aggregation": {"robust": list(robust)},
                             "quantize": {"bits": list(bits)}})


def test_config_accepts_import_paths_and_set_up_loads_them(examples_on_path):
    config = _config(["mean", PLUGIN])
    assert config.aggregation.robust == ("mean", PLUGIN)
    rules = load_rules(config.aggregation.robust)
    assert rules[0] == "mean" and type(rules[1]).__name__ == "TrimmedMean"
    with pytest.raises(ConfigError, match=r"aggregation.robust\[1\]='no_mod_q:R': cannot import"):
        load_rules(["mean", "no_mod_q:R"])
    with pytest.raises(ConfigError, match=r'has entry \[1\] = "med ian"; each entry must be one of'):
        _config(["mean", "med ian"])


def test_plugin_layers_follow_the_robust_rules(examples_on_path):
    with pytest.raises(ConfigError, match=r"robust\[0\]='trimmed_mean_rule:TrimmedMean' with "
                                          r"quantize.bits\[0\]=8"):
        _config([PLUGIN, "mean"], bits=(8, 0))


def test_a_run_file_never_imports_a_plugin_the_user_did_not_name(examples_on_path):
    config = _config(["mean", PLUGIN])
    with pytest.raises(ConfigError) as info:
        check_untrusted_imports(config, ["run.rounds=3"], "run.h5")
    text = str(info.value)
    assert "aggregation.robust=[\"mean\", \"trimmed_mean_rule:TrimmedMean\"]" in text
    assert "never imports code named by a run file" in text and "--set aggregation.robust=" in text
    check_untrusted_imports(config, [f'aggregation.robust=["mean", "{PLUGIN}"]'], "run.h5")
    check_untrusted_imports(_config(["mean", "median"]), [], "run.h5")  # built-ins need no naming
