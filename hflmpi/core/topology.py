"""Plan the aggregation tree: which rank sits in which group at every layer, and who leads it.

Layers follow QMLHFL (arXiv 2505.08145, Sec. II): devices are layer 0, aggregators are layers
1..N-1 and the root is layer N. A layer-n *node* is a subtree of devices; its *leader* is the lowest
rank in that subtree, which is where the layer-n aggregate lands before it is broadcast down.

This module is pure (no MPI): it turns a tree spec plus the world size into a :class:`TreePlan`,
and raises :class:`TopologyError` before any communicator exists when they do not fit. Three
spec forms are accepted:

* fan-outs ``[f1, ..., fN]``: ``f1`` devices per layer-1 group, ``f2`` layer-1 groups per layer-2
  group, ... (``[4, 2]`` = 8 devices, 2 edge groups, 1 root). Ranks are assigned contiguously.
* explicit nested groups, leaves are ranks: ``[[0, 1, 2], [3, 4, 5, 6, 7]]`` (depth 2, uneven),
  ``[[[0, 1], [2, 3]], [[4, 5, 6, 7]]]`` (depth 3). All leaves must sit at the same depth and the
  ranks must be exactly ``0..world_size-1``.
* node names: one layer-1 group per physical node (ranks sharing a host name), optionally with
  fan-outs above the node layer (``node_fanouts``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from hflmpi.errors import HflmpiError

__all__ = [
    "TopologyError",
    "TreePlan",
    "plan_fanouts",
    "plan_groups",
    "plan_nodes",
]


class TopologyError(HflmpiError, ValueError):
    """The tree spec does not describe a valid tree for this world size."""


@dataclass(frozen=True)
class TreePlan:
    """A validated aggregation tree over ``world_size`` ranks with ``depth`` aggregation layers.

    Attributes
    ----------
    world_size : int
        Number of devices (MPI ranks).
    children : tuple
        ``children[n-1][k]`` lists the children of layer-n node ``k``: ranks for ``n == 1``,
        layer-(n-1) node ids otherwise. The last layer has exactly one node, the root.
    """

    world_size: int
    children: tuple[tuple[tuple[int, ...], ...], ...]

    def __post_init__(self) -> None:
        _validate(self.world_size, self.children)

    @property
    def depth(self) -> int:
        """Number of aggregation layers N (1 = FedAvg, 2 = client-edge-cloud H-SGD, ...)."""
        return len(self.children)

    def node_count(self, layer: int) -> int:
        """Return the number of nodes at ``layer`` (0 = devices)."""
        if layer == 0:
            return self.world_size
        return len(self.children[self._check_layer(layer) - 1])

    def members(self, layer: int, node: int) -> tuple[int, ...]:
        """Return the ranks (devices) in the subtree of layer-``layer`` node ``node``, sorted."""
        if layer == 0:
            return (node,)
        ranks: list[int] = []
        for child in self.children[self._check_layer(layer) - 1][node]:
            ranks.extend(self.members(layer - 1, child))
        return tuple(sorted(ranks))

    def leader(self, layer: int, node: int) -> int:
        """Return the rank that leads layer-``layer`` node ``node`` (its lowest rank)."""
        return self.members(layer, node)[0]

    def node_of(self, rank: int, layer: int) -> int:
        """Return the id of the layer-``layer`` node whose subtree holds ``rank``."""
        return self._node_of_rank[layer][rank]

    def is_leader(self, rank: int, layer: int) -> bool:
        """Tell whether ``rank`` leads its layer-``layer`` node (every rank leads itself at 0)."""
        return layer == 0 or self.leader(layer, self.node_of(rank, layer)) == rank

    def participants(self, layer: int, node: int) -> tuple[int, ...]:
        """Return the ranks that meet in layer-``layer`` node's communicator: its children's leaders."""
        return tuple(self.leader(layer - 1, c) for c in self.children[self._check_layer(layer) - 1][node])

    def subtree_weight(self, layer: int, node: int, device_weights: Sequence[float]) -> float:
        """Return the sum of ``device_weights`` over the node's subtree."""
        return float(sum(device_weights[r] for r in self.members(layer, node)))

    def describe(self) -> dict[str, Any]:
        """Return a JSON-serialisable description (stored in the run file)."""
        return {
            "world_size": self.world_size,
            "depth": self.depth,
            "children": [[list(c) for c in layer] for layer in self.children],
            "groups_per_layer": [len(layer) for layer in self.children],
        }

    @property
    def _node_of_rank(self) -> tuple[tuple[int, ...], ...]:
        # Cached lazily on the frozen instance; the table is small (depth x world_size).
        cached = self.__dict__.get("_node_table")
        if cached is None:
            table = [tuple(range(self.world_size))]
            for layer_children in self.children:
                below = table[-1]
                parent_of_child = {c: k for k, kids in enumerate(layer_children) for c in kids}
                table.append(tuple(parent_of_child[below[r]] for r in range(self.world_size)))
            cached = tuple(table)
            object.__setattr__(self, "_node_table", cached)
        return cached

    def _check_layer(self, layer: int) -> int:
        if not 1 <= layer <= self.depth:
            raise TopologyError(f"layer {layer} is outside 1..{self.depth} for this tree")
        return layer


