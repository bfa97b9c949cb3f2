"""Client selection and availability (:mod:`hflmpi.core.selection`) against plain references.

The statistical checks use fixed seeds (so they are reproducible) and loose chi-square bounds:
a correct sampler passes with a wide margin, a biased one (e.g. always the first clients, or
frequencies not proportional to the samples) fails by orders of magnitude. The priority mode is
compared with an independent re-implementation of its top-utility pick (Python ``sorted``).
"""

from __future__ import annotations

import math

import h5py
import numpy as np
import pytest

from hflmpi.core.availability import Availability
from hflmpi.core.selection import (
    SelectionError,
    SelectionOptions,
    cohort_size,
    renormalised_weights,
    select_cohort,
)
from hflmpi.errors import HflmpiError


def arrays(n: int, *, seed: int = 0, trained: bool = True):
    rng = np.random.default_rng(seed)
    online = np.ones(n, dtype=bool)
    samples = rng.integers(1, 100, size=n)
    losses = rng.uniform(0.1, 3.0, size=n) if trained else np.full(n, np.nan)
    speeds = rng.uniform(0.5, 2.0, size=n)
    return online, samples, losses, speeds


def chi_square(counts: np.ndarray, expected: np.ndarray) -> float:
    return float(((counts - expected) ** 2 / expected).sum())


def reference_top(online, samples, losses, speeds, m, alpha=0.0):
    """Independent reference: top-m utility ids among online clients with a known loss."""
    online_speeds = [float(speeds[i]) for i in range(len(online)) if online[i]]
    med = float(np.median(online_speeds))
    utility = {}
    for i in range(len(online)):
        if online[i] and not math.isnan(losses[i]):
            u = float(samples[i]) * float(losses[i])
            if alpha > 0 and speeds[i] < med:
                u *= (float(speeds[i]) / med) ** alpha
            utility[i] = u
    return sorted(utility, key=lambda i: (-utility[i], i))[:m]


# ---------------------------------------------------------------- cohort size and basic shape


@pytest.mark.parametrize("cohort, population, expected", [
    (1, 10, 1), (7, 10, 7), (10, 10, 10), (10.0, 10, 10), (0.5, 10, 5), (0.25, 10, 3),
    (0.15, 10, 2), (0.01, 10, 1), (0.999, 10, 10), (0.1, 256, 26),
])
def test_cohort_size(cohort, population, expected):
    assert cohort_size(SelectionOptions("uniform", cohort), population) == expected


def test_cohort_size_all_is_population():
    assert cohort_size(SelectionOptions("all", 0), 17) == 17


@pytest.mark.parametrize("mode", ["all", "uniform", "weighted", "priority"])
def test_deterministic_sorted_subset_of_online(mode):
    online, samples, losses, speeds = arrays(40, seed=1)
    online[::3] = False
    losses[::5] = np.nan
    opts = SelectionOptions(mode, 8, exploration=0.25, speed_weight=0.5, seed=7)
    first = select_cohort(opts, 3, online, samples, losses, speeds)
    again = select_cohort(SelectionOptions(mode, 8, exploration=0.25, speed_weight=0.5, seed=7),
                          3, online.copy(), samples.copy(), losses.copy(), speeds.copy())
    assert first.dtype == np.int64
    np.testing.assert_array_equal(first, again)
    assert np.all(np.diff(first) > 0)
    assert online[first].all()
    assert first.size == (online.sum() if mode == "all" else 8)


@pytest.mark.parametrize("mode", ["uniform", "weighted", "priority"])
def test_rounds_and_seeds_differ(mode):
    online, samples, losses, speeds = arrays(50, seed=2, trained=False)
    opts = SelectionOptions(mode, 10, seed=3)
    cohorts = {tuple(select_cohort(opts, r, online, samples, losses, speeds)) for r in range(1, 9)}
    assert len(cohorts) == 8
    other = select_cohort(SelectionOptions(mode, 10, seed=4), 1, online, samples, losses, speeds)
    assert tuple(other) != tuple(select_cohort(opts, 1, online, samples, losses, speeds))


