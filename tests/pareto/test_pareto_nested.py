"""Facts about ``mode="nested"``: pairing, side weights, its budget and its preference.

Toy: f_i(c) = 1 - (1 - c_i)^2 - 0.3 * sum_{j != i} c_j^2 for T = 4 tasks, each task's best
point (value 1) its one-hot corner.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from m3sb.pareto import ParetoFront, SearchError, SearchSettings, amortized_pareto_front, default_budget
from m3sb.pareto.nested import Node, pair_greedily, side_weights

QUICK = SearchSettings(generations=30, partitions=49)  # each pair's search is 2-D: 50 directions do
T = 4


def four(points: np.ndarray) -> np.ndarray:
    c = np.atleast_2d(points)
    squares = c**2
    return 1 - (1 - c) ** 2 - 0.3 * (squares.sum(axis=1, keepdims=True) - squares)


class Recorder:
    def __init__(self) -> None:
        self.points: list[np.ndarray] = []

    def __call__(self, point: np.ndarray) -> np.ndarray:
        self.points.append(point.copy())
        return four(point)[0]


def _leaf(task: int, count: int = T, profile: np.ndarray | None = None) -> Node:
    vector = np.eye(count)[task]
    return Node((task,), vector, vector if profile is None else profile)


def test_pairs_follow_the_most_similar_task_vectors() -> None:
    gram = np.eye(4)
    gram[0, 2] = gram[2, 0] = 0.9
    gram[1, 3] = gram[3, 1] = 0.8
    gram[0, 1] = gram[1, 0] = 0.1
    pairs, rest = pair_greedily([_leaf(i) for i in range(4)], gram)
    assert [(a.tasks, b.tasks) for a, b in pairs] == [((0,), (2,)), ((1,), (3,))]
    assert rest == []


def test_pairing_is_greedy_not_the_best_matching() -> None:
    """(0, 1) at 0.9 goes first, though (0, 2) + (1, 3) at 0.85 each would sum to more than 0.9 + 0.1."""
    gram = np.eye(4)
    for (i, j), value in {(0, 1): 0.9, (0, 2): 0.85, (1, 3): 0.85, (2, 3): 0.1}.items():
        gram[i, j] = gram[j, i] = value
    pairs, _ = pair_greedily([_leaf(i) for i in range(4)], gram)
    assert [(a.tasks, b.tasks) for a, b in pairs] == [((0,), (1,)), ((2,), (3,))]


def test_odd_node_out_is_the_least_similar_one() -> None:
    gram = np.full((5, 5), 0.2) + 0.8 * np.eye(5)
    gram[0, 4] = gram[4, 0] = 0.7
    gram[1, 2] = gram[2, 1] = 0.6
    gram[3, :3] = gram[:3, 3] = -0.5
    pairs, rest = pair_greedily([_leaf(i, 5) for i in range(5)], gram)
    assert [(a.tasks, b.tasks) for a, b in pairs] == [((0,), (4,)), ((1,), (2,))]
    assert [node.tasks for node in rest] == [(3,)]


def test_merged_nodes_are_compared_by_the_cosine_of_their_combined_vectors() -> None:
    """Nodes c = (1, 1, 0, 0), (0, 0, 1, 0), (0, 0, 0, 1) under gram = V V^T of three task vectors."""
    vectors = np.array([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.6, 0.0, 0.8]])
    gram = vectors @ vectors.T
    nodes = [
        Node((0, 1), np.array([1.0, 1.0, 0.0, 0.0]), np.zeros(4)),
        Node((2,), np.eye(4)[2], np.zeros(4)),
        Node((3,), np.eye(4)[3], np.zeros(4)),
    ]
    pairs, rest = pair_greedily(nodes, gram)  # cosines: {0,1}-{3} 0.6, {0,1}-{2} 0, {2}-{3} 0
    assert [(a.tasks, b.tasks) for a, b in pairs] == [((0, 1), (3,))]
    assert [node.tasks for node in rest] == [(2,)]


def test_without_similarity_the_closest_profiles_pair_up() -> None:
    profiles = np.array([[0.9, 0.1, 0.0], [0.1, 0.9, 0.2], [0.85, 0.15, 0.05]])
    nodes = [_leaf(i, 3, profiles[i]) for i in range(3)]
    pairs, rest = pair_greedily(nodes, None)
    assert [(a.tasks, b.tasks) for a, b in pairs] == [((0,), (2,))]
    assert [node.tasks for node in rest] == [(1,)]


def test_accuracy_pairing_pairs_the_closest_own_metrics() -> None:
    """Own metrics (each leaf on its own task) 0.9, 0.5, 0.88, 0.45, 0.7: (0, 2) differ by 0.02,
    (1, 3) by 0.05; 4 waits. The profiles elsewhere would pair otherwise."""
    own = [0.9, 0.5, 0.88, 0.45, 0.7]
    profiles = np.full((5, 5), 0.3)
    profiles[[0, 1], [1, 0]] = 0.31  # 0 and 1 have the closest profiles overall
    np.fill_diagonal(profiles, own)
    nodes = [_leaf(i, 5, profiles[i]) for i in range(5)]
    pairs, rest = pair_greedily(nodes, None, np.ones(5))
    assert [(a.tasks, b.tasks) for a, b in pairs] == [((0,), (2,)), ((1,), (3,))]
    assert [node.tasks for node in rest] == [(4,)]


def test_accuracy_pairing_weighs_a_merged_node_by_the_preference() -> None:
    """Node {0,1} with own metrics 0.9 and 0.5: 0.8 under weights 3:1, 0.6 under 1:3."""
    merged = Node((0, 1), np.array([1.0, 1.0, 0.0, 0.0]), np.array([0.9, 0.5, 0.0, 0.0]))
    leaves = [_leaf(2, 4, np.array([0.0, 0.0, 0.79, 0.0])), _leaf(3, 4, np.array([0.0, 0.0, 0.0, 0.61]))]
    pairs, _ = pair_greedily([merged, *leaves], None, np.array([3.0, 1.0, 1.0, 1.0]))
    assert [(a.tasks, b.tasks) for a, b in pairs] == [((0, 1), (2,))]
    pairs, _ = pair_greedily([merged, *leaves], None, np.array([1.0, 3.0, 1.0, 1.0]))
    assert [(a.tasks, b.tasks) for a, b in pairs] == [((0, 1), (3,))]


def test_nested_by_accuracy_measures_the_leaves_pairs_them_and_keeps_the_budget() -> None:
    """Leaves of ``four`` score 1 on their own task: the own metrics tie, so the stable order
    pairs (0, 1) and (2, 3); the budget is 4 + 3 x 10."""
    recorder = Recorder()
    settings = SearchSettings(generations=30, partitions=49, pairing="accuracy")
    front = amortized_pareto_front(recorder, T, mode="nested", search=settings)
    assert len(recorder.points) <= default_budget(T, "nested")
    phases = list(Counter(e.phase for e in front.evaluated))
    assert phases == [
        "nested: each task alone",
        "nested 1.1: {0} + {1}",
        "nested 1.2: {2} + {3}",
        "nested 2.1: {0,1} + {2,3}",
    ]
    truth = four(front.coefficients)
    assert np.max(np.abs(front.predicted - truth)) < 0.05  # the per-task surrogates still report
    side_a, side_b = truth[:, :2].mean(axis=1), truth[:, 2:].mean(axis=1)
    assert side_a.max() > 0.7 and side_b.max() > 0.7  # the last front reaches both sides' ends
    assert side_b[np.argmax(side_a)] < 0.2 and side_a[np.argmax(side_b)] < 0.2


def test_side_weights_reference_values() -> None:
    preference = np.array([1.0, 3.0, 0.0, 4.0])
    assert np.allclose(side_weights(preference, (1, 3)), [3 / 7, 4 / 7], rtol=0, atol=1e-15)
    assert np.array_equal(side_weights(preference, (0, 2)), [1.0, 0.0])
    assert np.array_equal(side_weights(preference, (2,)), [1.0])  # all zero: uniform
    assert np.array_equal(side_weights(np.zeros(4), (0, 1, 3)), np.full(3, 1 / 3))


@settings(max_examples=50, deadline=None)
@given(
    preference=hnp.arrays(float, 6, elements=st.floats(0.0, 10.0)),
    tasks=st.lists(st.integers(0, 5), min_size=1, max_size=6, unique=True),
    factor=st.floats(0.01, 100.0),
)
def test_side_weights_sum_to_one_and_ignore_the_scale(
    preference: np.ndarray, tasks: list[int], factor: float
) -> None:
    weights = side_weights(preference, tasks)
    assert weights.shape == (len(tasks),)
    assert np.all(weights >= 0)
    assert weights.sum() == pytest.approx(1.0, abs=1e-12)
    assert np.allclose(side_weights(preference * factor, tasks), weights, rtol=1e-9, atol=1e-12)


@pytest.fixture(scope="module")
def plain_run() -> tuple[ParetoFront, Recorder]:
    recorder = Recorder()
    return amortized_pareto_front(recorder, T, mode="nested", search=QUICK), recorder


def test_nested_default_budget_is_twelve_per_pair_and_is_never_exceeded(plain_run) -> None:
    front, recorder = plain_run
    assert default_budget(T, "nested") == 12 * (T - 1) == 36
    # 4 leaves, then (36 - 4) // 3 = 10 new points per pair; a pair's corners that were asked for
    # already (the 2 leaves of each first-level pair) are asked again for free, on top of the 10
    assert len(front.evaluated) == 4 + 2 * 12 + 10 == 38
    assert front.reused == 4
    assert len(recorder.points) == 34 <= 36
    phases = Counter(e.phase for e in front.evaluated)
    assert phases["nested: each task alone"] == 4
    assert sorted(count for phase, count in phases.items() if phase.startswith("nested ")) == [10, 12, 12]
    assert np.array_equal(np.stack(recorder.points[:4]), np.eye(4))


def test_nested_front_spans_all_tasks(plain_run) -> None:
    front, recorder = plain_run
    assert front.mode == "nested"
    assert front.coefficients.shape == (len(front.coefficients), 4) and len(front.coefficients) >= 10
    assert front.predicted.shape == front.coefficients.shape
    assert front.r2.shape == (4,)
    evaluated = np.stack(recorder.points)
    assert np.all((evaluated >= 0.0) & (evaluated <= 1.0))
    assert np.all((front.coefficients >= 0.0) & (front.coefficients <= 1.0))
    assert np.max(np.abs(front.predicted - four(front.coefficients))) < 1e-3  # exact quadratic in each pair


def test_nested_with_similarity_pairs_the_most_similar_tasks_and_skips_the_leaves() -> None:
    gram = np.eye(T)
    gram[0, 2] = gram[2, 0] = 0.9
    gram[1, 3] = gram[3, 1] = 0.8
    recorder = Recorder()
    front = amortized_pareto_front(recorder, T, mode="nested", similarity=gram, search=QUICK)
    assert len(front.evaluated) == 36  # no leaf evaluations: 36 // 3 = 12 per pair
    assert list(Counter(e.phase for e in front.evaluated)) == [
        "nested 1.1: {0} + {2}",
        "nested 1.2: {1} + {3}",
        "nested 2.1: {0,2} + {1,3}",
    ]
    assert front.reused == 0 and len(recorder.points) == 36


def _true_metrics_at_selection(preference: list[float]) -> np.ndarray:
    front = amortized_pareto_front(Recorder(), T, mode="nested", preference=preference, search=QUICK)
    return four(front.select(preference))[0]


def test_nested_follows_the_preference() -> None:
    heavy_first = _true_metrics_at_selection([8.0, 1.0, 1.0, 1.0])
    heavy_last = _true_metrics_at_selection([1.0, 1.0, 1.0, 8.0])
    assert heavy_first[0] > heavy_last[0] + 0.1
    assert heavy_last[3] > heavy_first[3] + 0.1
    assert heavy_first[0] == max(heavy_first) and heavy_last[3] == max(heavy_last)


def test_nested_budget_below_the_tasks_alone_and_three_per_pair_is_an_error() -> None:
    with pytest.raises(
        SearchError, match=r"budget 8 is smaller than 13 \(T for the tasks alone and 3 per pair"
    ) as caught:
        amortized_pareto_front(Recorder(), T, mode="nested", budget=8)
    assert "\n" not in str(caught.value)


def test_nested_budget_too_small_for_leaves_and_pairs_fails_before_evaluating() -> None:
    recorder = Recorder()
    with pytest.raises(SearchError, match="per pair"):
        amortized_pareto_front(recorder, T, mode="nested", budget=9)
    assert recorder.points == []


def test_nested_evaluates_only_inside_the_box() -> None:
    recorder = Recorder()
    amortized_pareto_front(
        recorder, T, mode="nested", bounds=(0.0, 0.5), search=SearchSettings(generations=5)
    )
    evaluated = np.stack(recorder.points)
    assert np.all((evaluated >= 0.0) & (evaluated <= 0.5))


def test_nested_keeps_every_coefficient_inside_the_box() -> None:
    recorder = Recorder()
    front = amortized_pareto_front(recorder, T, mode="nested", bounds=(0.0, 2.0), search=QUICK)
    asked = np.stack(recorder.points)
    assert asked.max() <= 2.0 + 1e-12 and asked.min() >= 0.0
    assert front.coefficients.max() <= 2.0 + 1e-12 and front.coefficients.min() >= 0.0
    assert np.array_equal(asked[:T], 2.0 * np.eye(T))  # each task alone, at the top of the box


def test_nested_refuses_bounds_that_do_not_start_at_zero() -> None:
    with pytest.raises(SearchError, match=r"nested mode needs bounds that start at 0"):
        amortized_pareto_front(Recorder(), T, mode="nested", bounds=(0.2, 0.8))
