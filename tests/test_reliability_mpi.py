"""MPI tests of the guards and the hostile-client defences in the aggregation layer.

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

from hflmpi.mpi.aggregate import HierarchicalAggregator, PrivacyOptions  # noqa: E402
from hflmpi.mpi.comm import LayerComms  # noqa: E402
from hflmpi.mpi.guard import HandshakeError, NonFiniteUpdateError  # noqa: E402
from hflmpi.core.topology import plan_fanouts  # noqa: E402

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
            agg = HierarchicalAggregator(comms, flat, bits=[8], method="sum", secure=[secure], seed=3)
            flat.copy_(_model_of(rank))
            agg.aggregate(1, float(rank + 1), step=9)
            results.append(flat.clone())
            sent.append(agg._uplinks[1]._levels.numpy().copy())  # what this rank put on the wire
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


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("mode", ["central", "distributed"])
def test_privacy_noise_has_the_promised_scale_and_is_reproducible(mode):
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    sigma, clip = 0.5, 1e3  # clip far above the update norms: only the noise differs
    outcomes = []
    with _flat_comms(comm) as comms:
        for _ in range(2):
            flat = _anchor().clone()
            agg = HierarchicalAggregator(
                comms, flat, seed=4, privacy=PrivacyOptions(1, clip, sigma, mode)
            )
            flat.copy_(_model_of(rank))
            agg.aggregate(1, 1.0, step=2)
            outcomes.append(flat.clone())
    exact = torch.stack([_model_of(r).double() for r in range(size)]).mean(0)
    noise = outcomes[0].double() - exact
    expected_std = sigma * clip / size  # sensitivity C * max share, shares 1/size
    ratio = float(noise.std()) / expected_std
    parallel_assert(comm, torch.equal(outcomes[0], outcomes[1]), "noise not reproducible")
    parallel_assert(comm, 0.95 < ratio < 1.05, f"noise std is {ratio:.3f} x the promised one")


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
        with pytest.raises(ValueError, match="robust rules need every child's full-precision"):
            HierarchicalAggregator(comms, flat, bits=[8], robust=["median"])
        with pytest.raises(ValueError, match="set bits > 0"):
            HierarchicalAggregator(comms, flat, secure=[True])
        with pytest.raises(ValueError, match="not one of"):
            HierarchicalAggregator(comms, flat, robust=["mode"])
        with pytest.raises(ValueError, match="nonfinite"):
            HierarchicalAggregator(comms, flat, nonfinite="ignore")
