r"""Byzantine-robust aggregation rules over the children's full updates (pure tensor math).

A robust layer-n leader replaces QMLHFL's weighted mean ``sum_c a_c d_c`` of the children's
updates ``d_c = x_c - x`` (arXiv 2505.08145, Eq. (3)) with a rule that a minority of arbitrary
("Byzantine") updates cannot drag far. All rules here need every child's update at the leader:
the MPI layer gathers the ``k`` float updates, in rank order, into one ``[k, n]`` tensor and calls
:func:`robust_update`; the leader then applies ``x_new = x + rule(updates)``.

Rules (``k`` children, ``n`` coordinates; children with weight 0 are removed first and ``k`` counts
only the others):

* ``"mean"``: the weighted mean ``sum_c a_c d_c``, ``a_c = w_c / sum w`` (no robustness; the
  baseline and a way to bisect).
* ``"median"`` (:func:`coordinate_median`): the coordinate-wise median (Yin et al.,
  "Byzantine-robust distributed learning: towards optimal statistical rates", ICML 2018).
  Unweighted, it is ``numpy.median``: the middle value for odd ``k``, the **average of the two
  middle values** for even ``k`` (``torch.median`` would return the lower one). Weighted, it is
  the midpoint of the set of minimisers of ``sum_c w_c |d_c - m|``: sort a coordinate's values,
  accumulate their weights, and take the first value whose cumulative weight reaches half the
  total; if the cumulative weight there equals half the total exactly (to ``1e-12`` relative),
  average it with the next value. Equal weights therefore give exactly the unweighted median.
  Tolerates fewer than ``k/2`` Byzantine children (less than half the weight when weighted).
* ``"trimmed_mean"`` (:func:`trimmed_mean`): per coordinate, drop the ``b`` largest and ``b``
  smallest values and average the remaining ``k - 2b`` (Yin et al. 2018), with
  ``b = floor(trim * k)`` for a float ``trim`` in ``[0, 0.5)`` or ``b = trim`` for an int. With
  weights, the kept values are averaged with their weights (the trimming itself counts children,
  not weight). Tolerates ``b`` Byzantine children; needs ``2b < k``.
* ``"krum"`` (:func:`krum`): Krum / multi-Krum (Blanchard et al., "Machine learning with
  adversaries: Byzantine tolerant gradient descent", NeurIPS 2017). Each child's score is the sum of
  squared distances to its ``k - f - 2`` nearest other children; the ``m`` children with the
  lowest scores (ties: lower index) are averaged (with their weights, if given). ``m = 1`` is Krum.
  Tolerates ``f`` Byzantine children; needs ``2f + 2 < k``.

Non-finite entries sort as extreme values (``torch.sort`` puts NaN after ``+inf``), so the median
and trimmed mean stay finite while at most the rule's breakdown number of children send them; Krum
gives such children an infinite score.

Memory: the leader holds the ``k * n`` gathered floats. The rules work on blocks of coordinates so
that temporaries stay near ``chunk_size * k`` elements (sort values and int64 indices, so about
``12 * chunk_size * k`` bytes for float32); the default block holds ``2**22 / k`` coordinates.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch

__all__ = [
    "RULES",
    "weighted_mean",
    "coordinate_median",
    "trimmed_mean",
    "trim_count",
    "krum",
    "krum_scores",
    "max_byzantine",
    "robust_update",
]

RULES = ("mean", "median", "trimmed_mean", "krum")
"""Names accepted by :func:`robust_update`."""

_CHUNK_ELEMENTS = 1 << 22  # default temporaries: about this many (k * coordinates) elements
_HALF_TOLERANCE = 1e-12  # relative tolerance of "cumulative weight == half the total"


# --------------------------------------------------------------------------------------------
# Validation and chunking
# --------------------------------------------------------------------------------------------


def _check_updates(updates: torch.Tensor) -> torch.Tensor:
    if not isinstance(updates, torch.Tensor) or not updates.is_floating_point():
        raise TypeError(
            "updates must be a floating-point tensor [k, n], got "
            f"{getattr(updates, 'dtype', updates)!r}"
        )
    if updates.dim() != 2 or updates.shape[0] < 1:
        raise ValueError(
            f"updates must have shape [k, n] with k >= 1 children (one row each), got "
            f"{tuple(updates.shape)}"
        )
    return updates


def _check_weights(
    updates: torch.Tensor, weights: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Return the rows with positive weight and their float64 weights (``None`` passes through)."""
    if weights is None:
        return updates, None
    w = torch.as_tensor(weights, dtype=torch.float64).reshape(-1)
    k = updates.shape[0]
    if w.numel() != k:
        raise ValueError(f"weights has {w.numel()} entries for k={k} updates; give one per child")
    if not bool(torch.isfinite(w).all()) or bool((w < 0).any()):
        raise ValueError(f"weights={w.tolist()} must be finite and >= 0")
    keep = w > 0
    if not bool(keep.any()):
        raise ValueError("every child has weight 0: nothing to aggregate (every client dropped?)")
    if bool(keep.all()):
        return updates, w.to(updates.device)
    index = keep.nonzero().reshape(-1)
    return updates.index_select(0, index.to(updates.device)), w[keep].to(updates.device)


