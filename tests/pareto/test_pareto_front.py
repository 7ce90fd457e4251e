"""Facts about ``amortized_pareto_front(mode="map")`` on a toy whose Pareto front is known.

Toy: f1 = 1 - (c1 - 1)^2 - 0.3 c2^2 and f2 = 1 - (c2 - 1)^2 - 0.3 c1^2 on [0, 1]^2. Both are
exact quadratics, so the surrogate is exact; both are strictly concave, so the Pareto set is
the set of weighted-sum maximisers c(w) = (w / (w + 0.3 (1 - w)), (1 - w) / (1 - w + 0.3 w)).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest

from m3sb.pareto import (
    Evaluation,
    ParetoFront,
    SearchError,
    SearchSettings,
    Warp,
    amortized_pareto_front,
    default_budget,
    initial_design,
)
from m3sb.pareto.search import non_dominated, search_front, spread_subset

QUICK = SearchSettings(generations=30, refine=True, densify=0)  # the refined points alone


def toy(points: np.ndarray) -> np.ndarray:
    c = np.atleast_2d(points)
    return np.stack(
        [1 - (c[:, 0] - 1) ** 2 - 0.3 * c[:, 1] ** 2, 1 - (c[:, 1] - 1) ** 2 - 0.3 * c[:, 0] ** 2], axis=1
    )


def true_pareto_values(count: int = 20001) -> np.ndarray:
    w = np.linspace(0.0, 1.0, count)
    return toy(np.stack([w / (w + 0.3 * (1 - w)), (1 - w) / (1 - w + 0.3 * w)], axis=1))


def domination_margin(values: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Per row: how much the best reference point beats it by on its worst task (<= 0: not dominated)."""
    return np.array([np.max(np.min(reference - row, axis=1)) for row in values])


class Counter:
    """An evaluator that counts its calls."""

    def __init__(self, function=toy) -> None:
        self.function = function
        self.calls = 0

    def __call__(self, point: np.ndarray) -> np.ndarray:
        self.calls += 1
        return self.function(point)[0]


@dataclass
class Run:
    front: ParetoFront
    calls: int


@pytest.fixture(scope="module")
def map_run() -> Run:
    counter = Counter()
    return Run(amortized_pareto_front(counter, 2, seed=0, search=QUICK), counter.calls)


def test_map_evaluates_exactly_the_default_budget_once_each(map_run: Run) -> None:
    assert default_budget(2) == (2 + 1) * (2 + 2) == 12
    assert map_run.calls == 12
    assert len(map_run.front.evaluated) == 12
    assert map_run.front.reused == 0
    assert {e.phase for e in map_run.front.evaluated} == {"design"}
    evaluated = np.stack([e.coefficients for e in map_run.front.evaluated])
    assert np.array_equal(evaluated, initial_design(2, 12, (0.0, 1.0), seed=0))
    assert np.array_equal(np.stack([e.metrics for e in map_run.front.evaluated]), toy(evaluated))
    assert map_run.front.mode == "map" and map_run.front.metric == "score"


def test_default_budget_is_twice_a_quadratics_parameters() -> None:
    for tasks in range(2, 9):
        parameters = 1 + tasks + tasks * (tasks + 1) // 2
        assert default_budget(tasks) == default_budget(tasks, "bayesian") == 2 * parameters
        assert default_budget(tasks, "nested") == 12 * (tasks - 1)


def test_map_with_three_tasks_spends_the_default_budget_of_twenty() -> None:
    def three(point: np.ndarray) -> np.ndarray:
        return np.array([1 - (point[i] - 1) ** 2 - 0.2 * (point.sum() - point[i]) ** 2 for i in range(3)])

    counter = Counter(lambda c: three(np.asarray(c).reshape(-1))[None])
    front = amortized_pareto_front(counter, 3, search=SearchSettings(generations=10))
    assert counter.calls == 20 == len(front.evaluated)
    assert front.coefficients.shape[1] == 3 and front.predicted.shape == (len(front.coefficients), 3)


def test_map_front_predictions_match_the_true_quadratic(map_run: Run) -> None:
    front = map_run.front
    assert len(front.coefficients) >= 50
    assert np.max(np.abs(front.predicted - toy(front.coefficients))) < 5e-5
    assert np.all(front.r2 > 1 - 1e-7)


def test_map_front_predictions_match_the_true_quadratic_to_1e_6(map_run: Run) -> None:
    assert np.max(np.abs(map_run.front.predicted - toy(map_run.front.coefficients))) < 1e-6


