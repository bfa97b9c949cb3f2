"""The metric columns of a run file: names, dtypes, units and descriptions, and the method codes."""

from __future__ import annotations

from typing import Mapping

from hflmpi.core.wire import Method

__all__ = ["METHOD_CODES", "METHOD_MISSING", "SCALAR_METRICS", "LAYER_METRICS"]

METHOD_CODES: Mapping[str, int] = {m.label: int(m) for m in Method}
"""Integer code of the aggregation method stored in ``/metrics/method`` (-1 = not recorded):
:class:`hflmpi.core.wire.Method` by its label,
``{"none": 0, "integer-sum": 1, "gather": 2, "lanes": 3}``."""

METHOD_MISSING = -1

# name -> (dtype, units, description)
SCALAR_METRICS: Mapping[str, tuple[str, str, str]] = {
    "round": ("int64", "1", "global round that this row closes (strictly increasing)"),
    "wall_time": ("float64", "s", "seconds since the run started, at the end of the round"),
    "train_loss": ("float64", "1", "sample-weighted mean training loss over the round"),
    "test_loss": ("float64", "1", "loss of the global model on the test set"),
    "test_accuracy": ("float64", "1", "accuracy of the global model on the test set, in [0, 1]"),
    "samples_per_second": ("float64", "1/s", "training samples processed per second, all ranks"),
    "sim_time": (
        "float64", "s",
        "simulated seconds since the run started, at the end of the round (the clock of the "
        "device profiles, docs/async.md; populations only, NaN otherwise and in run files "
        "written before this column existed)",
    ),
    "upward_divergence": (
        "float64",
        "1",
        "H-SGD upward divergence: weighted mean of ||x_g - x||^2 over the group models x_g "
        "around the global model x, just before the global aggregation (Wang et al., AAAI 2022); "
        "measured on evaluated rounds when run.divergence is on",
    ),
    "downward_divergence": (
        "float64",
        "1",
        "H-SGD downward divergence: weighted mean of ||x_i - x_g(i)||^2 over the device models "
        "x_i around their group model x_g(i), just before the group aggregation",
    ),
}

LAYER_METRICS: Mapping[str, tuple[str, str, str]] = {
    "compute_seconds": ("float64", "s", "seconds of computation attributed to the layer"),
    "comm_seconds": ("float64", "s", "seconds spent in the layer's collectives"),
    "bytes_sent": ("float64", "B", "payload bytes sent up and down the layer in the round"),
    "mpi_bytes": (
        "float64", "B",
        "bytes the ranks handed to MPI collectives for the layer in the round; with a population "
        "(clients.count > 0) less than bytes_sent, which counts every client's uplink as its own "
        "message (NaN in run files written before this column existed)",
    ),
    "quant_error": (
        "float64",
        "1",
        "relative squared quantization error ||Q(d) - d||^2 / ||d||^2 of the uplink differences "
        "(worst participant; measured on evaluated rounds only, NaN otherwise)",
    ),
    "method": ("int8", "1", "aggregation method code, see attr 'codes' (-1: not recorded)"),
    "late": (
        "float64", "1",
        "updates that reached the layer after their node closed and were dropped, summed over "
        "the round's aggregations (clock.mode \"deadline\"; populations only, NaN otherwise); "
        "with clock.late \"carry\" each late update once, applied later (staleness_count) or "
        "abandoned when a layer above closed (late - staleness_count)",
    ),
    "flushes": (
        "float64", "1",
        "buffers applied by the layer's buffered (FedBuff) nodes in the round, summed over the "
        "nodes (clock.mode \"buffered\"; NaN for other layers and in older run files)",
    ),
    "staleness_count": (
        "float64", "1",
        "updates applied by the layer's buffered nodes in the round (each flush applies K), or "
        "late updates a clock.late \"carry\" layer applied at a later close",
    ),
    "staleness_mean": (
        "float64", "1",
        "mean staleness (node versions applied between download and application) of those "
        "updates (carry: the node's closes the update missed)",
    ),
    "staleness_max": ("float64", "1", "largest staleness of those updates"),
}
