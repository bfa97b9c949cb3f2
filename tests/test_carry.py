"""Carrying late updates (``clock.late = "carry"``) on the simulated clock, worked out by hand.

One layer-1 node of 3 clients under a root (fan-outs [3, 1]), weights 1, 2, 3; every link is
free (0 bytes, 0 latency), so a client's update arrives ``tau_1 * step_c`` = 1, 2.5 and 6 s
after it started, and the node closes at ``min(latest arrival, ready + 2 s)``. Four layer-1
periods per round (``tau = [1, 4]``); the root closes with the fourth.
"""

from __future__ import annotations

import numpy as np
import pytest

from hflmpi.config import ConfigError, config_from_dict
from hflmpi.core.clock import SimulatedClock
from hflmpi.core.devices import DeviceProfiles
from hflmpi.core.population import place_clients, plan_population
from hflmpi.core.topology import plan_fanouts

PLAN = plan_population(plan_fanouts([3, 1], 3), place_clients(3, 1))
STEP = np.array([1.0, 2.5, 6.0])
PROFILES = DeviceProfiles(STEP, np.full(3, 1e9), np.zeros(3), 1.0 / STEP)
W = [np.array([1.0, 2.0, 3.0]), np.array([6.0]), np.array([6.0])]


def _clock(late):
    return SimulatedClock(PLAN, 1, PROFILES, ["deadline", "sync"], [2.0, 0.0],
                          payload=[0.0, 0.0], node_uplink=[1.0], node_latency=[0.0], late=late)


def test_late_updates_are_carried_into_the_first_close_after_they_arrive():
    clock = _clock(["carry", "drop"])
    # period 1, ready 0: arrivals 1, 2.5, 6; closes at the deadline 2: clients 1, 2 held
    first = clock.period(1, W)
    assert clock.closed[1][0] == 2.0 and first.time == 2.0
    np.testing.assert_array_equal(first.started, [True, True, True])
    np.testing.assert_array_equal(first.carried[0], [1, 0, 0])
    np.testing.assert_array_equal(first.held, [False, True, True])
    np.testing.assert_array_equal(first.late, [2, 0])
    assert first.applied == [] and first.abandoned == 0
    # period 2, ready 2: only client 0 starts (arrives 3); held ones arrive at 2.5 and 6;
    # closes at min(6, 4) = 4: client 1 applied, one close missed
    second = clock.period(1, W)
    assert clock.closed[1][0] == 4.0
    np.testing.assert_array_equal(second.started, [True, False, False])
    np.testing.assert_array_equal(second.carried[0], [1, 2, 0])
    np.testing.assert_array_equal(second.late, [0, 0])
    assert second.applied == [(1, 1)]
    np.testing.assert_array_equal(clock.busy, [False, False, True])
    # period 3, ready 4: clients 0 and 1 start (arrive 5, 6.5), client 2 still due at 6;
    # closes at min(6.5, 6) = 6: client 2 applied after two missed closes, client 1 held
    third = clock.period(1, W)
    assert clock.closed[1][0] == 6.0
    np.testing.assert_array_equal(third.started, [True, True, False])
    np.testing.assert_array_equal(third.carried[0], [1, 0, 3])
    np.testing.assert_array_equal(third.held, [False, True, False])
    np.testing.assert_array_equal(third.late, [1, 0])
    assert third.applied == [(2, 2)]
    # period 4, ready 6, the root closes too: clients 0 and 2 start (7, 12), client 1 due at
    # 6.5; closes at min(12, 8) = 8: client 1 applied (1 missed), client 2 held, then
    # abandoned when the root's model comes down; the edge carries all three clients
    fourth = clock.period(2, W)
    assert clock.closed[1][0] == 8.0 and fourth.time == 8.0 and clock.time == 8.0
    np.testing.assert_array_equal(fourth.started, [True, False, True])
    np.testing.assert_array_equal(fourth.carried[0], [1, 2, 0])
    np.testing.assert_array_equal(fourth.carried[1], [6])
    np.testing.assert_array_equal(fourth.late, [1, 0])
    assert fourth.applied == [(1, 1)] and fourth.abandoned == 1
    # next round: nobody is busy, everyone starts from the root's model at 8
    np.testing.assert_array_equal(clock.busy, [False, False, False])
    fifth = clock.period(1, W)
    np.testing.assert_array_equal(fifth.started, [True, True, True])
    assert clock.closed[1][0] == 10.0


def test_drop_is_the_default_and_keeps_no_one_busy():
    for late in ([], ["drop", "drop"]):
        clock = _clock(late)
        for top in (1, 1, 1, 2):
            events = clock.period(top, W)
            np.testing.assert_array_equal(events.started, [True, True, True])
            assert events.applied == [] and not clock.busy.any()
        # every period closes at ready + 2 with client 0 alone: 2, 4, 6, 8
        assert clock.time == 8.0


def _config(**clock):
    return config_from_dict({"clients": {"count": 4}, "topology": {"fanouts": [2, 2]},
                             "schedule": {"tau": [1, 2]}, "clock": clock})


@pytest.mark.parametrize(("clock", "match"), [
    ({"mode": ["sync", "sync"], "late": ["carry", "drop"]},
     r"clock.late=\[\"carry\", \"drop\"\] carries the late updates of layer 1, but clock.mode "
     r"makes layer 1 'sync'"),
    ({"mode": ["buffered", "sync"], "buffer": [1, 0], "late": ["carry", "drop"]},
     "makes layer 1 'buffered'"),
    ({"mode": ["deadline", "deadline"], "deadline": [1, 1], "late": ["drop", "carry"]},
     "only layer 1 under a layer above can carry them"),
    ({"mode": ["deadline", "sync"], "deadline": [1, 0], "late": ["carry"]},
     r"clock.late=\[\"carry\"\] has 1 entries but the tree has 2 layers"),
])
def test_carry_outside_a_deadline_layer_1_is_refused(clock, match):
    from hflmpi.population import plan_clients

    with pytest.raises(ConfigError, match=match):
        plan_clients(_config(**clock), 1)


def test_carry_on_a_root_layer_1_is_refused():
    from hflmpi.population import plan_clients

    with pytest.raises(ConfigError, match=r"only layer 1 under a layer above.*e.g. "
                                          r"clock.late=\[\"carry\", \"drop\"\]"):
        plan_clients(config_from_dict({"clients": {"count": 4}, "schedule": {"tau": [2]},
                                       "clock": {"mode": ["deadline"], "deadline": [1.0],
                                                 "late": ["carry"]}}), 1)
    with pytest.raises(ConfigError, match="one of 'drop', 'carry'"):
        _config(mode=["deadline", "sync"], deadline=[1, 0], late=["keep", "drop"])