def test_map_front_is_non_dominated_under_the_true_function(map_run: Run) -> None:
    front = map_run.front
    true_values = toy(front.coefficients)
    assert len(non_dominated(true_values)) == len(front.coefficients)
    assert np.all((front.coefficients >= 0.0) & (front.coefficients <= 1.0))
    # close to the true front: nothing on it beats a front point by 5e-3 on both tasks
    assert np.max(domination_margin(true_values, true_pareto_values())) < 5e-3


def test_map_front_is_on_the_true_front_to_1e_4(map_run: Run) -> None:
    # NSGA-III alone (30 generations) left 210 of 497 points dominated by more than 1e-4
    assert np.max(domination_margin(toy(map_run.front.coefficients), true_pareto_values())) < 1e-4


def test_refinement_moves_points_onto_the_front_and_leaves_front_points_put() -> None:
    from m3sb.pareto.search import refine_front

    def objectives(points: np.ndarray) -> np.ndarray:  # minimised: the toy's scores negated
        return -toy(points)

    rng = np.random.default_rng(0)
    inside = rng.uniform(0.0, 1.0, (40, 2))
    refined = refine_front(objectives, inside, (0.0, 1.0))
    assert np.all(objectives(refined) <= objectives(inside) + 1e-12)  # no objective gets worse
    assert np.max(domination_margin(toy(refined), true_pareto_values())) < 1e-6
    again = refine_front(objectives, refined, (0.0, 1.0))
    assert np.allclose(again, refined, atol=1e-6)


def test_a_front_without_refinement_is_nsga3s_own(map_run: Run) -> None:
    plain = amortized_pareto_front(
        toy_evaluate, 2, seed=0, search=SearchSettings(generations=30, refine=False, densify=0, scalarise=0)
    )
    assert np.max(domination_margin(toy(plain.coefficients), true_pareto_values())) > 1e-4


def test_map_front_runs_from_one_tasks_optimum_to_the_others_in_order(map_run: Run) -> None:
    predicted = map_run.front.predicted
    assert np.all(np.diff(predicted[:, 0]) <= 0)
    assert np.all(np.diff(predicted[:, 1]) >= 0)  # two tasks on a front: one falls as the other rises
    assert predicted[0, 0] == pytest.approx(1.0, abs=1e-3)
    assert predicted[-1, 1] == pytest.approx(1.0, abs=1e-3)


@pytest.mark.parametrize("rule", ["weighted_sum", "chebyshev"])
def test_one_hot_preference_selects_that_tasks_best_point_of_the_box(map_run: Run, rule: str) -> None:
    """Each task's maximum over the box is 1, at its one-hot corner."""
    for task in range(2):
        chosen = map_run.front.select(np.eye(2)[task], rule)  # type: ignore[arg-type]
        assert toy(chosen)[0, task] == pytest.approx(1.0, abs=1e-3)
        assert np.allclose(chosen, np.eye(2)[task], atol=0.02)


def test_balanced_preference_selects_the_balanced_point_of_the_front(map_run: Run) -> None:
    """Weights (1, 1): the weighted-sum maximiser is c = (1 / 1.3, 1 / 1.3)."""
    chosen = map_run.front.select([1.0, 1.0])
    assert np.allclose(chosen, [1 / 1.3, 1 / 1.3], atol=0.02)
    best = toy(np.array([[1 / 1.3, 1 / 1.3]])).sum()
    assert toy(chosen).sum() == pytest.approx(best, abs=1e-3)


def test_map_is_deterministic_per_seed(map_run: Run) -> None:
    again = amortized_pareto_front(toy_evaluate, 2, seed=0, search=QUICK)
    assert np.array_equal(again.coefficients, map_run.front.coefficients)
    assert np.array_equal(again.predicted, map_run.front.predicted)
    other = amortized_pareto_front(toy_evaluate, 2, seed=1, search=QUICK)
    first = np.stack([e.coefficients for e in map_run.front.evaluated])
    second = np.stack([e.coefficients for e in other.evaluated])
    assert np.array_equal(first[:2], second[:2])  # the one-hot corners
    assert not np.allclose(first[2:], second[2:])


def toy_evaluate(point: np.ndarray) -> np.ndarray:
    return toy(point)[0]


def toy_loss(point: np.ndarray) -> np.ndarray:
    return 1.0 - toy(point)[0]  # (c1 - 1)^2 + 0.3 c2^2 and (c2 - 1)^2 + 0.3 c1^2: lowest 0 at the corners


