"""Train every (variant, seed) of an experiment in one MPI job and collect the curves (collective)."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from hflmpi import __version__
from hflmpi.config import ConfigError, RunConfig, config_from_dict
from hflmpi.core.topology import TopologyError, TreePlan, plan_fanouts, plan_groups
from hflmpi.experiments.spec import Experiment, ExperimentError, Variant, load_experiment, merge_sections
from hflmpi.record.checkpoint import checkpoint_paths

_CURVES = ("round", "step", "test_accuracy", "test_loss", "train_loss", "upward_divergence",
           "downward_divergence", "bytes_cum", "model_time", "wall_time", "sim_time")
_LAYER_CURVES = ("bytes_sent", "quant_error", "compute_seconds", "comm_seconds", "late")

__all__ = ["run_experiment"]

# ---------------------------------------------------------------------------------------------
# Tree, model size and the plan-generated variants (pure; every rank computes the same)


def _tree(config: RunConfig, world_size: int) -> TreePlan:
    """Return the variant's tree over ``world_size`` ranks, or over its clients (a population).

    With ``clients.count > 0`` the tree is a tree of clients; planning it also places the
    clients on the ranks and refuses a placement the ranks cannot hold.
    """
    topo = config.topology
    if topo.kind == "nodes":
        raise ExperimentError("topology.nodes is not supported in experiments (the tree must be "
                              "known up front); give topology.fanouts or topology.groups")
    if config.clients.population:
        from hflmpi.population import plan_clients

        return plan_clients(config, world_size).tree
    if topo.kind == "fanouts":
        return plan_fanouts(list(topo.fanouts or ()), world_size)
    if topo.kind == "groups":
        return plan_groups(topo.groups, world_size)
    return plan_fanouts([world_size], world_size)


def _describe_tree(config: RunConfig) -> str:
    """Describe the tree in a table cell; a population's groups by their shape (``8x8``)."""
    topo = config.topology
    count = config.clients.count
    if topo.kind == "fanouts":
        text = f"fanouts {list(topo.fanouts or ())}"
    elif topo.kind == "groups":
        text = ("groups " + _group_shape(topo.groups) if count
                else "groups " + json.dumps(topo.groups).replace(" ", ""))
    else:
        text = "flat"
    return f"{text}, {count} clients" if count else text


def _describe_clock(config: RunConfig) -> str:
    """Describe the per-layer clock modes in a table cell, ``deadline 0.4 s / sync``.

    A deadline layer that carries its late updates reads ``deadline 0.3 s, carry``.
    """
    if not config.clients.population:
        return ""
    depth = len(config.schedule.tau)
    modes = config.clock.modes_for(depth)
    deadlines = config.clock.deadlines_for(depth)
    late = config.clock.late_for(depth)
    return " / ".join((f"deadline {d:g} s" + (", carry" if p == "carry" else ""))
                      if m == "deadline" else m for m, d, p in zip(modes, deadlines, late))


