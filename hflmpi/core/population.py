"""Clients placed on ranks: which layers of a tree of clients live inside one rank, which span ranks.

With a population, the aggregation tree (:class:`hflmpi.core.topology.TreePlan`) is a tree of
*clients*, and every client lives on one MPI rank (:class:`Placement`). A layer-n node whose
clients all sit on one rank is aggregated in that rank's memory; a node whose clients sit on
several ranks *spans* them and is aggregated over a communicator of exactly those ranks: each rank
first adds up the children it *owns* (a child is owned by the rank of its lowest client), then MPI
adds the partial sums. A rank may hold clients of many in-rank nodes of a layer, but of at most one
spanning node per layer (a rank joins one communicator per layer); :func:`plan_population` names
any placement that breaks this, with a fix.

Pure: no MPI, no torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from hflmpi.core.topology import TopologyError, TreePlan

__all__ = ["Placement", "PopulationPlan", "place_clients", "plan_population"]


@dataclass(frozen=True)
class Placement:
    """The rank of every client.

    Attributes
    ----------
    ranks : int
        Number of MPI ranks.
    rank_of : tuple of int
        ``rank_of[c]`` is the rank that holds client ``c``.
    """

    ranks: int
    rank_of: tuple[int, ...]

    @property
    def clients(self) -> int:
        """Return the population size."""
        return len(self.rank_of)

    def clients_on(self, rank: int) -> tuple[int, ...]:
        """Return the clients on ``rank``, ascending."""
        return tuple(c for c, r in enumerate(self.rank_of) if r == rank)


def place_clients(count: int, ranks: int, explicit: Sequence[int] | None = None) -> Placement:
    """Place ``count`` clients on ``ranks`` ranks: contiguous blocks, or an explicit list.

    Blocks put client ``c`` on rank ``c * ranks // count``, so block sizes differ by at most one.

    Raises
    ------
    TopologyError
        Fewer clients than ranks (a rank would hold none), or an explicit list of the wrong
        length, with a rank out of range, or leaving a rank without clients.
    """
    if count < ranks:
        raise TopologyError(
            f"clients.count={count} is below the {ranks} ranks: every rank must hold at least one "
            f"client; use clients.count >= {ranks} or launch fewer ranks")
    if explicit is None:
        return Placement(ranks, tuple(c * ranks // count for c in range(count)))
    rank_of = tuple(int(r) for r in explicit)
    if len(rank_of) != count:
        raise TopologyError(f"clients.placement has {len(rank_of)} entries but clients.count="
                            f"{count}; give the rank of every client")
    bad = sorted({r for r in rank_of if not 0 <= r < ranks})
    if bad:
        raise TopologyError(f"clients.placement names ranks {bad[:8]} but the job has ranks "
                            f"0..{ranks - 1}; launch more ranks or fix the placement")
    empty = sorted(set(range(ranks)) - set(rank_of))
    if empty:
        raise TopologyError(f"clients.placement leaves ranks {empty[:8]} without clients; every "
                            "rank must hold at least one (launch fewer ranks)")
    return Placement(ranks, rank_of)


@dataclass(frozen=True)
class PopulationPlan:
    """A tree of clients mapped onto ranks (see the module docstring).

    Attributes
    ----------
    tree : TreePlan
        The aggregation tree; its leaves (``world_size``) are the clients.
    placement : Placement
        The rank of each client.
    """

    tree: TreePlan
    placement: Placement
    _members: tuple[tuple[tuple[int, ...], ...], ...] = field(repr=False, compare=False,
                                                               default=())
    _parent: tuple[tuple[int, ...], ...] = field(repr=False, compare=False, default=())

    @property
    def depth(self) -> int:
        """Return the number of aggregation layers."""
        return self.tree.depth

    @property
    def clients(self) -> int:
        """Return the population size."""
        return self.tree.world_size

    def members(self, layer: int, node: int) -> tuple[int, ...]:
        """Return the clients in the subtree of layer-``layer`` node ``node``, ascending."""
        return self._members[layer][node]

    def parent(self, layer: int, node: int) -> int:
        """Return the layer-(``layer`` + 1) node above layer-``layer`` node ``node``."""
        return self._parent[layer][node]

    def children(self, layer: int, node: int) -> tuple[int, ...]:
        """Return the children of layer-``layer`` node ``node`` (clients at layer 1)."""
        return self.tree.children[layer - 1][node]

    def node_count(self, layer: int) -> int:
        """Return the number of nodes at ``layer`` (0: clients)."""
        return self.tree.node_count(layer)

    def ranks_of(self, layer: int, node: int) -> tuple[int, ...]:
        """Return the ranks that hold clients of the node, ascending."""
        return tuple(sorted({self.placement.rank_of[c] for c in self.members(layer, node)}))

    def spans(self, layer: int, node: int) -> bool:
        """Tell whether the node's clients sit on more than one rank."""
        return len(self.ranks_of(layer, node)) > 1

    def owner(self, layer: int, node: int) -> int:
        """Return the rank that contributes the node to its parent: that of its lowest client."""
        return self.placement.rank_of[self.members(layer, node)[0]]

    def nodes_on(self, rank: int, layer: int) -> tuple[int, ...]:
        """Return the layer-``layer`` nodes that hold clients on ``rank``, ascending."""
        clients = self.placement.clients_on(rank)
        if layer == 0:
            return clients
        return tuple(sorted({self.node_of(c, layer) for c in clients}))

    def node_of(self, client: int, layer: int) -> int:
        """Return the layer-``layer`` node above ``client``."""
        node = client
        for n in range(layer):
            node = self._parent[n][node]
        return node

    def spanning_node(self, rank: int, layer: int) -> int | None:
        """Return the one spanning layer-``layer`` node ``rank`` takes part in, or ``None``."""
        spanning = [k for k in self.nodes_on(rank, layer) if self.spans(layer, k)]
        return spanning[0] if spanning else None

    def describe(self) -> dict[str, object]:
        """Return a JSON-serialisable description (stored in the run file)."""
        return {**self.tree.describe(), "clients": self.clients, "ranks": self.placement.ranks,
                "rank_of_client": list(self.placement.rank_of),
                "in_rank_layers": [n for n in range(1, self.depth + 1)
                                   if not any(self.spans(n, k) for k in range(self.node_count(n)))]}


