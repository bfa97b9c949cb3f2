"""Reproduce the papers' claims as sweeps: ``python -m mpi4py -m hflmpi.experiments run|plot``.

An *experiment* is one TOML file under ``experiments/``: a base run config, a list of variants
(each overrides config sections), seeds, a fixed number of SGD steps per device, a stated
alpha-beta time model, the figures to draw and the papers' claims as machine-checked
``[[check]]`` entries. ``run`` trains every (variant, seed) pair in ONE MPI job, one
:func:`hflmpi.federation.train` call after the other over the same communicator, each into its own run
file, and rank 0 collects the curves into one results HDF5. ``plot`` (serial) draws PNGs and
writes a markdown table plus the verdict of every check::

    mpiexec -n 8 python -m mpi4py -m hflmpi.experiments run experiments/sandwich.toml \
            --out results/sandwich.h5 [--small] [--reuse] [--only a,b] \
            [--base jobs/experiments.toml] [--set optim.lr=0.05]
    python -m hflmpi.experiments plot results/sandwich.h5 --out docs/experiments

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

    /                      attrs: experiment, title, spec_toml, small, world_size, hflmpi_version
    /runs/<variant>        attrs: label, tau, tree, bits, x, round_time (modelled), numel
    /runs/<variant>/seed_<s>/<curve>   one row per global round: round, step, test_accuracy,
                           test_loss, train_loss, upward/downward_divergence, bytes_cum,
                           model_time, wall_time; [rounds, layers]: bytes_sent, quant_error,
                           compute_seconds, comm_seconds; attrs: config_toml, run_file
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from hflmpi import __version__
from hflmpi.record.checkpoint import checkpoint_paths
from hflmpi.config import ConfigError, RunConfig, apply_overrides, config_from_dict
from hflmpi.core.topology import TopologyError, TreePlan, plan_fanouts, plan_groups

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

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
    "main",
]

_CURVES = ("round", "step", "test_accuracy", "test_loss", "train_loss", "upward_divergence",
           "downward_divergence", "bytes_cum", "model_time", "wall_time")
_LAYER_CURVES = ("bytes_sent", "quant_error", "compute_seconds", "comm_seconds")
_EXPERIMENT_KEYS = {"name", "title", "description", "seeds", "steps", "eval_every_steps",
                    "last_steps", "small"}
_SMALL_KEYS = {"seeds", "steps", "eval_every_steps", "last_steps", "variants", "base", "plan"}
_VARIANT_KEYS = {"name", "label", "x", "steps", "eval_every_steps"}
_SECTIONS = ("run", "topology", "schedule", "aggregation", "quantize", "data", "model", "optim",
             "privacy")
_FIGURE_KINDS = ("accuracy_vs_steps", "accuracy_vs_bytes", "accuracy_vs_time", "divergence",
                 "quant_vs_bits", "metric_vs_x")
_CHECK_KINDS = ("order", "close", "finite", "at_least", "above_median")


class ExperimentError(ValueError):
    """An experiment spec or results file is invalid; the message names the key and a fix."""


# ---------------------------------------------------------------------------------------------
# The spec


@dataclass(frozen=True)
class Timing:
    """The stated alpha-beta time model (see the module docstring); seconds and bytes/s."""

    t_cp: float = 0.002
    edge_alpha: float = 0.001
    edge_bandwidth: float = 1e8
    root_alpha: float = 0.05
    root_bandwidth: float = 1e6

    def layer_costs(self, depth: int, numel: int, bits: Sequence[int], bucket: int = 0) -> list[float]:
        """Return ``t_cm,n`` (seconds of one layer-n aggregation) for ``n = 1..depth``."""
        from hflmpi.core.wire import bytes_ratio

        costs = []
        for n in range(1, depth + 1):
            alpha, bw = ((self.root_alpha, self.root_bandwidth) if n == depth
                         else (self.edge_alpha, self.edge_bandwidth))
            costs.append(alpha + 4.0 * numel * bytes_ratio(int(bits[n - 1]), bucket) / bw)
        return costs

    def round_time(self, tau: Sequence[int], numel: int, bits: Sequence[int], bucket: int = 0) -> float:
        """Return the modelled seconds of one global round, ``T(tau)``."""
        from hflmpi.core.costmodel import round_time

        return round_time(list(tau), self.t_cp, self.layer_costs(len(tau), numel, bits, bucket))


@dataclass(frozen=True)
class Variant:
    """One point of the sweep: a full run config (as nested dicts) less seed, out and rounds."""

    name: str
    label: str
    config: dict[str, Any]
    steps: int
    x: float = math.nan
    eval_every_steps: int | None = None

    @property
    def tau(self) -> list[int]:
        return list(self.config.get("schedule", {}).get("tau", [5]))

    @property
    def period(self) -> int:
        """SGD steps per device in one global round, ``prod(tau)``."""
        return math.prod(self.tau)

    def run_config(self, seed: int, out: str | Path, eval_every_steps: int) -> RunConfig:
        """Return the validated config of this variant's run with ``seed`` into ``out``."""
        data = copy.deepcopy(self.config)
        run = data.setdefault("run", {})
        every = self.eval_every_steps or eval_every_steps
        run.update(seed=int(seed), out=str(out), rounds=self.steps // self.period,
                   eval_every=max(1, every // self.period), progress="off",
                   checkpoint_every=0)
        try:
            return config_from_dict(data)
        except ConfigError as exc:
            raise ExperimentError(f"variant {self.name!r}: {exc}") from None


@dataclass(frozen=True)
class Experiment:
    """A parsed experiment spec (one TOML file under ``experiments/``)."""

    name: str
    title: str
    description: str
    seeds: tuple[int, ...]
    steps: int
    eval_every_steps: int
    last_steps: int
    base: dict[str, Any]
    variants: tuple[Variant, ...]
    timing: Timing
    plan: dict[str, Any] | None
    figures: tuple[dict[str, Any], ...]
    checks: tuple[dict[str, Any], ...]
    small: bool
    text: str = field(repr=False, default="")

    def variant(self, name: str) -> Variant:
        for v in self.variants:
            if v.name == name:
                return v
        raise ExperimentError(f"no variant named {name!r}; variants: "
                              f"{', '.join(v.name for v in self.variants)}")


def _merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """Merge config sections: ``topology`` is replaced whole, other sections key by key."""
    out = copy.deepcopy(dict(base))
    for section, table in over.items():
        if section == "topology" or not isinstance(table, Mapping):
            out[section] = copy.deepcopy(table)
        else:
            out[section] = {**out.get(section, {}), **copy.deepcopy(dict(table))}
    return out


def _unknown(where: str, keys: Any, allowed: set[str] | Sequence[str]) -> None:
    extra = sorted(set(keys) - set(allowed))
    if extra:
        raise ExperimentError(f"{where} has unknown key(s) {extra}; allowed: {sorted(allowed)}")


def _positive_int(value: Any, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ExperimentError(f"{key}={value!r} must be an integer >= 1")
    return int(value)


def load_experiment(
    path: str | os.PathLike[str],
    small: bool = False,
    *,
    base_file: str | os.PathLike[str] | None = None,
    overrides: Sequence[str] = (),
) -> Experiment:
    """Parse and validate an experiment spec; ``small`` applies its ``[experiment.small]`` table.

    ``base_file`` (a run config TOML, e.g. ``jobs/experiments.toml`` naming MNIST files) and then
    ``overrides`` (``--set section.key=value``) are merged into the spec's ``[base]`` before the
    variants apply theirs, so a cluster can swap data and model without editing the spec.
    Every variant's config is validated here (before any training); the plan-generated variants
    of a ``[plan]`` section are added later by :func:`run_experiment` (they need the model size).
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
        doc = tomllib.loads(text)
    except FileNotFoundError:
        raise ExperimentError(f"experiment spec {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ExperimentError(f"experiment spec {path} is not valid TOML: {exc}") from None
    _unknown(str(path), doc, {"experiment", "timing", "base", "variant", "plan", "figure", "check"})
    exp = dict(doc.get("experiment", {}))
    _unknown("[experiment]", exp, _EXPERIMENT_KEYS)
    small_table = dict(exp.pop("small", {}))
    _unknown("[experiment.small]", small_table, _SMALL_KEYS)
    base = dict(doc.get("base", {}))
    _unknown("[base]", base, _SECTIONS)
    plan = dict(doc["plan"]) if "plan" in doc else None
    only: list[str] | None = None
    if small:
        for key in ("seeds", "steps", "eval_every_steps", "last_steps"):
            if key in small_table:
                exp[key] = small_table[key]
        base = _merge(base, small_table.get("base", {}))
        if plan is not None:
            plan.update(small_table.get("plan", {}))
        only = list(small_table["variants"]) if "variants" in small_table else None
    if base_file is not None:
        try:
            extra = tomllib.loads(Path(base_file).read_text(encoding="utf-8"))
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ExperimentError(f"--base {base_file}: cannot read it as TOML ({exc})") from None
        _unknown(f"--base {base_file}", extra, _SECTIONS)
        base = _merge(base, extra)
    if overrides:
        base = apply_overrides(base, overrides)
        _unknown("--set", base, _SECTIONS)
    name = str(exp.get("name", Path(path).stem))
    seeds = tuple(int(s) for s in exp.get("seeds", [0]))
    if not seeds:
        raise ExperimentError("[experiment] seeds is empty; give e.g. seeds = [0, 1, 2]")
    steps = _positive_int(exp.get("steps", 200), "experiment.steps")
    eval_steps = _positive_int(exp.get("eval_every_steps", steps), "experiment.eval_every_steps")
    last_steps = _positive_int(exp.get("last_steps", eval_steps), "experiment.last_steps")

    t = dict(doc.get("timing", {}))
    _unknown("[timing]", t, {"t_cp", "edge", "root"})
    edge, root = dict(t.get("edge", {})), dict(t.get("root", {}))
    for where, table in (("[timing] edge", edge), ("[timing] root", root)):
        _unknown(where, table, {"alpha", "bandwidth"})
    defaults = Timing()
    timing = Timing(float(t.get("t_cp", defaults.t_cp)),
                    float(edge.get("alpha", defaults.edge_alpha)),
                    float(edge.get("bandwidth", defaults.edge_bandwidth)),
                    float(root.get("alpha", defaults.root_alpha)),
                    float(root.get("bandwidth", defaults.root_bandwidth)))

    variants = []
    for i, raw in enumerate(doc.get("variant", [])):
        raw = dict(raw)
        vname = raw.get("name")
        if not isinstance(vname, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", vname):
            raise ExperimentError(f"[[variant]] #{i + 1} needs name = \"letters, digits, '-', "
                                  f"'_', '.'\", got {vname!r}")
        _unknown(f"variant {vname!r}", raw, _VARIANT_KEYS | set(_SECTIONS))
        over = {k: v for k, v in raw.items() if k in _SECTIONS}
        variants.append(Variant(
            name=vname, label=str(raw.get("label", vname)), config=_merge(base, over),
            steps=_positive_int(raw.get("steps", steps), f"variant {vname!r} steps"),
            x=float(raw.get("x", math.nan)),
            eval_every_steps=(_positive_int(raw["eval_every_steps"], f"variant {vname!r} "
                              "eval_every_steps") if "eval_every_steps" in raw else None),
        ))
    names = [v.name for v in variants]
    if len(set(names)) != len(names):
        raise ExperimentError(f"variant names must be unique: {names}")
    if only is not None:
        missing = sorted(set(only) - set(names))
        if missing:
            raise ExperimentError(f"[experiment.small] variants names unknown variant(s) {missing}")
        variants = [v for v in variants if v.name in only]
    if not variants and plan is None:
        raise ExperimentError(f"{path} defines no [[variant]] and no [plan]")
    for v in variants:
        if v.steps % v.period:
            raise ExperimentError(
                f"variant {v.name!r}: steps={v.steps} is not a multiple of prod(tau)="
                f"{v.period} (tau={v.tau}); change steps or tau")
        v.run_config(seeds[0], "check.h5", eval_steps)  # validate now, not after hours of runs

    if plan is not None:
        _unknown("[plan]", plan, {"deadline", "random", "tau_max", "seed", "strict", "sigma2",
                                  "grad2", "zeta2", "lipschitz", "gap", "evaluations"})
        if not isinstance(plan.get("deadline"), (int, float)) or plan["deadline"] <= 0:
            raise ExperimentError(f"[plan] deadline={plan.get('deadline')!r} must be a number of "
                                  "modelled seconds > 0, e.g. deadline = 2.0")
    figures = tuple(dict(f) for f in doc.get("figure", []))
    for f in figures:
        _unknown(f"[[figure]] {f.get('name')!r}", f,
                 {"name", "kind", "title", "variants", "metric", "xlabel", "xscale", "yscale"})
        if f.get("kind") not in _FIGURE_KINDS:
            raise ExperimentError(f"[[figure]] {f.get('name')!r}: kind={f.get('kind')!r} must be "
                                  f"one of {list(_FIGURE_KINDS)}")
    checks = tuple(dict(c) for c in doc.get("check", []))
    for c in checks:
        _unknown(f"[[check]] {c.get('claim')!r}", c,
                 {"claim", "kind", "metric", "variants", "margin", "ci", "ci_margin", "source",
                  "threshold"})
        if c.get("kind") not in _CHECK_KINDS:
            raise ExperimentError(f"[[check]] {c.get('claim')!r}: kind={c.get('kind')!r} must be "
                                  f"one of {list(_CHECK_KINDS)}")
    return Experiment(name, str(exp.get("title", name)), str(exp.get("description", "")).strip(),
                      seeds, steps, eval_steps, last_steps, base, tuple(variants), timing, plan,
                      figures, checks, small, text)


# ---------------------------------------------------------------------------------------------
# Tree, model size and the plan-generated variants (pure; every rank computes the same)


def _tree(config: RunConfig, world_size: int) -> TreePlan:
    topo = config.topology
    if topo.kind == "fanouts":
        return plan_fanouts(list(topo.fanouts or ()), world_size)
    if topo.kind == "groups":
        return plan_groups(topo.groups, world_size)
    if topo.kind == "flat":
        return plan_fanouts([world_size], world_size)
    raise ExperimentError("topology.nodes is not supported in experiments (the tree must be "
                          "known up front); give topology.fanouts or topology.groups")


def _describe_tree(config: RunConfig) -> str:
    topo = config.topology
    if topo.kind == "fanouts":
        return f"fanouts {list(topo.fanouts or ())}"
    if topo.kind == "groups":
        return "groups " + json.dumps(topo.groups).replace(" ", "")
    return "flat"


def _model_numel(config: RunConfig) -> int:
    from hflmpi.learn.data import load_dataset
    from hflmpi.learn.models import build_model

    train_set, _ = load_dataset(config.data, config.run.seed)
    model = build_model(config.model, train_set.input_shape, train_set.num_classes,
                        seed=config.run.seed)
    return int(sum(p.numel() for p in model.parameters()))


def _plan_variants(exp: Experiment, numel: int) -> list[Variant]:
    """Return the ``[plan]`` variants: the tau ``hflmpi plan`` picks and random feasible ones.

    Every variant trains for the whole rounds that fit in the same modelled deadline.
    """
    from hflmpi.core.tau_search import BoundConstants, search

    spec = dict(exp.plan or {})
    base = config_from_dict(exp.base)
    if base.topology.kind != "fanouts":
        raise ExperimentError("[plan] needs [base.topology] fanouts (the bound uses fan-outs)")
    fanouts = list(base.topology.fanouts or ())
    bits = list(base.quantize.bits_for(len(fanouts)))
    t_cm = exp.timing.layer_costs(len(fanouts), numel, bits, base.quantize.bucket_size)
    constants = BoundConstants(
        lipschitz=float(spec.get("lipschitz", 1.0)), sigma2=float(spec.get("sigma2", 1.0)),
        gap=float(spec.get("gap", 2.3)), lr=base.optim.lr, grad2=float(spec.get("grad2", 1.0)),
        zeta2=float(spec.get("zeta2", 0.0)))
    count = int(spec.get("random", 4))
    result = search(exp.timing.t_cp, t_cm, float(spec["deadline"]), bits=bits,
                    bucket_size=base.quantize.bucket_size, fanouts=fanouts, constants=constants,
                    tau_max=spec.get("tau_max", 10), strict=bool(spec.get("strict", False)),
                    random=max(10 * count, 50), seed=int(spec.get("seed", 0)))
    chosen, bounds = [result.tau], [result.bound.total]
    assert result.random is not None
    for sample in result.random.samples:
        if len(chosen) > count:
            break
        if sample["tau"] not in chosen:
            chosen.append(sample["tau"])
            bounds.append(sample["bound"])
    evaluations = int(spec.get("evaluations", 10))
    variants = []
    for i, (tau, bound) in enumerate(zip(chosen, bounds)):
        period = math.prod(tau)
        rounds = int(math.floor(float(spec["deadline"]) / exp.timing.round_time(
            tau, numel, bits, base.quantize.bucket_size) * (1 + 1e-12)))
        if rounds < 1:
            continue
        name = "planned" if i == 0 else f"random-{i}"
        label = (f"tau={list(tau)}, " + ("chosen by hflmpi plan" if i == 0 else "random")
                 + f" (bound {bound:.3g})")
        variants.append(Variant(
            name, label, _merge(exp.base, {"schedule": {"tau": list(tau)}}), rounds * period,
            x=float(i), eval_every_steps=max(1, rounds // evaluations) * period))
    return variants


# ---------------------------------------------------------------------------------------------
# Running (collective over comm)


def _run_file(out: Path, variant: str, seed: int) -> Path:
    return out.parent / f"{out.stem}.runs" / f"{variant}__seed{seed}.h5"


def _complete(path: Path, rounds: int) -> bool:
    from hflmpi.record.store import read_metrics

    try:
        return path.exists() and len(read_metrics(path)["round"]) >= rounds
    except (OSError, KeyError, ValueError):
        return False


def _remove(*paths: Path) -> None:
    for p in paths:
        try:
            p.unlink()
        except FileNotFoundError:
            pass


def run_experiment(
    spec: str | os.PathLike[str] | Experiment,
    out: str | os.PathLike[str],
    comm: Any,
    *,
    small: bool = False,
    reuse: bool = False,
    only: Sequence[str] | None = None,
    base_file: str | os.PathLike[str] | None = None,
    overrides: Sequence[str] = (),
    stream: Any = None,
) -> Path:
    """Train every (variant, seed) of an experiment over ``comm`` and write the results file.

    Collective over ``comm``: every rank calls it with the same arguments. Rank 0 writes
    ``out`` (and one run file per pair under ``OUT.runs/``); returns ``out`` on every rank.

    Parameters
    ----------
    spec : path or Experiment
        The experiment TOML (or a parsed :class:`Experiment`).
    out : path
        The results HDF5 file (replaced).
    comm : MPI.Comm
        The devices; the world size must fit every variant's tree.
    small : bool
        Apply the spec's ``[experiment.small]`` table (the CI version).
    reuse : bool
        Skip pairs whose run file already holds every round (resume an interrupted sweep).
    only : sequence of str, optional
        Train only these variants.
    base_file, overrides : optional
        A run config and ``section.key=value`` strings merged into the spec's base (see
        :func:`load_experiment`).
    stream : text stream, optional
        Rank 0's progress lines (default stdout).
    """
    from hflmpi.federation import train

    rank, size = comm.Get_rank(), comm.Get_size()
    exp = spec if isinstance(spec, Experiment) else load_experiment(
        spec, small=small, base_file=base_file, overrides=overrides)
    out = Path(out)
    stream = stream or sys.stdout
    variants = list(exp.variants)
    probe = variants[0].run_config(exp.seeds[0], "probe.h5", exp.eval_every_steps) if variants \
        else config_from_dict(_merge(exp.base, {"run": {"seed": exp.seeds[0]}}))
    numel: Any = None
    if rank == 0:  # load the data and build the model once to learn its size
        try:
            numel = _model_numel(probe)
        except (OSError, ValueError, RuntimeError, ImportError) as exc:
            numel = f"{type(exc).__name__}: {exc}"
    numel = comm.bcast(numel, root=0)  # all ranks
    if isinstance(numel, str):
        raise ExperimentError(f"loading the data / building the model failed on rank 0: {numel}")
    if exp.plan is not None:
        variants += _plan_variants(exp, numel)
    if only:
        variants = [v for v in variants if v.name in set(only)]
    # Validate every tree against the world size before training anything (all ranks).
    for v in variants:
        try:
            _tree(v.run_config(exp.seeds[0], "check.h5", exp.eval_every_steps), size)
        except TopologyError as exc:
            raise ExperimentError(f"variant {v.name!r}: {exc}") from None

    pairs = [(v, s) for v in variants for s in exp.seeds]
    started = time.perf_counter()
    for i, (v, seed) in enumerate(pairs, start=1):
        path = _run_file(out, v.name, seed)
        config = v.run_config(seed, path, exp.eval_every_steps)
        skip = False
        if rank == 0:
            path.parent.mkdir(parents=True, exist_ok=True)
            skip = reuse and _complete(path, config.run.rounds)
            if not skip:
                _remove(path, *checkpoint_paths(path))
        skip = comm.bcast(skip, root=0)
        t0 = time.perf_counter()
        if not skip:
            result = train(config, comm)
            if rank == 0:
                _remove(*checkpoint_paths(path))  # train() always checkpoints the last round
                print(f"[{exp.name} {i}/{len(pairs)}] {v.name} seed {seed}: {v.steps} steps, "
                      f"final accuracy {result.test_accuracy:.4f} ({time.perf_counter() - t0:.1f} s)",
                      file=stream, flush=True)
        elif rank == 0:
            print(f"[{exp.name} {i}/{len(pairs)}] {v.name} seed {seed}: reused {path}",
                  file=stream, flush=True)
    error = None
    if rank == 0:
        try:
            _write_results(exp, variants, out, numel, size)
        except (OSError, KeyError, ValueError) as exc:
            error = f"writing {out} failed: {type(exc).__name__}: {exc}"
        else:
            print(f"[{exp.name}] {len(pairs)} runs in {time.perf_counter() - started:.0f} s; "
                  f"results in {out}", file=stream, flush=True)
    error = comm.bcast(error, root=0)  # all ranks
    if error is not None:
        raise ExperimentError(error)
    return out


def _write_results(exp: Experiment, variants: Sequence[Variant], out: Path, numel: int,
                   world_size: int) -> None:
    import h5py

    from hflmpi.record.store import read_config_toml, read_metrics

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp.h5")
    with h5py.File(tmp, "w") as f:
        f.attrs.update(experiment=exp.name, title=exp.title, description=exp.description,
                       spec_toml=exp.text, small=exp.small, world_size=world_size,
                       hflmpi_version=__version__, last_steps=exp.last_steps, numel=numel,
                       timing=json.dumps(exp.timing.__dict__),
                       figures=json.dumps(list(exp.figures)), checks=json.dumps(list(exp.checks)),
                       order=json.dumps([v.name for v in variants]))
        for v in variants:
            config = v.run_config(exp.seeds[0], "x.h5", exp.eval_every_steps)
            depth = len(v.tau)
            bits = list(config.quantize.bits_for(depth))
            period_time = exp.timing.round_time(v.tau, numel, bits, config.quantize.bucket_size)
            g = f.create_group(f"runs/{v.name}")
            g.attrs.update(label=v.label, tau=json.dumps(v.tau), tree=_describe_tree(config),
                           bits=json.dumps(bits), x=v.x, steps=v.steps, round_time=period_time,
                           alpha=config.data.alpha, partition=config.data.partition)
            for seed in exp.seeds:
                path = _run_file(out, v.name, seed)
                m = read_metrics(path)
                rounds = m["round"].astype(np.int64)
                sg = g.create_group(f"seed_{seed}")
                sg.attrs.update(config_toml=read_config_toml(path), run_file=str(path), seed=seed)
                curves = {
                    "round": rounds, "step": rounds * v.period,
                    "bytes_cum": np.cumsum(np.nansum(m["bytes_sent"], axis=1)),
                    "model_time": rounds * period_time,
                }
                for key in _CURVES:
                    sg.create_dataset(key, data=curves[key] if key in curves else m[key])
                for key in _LAYER_CURVES:
                    sg.create_dataset(key, data=m[key])
    os.replace(tmp, out)


# ---------------------------------------------------------------------------------------------
# Reading, summarising, checking (serial)


@dataclass
class VariantResult:
    """One variant's curves (one dict per seed) and attributes, as read from a results file."""

    name: str
    attrs: dict[str, Any]
    seeds: dict[int, dict[str, np.ndarray]]

    @property
    def label(self) -> str:
        return str(self.attrs.get("label", self.name))


def load_results(path: str | os.PathLike[str]) -> tuple[dict[str, Any], list[VariantResult]]:
    """Return the results file's root attributes and its variants in spec order."""
    import h5py

    if not Path(path).exists():
        raise ExperimentError(f"results file {path} does not exist; run the experiment first")
    with h5py.File(path, "r") as f:
        attrs = {k: (v.item() if isinstance(v, np.generic) else v) for k, v in f.attrs.items()}
        variants = []
        for name in json.loads(attrs["order"]):
            g = f["runs"][name]
            seeds = {int(k.split("_", 1)[1]): {d: g[k][d][()] for d in g[k]} for k in g}
            vattrs = {k: (v.item() if isinstance(v, np.generic) else v) for k, v in g.attrs.items()}
            variants.append(VariantResult(name, vattrs, seeds))
    return attrs, variants


def _seed_summary(c: dict[str, np.ndarray], last_steps: int) -> dict[str, float]:
    acc, steps = c["test_accuracy"], c["step"]
    finite = acc[np.isfinite(acc)]
    window = acc[np.isfinite(acc) & (steps > steps[-1] - last_steps)] if len(steps) else finite
    up, down = c["upward_divergence"], c["downward_divergence"]
    qe = c["quant_error"]
    qmeans = [float(np.nanmean(qe[:, j])) if np.isfinite(qe[:, j]).any() else math.nan
              for j in range(qe.shape[1])]
    return {
        "final_accuracy": float(finite[-1]) if finite.size else math.nan,
        "last_accuracy": float(window.mean()) if window.size else math.nan,
        "total_bytes": float(c["bytes_cum"][-1]) if len(c["bytes_cum"]) else math.nan,
        "model_time": float(c["model_time"][-1]) if len(c["model_time"]) else math.nan,
        "wall_time": float(c["wall_time"][-1]) if len(c["wall_time"]) else math.nan,
        "upward_divergence": float(np.nanmean(up)) if np.isfinite(up).any() else math.nan,
        "downward_divergence": float(np.nanmean(down)) if np.isfinite(down).any() else math.nan,
        "quant_error_max": max((q for q in qmeans if math.isfinite(q)), default=math.nan),
        **{f"quant_error_layer{j + 1}": q for j, q in enumerate(qmeans)},
    }


def summarize(path: str | os.PathLike[str]) -> dict[str, dict[str, tuple[float, float, list[float]]]]:
    """Return ``{variant: {metric: (mean, std, per-seed values)}}`` over seeds."""
    attrs, variants = load_results(path)
    last_steps = int(attrs.get("last_steps", 1))
    out: dict[str, dict[str, tuple[float, float, list[float]]]] = {}
    for v in variants:
        per_seed = [_seed_summary(c, last_steps) for _, c in sorted(v.seeds.items())]
        keys = sorted(set().union(*per_seed))
        out[v.name] = {}
        for key in keys:
            values = [s.get(key, math.nan) for s in per_seed]
            arr = np.asarray(values, dtype=np.float64)
            mean = float(np.mean(arr)) if arr.size else math.nan
            std = float(np.std(arr)) if arr.size > 1 else 0.0
            out[v.name][key] = (mean, std, values)
    return out


@dataclass(frozen=True)
class CheckResult:
    """The verdict on one ``[[check]]`` (a claim of a paper) for a results file."""

    claim: str
    kind: str
    passed: bool
    detail: str
    ci: bool


def evaluate_checks(path: str | os.PathLike[str], *, ci: bool = False) -> list[CheckResult]:
    """Evaluate the spec's claims on the seed means; ``ci`` uses each check's ``ci_margin``.

    ``order``: ``metric`` must not increase along ``variants`` by more than allowed: each value
    minus the next must be >= ``margin`` (negative margin = tolerance). ``close``: the two
    variants differ by at most ``margin``. ``finite``: the metric is finite for every seed.
    ``at_least``: every variant's metric is >= ``threshold``. ``above_median``: the first
    variant's metric minus the median of the others is >= ``margin``. Checks naming a variant
    the results lack (e.g. a small run) are skipped; ``finite`` and ``at_least`` use the
    variants present.
    """
    attrs, _ = load_results(path)
    summary = summarize(path)
    results = []
    for c in json.loads(attrs["checks"]):
        names, metric, kind = list(c["variants"]), c.get("metric", "last_accuracy"), c["kind"]
        margin = float(c.get("ci_margin", c.get("margin", 0.0)) if ci else c.get("margin", 0.0))
        if kind in ("finite", "at_least"):
            names = [n for n in names if n in summary]
        if not names or any(n not in summary for n in names):
            continue
        values = [summary[n].get(metric, (math.nan, 0.0, []))[0] for n in names]
        shown = ", ".join(f"{n}={val:.4g}" for n, val in zip(names, values))
        if kind == "order":
            passed = all(a - b >= margin for a, b in zip(values, values[1:]))
            detail = f"{metric}: {shown} (each minus the next >= {margin:g})"
        elif kind == "close":
            passed = abs(values[0] - values[1]) <= margin
            detail = f"{metric}: {shown} (|difference| {abs(values[0] - values[1]):.4g} <= {margin:g})"
        elif kind == "at_least":
            threshold = float(c.get("threshold", 0.0))
            passed = all(v >= threshold for v in values)
            detail = f"{metric}: {shown} (each >= {threshold:g})"
        elif kind == "above_median":
            median = float(np.median(values[1:])) if len(values) > 1 else math.nan
            passed = values[0] - median >= margin
            detail = (f"{metric}: {names[0]}={values[0]:.4g}, median of the other "
                      f"{len(values) - 1} = {median:.4g} (difference >= {margin:g}); {shown}")
        else:
            seeds = [x for n in names for x in summary[n].get(metric, (0, 0, [math.nan]))[2]]
            passed = bool(seeds) and all(math.isfinite(x) for x in seeds)
            detail = f"{metric} finite for every seed: {shown}"
        results.append(CheckResult(str(c.get("claim", "")), kind, bool(passed), detail,
                                   bool(c.get("ci", False))))
    return results


# ---------------------------------------------------------------------------------------------
# Figures and the markdown table (serial)


def _figure(title: str, panels: int = 1) -> tuple[Any, list[Any]]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.0 * panels + 1.0, 3.8), layout="constrained")
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(1, panels, i + 1) for i in range(panels)]
    fig.suptitle(title, fontsize="medium")
    for ax in axes:
        ax.grid(True, alpha=0.3)
    return fig, axes


