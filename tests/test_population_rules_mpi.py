"""Robust rules and differential privacy over a population of clients, under mpiexec -n 1, 2, 4.

* One nested aggregation of 40 clients (fan-outs ``[5, 4, 2]``) whose groups span ranks on 2 and 4
  ranks (explicit placements): robust rules per layer equal a serial numpy re-implementation of
  the same nested rules, and give the same bits on 1, 2 and 4 ranks.
* The private layer with reproducible noise: a serial reference (numpy clipping, noise rebuilt
  from the documented stream keys), the same bits on 1, 2 and 4 ranks on a quantized tree, and
  OS CSPRNG noise that still leaves one model on every rank of a spanning node.
* Bad input: krum left with too few participants in one in-rank group stops every rank with one
  error; end to end, through :func:`hflmpi.federation.train`, too.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any, Sequence

import numpy as np
import pytest
import torch

pytest.importorskip("mpi4py")
from conftest import parallel_assert  # noqa: E402
from mpi4py import MPI  # noqa: E402

from hflmpi.config import config_from_dict  # noqa: E402
from hflmpi.core.population import place_clients, plan_population  # noqa: E402
from hflmpi.core.rng import torch_generator  # noqa: E402
from hflmpi.core.topology import plan_fanouts  # noqa: E402
from hflmpi.federation import train  # noqa: E402
from hflmpi.mpi.layers import LayerFailedError, PrivacyOptions  # noqa: E402
from hflmpi.mpi.population import PopulationAggregator, node_weights  # noqa: E402
from hflmpi.mpi.population_rules import PopulationRules  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FANOUTS = [5, 4, 2]
CLIENTS = 40
DIM = 64
SEED = 5
STEP = 3


def _placement(size: int) -> list[int]:
    """Place the 40 clients so that groups of every layer span ranks on 2 and 4 ranks."""
    if size == 1:
        return [0] * CLIENTS
    if size == 2:  # layer-1 group 1 (clients 5..9) and layer-2 group 0 span ranks 0 and 1
        return [0 if c < 8 else 1 for c in range(CLIENTS)]
    # groups 1 and 5 of layer 1, both groups of layer 2 and the root span ranks; group 1's
    # lower clients 5, 6 sit on the higher rank (the rows arrive out of child order)
    return [1 if c in (5, 6) else 0 if c < 10 else 1 if c < 20 else 2 if c < 28 else 3
            for c in range(CLIENTS)]


def _sizes() -> list[int]:
    return [n for n in (1, 2, 4) if n <= MPI.COMM_WORLD.Get_size()]


def _start() -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(0).standard_normal(DIM).astype(np.float32))


def _client_model(c: int, start: torch.Tensor) -> torch.Tensor:
    """Client ``c``'s trained model: the start plus its own noise; the first of each group is wild."""
    rng = np.random.default_rng(100 + c)
    update = rng.standard_normal(DIM) * (0.5 + 0.1 * (c % 3))
    if c % 5 == 0:
        update = update * 40.0 + 25.0  # one Byzantine-looking client per layer-1 group
    return start + torch.from_numpy(update.astype(np.float32))


def _client_weights(drop: Sequence[int]) -> np.ndarray:
    weights = np.array([c % 4 + 1 for c in range(CLIENTS)], dtype=np.float64)
    weights[list(drop)] = 0.0
    return weights


def _aggregate(comm: MPI.Comm, rules: Sequence[Any], params: dict[str, Any],
               privacy: PrivacyOptions | None, bits: Sequence[int],
               drop: Sequence[int] = ()) -> torch.Tensor:
    """Run one aggregation of layers 1..3 over ``comm`` and return the root's model."""
    plan = plan_population(plan_fanouts(FANOUTS, CLIENTS),
                           place_clients(CLIENTS, comm.Get_size(), _placement(comm.Get_size())))
    start = _start()
    node_rules = PopulationRules(plan, comm.Get_rank(), rules, params, privacy, SEED)
    aggregator = PopulationAggregator(comm, plan, start, bits, 0, SEED, rules=node_rules)
    try:
        client_weights = _client_weights(drop)
        trained = {c: _client_model(c, start) for c in plan.placement.clients_on(comm.Get_rank())
                   if client_weights[c] > 0}
        aggregator.aggregate(plan.depth, trained, node_weights(plan, client_weights), step=STEP)
        return aggregator.global_model.clone()
    finally:
        aggregator.free()


