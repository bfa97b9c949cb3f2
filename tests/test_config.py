"""Serial tests of the run config: defaults, TOML loading, --set overrides, error messages."""

from __future__ import annotations

import dataclasses
import re

import pytest

from hflmpi.config import (
    ConfigError,
    ModelConfig,
    OptimConfig,
    RunConfig,
    ScheduleConfig,
    TopologyConfig,
    apply_overrides,
    config_from_dict,
    config_to_dict,
    load_config,
    parse_override,
    to_toml_string,
)


def _write(tmp_path, text):
    path = tmp_path / "run.toml"
    path.write_text(text)
    return path


def _error(overrides, path=None):
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    return str(info.value)


def test_defaults_are_a_valid_flat_fedavg_run():
    cfg = load_config(None)
    assert cfg == RunConfig()
    assert cfg.topology.kind == "flat" and cfg.depth == 1
    assert cfg.schedule.tau == (5,) and cfg.steps_per_round == 5
    assert cfg.quantize.bits == (0,)
    assert cfg.run.out == "runs/run.h5" and cfg.optim.lr == 0.05 and cfg.model.hidden == (128,)


def test_load_file_two_layers(tmp_path):
    path = _write(tmp_path, """
[run]
seed = 7
rounds = 3
[topology]
fanouts = [4, 2]
[schedule]
tau = [5, 2]
[quantize]
bits = [8, 0]
[optim]
lr = 1
solver = "fedprox"
mu = 0.01
""")
    cfg = load_config(path)
    assert cfg.run.seed == 7 and cfg.topology.fanouts == (4, 2) and cfg.depth == 2
    assert cfg.steps_per_round == 10 and cfg.quantize.bits == (8, 0)
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)
    assert cfg.quantize.bits_for(2) == (8, 0)


def test_round_trip_through_toml_and_dict(tmp_path):
    cfg = load_config(None, [
        "topology.groups=[[[0, 1], [2]], [[3, 4, 5]]]", "schedule.tau=[4, 3, 2]",
        'model.name="torch.nn:Linear"', "model.kwargs={in_features = 64, out_features = 10}",
        "data.name=synthetic", "optim.lr=1e-3", "optim.momentum=0.9",
    ])
    assert cfg.topology.depth == 3
    assert config_from_dict(config_to_dict(cfg)) == cfg
    assert load_config(_write(tmp_path, to_toml_string(cfg))) == cfg
    plain = config_to_dict(cfg)
    assert plain["topology"]["groups"] == [[[0, 1], [2]], [[3, 4, 5]]]
    assert "fanouts" not in plain["topology"]  # unset keys are left out


def test_tau_length_mismatch_message():
    msg = _error(["topology.fanouts=[4,2]", "schedule.tau=[5]"])
    assert msg.startswith("schedule.tau=[5] has 1 entry but the tree has 2 layers")
    assert msg.endswith("give one tau per layer, e.g. tau=[5, 2]")
    msg = _error(["topology.groups=[[[0], [1]], [[2, 3]]]", "schedule.tau=[5, 2]"])
    assert "tree has 3 layers (topology.groups nests 3 levels)" in msg and "tau=[5, 2, 2]" in msg
    msg = _error(["schedule.tau=[5, 2, 1]"])
    assert "no [topology] given" in msg and "e.g. tau=[5]" in msg


def test_nodes_depth_known_only_with_node_fanouts():
    cfg = load_config(None, ["topology.nodes=true", "schedule.tau=[5, 2]"])
    assert cfg.depth is None and cfg.quantize.bits == ()
    cfg = load_config(None, ["topology.nodes=true", "topology.node_fanouts=[2]",
                             "schedule.tau=[5, 2]"])
    assert cfg.depth == 2 and cfg.quantize.bits == (0, 0)
    msg = _error(["topology.nodes=true", "topology.node_fanouts=[2, 2]", "schedule.tau=[5, 2]"])
    assert "has 2 entries but the tree has 3 layers" in msg


def test_quantize_bits_length_and_range():
    msg = _error(["quantize.bits=[8, 4]"])
    assert msg.startswith("quantize.bits=[8, 4] has 2 entries but the tree has 1 layer")
    msg = _error(["topology.fanouts=[2,2]", "schedule.tau=[1,1]", "quantize.bits=[8, 17]"])
    assert "quantize.bits=[8, 17] has entry [1] = 17" in msg and "<= 16" in msg


