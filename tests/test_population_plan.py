"""hflmpi.core.population: a tree of clients on ranks (pure; brute-force references)."""

from __future__ import annotations

import pytest

from hflmpi.core.population import place_clients, plan_population
from hflmpi.core.topology import TopologyError, plan_fanouts, plan_groups


def _leaves(plan, layer, node):
    """The clients under a node, walking the tree's children lists (independent of members())."""
    if layer == 0:
        return [node]
    out = []
    for child in plan.tree.children[layer - 1][node]:
        out.extend(_leaves(plan, layer - 1, child))
    return sorted(out)


@pytest.mark.parametrize("count, ranks", [(8, 1), (8, 8), (10, 3), (256, 2), (256, 4), (7, 7)])
def test_blocks_are_contiguous_balanced_and_cover_every_rank(count, ranks):
    placement = place_clients(count, ranks)
    assert list(placement.rank_of) == sorted(placement.rank_of)
    sizes = [len(placement.clients_on(r)) for r in range(ranks)]
    assert sum(sizes) == count and max(sizes) - min(sizes) <= 1 and min(sizes) >= 1


@pytest.mark.parametrize("fanouts, ranks", [([16, 4, 4], 2), ([16, 4, 4], 4), ([16, 4, 4], 8),
                                            ([16, 4, 4], 16), ([4, 2], 1), ([3, 5], 5)])
def test_spanning_nodes_owners_and_rank_views_match_a_brute_force_walk(fanouts, ranks):
    count = 1
    for f in fanouts:
        count *= f
    plan = plan_population(plan_fanouts(fanouts, count), place_clients(count, ranks))
    rank_of = plan.placement.rank_of
    for n in range(1, plan.depth + 1):
        for k in range(plan.node_count(n)):
            leaves = _leaves(plan, n, k)
            assert list(plan.members(n, k)) == leaves
            ranks_here = sorted({rank_of[c] for c in leaves})
            assert list(plan.ranks_of(n, k)) == ranks_here
            assert plan.spans(n, k) == (len(ranks_here) > 1)
            assert plan.owner(n, k) == rank_of[leaves[0]]
            for c in leaves:
                assert plan.node_of(c, n) == k
        for r in range(ranks):
            nodes = sorted({plan.node_of(c, n) for c in range(count) if rank_of[c] == r})
            assert list(plan.nodes_on(r, n)) == nodes
            spanning = [k for k in nodes if plan.spans(n, k)]
            assert len(spanning) <= 1 and plan.spanning_node(r, n) == (spanning or [None])[0]


def test_a_rank_straddling_two_spanning_groups_is_refused_with_a_fix():
    with pytest.raises(TopologyError, match=r"rank 1 holds clients of layer-1 groups 5 .* and "
                                            r"10 .*launch a rank count|Launch a rank count"):
        plan_population(plan_fanouts([16, 4, 4], 256), place_clients(256, 3))


def test_uneven_groups_and_explicit_placement():
    tree = plan_groups([[0, 1, 2], [3, 4, 5, 6, 7]], 8)
    plan = plan_population(tree, place_clients(8, 2, [0, 0, 0, 1, 1, 1, 1, 1]))
    assert not plan.spans(1, 0) and not plan.spans(1, 1) and plan.spans(2, 0)
    assert plan.describe()["in_rank_layers"] == [1]


@pytest.mark.parametrize("count, ranks, explicit, message", [
    (3, 4, None, "below the 4 ranks"),
    (4, 2, [0, 1, 1], "has 3 entries"),
    (4, 2, [0, 1, 2, 1], "names ranks \\[2\\]"),
    (4, 2, [0, 0, 0, 0], "leaves ranks \\[1\\] without clients"),
])
def test_bad_placements_are_named(count, ranks, explicit, message):
    with pytest.raises(TopologyError, match=message):
        place_clients(count, ranks, explicit)


def test_leaves_must_be_the_clients():
    with pytest.raises(TopologyError, match="the tree has 8 leaves but clients.count=16"):
        plan_population(plan_fanouts([4, 2], 8), place_clients(16, 2))