@pytest.mark.parametrize("mode", ["all", "uniform", "weighted", "priority"])
def test_fewer_online_than_cohort_selects_all_online(mode):
    online, samples, losses, speeds = arrays(20, seed=3)
    online[:] = False
    online[[2, 11, 17]] = True
    losses[11] = np.nan
    got = select_cohort(SelectionOptions(mode, 5, seed=1), 1, online, samples, losses, speeds)
    np.testing.assert_array_equal(got, [2, 11, 17])


@pytest.mark.parametrize("mode", ["all", "uniform", "weighted", "priority"])
def test_nobody_online_gives_empty_cohort(mode):
    online, samples, losses, speeds = arrays(6)
    online[:] = False
    got = select_cohort(SelectionOptions(mode, 2, speed_weight=1.0), 1, online, samples, losses,
                        speeds)
    assert got.size == 0 and got.dtype == np.int64


# ---------------------------------------------------------------- statistics


def test_uniform_is_uniform_over_online_clients():
    n, k, rounds = 20, 5, 2000
    online, samples, losses, speeds = arrays(n, seed=4)
    online[[0, 9]] = False  # offline clients are never picked; the rest equally often
    opts = SelectionOptions("uniform", k, seed=11)
    counts = np.zeros(n)
    for r in range(1, rounds + 1):
        counts[select_cohort(opts, r, online, samples, losses, speeds)] += 1
    assert counts[0] == counts[9] == 0
    live = counts[online]
    expected = np.full(live.size, rounds * k / live.size)
    # 17 degrees of freedom: mean 17, a correct sampler is far below 60
    assert chi_square(live, expected) < 60


def test_weighted_k1_frequencies_follow_samples():
    samples = np.array([1, 2, 3, 4, 5, 6, 7, 20])
    n, rounds = samples.size, 6000
    online = np.ones(n, dtype=bool)
    losses, speeds = np.zeros(n), np.ones(n)
    opts = SelectionOptions("weighted", 1, seed=5)
    counts = np.zeros(n)
    for r in range(1, rounds + 1):
        got = select_cohort(opts, r, online, samples, losses, speeds)
        assert got.size == 1
        counts[got] += 1
    expected = rounds * samples / samples.sum()
    assert chi_square(counts, expected) < 35  # 7 degrees of freedom


def test_weighted_skips_offline_and_zero_sample_clients():
    samples = np.array([0, 5, 5, 0, 5, 5])
    online = np.array([True, True, True, True, False, True])
    losses, speeds = np.zeros(6), np.ones(6)
    seen = set()
    for r in range(1, 50):
        got = select_cohort(SelectionOptions("weighted", 2, seed=1), r, online, samples, losses,
                            speeds)
        assert got.size == 2
        seen.update(got.tolist())
    assert seen == {1, 2, 5}
    # more asked than eligible: all eligible
    got = select_cohort(SelectionOptions("weighted", 5), 1, online, samples, losses, speeds)
    np.testing.assert_array_equal(got, [1, 2, 5])


def test_bernoulli_availability_rate_and_determinism():
    n, p, rounds = 200, 0.3, 100
    av = Availability.bernoulli(n, p, seed=9)
    table = np.stack([av.online(r) for r in range(1, rounds + 1)])
    assert table.dtype == np.bool_ and table.shape == (rounds, n)
    rate = table.mean()
    assert abs(rate - p) < 4 * math.sqrt(p * (1 - p) / table.size)
    np.testing.assert_array_equal(Availability.bernoulli(n, p, seed=9).online(5), table[4])
    assert not np.array_equal(table[0], table[1])
    assert not np.array_equal(Availability.bernoulli(n, p, seed=10).online(1), table[0])
    assert Availability.bernoulli(n, 1.0, seed=0).online(3).all()
    assert not Availability.bernoulli(n, 0.0, seed=0).online(3).any()
    assert Availability.always(n).online(7).all()


# ---------------------------------------------------------------- priority (Oort)


