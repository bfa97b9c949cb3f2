r"""Secure aggregation of integer levels by pairwise additive masking (pure tensor math).

The quantized uplink (:mod:`hflmpi.mpi.uplink`) sums the children's integer levels ``l_i`` (in
``[-s, s]``) with one MPI ``Reduce(SUM)``. Following Bonawitz et al., "Practical secure
aggregation for privacy-preserving machine learning" (CCS 2017, Sec. 4), each of the ``k``
participants ``i = 0..k-1`` of a group sends instead the residue

.. math::

    y_i = \Big(l_i + \sum_{j > i} p_{ij} - \sum_{j < i} p_{ij}\Big) \bmod 2^w \in [0, 2^w),

where ``p_ij = PRG(key_ij)`` is a vector of uniform ``w``-bit integers from a key that only
participants ``i`` and ``j`` hold. Every pair's mask is added once and subtracted once, so
``sum_i y_i = sum_i l_i (mod 2^w)``, and as long as the true sum lies in ``[-2^(w-1), 2^(w-1))``
(``w >= required_modulus_bits(k s)``), :func:`unmask_sum` returns it exactly. Any single ``y_i``
(and any partial sum of fewer than all ``k``) is uniform over ``Z_{2^w}`` whatever ``l_i`` is,
given that the observer lacks the pair keys involved.

No overflow, on any MPI: residues travel in a signed container of ``D`` bits with
``k (2^w - 1) <= 2^(D-1) - 1`` (:func:`hflmpi.core.wire.masked_container_nbytes`, about
``w + ceil(log2 k) + 1`` bits; :func:`mask_levels` refuses a larger ``w``), so the integer sum of
the ``k`` residues and every partial sum on the way are exact; :func:`unmask_sum` reduces modulo
``2^w`` after the sum. Nothing relies on wrap-around (Open MPI 5 saturates 8/16-bit sums).

Keys and generator:

* A :class:`PairwiseSeeds` gives the 32-byte key of pair ``{i, j}`` for one release, bound to the
  context ``(step, layer, group)``; masks are never reused across releases (reuse would reveal
  ``l_i - l'_i``).
* :class:`SharedSecretSeeds` derives it as ``BLAKE2b(key=secret, person="hflmpi-secagg",
  data=(step, layer, group, min(i,j), max(i,j)))`` from one run secret that **every holder knows**:
  it hides the levels only from parties without the secret (see ``docs/security.md``).
* :class:`DiffieHellmanSeeds` agrees a key per pair with finite-field Diffie-Hellman in the
  2048-bit MODP group 14 (RFC 3526) and derives the per-release key from it with keyed BLAKE2b;
  each participant then holds only its own ``k - 1`` pair keys, so an honest-but-curious leader
  (itself participant 0) learns only the sum.
* The PRG expands a key with SHAKE-128 (FIPS 202), block by block (``2**20`` elements per block,
  each block an independent XOF output keyed by ``(key, block index)``), ``ceil(w/8)`` bytes per
  element, little-endian, reduced modulo ``2^w``. It runs on the CPU (about 0.2-0.4 GB/s);
  masks are copied to the levels' device.

Dropouts: if a participant that others masked against does not contribute, the sum carries its
pairs' masks and is garbage. There is no secret-sharing recovery in this version: the round must
be aborted and retried, or the survivors each add :func:`mask_correction` (they hold the pair keys
with the dropped participants) in a second message, which removes exactly those masks. A dropped
participant's late message must then be discarded: with the corrections, it would reveal its levels
(Bonawitz et al.'s double masking prevents this; it is not implemented).

Arithmetic: masks are combined in numpy ``uint64`` (defined wrap-around modulo ``2^64``, a
multiple of ``2^w``); levels are reduced to ``l & (2^w - 1)`` and added to the mask in int64,
which cannot overflow (``w <= 62``).
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterable

import numpy as np
import torch

from hflmpi.core.pair_keys import (
    MODP_2048_G,
    MODP_2048_P,
    DiffieHellmanSeeds,
    PairwiseSeeds,
    SharedSecretSeeds,
    dh_keypair,
    dh_master_key,
    release_key,
)

__all__ = [
    "PairwiseSeeds",
    "SharedSecretSeeds",
    "DiffieHellmanSeeds",
    "dh_keypair",
    "dh_master_key",
    "release_key",
    "MODP_2048_P",
    "MODP_2048_G",
    "dtype_bits",
    "required_modulus_bits",
    "max_modulus_bits",
    "pair_mask",
    "mask_levels",
    "unmask_sum",
    "mask_correction",
]

_INT_DTYPES = {torch.int8: 8, torch.int16: 16, torch.int32: 32, torch.int64: 64}
_BLOCK = 1 << 20  # elements per independent PRG block


# --------------------------------------------------------------------------------------------
# Masks
# --------------------------------------------------------------------------------------------


def dtype_bits(dtype: torch.dtype) -> int:
    """Return the width of a signed integer dtype (int8/16/32/64)."""
    if dtype not in _INT_DTYPES:
        raise TypeError(f"secure aggregation needs int8/16/32/64 levels, got {dtype}")
    return _INT_DTYPES[dtype]


def required_modulus_bits(bound: int) -> int:
    """Return the smallest ``w`` with ``[-bound, bound]`` inside ``[-2^(w-1), 2^(w-1))``.

    For a group of ``fan_in`` children with levels in ``[-s, s]`` pass ``bound = fan_in * s``.
    """
    if isinstance(bound, bool) or not isinstance(bound, int) or bound < 0:
        raise ValueError(f"bound={bound!r} must be an integer >= 0")
    return bound.bit_length() + 1


def max_modulus_bits(dtype: torch.dtype, summands: int) -> int:
    """Return the largest ``w`` whose ``summands`` residues in ``[0, 2^w)`` sum exactly in ``dtype``.

    That is the largest ``w <= 62`` with ``summands (2^w - 1) <= iinfo(dtype).max``; 0 if none.
    """
    if isinstance(summands, bool) or not isinstance(summands, int) or summands < 1:
        raise ValueError(f"summands={summands!r} must be an integer >= 1")
    room = ((1 << (dtype_bits(dtype) - 1)) - 1) // summands  # 2^w - 1 <= room
    return min(62, (room + 1).bit_length() - 1)


def _check_modulus(modulus_bits: int | None, dtype: torch.dtype, summands: int) -> int:
    top = max_modulus_bits(dtype, summands)
    if modulus_bits is None:
        modulus_bits = top
    if isinstance(modulus_bits, bool) or not isinstance(modulus_bits, int):
        raise TypeError(f"modulus_bits={modulus_bits!r} must be an integer")
    if not 2 <= modulus_bits <= top:
        raise ValueError(f"modulus_bits={modulus_bits} must be in 2..{top} for {dtype} containers "
                         f"summing {summands} residues: {summands} * (2^w - 1) must fit the "
                         "container, so that the sum never overflows (use a wider container)")
    return modulus_bits


def pair_mask(key: bytes, numel: int, modulus_bits: int, *, start: int = 0) -> np.ndarray:
    """Return elements ``start .. start+numel`` of the mask stream of ``key`` as ``uint64 < 2^w``.

    Element ``e`` of the stream is bytes ``[(e % B) c, (e % B + 1) c)`` of
    ``SHAKE-128(key || "blk" || le64(e // B))`` read little-endian and reduced modulo ``2^w``,
    with ``B = 2**20`` elements per block and ``c = 1, 2, 4`` or ``8`` bytes (the smallest
    that holds ``w`` bits).
    """
    if not 1 <= modulus_bits <= 64:
        raise ValueError(f"modulus_bits={modulus_bits} must be in 1..64")
    if numel < 0 or start < 0:
        raise ValueError(f"numel={numel} and start={start} must be >= 0")
    nbytes = next(c for c in (1, 2, 4, 8) if 8 * c >= modulus_bits)
    dtype = np.dtype(f"<u{nbytes}")
    out = np.empty(numel, dtype=np.uint64)
    done = 0
    while done < numel:
        element = start + done
        block, offset = divmod(element, _BLOCK)
        count = min(numel - done, _BLOCK - offset)
        stream = hashlib.shake_128(key + b"blk" + struct.pack("<Q", block)).digest(
            (offset + count) * nbytes
        )
        out[done : done + count] = np.frombuffer(stream, dtype=dtype, offset=offset * nbytes)
        done += count
    if modulus_bits < 64:
        out &= np.uint64((1 << modulus_bits) - 1)
    return out


def _pair_keys(
    participant: int, peers: Iterable[int], seeds: PairwiseSeeds, step: int, layer: int, group: int
) -> list[tuple[int, bytes]]:
    return [(j, seeds.pair_key(participant, j, step=step, layer=layer, group=group)) for j in peers]


def _net_mask(
    participant: int, keys: list[tuple[int, bytes]], start: int, count: int, modulus_bits: int
) -> np.ndarray:
    """Return ``sum_{j > i} p_ij - sum_{j < i} p_ij mod 2^w`` over ``keys`` for one block."""
    total = np.zeros(count, dtype=np.uint64)
    for j, key in keys:
        mask = pair_mask(key, count, modulus_bits, start=start)
        if j > participant:
            total += mask  # uint64 arithmetic wraps modulo 2^64 by definition
        else:
            total -= mask
    total &= np.uint64((1 << modulus_bits) - 1)  # w <= 62 here
    return total


def _add_mod(levels: torch.Tensor, mask: np.ndarray, modulus_bits: int, out: torch.Tensor) -> None:
    """Write ``(levels + mask) mod 2^w`` into ``out`` (1-D views of one block), in ``[0, 2^w)``."""
    low_bits = (1 << modulus_bits) - 1
    residue = torch.bitwise_and(levels.to(torch.int64), low_bits)  # two's complement: l mod 2^w
    residue.add_(torch.from_numpy(mask.view(np.int64)).to(levels.device))  # < 2^63 for w <= 62
    out.copy_(residue.bitwise_and_(low_bits))


def _apply_masks(levels: torch.Tensor, out: torch.Tensor, participant: int,
                 keys: list[tuple[int, bytes]], modulus_bits: int, negate: bool = False) -> None:
    """Add (or subtract) the net mask of ``keys`` to 1-D ``levels`` into ``out``, block by block."""
    numel = levels.numel()
    for start in range(0, numel, _BLOCK):
        count = min(_BLOCK, numel - start)
        net = _net_mask(participant, keys, start, count, modulus_bits)
        if negate:
            net = np.zeros(count, dtype=np.uint64) - net  # numpy uint64 wraps modulo 2^64
            net &= np.uint64((1 << modulus_bits) - 1)
        _add_mod(levels[start : start + count], net, modulus_bits, out[start : start + count])


def _check_group(participant: int, group_size: int) -> None:
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size={group_size!r} must be an integer >= 1")
    if isinstance(participant, bool) or not isinstance(participant, int):
        raise TypeError(f"participant={participant!r} must be an integer id")
    if not 0 <= participant < group_size:
        raise ValueError(f"participant={participant} is outside 0..{group_size - 1}")


def mask_levels(
    levels: torch.Tensor,
    participant: int,
    group_size: int,
    seeds: PairwiseSeeds,
    modulus_bits: int | None = None,
    *,
    step: int,
    layer: int,
    group: int = 0,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Return ``participant``'s masked residues ``(l_i + sum_{j>i} p_ij - sum_{j<i} p_ij) mod 2^w``.

    Sum the ``group_size`` results as plain integers (they fit the container, see ``modulus_bits``)
    and recover the true sum with :func:`unmask_sum`.

    Parameters
    ----------
    levels : Tensor
        int8/16/32/64 levels (any shape, any device).
    participant : int
        This participant's id ``i`` in ``0..group_size-1`` (its rank in the group communicator).
    group_size : int
        Number of participants ``k`` whose masked levels will be summed. With ``k = 1`` there is
        no pair and the result is ``l mod 2^w`` (a sum of one reveals it anyway).
    seeds : PairwiseSeeds
        Pair keys.
    modulus_bits : int, optional
        ``w``: at least 2, at most :func:`max_modulus_bits` ``(levels.dtype, group_size)``, so
        that ``k`` residues sum without overflow in the container (the default is that
        largest ``w``). The true sum of the group must lie in ``[-2^(w-1), 2^(w-1))``.
    step, layer, group : int
        The release this mask is for; every release must use a distinct triple.
    out : Tensor, optional
        Tensor of ``levels``' dtype, shape and device to write into (may be ``levels`` itself).

    Returns
    -------
    Tensor
        Masked residues in ``[0, 2^w)``, ``levels``' dtype (``out`` if given).
    """
    _check_group(participant, group_size)
    w = _check_modulus(modulus_bits, levels.dtype, group_size)
    if out is None:
        out = torch.empty_like(levels)
    if out.dtype != levels.dtype or out.shape != levels.shape:
        raise ValueError(f"out must match levels: {levels.dtype} {tuple(levels.shape)}")
    if not out.is_contiguous():
        raise ValueError("out must be contiguous")
    peers = [j for j in range(group_size) if j != participant]
    keys = _pair_keys(participant, peers, seeds, step, layer, group)
    _apply_masks(levels.reshape(-1), out.view(-1), participant, keys, w)
    return out


def unmask_sum(masked_sum: torch.Tensor, modulus_bits: int) -> torch.Tensor:
    """Return the true sum, ``masked_sum mod 2^w`` mapped to ``[-2^(w-1), 2^(w-1))``.

    The masks cancel modulo ``2^w``. Returns a new tensor of ``masked_sum``'s dtype.

    Parameters
    ----------
    masked_sum : Tensor
        Integer sum of the :func:`mask_levels` outputs (and any :func:`mask_correction`).
    modulus_bits : int
        The ``w`` the residues were masked with, 2..62 and below the dtype's width.
    """
    width = dtype_bits(masked_sum.dtype)
    if isinstance(modulus_bits, bool) or not isinstance(modulus_bits, int):
        raise TypeError(f"modulus_bits={modulus_bits!r} must be an integer")
    if not 2 <= modulus_bits <= min(width - 1, 62):
        raise ValueError(f"modulus_bits={modulus_bits} must be in 2..{min(width - 1, 62)} "
                         f"for a {masked_sum.dtype} sum")
    half, low_bits = 1 << (modulus_bits - 1), (1 << modulus_bits) - 1
    wide = torch.bitwise_and(masked_sum.to(torch.int64), low_bits)  # in [0, 2^w)
    return wide.add_(half).bitwise_and_(low_bits).sub_(half).to(masked_sum.dtype)


def mask_correction(
    dropped: set[int] | frozenset[int],
    participant: int,
    group_size: int,
    seeds: PairwiseSeeds,
    modulus_bits: int | None = None,
    *,
    numel: int,
    step: int,
    layer: int,
    group: int = 0,
    dtype: torch.dtype = torch.int32,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Return what survivor ``participant`` adds to the sum to cancel its masks with ``dropped``.

    Survivor ``i`` masked against every ``j``; the pairs among survivors cancel, the pairs with
    dropped ``j`` do not. Its correction is
    ``-(sum_{j in D, j > i} p_ij - sum_{j in D, j < i} p_ij) mod 2^w``, so
    ``sum_{i survived} (y_i + correction_i) = sum_{i survived} l_i (mod 2^w)``.

    Sum the ``2 k'`` residues of ``k'`` survivors in a container that holds them (e.g. int64).
    The leader must discard any late message of a dropped participant (see the module docstring).

    Parameters
    ----------
    dropped : set of int
        Ids that did not contribute (must not contain ``participant``).
    participant, group_size, seeds, modulus_bits, step, layer, group
        As given to :func:`mask_levels` for the release.
    numel : int
        Number of elements of the levels.
    dtype : torch.dtype
        Integer dtype of the levels.
    device : torch.device or str
        Device of the result.

    Returns
    -------
    Tensor
        1-D correction, a residue in ``[0, 2^w)``, of ``dtype``.
    """
    _check_group(participant, group_size)
    dropped = set(dropped)
    if participant in dropped:
        raise ValueError(f"participant {participant} is in dropped={sorted(dropped)}; survivors only")
    if any(not 0 <= j < group_size for j in dropped):
        raise ValueError(f"dropped={sorted(dropped)} holds ids outside 0..{group_size - 1}")
    w = _check_modulus(modulus_bits, dtype, group_size)
    keys = _pair_keys(participant, sorted(dropped), seeds, step, layer, group)
    out = torch.zeros(numel, dtype=dtype, device=device)
    _apply_masks(out, out, participant, keys, w, negate=True)
    return out
