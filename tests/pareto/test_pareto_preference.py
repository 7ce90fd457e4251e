"""Facts about picking a point of a front from a preference: weighted sum and Chebyshev."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from m3sb.pareto import SearchError, select_index

SETTINGS = settings(max_examples=60, deadline=None)
GOLDEN = (3 - np.sqrt(5)) / 2  # t = (1 - t)^2


@st.composite
def scores_and_preference(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray]:
    count, tasks = draw(st.integers(1, 30)), draw(st.integers(2, 5))
    # eighths: ties and near-ties happen, but no difference hides below Chebyshev's 1e-9 tie-break
    scores = draw(hnp.arrays(int, (count, tasks), elements=st.integers(-80, 80))) / 8.0
    weights = draw(hnp.arrays(float, tasks, elements=st.floats(0.0, 5.0)))
    weights[draw(st.integers(0, tasks - 1))] += 0.5  # at least one positive weight
    return scores, weights


@SETTINGS
@given(case=scores_and_preference())
def test_weighted_sum_is_the_argmax_of_scores_times_the_unit_preference(
    case: tuple[np.ndarray, np.ndarray],
) -> None:
    scores, weights = case
    assert select_index(scores, weights) == int(np.argmax(scores @ (weights / np.linalg.norm(weights))))


@SETTINGS
@given(case=scores_and_preference(), factor=st.sampled_from([1e-3, 0.37, 2.0, 1e4]))
def test_scaling_the_preference_does_not_change_the_pick(
    case: tuple[np.ndarray, np.ndarray], factor: float
) -> None:
    scores, weights = case
    for rule in ("weighted_sum", "chebyshev"):
        assert select_index(scores, weights * factor, rule) == select_index(scores, weights, rule)


@SETTINGS
@given(case=scores_and_preference())
def test_one_hot_preference_picks_the_best_point_for_that_task(case: tuple[np.ndarray, np.ndarray]) -> None:
    scores, _ = case
    for task in range(scores.shape[1]):
        one_hot = np.eye(scores.shape[1])[task]
        for rule in ("weighted_sum", "chebyshev"):
            assert scores[select_index(scores, one_hot, rule), task] == scores[:, task].max()


@SETTINGS
@given(case=scores_and_preference())
def test_chebyshev_never_picks_a_dominated_point(case: tuple[np.ndarray, np.ndarray]) -> None:
    scores, weights = case
    pick = scores[select_index(scores, weights, "chebyshev")]
    dominating = np.all(scores >= pick, axis=1) & np.any(scores > pick, axis=1)
    assert not dominating.any()


def _sagging_front(count: int = 1001) -> np.ndarray:
    """f1 = t, f2 = (1 - t)^2: every point non-dominated, the middle bent inwards (non-convex)."""
    t = np.linspace(0.0, 1.0, count)
    return np.stack([t, (1.0 - t) ** 2], axis=1)


@SETTINGS
@given(weights=hnp.arrays(float, 2, elements=st.floats(0.01, 1.0)))
def test_weighted_sum_only_reaches_the_ends_of_a_non_convex_front(weights: np.ndarray) -> None:
    front = _sagging_front()
    assert select_index(front, weights) in (0, len(front) - 1)


def test_chebyshev_reaches_the_inner_part_of_a_non_convex_front() -> None:
    """Equal weights: the largest shortfall max(1 - t, 1 - (1 - t)^2) is smallest at t = (3 - sqrt 5) / 2."""
    front = _sagging_front()
    pick = select_index(front, [1.0, 1.0], "chebyshev")
    assert front[pick, 0] == pytest.approx(GOLDEN, abs=1e-3)
    assert 0 < pick < len(front) - 1
    assert select_index(front, [1.0, 1.0], "weighted_sum") in (0, len(front) - 1)


def test_chebyshev_moves_along_the_front_with_the_preference() -> None:
    """Weights (w, 1 - w): the pick equalises w (1 - t) = (1 - w)(1 - (1 - t)^2)."""
    front = _sagging_front(20001)
    picks = []
    for w in (0.2, 0.4, 0.5, 0.6, 0.8):
        t = front[select_index(front, [w, 1 - w], "chebyshev"), 0]
        assert w * (1 - t) == pytest.approx((1 - w) * (1 - (1 - t) ** 2), abs=1e-4)
        picks.append(t)
    assert picks == sorted(picks)


def test_chebyshev_rescales_each_task_over_the_front() -> None:
    """Task 1 in thousandths: the same front, the same pick."""
    front = _sagging_front()
    stretched = front * np.array([1.0, 1000.0]) + np.array([5.0, -3.0])
    for weights in ([1.0, 1.0], [0.3, 0.7]):
        assert select_index(stretched, weights, "chebyshev") == select_index(front, weights, "chebyshev")


@pytest.mark.parametrize(
    ("preference", "message"),
    [
        ([1.0, 2.0], "preference has 2 weights for 3 tasks"),
        ([1.0, 2.0, 3.0, 4.0], "preference has 4 weights for 3 tasks"),
        ([1.0, -0.1, 1.0], "must be finite and >= 0"),
        ([1.0, float("nan"), 1.0], "must be finite and >= 0"),
        ([1.0, float("inf"), 1.0], "must be finite and >= 0"),
        ([0.0, 0.0, 0.0], "all zero"),
    ],
)
def test_bad_preferences_are_one_line_errors(preference: list[float], message: str) -> None:
    scores = np.arange(12.0).reshape(4, 3)
    for rule in ("weighted_sum", "chebyshev"):
        with pytest.raises(SearchError, match=message) as caught:
            select_index(scores, preference, rule)
        assert "\n" not in str(caught.value)


def test_unknown_rule_is_a_one_line_error() -> None:
    with pytest.raises(SearchError, match="unknown preference rule 'minimax'") as caught:
        select_index(np.eye(3), [1.0, 1.0, 1.0], "minimax")  # type: ignore[arg-type]
    assert "\n" not in str(caught.value)


def test_non_numeric_preference_is_a_search_error() -> None:
    with pytest.raises(SearchError):
        select_index(np.eye(2), ["high", "low"])  # type: ignore[list-item]