def _by_size(run) -> dict[int, np.ndarray]:
    """Run ``run(sub)`` on sub-communicators of 1, 2 and 4 ranks; every size's root model."""
    world, out = MPI.COMM_WORLD, {}
    for size in _sizes():
        sub = world.Split(0 if world.Get_rank() < size else MPI.UNDEFINED, world.Get_rank())
        model = None
        if sub != MPI.COMM_NULL:
            mine = run(sub).numpy()
            digests = sub.allgather(hashlib.sha256(mine.tobytes()).hexdigest())
            assert len(set(digests)) == 1, f"ranks of {size} disagree: {digests}"
            model = mine if sub.Get_rank() == 0 else None
            sub.Free()
        out[size] = world.bcast(model, root=0)
    return out


# ----------------------------------------------------------------------------------------------
# A serial reference: numpy, float64, written from the rules' definitions


def _median(values: np.ndarray, weights: np.ndarray) -> np.ndarray:
    order = np.argsort(values, axis=0, kind="stable")
    v = np.take_along_axis(values, order, axis=0)
    cum = np.cumsum(weights[order], axis=0)
    half = weights.sum() / 2.0
    out = np.empty(values.shape[1])
    for j in range(values.shape[1]):
        i = int(np.argmax(cum[:, j] >= half * (1 - 1e-12)))
        tie = abs(cum[i, j] - half) <= 1e-12 * weights.sum() and i + 1 < len(v)
        out[j] = (v[i, j] + v[i + 1, j]) / 2.0 if tie else v[i, j]
    return out


def _trimmed(values: np.ndarray, weights: np.ndarray, trim: float) -> np.ndarray:
    k = len(values)
    b = int(np.floor(trim * k))
    order = np.argsort(values, axis=0, kind="stable")[b:k - b]
    v = np.take_along_axis(values, order, axis=0)
    w = weights[order]
    return (v * w).sum(axis=0) / w.sum(axis=0)


def _krum(values: np.ndarray, f: int) -> np.ndarray:
    k = len(values)
    dist = ((values[:, None, :] - values[None, :, :]) ** 2).sum(axis=2)
    scores = [np.sort(np.delete(dist[i], i))[:k - f - 2].sum() for i in range(k)]
    return values[int(np.argmin(scores))]


def _reference(rules: Sequence[str], trim: float, f: int, drop: Sequence[int] = (),
               privacy: PrivacyOptions | None = None) -> np.ndarray:
    """Aggregate layers 1..3 serially; the anchor of every node is the start model."""
    tree = plan_fanouts(FANOUTS, CLIENTS)
    start = _start()
    x = start.numpy()
    weights = _client_weights(drop)
    models = {c: _client_model(c, start).numpy() for c in range(CLIENTS) if weights[c] > 0}
    lowest = {c: c for c in range(CLIENTS)}
    for n, rule in enumerate(rules, start=1):
        new_models, new_weights, new_lowest = {}, [], {}
        for k, kids in enumerate(tree.children[n - 1]):
            kids = [c for c in kids if weights[c] > 0]
            new_lowest[k] = lowest[tree.children[n - 1][k][0]]
            new_weights.append(sum(weights[c] for c in kids))
            if not kids:
                continue
            w = np.array([weights[c] for c in kids])
            updates = np.stack([(models[c] - x).astype(np.float32) for c in kids]).astype(float)
            if privacy is not None and privacy.layer == n:
                updates = _privatize(updates, w, [lowest[c] for c in kids], n, privacy)
            if rule == "mean":
                combined = (updates * (w / w.sum())[:, None]).sum(axis=0)
            elif rule == "median":
                combined = _median(updates, w)
            elif rule == "trimmed_mean":
                combined = _trimmed(updates, w, trim)
            else:
                combined = _krum(updates, f)
            if privacy is not None and privacy.layer == n and privacy.mode == "central":
                std = privacy.noise_multiplier * privacy.clip * w.max() / w.sum()
                combined = combined + _noise(new_lowest[k], n, std)
            new_models[k] = (x.astype(float) + combined).astype(np.float32)
        models, weights, lowest = new_models, np.array(new_weights), new_lowest
    return models[0]


