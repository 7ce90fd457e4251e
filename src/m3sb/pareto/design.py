"""Where to evaluate first: the one-hot corners plus a space-filling set, and full grids.

The space-filling set is a scrambled Halton sequence: the design for a budget of n is the
first n points of the design for any larger budget, so raising the budget (or running
``bayesian``, whose design is the first 60% of ``map``'s) reuses every evaluation made.
"""

from __future__ import annotations

import numpy as np

Bounds = tuple[float, float]


def one_hot_points(n_tasks: int, bounds: Bounds) -> np.ndarray:
    """The T one-hot coefficient vectors (each task's vector alone), clipped into the box."""
    low, high = bounds
    return np.clip(np.eye(n_tasks), low, high)


def space_filling(n_points: int, n_tasks: int, bounds: Bounds, seed: int) -> np.ndarray:
    """The first ``n_points`` of a scrambled Halton sequence in the box (scipy's ``qmc``)."""
    from scipy.stats import qmc

    if n_points <= 0:
        return np.empty((0, n_tasks))
    sampler = qmc.Halton(d=n_tasks, scramble=True, seed=np.random.default_rng(seed))
    return np.asarray(qmc.scale(sampler.random(n_points), [bounds[0]] * n_tasks, [bounds[1]] * n_tasks))


def initial_design(n_tasks: int, n_points: int, bounds: Bounds, seed: int) -> np.ndarray:
    """The first ``n_points`` candidates: the T one-hot vectors, then a scrambled Halton sequence."""
    corners = one_hot_points(n_tasks, bounds)[:n_points]
    return np.vstack([corners, space_filling(n_points - len(corners), n_tasks, bounds, seed)])


def grid(points_per_axis: int, n_tasks: int, bounds: Bounds) -> np.ndarray:
    """Every point of a regular grid with ``points_per_axis`` values per task."""
    axis = np.linspace(bounds[0], bounds[1], points_per_axis)
    mesh = np.meshgrid(*([axis] * n_tasks), indexing="ij")
    return np.stack([m.reshape(-1) for m in mesh], axis=1)
