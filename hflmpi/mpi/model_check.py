"""Check that ranks which must hold the same model bits do (a cheap checksum, collective).

After a population's top-layer aggregation every rank holds the global model, computed from the
same integer or float64 sums (:mod:`hflmpi.mpi.population`); nothing sends it down, so a rank
that got other bits (a flipped bit in memory, an MPI library whose ``Allreduce`` gives ranks
different results) would go on training from another model without anyone noticing.
:func:`check_same_bits` hashes the model on every rank and compares the hashes with one 16-byte
``MAX`` allreduce (``[h, -h]``: equal everywhere iff ``max(h) == -max(-h)``); only on a
mismatch does it gather every rank's hash to name the ranks that differ.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch
from mpi4py import MPI

from hflmpi.errors import HflmpiError
from hflmpi.mpi.messages import allgather_int64

__all__ = ["ModelMismatchError", "check_same_bits", "model_checksum"]


class ModelMismatchError(HflmpiError, RuntimeError):
    """Ranks that must hold the same model hold different bits; raised on every rank."""


def model_checksum(model: torch.Tensor) -> int:
    """Return a 63-bit hash of the bits of ``model`` (flat, any device)."""
    host = np.ascontiguousarray(model.detach().cpu().numpy())
    return int.from_bytes(hashlib.blake2b(host.view(np.uint8).data, digest_size=8).digest(),
                          "little") >> 1


def check_same_bits(comm: MPI.Comm, model: torch.Tensor, what: str) -> None:
    """Raise :class:`ModelMismatchError` on every rank of ``comm`` unless all hold ``model``'s bits.

    Collective over ``comm``: one 16-byte allreduce, plus an allgather of one int64 per rank
    only when the hashes differ. ``what`` names the model in the error, e.g. ``"the global model
    after round 3"``.
    """
    key = model_checksum(model)
    probe = np.array([key, -key], dtype=np.int64)
    comm.Allreduce(MPI.IN_PLACE, probe, op=MPI.MAX)
    if probe[0] == -probe[1]:
        return
    keys = allgather_int64(comm, [key], low=[0], high=[2**63 - 1],
                           what=f"{what}: sharing the model checksums")
    groups: dict[int, list[int]] = {}
    for rank, (their_key,) in enumerate(keys.tolist()):
        groups.setdefault(their_key, []).append(rank)
    ordered = sorted(groups.items(), key=lambda item: (-len(item[1]), item[1]))
    detail = "; ".join(f"rank(s) {ranks} hold checksum {key:#018x}" for key, ranks in ordered)
    odd = [r for _, ranks in ordered[1:] for r in ranks]
    raise ModelMismatchError(
        f"{what} differs between ranks ({detail}): rank(s) {odd} diverged from the others; "
        "check those ranks' hosts (memory errors) and that every rank runs the same MPI "
        "library and hflmpi version")

