"""The ``[clock]`` section: device profiles, a simulated clock and per-layer aggregation modes.

See :mod:`hflmpi.core.clock` for the clock and :mod:`hflmpi.core.devices` for the profiles;
docs/async.md for the user's view.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

from hflmpi.config.checks import (
    ConfigError,
    _Check,
    _choice_list,
    _float,
    _fmt,
    _int_list,
    _Invalid,
    _opt,
    _Section,
    _str,
    _type_name,
)
from hflmpi.core.clock import LATE, MODES

__all__ = ["ClockConfig"]


def _float_list(lo: float, *, lo_open: bool) -> _Check:
    """Check a list of finite numbers, one per layer."""
    one = _float(lo, lo_open=lo_open)

    def check(value: Any) -> tuple[float, ...]:
        if not isinstance(value, (list, tuple)):
            raise _Invalid(f"is {_type_name(value)} but must be a list of numbers, one per layer")
        out = []
        for i, item in enumerate(value):
            try:
                out.append(one(item))
            except _Invalid as exc:
                raise _Invalid(f"has entry [{i}] = {_fmt(item)}, which {exc.constraint}") from None
        return tuple(out)

    return check


@dataclass(frozen=True)
class ClockConfig(_Section):
    """The ``[clock]`` section: simulated device speeds and links, and how each layer closes.

    A population (``clients.count > 0``) always runs a simulated clock and records the simulated
    time of every round (docs/async.md). Every client has a profile: simulated seconds per local
    step, uplink bytes per second and latency, drawn from the run seed or read from ``profile``.

    Attributes
    ----------
    mode : list of str
        Per layer, ``"sync"`` (wait for every participant, the default), ``"deadline"``
        (close at ``deadline`` seconds after the node's model was ready; late updates are
        dropped) or ``"buffered"`` (FedBuff: apply every ``buffer`` arrivals with a staleness
        discount; layer 1 only, under a layer above). Empty (default): sync everywhere.
    deadline : list of float
        Per layer, the deadline in simulated seconds (used where ``mode`` is ``"deadline"``,
        where it must be > 0; give 0 for sync layers).
    late : list of str
        Per layer, what a ``"deadline"`` layer does with an update that misses the close:
        ``"drop"`` it (the default) or ``"carry"`` it into the node's first aggregation that
        closes after it arrives, discounted by ``(1 + s) ** -staleness_exponent`` (layer 1
        under a layer above only). Empty (default): drop everywhere.
    buffer : list of int
        Per layer, ``K``: the updates a ``"buffered"`` node applies at once (>= 1 and at most
        the smallest group of the layer; give 0 for other layers).
    staleness_exponent : list of float
        Per layer, ``a >= 0`` of the staleness discount ``(1 + s) ** -a`` of a buffered layer
        or of carried late updates (empty: 0.5 everywhere, FedBuff's ``1 / sqrt(1 + s)``).
    server_lr : float
        Step size of a buffered node's update (FedBuff's server learning rate). Default 1.
    step_seconds : float
        Base simulated seconds per local SGD step. Default 0.01.
    uplink : float
        Base client uplink in bytes per second. Default 1.25e6 (10 Mbit/s).
    latency : float
        Client link latency in seconds. Default 0.05.
    slow_fraction : float
        Fraction of the clients that are ``slow_factor`` times slower in compute and link.
    slow_factor : float
        How much slower the slow clients are (>= 1). Default 10.
    profile : str
        A profile file (CSV or HDF5; docs/async.md) giving every client's step_seconds, uplink
        and latency, instead of the drawn ones (then ``step_seconds``, ``uplink``, ``latency``,
        ``slow_fraction`` and ``clients.speed_spread`` are not used).
    node_uplink : list of float
        Per layer 1..N-1, bytes per second of an aggregator's link to its parent; one value for
        every layer if a single entry is given. Default 1.25e8 (1 Gbit/s).
    node_latency : list of float
        Per layer 1..N-1, that link's latency in seconds (one entry: every layer). Default 0.01.
    """

    section: ClassVar[str] = "clock"
    mode: tuple[str, ...] = _opt((), _choice_list(*MODES), '["deadline", "sync"]')
    deadline: tuple[float, ...] = _opt((), _float_list(0.0, lo_open=False), "[2.0, 0]")
    late: tuple[str, ...] = _opt((), _choice_list(*LATE), '["carry", "drop"]')
    buffer: tuple[int, ...] = _opt((), _int_list(0, allow_empty=True), "[4, 0]")
    staleness_exponent: tuple[float, ...] = _opt((), _float_list(0.0, lo_open=False), "[0.5, 0]")
    server_lr: float = _opt(1.0, _float(0.0, lo_open=True), "1.0")
    step_seconds: float = _opt(0.01, _float(0.0, lo_open=True), "0.01")
    uplink: float = _opt(1.25e6, _float(0.0, lo_open=True), "1.25e6")
    latency: float = _opt(0.05, _float(0.0), "0.05")
    slow_fraction: float = _opt(0.0, _float(0.0, 1.0), "0.15")
    slow_factor: float = _opt(10.0, _float(1.0), "10")
    profile: str = _opt("", _str, '"devices.csv"')
    node_uplink: tuple[float, ...] = _opt((1.25e8,), _float_list(0.0, lo_open=True), "[1.25e8]")
    node_latency: tuple[float, ...] = _opt((0.01,), _float_list(0.0, lo_open=False), "[0.01]")

    def _cross_check(self) -> None:
        if self.profile and self.slow_fraction:
            raise self._error("slow_fraction", "draws slow clients, but clock.profile gives every "
                              "client's profile", "keep one of them")
        for name in ("node_uplink", "node_latency"):
            if not getattr(self, name):
                raise self._error(name, "is empty", f"give one value, e.g. clock.{name}="
                                  f"{self.__dataclass_fields__[name].metadata['example']}")

    @property
    def asynchronous(self) -> bool:
        """Whether any layer closes otherwise than synchronously."""
        return any(mode != "sync" for mode in self.mode)

    def modes_for(self, depth: int) -> list[str]:
        """Return one mode per layer of a ``depth``-layer tree (empty ``mode``: all sync)."""
        return list(self.mode) if self.mode else ["sync"] * depth

    def deadlines_for(self, depth: int) -> list[float]:
        """Return one deadline per layer (``inf`` where the layer is sync)."""
        modes = self.modes_for(depth)
        given = list(self.deadline) or [0.0] * depth
        return [d if m == "deadline" else math.inf for m, d in zip(modes, given)]

    def links_for(self, depth: int) -> tuple[list[float], list[float]]:
        """Return ``(node_uplink, node_latency)`` with one entry per layer 1..depth-1."""
        return self._one_per("node_uplink", depth), self._one_per("node_latency", depth)

    def _one_per(self, name: str, depth: int) -> list[float]:
        values = list(getattr(self, name))
        return values * (depth - 1) if len(values) == 1 else values

    def late_for(self, depth: int) -> list[str]:
        """Return one late-update policy per layer (empty ``late``: drop everywhere)."""
        return list(self.late) if self.late else ["drop"] * depth

    def exponents_for(self, depth: int) -> list[float]:
        """Return one staleness exponent per layer (empty: 0.5 everywhere)."""
        return list(self.staleness_exponent) or [0.5] * depth

    def check_layers(self, depth: int, group_sizes: Any = None) -> None:
        """Check the per-layer lists against a ``depth``-layer tree (and its fan-ins)."""
        for name in ("mode", "deadline", "late", "buffer", "staleness_exponent"):
            values = getattr(self, name)
            if values and len(values) != depth:
                raise ConfigError(f"clock.{name}={_fmt(values)} has {len(values)} entries but "
                                  f"the tree has {depth} layers; give one per layer")
        for name in ("node_uplink", "node_latency"):
            values = getattr(self, name)
            if len(values) != 1 and len(values) != depth - 1:
                raise ConfigError(f"clock.{name}={_fmt(values)} has {len(values)} entries; give "
                                  f"one per layer below the root ({depth - 1}) or a single one")
        modes, given = self.modes_for(depth), list(self.deadline) or [0.0] * depth
        for n, (mode, seconds) in enumerate(zip(modes, given), start=1):
            if mode == "deadline" and seconds <= 0:
                example = [2.0 if m == "deadline" else 0 for m in modes]
                raise ConfigError(f"clock.deadline={_fmt(self.deadline)} gives layer {n} no "
                                  "deadline (> 0 simulated seconds), but clock.mode makes it "
                                  f"\"deadline\"; e.g. clock.deadline={_fmt(example)}")
        _check_buffered(self.modes_for(depth), self.buffer, group_sizes)
        _check_carry(self.modes_for(depth), self.late_for(depth))


def _check_carry(modes: list[str], late: list[str]) -> None:
    """Refuse ``"carry"`` on a layer that is not a deadline layer 1 under a layer above."""
    for n, (mode, policy) in enumerate(zip(modes, late), start=1):
        if policy != "carry":
            continue
        example = '["carry"' + ', "drop"' * max(len(modes) - 1, 1) + "]"
        if mode != "deadline":
            raise ConfigError(
                f"clock.late={_fmt(late)} carries the late updates of layer {n}, but clock.mode "
                f"makes layer {n} {mode!r}: only a \"deadline\" layer has late updates; set "
                f"clock.mode[{n - 1}]=\"deadline\" or clock.late[{n - 1}]=\"drop\"")
        if n != 1 or len(modes) < 2:
            raise ConfigError(
                f"clock.late={_fmt(late)} carries the late updates of layer {n}, but only layer "
                "1 under a layer above can carry them (a late node's update, or one held over a "
                "round end, is not built); e.g. clock.late=" + example + " with "
                "topology.fanouts=[clients per node, nodes]")


def _check_buffered(modes: list[str], buffer: tuple[int, ...], group_sizes: Any) -> None:
    """Refuse a buffered layer other than layer 1 under a layer above, or a bad ``K``."""
    for n, mode in enumerate(modes, start=1):
        if mode != "buffered":
            continue
        if n != 1 or len(modes) < 2:
            raise ConfigError(
                f"clock.mode={_fmt(modes)} makes layer {n} \"buffered\", but only layer 1 "
                "under a layer above can be buffered (the flushes of a layer-1 node make one "
                "period of the layer above); e.g. clock.mode=[\"buffered\", \"sync\"] with "
                "topology.fanouts=[clients per node, nodes] (one node: [count, 1])")
        k = buffer[0] if buffer else 0
        if k < 1:
            raise ConfigError(f"clock.buffer={_fmt(buffer)} gives the buffered layer 1 no buffer "
                              "size K >= 1; e.g. clock.buffer=[4" + ", 0" * (len(modes) - 1) + "]")
        if group_sizes is not None:
            sizes = list(group_sizes[0])
            if k > min(sizes):
                raise ConfigError(
                    f"clock.buffer[0]={k} is larger than layer-1 group {sizes.index(min(sizes))}, "
                    f"which has {min(sizes)} clients: that node could never fill its buffer; give "
                    f"clock.buffer[0] <= {min(sizes)}")
