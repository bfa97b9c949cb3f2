"""The ``[clients]`` section: a population of clients placed on the ranks (docs/population.md)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from hflmpi.config.checks import _choice, _float, _int, _int_list, _opt, _optional, _Section, _str

__all__ = ["ClientsConfig"]


@dataclass(frozen=True)
class ClientsConfig(_Section):
    """The ``[clients]`` section: a population of clients placed on the ranks.

    Without it (``count = 0``) every rank is one client, as the tree's leaves. With ``count > 0``
    the tree (``topology.fanouts`` or ``groups``) is a tree of *clients*; they are placed on the
    ranks, trained there one after another (or batched) and selected into a cohort per round
    (:mod:`hflmpi.population`, docs/population.md).

    Attributes
    ----------
    count : int
        Number of clients; 0 (the default) means one per rank.
    placement : tuple of int or None
        The rank of each client (``count`` entries); ``None`` (the default): contiguous blocks,
        client ``c`` on rank ``c * ranks // count``.
    training : {"sequential", "batched"}
        One model with each client's parameters swapped in (any model), or the clients of a
        period trained as one vectorised computation (``torch.func.vmap``; models without
        cross-sample state or dropout).
    batch_clients : int
        ``batched``: most clients trained in one vectorised computation. Default 64.
    selection : {"all", "uniform", "weighted", "priority"}
        Who trains in a round (:mod:`hflmpi.core.selection`). Default ``"all"``.
    cohort : float
        Clients selected per round: a count (>= 1) or a fraction of the population (< 1).
    exploration : float
        ``priority``: fraction of the cohort drawn among clients not picked by utility.
    speed_weight : float
        ``priority``: exponent of the penalty for clients slower than the median.
    speed_spread : float
        Simulated client speeds: log-normal with this sigma (0: all equally fast), keyed by the
        run seed; they set the device profiles' step times (``[clock]``, docs/async.md) and the
        priority selection reads them.
    online : float
        Probability that a client is online in a round (1: always). Offline clients are not
        selected.
    trace : str
        An availability trace (CSV or HDF5, client x round; docs/population.md) instead of
        ``online``.
    """

    section: ClassVar[str] = "clients"
    count: int = _opt(0, _int(0, hi=10**8), "256")
    placement: tuple[int, ...] | None = _opt(None, _optional(_int_list(0)), "[0, 0, 1, 1]")
    training: str = _opt("sequential", _choice("sequential", "batched"), '"sequential"')
    batch_clients: int = _opt(64, _int(1, hi=1 << 16), "64")
    selection: str = _opt("all", _choice("all", "uniform", "weighted", "priority"), '"uniform"')
    cohort: float = _opt(1.0, _float(0.0, lo_open=True), "0.1")
    exploration: float = _opt(0.1, _float(0.0, 1.0), "0.1")
    speed_weight: float = _opt(0.0, _float(0.0), "0.5")
    speed_spread: float = _opt(0.0, _float(0.0, 10.0), "0.5")
    online: float = _opt(1.0, _float(0.0, 1.0, lo_open=True), "0.9")
    trace: str = _opt("", _str, '"availability.csv"')

    def _cross_check(self) -> None:
        if self.count == 0:
            for name in ("placement", "trace"):
                if getattr(self, name):
                    raise self._error(name, "needs a population (clients.count > 0)",
                                      "set clients.count or delete clients." + name)
            if self.selection != "all" or self.online != 1.0 or self.training != "sequential":
                raise self._error("count", "is 0 (one client per rank): selection, availability "
                                  "and batched training need a population",
                                  "set clients.count, e.g. clients.count=256")
            return
        if self.placement is not None and len(self.placement) != self.count:
            raise self._error("placement", f"has {len(self.placement)} entries but "
                              f"clients.count={self.count}", "give one rank per client")
        if self.cohort >= 1 and self.cohort != int(self.cohort):
            raise self._error("cohort", "is a count (>= 1) but not a whole number",
                              "e.g. clients.cohort=32, or a fraction below 1 like 0.1")
        if self.cohort >= 1 and self.cohort > self.count:
            raise self._error("cohort", f"exceeds the population of {self.count} clients",
                              f"at most {self.count}, or a fraction like 0.1")
        if self.trace and self.online != 1.0:
            raise self._error("trace", "and clients.online both say who is online",
                              "keep one of them")

    @property
    def population(self) -> bool:
        """Whether the run has a population (clients are not ranks)."""
        return self.count > 0
