"""The simulated clock (:mod:`hflmpi.core.clock`) against examples worked out by hand.

The tree: 4 clients, 2 edges (clients 0-1 and 2-3), one root (fan-outs [2, 2]). Client links
``L_c = 100 B / uplink_c + latency_c`` = 1.5, 1.5, 2, 2 s; an edge's link to the root is
200 B / 400 B/s + 0.5 s = 1 s. At the start the root's model is ready at 0 and reaches both
edges at 1. A client's update arrives at ``ready(edge) + 2 L_c + tau_1 step_c``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from hflmpi.core.clock import SimulatedClock, carried_weights, message_bytes
from hflmpi.core.devices import DeviceProfiles
from hflmpi.core.population import place_clients, plan_population
from hflmpi.core.topology import plan_fanouts

PLAN = plan_population(plan_fanouts([2, 2], 4), place_clients(4, 1))
STEP = np.array([1.0, 2.0, 1.0, 10.0])
PROFILES = DeviceProfiles(STEP, np.array([100.0, 100.0, 50.0, 100.0]),
                          np.array([0.5, 0.5, 0.0, 1.0]), 1.0 / STEP)


def _clock(modes, deadlines, tau1=2):
    return SimulatedClock(PLAN, tau1, PROFILES, modes, deadlines, payload=[100.0, 200.0],
                          node_uplink=[400.0], node_latency=[0.5])


def _weights(clients):
    w = np.asarray(clients, dtype=np.float64)
    return [w, np.array([w[:2].sum(), w[2:].sum()]), np.array([w.sum()])]


def test_a_deadline_edge_drops_its_straggler_and_the_root_waits_for_both_edges():
    clock = _clock(["deadline", "sync"], [8.0, 0.0])
    w = _weights([1, 1, 1, 1])
    # period 1: arrivals 1+3+2=6, 1+3+4=8, 1+4+2=7, 1+4+20=25; edge deadlines at 1+8=9
    first = clock.period(1, w)
    np.testing.assert_array_equal(clock.closed[1], [8.0, 9.0])
    np.testing.assert_array_equal(first.late_clients, [False, False, False, True])
    np.testing.assert_array_equal(first.late, [1, 0])
    np.testing.assert_array_equal(first.carried[0], [1, 1, 1, 0])
    assert first.time == 9.0
    # period 2 (the root closes): arrivals 13, 15, 15, 33; edge 0 closes at 15, edge 1 at
    # 9+8=17; the edges carry 2 and 1 (client 3 never arrived) and reach the root at 16 and 18
    second = clock.period(2, w)
    np.testing.assert_array_equal(clock.closed[1], [15.0, 17.0])
    np.testing.assert_array_equal(second.carried[0], [1, 1, 1, 0])
    np.testing.assert_array_equal(second.carried[1], [2, 1])
    np.testing.assert_array_equal(second.late, [1, 0])
    assert second.time == 18.0 and clock.time == 18.0
    np.testing.assert_array_equal(clock.ready[1], [19.0, 19.0])  # one hop down: 1 s
    # next round, client 0 out: arrivals 19+3+4=26, 19+4+2=25, 19+4+20=43; deadline 27
    third = clock.period(1, _weights([0, 1, 1, 1]))
    np.testing.assert_array_equal(clock.closed[1], [26.0, 27.0])
    np.testing.assert_array_equal(third.carried[0], [0, 1, 1, 0])
    # 26+3+4=33 | 27+4+2=33, 27+4+20=51 (deadline 35); the root opened at 18, the edges reach
    # it at 34 and 36 and carry only this round's arrivals (client 0's weight is gone)
    fourth = clock.period(2, _weights([0, 1, 1, 1]))
    np.testing.assert_array_equal(clock.closed[1], [33.0, 35.0])
    np.testing.assert_array_equal(fourth.carried[1], [1, 1])
    assert fourth.time == 36.0


def test_sync_everywhere_waits_for_the_slowest_client():
    clock = _clock(["sync", "sync"], [0.0, 0.0])
    w = _weights([1, 1, 1, 1])
    # period 1: edges close at 8 and 25; period 2: 8+3+2=13, 8+3+4=15 | 25+4+2=31, 25+4+20=49
    clock.period(1, w)
    events = clock.period(2, w)
    np.testing.assert_array_equal(clock.closed[1], [15.0, 49.0])
    assert events.time == 50.0  # max(15, 49) + 1
    np.testing.assert_array_equal(events.late, [0, 0])
    np.testing.assert_array_equal(events.carried[1], [2, 2])


def test_an_edge_whose_participants_are_all_late_takes_no_part_above():
    clock = _clock(["deadline", "sync"], [8.0, 0.0])
    w = _weights([1, 1, 0, 1])  # client 2 does not take part: edge 1 has only the straggler
    clock.period(1, w)
    events = clock.period(2, w)
    np.testing.assert_array_equal(events.carried[1], [2, 0])
    np.testing.assert_array_equal(events.late, [1, 0])  # edge 1 is not late: it has nothing
    assert events.time == 16.0  # edge 0 closed at 15, +1 s; the root does not wait for edge 1


def test_a_deadline_root_drops_a_late_edge_but_keeps_its_clients_aggregate():
    clock = _clock(["sync", "deadline"], [0.0, 10.0], tau1=1)
    # arrivals 1+3+1=5, 1+3+2=6, 1+4+1=6, 1+4+10=15: edges close at 6 and 15, reach the root
    # at 7 and 16; the root's deadline is 0+10
    events = clock.period(2, _weights([1, 1, 1, 1]))
    np.testing.assert_array_equal(clock.closed[1], [6.0, 15.0])
    np.testing.assert_array_equal(events.carried[0], [1, 1, 1, 1])
    np.testing.assert_array_equal(events.carried[1], [2, 0])
    np.testing.assert_array_equal(events.late, [0, 1])
    assert not events.late_clients.any() and events.time == 10.0


def test_reset_restarts_the_clock_from_a_given_time():
    clock = _clock(["deadline", "sync"], [8.0, 0.0])
    clock.reset(100.0)
    assert clock.time == 100.0
    np.testing.assert_array_equal(clock.ready[1], [101.0, 101.0])
    clock.period(1, _weights([1, 1, 1, 1]))
    np.testing.assert_array_equal(clock.closed[1], [108.0, 109.0])


def test_carried_weights_renormalise_over_the_children_that_arrived():
    weights = _weights([1, 2, 3, 4])
    layer = carried_weights(PLAN, weights, [np.array([1, 2, 3, 0.0])], 1)
    np.testing.assert_array_equal(layer[0], [1, 2, 3, 0])
    np.testing.assert_array_equal(layer[1], [3, 3])
    np.testing.assert_array_equal(layer[2], [10])  # untouched above
    root = carried_weights(PLAN, weights, [weights[0], np.array([3.0, 0.0])], 2)
    np.testing.assert_array_equal(root[1], [3, 0])
    np.testing.assert_array_equal(root[2], [3])


def test_message_bytes_are_packed_levels_and_scales_or_the_float32_model():
    # 8 bits: 1000 bytes of levels + 2 buckets of 512 with a 4-byte scale; exact: 4 * 1000
    assert message_bytes(1000, [8, 0], [512, 0]) == [1008.0, 4000.0]
    assert message_bytes(1000, [1], [1024]) == [math.ceil(1000 / 8) + 4]


def test_bad_clock_arguments_are_refused():
    with pytest.raises(ValueError, match="modes, deadlines and payload"):
        SimulatedClock(PLAN, 2, PROFILES, ["sync"], [0.0], [1.0], [1.0], [0.0])
    with pytest.raises(ValueError, match="unknown clock mode"):
        SimulatedClock(PLAN, 2, PROFILES, ["sync", "bogus"], [0.0, 0.0], [1.0, 1.0],
                       [1.0], [0.0])
