"""``read_run_config``: the one reader of the config a run file stores (validated RunConfig)."""

from __future__ import annotations

import h5py
import pytest

import hflmpi
from hflmpi.config import ConfigError, config_from_dict
from hflmpi.errors import HflmpiError
from hflmpi.record.run_config import parse_stored_config, read_run_config
from hflmpi.record.store import RunRecord

META = {"world_size": 8, "tree": {"fanouts": [4, 2]}}
STORED = """\
[run]
seed = 7
rounds = 3

[topology]
fanouts = [4, 2]

[schedule]
tau = [3, 2]

[optim]
lr = 0.1
"""


def _run_file(tmp_path, text: str = STORED, name: str = "run.h5"):
    path = tmp_path / name
    RunRecord.create(path, text, META, layer_count=2).close()
    return path


def test_read_run_config_returns_the_validated_stored_config(tmp_path):
    path = _run_file(tmp_path)
    expected = config_from_dict({"run": {"seed": 7, "rounds": 3}, "topology": {"fanouts": [4, 2]},
                                 "schedule": {"tau": [3, 2]}, "optim": {"lr": 0.1}})
    config = read_run_config(path)
    assert config == expected
    assert config.quantize.bits == (0, 0)  # resolved per layer, as for a loaded config
    assert read_run_config(str(path)) == expected


def test_read_run_config_applies_overrides_in_order(tmp_path):
    path = _run_file(tmp_path)
    config = read_run_config(path, ["run.rounds=9", "optim.lr=0.05", "run.rounds=10"])
    assert config.run.rounds == 10 and config.optim.lr == 0.05 and config.run.seed == 7


def test_a_file_without_a_stored_config_is_a_clear_config_error(tmp_path):
    path = tmp_path / "checkpoint_like.h5"
    with h5py.File(path, "w") as f:
        f.attrs["round"] = 3
    with pytest.raises(ConfigError) as info:
        read_run_config(path)
    assert isinstance(info.value, HflmpiError)
    message = str(info.value)
    assert str(path) in message and "stores no config" in message and "run record" in message


def test_a_missing_file_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.h5 does not exist"):
        read_run_config(tmp_path / "nope.h5")


def test_a_stored_config_that_is_not_toml_names_the_file(tmp_path):
    path = _run_file(tmp_path, "[run\nseed = 1\n")
    with pytest.raises(ConfigError, match=r"run\.h5: the stored config is not valid TOML"):
        read_run_config(path)


def test_an_invalid_stored_config_names_the_file_and_the_key(tmp_path):
    path = _run_file(tmp_path, "[run]\nrounds = 0\n")
    with pytest.raises(ConfigError) as info:
        read_run_config(path)
    message = str(info.value)
    assert message.startswith(f"{path}: the stored config is not valid: run.rounds=0")


def test_an_invalid_override_says_the_overrides_made_it_invalid(tmp_path):
    path = _run_file(tmp_path)
    with pytest.raises(ConfigError, match=r"the stored config with the --set overrides is not "
                                          r"valid: schedule\.tau=\[5\] has 1 entry"):
        read_run_config(path, ["schedule.tau=[5]"])


def test_parse_stored_config_prefixes_the_source():
    with pytest.raises(ConfigError, match=r"^--resume r\.h5: the stored config is not valid TOML"):
        parse_stored_config("= 1", "--resume r.h5")
    assert parse_stored_config("[run]\nseed = 2\n", "x").run.seed == 2


def test_front_door_exports_read_run_config():
    assert hflmpi.read_run_config is read_run_config