def _mean_curve(v: VariantResult, xkey: str, ykey: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Return x and the seed mean, min and max of y at the rows where y is finite for every seed."""
    runs = [c for _, c in sorted(v.seeds.items())]
    n = min(len(c[ykey]) for c in runs)
    ys = np.stack([c[ykey][:n] for c in runs])
    xs = np.stack([c[xkey][:n] for c in runs]).astype(np.float64).mean(axis=0)
    mask = np.isfinite(ys).all(axis=0)
    ys = ys[:, mask]
    return xs[mask], ys.mean(axis=0), ys.min(axis=0), ys.max(axis=0)


def _curves(ax: Any, variants: Sequence[VariantResult], xkey: str, ykey: str, scale: float = 1.0) -> None:
    for i, v in enumerate(variants):
        x, mean, lo, hi = _mean_curve(v, xkey, ykey)
        if not x.size:
            continue
        ax.plot(x, mean * scale, color=f"C{i}", label=v.label, marker="o" if x.size < 25 else None,
                markersize=3)
        if len(v.seeds) > 1:
            ax.fill_between(x, lo * scale, hi * scale, color=f"C{i}", alpha=0.15, linewidth=0)


def plot_results(path: str | os.PathLike[str], out_dir: str | os.PathLike[str]) -> list[Path]:
    """Draw the spec's ``[[figure]]`` entries as ``<experiment>_<figure>.png`` in ``out_dir``."""
    attrs, variants = load_results(path)
    by_name = {v.name: v for v in variants}
    summary = summarize(path)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    figures = json.loads(attrs["figures"]) or [{"name": "accuracy", "kind": "accuracy_vs_steps"}]
    written = []
    for spec in figures:
        chosen = [by_name[n] for n in spec.get("variants", list(by_name)) if n in by_name]
        if not chosen:
            continue
        kind, title = spec["kind"], spec.get("title", f"{attrs['title']}")
        if attrs.get("small"):
            title += " (small)"
        if kind in ("accuracy_vs_steps", "accuracy_vs_bytes", "accuracy_vs_time"):
            xkey, xlabel = {"accuracy_vs_steps": ("step", "SGD steps per device"),
                            "accuracy_vs_bytes": ("bytes_cum", "cumulative bytes sent (all layers, all ranks)"),
                            "accuracy_vs_time": ("model_time", "modelled wall time [s]")}[kind]
            fig, (ax,) = _figure(title)
            _curves(ax, chosen, xkey, "test_accuracy", 100.0)
            ax.set_xlabel(xlabel)
            ax.set_ylabel("test accuracy [%]")
            if kind == "accuracy_vs_bytes":
                ax.set_xscale("log")
            ax.legend(fontsize="x-small", loc="lower right")
        elif kind == "divergence":
            fig, axes = _figure(title, panels=2)
            for ax, key, name in zip(axes, ("upward_divergence", "downward_divergence"),
                                     ("upward (groups vs global)", "downward (devices vs group)")):
                _curves(ax, chosen, "step", key)
                ax.set_yscale("log")
                ax.set_xlabel("SGD steps per device")
                ax.set_ylabel(f"{name} divergence")
            axes[0].legend(fontsize="x-small", loc="best")
        elif kind == "quant_vs_bits":
            fig, axes = _figure(title, panels=2)
            points: dict[int, list[tuple[int, str]]] = {}
            for v in chosen:
                bits = json.loads(v.attrs["bits"])
                quantized = [j for j, b in enumerate(bits) if b]
                if len(quantized) == 1:
                    points.setdefault(quantized[0] + 1, []).append((bits[quantized[0]], v.name))
            for i, (layer, pts) in enumerate(sorted(points.items())):
                pts.sort()
                b = [p[0] for p in pts]
                qe = [summary[n].get(f"quant_error_layer{layer}", (math.nan,))[0] for _, n in pts]
                acc = [100 * summary[n]["last_accuracy"][0] for _, n in pts]
                axes[0].plot(b, qe, marker="o", color=f"C{i}", label=f"layer {layer} quantized")
                axes[1].plot(b, acc, marker="o", color=f"C{i}", label=f"layer {layer} quantized")
            exact = [v.name for v in chosen if not any(json.loads(v.attrs["bits"]))]
            if exact:
                axes[1].axhline(100 * summary[exact[0]]["last_accuracy"][0], color="k",
                                linestyle="--", label="no quantization")
            axes[0].set_yscale("log")
            axes[0].set_ylabel("relative quantization error E||Q(d)-d||^2/||d||^2")
            axes[1].set_ylabel("test accuracy, mean of last evaluations [%]")
            for ax in axes:
                ax.set_xlabel("bits at the quantized layer")
                ax.set_xscale("log", base=2)
                ax.legend(fontsize="x-small")
        else:  # metric_vs_x
            metric = spec.get("metric", "last_accuracy")
            fig, (ax,) = _figure(title)
            xs = np.array([v.attrs.get("x", math.nan) for v in chosen], dtype=np.float64)
            ms = np.array([summary[v.name][metric][0] for v in chosen])
            sd = np.array([summary[v.name][metric][1] for v in chosen])
            scale = 100.0 if "accuracy" in metric else 1.0
            ax.errorbar(xs, ms * scale, yerr=sd * scale, marker="o", capsize=3)
            ax.set_xlabel(spec.get("xlabel", "x"))
            ax.set_ylabel(metric.replace("_", " ") + (" [%]" if scale == 100.0 else ""))
            ax.set_xscale(spec.get("xscale", "linear"))
        if kind != "quant_vs_bits" and spec.get("yscale"):
            fig.axes[0].set_yscale(spec["yscale"])
        target = out / f"{attrs['experiment']}_{spec['name']}.png"
        fig.savefig(target, dpi=90)
        written.append(target)
    return written


def _pm(mean: float, std: float, scale: float = 1.0, spec: str = ".1f") -> str:
    if not math.isfinite(mean):
        return "-"
    return f"{mean * scale:{spec}} ± {std * scale:{spec}}" if std else f"{mean * scale:{spec}}"


def results_markdown(path: str | os.PathLike[str], figures: Sequence[Path] = ()) -> str:
    """Return the markdown table of a results file, with the checks' verdicts and figure links."""
    attrs, variants = load_results(path)
    summary = summarize(path)
    seeds = sorted(variants[0].seeds) if variants else []
    lines = [f"### {attrs['title']}{' (small)' if attrs.get('small') else ''}", ""]
    if attrs.get("description"):
        lines += [str(attrs["description"]), ""]
    lines += [f"Seeds {seeds}; accuracy = mean ± std over seeds of the final test accuracy and "
              f"of the mean over the evaluations in the last {attrs.get('last_steps', 1)} steps; bytes = all "
              "layers, all ranks; modelled time as stated in the spec's [timing].", ""]
    header = ["variant", "tree", "tau", "bits", "steps", "final acc [%]",
              f"acc, last {attrs.get('last_steps', 1)} steps [%]", "MB sent", "model time [s]",
              "up div", "down div", "max quant err"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for v in variants:
        s = summary[v.name]
        row = [f"{v.name}: {v.label}", str(v.attrs.get("tree", "")), str(v.attrs.get("tau", "")),
               str(v.attrs.get("bits", "")), str(v.attrs.get("steps", "")),
               _pm(*s["final_accuracy"][:2], 100.0), _pm(*s["last_accuracy"][:2], 100.0),
               f"{s['total_bytes'][0] / 1e6:.2f}", f"{s['model_time'][0]:.2f}",
               _pm(*s["upward_divergence"][:2], spec=".3g"),
               _pm(*s["downward_divergence"][:2], spec=".3g"),
               _pm(*s["quant_error_max"][:2], spec=".3g")]
        lines.append("| " + " | ".join(row) + " |")
    checks = evaluate_checks(path)
    if checks:
        lines += ["", "| claim | verdict | values |", "|---|---|---|"]
        for c in checks:
            lines.append(f"| {c.claim} | {'holds' if c.passed else 'FAILS'} | {c.detail} |")
    if figures:
        lines += ["", "Figures: " + ", ".join(f"[{p.name}]({p.name})" for p in figures)]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# Command line


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: ``run`` (under mpiexec) or ``plot`` (serial); returns the exit code."""
    parser = argparse.ArgumentParser(prog="python -m hflmpi.experiments",
                                     description="Run experiment sweeps and plot their results.")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="train every variant and seed in one MPI job")
    run.add_argument("spec", help="experiments/NAME.toml")
    run.add_argument("--out", required=True, help="results HDF5 (run files go to OUT.runs/)")
    run.add_argument("--small", action="store_true", help="the spec's small (CI) version")
    run.add_argument("--reuse", action="store_true", help="skip runs whose run file is complete")
    run.add_argument("--only", default="", help="comma-separated variant names to train")
    run.add_argument("--base", metavar="CONFIG.toml", help="run config merged into the spec's "
                     "base, e.g. jobs/experiments.toml (MNIST/CIFAR-10 files, model, device)")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a base config key, e.g. --set optim.lr=0.05 (repeatable)")
    plot = sub.add_parser("plot", help="draw PNGs and write the markdown table (serial)")
    plot.add_argument("results", nargs="+", help="results HDF5 file(s)")
    plot.add_argument("--out", required=True, help="directory for PNGs and NAME.md")
    plot.add_argument("--no-png", action="store_true", help="write the markdown table only")
    args = parser.parse_args(argv)

    if args.command == "plot":
        try:
            Path(args.out).mkdir(parents=True, exist_ok=True)
            for results in args.results:
                figures = [] if args.no_png else plot_results(results, args.out)
                name = load_results(results)[0]["experiment"]
                md = Path(args.out) / f"{name}.md"
                md.write_text(results_markdown(results, figures), encoding="utf-8")
                for p in [*figures, md]:
                    print(f"wrote {p} ({p.stat().st_size // 1024} KiB)")
        except (ExperimentError, OSError, KeyError) as exc:
            print(f"hflmpi experiments: error: {exc}", file=sys.stderr)
            return 1
        return 0

    from mpi4py import MPI

    from hflmpi.federation import SetupError

    comm = MPI.COMM_WORLD
    try:
        from hflmpi.federation import limit_threads

        limit_threads(comm)
        run_experiment(args.spec, args.out, comm, small=args.small, reuse=args.reuse,
                       only=[s for s in args.only.split(",") if s] or None,
                       base_file=args.base, overrides=args.overrides)
    except (ExperimentError, ConfigError, TopologyError, SetupError) as exc:
        if comm.Get_rank() == 0:
            print(f"hflmpi experiments: error: {exc}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    code = main()
    _MPI = sys.modules.get("mpi4py.MPI")
    if code == 2 and _MPI is not None and _MPI.Is_initialized() and not _MPI.Is_finalized():
        _MPI.Finalize()  # every rank failed the same way: exit cleanly instead of MPI_Abort
    sys.exit(code)