@pytest.mark.parametrize("k, exploration", [(10, 0.0), (10, 0.3), (7, 0.5), (12, 1.0)])
def test_priority_picks_top_utility_then_explores(k, exploration):
    n = 40
    online, samples, losses, speeds = arrays(n, seed=6)
    online[[3, 8, 21]] = False
    losses[30:] = np.nan  # 10 never trained, 9 of them online... minus none: 30..39 all online
    samples[5], losses[5] = 50, 2.0  # a tie in utility (100.0) broken by the lower id
    samples[6], losses[6] = 40, 2.5
    opts = SelectionOptions("priority", k, exploration=exploration, seed=2)
    got = set(select_cohort(opts, 4, online, samples, losses, speeds).tolist())
    m = math.floor(k * (1 - exploration) + 0.5)
    top = reference_top(online, samples, losses, speeds, m)
    assert len(got) == k
    assert set(top) <= got
    explored = got - set(top)
    assert len(explored) == k - m
    unseen = {i for i in range(n) if online[i] and math.isnan(losses[i])}
    if len(explored) <= len(unseen):
        assert explored <= unseen  # never-trained clients come first
    else:
        assert unseen <= explored


def test_priority_tie_break_prefers_lower_id():
    online = np.ones(5, dtype=bool)
    samples = np.array([10, 20, 10, 20, 5])
    losses = np.array([2.0, 1.0, 2.0, 1.0, 1.0])  # clients 0..3 all have utility 20
    got = select_cohort(SelectionOptions("priority", 3, exploration=0.0), 1, online, samples,
                        losses, np.ones(5))
    np.testing.assert_array_equal(got, [0, 1, 2])


def test_priority_exploration_count_and_half_up_rounding():
    n = 30
    online, samples, losses, speeds = arrays(n, seed=8)
    losses[20:] = np.nan
    for k, exploration, explored in [(10, 0.1, 1), (10, 0.3, 3), (5, 0.1, 0), (6, 0.25, 1),
                                     (4, 1.0, 4)]:
        opts = SelectionOptions("priority", k, exploration=exploration, seed=1)
        got = select_cohort(opts, 2, online, samples, losses, speeds)
        # the exploration draws come from the 10 never-trained clients (20..29)
        assert int((got >= 20).sum()) == explored, (k, exploration)


def test_priority_explores_trained_clients_when_no_one_is_new():
    n = 12
    online, samples, losses, speeds = arrays(n, seed=12)
    opts = SelectionOptions("priority", 6, exploration=0.5)
    top = reference_top(online, samples, losses, speeds, 3)
    seen = set()
    for r in range(1, 30):
        got = set(select_cohort(opts, r, online, samples, losses, speeds).tolist())
        assert len(got) == 6 and set(top) <= got
        seen |= got - set(top)
    assert seen == set(range(n)) - set(top)


def test_priority_first_round_is_uniform():
    online, samples, losses, speeds = arrays(50, seed=10, trained=False)
    online[::4] = False
    for r in (1, 2, 3):
        prio = select_cohort(SelectionOptions("priority", 9, exploration=0.2, speed_weight=2.0,
                                              seed=5), r, online, samples, losses, speeds)
        unif = select_cohort(SelectionOptions("uniform", 9, seed=5), r, online, samples, losses,
                             speeds)
        np.testing.assert_array_equal(prio, unif)


def test_speed_penalty_changes_ranking():
    online = np.ones(5, dtype=bool)
    samples = np.array([100, 80, 10, 10, 10])
    losses = np.ones(5)
    speeds = np.array([0.5, 1.0, 1.0, 2.0, 4.0])  # median 1.0: client 0 is slow, U0 * 0.5**alpha
    plain = SelectionOptions("priority", 1, exploration=0.0)
    np.testing.assert_array_equal(select_cohort(plain, 1, online, samples, losses, speeds), [0])
    for alpha, winner in [(0.2, 0), (1.0, 1), (2.0, 1)]:
        opts = SelectionOptions("priority", 1, exploration=0.0, speed_weight=alpha)
        got = select_cohort(opts, 1, online, samples, losses, speeds)
        assert got.tolist() == reference_top(online, samples, losses, speeds, 1, alpha)
        assert got.tolist() == [winner]
    # a fast client is never boosted: client 4 (4x the median) keeps utility 10
    opts = SelectionOptions("priority", 3, exploration=0.0, speed_weight=1.0)
    np.testing.assert_array_equal(select_cohort(opts, 1, online, samples, losses, speeds),
                                  [0, 1, 2])


