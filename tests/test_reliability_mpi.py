"""MPI tests of the guards and the hostile-client defences in the aggregation layer.

The watchdog's survey of where the ranks are is checked in-process here (the aborts it leads to
are in test_faults.py).

References are independent: numpy medians and means of the models every rank regenerates from
its seed, the plain quantized aggregation for secure masking (masks must cancel bit for bit), and
a chi-square test for the uniformity of what a masked client sends.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import parallel_assert

mpi4py = pytest.importorskip("mpi4py")
from mpi4py import MPI  # noqa: E402

from hflmpi.core.rng import torch_generator  # noqa: E402
from hflmpi.core.topology import plan_fanouts, plan_groups  # noqa: E402
from hflmpi.mpi.aggregate import HierarchicalAggregator, LayerFailedError, PrivacyOptions  # noqa: E402
from hflmpi.mpi.comm import LayerComms  # noqa: E402
from hflmpi.mpi.guard import (  # noqa: E402
    HandshakeError,
    NonFiniteUpdateError,
    RankStatus,
    Watchdog,
    stall_report,
)

NUMEL = 4096


def _anchor() -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(7).standard_normal(NUMEL).astype(np.float32))


def _model_of(rank: int) -> torch.Tensor:
    noise = np.random.default_rng(50 + rank).standard_normal(NUMEL).astype(np.float32)
    return _anchor() + torch.from_numpy(0.05 * noise)


def _flat_comms(comm):
    size = comm.Get_size()
    return LayerComms(comm, plan_fanouts([size], size))


@pytest.mark.mpi(min_size=2)
def test_handshake_mismatch_raises_on_every_rank():
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    with _flat_comms(comm) as comms:
        agg = HierarchicalAggregator(comms, _model_of(rank))
        step = 5 if rank < size - 1 else 6  # the last rank is one step ahead
        with pytest.raises(HandshakeError, match=r"layer-1 aggregation .* disagree"):
            agg.aggregate(1, 1.0, step=step)


@pytest.mark.mpi(min_size=2)
def test_nan_raises_everywhere_naming_the_rank():
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    with _flat_comms(comm) as comms:
        flat = _model_of(rank)
        if rank == size - 1:
            flat[10] = float("nan")
        agg = HierarchicalAggregator(comms, flat)
        with pytest.raises(NonFiniteUpdateError, match=rf"rank\(s\) \[{size - 1}\]"):
            agg.aggregate(1, 1.0, step=1)


@pytest.mark.mpi(min_size=3)
@pytest.mark.parametrize("bits", [0, 8])
def test_nan_client_dropped_when_asked(bits):
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    with _flat_comms(comm) as comms:
        flat = _anchor().clone()
        agg = HierarchicalAggregator(comms, flat, bits=[bits], nonfinite="drop")
        flat.copy_(_model_of(rank))
        if rank == 1:
            flat[0] = float("inf")
        stats = agg.aggregate(1, 1.0, step=1)
        others = [r for r in range(size) if r != 1]
        expected = torch.stack([_model_of(r).double() for r in others]).mean(0)
        err = float((flat.double() - expected).abs().max())
        tolerance = 1e-6 if bits == 0 else 0.01  # 8-bit grid steps of max|d| / 127
        parallel_assert(comm, stats.dropped == [1], f"dropped {stats.dropped}")
        parallel_assert(comm, err < tolerance and bool(torch.isfinite(flat).all()), f"err {err}")


@pytest.mark.mpi(min_size=3)
@pytest.mark.parametrize("rule", ["median", "trimmed_mean"])
def test_robust_rule_matches_numpy_and_resists_an_attacker(rule):
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    anchor = _anchor()
    with _flat_comms(comm) as comms:
        flat = anchor.clone()
        agg = HierarchicalAggregator(comms, flat, robust=[rule], robust_params={"trim": 1 / size})
        model = _model_of(rank)
        if rank == 0:
            model = anchor - 1000.0 * (model - anchor)  # scaled, sign-flipped update
        flat.copy_(model)
        agg.aggregate(1, 1.0, step=1)
        updates = []
        for r in range(size):
            m = _model_of(r).numpy().astype(np.float64) - anchor.numpy()
            updates.append(-1000.0 * m if r == 0 else m)
        updates = np.stack(updates)
        if rule == "median":
            combined = np.median(updates, axis=0)
        else:
            ordered = np.sort(updates, axis=0)
            b = max(1, int(np.floor(size / size)))  # trim = 1/k drops one value at each end
            combined = ordered[b: size - b].mean(axis=0)
        expected = anchor.numpy() + combined
        err = float(np.abs(flat.numpy() - expected).max())
        parallel_assert(comm, err < 1e-5, f"{rule}: max diff {err:.3g}")
        honest = np.mean(updates[1:], axis=0) + anchor.numpy()
        parallel_assert(comm, float(np.abs(flat.numpy() - honest).max()) < 0.2, "attacker won")


@pytest.mark.mpi(min_size=2)
def test_secure_masks_cancel_bit_for_bit_and_hide_each_client():
    comm = MPI.COMM_WORLD
    rank = comm.Get_rank()
    results, sent = [], []
    with _flat_comms(comm) as comms:
        for secure in (False, True):
            flat = _anchor().clone()
            agg = HierarchicalAggregator(comms, flat, bits=[8], method="sum", secure=[secure], seed=3,
                                         allow_small_secure_groups=True)  # also at -n 2
            flat.copy_(_model_of(rank))
            agg.aggregate(1, float(rank + 1), step=9)
            results.append(flat.clone())
            sent.append(agg._layers[1].uplink._levels.numpy().copy())  # what this rank put on the wire
    parallel_assert(comm, torch.equal(results[0], results[1]), "masks did not cancel")
    if rank > 0:  # a non-leader's message: plain levels are far from uniform, masked ones are
        def chi2_low_byte(values: np.ndarray) -> float:
            counts = np.bincount(values.astype(np.int64) & 0xFF, minlength=256)
            expected = len(values) / 256
            return float(((counts - expected) ** 2 / expected).sum())

        # 255 degrees of freedom: the 0.999 quantile is ~330
        plain, masked = chi2_low_byte(sent[0]), chi2_low_byte(sent[1])
        ok = plain > 1000 and masked < 330
    else:
        ok, plain, masked = True, 0.0, 0.0
    parallel_assert(comm, ok, f"chi2 plain {plain:.0f}, masked {masked:.0f}")


def _weighted_median(values: np.ndarray, weights: list[int]) -> np.ndarray:
    """Column-wise weighted median for an odd integer total weight (no ties): the first sorted
    value whose cumulative weight exceeds half the total."""
    total = sum(weights)
    out = np.empty(values.shape[1])
    for col in range(values.shape[1]):
        cumulative = 0
        for row in np.argsort(values[:, col], kind="stable"):
            cumulative += weights[row]
            if 2 * cumulative > total:
                out[col] = values[row, col]
                break
    return out


@pytest.mark.mpi(min_size=4)
def test_robust_layer_clamps_a_claimed_weight_to_the_known_size():
    """Rank 1 sends a hostile update and claims weight 1e9 (issue 11, defect 4).

    Tree: layer 1 = [[0, 1, 2], [3], [4], ...] with the weighted median, layer 2 = the weighted
    mean over the groups. Every device's true weight (its cap) is 2r + 1. The reference clamps
    rank 1's claim to 3, takes the weighted median of group 0 in numpy, and weighs group 0 by
    1 + 3 + 5 = 9 at the root; trusting the claim would hand both layers to the attacker.
    """
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    caps = [2 * r + 1 for r in range(size)]
    anchor = _anchor().numpy().astype(np.float64)
    plan = plan_groups([[0, 1, 2]] + [[r] for r in range(3, size)], size)
    with LayerComms(comm, plan) as comms:
        flat = _anchor().clone()
        agg = HierarchicalAggregator(comms, flat, robust=["median", "mean"], weight_caps=caps)
        model = _model_of(rank)
        if rank == 1:
            model = _anchor() - 1000.0 * (model - _anchor())
        flat.copy_(model)
        agg.aggregate(2, 1e9 if rank == 1 else float(caps[rank]), step=1)
    updates = np.stack([_model_of(r).numpy().astype(np.float64) - anchor for r in range(3)])
    updates[1] *= -1000.0
    group0 = anchor + _weighted_median(updates, caps[:3])
    others = [(caps[r], _model_of(r).numpy().astype(np.float64)) for r in range(3, size)]
    total = sum(caps[:3]) + sum(w for w, _ in others)
    expected = (sum(caps[:3]) * group0 + sum(w * m for w, m in others)) / total
    err = float(np.abs(flat.numpy() - expected).max())
    parallel_assert(comm, err < 1e-5, f"max diff from the clamped reference {err:.3g}")


@pytest.mark.mpi(min_size=3)
@pytest.mark.timeout(120, method="thread")  # before the fix: a hang, ended here
def test_robust_leader_failure_raises_on_every_rank():
    """A robust leader whose rule cannot run stops its whole subtree with one error.

    Tree: layer 1 = [[0, 1, 2], [3, 4, 5], [6], ...] (from -n 6, else [[0, 1, 2], [3], ...])
    with the median, layer 2 = the mean over the groups. The devices of the last 3-group may
    claim no weight (cap 0), so its leader clamps every claim to 0 and the median has nothing
    to combine. Only that leader knows; before the fix it raised alone and the other ranks hung
    in the broadcast down. Every rank must raise the same error, naming the leader.
    """
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    groups = [[0, 1, 2], [3, 4, 5]] if size >= 6 else [[0, 1, 2]]
    groups += [[r] for r in range(3 * len(groups), size)]
    failing = groups[1 if size >= 6 else 0]
    caps = [0.0 if r in failing else 1.0 for r in range(size)]
    message = "(no error)"
    with LayerComms(comm, plan_groups(groups, size)) as comms:
        flat = _anchor().clone()
        agg = HierarchicalAggregator(comms, flat, robust=["median", "mean"], weight_caps=caps)
        flat.copy_(_model_of(rank))
        try:
            agg.aggregate(2, 1.0, step=4)
        except LayerFailedError as exc:
            message = str(exc)
    messages = comm.allgather(message)
    parallel_assert(comm, len(set(messages)) == 1, f"the ranks disagree: {set(messages)}")
    parallel_assert(comm, message.startswith(
        f"layer-2 aggregation at step 4 failed at the leader on rank {failing[0]}: "
        "robust='median' at layer 1") and "every child has weight 0" in message, message)


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("rule,params", [("trimmed_mean", {"trim": 0.2}), ("median", {}),
                                         ("krum", {"f": 0})])
def test_robust_rule_that_trims_nothing_is_refused(rule, params):
    """trim = 0.2 of 4 children trims floor(0.8) = 0: one Byzantine child would be averaged in."""
    comm = MPI.COMM_WORLD
    size = comm.Get_size()
    if rule == "trimmed_mean":
        params = {"trim": 0.9 / size}  # floor(0.9) = 0 at every fan-in
    if rule == "median":  # the median of two is their mean: only groups of 2 can be refused
        groups = [[0, 1]] + [[r] for r in range(2, size)]
    else:
        groups = [list(range(size))]
    with LayerComms(comm, plan_groups(groups, size)) as comms:
        try:
            HierarchicalAggregator(comms, torch.zeros(8), robust=[rule, "mean"],
                                   robust_params=params)
            message = ""
        except ValueError as exc:
            message = str(exc)
    in_refused_group = comm.Get_rank() < len(groups[0])
    ok = ("Byzantine child" in message) == in_refused_group  # krum at k = 2: its own k > 2f + 2
    parallel_assert(comm, ok, f"{rule} {params}: got {message!r}")


@pytest.mark.mpi(min_size=2)
def test_secure_group_of_two_is_refused_unless_acknowledged():
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    plan = plan_groups([[0, 1]] + [[r] for r in range(2, size)], size)
    outcomes = []
    with LayerComms(comm, plan) as comms:
        for allow in (False, True):
            try:
                HierarchicalAggregator(comms, torch.zeros(64), bits=[8, 0], secure=[True, False],
                                       allow_small_secure_groups=allow)
                outcomes.append("")
            except ValueError as exc:
                outcomes.append(str(exc))
    refused = "learns its partner's exactly" in outcomes[0]
    parallel_assert(comm, refused == (rank < 2) and outcomes[1] == "",
                    f"rank {rank}: {outcomes}")


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("mode", ["central", "distributed"])
def test_privacy_noise_has_the_promised_scale_and_is_fresh_each_run(mode):
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    sigma, clip = 0.5, 1e3  # clip far above the update norms: only the noise differs
    outcomes = {}
    with _flat_comms(comm) as comms:
        for insecure in (False, False, True, True):
            flat = _anchor().clone()
            options = PrivacyOptions(1, clip, sigma, mode, insecure_reproducible_noise=insecure)
            agg = HierarchicalAggregator(comms, flat, seed=4, privacy=options)
            flat.copy_(_model_of(rank))
            agg.aggregate(1, 1.0, step=2)
            outcomes.setdefault(insecure, []).append(flat.clone())
    exact = torch.stack([_model_of(r).double() for r in range(size)]).mean(0)
    expected_std = sigma * clip / size  # sensitivity C * max share, shares 1/size
    for insecure, (first, second) in outcomes.items():
        ratio = float((first.double() - exact).std()) / expected_std
        parallel_assert(comm, 0.95 < ratio < 1.05, f"noise std is {ratio:.3f} x the promised one")
        same = torch.equal(first, second)
        parallel_assert(comm, same == insecure,
                        f"insecure={insecure}: same seed gave {'equal' if same else 'different'} noise")


@pytest.mark.mpi(min_size=2)
def test_dp_noise_cannot_be_regenerated_from_the_run_seed():
    """The attack of issue 11: rebuild the leader's noise from the stored seed and subtract it.

    With the test-only override the attack recovers the exact aggregate (so the attack model is
    right); by default the residual is as large as the noise itself.
    """
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    seed, step, sigma, clip = 11, 3, 5.0, 1e3
    std = sigma * clip / size  # central noise: sigma * C * max_c a_c with a_c = 1/size
    exact = torch.stack([_model_of(r).double() for r in range(size)]).mean(0)
    residual = {}
    with _flat_comms(comm) as comms:
        for insecure in (False, True):
            flat = _anchor().clone()
            options = PrivacyOptions(1, clip, sigma, "central", insecure_reproducible_noise=insecure)
            agg = HierarchicalAggregator(comms, flat, seed=seed, privacy=options)
            flat.copy_(_model_of(rank))
            agg.aggregate(1, 1.0, step=step)
            generator = torch_generator(seed, purpose="dp", rank=0, round=step, layer=1)
            regenerated = torch.randn(NUMEL, generator=generator, dtype=torch.float32) * std
            recovered = flat.double() - regenerated.double()
            residual[insecure] = float((recovered - exact).abs().max())
    parallel_assert(comm, residual[True] < 1e-6 * std,
                    f"override: the seeded noise was not recovered ({residual[True]:.3g})")
    parallel_assert(comm, residual[False] > std,
                    f"default: subtracting the seed's noise recovered the update to "
                    f"{residual[False]:.3g} (noise std {std:.3g})")


@pytest.mark.mpi(min_size=2)
def test_privacy_clips_each_update():
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    anchor = _anchor()
    clip = 0.1
    with _flat_comms(comm) as comms:
        flat = anchor.clone()
        agg = HierarchicalAggregator(comms, flat, privacy=PrivacyOptions(1, clip, 1e-9, "central"))
        flat.copy_(_model_of(rank))
        agg.aggregate(1, 1.0, step=0)
    clipped = []
    for r in range(size):
        d = _model_of(r).double() - anchor.double()
        clipped.append(d * min(1.0, clip / float(d.norm())))
    expected = anchor.double() + torch.stack(clipped).mean(0)
    parallel_assert(comm, float((flat.double() - expected).abs().max()) < 1e-6)


def test_invalid_layer_options_serial():
    with LayerComms(MPI.COMM_SELF, plan_fanouts([1], 1)) as comms:
        flat = torch.zeros(4)
        with pytest.raises(ValueError, match=r"robust\[0\]='median' with quantize.bits\[0\]=8: robust rules need full-prec"):
            HierarchicalAggregator(comms, flat, bits=[8], robust=["median"])
        with pytest.raises(ValueError, match=r"set quantize.bits\[0\] to 1..16"):
            HierarchicalAggregator(comms, flat, secure=[True])
        with pytest.raises(ValueError, match="not one of"):
            HierarchicalAggregator(comms, flat, robust=["mode"])
        with pytest.raises(ValueError, match="nonfinite"):
            HierarchicalAggregator(comms, flat, nonfinite="ignore")


@pytest.mark.mpi(min_size=2)
def test_watchdog_survey_names_the_rank_outside_the_collective():
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    last = size - 1
    dog = Watchdog(comm, 600.0)
    inner = comm.Split(0 if rank != last else MPI.UNDEFINED, rank)
    message = ""
    try:
        with dog.guard("the warm-up barrier"):
            comm.Barrier()
        if rank != last:
            with dog.guard("the test barrier"):
                inner.Barrier()  # every rank but the last is inside "the test barrier" now
                if rank == 0:
                    message = dog.report()
                comm.Barrier()
        else:
            comm.Barrier()  # unguarded: to the others it looks like a rank still computing
    finally:
        dog.close()
        if inner != MPI.COMM_NULL:
            inner.Free()
    if rank == 0:
        expected = [
            "hflmpi: watchdog: the test barrier stalled for more than 600 s on rank 0; ",
            f"rank {last} did not arrive (busy outside any collective since the warm-up barrier ended",
        ]
        if size > 2:
            expected.append(f"{'rank 1' if size == 3 else f'ranks 1-{last - 1}'} waiting in it too")
        ok = all(part in message for part in expected)
    else:
        ok = True
    parallel_assert(comm, ok, f"report: {message!r}")


def test_rank_status_crosses_the_wire_as_fixed_bytes_serial():
    long_name = "the layer-2 aggregation of round 12 (step 40) " * 10
    status = RankStatus(sequence=41, inside=True, seconds=2.5, phase=long_name)
    buf = status.encode()
    assert buf.dtype == np.uint8 and buf.shape == (256,)
    back = RankStatus.decode(buf)
    assert (back.sequence, back.inside, back.seconds) == (41, True, 2.5)
    assert long_name.startswith(back.phase) and len(back.phase.encode()) == 256 - 32


def test_stall_report_names_silent_ranks_first_serial():
    here = RankStatus(7, True, 6.0, "the preemption poll after round 2")
    answers = {
        1: here,
        2: RankStatus(6, False, 9.0, "the metrics reduction of round 2"),  # busy, but answers
        4: RankStatus(8, True, 1.0, "the round-2 checkpoint"),  # past it
        5: RankStatus(7, False, 0.5, "the preemption poll after round 2"),  # left it already
    }
    text = stall_report(0, 6, "the preemption poll after round 2", 7, 5.0, 4.0, answers)
    assert text == (
        "hflmpi: watchdog: the preemption poll after round 2 stalled for more than 5 s on rank 0; "
        "rank 3 did not arrive (no answer within 4 s: stopped, dead, or stuck holding the GIL) "
        "(the others: rank 1 waiting in it too; rank 2 busy outside any collective since the "
        "metrics reduction of round 2 ended 9 s ago; ranks 4-5 past it)"
    )
    answers[3] = RankStatus(5, True, 12.0, "the divergence measurement of round 2")
    text = stall_report(0, 6, "the preemption poll after round 2", 7, 5.0, 4.0, answers)
    assert "; rank 2 did not arrive (busy outside any collective since the metrics reduction of " \
           "round 2 ended 9 s ago); rank 3 did not arrive (still in the divergence measurement " \
           "of round 2) (the others: rank 1 waiting in it too; ranks 4-5 past it)" in text
    everyone = {r: here for r in range(1, 4)}
    assert "none is missing: the collective itself hangs" in stall_report(0, 4, "x", 7, 5, 4, everyone)