def _validate(world_size: int, children: tuple[tuple[tuple[int, ...], ...], ...]) -> None:
    if world_size < 1:
        raise TopologyError(f"world size must be >= 1, got {world_size}")
    if not children:
        raise TopologyError("the tree needs at least one aggregation layer")
    below = world_size
    for n, layer in enumerate(children, start=1):
        flat = [c for kids in layer for c in kids]
        if any(len(kids) == 0 for kids in layer):
            raise TopologyError(f"layer {n} has an empty group; every group needs >= 1 child")
        if sorted(flat) != list(range(below)):
            what = "ranks" if n == 1 else f"layer-{n - 1} nodes"
            raise TopologyError(
                f"layer {n} groups must cover {what} 0..{below - 1} exactly once, got {sorted(flat)}"
            )
        below = len(layer)
    if below != 1:
        raise TopologyError(f"the top layer must have exactly one node (the root), got {below}")


def plan_fanouts(fanouts: Sequence[int], world_size: int) -> TreePlan:
    """Plan a balanced tree from fan-outs ``[f1, ..., fN]`` with contiguous rank blocks.

    Parameters
    ----------
    fanouts : sequence of int
        Children per node at layers 1..N; their product must equal ``world_size``.
    world_size : int
        Number of MPI ranks.

    Returns
    -------
    TreePlan

    Raises
    ------
    TopologyError
        If a fan-out is < 1 or the product does not match the world size.
    """
    fanouts = list(fanouts)
    if not fanouts:
        raise TopologyError("topology.fanouts is empty; give one fan-out per layer, e.g. [4, 2]")
    if any((not isinstance(f, int)) or f < 1 for f in fanouts):
        raise TopologyError(f"topology.fanouts={fanouts}: every fan-out must be an integer >= 1")
    product = 1
    for f in fanouts:
        product *= f
    if product != world_size:
        raise TopologyError(
            f"topology.fanouts={fanouts} needs {product} ranks, got {world_size}; "
            f"launch with mpiexec -n {product} or change the fan-outs so their product is {world_size}"
        )
    children = []
    count = world_size
    for f in fanouts:
        count //= f
        children.append(tuple(tuple(range(k * f, (k + 1) * f)) for k in range(count)))
    return TreePlan(world_size, tuple(children))