@pytest.fixture(scope="module")
def loss_front() -> ParetoFront:
    return amortized_pareto_front(toy_loss, 2, metric="loss", search=QUICK)


def test_loss_front_minimises_the_losses(loss_front: ParetoFront) -> None:
    predicted = loss_front.predicted
    assert loss_front.metric == "loss" and loss_front.sign == -1.0
    assert np.max(np.abs(predicted - (1.0 - toy(loss_front.coefficients)))) < 5e-5
    assert len(non_dominated(-predicted)) == len(predicted)  # non-dominated as losses
    assert np.all(np.diff(predicted[:, 0]) >= 0)  # ordered from the best task-0 loss
    assert predicted[:, 0].min() == pytest.approx(0.0, abs=1e-3)
    assert predicted[:, 1].min() == pytest.approx(0.0, abs=1e-3)
    assert (
        np.max(domination_margin(-(1.0 - toy(loss_front.coefficients)), -(1.0 - true_pareto_values()))) < 5e-3
    )


def test_loss_select_picks_the_lowest_predicted_loss(loss_front: ParetoFront) -> None:
    for task in range(2):
        index = loss_front.select_index(np.eye(2)[task])
        assert index == int(np.argmin(loss_front.predicted[:, task]))
        assert toy_loss(loss_front.select(np.eye(2)[task]))[task] == pytest.approx(0.0, abs=1e-3)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n_tasks": 2, "budget": 2}, r"budget 2 is smaller than 3 \(T \+ 1, with T = 2 tasks\)"),
        ({"n_tasks": 3, "budget": 3}, r"budget 3 is smaller than 4"),
        ({"n_tasks": 3, "budget": 3, "mode": "bayesian"}, r"budget 3 is smaller than 4"),
        ({"n_tasks": 2, "budget": -5}, r"budget -5 is smaller than 3"),
        ({"n_tasks": 1}, r"at least 2 tasks, got 1"),
        ({"n_tasks": 0}, r"at least 2 tasks, got 0"),
        (
            {"n_tasks": 2, "bounds": (1.0, 1.0)},
            r"bounds must be two finite numbers, low < high; got \[1.0, 1.0\]",
        ),
        ({"n_tasks": 2, "bounds": (1.0, 0.0)}, r"low < high; got \[1.0, 0.0\]"),
        ({"n_tasks": 2, "bounds": (0.0, float("inf"))}, r"bounds must be two finite numbers"),
        ({"n_tasks": 2, "bounds": (float("nan"), 1.0)}, r"bounds must be two finite numbers"),
        ({"n_tasks": 2, "mode": "grid"}, r"unknown mode 'grid'; choose one of: map, bayesian, nested"),
        ({"n_tasks": 2, "metric": "accuracy"}, r"unknown metric sense 'accuracy'"),
        ({"n_tasks": 4, "mode": "nested", "budget": 12}, r"budget 12 is smaller than 13 \(T for the tasks"),
        ({"n_tasks": 3, "mode": "nested", "preference": [0.0, 0.0, 0.0]}, r"preference weights are all zero"),
        ({"n_tasks": 3, "mode": "nested", "preference": [1.0, 1.0]}, r"preference has 2 weights for 3 tasks"),
        ({"n_tasks": 3, "mode": "nested", "similarity": np.eye(2)}, r"similarity must be a 3 x 3 matrix"),
    ],
)
def test_bad_search_input_is_a_one_line_error_before_any_evaluation(kwargs: dict, message: str) -> None:
    counter = Counter(lambda c: np.atleast_2d(np.zeros(len(np.asarray(c).reshape(-1)))))
    with pytest.raises(SearchError, match=message) as caught:
        amortized_pareto_front(counter, search=QUICK, **kwargs)
    assert "\n" not in str(caught.value)
    assert counter.calls == 0


@pytest.mark.parametrize(
    ("output", "message"),
    [
        ([1.0, 2.0, 3.0], r"evaluate\(\[1, 0\]\) returned 3 metrics for 2 tasks"),
        ([1.0], r"evaluate\(\[1, 0\]\) returned 1 metrics for 2 tasks"),
        ([1.0, float("nan")], r"evaluate\(\[1, 0\]\) returned nan for task 1"),
        ([float("-inf"), 1.0], r"evaluate\(\[1, 0\]\) returned -inf for task 0"),
        (["a", "b"], r"evaluate\(\[1, 0\]\) returned list, not numbers"),
        (object(), r"evaluate\(\[1, 0\]\) returned object, not numbers"),
        ({"task": 1.0}, r"evaluate\(\[1, 0\]\) returned dict, not numbers"),
        (None, r"evaluate\(\[1, 0\]\) returned NoneType, not numbers"),
    ],
)
@pytest.mark.parametrize("mode", ["map", "bayesian", "nested"])
def test_bad_evaluator_output_stops_the_search_at_the_first_call(
    output: object, message: str, mode: str
) -> None:
    calls = []

    def evaluate(point: np.ndarray) -> object:
        calls.append(point)
        return output

    with pytest.raises(SearchError, match=message) as caught:
        amortized_pareto_front(evaluate, 2, mode=mode, search=QUICK)  # type: ignore[arg-type]
    assert "\n" not in str(caught.value)
    assert len(calls) == 1