def test_speed_median_is_over_online_clients_only():
    samples = np.array([100, 80, 10, 10])
    losses = np.ones(4)
    speeds = np.array([0.5, 1.0, 0.1, 0.1])
    online = np.array([True, True, False, False])  # online median 0.75, client 0 -> 100 * 2/3
    opts = SelectionOptions("priority", 1, exploration=0.0, speed_weight=1.0)
    assert select_cohort(opts, 1, online, samples, losses, speeds).tolist() == [1]
    assert reference_top(online, samples, losses, speeds, 1, 1.0) == [1]
    online[:] = True  # median 0.3: client 0 is not slow and wins
    assert select_cohort(opts, 1, online, samples, losses, speeds).tolist() == [0]


# ---------------------------------------------------------------- renormalised weights


def test_renormalised_weights():
    w = np.array([1.0, 3.0, 4.0, 2.0])
    part = np.array([True, False, True, True])
    np.testing.assert_allclose(renormalised_weights(w, part), [1 / 7, 0, 4 / 7, 2 / 7])
    assert renormalised_weights(np.array([3, 1]), np.array([True, True])).tolist() == [0.75, 0.25]
    none = renormalised_weights(w, np.zeros(4, dtype=bool))
    assert none.tolist() == [0.0] * 4
    zero = renormalised_weights(np.array([0.0, 0.0, 5.0]), np.array([True, True, False]))
    assert zero.tolist() == [0.0] * 3
    with pytest.raises(SelectionError, match="one length"):
        renormalised_weights(w, part[:3])
    with pytest.raises(SelectionError, match=">= 0"):
        renormalised_weights(np.array([1.0, -1.0]), np.array([True, True]))


# ---------------------------------------------------------------- traces


def write_csv(path, table, header=True):
    lines = ["# availability trace, one row per client"] if header else []
    lines += [",".join(str(int(v)) for v in row) for row in table]
    path.write_text("\n".join(lines) + "\n")


def test_csv_trace_round_trip_and_wrap(tmp_path):
    table = np.random.default_rng(0).random((6, 4)) < 0.5
    path = tmp_path / "trace.csv"
    write_csv(path, table)
    av = Availability.from_trace(path, 6)
    assert av.trace_rounds == 4
    for r in range(1, 13):
        got = av.online(r)
        assert got.dtype == np.bool_
        np.testing.assert_array_equal(got, table[:, (r - 1) % 4])
    av.online(1)[:] = False  # a copy: the trace itself is not changed
    np.testing.assert_array_equal(av.online(1), table[:, 0])
    cut = Availability.from_trace(path, 6, rounds=3)
    assert cut.trace_rounds == 3
    np.testing.assert_array_equal(cut.online(4), table[:, 0])
    spaced = tmp_path / "spaced.csv"
    spaced.write_text("# h\n1, 0 ,1\n\n0,0,1\n")
    np.testing.assert_array_equal(Availability.from_trace(spaced, 2).online(3), [True, True])


@pytest.mark.parametrize("dtype", [bool, np.int8, np.int64, np.uint8])
@pytest.mark.parametrize("name", ["trace.h5", "trace.hdf5", "trace_without_suffix"])
def test_hdf5_trace_round_trip_and_wrap(tmp_path, dtype, name):
    table = np.random.default_rng(1).random((5, 3)) < 0.5
    path = tmp_path / name
    with h5py.File(path, "w") as file:
        file["available"] = table.astype(dtype)
    av = Availability.from_trace(path, 5)
    assert av.trace_rounds == 3
    for r in range(1, 10):
        np.testing.assert_array_equal(av.online(r), table[:, (r - 1) % 3])
    cut = Availability.from_trace(str(path), 5, rounds=2)
    np.testing.assert_array_equal(cut.online(3), table[:, 0])
    longer = Availability.from_trace(path, 5, rounds=10)
    assert longer.trace_rounds == 3


