"""Serial tests of the pure tree planner against hand-built expectations."""

from __future__ import annotations

import pytest
from conftest import random_nested_groups, tree_specs

from hflmpi.core.topology import TopologyError, TreePlan, plan_fanouts, plan_groups, plan_nodes


def _plan(kind, spec, world_size):
    return plan_fanouts(spec, world_size) if kind == "fanouts" else plan_groups(spec, world_size)


def test_fanouts_two_layers_matches_hand_layout():
    plan = plan_fanouts([4, 2], 8)
    assert plan.depth == 2
    assert plan.children == (((0, 1, 2, 3), (4, 5, 6, 7)), ((0, 1),))
    assert [plan.node_of(r, 1) for r in range(8)] == [0, 0, 0, 0, 1, 1, 1, 1]
    assert [plan.node_of(r, 2) for r in range(8)] == [0] * 8
    assert plan.participants(1, 1) == (4, 5, 6, 7)
    assert plan.participants(2, 0) == (0, 4)
    assert [r for r in range(8) if plan.is_leader(r, 1)] == [0, 4]
    assert [r for r in range(8) if plan.is_leader(r, 2)] == [0]


def test_depth_one_is_a_single_group():
    plan = plan_fanouts([5], 5)
    assert plan.depth == 1 and plan.members(1, 0) == (0, 1, 2, 3, 4)


def test_uneven_groups_and_leaders():
    plan = plan_groups([[5, 1, 2], [3, 4, 0, 6, 7]], 8)
    assert plan.members(1, 0) == (1, 2, 5)
    assert plan.leader(1, 0) == 1 and plan.leader(1, 1) == 0
    assert plan.participants(2, 0) == (1, 0)
    assert plan.is_leader(0, 2) and not plan.is_leader(1, 2)


def test_depth_three_nested_groups():
    plan = plan_groups([[[0, 1], [2, 3]], [[4, 5, 6, 7]]], 8)
    assert plan.depth == 3
    assert plan.children[0] == ((0, 1), (2, 3), (4, 5, 6, 7))
    assert plan.children[1] == ((0, 1), (2,))
    assert plan.participants(3, 0) == (0, 4)
    assert plan.subtree_weight(2, 0, [1, 2, 3, 4, 5, 6, 7, 8]) == 10.0


@pytest.mark.parametrize("world_size", [1, 2, 3, 4, 6, 8, 12])
def test_generated_specs_partition_every_layer(world_size):
    for kind, spec in tree_specs(world_size):
        plan = _plan(kind, spec, world_size)
        for layer in range(1, plan.depth + 1):
            seen = sorted(r for node in range(plan.node_count(layer)) for r in plan.members(layer, node))
            assert seen == list(range(world_size)), (kind, spec, layer)
            for rank in range(world_size):
                node = plan.node_of(rank, layer)
                assert rank in plan.members(layer, node)
                assert plan.is_leader(rank, layer) == (min(plan.members(layer, node)) == rank)
        assert plan.node_count(plan.depth) == 1


def test_fanout_mismatch_names_the_numbers():
    with pytest.raises(TopologyError, match=r"fanouts=\[4, 3\] needs 12 ranks, got 16"):
        plan_fanouts([4, 3], 16)


def test_bad_fanout_values():
    with pytest.raises(TopologyError, match="integer >= 1"):
        plan_fanouts([4, 0], 0)
    with pytest.raises(TopologyError, match="empty"):
        plan_fanouts([], 1)


def test_groups_missing_and_repeated_ranks():
    with pytest.raises(TopologyError, match=r"missing \[3\]"):
        plan_groups([[0, 1], [2]], 4)
    with pytest.raises(TopologyError, match=r"repeated \[1\]"):
        plan_groups([[0, 1], [1, 2]], 3)


def test_groups_mixed_depth_is_rejected_with_fix():
    with pytest.raises(TopologyError, match="wrap a lone rank"):
        plan_groups([[0, 1], 2], 3)


def test_groups_rejects_non_integers_and_empty():
    with pytest.raises(TopologyError, match="neither a rank"):
        plan_groups([[0, "1"]], 2)
    with pytest.raises(TopologyError, match="empty group"):
        plan_groups([[0, 1], []], 2)


def test_treeplan_validation_rejects_two_roots():
    with pytest.raises(TopologyError, match="exactly one node"):
        TreePlan(4, (((0, 1), (2, 3)),))


def test_nodes_one_group_per_host_and_fanouts_above():
    names = ["n1", "n1", "n2", "n2", "n3", "n3", "n4", "n4"]
    plan = plan_nodes(names, [2, 2])
    assert plan.children[0] == ((0, 1), (2, 3), (4, 5), (6, 7))
    assert plan.depth == 3
    plan = plan_nodes(["b", "a", "b", "a"])
    assert plan.children == (((0, 2), (1, 3)), ((0, 1),))
    assert plan_nodes(["x"] * 3).depth == 1
    with pytest.raises(TopologyError, match="spans 4 nodes"):
        plan_nodes(names, [3])


def test_random_nested_groups_have_requested_depth():
    for depth in (1, 2, 3, 4):
        plan = plan_groups(random_nested_groups(8, depth, seed=depth), 8)
        assert plan.depth == depth


def test_describe_is_json_serialisable():
    import json

    text = json.dumps(plan_fanouts([2, 2], 4).describe())
    assert '"depth": 2' in text
