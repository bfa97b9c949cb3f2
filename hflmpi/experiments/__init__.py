"""Reproduce the papers' claims as sweeps: ``hflmpi experiments run|plot``.

An *experiment* is one TOML file under ``experiments/``: a base run config, a list of variants
(each overrides config sections), seeds, a fixed number of SGD steps per device, a stated
alpha-beta time model, the figures to draw and the papers' claims as machine-checked
``[[check]]`` entries. ``run`` trains every (variant, seed) pair in ONE MPI job, one
:func:`hflmpi.federation.train` call after the other over the same communicator, each into its own run
file, and rank 0 collects the curves into one results HDF5. ``plot`` (serial) draws PNGs and
writes a markdown table plus the verdict of every check. A spec may carry ``[base.clients]``
(or a variant ``clients = {...}``): its variants then run as populations of clients placed on
the ranks (docs/population.md), and the trees are trees of clients; ``[base.clock]`` (or a
variant's ``clock = {...}``) sets their device profiles and per-layer aggregation modes on the
simulated clock (docs/async.md). A variant's ``reference`` (or ``[experiment] reference``) names
the variant whose final accuracy, seed by seed, is its target (``[experiment]
target_accuracy`` fixes one instead): the results then give its time to target (simulated
clock, else modelled) and the ratio to the reference's, checked with ``kind = "at_most"``::

    mpiexec -n 8 python -m mpi4py -m hflmpi experiments run experiments/sandwich.toml \
            --out results/sandwich.h5 [--small] [--reuse] [--only a,b] \
            [--base jobs/experiments.toml] [--set optim.lr=0.05]
    hflmpi experiments plot results/sandwich.h5 --out docs/experiments

See ``docs/experiments.md`` for the spec format, the results and what they show.

Claims reproduced (see ``docs/experiments.md``): the "sandwich" of hierarchical SGD (Wang et al.,
"Demystifying why local aggregation helps: convergence analysis of hierarchical SGD", AAAI 2022,
Sec. 5: H-SGD(I, G) lies between local SGD with period I and with period G, close to period I
when groups are near-IID) and the depth, per-layer quantization, heterogeneity and deadline-aware
tau sweeps of QMLHFL (arXiv 2505.08145, Sec. VI).

Modelled wall time (stated, not measured; this machine's timings are noise): one local step
costs ``t_cp``; one layer-n aggregation costs ``alpha_n + 4 numel r(b_n) / bandwidth_n`` (the
uplink of one child's float32 model difference scaled by ``r(b) = b/32 + 1/B``,
:func:`hflmpi.core.wire.bytes_ratio`; children upload in parallel, the downlink is not charged), with
``(alpha, bandwidth)`` of ``[timing] edge`` for layers ``1..N-1`` and of ``[timing] root`` for
the root layer N. A round then takes ``T(tau) = t_cp prod(tau) + sum_n t_cm,n prod_{m>n} tau_m``
(:func:`hflmpi.core.costmodel.round_time`), the same model ``hflmpi plan`` optimises.

Results file layout::

    /                      attrs: experiment, title, spec_toml, small, world_size, hflmpi_version,
                           target_accuracy (NaN: each variant's reference)
    /runs/<variant>        attrs: label, tau, tree, bits, x, round_time (modelled), numel,
                           clients (the population's clients.count, or the world size),
                           reference ("" if none), clock (the per-layer modes of a population)
    /runs/<variant>/seed_<s>/<curve>   one row per global round: round, step, test_accuracy,
                           test_loss, train_loss, upward/downward_divergence, bytes_cum,
                           model_time, wall_time, sim_time (NaN without a population);
                           [rounds, layers]: bytes_sent, quant_error, compute_seconds,
                           comm_seconds, late; attrs: config_toml, run_file
"""

from hflmpi.experiments.figures import plot_results, results_markdown
from hflmpi.experiments.results import (
    CheckResult,
    VariantResult,
    evaluate_checks,
    load_results,
    summarize,
)
from hflmpi.experiments.runner import run_experiment
from hflmpi.experiments.spec import Experiment, ExperimentError, Timing, Variant, load_experiment

__all__ = [
    "ExperimentError",
    "Timing",
    "Variant",
    "Experiment",
    "CheckResult",
    "VariantResult",
    "load_experiment",
    "run_experiment",
    "load_results",
    "summarize",
    "evaluate_checks",
    "plot_results",
    "results_markdown",
]
