"""An aggregation-rule plug-in for hflmpi: the coordinate-wise trimmed mean, written by a user.

Use it without touching hflmpi (this directory on PYTHONPATH on every node)::

    [aggregation]
    robust = ["mean", "trimmed_mean_rule:TrimmedMean"]

A plug-in is any object with ``aggregate(updates, weights) -> Tensor``: ``updates`` is the
``[k, n]`` float32 tensor of the ``k`` children's updates ``x_c - x``, ``weights`` the ``[k]``
float64 weights the leader clamped (0 for a dropped child); it returns the ``[n]`` update the
layer applies, ``x_new = x + result``. A class is built with no arguments, so parameters are
class attributes (subclass to change them). See docs/strategies.md.
"""

from __future__ import annotations

import math

import torch


class TrimmedMean:
    """Per coordinate, drop the ``floor(trim * k)`` largest and smallest values, then average
    the rest with their weights (Yin et al., ICML 2018). Children of weight 0 are left out
    first and ``k`` counts the others."""

    trim = 0.2

    def aggregate(self, updates: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        keep = weights > 0
        values, w = updates[keep].to(torch.float64), weights[keep]
        k = values.shape[0]
        b = math.floor(self.trim * k)
        if k == 0 or 2 * b >= k:
            raise ValueError(f"trim={self.trim} leaves nothing of {k} children")
        order = torch.argsort(values, dim=0, stable=True)[b:k - b]   # [k - 2b, n]
        kept = torch.gather(values, 0, order)
        kept_w = w[order]
        return (kept * kept_w).sum(dim=0) / kept_w.sum(dim=0)
