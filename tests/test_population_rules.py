"""The private layer of a population on one rank (no MPI collective): clipping and noise scale.

The noise checks draw a million values with fixed seeds (reproducible mode) and allow 1% on the
standard deviation, about 14 standard errors; the OS CSPRNG check allows 3% (over 40).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("mpi4py")

from hflmpi.config import ConfigError, config_from_dict  # noqa: E402
from hflmpi.core.population import place_clients, plan_population  # noqa: E402
from hflmpi.core.topology import plan_fanouts  # noqa: E402
from hflmpi.mpi.layers import PrivacyOptions  # noqa: E402
from hflmpi.mpi.population import node_weights  # noqa: E402
from hflmpi.mpi.population_rules import PopulationRules  # noqa: E402
from hflmpi.population import plan_clients  # noqa: E402

BIG = 1_000_000
WEIGHTS = np.array([1.0, 2.0, 3.0, 4.0, 0.0])  # client 4 does not take part: max a_c = 4/10


def _rules(mode: str, reproducible: bool = True) -> tuple[PopulationRules, list[np.ndarray]]:
    plan = plan_population(plan_fanouts([5], 5), place_clients(5, 1))
    privacy = PrivacyOptions(1, 2.0, 0.5, mode, reproducible)
    return PopulationRules(plan, 0, ["mean"], {}, privacy, seed=3), node_weights(plan, WEIGHTS)


def _children(anchor: torch.Tensor, updates: list[torch.Tensor]):
    shares = WEIGHTS[:4] / WEIGHTS.sum()
    return [(c, float(a), anchor + u) for c, (a, u) in enumerate(zip(shares, updates))]


@pytest.mark.parametrize("reproducible,tolerance", [(True, 0.01), (False, 0.03)])
def test_central_noise_has_std_sigma_clip_max_share(reproducible, tolerance):
    rules, weights = _rules("central", reproducible)
    model = torch.zeros(BIG, dtype=torch.float64)
    assert rules.add_central_noise(1, 0, model, weights, step=7, sub=None) == 0
    expected = 0.5 * 2.0 * 0.4  # sigma * C * max a_c
    assert abs(float(model.std()) / expected - 1.0) < tolerance
    assert abs(float(model.mean())) < 10 * expected / np.sqrt(BIG)


def test_central_noise_is_reproducible_only_in_the_insecure_mode():
    for reproducible in (True, False):
        rules, weights = _rules("central", reproducible)
        a, b = torch.zeros(1000), torch.zeros(1000)
        rules.add_central_noise(1, 0, a, weights, step=7, sub=None)
        rules.add_central_noise(1, 0, b, weights, step=7, sub=None)
        assert torch.equal(a, b) == reproducible


def test_distributed_shares_add_up_to_the_central_std():
    rules, weights = _rules("distributed")
    anchor = torch.zeros(BIG, dtype=torch.float64)
    children = rules.privatize(1, 0, _children(anchor, [torch.zeros(BIG, dtype=torch.float64)] * 4),
                               anchor, weights, step=7)
    total = sum(share * model for _, share, model in children)  # what the layer's mean adds
    assert abs(float(total.std()) / (0.5 * 2.0 * 0.4) - 1.0) < 0.01
    # each share alone: sigma C max a_c / sqrt(4 participants), divided by its own a_c
    for (_, share, model) in children:
        assert abs(float(model.std()) * share / (0.5 * 2.0 * 0.4 / 2.0) - 1.0) < 0.01


def test_every_update_is_clipped_to_the_bound_and_small_ones_are_kept():
    rules, weights = _rules("central")
    rules.privacy = PrivacyOptions(1, 2.0, 0.5, "central", True)
    anchor = torch.linspace(-1.0, 1.0, 50, dtype=torch.float64)
    rng = np.random.default_rng(0)
    updates = [torch.from_numpy(rng.standard_normal(50) * s) for s in (0.01, 1.0, 5.0, 0.1)]
    out = rules.privatize(1, 0, _children(anchor, updates), anchor, weights, step=1)
    for update, (_, _, model) in zip(updates, out):
        norm = float(np.linalg.norm(update.numpy()))
        expected = update.numpy() * min(1.0, 2.0 / norm)
        np.testing.assert_allclose((model - anchor).numpy(), expected, rtol=1e-12, atol=1e-15)


def test_a_non_finite_update_is_a_failure_not_a_crash():
    rules, weights = _rules("central")
    anchor = torch.zeros(4, dtype=torch.float64)
    bad = [torch.tensor([1.0, float("nan"), 0.0, 0.0], dtype=torch.float64)] + \
        [torch.ones(4, dtype=torch.float64)] * 3
    out = rules.privatize(1, 0, _children(anchor, bad), anchor, weights, step=1)
    assert torch.equal(out[0][2], anchor)  # dropped to a zero update; the run stops after the pass
    assert rules.failure is not None and "lowest client is 0" in rules.failure


def _population(**sections):
    data = {"run": {"out": "x.h5"}, "topology": {"fanouts": [5, 2]}, "schedule": {"tau": [2, 1]},
            "clients": {"count": 10}}
    for name, table in sections.items():
        data[name] = {**data.get(name, {}), **table}
    return config_from_dict(data)


def test_a_population_accepts_robust_rules_and_privacy():
    config = _population(aggregation={"robust": ["krum", "mean"]}, privacy={"layer": 2},
                         run={"divergence": False})
    assert config.aggregation.robust == ("krum", "mean") and config.privacy.layer == 2
    # the population measures the divergences from the raw client models, as the rank engine does
    with pytest.raises(ConfigError, match="run.divergence=true with privacy.layer=2"):
        _population(privacy={"layer": 2})
    plan_clients(config, ranks=2)
    # the layer rules still hold once the tree is planned: krum with f = 1 needs groups of 5
    with pytest.raises(ConfigError, match="krum_f=1 with a layer-2 group of 2"):
        plan_clients(_population(aggregation={"robust": ["mean", "krum"]}), ranks=2)
