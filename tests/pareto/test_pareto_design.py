"""Facts about where MAP evaluates first: one-hot corners, a scrambled Halton sequence, full grids."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from m3sb.pareto import grid, initial_design

SETTINGS = settings(max_examples=30, deadline=None)


@SETTINGS
@given(
    n_tasks=st.integers(2, 6),
    extra=st.integers(0, 30),
    seed=st.integers(0, 10_000),
    low=st.floats(-1.0, 0.0),
    high=st.floats(1.0, 3.0),
)
def test_initial_design_starts_with_the_one_hot_vectors_and_stays_in_the_box(
    n_tasks: int, extra: int, seed: int, low: float, high: float
) -> None:
    bounds = (low, high)  # contains 0 and 1, so the one-hot vectors are inside unclipped
    design = initial_design(n_tasks, n_tasks + extra, bounds, seed)
    assert design.shape == (n_tasks + extra, n_tasks)
    assert np.array_equal(design[:n_tasks], np.eye(n_tasks))
    assert np.all(design >= bounds[0]) and np.all(design <= bounds[1])


def test_initial_design_clips_the_one_hot_vectors_into_a_narrow_box() -> None:
    design = initial_design(3, 10, (0.2, 0.8), seed=0)
    expected = np.array([[0.8, 0.2, 0.2], [0.2, 0.8, 0.2], [0.2, 0.2, 0.8]])
    assert np.allclose(design[:3], expected, rtol=0, atol=1e-15)
    assert np.all(design >= 0.2) and np.all(design <= 0.8)


def test_initial_design_smaller_than_the_task_count_is_the_first_corners() -> None:
    assert np.array_equal(initial_design(5, 2, (0.0, 1.0), seed=3), np.eye(5)[:2])


@SETTINGS
@given(
    n_tasks=st.integers(2, 5), size=st.integers(1, 40), more=st.integers(1, 40), seed=st.integers(0, 10_000)
)
def test_a_larger_budget_extends_the_design(n_tasks: int, size: int, more: int, seed: int) -> None:
    """Raising the budget keeps every point already evaluated: designs are prefixes of each other."""
    small = initial_design(n_tasks, size, (-1.0, 2.0), seed)
    large = initial_design(n_tasks, size + more, (-1.0, 2.0), seed)
    assert np.array_equal(large[:size], small)


def test_the_space_filling_part_covers_every_half_of_every_axis() -> None:
    """Halton: of 16 points, each half of each axis holds 8 (a random sample would rarely)."""
    rest = initial_design(3, 3 + 16, (0.0, 1.0), seed=0)[3:]
    assert np.all(np.sum(rest < 0.5, axis=0) == 8)


@SETTINGS
@given(n_tasks=st.integers(2, 5), seed=st.integers(0, 10_000))
def test_initial_design_is_deterministic_per_seed_and_differs_across_seeds(n_tasks: int, seed: int) -> None:
    first = initial_design(n_tasks, 20, (0.0, 1.0), seed)
    again = initial_design(n_tasks, 20, (0.0, 1.0), seed)
    other = initial_design(n_tasks, 20, (0.0, 1.0), seed + 1)
    assert np.array_equal(first, again)
    assert np.array_equal(first[:n_tasks], other[:n_tasks])
    assert not np.any(np.all(np.isclose(first[n_tasks:], other[n_tasks:], rtol=0, atol=1e-12), axis=1))


def test_grid_reference_values() -> None:
    expected = np.array(
        [
            [0.0, 0.0],
            [0.0, 0.5],
            [0.0, 1.0],
            [0.5, 0.0],
            [0.5, 0.5],
            [0.5, 1.0],
            [1.0, 0.0],
            [1.0, 0.5],
            [1.0, 1.0],
        ]
    )
    assert np.array_equal(grid(3, 2, (0.0, 1.0)), expected)


@SETTINGS
@given(points=st.integers(2, 6), n_tasks=st.integers(1, 4), low=st.floats(-2.0, 0.0))
def test_grid_holds_every_combination_once(points: int, n_tasks: int, low: float) -> None:
    bounds = (low, low + 1.5)
    full = grid(points, n_tasks, bounds)
    assert full.shape == (points**n_tasks, n_tasks)
    assert len(np.unique(full, axis=0)) == points**n_tasks
    axis = np.linspace(bounds[0], bounds[1], points)
    for column in full.T:
        values, counts = np.unique(column, return_counts=True)
        assert np.array_equal(values, axis)
        assert np.all(counts == points ** (n_tasks - 1))