def _group_shape(groups: Any) -> str:
    """Return the shape of nested groups: ``8x8`` for 8 groups of 8, ``[2,3]`` when uneven."""
    if all(isinstance(g, int) for g in groups):
        return str(len(groups))
    shapes = [_group_shape(g) for g in groups]
    if len(set(shapes)) == 1:
        return f"{len(groups)}x{shapes[0]}"
    return "[" + ",".join(shapes) + "]"


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
            name, label, merge_sections(exp.base, {"schedule": {"tau": list(tau)}}), rounds * period,
            x=float(i), eval_every_steps=max(1, rounds // evaluations) * period))
    return variants


# ---------------------------------------------------------------------------------------------
# Running (collective over comm)


def _run_file(out: Path, variant: str, seed: int) -> Path:
    return out.parent / f"{out.stem}.runs" / f"{variant}__seed{seed}.h5"


def _complete(path: Path, rounds: int) -> bool:
    from hflmpi.record.reading import read_metrics

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
    exp = spec if isinstance(spec, Experiment) else load_experiment(
        spec, small=small, base_file=base_file, overrides=overrides)
    out = Path(out)
    stream = stream or sys.stdout
    variants, numel = _variants(exp, comm, only)  # all ranks
    started = time.perf_counter()
    pairs = _train_pairs(exp, variants, out, comm, reuse=reuse, stream=stream)  # all ranks
    _share_results(exp, variants, out, numel, comm, stream=stream, pairs=pairs,
                   started=started)  # all ranks
    return out


def _variants(exp: Experiment, comm: Any, only: Sequence[str] | None) -> tuple[list[Variant], int]:
    """Return the variants to train and the model size, every tree checked (collective).

    Rank 0 builds the model once to learn its size (the ``[plan]`` variants need it) and shares
    it, or the error, with every rank; every rank then checks every variant's tree against the
    world size, so a bad spec fails before anything trains.
    """
    from hflmpi.mpi.messages import ERROR_TEXT_BYTES, bcast_int, bcast_text

    rank, size = comm.Get_rank(), comm.Get_size()
    variants = list(exp.variants)
    probe = variants[0].run_config(exp.seeds[0], "probe.h5", exp.eval_every_steps) if variants \
        else config_from_dict(merge_sections(exp.base, {"run": {"seed": exp.seeds[0]}}))
    probe_numel, probe_error = 0, None
    if rank == 0:  # load the data and build the model once to learn its size
        try:
            probe_numel = _model_numel(probe)
        except (OSError, ValueError, RuntimeError, ImportError) as exc:
            probe_error = f"{type(exc).__name__}: {exc}"
    probe_error = bcast_text(comm, probe_error, root=0, max_bytes=ERROR_TEXT_BYTES,
                             what="sharing rank 0's model probe")  # all ranks
    if probe_error is not None:
        raise ExperimentError(f"loading the data / building the model failed on rank 0: {probe_error}")
    numel = bcast_int(comm, probe_numel, root=0, low=1, what="sharing the model size")  # all ranks
    if exp.plan is not None:
        variants += _plan_variants(exp, numel)
    if only:
        variants = [v for v in variants if v.name in set(only)]
    # Validate every tree against the world size before training anything (all ranks).
    for v in variants:
        try:
            _tree(v.run_config(exp.seeds[0], "check.h5", exp.eval_every_steps), size)
        except (TopologyError, ConfigError) as exc:
            raise ExperimentError(f"variant {v.name!r}: {exc}") from None
    return variants, numel


def _train_pairs(
    exp: Experiment, variants: Sequence[Variant], out: Path, comm: Any, *, reuse: bool, stream: Any
) -> int:
    """Train every (variant, seed) pair into its run file, or reuse a complete one; return the count.

    Collective: rank 0 decides whether a run file is reused and tells the others.
    """
    from hflmpi.federation import train
    from hflmpi.mpi.messages import bcast_int

    rank = comm.Get_rank()
    pairs = [(v, s) for v in variants for s in exp.seeds]
    for i, (v, seed) in enumerate(pairs, start=1):
        path = _run_file(out, v.name, seed)
        config = v.run_config(seed, path, exp.eval_every_steps)
        skip = False
        if rank == 0:
            path.parent.mkdir(parents=True, exist_ok=True)
            skip = reuse and _complete(path, config.run.rounds)
            if not skip:
                _remove(path, *checkpoint_paths(path))
        skip = bool(bcast_int(comm, int(skip), root=0, low=0, high=1, what="sharing reuse"))
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
    return len(pairs)


def _share_results(
    exp: Experiment, variants: Sequence[Variant], out: Path, numel: int, comm: Any, *,
    stream: Any, pairs: int, started: float,
) -> None:
    """Write the results file on rank 0 and raise its error, if any, on every rank (collective).

    Rank 0 reports the ``pairs`` runs and the seconds since ``started`` (``time.perf_counter``).
    """
    from hflmpi.mpi.messages import ERROR_TEXT_BYTES, bcast_text

    error = None
    if comm.Get_rank() == 0:
        try:
            _write_results(exp, variants, out, numel, comm.Get_size())
        except (OSError, KeyError, ValueError) as exc:
            error = f"writing {out} failed: {type(exc).__name__}: {exc}"
        else:
            print(f"[{exp.name}] {pairs} runs in {time.perf_counter() - started:.0f} s; "
                  f"results in {out}", file=stream, flush=True)
    error = bcast_text(comm, error, root=0, max_bytes=ERROR_TEXT_BYTES,
                       what="sharing rank 0's result")  # all ranks
    if error is not None:
        raise ExperimentError(error)


def _write_results(exp: Experiment, variants: Sequence[Variant], out: Path, numel: int,
                   world_size: int) -> None:
    from hflmpi.record.h5sink import create_h5

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp.h5")
    try:
        with create_h5(tmp) as f:
            _fill_results(f, exp, variants, out, numel, world_size)
    except BaseException:
        tmp.unlink(missing_ok=True)  # never leave a half-written file behind
        raise
    os.replace(tmp, out)


def _fill_results(f: Any, exp: Experiment, variants: Sequence[Variant], out: Path, numel: int,
                  world_size: int) -> None:
    from hflmpi.config import to_toml_string
    from hflmpi.record.reading import read_metrics
    from hflmpi.record.run_config import read_run_config

    f.attrs.update(experiment=exp.name, title=exp.title, description=exp.description,
                   spec_toml=exp.text, small=exp.small, world_size=world_size,
                   hflmpi_version=__version__, last_steps=exp.last_steps, numel=numel,
                   timing=json.dumps(exp.timing.__dict__),
                   figures=json.dumps(list(exp.figures)), checks=json.dumps(list(exp.checks)),
                   order=json.dumps([v.name for v in variants]),
                   target_accuracy=exp.target_accuracy)
    for v in variants:
        config = v.run_config(exp.seeds[0], "x.h5", exp.eval_every_steps)
        depth = len(v.tau)
        bits = list(config.quantize.bits_for(depth))
        period_time = exp.timing.round_time(v.tau, numel, bits, config.quantize.bucket_size)
        g = f.create_group(f"runs/{v.name}")
        g.attrs.update(label=v.label, tau=json.dumps(v.tau), tree=_describe_tree(config),
                       bits=json.dumps(bits), x=v.x, steps=v.steps, round_time=period_time,
                       alpha=config.data.alpha, partition=config.data.partition,
                       clients=config.clients.count or world_size, reference=v.reference or "",
                       clock=_describe_clock(config))
        for seed in exp.seeds:
            path = _run_file(out, v.name, seed)
            m = read_metrics(path)
            rounds = m["round"].astype(np.int64)
            sg = g.create_group(f"seed_{seed}")
            stored = to_toml_string(read_run_config(path))  # validated on the way
            sg.attrs.update(config_toml=stored, run_file=str(path), seed=seed)
            curves = {
                "round": rounds, "step": rounds * v.period,
                "bytes_cum": np.cumsum(np.nansum(m["bytes_sent"], axis=1)),
                "model_time": rounds * period_time,
            }
            for key in _CURVES:  # sim_time and late: absent from run files of older versions
                sg.create_dataset(key, data=curves[key] if key in curves
                                  else m.get(key, np.full(len(rounds), np.nan)))
            for key in _LAYER_CURVES:
                sg.create_dataset(key, data=m.get(key, np.full((len(rounds), depth), np.nan)))