def plan_population(tree: TreePlan, placement: Placement) -> PopulationPlan:
    """Map a tree of clients onto the ranks of ``placement`` and check that it can run.

    Raises
    ------
    TopologyError
        The tree's leaves are not the placement's clients, or a rank holds clients of two
        spanning nodes of one layer (it would need two communicators for that layer); the
        message names the rank, the layer and the nodes, and says how to fix it.
    """
    if tree.world_size != placement.clients:
        raise TopologyError(f"the tree has {tree.world_size} leaves but clients.count="
                            f"{placement.clients}; the tree's leaves are the clients")
    parents: list[tuple[int, ...]] = []
    members: list[tuple[tuple[int, ...], ...]] = [tuple((c,) for c in range(tree.world_size))]
    for n, layer in enumerate(tree.children, start=1):
        parent = [0] * tree.node_count(n - 1)
        for k, kids in enumerate(layer):
            for child in kids:
                parent[child] = k
        parents.append(tuple(parent))
        members.append(tuple(tuple(sorted(c for kid in kids for c in members[n - 1][kid]))
                             for kids in layer))
    plan = PopulationPlan(tree, placement, tuple(members), tuple(parents))
    for n in range(1, tree.depth + 1):
        for rank in range(placement.ranks):
            spanning = [k for k in plan.nodes_on(rank, n) if plan.spans(n, k)]
            if len(spanning) > 1:
                a, b = spanning[:2]
                raise TopologyError(
                    f"rank {rank} holds clients of layer-{n} groups {a} (clients "
                    f"{_span(plan.members(n, a))}) and {b} (clients {_span(plan.members(n, b))}), "
                    f"and both span several ranks: a rank can take part in one cross-rank group "
                    f"per layer. Launch a rank count whose blocks of "
                    f"{_block(placement)} clients do not straddle two layer-{n} groups (e.g. one "
                    f"that divides {_groups_hint(plan, n)}), or place the clients explicitly "
                    "(clients.placement)")
    return plan


def _span(clients: Sequence[int]) -> str:
    return f"{clients[0]}..{clients[-1]}" if len(clients) > 2 else ", ".join(map(str, clients))


def _block(placement: Placement) -> str:
    sizes = np.bincount(np.asarray(placement.rank_of), minlength=placement.ranks)
    low, high = int(sizes.min()), int(sizes.max())
    return str(low) if low == high else f"{low}-{high}"


def _groups_hint(plan: PopulationPlan, layer: int) -> str:
    return f"the {plan.node_count(layer)} layer-{layer} groups or is a multiple of it"