def _noise(key: int, n: int, std: float) -> np.ndarray:
    """The reproducible noise of the documented stream (seed, "dp", client, step, layer)."""
    generator = torch_generator(SEED, purpose="dp", rank=key, round=STEP, layer=n)
    return torch.randn(DIM, generator=generator).double().numpy() * std


def _privatize(updates: np.ndarray, w: np.ndarray, keys: list[int], n: int,
               privacy: PrivacyOptions) -> np.ndarray:
    norms = np.linalg.norm(updates, axis=1)
    clipped = updates * np.minimum(1.0, privacy.clip / norms)[:, None]
    if privacy.mode == "distributed":
        shares = w / w.sum()
        std = privacy.noise_multiplier * privacy.clip * shares.max() / np.sqrt(len(w))
        clipped = clipped + np.stack([_noise(key, n, std / a) for key, a in zip(keys, shares)])
    return clipped


ROBUST_CASES = {
    "krum-trimmed-median": (["krum", "trimmed_mean", "median"], ()),
    "median-median-trimmed, partial": (["median", "median", "trimmed_mean"], (3, 10, 17, 24, 31)),
    "trimmed-mean-median, partial": (["trimmed_mean", "mean", "median"], (6, 13, 20, 27, 34)),
}


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize("case", list(ROBUST_CASES))
def test_robust_rules_over_a_population_match_a_serial_reference_on_any_placement(case):
    rules, drop = ROBUST_CASES[case]
    params = {"trim": 0.25, "f": 1}
    models = _by_size(lambda sub: _aggregate(sub, rules, params, None, [0, 0, 0], drop))
    reference = _reference(rules, trim=0.25, f=1, drop=drop)
    for size, model in models.items():
        np.testing.assert_allclose(model, reference, rtol=1e-5, atol=1e-5, err_msg=f"{size} ranks")
    if "mean" not in rules:  # only the float64 mean depends on the order of its sum
        digests = {s: hashlib.sha256(m.tobytes()).hexdigest() for s, m in models.items()}
        assert len(set(digests.values())) == 1, digests