def test_unknown_key_and_section_suggest_fixes(tmp_path):
    msg = _error(["optim.lrr=0.1"])
    assert msg.startswith("unknown key optim.lrr; did you mean optim.lr?")
    assert "optim.momentum_reset" in msg
    msg = _error([], _write(tmp_path, "[optimizer]\nlr = 0.1\n"))
    assert "unknown section [optimizer]; did you mean [optim]?" in msg
    msg = _error([], _write(tmp_path, "seed = 3\n"))
    assert "seed=3 is a top-level key" in msg and "[run]" in msg
    msg = _error([], _write(tmp_path, "run = 3\n"))
    assert msg.startswith("run=3 must be a table [run]")


@pytest.mark.parametrize("override, expected", [
    ('optim.lr="abc"', 'optim.lr="abc" is a string but must be a number > 0 and <= 1000; e.g. optim.lr=0.05'),
    ("optim.lr=-0.1", "optim.lr=-0.1 must be a number > 0 and <= 1000; e.g. optim.lr=0.05"),
    ("run.rounds=true",
     "run.rounds=true is a boolean but must be an integer >= 1 and <= 10000000; "
     "e.g. run.rounds=20"),
    ("run.rounds=2.5", "run.rounds=2.5 is a float but must be an integer >= 1"),
    ("optim.momentum=1.0", "optim.momentum=1.0 must be a number >= 0 and < 1"),
    ("data.test_fraction=0", "data.test_fraction=0 must be a number > 0 and < 1"),
    ("schedule.tau=5", "schedule.tau=5 is an integer but must be a list of integers >= 1"),
    ("schedule.tau=[]", "schedule.tau=[] is empty but must be a non-empty list"),
    ("schedule.tau=[5, 0]",
     "schedule.tau=[5, 0] has entry [1] = 0; every entry must be an integer >= 1"),
    ('schedule.tau=[5, "2"]', 'has entry [1] = "2", a string'),
    ("data.normalize=1", "data.normalize=1 is an integer but must be a boolean (true or false)"),
    ("model.kwargs=3", "model.kwargs=3 is an integer but must be a table"),
])
def test_wrong_types_and_ranges(override, expected):
    assert expected in _error([override])


def test_bad_enum_lists_choices_and_close_match():
    msg = _error(["data.name=mnst"])
    assert msg == ('data.name="mnst" must be one of "digits", "mnist", "fashion_mnist", "cifar10", '
                   '"synthetic" or an import path "package.module:function"; did you mean "mnist"?')
    msg = _error(["run.device=gpu"])
    assert 'run.device="gpu" must be one of "cpu", "cuda", "auto"' in msg
    msg = _error(["model.name=resnet-ish"])
    assert 'model.name="resnet-ish" must be one of "mlp", "logreg", "cnn" or an import path' in msg


def test_topology_forms_are_exclusive_and_groups_checked():
    msg = _error(["topology.fanouts=[4,2]", "topology.groups=[[0,1]]"])
    assert "topology.fanouts and topology.groups" in msg and "keep one" in msg
    assert "only applies with topology.nodes=true" in _error(["topology.node_fanouts=[2]"])
    assert "wrap a lone rank" in _error(["topology.groups=[[0, 1], 2]", "schedule.tau=[1, 1]"])
    assert "lists rank 1 twice" in _error(["topology.groups=[[0, 1], [1, 2]]"])
    assert "empty group at [1]" in _error(["topology.groups=[[0, 1], []]"])
    assert "rank -1" in _error(["topology.groups=[[0, -1]]"])
    assert "topology.fanouts=[4, 0] has entry [1] = 0" in _error(["topology.fanouts=[4, 0]"])


def test_cross_field_rules():
    assert 'optim.mu=0.1 has no effect with optim.solver="sgd"' in _error(["optim.mu=0.1"])
    assert "FedProx needs mu > 0" in _error(["optim.solver=fedprox"])
    msg = _error(["data.name=cifar10"])
    assert msg.startswith('data.path="" is empty, but data.name="cifar10" reads local files')
    assert "data_batch_1..5" in msg
    msg = _error(["model.kwargs={width = 3}"])
    assert 'is only for import-path models, not model.name="mlp"' in msg


