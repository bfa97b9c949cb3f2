"""Pair keys for secure aggregation: who shares which 32-byte key for one release.

A :class:`PairwiseSeeds` gives the key of pair ``{i, j}`` for one release ``(step, layer,
group)``; :class:`SharedSecretSeeds` derives every pair's key from one run secret,
:class:`DiffieHellmanSeeds` agrees one per pair with Diffie-Hellman in the RFC 3526 2048-bit MODP
group (:func:`dh_master_key`) and derives each release's key with keyed BLAKE2b
(:func:`release_key`). :mod:`hflmpi.core.secure` turns keys into masks; see its docstring for the
protocol and :mod:`hflmpi.core.client_keys` for the keys between clients of a population.
"""

from __future__ import annotations

import hashlib
import secrets
import struct
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

__all__ = [
    "PairwiseSeeds",
    "SharedSecretSeeds",
    "DiffieHellmanSeeds",
    "dh_keypair",
    "dh_master_key",
    "release_key",
    "MODP_2048_P",
    "MODP_2048_G",
]

_PERSON = b"hflmpi-secagg"  # BLAKE2b personalization (at most 16 bytes)
_CONTEXT = struct.Struct("<QQQQQ")  # step, layer, group, low id, high id

# RFC 3526, Sec. 3: the 2048-bit MODP group (group 14), p = 2^2048 - 2^1984 - 1 + 2^64 *
# ([2^1918 pi] + 124476), a safe prime; g = 2 generates the subgroup of prime order (p - 1) / 2.
MODP_2048_P = int(
    "FFFFFFFFFFFFFFFFC90FDAA22168C234C4C6628B80DC1CD129024E088A67CC74"
    "020BBEA63B139B22514A08798E3404DDEF9519B3CD3A431B302B0A6DF25F1437"
    "4FE1356D6D51C245E485B576625E7EC6F44C42E9A637ED6B0BFF5CB6F406B7ED"
    "EE386BFB5A899FA5AE9F24117C4B1FE649286651ECE45B3DC2007CB8A163BF05"
    "98DA48361C55D39A69163FA8FD24CF5F83655D23DCA3AD961C62F356208552BB"
    "9ED529077096966D670C354E4ABC9804F1746C08CA18217C32905E462E36CE3B"
    "E39E772C180E86039B2783A2EC07A28FB5C55DF06F4C52C9DE2BCBF695581718"
    "3995497CEA956AE515D2261898FA051015728E5A8AACAA68FFFFFFFFFFFFFFFF",
    16,
)
MODP_2048_G = 2
_MODP_Q = (MODP_2048_P - 1) // 2

# --------------------------------------------------------------------------------------------
# Pair keys
# --------------------------------------------------------------------------------------------


@runtime_checkable
class PairwiseSeeds(Protocol):
    """Source of the secret key of a participant pair for one release.

    Implementations must be symmetric (``pair_key(i, j, ...) == pair_key(j, i, ...)``), give
    different keys for different contexts, and be unpredictable to anyone but ``i`` and ``j``
    (that last property is what the threat model rests on).
    """

    def pair_key(self, i: int, j: int, *, step: int, layer: int, group: int) -> bytes:
        """Return the 32-byte key of pair ``{i, j}`` (``i != j``) for ``(step, layer, group)``."""
        ...


def _context(i: int, j: int, step: int, layer: int, group: int) -> bytes:
    for name, value in (("i", i), ("j", j), ("step", step), ("layer", layer), ("group", group)):
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**64:
            raise ValueError(f"pair key {name}={value!r} must be an integer in [0, 2**64)")
    if i == j:
        raise ValueError(f"a pair needs two different participants, got i = j = {i}")
    return _CONTEXT.pack(step, layer, group, min(i, j), max(i, j))


class SharedSecretSeeds:
    """Pair keys derived from one run secret: ``BLAKE2b(key=secret, data=context)``.

    Everyone holding ``secret`` can derive every pair's key and therefore unmask every
    participant. Use it only where the secret is kept from the party the levels must be hidden
    from (see ``docs/security.md``); :class:`DiffieHellmanSeeds` needs no such trust.

    Parameters
    ----------
    secret : bytes
        16 to 64 bytes of secret randomness (e.g. ``secrets.token_bytes(32)``), identical on all
        participants. Never derive it from the run seed, which is stored in the run file.
    """

    def __init__(self, secret: bytes) -> None:
        if not isinstance(secret, (bytes, bytearray)) or not 16 <= len(secret) <= 64:
            got = len(secret) if isinstance(secret, (bytes, bytearray)) else type(secret).__name__
            raise ValueError(
                "the secure-aggregation secret must be 16..64 bytes "
                f"(e.g. secrets.token_bytes(32)), got {got}"
            )
        self._secret = bytes(secret)

    def pair_key(self, i: int, j: int, *, step: int, layer: int, group: int) -> bytes:
        """Return ``BLAKE2b-256(key=secret, person="hflmpi-secagg", data=context)``."""
        data = _context(i, j, step, layer, group)
        return hashlib.blake2b(data, digest_size=32, key=self._secret, person=_PERSON).digest()

    def __repr__(self) -> str:
        return "SharedSecretSeeds(<secret>)"


