"""The buffered (FedBuff) schedule of :mod:`hflmpi.core.buffered` against an example worked by hand,
and the ``[clock]`` checks of a buffered layer."""

from __future__ import annotations

import numpy as np
import pytest

from hflmpi.config import ConfigError
from hflmpi.config.loading import config_from_dict
from hflmpi.core.buffered import discount, node_schedule


def test_three_clients_k2_hand_worked():
    # clients 0, 1, 2 take 2, 3, 7 s from download to arrival; the node is ready at 0, K = 2.
    # t=0: all download v0.  t=2: c0 arrives (buffer [c0]), downloads v0 again (arrives 4).
    # t=3: c1 arrives -> flush 0 {c0, c1}, staleness 0, 0; v1; c1 downloads v1 (arrives 6).
    # t=4: c0 arrives (buffer [c0']), downloads v1 (arrives 6).
    # t=6: c0 (lower id first) -> flush 1 {c0' (v0: s=1), c0'' (v1: s=0)}; v2; c0 downloads v2
    #      (arrives 8); then c1 arrives (buffer [c1']), downloads v2 (arrives 9).
    # t=7: c2 arrives -> flush 2 {c1' (v1: s=1), c2 (v0: s=2)}: the third and last flush;
    #      c0 and c1 are in flight and dropped.
    sched = node_schedule(0.0, [2, 0, 1], [7.0, 2.0, 3.0], buffer=2, flushes=3)
    ups = [(u.client, u.index, u.version, u.dispatch, u.arrival) for u in sched.uploads]
    assert ups == [(0, 0, 0, 0.0, 2.0), (1, 0, 0, 0.0, 3.0), (2, 0, 0, 0.0, 7.0),
                   (0, 1, 0, 2.0, 4.0), (1, 1, 1, 3.0, 6.0), (0, 2, 1, 4.0, 6.0)]
    flushes = [(f.time, [sched.uploads[u].client for u in f.uploads], list(f.staleness))
               for f in sched.flushes]
    assert flushes == [(3.0, [0, 1], [0, 0]), (6.0, [0, 0], [1, 0]), (7.0, [1, 2], [1, 2])]
    assert [sched.uploads[u].index for u in sched.flushes[1].uploads] == [1, 2]
    assert sched.events == [("train", 0), ("train", 1), ("train", 2), ("train", 3),
                            ("flush", 0), ("train", 4), ("train", 5), ("flush", 1),
                            ("flush", 2)]
    assert sched.dropped == 2 and sched.close == 7.0
    assert sched.applied_clients() == [0, 1, 2]


def test_buffer_larger_than_the_participants_takes_them_all_and_no_participant_keeps_ready():
    sched = node_schedule(5.0, [4], [1.5], buffer=3, flushes=2)
    assert [(f.time, f.staleness) for f in sched.flushes] == [(6.5, (0,)), (8.0, (0,))]
    assert sched.dropped == 0
    empty = node_schedule(5.0, [], [], buffer=3, flushes=2)
    assert empty.flushes == [] and empty.close == 5.0


def test_discount():
    np.testing.assert_allclose(discount([0, 1, 3], 0.5), [1.0, 2 ** -0.5, 0.5])
    np.testing.assert_array_equal(discount([0, 5], 0.0), [1.0, 1.0])


def _config(**clock):
    return config_from_dict({
        "run": {"rounds": 1}, "clients": {"count": 8},
        "topology": {"fanouts": [4, 2]}, "schedule": {"tau": [2, 3]}, "clock": clock})


@pytest.mark.parametrize("clock, words", [
    ({"mode": ["buffered", "sync"], "buffer": [5, 0]}, "larger than layer-1 group"),
    ({"mode": ["buffered", "sync"], "buffer": [0, 0]}, "no buffer size K >= 1"),
    ({"mode": ["buffered", "sync"]}, "no buffer size K >= 1"),
    ({"mode": ["sync", "buffered"], "buffer": [0, 2]}, "only layer 1 under a layer above"),
    ({"mode": ["buffered", "sync"], "buffer": [2, 0], "staleness_exponent": [-1.0, 0]},
     "staleness_exponent"),
    ({"mode": ["buffered", "sync"], "buffer": [2]}, "has 1 entries but the tree has 2"),
])
def test_bad_buffered_config_is_refused(clock, words):
    from hflmpi.population import plan_clients

    with pytest.raises(ConfigError, match=words):
        plan_clients(_config(**clock), 2)


def test_buffered_without_a_population_and_at_the_root_is_refused():
    with pytest.raises(ConfigError, match="population|clients.count"):
        config_from_dict({"run": {"rounds": 1}, "schedule": {"tau": [2]},
                             "clock": {"mode": ["buffered"], "buffer": [1]}})
    from hflmpi.population import plan_clients

    with pytest.raises(ConfigError, match="only layer 1 under a layer above"):
        config_from_dict({"run": {"rounds": 1}, "clients": {"count": 4}, "schedule": {"tau": [2]},
                          "clock": {"mode": ["buffered"], "buffer": [2]}})
    plan_clients(_config(mode=["buffered", "sync"], buffer=[4, 0]), 2)  # the largest K is fine


def test_buffer_is_checked_against_the_smallest_group_of_an_uneven_tree():
    from hflmpi.population import plan_clients

    config = config_from_dict({
        "run": {"rounds": 1}, "clients": {"count": 8},
        "topology": {"groups": [[0, 1, 2], [3, 4, 5, 6, 7]]}, "schedule": {"tau": [2, 3]},
        "clock": {"mode": ["buffered", "sync"], "buffer": [4, 0]}})
    with pytest.raises(ConfigError, match=r"larger than layer-1 group 0, which has 3 clients"):
        plan_clients(config, 2)