SECURE = ["topology.fanouts=[3, 2]", "schedule.tau=[2, 2]", "quantize.bits=[8, 8]",
          "aggregation.secure=[true, false]"]


def test_secure_and_private_layers_refuse_side_channels():
    # the divergence metric allreduces raw device models (on by default)
    msg = _error(SECURE)
    assert msg.startswith("run.divergence=true with aggregation.secure[0]=true: ")
    assert "set run.divergence=false" in msg
    msg = _error(["privacy.layer=1"])
    assert msg.startswith("run.divergence=true with privacy.layer=1: ") and "un-noised" in msg
    assert load_config(None, [*SECURE, "run.divergence=false"]).aggregation.secure == (True, False)
    assert load_config(None, ["privacy.layer=1", "run.divergence=false"]).privacy.layer == 1
    # per-device momentum buffers gathered into every checkpoint
    never = ["run.divergence=false", "optim.momentum=0.9", 'optim.momentum_reset="never"']
    msg = _error([*SECURE, *never])
    assert msg.startswith('optim.momentum_reset="never" with aggregation.secure[0]=true: ')
    assert 'use optim.momentum_reset="aggregation" or optim.momentum=0' in msg
    assert "momentum_reset" in _error(["privacy.layer=1", *never])
    load_config(None, [*SECURE, *never[:2]])  # reset at every aggregation: nothing per device


def test_secure_groups_of_two_need_an_acknowledgement():
    cfg = load_config(None, ["topology.fanouts=[3, 3]", "schedule.tau=[2, 2]",
                             "quantize.bits=[8, 8]", "aggregation.secure=[true, true]",
                             "run.divergence=false"])
    cfg.check_layer_options(2, [[3, 3, 3], [3]])
    cfg.check_layer_options(2, [[3, 1], [1]])  # a group of one has nobody to hide
    with pytest.raises(ConfigError) as info:
        cfg.check_layer_options(2, [[2, 2, 2], [3]])
    assert str(info.value).startswith(
        "aggregation.secure[0]=true with a layer-1 group of 2 participants: ")
    assert "set aggregation.allow_small_secure_groups=true" in str(info.value)
    with pytest.raises(ConfigError, match=r"secure\[1\]=true with a layer-2 group of 2"):
        cfg.check_layer_options(2, [[3, 3], [2]])
    allowed = dataclasses.replace(
        cfg, aggregation=dataclasses.replace(cfg.aggregation, allow_small_secure_groups=True))
    allowed.check_layer_options(2, [[2, 2, 2], [3]])


def test_robust_rules_must_tolerate_an_attacker_at_every_fan_in():
    cfg = load_config(None, ["topology.fanouts=[4, 2]", "schedule.tau=[2, 2]",
                             'aggregation.robust=["trimmed_mean", "mean"]'])
    assert cfg.aggregation.trim == 0.2
    with pytest.raises(ConfigError) as info:
        cfg.check_layer_options(2, [[4, 4], [2]])
    assert str(info.value) == (
        'aggregation.trim=0.2 trims floor(0.2 * 4) = 0 of the 4 children of a layer-1 group, so '
        'aggregation.robust[0]="trimmed_mean" would tolerate no Byzantine child and silently '
        "average them all; set aggregation.trim >= 1/4 (e.g. aggregation.trim=0.25)")
    cfg.check_layer_options(2, [[5, 5], [2]])  # floor(0.2 * 5) = 1
    quarter = dataclasses.replace(cfg, aggregation=dataclasses.replace(cfg.aggregation, trim=0.25))
    quarter.check_layer_options(2, [[4, 4], [2]])
    with pytest.raises(ConfigError, match="use groups of at least 3 children"):
        quarter.check_layer_options(2, [[2, 2, 2, 2], [4]])
    median = dataclasses.replace(
        cfg, aggregation=dataclasses.replace(cfg.aggregation, robust=("median", "mean")))
    with pytest.raises(ConfigError, match=r'robust\[0\]="median" with a layer-1 group of 2'):
        median.check_layer_options(2, [[2, 3], [2]])
    median.check_layer_options(2, [[3, 1], [2]])
    krum = dataclasses.replace(
        cfg, aggregation=dataclasses.replace(cfg.aggregation, robust=("krum", "mean")))
    with pytest.raises(ConfigError, match=r"aggregation.krum_f=1 with a layer-1 group of 4"):
        krum.check_layer_options(2, [[4, 5], [2]])
    krum.check_layer_options(2, [[5, 5], [2]])
    no_f = dataclasses.replace(krum, aggregation=dataclasses.replace(krum.aggregation, krum_f=0))
    with pytest.raises(ConfigError, match="krum_f=0"):
        no_f.check_layer_options(2, [[5, 5], [2]])


