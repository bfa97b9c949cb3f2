"""The composed run config: :class:`RunConfig`, one attribute per TOML section.

Layers follow the QMLHFL paper (arXiv 2505.08145): devices are layer 0, aggregators layers
1..N-1, the root layer N; ``schedule.tau[n-1]`` and ``quantize.bits[n-1]`` belong to layer n.
The tau and quantizer lengths are checked here whenever the tree depth is known from the config
alone; the per-layer robust/secure/privacy rules in :meth:`RunConfig.check_layer_options`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field

from hflmpi.config.checks import ConfigError, _fmt
from hflmpi.config.clients import ClientsConfig
from hflmpi.config.clock import ClockConfig
from hflmpi.config.sections import (
    _SECTIONS,
    AggregationConfig,
    DataConfig,
    ModelConfig,
    OptimConfig,
    PrivacyConfig,
    QuantizeConfig,
    RunOptions,
    ScheduleConfig,
    TopologyConfig,
)
from hflmpi.config.strategy import ServerOptConfig
from hflmpi.core.layer_rules import LayerOptionsError
from hflmpi.core.layer_rules import check_layer_options as check_layer_rules

__all__ = ["RunConfig"]


@dataclass(frozen=True)
class RunConfig:
    """The whole resolved configuration of a run, one attribute per TOML section."""

    run: RunOptions = field(default_factory=RunOptions)
    topology: TopologyConfig = field(default_factory=TopologyConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    aggregation: AggregationConfig = field(default_factory=AggregationConfig)
    quantize: QuantizeConfig = field(default_factory=QuantizeConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    server_opt: ServerOptConfig = field(default_factory=ServerOptConfig)
    clients: ClientsConfig = field(default_factory=ClientsConfig)
    clock: ClockConfig = field(default_factory=ClockConfig)

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            expected = _SECTIONS[f.name]
            if not isinstance(getattr(self, f.name), expected):
                raise ConfigError(f"RunConfig.{f.name} must be a {expected.__name__}")
        depth = self.topology.depth
        if depth is None:  # nodes without node_fanouts: the run checks once it knows the hosts
            return
        tau, bits = self.schedule.tau, self.quantize.bits
        if len(tau) != depth:
            example = list(tau[:depth]) + [2] * (depth - len(tau))
            raise ConfigError(
                f"schedule.tau={_fmt(tau)} has {len(tau)} entr{'y' if len(tau) == 1 else 'ies'} "
                f"but the tree has {depth} layer{'' if depth == 1 else 's'} "
                f"({self.topology.describe_depth()}); give one tau per layer, "
                f"e.g. tau={_fmt(example)}"
            )
        if bits and len(bits) != depth:
            example = list(bits[:depth]) + [0] * (depth - len(bits))
            raise ConfigError(
                f"quantize.bits={_fmt(bits)} has {len(bits)} "
                f"entr{'y' if len(bits) == 1 else 'ies'} "
                f"but the tree has {depth} layer{'' if depth == 1 else 's'} "
                f"({self.topology.describe_depth()}); give one width per layer (0 = exact), "
                f"e.g. bits={_fmt(example)}"
            )
        if not bits:
            object.__setattr__(self, "quantize",
                               dataclasses.replace(self.quantize, bits=(0,) * depth))
        self.check_layer_options(depth)

    def check_layer_options(
        self, depth: int, group_sizes: Sequence[Sequence[int]] | None = None
    ) -> None:
        """Check the per-layer robust/secure/privacy/server options against a ``depth``-layer tree.

        Parameters
        ----------
        depth : int
            Number of aggregation layers.
        group_sizes : sequence of sequences of int, optional
            Per layer, the number of participants of each of its groups (the fan-ins, known
            once the tree is planned); enables the checks that depend on them.
        """
        agg = self.aggregation
        try:
            check_layer_rules(depth, self.quantize.bits_for(depth), agg.robust, agg.secure,
                              method=self.quantize.method, privacy_layer=self.privacy.layer,
                              group_sizes=group_sizes, trim=agg.trim, krum_f=agg.krum_f,
                              allow_small_secure_groups=agg.allow_small_secure_groups)
        except LayerOptionsError as exc:
            raise ConfigError(str(exc)) from None
        self.server_opt.options_for(depth)  # per-layer lengths
        self._check_side_channels()
        self._check_server_state()
        self._check_population()
        self.clock.check_layers(depth, group_sizes)

    def _check_population(self) -> None:
        """Refuse the clock's device simulation without a population."""
        if not self.clients.population and (self.clock.asynchronous or self.clock.profile):
            raise ConfigError(
                f"clock.mode={_fmt(self.clock.mode)} / clock.profile simulate the devices "
                "of a population, but clients.count=0 (one client per rank); set "
                "clients.count (e.g. 64) or remove them")

    def _check_server_state(self) -> None:
        """Refuse server optimizer state below a protected layer (checkpoints gather it)."""
        protected = [(n + 1, f"aggregation.secure[{n}]=true")
                     for n, on in enumerate(self.aggregation.secure) if on]
        if self.privacy.layer:
            protected.append((self.privacy.layer, f"privacy.layer={self.privacy.layer}"))
        for n, name in enumerate(self.server_opt.optimizer):
            above = [(p, what) for p, what in protected if p > n + 1]
            if name != "none" and above:
                p, what = max(above)
                raise ConfigError(
                    f"server_opt.optimizer[{n}]={_fmt(name)} at layer {n + 1}, below {what} "
                    f"(layer {p}): every checkpoint gathers its state (running averages of each "
                    "group's un-protected aggregate) to rank 0, which the protected layer is "
                    f"meant to hide; put the server optimizer on layer {p} or above"
                )

    def _check_side_channels(self) -> None:
        """Refuse the metrics and checkpoints that carry individual models past a protected layer."""
        agg = self.aggregation
        protected = []
        if any(agg.secure):
            protected.append(f"aggregation.secure[{list(agg.secure).index(True)}]=true")
        if self.privacy.layer:
            protected.append(f"privacy.layer={self.privacy.layer}")
        if not protected:
            return
        what = " and ".join(protected)
        if self.run.divergence:
            raise ConfigError(
                f"run.divergence=true with {what}: measuring the divergences allreduces every "
                "device's raw model (and gives every rank the un-noised average), which the "
                "protected layer is meant to hide; set run.divergence=false"
            )
        if self.optim.momentum > 0 and self.optim.momentum_reset == "never":
            raise ConfigError(
                f"optim.momentum_reset=\"never\" with {what}: every checkpoint gathers each "
                "device's momentum buffer (a running sum of its own gradients) to rank 0, which "
                "the protected layer is meant to hide; use optim.momentum_reset=\"aggregation\" "
                "or optim.momentum=0"
            )

    @property
    def depth(self) -> int | None:
        """Return the tree depth if the config alone determines it (see TopologyConfig.depth)."""
        return self.topology.depth

    @property
    def steps_per_round(self) -> int:
        """Return the local SGD steps per device in one global round, ``prod(tau)``."""
        return self.schedule.steps_per_round