def test_evaluator_may_return_any_sequence_of_numbers() -> None:
    outputs = {
        "list": lambda c: toy(c)[0].tolist(),
        "tuple": lambda c: tuple(toy(c)[0]),
        "column": lambda c: toy(c).T,
        "float32": lambda c: toy(c)[0].astype(np.float32),
    }
    fronts = {
        name: amortized_pareto_front(f, 2, search=SearchSettings(generations=5))
        for name, f in outputs.items()
    }
    for front in fronts.values():
        assert np.allclose(front.predicted, toy(front.coefficients), atol=1e-4)


def test_evaluator_returning_strings_is_an_error() -> None:
    with pytest.raises(SearchError, match="not numbers"):
        amortized_pareto_front(lambda c: ["0.5", "0.5"], 2, search=SearchSettings(generations=5))


def test_known_evaluation_with_the_wrong_metric_count_is_a_search_error() -> None:
    bad = Evaluation(np.array([1.0, 0.0]), np.array([1.0]), "design")
    with pytest.raises(SearchError):
        amortized_pareto_front(toy_evaluate, 2, known=[bad], search=SearchSettings(generations=5))


@pytest.mark.parametrize("arguments", [("logit", 0.0, 1.0), ("sigmoid", 1.0, 1.0)])
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_a_bad_warp_is_a_search_error(arguments: tuple[str, float, float]) -> None:
    with pytest.raises(SearchError):
        amortized_pareto_front(toy_evaluate, 2, warp=Warp(*arguments), search=SearchSettings(generations=5))  # type: ignore[arg-type]


@pytest.mark.slow
@pytest.mark.parametrize("tasks", [4, 8])
def test_the_front_of_an_exact_quadratic_surrogate_is_its_analytic_front(tasks: int) -> None:
    """Task t scores -|c - e_t|^2: the Pareto set is the simplex {c >= 0, sum c = 1} (the convex
    hull of the tasks' optima), and the surrogate, a full quadratic, is exact."""

    def scores(point: np.ndarray) -> np.ndarray:
        c = np.asarray(point, dtype=float).reshape(-1)
        return -np.sum((c[None, :] - np.eye(tasks)) ** 2, axis=1)

    settings = SearchSettings(generations=30, refine=True, densify=0)
    front = amortized_pareto_front(scores, tasks, seed=0, search=settings)
    c = front.coefficients
    assert np.max(np.abs(c.sum(axis=1) - 1.0)) < 1e-3
    assert np.min(c) > -1e-3
    assert np.all(c.max(axis=0) > 0.95)  # every task's optimum is reached
    assert np.max(np.abs(front.predicted - np.stack([scores(row) for row in c]))) < 1e-6


def _simplex_scores(tasks: int) -> Any:
    def scores(points: np.ndarray) -> np.ndarray:
        c = np.atleast_2d(np.asarray(points, dtype=float))
        return -np.sum((c[:, None, :] - np.eye(tasks)[None]) ** 2, axis=2)

    return scores


def _onto_simplex(points: np.ndarray) -> np.ndarray:
    """Each row's Euclidean projection onto the simplex {c >= 0, sum c = 1}."""
    ordered = -np.sort(-points, axis=1)
    sums = np.cumsum(ordered, axis=1) - 1
    count = np.sum(ordered - sums / np.arange(1, points.shape[1] + 1) > 0, axis=1)
    shift = sums[np.arange(len(points)), count - 1] / count
    return np.maximum(points - shift[:, None], 0.0)


