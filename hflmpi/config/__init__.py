"""Run configuration: one frozen dataclass per component, composed into :class:`RunConfig`.

A run is described by a TOML file (read with the stdlib :mod:`tomllib`) plus command-line
overrides ``--set section.key=value``. Unknown sections or keys, wrong types and out-of-range values
raise :class:`ConfigError`, whose message names the key, the value, the constraint and a fix, e.g.::

    schedule.tau=[5] has 1 entry but the tree has 2 layers (topology.fanouts=[4, 2]); give one tau
    per layer, e.g. tau=[5, 2]

Checks that need the world size (tree versus rank count) live in :mod:`hflmpi.core.topology`; the tau
and quantizer lengths are checked here whenever the tree depth is known from the config alone.

Layers follow the QMLHFL paper (arXiv 2505.08145): devices are layer 0, aggregators layers
1..N-1, the root layer N; ``schedule.tau[n-1]`` and ``quantize.bits[n-1]`` belong to layer n.

The package's modules: :mod:`~hflmpi.config.checks` (field checks, value formatting,
:class:`ConfigError`), :mod:`~hflmpi.config.sections` (one frozen dataclass per section),
:mod:`~hflmpi.config.run_config` (:class:`RunConfig` and its cross-section rules) and
:mod:`~hflmpi.config.loading` (TOML, ``--set`` overrides, writing TOML back). Import from
:mod:`hflmpi.config` itself; the split is an implementation detail.
"""

from hflmpi.config.checks import (
    BUILTIN_MODELS,
    MAX_LR,
    MAX_ROUNDS,
    MAX_STEPS_PER_ROUND,
    ConfigError,
    format_value,
)
from hflmpi.config.clients import ClientsConfig
from hflmpi.config.clock import ClockConfig
from hflmpi.config.loading import (
    apply_overrides,
    config_from_dict,
    config_to_dict,
    load_config,
    parse_override,
    to_toml_string,
)
from hflmpi.config.run_config import RunConfig
from hflmpi.config.sections import (
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

__all__ = [
    "ConfigError",
    "RunOptions",
    "TopologyConfig",
    "ScheduleConfig",
    "AggregationConfig",
    "QuantizeConfig",
    "DataConfig",
    "ModelConfig",
    "OptimConfig",
    "PrivacyConfig",
    "ServerOptConfig",
    "ClientsConfig",
    "ClockConfig",
    "RunConfig",
    "BUILTIN_MODELS",
    "MAX_LR",
    "MAX_ROUNDS",
    "MAX_STEPS_PER_ROUND",
    "load_config",
    "parse_override",
    "apply_overrides",
    "config_from_dict",
    "config_to_dict",
    "format_value",
    "to_toml_string",
]
