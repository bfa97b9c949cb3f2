"""Device profiles (:mod:`hflmpi.core.devices`): drawn from the seed, read from CSV and HDF5 files,
and the ``[clock]`` config that asks for them; bad input gives a clear error."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from hflmpi.config import ConfigError, config_from_dict
from hflmpi.core.devices import ProfileError, draw_profiles, read_profiles


def test_drawn_profiles_make_the_slow_fraction_slower_in_compute_and_link():
    p = draw_profiles(200, 7, step_seconds=0.01, uplink=1e6, latency=0.05, slow_fraction=0.15,
                      slow_factor=10.0)
    slow = p.step_seconds > 0.01
    assert slow.sum() == 30
    np.testing.assert_allclose(p.step_seconds[slow], 0.1)
    np.testing.assert_allclose(p.uplink[slow], 1e5)
    np.testing.assert_allclose(p.latency[slow], 0.5)
    np.testing.assert_array_equal(p.step_seconds[~slow], 0.01)
    np.testing.assert_array_equal(p.speeds[~slow], 1.0)
    again = draw_profiles(200, 7, step_seconds=0.01, uplink=1e6, latency=0.05,
                          slow_fraction=0.15, slow_factor=10.0)
    np.testing.assert_array_equal(again.step_seconds, p.step_seconds)
    other = draw_profiles(200, 8, step_seconds=0.01, uplink=1e6, latency=0.05,
                          slow_fraction=0.15, slow_factor=10.0)
    assert not np.array_equal(other.step_seconds, p.step_seconds)


def test_the_speed_spread_is_the_priority_selections_lognormal_draw():
    # the draw the population made for the priority selection before profiles existed
    expected = np.random.Generator(np.random.PCG64(_stream(3, "speeds"))).lognormal(0.0, 0.5, 50)
    p = draw_profiles(50, 3, step_seconds=0.02, uplink=1e6, latency=0.0, spread=0.5)
    np.testing.assert_array_equal(p.speeds, expected)
    np.testing.assert_allclose(p.step_seconds, 0.02 / expected)


def _stream(seed: int, purpose: str) -> int:
    import zlib

    sequence = np.random.SeedSequence([seed, zlib.crc32(purpose.encode()), 0, 0, 0])
    return int(sequence.generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))


def _csv(tmp_path, text: str):
    path = tmp_path / "devices.csv"
    path.write_text(text)
    return path


def test_a_csv_profile_is_read_in_client_order_with_columns_in_any_order(tmp_path):
    path = _csv(tmp_path, "# my cluster\nuplink,client,latency,step_seconds\n"
                          "2e6,2,0.1,0.04\n1e6,0,0.0,0.01\n\n5e5,1,0.2,0.02\n")
    p = read_profiles(path, 3)
    np.testing.assert_array_equal(p.step_seconds, [0.01, 0.02, 0.04])
    np.testing.assert_array_equal(p.uplink, [1e6, 5e5, 2e6])
    np.testing.assert_array_equal(p.latency, [0.0, 0.2, 0.1])
    np.testing.assert_array_equal(p.speeds, [2.0, 1.0, 0.5])  # median step 0.02


def test_an_hdf5_profile_is_read(tmp_path):
    path = tmp_path / "devices.h5"
    with h5py.File(path, "w") as f:
        f["client"] = np.array([1, 0])
        f["step_seconds"] = np.array([0.5, 0.25])
        f["uplink"] = np.array([10.0, 20.0])
        f["latency"] = np.array([0.0, 1.0])
    p = read_profiles(path, 2)
    np.testing.assert_array_equal(p.step_seconds, [0.25, 0.5])
    np.testing.assert_array_equal(p.uplink, [20.0, 10.0])


@pytest.mark.parametrize("text, match", [
    ("client,step_seconds,uplink,latency\n0,0.1,1e6,0\n2,0.1,1e6,0\n",
     r"no line for clients \[1\] \(1 of 3 missing\)"),
    ("client,step_seconds,uplink,latency\n0,0.1,1e6,0\n1,0.1,1e6,0\n1,0.1,1e6,0\n2,1,1,0\n",
     "lists client 1 2 times"),
    ("client,step,uplink,latency\n0,0.1,1e6,0\n", "is not the columns"),
    ("client,step_seconds,uplink,latency\n0,0.1,1e6\n", "3 values but the header has 4"),
    ("client,step_seconds,uplink,latency\n0,fast,1e6,0\n", "not a number"),
    ("client,step_seconds,uplink,latency\n0,0,1e6,0\n1,1,1,0\n2,1,1,0\n",
     "client 0 has step_seconds=0.0; it must be a finite number > 0"),
    ("client,step_seconds,uplink,latency\n0,1,1,-1\n1,1,1,0\n2,1,1,0\n",
     "client 0 has latency=-1.0; it must be a finite number >= 0"),
    ("client,step_seconds,uplink,latency\n0,1,1,0\n1,1,1,0\n7,1,1,0\n",
     "names client 7, but the population has clients 0..2"),
    ("", "is empty"),
])
def test_bad_csv_profiles_are_refused_with_the_fix(tmp_path, text, match):
    with pytest.raises(ProfileError, match=match):
        read_profiles(_csv(tmp_path, text), 3)


def test_bad_hdf5_profiles_and_missing_files_are_refused(tmp_path):
    path = tmp_path / "devices.h5"
    with h5py.File(path, "w") as f:
        f["client"] = np.arange(3)
        f["step_seconds"] = np.ones(3)
        f["uplink"] = np.ones(3)
    with pytest.raises(ProfileError, match="no dataset 'latency'"):
        read_profiles(path, 3)
    with h5py.File(path, "a") as f:
        f["latency"] = np.zeros(2)
    with pytest.raises(ProfileError, match="not 1-D of one length"):
        read_profiles(path, 3)
    with pytest.raises(ProfileError, match="does not exist"):
        read_profiles(tmp_path / "nope.csv", 3)


def _config(**clock):
    return config_from_dict({"clients": {"count": 8}, "topology": {"fanouts": [4, 2]},
                             "schedule": {"tau": [2, 2]}, "clock": clock})


def test_the_clock_section_is_checked_against_the_tree():
    config = _config(mode=["deadline", "sync"], deadline=[1.5, 0], node_uplink=[1e6])
    assert config.clock.deadlines_for(2) == [1.5, float("inf")]
    assert config.clock.links_for(2) == ([1e6], [0.01])
    assert _config().clock.modes_for(2) == ["sync", "sync"]
    with pytest.raises(ConfigError, match=r"clock.mode=\[\"deadline\"\] has 1 entries but the "
                                          "tree has 2 layers"):
        _config(mode=["deadline"], deadline=[1.0])
    with pytest.raises(ConfigError, match=r"gives layer 1 no deadline .* e.g. "
                                          r"clock.deadline=\[2.0, 0\]"):
        _config(mode=["deadline", "sync"])
    with pytest.raises(ConfigError, match="must be one of"):
        _config(mode=["fedasync", "sync"])
    with pytest.raises(ConfigError, match="node_latency=.* has 3 entries"):
        _config(node_latency=[0.1, 0.1, 0.1])
    with pytest.raises(ConfigError, match="clients.count=0"):
        config_from_dict({"clock": {"mode": ["deadline"], "deadline": [1.0]}})
    with pytest.raises(ConfigError, match="keep one of them"):
        _config(profile="devices.csv", slow_fraction=0.1)