def test_privacy_options():
    cfg = load_config(None, ["privacy.layer=1", "run.divergence=false",
                             "privacy.insecure_reproducible_noise=true"])
    assert cfg.privacy.insecure_reproducible_noise is True
    assert "insecure_reproducible_noise = true" in to_toml_string(cfg)  # kept in the run file
    assert load_config(None).privacy.insecure_reproducible_noise is False
    msg = _error(["topology.fanouts=[4]", "privacy.layer=1", "run.divergence=false",
                  'aggregation.robust=["median"]'])
    assert msg.startswith('aggregation.robust[0]="median" at privacy.layer=1: ')


def test_parse_override_values():
    assert parse_override("schedule.tau=[5,2]") == (("schedule", "tau"), [5, 2])
    assert parse_override("optim.lr=0.05") == (("optim", "lr"), 0.05)
    assert parse_override("data.name=mnist") == (("data", "name"), "mnist")
    assert parse_override('data.name="mnist"') == (("data", "name"), "mnist")
    assert parse_override("data.path=/scratch/my data") == (("data", "path"), "/scratch/my data")
    assert parse_override("topology.nodes=true") == (("topology", "nodes"), True)
    assert parse_override("model.kwargs.width=64") == (("model", "kwargs", "width"), 64)
    for bad in ("optim", "optim.lr", "lr=3", "=3", "optim..lr=3", "optim.l r=3"):
        with pytest.raises(ConfigError, match=re.escape("is not section.key=value")):
            parse_override(bad)


def test_overrides_apply_in_order_over_the_file(tmp_path):
    path = _write(tmp_path, "[optim]\nlr = 0.5\n[model]\nname = \"torch.nn:Linear\"\n")
    cfg = load_config(path, ["optim.lr=0.2", "optim.lr=0.3", "run.out=2024",
                             "model.kwargs.in_features=4", "model.kwargs.out_features=2"])
    assert cfg.optim.lr == 0.3
    assert cfg.run.out == "2024"  # a string setting keeps the raw text
    assert cfg.model.kwargs == {"in_features": 4, "out_features": 2}
    data = {"optim": {"lr": 0.5}}
    assert apply_overrides(data, ["optim.lr=1"])["optim"]["lr"] == 1
    assert data == {"optim": {"lr": 0.5}}  # input left untouched
    msg = _error(["run.seed=1", "run.seed.x=2"])
    assert "run.seed=1 is not a table" in msg


def test_file_errors(tmp_path):
    assert "does not exist" in _error([], tmp_path / "missing.toml")
    msg = _error([], _write(tmp_path, "[run\nseed = 1\n"))
    assert "is not valid TOML" in msg and str(tmp_path) in msg


def test_sections_are_frozen_and_validate_on_construction():
    cfg = RunConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.optim.lr = 1.0  # type: ignore[misc]
    assert ScheduleConfig(tau=[5, 2]).tau == (5, 2)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"schedule\.tau=\[5, 0\]"):
        ScheduleConfig(tau=(5, 0))
    with pytest.raises(ConfigError, match="tree has 2 layers"):
        RunConfig(topology=TopologyConfig(fanouts=(2, 2)))
    assert OptimConfig(lr=1).lr == 1.0
    assert ModelConfig(name="pkg.sub:Net", kwargs={"a": [1, 2]}).kwargs == {"a": [1, 2]}


@pytest.mark.parametrize("override, expected", [
    ("optim.lr=inf", "optim.lr=inf must be a finite number > 0 and <= 1000 (a larger SGD step "
                     "only diverges"),
    ("optim.lr=nan", "optim.lr=nan must be a finite number > 0 and <= 1000; e.g. optim.lr=0.05"),
    ("optim.lr=1e30", "optim.lr=1e+30 must be a number > 0 and <= 1000 (a larger SGD step"),
    ("optim.lr=1001", "optim.lr=1001 must be a number > 0 and <= 1000"),
    ("optim.weight_decay=inf", "optim.weight_decay=inf must be a finite number >= 0"),
    ("optim.mu=-inf", "optim.mu=-inf must be a finite number >= 0"),
    ("data.alpha=inf", "data.alpha=inf must be a finite number > 0"),
])
def test_non_finite_and_absurd_floats_are_rejected(override, expected):
    assert expected in _error([override])


