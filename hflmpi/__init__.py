"""hflmpi: multi-layer hierarchical federated learning on MPI clusters.

Implements QMLHFL (quantized multi-layer hierarchical federated learning, arXiv 2505.08145) and its
special cases FedAvg (one layer) and hierarchical SGD (two layers; Wang et al., AAAI 2022). The
aggregation tree of any depth maps onto communicators made with ``Comm.Split``.

The front door (docs/api.md)::

    import hflmpi
    result = hflmpi.train("jobs/default.toml", run={"rounds": 5})  # collective; COMM_WORLD by default
    result.model, result.metrics["test_accuracy"]                  # an nn.Module, per-round arrays

The package reads top down: :mod:`hflmpi.core` (pure math), :mod:`hflmpi.mpi` (the wiring),
:mod:`hflmpi.learn` (data, models, local solver), :mod:`hflmpi.record` (HDF5 record and
checkpoints), :mod:`hflmpi.federation` (the round loop), :mod:`hflmpi.cli` (every command).
Names below are imported on first use, so ``import hflmpi`` stays cheap (no torch, no MPI).
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "train": "hflmpi.api",
    "RunResult": "hflmpi.api",
    "Callback": "hflmpi.callbacks",
    "RunConfig": "hflmpi.config",
    "ConfigError": "hflmpi.config",
    "load_config": "hflmpi.config",
    "HflmpiError": "hflmpi.errors",
    "read_metrics": "hflmpi.record.reading",
    "read_config_toml": "hflmpi.record.reading",
    "read_run_config": "hflmpi.record.run_config",
    "read_run_info": "hflmpi.record.reading",
    "TreePlan": "hflmpi.core.topology",
    "plan_fanouts": "hflmpi.core.topology",
    "plan_groups": "hflmpi.core.topology",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    """Import a front-door name from its module on first use (PEP 562)."""
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'hflmpi' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
