"""Serial tests of the nested tau schedule against hand-written event lists."""

import pytest

from hflmpi.core.schedule import aggregation_layer, period_lengths, round_events, steps_per_round


def test_two_layers_hsgd_local_and_global_periods():
    # H-SGD with I = 2, G = 6: layer 1 every 2 steps, the root every 6.
    assert [layer for _, layer in round_events([2, 3])] == [0, 1, 0, 1, 0, 2]


def test_three_layers():
    events = [layer for _, layer in round_events([1, 2, 2])]
    assert events == [1, 2, 1, 3]
    assert steps_per_round([3, 2, 4]) == 24
    assert period_lengths([3, 2, 4]) == [3, 6, 24]


def test_fedavg_depth_one():
    assert [layer for _, layer in round_events([4])] == [0, 0, 0, 1]


def test_counts_per_layer_match_products():
    tau = [3, 2, 2, 2]
    events = [layer for _, layer in round_events(tau)]
    assert len(events) == 24
    # every layer-n aggregation also aggregates the layers below it
    assert sum(1 for e in events if e >= 1) == 8
    assert sum(1 for e in events if e >= 2) == 4
    assert sum(1 for e in events if e >= 3) == 2
    assert sum(1 for e in events if e >= 4) == 1


def test_step_counts_across_rounds_repeat():
    assert aggregation_layer(12, [2, 3]) == 2 and aggregation_layer(8, [2, 3]) == 1


@pytest.mark.parametrize("bad", [[], [0], [2, -1], [1.5]])
def test_invalid_tau(bad):
    with pytest.raises(ValueError, match="schedule.tau"):
        steps_per_round(bad)