@pytest.mark.mpi(min_size=1)
def test_a_plug_in_rule_runs_on_the_participants_in_child_order():
    class First:  # the first participant's update: shows the order and the participants
        def aggregate(self, updates: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
            return updates[0].clone()

    models = _by_size(lambda sub: _aggregate(sub, [First(), "mean", First()], {}, None,
                                             [0, 0, 0], drop=(0,)))
    start = _start().numpy().astype(float)
    # layer 1 takes each group's first participant (client 1 in group 0, whose client 0 is
    # out), layer 2 averages by weight, the root takes its first child (layer-2 group 0)
    layer1 = [_client_model(5 * k + (1 if k == 0 else 0), _start()).numpy() for k in range(4)]
    weights = _client_weights((0,))
    w1 = np.array([weights[5 * k:5 * k + 5].sum() for k in range(4)])
    expected = sum(w * m.astype(float) for w, m in zip(w1, layer1)) / w1.sum()
    for size, model in models.items():
        np.testing.assert_allclose(model, expected, rtol=1e-5, atol=1e-5, err_msg=f"{size} ranks")
    assert not np.allclose(expected, start, atol=1e-3)


PRIVATE_CASES = {
    "central at layer 1": PrivacyOptions(1, 1.5, 0.7, "central", True),
    "distributed at layer 1": PrivacyOptions(1, 1.5, 0.7, "distributed", True),
    "central at layer 2": PrivacyOptions(2, 0.8, 1.1, "central", True),
}


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize("case", list(PRIVATE_CASES))
def test_the_private_layer_matches_a_serial_reference_with_reproducible_noise(case):
    privacy = PRIVATE_CASES[case]
    drop = (2, 9, 23)
    models = _by_size(lambda sub: _aggregate(sub, ["mean"] * 3, {}, privacy, [0, 0, 0], drop))
    reference = _reference(["mean"] * 3, 0.0, 0, drop=drop, privacy=privacy)
    without = _reference(["mean"] * 3, 0.0, 0, drop=drop)
    assert not np.allclose(reference, without, atol=1e-3)  # the noise shows
    for size, model in models.items():
        np.testing.assert_allclose(model, reference, rtol=1e-5, atol=1e-5, err_msg=f"{size} ranks")


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize("mode", ["central", "distributed"])
def test_a_quantized_private_layer_gives_the_same_bits_on_any_rank_count(mode):
    privacy = PrivacyOptions(2, 1.0, 0.9, mode, True)
    models = _by_size(lambda sub: _aggregate(sub, ["mean"] * 3, {}, privacy, [8, 4, 8],
                                             drop=(1, 12, 33)))
    digests = {s: hashlib.sha256(m.tobytes()).hexdigest() for s, m in models.items()}
    assert len(set(digests.values())) == 1, digests


@pytest.mark.mpi(min_size=2)
def test_csprng_noise_leaves_one_model_on_every_rank_of_a_spanning_node():
    world = MPI.COMM_WORLD
    privacy = PrivacyOptions(3, 1.0, 1.0, "central", False)  # the root spans every rank
    size = 4 if world.Get_size() >= 4 else 2
    sub = world.Split(0 if world.Get_rank() < size else MPI.UNDEFINED, world.Get_rank())
    digest = noised = None
    if sub != MPI.COMM_NULL:
        model = _aggregate(sub, ["mean"] * 3, {}, privacy, [0, 0, 0]).numpy()
        digest = hashlib.sha256(model.tobytes()).hexdigest()
        without = _reference(["mean"] * 3, 0.0, 0)
        noised = not np.allclose(model, without, atol=1e-3)
        sub.Free()
    digests = [d for d in world.allgather(digest) if d is not None]
    parallel_assert(world, len(set(digests)) == 1, f"the ranks hold different models: {digests}")
    parallel_assert(world, noised is not False, "no noise was added")


@pytest.mark.mpi(min_size=1)
def test_krum_left_with_too_few_participants_in_one_group_stops_every_rank():
    world = MPI.COMM_WORLD
    # client 36 is out: layer-1 group 7 (on the last rank alone) keeps 4 children, too few for
    # krum with f = 1 (it needs more than 2f + 2 = 4); every other group is fine
    size = max(_sizes())
    sub = world.Split(0 if world.Get_rank() < size else MPI.UNDEFINED, world.Get_rank())
    error = None
    if sub != MPI.COMM_NULL:
        try:
            _aggregate(sub, ["krum", "mean", "mean"], {"f": 1}, None, [0, 0, 0], drop=(36,))
        except LayerFailedError as exc:
            error = str(exc)
        sub.Free()
    errors = world.allgather(error)[:size]
    parallel_assert(world, all(e is not None and "krum" in e and "group 7" in e
                               and "4 participating children" in e for e in errors), f"{errors}")
    parallel_assert(world, len(set(errors)) == 1, f"different errors: {errors}")


def _config(out: str, **sections: dict[str, Any]):
    data: dict[str, dict[str, Any]] = {
        "run": {"seed": 11, "rounds": 2, "out": out, "progress": "off"},
        "topology": {"fanouts": [5, 2]},
        "schedule": {"tau": [2, 1]},
        "data": {"name": "synthetic", "synthetic_samples": 400, "synthetic_features": 12,
                 "synthetic_classes": 3},
        "model": {"name": "mlp", "hidden": [8]},
        "optim": {"lr": 0.1, "batch_size": 8},
        "clients": {"count": 10},
    }
    for name, table in sections.items():
        data[name] = {**data.get(name, {}), **table}
    return config_from_dict(data)


@pytest.mark.mpi(min_size=1)
def test_a_run_whose_cohort_leaves_krum_too_few_children_fails_on_every_rank(comm, shared_dir):
    size = 2 if comm.Get_size() >= 2 else 1
    sub = comm.Split(0 if comm.Get_rank() < size else 1, comm.Get_rank())
    error = None
    try:
        if comm.Get_rank() < size:
            train(_config(os.path.join(shared_dir, "krum.h5"), aggregation={"robust": ["krum",
                  "mean"]}, clients={"count": 10, "selection": "uniform", "cohort": 0.7}), sub)
    except LayerFailedError as exc:
        error = str(exc)
    finally:
        sub.Free()
    errors = comm.allgather(error)[:size]
    parallel_assert(comm, comm.Get_rank() >= size or (error is not None and "krum" in error),
                    f"got {error!r}")
    parallel_assert(comm, len(set(errors)) == 1, f"different errors: {errors}")


@pytest.mark.mpi(min_size=1)
def test_a_private_population_run_states_its_releases(comm, shared_dir):
    sub = comm.Split(0 if comm.Get_rank() == 0 else 1, comm.Get_rank())
    line = None
    if comm.Get_rank() == 0:
        result = train(_config(os.path.join(shared_dir, "dp.h5"), privacy={"layer": 1},
                               quantize={"bits": [8, 0]}, run={"divergence": False}), sub)
        line = result.privacy
    sub.Free()
    # 2 rounds x tau_2 = 1 layer-1 release per round
    parallel_assert(comm, comm.Get_rank() != 0 or (line is not None and "after 2 releases" in line
                                                   and "sampling of the cohort" in line),
                    f"got {line!r}")


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("mode", ["central", "distributed"])
def test_one_client_per_rank_reproduces_the_rank_engines_private_layer(comm, shared_dir, mode):
    size = 4 if comm.Get_size() >= 4 else 2
    fanouts = [2, 2] if size == 4 else [2, 1]
    sub = comm.Split(0 if comm.Get_rank() < size else MPI.UNDEFINED, comm.Get_rank())
    same = True
    if sub != MPI.COMM_NULL:
        common = {"topology": {"fanouts": fanouts}, "schedule": {"tau": [2, 2]},
                  "quantize": {"bits": [8, 4], "method": "sum", "downlink": "float32"},
                  "aggregation": {"algorithm": "subtree"}, "run": {"divergence": False},
                  "privacy": {"layer": 1, "mode": mode, "clip": 0.5,
                              "insecure_reproducible_noise": True}}
        ranks = train(_config(os.path.join(shared_dir, f"ranks-{mode}.h5"), **common,
                              clients={"count": 0}), sub)
        pop = train(_config(os.path.join(shared_dir, f"pop-{mode}.h5"), **common,
                            clients={"count": size}), sub)
        same = torch.equal(pop.model, ranks.model)
        sub.Free()
    parallel_assert(comm, same, "the population and the rank engine differ")


@pytest.mark.mpi(min_size=4)
@pytest.mark.parametrize("rule", ["median", "trimmed_mean"])
def test_one_client_per_rank_reproduces_the_rank_engines_robust_layer(comm, shared_dir, rule):
    sub = comm.Split(0 if comm.Get_rank() < 4 else MPI.UNDEFINED, comm.Get_rank())
    same = True
    if sub != MPI.COMM_NULL:
        common = {"topology": {"fanouts": [4]}, "schedule": {"tau": [3]},
                  "aggregation": {"robust": [rule], "trim": 0.25}}
        ranks = train(_config(os.path.join(shared_dir, f"ranks-{rule}.h5"), **common,
                              clients={"count": 0}), sub)
        pop = train(_config(os.path.join(shared_dir, f"pop-{rule}.h5"), **common,
                            clients={"count": 4}), sub)
        same = torch.equal(pop.model, ranks.model)
        sub.Free()
    parallel_assert(comm, same, "the population and the rank engine differ")
