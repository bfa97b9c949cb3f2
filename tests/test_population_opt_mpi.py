"""Server optimizers, callbacks, the global-model check and quant_error of a population (MPI).

Run under ``mpiexec -n 1, 2, 4`` (``tests/mpi_pytest.py``). The tree ``[8, 2]`` of 16 clients
puts each layer-1 node on one rank with 1 or 2 ranks and across 2 ranks with 4 (the root spans
every rank from 2 on), so the server optimizers of spanning nodes are exercised.

* :class:`PopulationAggregator` with FedAvgM at layer 1 and FedAdam at layer 2 against a serial
  re-implementation of the nested aggregation (float64 means in numpy; the quantized path with
  the core quantizer's functions, node by node) and :class:`NumpyServerOpt`, including a node
  with no participant (no step); the worst participant's quantization error per layer, the
  engine's ``quant_error``, against the same reference.
* Training end to end: the same bits on 1, 2 and 4 ranks; resume is bitwise, and refused when
  the checkpoint lacks the optimizer state.
* Callbacks see every round and aggregation; one raising stops every rank.
* A flipped bit in one rank's global model stops every rank, naming that rank.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from conftest import parallel_assert
from test_population_mpi import _config, _digest, _final_models_by_size, _shared_dir, _sizes
from test_server_opt import NumpyServerOpt

pytest.importorskip("mpi4py")
from mpi4py import MPI  # noqa: E402

from hflmpi.core.population import place_clients, plan_population  # noqa: E402
from hflmpi.core.quantize import bucket_absmax, from_level_sum, num_buckets, to_levels  # noqa: E402
from hflmpi.core.rng import torch_generator  # noqa: E402
from hflmpi.core.server_opt import ServerOptOptions  # noqa: E402
from hflmpi.core.topology import plan_fanouts  # noqa: E402
from hflmpi.core.wire import levels_for_bits  # noqa: E402
from hflmpi.federation import train  # noqa: E402
from hflmpi.mpi.guard import SetupError  # noqa: E402
from hflmpi.mpi.model_check import ModelMismatchError  # noqa: E402
from hflmpi.mpi.population import PopulationAggregator  # noqa: E402
from hflmpi.mpi.population_opt import NodeOptimizers  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

NUMEL, SEED, BUCKET = 40, 5, 16
AVGM = {"lr": 0.8, "momentum": 0.7, "beta1": 0.9, "beta2": 0.99, "tau": 0.1}
ADAM = {"lr": 0.05, "momentum": 0.9, "beta1": 0.8, "beta2": 0.95, "tau": 0.1}
# (top layer, client weights): node 0 of layer 1 (clients 0-7) has no participant in event 2
EVENTS = [(1, [1, 2, 0, 3, 1, 1, 5, 2, 1, 1, 1, 0, 2, 3, 1, 4]),
          (2, [2, 2, 2, 2, 0, 1, 1, 1, 3, 0, 0, 1, 2, 1, 1, 1]),
          (1, [0] * 8 + [1, 2, 3, 4, 5, 6, 7, 8]),
          (2, [1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 9, 1, 1, 1]),
          (2, list(range(1, 17)))]


def _delta(event: int, client: int) -> torch.Tensor:
    rng = np.random.default_rng(1000 * event + client)
    return torch.tensor(rng.normal(scale=0.1 * (1 + client % 3), size=NUMEL), dtype=torch.float32)


class _Reference:
    """The nested aggregation and the nodes' server steps, one node after another."""

    def __init__(self, start: torch.Tensor, bits: list[int]) -> None:
        self.bits = bits
        self.models = {1: {k: start.clone() for k in range(2)}, 2: {0: start.clone()}}
        self.opts = {(1, k): NumpyServerOpt("avgm", NUMEL, AVGM["lr"], AVGM["momentum"], 0, 0, 0)
                     for k in range(2)}
        self.opts[(2, 0)] = NumpyServerOpt("adam", NUMEL, ADAM["lr"], 0, ADAM["beta1"],
                                           ADAM["beta2"], ADAM["tau"])
        self.worst = [float("nan"), float("nan")]

    def node(self, n: int, k: int, children: list[tuple[int, float, torch.Tensor]],
             step: int) -> None:
        total = sum(w for _, w, _ in children)
        anchor = self.models[n][k]
        if self.bits[n - 1] == 0:
            mean = np.zeros(NUMEL)
            for _, w, model in children:
                mean += (w / total) * model.numpy().astype(np.float64)
            y = mean.astype(np.float32)
        else:
            s = levels_for_bits(self.bits[n - 1])
            diffs = [(model - anchor).to(torch.float32) * (w / total) for _, w, model in children]
            scales = torch.zeros(num_buckets(NUMEL, BUCKET))
            for d in diffs:
                scales = torch.maximum(scales, bucket_absmax(d, BUCKET))
            level_sum = torch.zeros(NUMEL, dtype=torch.int64)
            for (client, _, _), d in zip(children, diffs):
                gen = torch_generator(SEED, purpose="quantize", rank=client, round=step, layer=n)
                levels = to_levels(d, scales, s, gen, bucket_size=BUCKET).to(torch.int64)
                level_sum += levels
                decoded = from_level_sum(levels, scales, s, bucket_size=BUCKET)
                error = float(((decoded - d) ** 2).sum() / (d * d).sum())
                self.worst[n - 1] = np.fmax(self.worst[n - 1], error)
            y = (anchor + from_level_sum(level_sum, scales, s, bucket_size=BUCKET)).numpy()
        stepped = self.opts[(n, k)].step(anchor.numpy(), y).astype(np.float32)
        self.models[n][k] = torch.from_numpy(stepped)

    def aggregate(self, top: int, weights: np.ndarray, trained: dict[int, torch.Tensor],
                  step: int) -> None:
        for k in range(2):
            kids = [(c, float(weights[c]), trained[c]) for c in range(8 * k, 8 * k + 8)
                    if weights[c] > 0]
            if kids:
                self.node(1, k, kids, step)
        if top == 2:
            kids = [(8 * k, float(weights[8 * k:8 * k + 8].sum()), self.models[1][k])
                    for k in range(2) if weights[8 * k:8 * k + 8].sum() > 0]
            self.node(2, 0, kids, step)
            for k in range(2):
                self.models[1][k] = self.models[2][0].clone()


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize("bits", [[0, 0], [8, 4]])
def test_node_optimizers_follow_a_serial_reference(bits):
    world = MPI.COMM_WORLD
    size = 4 if world.Get_size() >= 4 else world.Get_size()
    sub = world.Split(0 if world.Get_rank() < size else MPI.UNDEFINED, world.Get_rank())
    if sub == MPI.COMM_NULL:
        parallel_assert(world, True)
        return
    plan = plan_population(plan_fanouts([8, 2], 16), place_clients(16, size))
    start = torch.tensor(np.random.default_rng(0).normal(size=NUMEL), dtype=torch.float32)
    options = [ServerOptOptions("avgm", **AVGM), ServerOptOptions("adam", **ADAM)]
    agg = PopulationAggregator(sub, plan, start, bits, BUCKET, SEED, server_opt=options)
    problem = _replay(sub, plan, agg, _Reference(start, bits), bits)
    agg.free()
    sub.Free()
    parallel_assert(world, not problem, problem)


