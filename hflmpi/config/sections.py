"""The frozen section dataclasses, one per TOML table (``[run]``, ``[topology]``, ...).

Every field declares its check and an example value (:func:`hflmpi.config.checks._opt`);
:class:`_Section` runs the checks on construction, then the section's cross-field rules.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

from hflmpi.config.checks import (
    BUILTIN_MODELS,
    MAX_LR,
    MAX_ROUNDS,
    MAX_STEPS_PER_ROUND,
    ConfigError,
    _bool,
    _bool_list,
    _choice,
    _choice_list,
    _data_name,
    _float,
    _fmt,
    _groups,
    _import_path_list,
    _int,
    _int_list,
    _model_name,
    _nonempty_str,
    _opt,
    _optional,
    _Section,
    _str,
    _table,
)
from hflmpi.config.clients import ClientsConfig
from hflmpi.config.clock import ClockConfig
from hflmpi.config.strategy import ServerOptConfig

__all__ = [
    "RunOptions",
    "TopologyConfig",
    "ScheduleConfig",
    "AggregationConfig",
    "QuantizeConfig",
    "DataConfig",
    "ModelConfig",
    "OptimConfig",
    "PrivacyConfig",
]


@dataclass(frozen=True)
class RunOptions(_Section):
    """The ``[run]`` section.

    Attributes
    ----------
    seed : int
        Root of every random stream (see :mod:`hflmpi.core.rng`). Default 0.
    rounds : int
        Global rounds, 1 to 10**7; one global round is ``prod(schedule.tau)`` SGD steps per
        device. Default 20.
    out : str
        HDF5 run file (metrics, resolved config, checkpoints). Default ``"runs/run.h5"``.
    device : {"cpu", "cuda", "auto"}
        Where tensors live; ``"auto"`` picks CUDA when available. Default ``"cpu"``.
    checkpoint_every : int
        Checkpoint every this many global rounds; 0 disables periodic checkpoints. Default 1.
    eval_every : int
        Evaluate the global model every this many global rounds; 0 disables periodic evaluation.
        Default 1.
    progress : {"auto", "bar", "lines", "on", "off"}
        Progress output on rank 0: ``"bar"`` rewrites one line in place, ``"lines"`` prints a
        line every few rounds, ``"off"`` prints nothing. ``"auto"`` (default) picks "bar" on an
        interactive terminal (not a Slurm batch job, not an Open MPI launch), "off" under CI,
        else "lines"; ``"on"`` is "auto" that never goes silent under CI.
        See :mod:`hflmpi.record.progress`.
    dtype : {"float32", "float64"}
        Parameter and aggregation dtype. Default ``"float32"``.
    divergence : bool
        Measure H-SGD's upward/downward divergences at every evaluation (two extra
        full-model allreduces per evaluated round). Default true. Must be false with a secure
        or private layer: the allreduces carry the raw device models.
    nonfinite : {"raise", "drop"}
        A device whose model holds NaN/Inf before an aggregation stops the job on every rank
        with its rank named (default), or is left out of that aggregation and logged.
    name : str
        Label of the run in ``hflmpi report`` tables and plot legends; empty (default): the run
        file's stem. May change on resume.
    watchdog_seconds : float
        Abort the job if one collective (aggregation, divergence measurement, metrics,
        preemption poll, checkpoint) waits longer than this, naming the collective and the rank
        that did not arrive (see :class:`hflmpi.mpi.guard.Watchdog`); 0 (default) disables it.
    callbacks : list of str
        Import paths ``"package.module:name"`` of callables returning a callback object
        (:mod:`hflmpi.callbacks`), built on every rank. Default ``[]``.
    """

    section: ClassVar[str] = "run"
    seed: int = _opt(0, _int(0, 2**63 - 1), "0")
    rounds: int = _opt(20, _int(1, MAX_ROUNDS), "20")
    out: str = _opt("runs/run.h5", _nonempty_str, '"runs/run.h5"')
    device: str = _opt("cpu", _choice("cpu", "cuda", "auto"), '"cpu"')
    checkpoint_every: int = _opt(1, _int(0), "1")
    eval_every: int = _opt(1, _int(0), "1")
    progress: str = _opt("auto", _choice("auto", "bar", "lines", "on", "off"), '"auto"')
    dtype: str = _opt("float32", _choice("float32", "float64"), '"float32"')
    divergence: bool = _opt(True, _bool, "true")
    nonfinite: str = _opt("raise", _choice("raise", "drop"), '"raise"')
    watchdog_seconds: float = _opt(0.0, _float(0.0), "600")
    callbacks: tuple[str, ...] = _opt((), _import_path_list, '["mypkg.hooks:Logger"]')
    name: str = _opt("", _str, '"fedavg-8bit"')


@dataclass(frozen=True)
class TopologyConfig(_Section):
    """The ``[topology]`` section: the aggregation tree; give at most one of its three forms.

    Attributes
    ----------
    fanouts : tuple of int or None
        Fan-out per layer, bottom up: ``[4, 2]`` is 8 devices in 2 edge groups under 1 root
        (depth = number of entries). The product must equal the world size.
    groups : nested tuple of int or None
        Explicit groups, leaves are ranks, all at the same depth; uneven sizes are allowed:
        ``[[0, 1, 2], [3, 4, 5, 6, 7]]`` is depth 2, a flat ``[0, 1, 2, 3]`` is depth 1.
    nodes : bool
        One layer-1 group per physical node (host), found at run time. Default false.
    node_fanouts : tuple of int
        With ``nodes``: fan-outs of the layers above the node layer, the last one the root's; the
        product must equal the node count. Empty: a single root above all nodes (depth 2, or depth 1
        when the job runs on one node, so the depth is only known at run time).

    With none of the forms given the tree is flat: every rank under the root (depth 1, FedAvg).
    """

    section: ClassVar[str] = "topology"
    fanouts: tuple[int, ...] | None = _opt(None, _optional(_int_list(1)), "[4, 2]")
    groups: tuple[Any, ...] | None = _opt(None, _optional(_groups), "[[0, 1, 2], [3, 4, 5, 6, 7]]")
    nodes: bool = _opt(False, _bool, "true")
    node_fanouts: tuple[int, ...] = _opt((), _int_list(1, allow_empty=True), "[2]")

    def _cross_check(self) -> None:
        given = [name for name, on in (("fanouts", self.fanouts is not None),
                                       ("groups", self.groups is not None),
                                       ("nodes", self.nodes)) if on]
        if len(given) > 1:
            raise ConfigError(
                f"topology sets {' and '.join('topology.' + g for g in given)}, but the tree is "
                "given by exactly one of fanouts, groups or nodes; keep one and delete the others"
            )
        if self.node_fanouts and not self.nodes:
            raise self._error("node_fanouts", "only applies with topology.nodes=true",
                              "set topology.nodes=true or delete node_fanouts")

    @property
    def kind(self) -> str:
        """Return the form of the tree: ``"fanouts"``, ``"groups"``, ``"nodes"`` or ``"flat"``."""
        if self.fanouts is not None:
            return "fanouts"
        if self.groups is not None:
            return "groups"
        return "nodes" if self.nodes else "flat"

    @property
    def depth(self) -> int | None:
        """Return the number of aggregation layers, or None when only the run can tell (nodes)."""
        if self.fanouts is not None:
            return len(self.fanouts)
        if self.groups is not None:
            depth, node = 0, self.groups
            while isinstance(node, tuple):
                depth, node = depth + 1, node[0]
            return depth
        if self.nodes:
            return 1 + len(self.node_fanouts) if self.node_fanouts else None
        return 1

    def describe_depth(self) -> str:
        """Return where the depth comes from, for error messages."""
        kind = self.kind
        if kind == "fanouts":
            return f"topology.fanouts={_fmt(self.fanouts)}"
        if kind == "groups":
            return f"topology.groups nests {self.depth} levels"
        if kind == "nodes":
            return f"the node layer plus topology.node_fanouts={_fmt(self.node_fanouts)}"
        return "no [topology] given: one layer, every rank under the root"


@dataclass(frozen=True)
class ScheduleConfig(_Section):
    """The ``[schedule]`` section.

    Attributes
    ----------
    tau : tuple of int
        One entry per layer: ``tau[0]`` local SGD steps per layer-1 aggregation, ``tau[n]``
        layer-n aggregations per layer-(n+1) aggregation. Default ``(5,)``. ``prod(tau)``, the
        local steps of one global round, is at most 10**8 (:data:`MAX_STEPS_PER_ROUND`).
    """

    section: ClassVar[str] = "schedule"
    tau: tuple[int, ...] = _opt((5,), _int_list(1), "[5, 2]")

    def _cross_check(self) -> None:
        steps = math.prod(self.tau)
        if steps > MAX_STEPS_PER_ROUND:
            raise self._error(
                "tau", f"makes prod(tau) = {steps} local steps per global round, more than "
                f"{MAX_STEPS_PER_ROUND} (a round is the unit of checkpoints and metrics)",
                "use smaller tau entries and more run.rounds",
            )

    @property
    def steps_per_round(self) -> int:
        """Return ``prod(tau)``: local SGD steps per device in one global round."""
        return math.prod(self.tau)


@dataclass(frozen=True)
class AggregationConfig(_Section):
    """The ``[aggregation]`` section.

    Attributes
    ----------
    weighting : {"samples", "uniform"}
        Child weight in ``x + sum_c a_c Q(x_c - x)``: samples held in the child's subtree
        (FedAvg-style) or its device count (the paper's form). Default ``"samples"``.
    algorithm : {"subtree", "tree"}
        How full-precision layers are summed: one allreduce over the subtree (fastest, same
        result) or the literal reduce-up/broadcast-down tree. Default ``"subtree"``.
    robust : list of str
        Per layer, ``"mean"`` (the weighted mean of QMLHFL) or a Byzantine-robust rule that
        gathers every child's update at the leader: ``"median"`` (coordinate-wise),
        ``"trimmed_mean"``, ``"krum"``, or a plug-in rule by import path
        ``"package.module:Name"`` (docs/strategies.md; imported when the run sets up). Empty
        (default) means mean everywhere. Robust layers
        must not be quantized (``quantize.bits`` 0 there). A robust layer never trusts the
        weight a child claims: it is clamped to the child's true weight (partition sizes, which
        every rank computes from the seed). A rule that tolerates no Byzantine child at some
        group of its layer (e.g. ``trim`` below ``1/k``) is an error.
    trim : float
        Fraction trimmed at each end by ``"trimmed_mean"``: ``floor(trim * k)`` of the ``k``
        children, which must be >= 1 in every group. Default 0.2 (groups of 5 or more).
    krum_f : int
        Byzantine children tolerated by ``"krum"`` (>= 1, with more than ``2 f + 2`` children).
        Default 1.
    secure : list of bool
        Per layer: pairwise-masked secure aggregation of the quantized levels (the leader learns
        only the group sum; see docs/security.md). Needs ``quantize.bits > 0`` there, groups of
        at least 3 participants, and ``run.divergence = false``.
    allow_small_secure_groups : bool
        Accept secure groups of 2 participants, whose leader learns its partner's update
        exactly. Default false (such groups are an error).
    """

    section: ClassVar[str] = "aggregation"
    weighting: str = _opt("samples", _choice("samples", "uniform"), '"samples"')
    algorithm: str = _opt("subtree", _choice("subtree", "tree"), '"subtree"')
    robust: tuple[str, ...] = _opt(
        (), _choice_list("mean", "median", "trimmed_mean", "krum", import_paths=True),
        '["mean", "median"]')
    trim: float = _opt(0.2, _float(0.0, 0.5, hi_open=True), "0.2")
    krum_f: int = _opt(1, _int(0), "1")
    secure: tuple[bool, ...] = _opt((), _bool_list, "[true, false]")
    allow_small_secure_groups: bool = _opt(False, _bool, "false")


@dataclass(frozen=True)
class PrivacyConfig(_Section):
    """The ``[privacy]`` section: client-level differential privacy at one layer.

    Attributes
    ----------
    layer : int
        Layer whose uplink is clipped and noised; 0 (default) turns privacy off.
    mode : {"central", "distributed"}
        The layer's leader adds the noise, or each child adds a ``1/sqrt(k)`` share.
    clip : float
        L2 bound on each child's update. Default 1.0.
    noise_multiplier : float
        Noise std over the sensitivity ``clip * max_c a_c``. Default 1.0.
    delta : float
        The delta of the reported (epsilon, delta). Default 1e-5.
    insecure_reproducible_noise : bool
        TESTS ONLY. Draw the noise from generators keyed by ``run.seed`` (stored in the run
        file) instead of the OS CSPRNG, so a DP run is reproducible bit for bit, and anyone with
        the run file can subtract the noise: no privacy at all. Every run that sets it warns on
        stderr and records it in the run file. Default false.
    """

    section: ClassVar[str] = "privacy"
    layer: int = _opt(0, _int(0), "1")
    mode: str = _opt("central", _choice("central", "distributed"), '"central"')
    clip: float = _opt(1.0, _float(0.0, lo_open=True), "1.0")
    noise_multiplier: float = _opt(1.0, _float(0.0, lo_open=True), "1.0")
    delta: float = _opt(1e-5, _float(0.0, 1.0, lo_open=True, hi_open=True), "1e-5")
    insecure_reproducible_noise: bool = _opt(False, _bool, "false")


@dataclass(frozen=True)
class QuantizeConfig(_Section):
    """The ``[quantize]`` section.

    Attributes
    ----------
    bits : tuple of int
        Bits per entry of the uplink difference at each layer (``bits[n-1]`` for layer n);
        0 means no quantization, otherwise 1..16. Empty (the default) means 0 at every layer and is
        resolved to one 0 per layer in :class:`RunConfig` when the depth is known.
    bucket_size : int
        Entries sharing one scale; 0 (the default) picks per layer the smallest power of two
        that keeps the scales under ~1% of the payload: 512 at 8 bits, 1024 at 4, 2048 at 2
        (:func:`hflmpi.core.wire.auto_bucket_size`).
    method : {"auto", "sum", "gather", "lanes"}
        How quantized levels travel up: integer ``Reduce``, ``Gather`` of packed bytes, or
        ``Reduce`` of 64-bit words holding lanes sized from the fan-in; ``"auto"`` picks the
        one that brings the leader fewer bytes. The result is the same bits either way.
    downlink : {"auto", "float32", "levels"}
        What a quantized layer's leader broadcasts down: the float32 model, or the level sum
        (in lanes) and the scales, from which every device rebuilds the same model bit for bit
        (one more model copy per device for each such layer above the ones it joins).
        ``"auto"`` (the default) and ``"levels"`` send levels on every quantized layer whose
        leader does not change the aggregate afterwards (no server optimizer, no privacy at that
        layer); ``"auto"`` only where that is smaller than the model. Same bits every way.
    """

    section: ClassVar[str] = "quantize"
    bits: tuple[int, ...] = _opt((), _int_list(0, hi=16, allow_empty=True), "[8, 4]")
    bucket_size: int = _opt(0, _int(0), "0")
    method: str = _opt("auto", _choice("auto", "sum", "gather", "lanes"), '"auto"')
    downlink: str = _opt("auto", _choice("auto", "float32", "levels"), '"auto"')

    def bits_for(self, depth: int) -> tuple[int, ...]:
        """Return one bit width per layer for a tree of ``depth`` layers (empty means all 0)."""
        return self.bits if self.bits else (0,) * depth


@dataclass(frozen=True)
class DataConfig(_Section):
    """The ``[data]`` section.

    Attributes
    ----------
    name : {"digits", "mnist", "fashion_mnist", "cifar10", "synthetic"} or import path
        ``digits`` ships inside scikit-learn; mnist/fashion_mnist/cifar10 are read from
        ``path``; nothing is ever downloaded. Default ``"digits"``. ``"package.module:function"``
        names your own loader returning ``(x_train, y_train, x_test, y_test)``
        (:mod:`hflmpi.learn.custom_data`).
    path : str
        Directory holding the local files (IDX files, or CIFAR-10 python batches).
    partition : {"iid", "dirichlet", "shards", "label_sorted"}
        How training samples are split over devices. Default ``"iid"``.
    alpha : float
        Dirichlet concentration (> 0; small is skewed). Default 0.5.
    shards_per_client : int
        Label-sorted shards dealt to each client. Default 2.
    test_fraction : float
        Held-out fraction for datasets without a test split (digits, synthetic). Default 0.2.
    synthetic_samples, synthetic_features, synthetic_classes : int
        Size of the synthetic task. Defaults 20000, 784, 10.
    normalize : bool
        Standardise features with training-set mean and std (per channel for images).
        Default true.
    """

    section: ClassVar[str] = "data"
    name: str = _opt("digits", _data_name, '"digits"')
    path: str = _opt("", _str, '"/data/mnist"')
    partition: str = _opt("iid", _choice("iid", "dirichlet", "shards", "label_sorted"), '"iid"')
    alpha: float = _opt(0.5, _float(0.0, lo_open=True), "0.5")
    shards_per_client: int = _opt(2, _int(1), "2")
    test_fraction: float = _opt(0.2, _float(0.0, 1.0, lo_open=True, hi_open=True), "0.2")
    synthetic_samples: int = _opt(20000, _int(2), "20000")
    synthetic_features: int = _opt(784, _int(1), "784")
    synthetic_classes: int = _opt(10, _int(2), "10")
    normalize: bool = _opt(True, _bool, "true")

    def _cross_check(self) -> None:
        if self.name in ("mnist", "fashion_mnist", "cifar10") and not self.path.strip():
            expected = ("the CIFAR-10 python batches (data_batch_1..5, test_batch)"
                        if self.name == "cifar10"
                        else "train-images-idx3-ubyte.gz and the other three IDX files")
            raise self._error(
                "path", f"is empty, but data.name={_fmt(self.name)} reads local files",
                f"set data.path to the directory holding {expected} (nothing is downloaded)",
            )


@dataclass(frozen=True)
class ModelConfig(_Section):
    """The ``[model]`` section.

    Attributes
    ----------
    name : str
        ``"mlp"``, ``"logreg"``, ``"cnn"`` or an import path ``"package.module:ClassName"`` of an
        ``nn.Module`` built as ``ClassName(**kwargs)``. Default ``"mlp"``.
    hidden : tuple of int
        Hidden layer widths of the MLP, and of the CNN's fully connected head. Default ``(128,)``.
    kwargs : dict
        Keyword arguments for an import-path model (only). Default ``{}``.
    """

    section: ClassVar[str] = "model"
    name: str = _opt("mlp", _model_name, '"mlp"')
    hidden: tuple[int, ...] = _opt((128,), _int_list(1, allow_empty=True), "[128]")
    kwargs: dict[str, Any] = _opt(dict, _table, "{width = 64}", factory=True)

    def _cross_check(self) -> None:
        if self.kwargs and self.name in BUILTIN_MODELS:
            raise self._error(
                "kwargs", f"is only for import-path models, not model.name={_fmt(self.name)}",
                "delete model.kwargs, or name a class as model.name=\"package.module:ClassName\"",
            )


@dataclass(frozen=True)
class OptimConfig(_Section):
    """The ``[optim]`` section: the local solver on every device.

    Attributes
    ----------
    solver : {"sgd", "fedprox"}
        Plain SGD, or SGD on the FedProx objective ``f(w) + mu/2 ||w - w_anchor||^2`` with
        ``w_anchor`` the model received at the last aggregation. Default ``"sgd"``.
    lr : float
        Learning rate at round 0, finite, in (0, 1000] (:data:`MAX_LR`). Default 0.05.
    momentum : float
        Heavy-ball momentum in [0, 1). Default 0.0.
    weight_decay : float
        L2 coefficient added to the gradient. Default 0.0.
    mu : float
        FedProx proximal coefficient; must be > 0 with ``fedprox`` and 0 with ``sgd``.
    batch_size : int
        Minibatch size. Default 32.
    lr_schedule : {"constant", "cosine", "step"}
        Learning-rate schedule over global rounds (see :func:`hflmpi.learn.local.lr_at`).
    lr_step_rounds : int
        ``step`` schedule: multiply by ``lr_gamma`` every this many rounds. Default 10.
    lr_gamma : float
        ``step`` schedule factor in (0, 1]. Default 0.5.
    momentum_reset : {"aggregation", "never"}
        By default the momentum buffer is reset to zero whenever the device's model is replaced
        by an aggregate (at any layer); ``"never"`` keeps it across aggregations.
    """

    section: ClassVar[str] = "optim"
    solver: str = _opt("sgd", _choice("sgd", "fedprox"), '"sgd"')
    lr: float = _opt(0.05, _float(0.0, MAX_LR, lo_open=True,
                                  why="a larger SGD step only diverges; published rates stay "
                                      "below ~50"), "0.05")
    momentum: float = _opt(0.0, _float(0.0, 1.0, hi_open=True), "0.9")
    weight_decay: float = _opt(0.0, _float(0.0), "0.0001")
    mu: float = _opt(0.0, _float(0.0), "0.01")
    batch_size: int = _opt(32, _int(1), "32")
    lr_schedule: str = _opt("constant", _choice("constant", "cosine", "step"), '"constant"')
    lr_step_rounds: int = _opt(10, _int(1), "10")
    lr_gamma: float = _opt(0.5, _float(0.0, 1.0, lo_open=True), "0.5")
    momentum_reset: str = _opt("aggregation", _choice("aggregation", "never"), '"aggregation"')

    def _cross_check(self) -> None:
        if self.solver == "sgd" and self.mu != 0.0:
            raise self._error("mu", 'has no effect with optim.solver="sgd"',
                              'set optim.solver="fedprox" or delete optim.mu')
        if self.solver == "fedprox" and self.mu == 0.0:
            raise self._error("mu", 'makes optim.solver="fedprox" plain SGD; FedProx needs mu > 0',
                              'e.g. optim.mu=0.01, or use optim.solver="sgd"')


_SECTIONS: dict[str, type[_Section]] = {
    "run": RunOptions,
    "topology": TopologyConfig,
    "schedule": ScheduleConfig,
    "aggregation": AggregationConfig,
    "quantize": QuantizeConfig,
    "data": DataConfig,
    "model": ModelConfig,
    "optim": OptimConfig,
    "privacy": PrivacyConfig,
    "server_opt": ServerOptConfig,
    "clients": ClientsConfig,
    "clock": ClockConfig,
}
"""The sections of a run config, in TOML order: table name to dataclass."""