@pytest.mark.parametrize("tasks", [3, 4])
def test_densifying_fills_the_front_and_brings_it_closer(tasks: int) -> None:
    """On the analytic simplex front, the densified front comes much closer to every part of
    the true front than NSGA-III's niches do, and its points lie closer to it (each point's
    shortfall from the Pareto-optimal point that dominates it, its projection onto the
    simplex); same seed, same front."""
    scores = _simplex_scores(tasks)
    box, seeds = (0.0, 1.0), np.eye(tasks)

    def front(densify: int) -> np.ndarray:
        settings = SearchSettings(generations=40, densify=densify)
        return search_front(lambda x: -scores(x), tasks, box, 0, settings, seeds)

    sparse, dense = front(0), front(3000)
    assert np.array_equal(dense, front(3000))
    assert len(dense) > 5 * len(sparse)
    wanted = scores(np.random.default_rng(1).dirichlet(np.ones(tasks), size=2000))  # true front points

    def coverage(found: np.ndarray) -> float:
        values = scores(found)
        return float(np.mean(np.min(np.linalg.norm(wanted[:, None] - values[None], axis=2), axis=1)))

    def shortfall(found: np.ndarray) -> float:
        return float(np.median(np.max(scores(_onto_simplex(found)) - scores(found), axis=1)))

    assert coverage(dense) < 0.5 * coverage(sparse)
    assert shortfall(dense) < 0.5 * shortfall(sparse)


def test_a_spread_subset_keeps_the_first_rows_and_covers_the_rest() -> None:
    rng = np.random.default_rng(0)
    values = np.vstack([rng.normal(0, 0.01, size=(500, 2)), [[1.0, 0.0], [0.0, 1.0]]])  # a clump, two ends
    rows = spread_subset(values, 5, first=[3])
    assert rows[0] == 3 and len(set(rows.tolist())) == 5
    assert {500, 501} <= set(rows.tolist())  # the far ends come before more of the clump
    assert np.array_equal(spread_subset(values, 600), np.arange(502))


def test_a_spread_subset_never_repeats_a_row() -> None:
    same = np.ones((10, 2))
    assert spread_subset(same, 3).tolist() == [0]  # equal rows add nothing
    rows = spread_subset(np.vstack([same, [[2.0, 0.0]]]), 5, first=[4])
    assert rows.tolist() == [4, 10]


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"pairing": "cosine"}, "pairing 'cosine': choose one of similarity, accuracy"),
        ({"densify": -1}, "densify -1: needs a whole number >= 0"),
        ({"generations": 0}, "generations 0: needs a whole number >= 1"),
    ],
)
def test_bad_search_settings_are_search_errors(settings: dict[str, Any], message: str) -> None:
    with pytest.raises(SearchError, match=message):
        SearchSettings(**settings)


@pytest.mark.parametrize("tasks", [2, 4, 8])
def test_weighted_sum_solves_land_on_the_analytic_front(tasks: int) -> None:
    """-|c - e_t|^2 weighted by w is maximised at c = w / sum(w): every solve lands on the
    simplex (the Pareto set) at its own weights, each task alone at its optimum e_t."""
    from m3sb.pareto.search import scalarised_front
    from m3sb.pareto.surrogate import QuadraticForms

    eye = np.eye(tasks)
    forms = QuadraticForms(-np.stack([eye] * tasks), 2 * eye, -np.ones(tasks))
    assert np.allclose(forms.values(eye * 0.5), _simplex_scores(tasks)(eye * 0.5), atol=1e-12)
    points = scalarised_front(forms, (0.0, 1.0), np.random.default_rng(0), 500)
    assert points.shape == (500, tasks)
    assert np.allclose(points[:tasks], eye, atol=1e-9)
    assert np.max(np.abs(points.sum(axis=1) - 1.0)) < 1e-6 and np.min(points) >= 0.0
    again = scalarised_front(forms, (0.0, 1.0), np.random.default_rng(0), 500)
    assert np.array_equal(points, again)


def test_weighted_sum_solves_reach_the_box_faces_of_a_non_concave_problem() -> None:
    """q = x1^2 - x2 (convex in x1): its maximisers over [0, 1]^2 sit at x1 in {0, 1}, x2 = 0;
    the accelerated ascent with restarts must end there, not between."""
    from m3sb.pareto.search import scalarised_front
    from m3sb.pareto.surrogate import QuadraticForms

    curvature = np.array([[[1.0, 0.0], [0.0, 0.0]], [[1.0, 0.0], [0.0, 0.0]]])
    forms = QuadraticForms(curvature, np.array([[0.0, -1.0], [0.0, -1.0]]), np.zeros(2))
    points = scalarised_front(forms, (0.0, 1.0), np.random.default_rng(1), 200)
    assert np.all(np.isin(np.round(points[:, 0], 9), [0.0, 1.0])) and np.allclose(points[:, 1], 0.0)