def _replay(sub, plan, agg, ref, bits) -> str:
    """Run the events on the aggregator and the reference; return the first mismatch (or "").

    Mismatches are collected, not raised, so that every rank runs every collective.
    """
    worst, problems = [float("nan"), float("nan")], []
    for event, (top, client_weights) in enumerate(EVENTS):
        w = np.array(client_weights, dtype=np.float64)
        layer1 = np.array([w[:8].sum(), w[8:].sum()])
        weights = [w, layer1, np.array([layer1.sum()])]
        everyone = {c: ref.models[1][c // 8] + _delta(event, c) for c in range(16)}
        mine = {c: agg.start_of(c) + _delta(event, c) for c in plan.placement.clients_on(
            sub.Get_rank()) if w[c] > 0}
        stats = agg.aggregate(top, mine, weights, step=event + 1, measure_error=True)
        worst = np.fmax(worst, stats.quant_error)
        ref.aggregate(top, w, everyone, step=event + 1)
        for n, k in [(1, k) for k in agg.nodes[1]] + [(2, 0)]:
            got, want = agg.models[n][k].numpy(), ref.models[n][k].numpy()
            # integer sums: the serial order's bits; float64 sums in another order, rounded
            # once to float32: within an ulp or so
            same = (got.tobytes() == want.tobytes() if bits[0]
                    else np.allclose(got, want, rtol=1e-6, atol=1e-7))
            if not same:
                problems.append(f"event {event}, layer {n} node {k}: {got[:3]} vs {want[:3]}")
    worst = np.nan_to_num(np.array(worst), nan=-1.0)  # NaN: this rank owns no child there
    sub.Allreduce(MPI.IN_PLACE, worst, op=MPI.MAX)
    # quant_error: the worst participant of the layer on any rank (the engine's); float32 norms
    if bits[0] and not np.allclose(worst, ref.worst, rtol=1e-5, atol=0):
        problems.append(f"quant_error {worst} vs the reference's {ref.worst}")
    return problems[0] if problems else ""


def _opt_config(out: str, rounds: int = 3, **extra):
    return _config(out, [8, 2], [2, 2], run={"rounds": rounds, "checkpoint_every": 1},
                   quantize={"bits": [8, 8]},
                   server_opt={"optimizer": ["avgm", "adam"], "lr": [0.9, 0.05],
                               "momentum": [0.5], "tau": [0.1]},
                   clients={"count": 16, "selection": "uniform", "cohort": 10}, **extra)


@pytest.mark.mpi(min_size=1)
def test_population_server_optimizers_give_the_same_bits_on_any_rank_count():
    models = _final_models_by_size(_opt_config, _sizes())
    digests = {size: _digest(m) for size, m in models.items()}
    assert len(set(digests.values())) == 1, digests
    plain = _final_models_by_size(lambda out: _config(
        out, [8, 2], [2, 2], run={"rounds": 3}, quantize={"bits": [8, 8]},
        clients={"count": 16, "selection": "uniform", "cohort": 10}), [1])[1]
    assert _digest(plain) not in digests.values()  # the optimizers did step


@pytest.mark.mpi(min_size=1)
def test_population_server_state_resumes_bitwise_and_is_required(monkeypatch):
    world = MPI.COMM_WORLD
    with _shared_dir(world) as base:
        whole = train(_opt_config(os.path.join(base, "whole.h5"), 4), world)
        part = os.path.join(base, "part.h5")
        train(_opt_config(part, 2), world)
        resumed = train(_opt_config(part, 4), world, resume=part)
        parallel_assert(world, _digest(resumed.model) == _digest(whole.model), "resume bits")
        bare = os.path.join(base, "bare.h5")
        monkeypatch.setattr(NodeOptimizers, "collect_state", lambda self, comm: {})
        train(_opt_config(bare, 2), world)
        monkeypatch.undo()
        with pytest.raises(SetupError, match="server_opt_layer1 of shape None"):
            train(_opt_config(bare, 4), world, resume=bare)
        fresh = train(_opt_config(bare, 4), world, resume=bare, allow_config_change=True)
        parallel_assert(world, _digest(fresh.model) != _digest(whole.model), "state unused")


class _Recorder:
    def __init__(self, stop_at: int = 0) -> None:
        self.rounds: list[int] = []
        self.aggregations: list[tuple[int, int, int]] = []
        self.last: torch.Tensor | None = None
        self.stop_at = stop_at

    def on_aggregation(self, info) -> None:
        self.aggregations.append((info.round, info.step, info.layer))

    def on_round_end(self, info) -> None:
        self.rounds.append(info.round)
        self.last = info.parameters()
        assert (info.metrics is not None) == (info.rank == 0)
        assert np.isfinite(info.train_loss)
        if info.round == self.stop_at:
            raise RuntimeError("enough")


@pytest.mark.mpi(min_size=1)
def test_population_callbacks_see_every_round_and_a_raise_stops_every_rank():
    world = MPI.COMM_WORLD
    with _shared_dir(world) as base:
        recorder = _Recorder()
        result = train(_opt_config(os.path.join(base, "cb.h5"), 3), world, callbacks=[recorder])
        parallel_assert(world, recorder.rounds == [1, 2, 3], str(recorder.rounds))
        events = [(r, s, layer) for r in (1, 2, 3) for s, layer in ((2, 1), (4, 2))]
        parallel_assert(world, recorder.aggregations == events, str(recorder.aggregations))
        parallel_assert(world, recorder.last is not None
                        and _digest(recorder.last) == _digest(result.model), "last model")
        stopper = [_Recorder(stop_at=2)] if world.Get_rank() == world.Get_size() - 1 else []
        with pytest.raises(SetupError, match="CallbackError: callback _Recorder.on_round_end "
                                             "raised RuntimeError: enough"):
            train(_opt_config(os.path.join(base, "stop.h5"), 4), world, callbacks=stopper)
        if stopper:
            assert stopper[0].rounds == [1, 2]


@pytest.mark.mpi(min_size=2)
def test_a_flipped_bit_in_one_rank_global_model_stops_every_rank(monkeypatch):
    world = MPI.COMM_WORLD
    last = world.Get_size() - 1
    original = PopulationAggregator.aggregate

    def flipping(self, top, *args, **kwargs):
        stats = original(self, top, *args, **kwargs)
        if top == self.plan.depth and self.rank == last:
            self.global_model.view(torch.int32)[3] ^= 1
        return stats

    monkeypatch.setattr(PopulationAggregator, "aggregate", flipping)
    with _shared_dir(world) as base:
        with pytest.raises(ModelMismatchError,
                           match=rf"the global model after round 1 differs .*rank\(s\) \[{last}\] "
                                 "diverged"):
            train(_opt_config(os.path.join(base, "flip.h5")), world)


@pytest.mark.mpi(min_size=2)
def test_population_quant_error_is_the_rank_engines_with_one_client_per_rank():
    """The run files' quant_error columns agree: the same metric (worst participant per layer)."""
    from hflmpi.record.reading import read_metrics

    world = MPI.COMM_WORLD
    size = 4 if world.Get_size() >= 4 else 2
    fanouts = [2, 2] if size == 4 else [2, 1]
    sub = world.Split(0 if world.Get_rank() < size else MPI.UNDEFINED, world.Get_rank())
    problem = ""
    with _shared_dir(world) as base:
        if sub != MPI.COMM_NULL:
            common = {"quantize": {"bits": [8, 4], "method": "sum", "downlink": "float32"},
                      "aggregation": {"algorithm": "subtree"}, "run": {"rounds": 3}}
            ranks, pop = os.path.join(base, "ranks.h5"), os.path.join(base, "pop.h5")
            train(_config(ranks, fanouts, [2, 2], **common), sub)
            train(_config(pop, fanouts, [2, 2], clients={"count": size}, **common), sub)
            if sub.Get_rank() == 0:
                want = read_metrics(ranks)["quant_error"]
                got = read_metrics(pop)["quant_error"]
                if want.shape != (3, 2) or not np.isfinite(want).all() or not np.allclose(
                        got, want, rtol=1e-6, atol=0):
                    problem = f"population {got.tolist()} vs engine {want.tolist()}"
            sub.Free()
    parallel_assert(world, not problem, problem)
