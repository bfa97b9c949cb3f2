"""Pair keys between clients of a population, agreed with Diffie-Hellman, for secure aggregation.

Every client has a key pair (:func:`hflmpi.core.secure.dh_keypair`, private exponent from the OS
CSPRNG); the public keys are published once at set-up. The rank that holds a client holds its
private key, so it can derive the key of every pair that client is in, and of no other pair:
``master(a, b)`` (:func:`hflmpi.core.secure.dh_master_key`, computed on first use, then cached)
and the key of one release (:func:`hflmpi.core.secure.release_key`): the derivation of
:class:`hflmpi.core.secure.DiffieHellmanSeeds`, with client ids instead of ranks.

:meth:`ClientKeys.among` gives the :class:`hflmpi.core.secure.PairwiseSeeds` of the participants
of one node in one round (participant ``i`` is client ``ids[i]``), so the masks of
:func:`hflmpi.core.secure.mask_levels` are drawn only among the clients that take part and cancel
in their sum. Pure: no MPI.
"""

from __future__ import annotations

from typing import Mapping, Sequence

from hflmpi.core.pair_keys import (
    MODP_2048_G,
    MODP_2048_P,
    dh_keypair,
    dh_master_key,
    release_key,
)

__all__ = ["ClientKeys", "PUBLIC_KEY_BYTES", "new_private_keys"]

PUBLIC_KEY_BYTES = (MODP_2048_P.bit_length() + 7) // 8


def new_private_keys(clients: Sequence[int]) -> dict[int, tuple[int, int]]:
    """Return a fresh ``(private, public)`` key pair for each of ``clients``."""
    return {client: dh_keypair() for client in clients}


class ClientKeys:
    """The pair keys this rank can derive: those of pairs with one of its own clients.

    Parameters
    ----------
    private : mapping of int to int
        Private exponent of each client this rank holds.
    public : sequence of int
        Public key of every client of the population, indexed by client id.
    session : bytes
        Mixed into every master key (e.g. the run id).
    """

    def __init__(self, private: Mapping[int, int], public: Sequence[int], *,
                 session: bytes = b"") -> None:
        self._private = dict(private)
        self._public = list(public)
        self._session = bytes(session)
        self._masters: dict[tuple[int, int], bytes] = {}
        for client, exponent in self._private.items():
            if pow(MODP_2048_G, exponent, MODP_2048_P) != self._public[client]:
                raise ValueError(f"the published key of client {client} is not its own")

    def among(self, ids: Sequence[int]) -> _Participants:
        """Return the pair keys of the participants ``ids`` (participant ``i`` is ``ids[i]``)."""
        return _Participants(self, list(ids))

    def key(self, a: int, b: int, *, step: int, layer: int, group: int) -> bytes:
        """Return the 32-byte key of clients ``{a, b}`` for one release (one must be ours)."""
        low, high = min(a, b), max(a, b)
        if low == high:
            raise ValueError(f"a pair needs two different clients, got {a} twice")
        master = self._masters.get((low, high))
        if master is None:
            mine, peer = (low, high) if low in self._private else (high, low)
            if mine not in self._private:
                raise PermissionError(f"this rank holds neither client {a} nor {b}: no key")
            master = dh_master_key(self._private[mine], self._public[peer],
                                   session=self._session, peer=f"client {peer}")
            self._masters[(low, high)] = master
        return release_key(master, low, high, step=step, layer=layer, group=group)


class _Participants:
    """:class:`hflmpi.core.secure.PairwiseSeeds` over the participants of one node."""

    def __init__(self, keys: ClientKeys, ids: list[int]) -> None:
        self._keys = keys
        self._ids = ids

    def pair_key(self, i: int, j: int, *, step: int, layer: int, group: int) -> bytes:
        """Return the key of participants ``i`` and ``j`` (clients ``ids[i]``, ``ids[j]``)."""
        return self._keys.key(self._ids[i], self._ids[j], step=step, layer=layer, group=group)