def test_lr_bound_is_inclusive():
    assert load_config(None, ["optim.lr=1000"]).optim.lr == 1000.0


def test_rounds_and_steps_per_round_are_bounded():
    """The global step counter rounds * prod(tau) must stay far inside int64 (and exact in
    float64), and one round must be a practical unit of checkpoints: both are capped."""
    msg = _error(["run.rounds=18446744073709551616"])
    assert msg.startswith("run.rounds=18446744073709551616 must be an integer >= 1 and <= 10000000")
    assert load_config(None, ["run.rounds=10000000"]).run.rounds == 10**7
    msg = _error(["topology.fanouts=[1, 1]", "schedule.tau=[1000000000000, 1]"])
    assert msg.startswith("schedule.tau=[1000000000000, 1] makes prod(tau) = 1000000000000 local "
                          "steps per global round, more than 100000000")
    assert "use smaller tau entries and more run.rounds" in msg
    msg = _error(["topology.fanouts=[1, 1]", "schedule.tau=[20000, 20000]"])
    assert "prod(tau) = 400000000" in msg
    ok = load_config(None, ["topology.fanouts=[1, 1]", "schedule.tau=[10000, 10000]"])
    assert ok.steps_per_round == 10**8
    assert ok.steps_per_round * 10**7 < 2**53  # the largest step count is exact in float64


def test_resume_config_rules():
    """hflmpi.record.resume: free keys pass, others need the flag, shape keys never change."""
    from hflmpi.record.resume import FREE_KEYS, check_config_change, config_changes

    stored = load_config(None, ["schedule.tau=[5]", "optim.lr=0.1"])
    given = load_config(None, ["schedule.tau=[5]", "optim.lr=0.1", "run.rounds=40",
                               "run.progress=off", "run.eval_every=2"])
    changes = check_config_change(stored, given, run_path="r.h5", allow_change=False,
                                  checkpoint_round=20)
    assert [str(c) for c in changes] == ["run.rounds: stored 20, given 40",
                                         "run.eval_every: stored 1, given 2",
                                         'run.progress: stored "auto", given "off"']
    assert all(c.key in FREE_KEYS for c in changes)
    lr = load_config(None, ["schedule.tau=[5]", "optim.lr=0.2"])
    with pytest.raises(ConfigError, match=r"optim\.lr: stored 0\.1, given 0\.2\. Only run\.rounds"):
        check_config_change(stored, lr, run_path="r.h5", allow_change=False, checkpoint_round=3)
    assert [c.key for c in check_config_change(stored, lr, run_path="r.h5", allow_change=True,
                                               checkpoint_round=3)] == ["optim.lr"]
    net = load_config(None, ['model.name="pkg.mod:Net"', "model.kwargs={width = 3}"])
    wider = load_config(None, ['model.name="pkg.mod:Net"', "model.kwargs={width = 4}"])
    assert [str(c) for c in config_changes(net, wider)] == [
        "model.kwargs: stored {width = 3}, given {width = 4}"]
    with pytest.raises(ConfigError, match="cannot change on resume, not even with"):
        check_config_change(net, wider, run_path="r.h5", allow_change=True, checkpoint_round=1)


def test_quantize_downlink_and_lanes_are_options():
    assert load_config(None, []).quantize.downlink == "auto"
    config = load_config(None, ['quantize.downlink="float32"', 'quantize.method="lanes"'])
    assert (config.quantize.downlink, config.quantize.method) == ("float32", "lanes")
    msg = _error(['quantize.downlink="int8"'])
    assert 'quantize.downlink="int8" must be one of "auto", "float32", "levels"' in msg
    # masked residues are summed whole, never in lanes
    msg = _error([*SECURE, "run.divergence=false", 'quantize.method="lanes"'])
    assert 'aggregation.secure needs quantize.method = "auto" or "sum"' in msg
