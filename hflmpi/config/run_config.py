"""The composed run config: :class:`RunConfig`, one attribute per TOML section.

Layers follow the QMLHFL paper (arXiv 2505.08145): devices are layer 0, aggregators layers
1..N-1, the root layer N; ``schedule.tau[n-1]`` and ``quantize.bits[n-1]`` belong to layer n.
The tau and quantizer lengths are checked here whenever the tree depth is known from the config
alone; the per-layer robust/secure/privacy rules in :meth:`RunConfig.check_layer_options`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from hflmpi.config.checks import ConfigError, _fmt
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
        """Check the per-layer robust/secure/privacy options against a tree of ``depth`` layers.

        Parameters
        ----------
        depth : int
            Number of aggregation layers.
        group_sizes : sequence of sequences of int, optional
            Per layer, the number of participants of each of its groups (the fan-ins, known
            once the tree is planned); enables the checks that depend on them.
        """
        agg, bits = self.aggregation, self.quantize.bits_for(depth)
        for name, values in (("robust", agg.robust), ("secure", agg.secure)):
            if values and len(values) != depth:
                raise ConfigError(
                    f"aggregation.{name}={_fmt(values)} has {len(values)} entries but the tree has "
                    f"{depth} layers; give one per layer (or leave it out)"
                )
        for n in range(depth):
            rule = agg.robust[n] if agg.robust else "mean"
            masked = agg.secure[n] if agg.secure else False
            if rule != "mean" and bits[n] > 0:
                raise ConfigError(
                    f"aggregation.robust[{n}]={rule!r} with quantize.bits[{n}]={bits[n]}: robust "
                    f"rules need full-precision updates; set quantize.bits[{n}] = 0"
                )
            if masked and bits[n] == 0:
                raise ConfigError(
                    f"aggregation.secure[{n}]=true with quantize.bits[{n}]=0: secure aggregation "
                    f"masks quantized integer levels; set quantize.bits[{n}] to 1..16"
                )
            if masked and rule != "mean":
                raise ConfigError(f"aggregation.secure[{n}] and robust[{n}]={rule!r} exclude "
                                  "each other: masking hides the updates the rule needs")
            if masked and self.quantize.method == "gather":
                raise ConfigError('aggregation.secure needs quantize.method = "auto" or "sum"')
        if self.privacy.layer > depth:
            raise ConfigError(f"privacy.layer={self.privacy.layer} but the tree has {depth} layers; "
                              f"use 1..{depth} (or 0 to turn privacy off)")
        self._check_side_channels()
        if self.privacy.layer and agg.robust and agg.robust[self.privacy.layer - 1] != "mean":
            n = self.privacy.layer - 1
            raise ConfigError(
                f"aggregation.robust[{n}]={_fmt(agg.robust[n])} at privacy.layer="
                f"{self.privacy.layer}: the noise is calibrated to the weighted mean's "
                "sensitivity (clip * max a_c), which a robust rule does not have, so the stated "
                "epsilon would be false; put the robust rule on another layer"
            )
        if group_sizes is not None:
            for n, sizes in enumerate(group_sizes[:depth]):
                self._check_groups(n, sorted(set(int(k) for k in sizes)))

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

    def _check_groups(self, n: int, sizes: list[int]) -> None:
        """Check layer ``n + 1``'s robust rule and secure masking against its group sizes."""
        agg = self.aggregation
        rule = agg.robust[n] if agg.robust else "mean"
        masked = agg.secure[n] if agg.secure else False
        for k in sizes:
            if k < 2:
                continue  # a group of one: the leader alone, nothing to defend or hide
            if masked and k == 2 and not agg.allow_small_secure_groups:
                raise ConfigError(
                    f"aggregation.secure[{n}]=true with a layer-{n + 1} group of 2 participants: "
                    "its leader subtracts its own levels from the sum and learns its partner's "
                    "exactly; use groups of at least 3 (topology), or set "
                    "aggregation.allow_small_secure_groups=true to accept that"
                )
            if rule == "trimmed_mean" and math.floor(agg.trim * k) < 1:
                fix = (f"set aggregation.trim >= 1/{k} (e.g. aggregation.trim="
                       f"{math.ceil(1000 / k) / 1000})" if k >= 3 else
                       "use groups of at least 3 children (topology)")
                raise ConfigError(
                    f"aggregation.trim={_fmt(agg.trim)} trims floor({_fmt(agg.trim)} * {k}) = "
                    f"{math.floor(agg.trim * k)} of the {k} children of a layer-{n + 1} group, so "
                    f"aggregation.robust[{n}]=\"trimmed_mean\" would tolerate no Byzantine child "
                    f"and silently average them all; {fix}"
                )
            if rule == "median" and k == 2:
                raise ConfigError(
                    f"aggregation.robust[{n}]=\"median\" with a layer-{n + 1} group of 2 "
                    "children tolerates no Byzantine child (the median of two is their mean); "
                    "use groups of at least 3 children (topology) or \"mean\" there"
                )
            if rule == "krum" and (agg.krum_f < 1 or k <= 2 * agg.krum_f + 2):
                raise ConfigError(
                    f"aggregation.krum_f={agg.krum_f} with a layer-{n + 1} group of {k} children: "
                    f"krum needs f >= 1 Byzantine children tolerated and more than 2f + 2 = "
                    f"{2 * agg.krum_f + 2} children; set aggregation.krum_f=1 with groups of at "
                    "least 5 children, or use \"median\" there"
                )

    @property
    def depth(self) -> int | None:
        """Return the tree depth if the config alone determines it (see TopologyConfig.depth)."""
        return self.topology.depth

    @property
    def steps_per_round(self) -> int:
        """Return the local SGD steps per device in one global round, ``prod(tau)``."""
        return self.schedule.steps_per_round