def plan_groups(groups: Any, world_size: int) -> TreePlan:
    """Plan a tree from an explicit nested list whose leaves are ranks.

    Parameters
    ----------
    groups : nested list of int
        The root's children; ``[[0, 1, 2], [3, 4, 5, 6, 7]]`` is a depth-2 tree with uneven groups,
        ``[0, 1, 2, 3]`` is depth 1 (FedAvg over four ranks).
    world_size : int
        Number of MPI ranks; the leaves must be exactly ``0..world_size-1``.

    Returns
    -------
    TreePlan

    Raises
    ------
    TopologyError
        On mixed depths, repeated or missing ranks, or non-integer leaves.
    """
    if not isinstance(groups, (list, tuple)) or len(groups) == 0:
        raise TopologyError(f"topology.groups={groups!r} must be a non-empty nested list of ranks")
    depth = _depth(groups, path="topology.groups")
    leaves = _leaves(groups)
    if sorted(leaves) != list(range(world_size)):
        missing = sorted(set(range(world_size)) - set(leaves))
        extra = sorted({r for r in leaves if not 0 <= r < world_size} | {r for r in leaves if leaves.count(r) > 1})
        raise TopologyError(
            f"topology.groups lists ranks {sorted(leaves)} but the world has ranks 0..{world_size - 1}"
            f" (missing {missing}, out of range or repeated {extra}); list every rank exactly once"
        )
    # Number the nodes of every layer in the order they appear in the spec (depth-first).
    counters = [0] * (depth + 1)
    layer_children: list[list[tuple[int, ...]]] = [[] for _ in range(depth)]

    def number(node: Any, layer: int) -> int:
        if layer == 0:
            return int(node)
        kids = tuple(number(child, layer - 1) for child in node)
        layer_children[layer - 1].append(kids)
        counters[layer] += 1
        return counters[layer] - 1

    number(groups, depth)
    return TreePlan(world_size, tuple(tuple(layer) for layer in layer_children))


def plan_nodes(
    node_names: Sequence[str], node_fanouts: Sequence[int] = ()
) -> TreePlan:
    """Plan one layer-1 group per physical node, with optional fan-outs above the node layer.

    Parameters
    ----------
    node_names : sequence of str
        ``node_names[r]`` is the host (or shared-memory domain) of rank ``r``.
    node_fanouts : sequence of int, optional
        Fan-outs for the layers above the nodes; their product must equal the node count. Empty
        means a single root above all nodes (depth 2), or depth 1 when everything is on one node.

    Returns
    -------
    TreePlan
    """
    world_size = len(node_names)
    order: dict[str, list[int]] = {}
    for rank, name in enumerate(node_names):
        order.setdefault(name, []).append(rank)
    node_groups = sorted(order.values(), key=lambda ranks: ranks[0])
    if len(node_groups) == 1 and not node_fanouts:
        return TreePlan(world_size, ((tuple(node_groups[0]),),))
    fanouts = list(node_fanouts) or [len(node_groups)]
    product = 1
    for f in fanouts:
        product *= f
    if product != len(node_groups):
        raise TopologyError(
            f"topology.node_fanouts={list(fanouts)} needs {product} nodes, but the job spans "
            f"{len(node_groups)} nodes ({', '.join(sorted(order))}); make the product {len(node_groups)}"
        )
    upper = plan_fanouts(fanouts, len(node_groups))
    return TreePlan(world_size, (tuple(tuple(g) for g in node_groups),) + upper.children)


def _depth(node: Any, path: str) -> int:
    if isinstance(node, bool) or not isinstance(node, (list, tuple, int)):
        raise TopologyError(f"{path}: {node!r} is neither a rank (int) nor a list of groups")
    if isinstance(node, int):
        return 0
    if len(node) == 0:
        raise TopologyError(f"{path} is an empty group; every group needs >= 1 member")
    depths = {_depth(child, f"{path}[{i}]") for i, child in enumerate(node)}
    if len(depths) != 1:
        raise TopologyError(
            f"{path} mixes ranks and groups at different depths ({sorted(depths)}); all ranks must sit at "
            "the same depth: wrap a lone rank in its own group, e.g. [[0, 1], [2]] instead of [[0, 1], 2]"
        )
    return depths.pop() + 1


def _leaves(node: Any) -> list[int]:
    if isinstance(node, int):
        return [node]
    return [leaf for child in node for leaf in _leaves(child)]
