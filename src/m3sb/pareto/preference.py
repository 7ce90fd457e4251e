"""Pick the point of a front that a preference (one weight per task) asks for."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np

from m3sb.pareto.evaluations import SearchError

Rule = Literal["weighted_sum", "chebyshev"]


def check_preference(preference: Sequence[float] | np.ndarray, n_tasks: int) -> np.ndarray:
    """The preference as an array; an error for a wrong length, negative, non-finite or all-zero weights."""
    try:
        weights = np.asarray(preference, dtype=float).reshape(-1)
    except (TypeError, ValueError):
        raise SearchError(f"preference must be numbers, one per task; got {preference!r}") from None
    if weights.size != n_tasks:
        raise SearchError(f"preference has {weights.size} weights for {n_tasks} tasks")
    if not np.all(np.isfinite(weights)) or np.any(weights < 0):
        raise SearchError(f"preference weights must be finite and >= 0, got {weights.tolist()}")
    if not np.any(weights > 0):
        raise SearchError("preference weights are all zero; give at least one task a positive weight")
    return weights


def select_index(
    scores: np.ndarray, preference: Sequence[float] | np.ndarray, rule: Rule = "weighted_sum"
) -> int:
    """Row of ``scores`` (shape (K, T), higher is better) that ``preference`` picks.

    ``weighted_sum`` is the seed's rule: L2-normalise the preference, maximise the
    weighted sum of the scores. ``chebyshev`` rescales each task's scores to [0, 1] over
    the front and minimises the largest weighted shortfall from the best, which also
    reaches points in non-convex parts of the front.
    """
    weights = check_preference(preference, scores.shape[1])
    if rule == "weighted_sum":
        return int(np.argmax(scores @ (weights / np.linalg.norm(weights))))
    if rule == "chebyshev":
        low, high = scores.min(axis=0), scores.max(axis=0)
        spread = np.where(high > low, high - low, 1.0)
        shortfall = (high - scores) / spread
        worst = (shortfall * (weights / weights.sum())).max(axis=1)
        return int(np.argmin(worst + 1e-9 * shortfall.sum(axis=1)))
    raise SearchError(f"unknown preference rule '{rule}'; choose weighted_sum or chebyshev")