def _chunk_size(k: int, chunk_size: int | None) -> int:
    if chunk_size is None:
        return max(1, _CHUNK_ELEMENTS // k)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(
            f"chunk_size={chunk_size!r} must be an integer >= 1 (coordinates per block)"
        )
    return chunk_size


def _chunks(n: int, size: int) -> Iterator[slice]:
    for start in range(0, n, size):
        yield slice(start, min(n, start + size))


def _new_out(updates: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    n = updates.shape[1]
    if out is None:
        return torch.empty(n, dtype=updates.dtype, device=updates.device)
    if out.numel() != n or not out.is_floating_point() or out.dim() != 1:
        raise ValueError(f"out must be a 1-D float tensor of {n} elements, got {tuple(out.shape)}")
    return out


# --------------------------------------------------------------------------------------------
# Rules
# --------------------------------------------------------------------------------------------


def weighted_mean(
    updates: torch.Tensor,
    weights: torch.Tensor | None = None,
    *,
    chunk_size: int | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Return ``sum_c a_c updates[c]`` with ``a_c = w_c / sum(w)`` (uniform if ``weights`` is None).

    The non-robust baseline, accumulated in float64 per block.

    Parameters
    ----------
    updates : Tensor
        ``[k, n]`` float tensor, one child's update per row.
    weights : Tensor, optional
        ``[k]`` non-negative weights (samples held); children with weight 0 are ignored.
    chunk_size : int, optional
        Coordinates per block (default ``2**22 // k``).
    out : Tensor, optional
        1-D float tensor of ``n`` elements to write into.

    Returns
    -------
    Tensor
        The ``[n]`` aggregate, in ``updates``' dtype unless ``out`` is given.
    """
    updates, w = _check_weights(_check_updates(updates), weights)
    k, n = updates.shape
    a = torch.full((k,), 1.0 / k, dtype=torch.float64) if w is None else w / w.sum()
    a = a.to(updates.device)[:, None]
    out = _new_out(updates, out)
    for cols in _chunks(n, _chunk_size(k, chunk_size)):
        out[cols] = (updates[:, cols].to(torch.float64) * a).sum(dim=0)
    return out


def coordinate_median(
    updates: torch.Tensor,
    weights: torch.Tensor | None = None,
    *,
    chunk_size: int | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Return the coordinate-wise (weighted) median of the children's updates.

    Unweighted: ``numpy.median(updates, axis=0)`` semantics (even ``k`` averages the two middle
    values). Weighted: the midpoint of the minimisers of ``sum_c w_c |updates[c] - m|`` per
    coordinate (see the module docstring for the exact tie rule).

    Parameters
    ----------
    updates : Tensor
        ``[k, n]`` float tensor, one child's update per row.
    weights : Tensor, optional
        ``[k]`` non-negative weights; children with weight 0 are ignored.
    chunk_size : int, optional
        Coordinates per block (default ``2**22 // k``).
    out : Tensor, optional
        1-D float tensor of ``n`` elements to write into.

    Returns
    -------
    Tensor
        The ``[n]`` median, in ``updates``' dtype unless ``out`` is given.
    """
    updates, w = _check_weights(_check_updates(updates), weights)
    k, n = updates.shape
    out = _new_out(updates, out)
    if k == 1:
        out.copy_(updates[0])
        return out
    for cols in _chunks(n, _chunk_size(k, chunk_size)):
        block = updates[:, cols]
        if w is None:
            values = torch.sort(block, dim=0).values
            lower, upper = values[(k - 1) // 2], values[k // 2]
            out[cols] = lower if k % 2 else (lower + upper) / 2
            continue
        values, order = torch.sort(block, dim=0, stable=True)
        cumulative = torch.cumsum(w[order], dim=0)  # [k, c] float64
        total = float(w.sum())
        half = total * (1.0 - _HALF_TOLERANCE)
        # index of the first sorted value whose cumulative weight reaches half the total
        first = (2.0 * cumulative < half).sum(dim=0, keepdim=True).clamp_(max=k - 1)
        lower = values.gather(0, first)
        tie = 2.0 * cumulative.gather(0, first) <= total * (1.0 + _HALF_TOLERANCE)
        upper = values.gather(0, (first + 1).clamp_(max=k - 1))
        out[cols] = torch.where(tie, (lower + upper) / 2, lower).reshape(-1)
    return out


def trim_count(trim: float | int, k: int) -> int:
    """Return ``b``, the number of values trimmed from each end among ``k``.

    Parameters
    ----------
    trim : float or int
        A fraction in ``[0, 0.5)`` (``b = floor(trim * k)``) or a count ``b >= 0``.
    k : int
        Number of children (with positive weight).

    Raises
    ------
    ValueError
        If ``trim`` is out of range or ``2b >= k`` (nothing would be left to average).
    """
    if isinstance(trim, bool) or not isinstance(trim, (int, float)):
        raise TypeError(f"trim={trim!r} must be a fraction in [0, 0.5) or an integer count")
    if isinstance(trim, int):
        if trim < 0:
            raise ValueError(f"trim={trim} must be >= 0 (values dropped at each end)")
        b = trim
    else:
        if not 0.0 <= trim < 0.5:
            raise ValueError(f"trim={trim} must be a fraction in [0, 0.5) or an integer count")
        b = math.floor(trim * k)
    if 2 * b >= k:
        raise ValueError(
            f"trimmed mean with trim={trim} drops b={b} values at each end of k={k} children, "
            f"leaving none (needs 2b < k); lower trim or use more children"
        )
    return b


def trimmed_mean(
    updates: torch.Tensor,
    trim: float | int,
    weights: torch.Tensor | None = None,
    *,
    chunk_size: int | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Return the coordinate-wise mean after dropping the ``b`` largest and ``b`` smallest values.

    Parameters
    ----------
    updates : Tensor
        ``[k, n]`` float tensor, one child's update per row.
    trim : float or int
        Fraction (``b = floor(trim * k)``, ``0 <= trim < 0.5``) or count ``b``; see
        :func:`trim_count`.
    weights : Tensor, optional
        ``[k]`` non-negative weights; the ``k - 2b`` kept values of a coordinate are averaged with
        their children's weights. Children with weight 0 are removed before ``b`` is computed.
    chunk_size : int, optional
        Coordinates per block (default ``2**22 // k``).
    out : Tensor, optional
        1-D float tensor of ``n`` elements to write into.

    Returns
    -------
    Tensor
        The ``[n]`` aggregate (accumulated in float64), in ``updates``' dtype unless ``out`` is
        given.
    """
    updates, w = _check_weights(_check_updates(updates), weights)
    k, n = updates.shape
    b = trim_count(trim, k)
    out = _new_out(updates, out)
    for cols in _chunks(n, _chunk_size(k, chunk_size)):
        block = updates[:, cols]
        if w is None:
            kept = torch.sort(block, dim=0).values[b : k - b] if b else block
            out[cols] = kept.to(torch.float64).mean(dim=0)
            continue
        values, order = torch.sort(block, dim=0, stable=True)
        kept_w = w[order[b : k - b]]
        kept = values[b : k - b].to(torch.float64)
        out[cols] = (kept * kept_w).sum(dim=0) / kept_w.sum(dim=0)
    return out


def krum_scores(updates: torch.Tensor, f: int, *, chunk_size: int | None = None) -> torch.Tensor:
    """Return Krum's score of each child: the sum of its ``k - f - 2`` smallest squared distances.

    Distances are accumulated in float64 over blocks of coordinates (``O(k^2 n)`` work, computed
    from differences, not from a Gram matrix, so there is no cancellation). A non-finite distance
    counts as ``+inf``.

    Parameters
    ----------
    updates : Tensor
        ``[k, n]`` float tensor.
    f : int
        Assumed number of Byzantine children; needs ``2f + 2 < k``.
    chunk_size : int, optional
        Coordinates per block.

    Returns
    -------
    Tensor
        ``[k]`` float64 scores.
    """
    updates = _check_updates(updates)
    k, n = updates.shape
    _check_krum(f, 1, k)
    distances = torch.zeros(k, k, dtype=torch.float64, device=updates.device)
    for cols in _chunks(n, _chunk_size(k, chunk_size)):
        block = updates[:, cols].to(torch.float64)
        for i in range(k):
            distances[i] += (block - block[i]).square_().sum(dim=1)
    distances = torch.nan_to_num(distances, nan=math.inf)
    distances.fill_diagonal_(math.inf)  # a child is not its own neighbour
    nearest = torch.sort(distances, dim=1).values[:, : k - f - 2]
    return nearest.sum(dim=1)


def _check_krum(f: Any, m: Any, k: int) -> None:
    if isinstance(f, bool) or not isinstance(f, int) or f < 0:
        raise ValueError(f"krum f={f!r} must be an integer >= 0 (assumed Byzantine children)")
    if 2 * f + 2 >= k:
        raise ValueError(
            f"krum with f={f} Byzantine children needs k > 2f + 2 = {2 * f + 2} children, "
            f"got k={k}; lower f or use more children"
        )
    if isinstance(m, bool) or not isinstance(m, int) or not 1 <= m <= k - f:
        raise ValueError(
            f"krum m={m!r} must be an integer in 1..k-f = 1..{k - f} (children averaged)"
        )


def krum(
    updates: torch.Tensor,
    f: int,
    weights: torch.Tensor | None = None,
    *,
    m: int = 1,
    chunk_size: int | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Return Krum's choice (``m = 1``) or the multi-Krum average of the ``m`` best-scored children.

    Parameters
    ----------
    updates : Tensor
        ``[k, n]`` float tensor.
    f : int
        Assumed number of Byzantine children; needs ``2f + 2 < k`` (``k`` counts positive weights).
    weights : Tensor, optional
        ``[k]`` non-negative weights: children with weight 0 are removed; the selected children are
        averaged with their weights. Scores ignore weights.
    m : int
        Number of children averaged (``1 <= m <= k - f``).
    chunk_size : int, optional
        Coordinates per block.
    out : Tensor, optional
        1-D float tensor of ``n`` elements to write into.

    Returns
    -------
    Tensor
        The ``[n]`` aggregate, in ``updates``' dtype unless ``out`` is given.
    """
    updates, w = _check_weights(_check_updates(updates), weights)
    k = updates.shape[0]
    _check_krum(f, m, k)
    scores = krum_scores(updates, f, chunk_size=chunk_size)
    chosen = torch.sort(scores, stable=True).indices[:m]
    chosen_w = None if w is None else w[chosen]
    return weighted_mean(updates[chosen], chosen_w, chunk_size=chunk_size, out=out)


# --------------------------------------------------------------------------------------------
# Dispatcher
# --------------------------------------------------------------------------------------------

_PARAMS: dict[str, tuple[set[str], set[str]]] = {  # rule -> (required, optional) parameters
    "mean": (set(), {"chunk_size"}),
    "median": (set(), {"chunk_size"}),
    "trimmed_mean": ({"trim"}, {"chunk_size"}),
    "krum": ({"f"}, {"m", "chunk_size"}),
}


def _check_params(name: str, params: dict[str, Any]) -> None:
    if name not in _PARAMS:
        raise ValueError(f"robust rule {name!r} is unknown; choose one of {', '.join(RULES)}")
    required, optional = _PARAMS[name]
    missing = sorted(required - params.keys())
    unknown = sorted(params.keys() - required - optional)
    if missing:
        raise ValueError(f"robust rule {name!r} needs parameter(s) {', '.join(missing)}")
    if unknown:
        allowed = ", ".join(sorted(required | optional)) or "none"
        raise ValueError(
            f"robust rule {name!r} got unknown parameter(s) {', '.join(unknown)}; "
            f"allowed: {allowed}"
        )


def max_byzantine(name: str, k: int, **params: Any) -> int:
    """Return how many of ``k`` children the rule tolerates being Byzantine.

    ``mean``: 0; ``median``: ``ceil(k/2) - 1`` (unweighted); ``trimmed_mean``: ``b``;
    ``krum``: ``f``. Validates the parameters like :func:`robust_update`.
    """
    _check_params(name, params)
    if k < 1:
        raise ValueError(f"k={k} must be >= 1")
    if name == "mean":
        return 0
    if name == "median":
        return (k + 1) // 2 - 1
    if name == "trimmed_mean":
        return trim_count(params["trim"], k)
    _check_krum(params["f"], params.get("m", 1), k)
    return int(params["f"])


def robust_update(
    name: str,
    updates: torch.Tensor,
    weights: torch.Tensor | None = None,
    *,
    out: torch.Tensor | None = None,
    **params: Any,
) -> torch.Tensor:
    """Aggregate the children's updates with the rule ``name`` (see :data:`RULES`).

    Parameters
    ----------
    name : str
        ``"mean"``, ``"median"``, ``"trimmed_mean"`` (needs ``trim``) or ``"krum"`` (needs ``f``,
        optional ``m``).
    updates : Tensor
        ``[k, n]`` float tensor of the children's unscaled updates ``x_c - x``, in rank order.
    weights : Tensor, optional
        ``[k]`` non-negative weights (``W_c``); 0 removes a child.
    out : Tensor, optional
        1-D float tensor of ``n`` elements to write into.
    **params
        The rule's parameters (``trim``; ``f``, ``m``; ``chunk_size`` for every rule).

    Returns
    -------
    Tensor
        The ``[n]`` aggregated update; the leader's new model is ``x + result``.

    Raises
    ------
    ValueError
        Unknown rule, missing or unknown parameters, or parameters the number of children
        cannot satisfy; the message names the rule, the value and the constraint.
    """
    _check_params(name, params)
    if name == "mean":
        return weighted_mean(updates, weights, out=out, **params)
    if name == "median":
        return coordinate_median(updates, weights, out=out, **params)
    if name == "trimmed_mean":
        trim = params.pop("trim")
        return trimmed_mean(updates, trim, weights, out=out, **params)
    f = params.pop("f")
    return krum(updates, f, weights, out=out, **params)