def test_trace_drives_selection(tmp_path):
    table = np.array([[1, 0], [1, 1], [0, 1], [1, 1]], dtype=bool)
    path = tmp_path / "t.csv"
    write_csv(path, table, header=False)
    av = Availability.from_trace(path, 4)
    n = 4
    samples, losses, speeds = np.ones(n, dtype=np.int64), np.zeros(n), np.ones(n)
    opts = SelectionOptions("all", 0)
    assert select_cohort(opts, 3, av.online(3), samples, losses, speeds).tolist() == [0, 1, 3]
    assert select_cohort(opts, 2, av.online(2), samples, losses, speeds).tolist() == [1, 2, 3]


# ---------------------------------------------------------------- errors


def test_selection_error_is_a_user_value_error():
    assert issubclass(SelectionError, HflmpiError) and issubclass(SelectionError, ValueError)


@pytest.mark.parametrize("kwargs, words", [
    ({"mode": "random", "cohort": 3}, ["'random'", "unknown", "'uniform'"]),
    ({"mode": "uniform", "cohort": 0}, ["cohort 0", "> 0"]),
    ({"mode": "uniform", "cohort": -2}, ["cohort -2", "> 0"]),
    ({"mode": "uniform", "cohort": float("nan")}, ["cohort nan"]),
    ({"mode": "uniform", "cohort": 2.5}, ["cohort 2.5", "whole number", "use 2 or 3"]),
    ({"mode": "uniform", "cohort": "10"}, ["not a number"]),
    ({"mode": "priority", "cohort": 3, "exploration": -0.1}, ["exploration -0.1", "[0, 1]"]),
    ({"mode": "priority", "cohort": 3, "exploration": 1.5}, ["exploration 1.5", "[0, 1]"]),
    ({"mode": "priority", "cohort": 3, "speed_weight": -1.0}, ["speed_weight -1.0", ">= 0"]),
    ({"mode": "uniform", "cohort": 3, "seed": -1}, ["seed -1", ">= 0"]),
])
def test_bad_options(kwargs, words):
    with pytest.raises(SelectionError) as info:
        SelectionOptions(**kwargs)
    for word in words:
        assert word in str(info.value)


def test_cohort_exceeding_population():
    opts = SelectionOptions("uniform", 300)
    with pytest.raises(SelectionError, match=r"cohort 300 exceeds the population of 256 "
                                             r"clients; use at most 256"):
        cohort_size(opts, 256)
    online, samples, losses, speeds = arrays(256)
    with pytest.raises(SelectionError, match="cohort 300 exceeds"):
        select_cohort(opts, 1, online, samples, losses, speeds)
    with pytest.raises(SelectionError, match="population 0"):
        cohort_size(SelectionOptions("uniform", 0.5), 0)


def test_bad_arrays_and_round():
    online, samples, losses, speeds = arrays(8)
    opts = SelectionOptions("priority", 3, speed_weight=1.0)
    cases = [
        ((online[:7], samples, losses, speeds), "samples has shape (8,) but online has 7"),
        ((online, samples[:5], losses, speeds), "samples has shape (5,)"),
        ((online, samples, np.ones(9), speeds), "losses has shape (9,)"),
        ((online, samples, losses, np.ones(3)), "speeds has shape (3,)"),
        ((online.astype(int), samples, losses, speeds), "online must be a 1-D bool array"),
        ((online, samples * -1, losses, speeds), "samples must be integer sample counts >= 0"),
        ((online, samples.astype(float), losses, speeds), "samples must be integer"),
        ((online, samples, np.where(np.arange(8) == 2, np.inf, losses), speeds),
         "losses[2] is inf"),
        ((online, samples, losses, np.where(np.arange(8) == 4, 0.0, speeds)),
         "speeds[4] is 0.0"),
    ]
    for args, words in cases:
        with pytest.raises(SelectionError) as info:
            select_cohort(opts, 1, *args)
        assert words in str(info.value), (words, str(info.value))
    with pytest.raises(SelectionError, match="round 0 must be an integer >= 1"):
        select_cohort(opts, 0, online, samples, losses, speeds)
    with pytest.raises(SelectionError, match="round 0"):
        Availability.always(3).online(0)
    # an offline client's speed is not used, so it may be anything
    online[4] = False
    bad_speed = np.where(np.arange(8) == 4, 0.0, speeds)
    assert select_cohort(opts, 1, online, samples, losses, bad_speed).size == 3


