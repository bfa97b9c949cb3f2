"""Robust rules and differential privacy at the nodes of a population (:mod:`hflmpi.mpi.population`).

The rank engine's :class:`hflmpi.mpi.layers.RobustLayer` and :class:`~hflmpi.mpi.layers.
PrivateLayer`, for a tree of clients placed on ranks. A node aggregates over its *participating*
children (weight ``W_c > 0`` this round), sorted by child index:

* a robust layer (``aggregation.robust[n-1]`` other than ``"mean"``, exact layers only):
  ``x_node = x + rule(d_c, W_c)`` with ``d_c = x_c - x`` in float32 (:func:`hflmpi.core.robust.
  robust_update`, or a plug-in through :func:`hflmpi.core.strategy.apply_rule`). The weights are
  the participants' samples (or client counts), which every rank computes from the seed: nothing
  is claimed, so nothing needs clamping. A node spanning ranks needs every row on every rank: each
  rank hands the rows of the children it owns to one ``Allgatherv`` over the node's communicator,
  and every rank reorders them by child index, so every rank computes the same bits;
* the private layer (``privacy.layer = n``): each participant's update is clipped to ``C``
  (:func:`hflmpi.core.privacy.clip_update`) before the layer's exact or quantized sum; central
  mode adds ``N(0, (sigma C max_c a_c)^2)`` once to the node's model, the same bits on every rank
  of the node (reproducible noise: a stream keyed by (seed, ``"dp"``, the node's lowest client,
  step, layer); OS CSPRNG noise: drawn on the node's lowest rank and sent with ``Bcast``);
  distributed mode adds to each participant's clipped update its ``1/sqrt(k)`` share (``k``
  participants of the node), divided by ``a_c`` as the sum multiplies by it.

The streams are keyed by clients, never by ranks, so with reproducible noise the result is the
same bits on any number of ranks, and with one client per rank the same as the rank engine's.

A rule that cannot combine a node's children (e.g. krum's ``f`` too large for the participants
left in a round), a plug-in that raises, or an update holding NaN/Inf at the private layer
leaves the node's model as it was; after the up-pass every rank of the run learns the first
failure in one small ``Allreduce`` (and a ``Bcast`` of its text) and raises the same
:class:`hflmpi.mpi.layers.LayerFailedError`, so no rank waits in a collective the others left.
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

import numpy as np
import torch
from mpi4py import MPI

from hflmpi.config import RunConfig
from hflmpi.config.strategy import load_rules
from hflmpi.core.population import PopulationPlan
from hflmpi.core.privacy import clip_update, gaussian_noise, noise_std
from hflmpi.core.rng import torch_generator
from hflmpi.core.robust import robust_update
from hflmpi.core.strategy import apply_rule, rule_name
from hflmpi.mpi.guard import agree
from hflmpi.mpi.layers import LayerFailedError, PrivacyOptions, rule_params
from hflmpi.mpi.messages import allreduce_int, bcast_text

__all__ = ["PopulationRules", "participants", "rules_from_config"]

_log = logging.getLogger(__name__)

_FAILURE_BYTES = 8192  # a node's failure text, shared with every rank

Child = tuple[int, float, torch.Tensor]  # (lowest client, a_c, model)


def participants(plan: PopulationPlan, n: int, k: int, weights: Sequence[np.ndarray]) -> list[int]:
    """Return the participating children of layer-``n`` node ``k`` (weight > 0), ascending."""
    return sorted(c for c in plan.children(n, k) if weights[n - 1][c] > 0)


class PopulationRules:
    """The robust rules and the private layer of a population's tree (see the module docstring).

    Parameters
    ----------
    plan : PopulationPlan
        The tree of clients on the ranks.
    rank : int
        This rank (in the run's communicator).
    rules : sequence
        Per layer: ``"mean"``, a rule of :data:`hflmpi.core.robust.RULES`, or a plug-in object.
    params : dict
        ``{"trim": ..., "f": ...}`` (``aggregation.trim``, ``aggregation.krum_f``).
    privacy : PrivacyOptions or None
        The private layer.
    seed : int
        Run seed (keys the reproducible noise).
    """

    def __init__(self, plan: PopulationPlan, rank: int, rules: Sequence[Any],
                 params: dict[str, Any], privacy: PrivacyOptions | None, seed: int) -> None:
        self.plan = plan
        self.rank = rank
        self.rules = list(rules) or ["mean"] * plan.depth
        self.params = [rule_params(r, params) if isinstance(r, str) else {} for r in self.rules]
        self.privacy = privacy
        self.seed = seed
        self.failure: str | None = None

    def robust_at(self, n: int) -> bool:
        """Tell whether layer ``n`` combines its children with a robust rule."""
        rule = self.rules[n - 1]
        return not (isinstance(rule, str) and rule == "mean")

    def private_at(self, n: int) -> bool:
        """Tell whether layer ``n`` is the private layer."""
        return self.privacy is not None and self.privacy.layer == n

    def checked_up_to(self, top: int) -> bool:
        """Tell whether an aggregation of layers ``1..top`` can fail (and must share failures)."""
        return any(self.robust_at(n) or self.private_at(n) for n in range(1, top + 1))

    # ----------------------------------------------------------------------------------------
    # Robust layers

    def combine(self, n: int, k: int, children: list[Child], anchor: torch.Tensor,
                weights: Sequence[np.ndarray], sub: MPI.Comm | None) -> int:
        """Set node ``k``'s model (``anchor``) to ``anchor + rule(updates)``; return MPI bytes.

        Collective over ``sub`` (the node's communicator) when the node spans ranks.
        """
        kids = participants(self.plan, n, k, weights)
        mine = torch.stack([(model - anchor).to(torch.float32) for _, _, model in children]) \
            if children else torch.empty((0, anchor.numel()), dtype=torch.float32)
        rows, sent = self._all_rows(n, k, kids, mine.cpu().contiguous(), sub)
        w = torch.tensor([float(weights[n - 1][c]) for c in kids], dtype=torch.float64)
        rule = self.rules[n - 1]
        try:
            combined = (robust_update(rule, rows, w, **self.params[n - 1])
                        if isinstance(rule, str) else apply_rule(rule, rows, w))
        except ValueError as exc:
            shown = ", ".join(f"{x:g}" for x in w.tolist()[:16]) + (", ..." if len(kids) > 16
                                                                    else "")
            what = f"robust={rule!r}" if isinstance(rule, str) else f"the {rule_name(rule)}"
            self._fail(f"{what} at layer {n} group {k} could not combine its {len(kids)} "
                       f"participating children (weights [{shown}]): {str(exc)[:1000]}")
            return sent
        anchor.copy_(anchor + combined.to(anchor.device, anchor.dtype))
        return sent

    def _all_rows(self, n: int, k: int, kids: list[int], mine: torch.Tensor,
                  sub: MPI.Comm | None) -> tuple[torch.Tensor, int]:
        """Return every participating child's update row, by child index (and bytes sent)."""
        if sub is None:
            return mine, 0
        plan, numel = self.plan, mine.shape[1]
        ranks = plan.ranks_of(n, k)  # the node communicator's order (Split with key = rank)
        owned = [[c for c in kids if plan.owner(n - 1, c) == r] for r in ranks]
        order = [c for group in owned for c in group]
        counts = [len(group) * numel for group in owned]
        displs = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64).tolist()
        gathered = np.empty((len(order), numel), dtype=np.float32)
        sub.Allgatherv([mine.numpy(), MPI.FLOAT], [gathered, counts, displs, MPI.FLOAT])
        by_child = sorted(range(len(order)), key=order.__getitem__)
        return torch.from_numpy(gathered[by_child]), mine.numel() * 4

    # ----------------------------------------------------------------------------------------
    # The private layer

    def privatize(self, n: int, k: int, children: list[Child], anchor: torch.Tensor,
                  weights: Sequence[np.ndarray], step: int) -> list[Child]:
        """Return the children with clipped updates (plus distributed noise) at the private layer.

        Other layers: the children unchanged.
        """
        if not self.private_at(n):
            return children
        options = self.privacy
        assert options is not None
        k_participants, max_share = self._shares(n, k, weights)
        out = []
        for client, share, model in children:
            try:
                update, _ = clip_update(model - anchor, options.clip)
            except ValueError as exc:
                self._fail(f"privacy.layer={n}: the update of the child of group {k} whose "
                           f"lowest client is {client} could not be clipped: {exc}")
                update = torch.zeros_like(anchor)
            if options.mode == "distributed" and share > 0:
                std = noise_std(options.noise_multiplier, options.clip, max_share=max_share,
                                mode="distributed", participants=k_participants)
                # the sum multiplies by the share, so the noise is pre-divided by it
                update += gaussian_noise(update.shape, std / share, 1.0,
                                         self._generator(client, step, n, anchor.device),
                                         anchor.device, update.dtype)
            out.append((client, share, anchor + update))
        return out

    def add_central_noise(self, n: int, k: int, model: torch.Tensor,
                          weights: Sequence[np.ndarray], step: int, sub: MPI.Comm | None) -> int:
        """Add node ``k``'s central noise to its ``model`` (the same bits on all its ranks).

        Collective over ``sub`` (a ``Bcast`` of the OS CSPRNG noise from the node's lowest rank)
        when the node spans ranks. Returns the bytes handed to MPI.
        """
        options = self.privacy
        if options is None or options.layer != n or options.mode != "central":
            return 0
        _, max_share = self._shares(n, k, weights)
        std = noise_std(options.noise_multiplier, options.clip, max_share=max_share,
                        mode="central")
        generator = self._generator(self.plan.members(n, k)[0], step, n, model.device)
        if generator is not None or sub is None:
            model.add_(gaussian_noise(model.shape, std, 1.0, generator, model.device, model.dtype))
            return 0
        noise = (gaussian_noise(model.shape, std, 1.0, None, "cpu", model.dtype)
                 if sub.Get_rank() == 0 else torch.empty(model.shape, dtype=model.dtype))
        sub.Bcast(noise.numpy(), root=0)  # the node's ranks: one draw, the same bits everywhere
        model.add_(noise.to(model.device))
        return noise.numel() * noise.element_size()

    def _shares(self, n: int, k: int, weights: Sequence[np.ndarray]) -> tuple[int, float]:
        """Return node ``k``'s participant count and ``max_c a_c`` (public: from the weights)."""
        kids = participants(self.plan, n, k, weights)
        return len(kids), max(float(weights[n - 1][c]) for c in kids) / float(weights[n][k])

    def _generator(self, client: int, step: int, n: int,
                   device: torch.device) -> torch.Generator | None:
        """Return None (OS CSPRNG noise) or the stream of the insecure reproducible mode."""
        assert self.privacy is not None
        if not self.privacy.insecure_reproducible_noise:
            return None
        return torch_generator(self.seed, purpose="dp", rank=client, round=step, layer=n,
                               device=device)

    # ----------------------------------------------------------------------------------------
    # Failures

    def _fail(self, text: str) -> None:
        if self.failure is None:
            self.failure = text

    def raise_failures(self, comm: MPI.Comm, top: int, step: int) -> None:
        """Raise the first failure of this aggregation on every rank of ``comm`` (all ranks).

        A no-op without a robust or private layer in ``1..top`` (every rank knows which layers
        close, so every rank makes the same choice).
        """
        if not self.checked_up_to(top):
            return
        size = comm.Get_size()
        first = allreduce_int(comm, comm.Get_rank() if self.failure is not None else size,
                              MPI.MIN)
        self.failure, failure = None, self.failure
        if first == size:
            return
        what = f"the aggregation at step {step}: sharing a node's failure"
        text = bcast_text(comm, failure, root=first, max_bytes=_FAILURE_BYTES, what=what)
        raise LayerFailedError(
            f"the aggregation of layers 1..{top} at step {step} failed on rank {first}: {text}; "
            "every rank stops here (check the robust rule's parameters against the participants "
            "a group can have in a round: clients.cohort, clients.online)")


def rules_from_config(config: RunConfig, comm: MPI.Comm,
                      plan: PopulationPlan) -> PopulationRules | None:
    """Return the config's robust layers and private layer (None without either); all ranks."""
    agg, privacy = config.aggregation, config.privacy
    if all(rule == "mean" for rule in agg.robust) and not privacy.layer:
        return None
    from hflmpi.federation import _INSECURE_NOISE_WARNING

    if privacy.layer and privacy.insecure_reproducible_noise and comm.Get_rank() == 0:
        _log.warning(_INSECURE_NOISE_WARNING)
    rules = agree(comm, "loading the robust rules", lambda: load_rules(agg.robust))  # plug-ins
    options = (PrivacyOptions(privacy.layer, privacy.clip, privacy.noise_multiplier, privacy.mode,
                              privacy.insecure_reproducible_noise) if privacy.layer else None)
    return PopulationRules(plan, comm.Get_rank(), rules, {"trim": agg.trim, "f": agg.krum_f},
                           options, config.run.seed)