def dh_keypair() -> tuple[int, int]:
    """Return a fresh Diffie-Hellman ``(private, public)`` pair in the RFC 3526 2048-bit group.

    The private exponent is 256 bits from :mod:`secrets` (the OS CSPRNG); the public key is
    ``g^private mod p``. Publish the public key to the group (one allgather at set-up).
    """
    private = secrets.randbits(256) | (1 << 255)
    return private, pow(MODP_2048_G, private, MODP_2048_P)


def dh_master_key(private: int, public: int, *, session: bytes = b"", peer: str = "the peer") -> bytes:
    """Return the master key ``BLAKE2b(g^(x y) mod p || session)`` shared with ``public``'s owner.

    Raises ValueError naming ``peer`` if ``public`` is not in the prime-order subgroup.
    """
    if not 1 < public < MODP_2048_P - 1 or pow(public, _MODP_Q, MODP_2048_P) != 1:
        raise ValueError(f"public key of {peer} is not a valid group element")
    shared = pow(public, private, MODP_2048_P).to_bytes(256, "big")
    return hashlib.blake2b(shared + bytes(session), digest_size=32, person=b"hflmpi-dh").digest()


def release_key(master: bytes, i: int, j: int, *, step: int, layer: int, group: int) -> bytes:
    """Return the key of pair ``{i, j}`` for one release: ``BLAKE2b(key=master, data=context)``."""
    return hashlib.blake2b(_context(i, j, step, layer, group), digest_size=32, key=master,
                           person=_PERSON).digest()


class DiffieHellmanSeeds:
    """Pair keys agreed with Diffie-Hellman: each participant knows only its own ``k - 1`` pairs.

    Participant ``me`` computes ``s_{me,j} = public_j^private mod p`` for every peer ``j``, hashes
    it with BLAKE2b into a pair master key, and derives the key of each release as
    ``BLAKE2b(key=master, person="hflmpi-secagg", data=context)``. Secure against an
    honest-but-curious leader and eavesdroppers; not against a leader that substitutes public keys
    (an active attacker), which needs authenticated keys (signatures or a PKI).

    Parameters
    ----------
    me : int
        This participant's id (its rank in the group).
    private : int
        Its private exponent from :func:`dh_keypair`.
    public_keys : sequence of int
        Every participant's public key, indexed by id (``public_keys[me]`` is its own).
    session : bytes
        Optional label mixed into every master key (e.g. the run id).

    Raises
    ------
    ValueError
        If a peer's public key is not in the prime-order subgroup (``1 < y < p - 1`` and
        ``y^q = 1``), which also rejects the degenerate keys 0, 1 and ``p - 1``.
    """

    def __init__(
        self, me: int, private: int, public_keys: Sequence[int], *, session: bytes = b""
    ) -> None:
        k = len(public_keys)
        if not 0 <= me < k:
            raise ValueError(f"participant id me={me} is outside 0..{k - 1}")
        if pow(MODP_2048_G, private, MODP_2048_P) != public_keys[me]:
            raise ValueError(f"public_keys[{me}] is not this participant's public key")
        self.me = me
        self.group_size = k
        self._masters: dict[int, bytes] = {}
        for j, public in enumerate(public_keys):
            if j == me:
                continue
            self._masters[j] = dh_master_key(private, public, session=session,
                                             peer=f"participant {j}")

    def pair_key(self, i: int, j: int, *, step: int, layer: int, group: int) -> bytes:
        """Return the key of pair ``{i, j}``; one of them must be this participant."""
        _context(i, j, step, layer, group)  # checks the ids before anything else
        if self.me not in (i, j):
            raise PermissionError(
                f"participant {self.me} holds no key for the pair ({i}, {j}); only its own pairs"
            )
        peer = j if i == self.me else i
        if peer not in self._masters:
            raise ValueError(f"participant {peer} is outside the group of {self.group_size}")
        return release_key(self._masters[peer], i, j, step=step, layer=layer, group=group)

    def __repr__(self) -> str:
        return f"DiffieHellmanSeeds(me={self.me}, group_size={self.group_size})"