@pytest.mark.parametrize("p", [-0.1, 1.5, float("nan")])
def test_bad_bernoulli(p):
    with pytest.raises(SelectionError, match=r"p=.* must be in \[0, 1\]"):
        Availability.bernoulli(4, p, seed=0)


def _assert_trace_refused(path, words):
    """Reading the 3-client trace at ``path`` fails naming the file and every one of ``words``."""
    with pytest.raises(SelectionError) as info:
        Availability.from_trace(path, 3)
    message = str(info.value)
    assert str(path) in message
    for word in words:
        assert word in message, (word, message)


@pytest.mark.parametrize("text, words", [
    ("1,0\n0,1\n", ["2 client rows", "population has 3 clients", "one row per client"]),
    ("1,0\n0,2\n1,1\n", ["line 2, column 2", "'2' is not 0 or 1"]),
    ("# h\n1,0\nyes,1\n1,1\n", ["line 3, column 1", "'yes'"]),
    ("1,0\n0,1,1\n1,1\n", ["line 2", "3 values", "first client row has 2"]),
    ("", ["is empty"]),
    ("# only a header\n\n", ["is empty"]),
])
def test_bad_csv_trace(tmp_path, text, words):
    path = tmp_path / "bad.csv"
    path.write_text(text)
    _assert_trace_refused(path, words)


def test_unreadable_traces(tmp_path):
    with pytest.raises(SelectionError, match="does not exist"):
        Availability.from_trace(tmp_path / "missing.csv", 3)
    binary = tmp_path / "binary.csv"
    binary.write_bytes(b"\xff\xfe\x00\x01")
    with pytest.raises(SelectionError, match="cannot be read as a CSV text file"):
        Availability.from_trace(binary, 3)
    broken = tmp_path / "broken.h5"
    broken.write_text("not hdf5 at all\n")
    with pytest.raises(SelectionError, match=r"broken\.h5 cannot be read as HDF5"):
        Availability.from_trace(broken, 3)
    with pytest.raises(SelectionError, match="rounds 0 must be an integer >= 1"):
        Availability.from_trace(broken, 3, rounds=0)


@pytest.mark.parametrize("content, words", [
    ({"other": np.ones((3, 2), dtype=bool)}, ["no dataset 'available'", "found: other"]),
    ({"available": np.ones(3, dtype=bool)}, ["shape (3,)", "[clients, rounds]"]),
    ({"available": np.ones((3, 2))}, ["dtype float64", "bool or integer 0/1"]),
    ({"available": np.zeros((3, 0), dtype=bool)}, ["is empty"]),
    ({"available": np.array([[1, 0], [0, 3], [1, 1]])}, ["available[1, 1] = 3 is not 0 or 1"]),
    ({"available": np.array([[1, 0], [0, -1], [1, 1]])}, ["available[1, 1] = -1"]),
    ({"available": np.ones((4, 2), dtype=bool)}, ["4 client rows", "population has 3"]),
])
def test_bad_hdf5_trace(tmp_path, content, words):
    path = tmp_path / "bad.h5"
    with h5py.File(path, "w") as file:
        for name, value in content.items():
            file[name] = value
    _assert_trace_refused(path, words)
