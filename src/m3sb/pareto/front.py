"""MAP: an amortized Pareto front of a black-box ``evaluate(c) -> metrics`` from few evaluations.

``map`` evaluates a one-hot plus Halton-sequence design, fits a quadratic surrogate per
task and searches it with NSGA-III. ``bayesian`` spends 60% of the same budget on that
design and the rest in batches that maximise the expected hypervolume improvement under
per-task Gaussian processes with a quadratic mean (:mod:`m3sb.pareto.acquisition`),
refitted before every batch. ``nested`` merges tasks pairwise along 2-task fronts
(see :mod:`m3sb.pareto.nested`). Nothing here knows about models.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from m3sb.pareto.design import Bounds, initial_design
from m3sb.pareto.evaluations import Evaluate, EvaluateMany, Evaluation, EvaluationLog, SearchError
from m3sb.pareto.preference import Rule, select_index
from m3sb.pareto.search import SearchSettings, search_front
from m3sb.pareto.surrogate import TaskSurrogates, Warp, fit_surrogates

Mode = Literal["map", "bayesian", "nested"]
MetricSense = Literal["score", "loss"]
MODES: tuple[str, ...] = ("map", "bayesian", "nested")
ADAPTIVE_ROUNDS = 4  # bayesian: the adaptive part of the budget is spent in this many batches
DESIGN_SHARE_PERCENT = 60  # bayesian: this share of the budget (rounded up) goes to the initial design


@dataclass
class ParetoFront:
    """An amortized front: coefficients, the surrogate's metrics there, and what was evaluated.

    ``predicted`` is in the evaluator's units: higher is better, except with
    ``metric="loss"`` where lower is.
    """

    coefficients: np.ndarray
    predicted: np.ndarray
    evaluated: list[Evaluation]
    r2: np.ndarray
    metric: MetricSense
    mode: Mode
    surrogates: TaskSurrogates | None = None
    reused: int = 0

    @property
    def sign(self) -> float:
        """+1 when higher metrics are better, -1 for losses."""
        return -1.0 if self.metric == "loss" else 1.0

    def select_index(self, preference: Sequence[float] | np.ndarray, rule: Rule = "weighted_sum") -> int:
        """Row of the front that ``preference`` (one weight per task) picks."""
        return select_index(self.sign * self.predicted, preference, rule)

    def select(self, preference: Sequence[float] | np.ndarray, rule: Rule = "weighted_sum") -> np.ndarray:
        """The coefficients, shape (T,), that ``preference`` picks on the front."""
        return np.asarray(self.coefficients[self.select_index(preference, rule)].copy())


def default_budget(n_tasks: int, mode: Mode = "map") -> int:
    """(T+1)(T+2) evaluations: twice a full quadratic's parameters (nested: 12 per pair)."""
    if mode == "nested":
        return 12 * (n_tasks - 1)
    return (n_tasks + 1) * (n_tasks + 2)


def check_search_inputs(n_tasks: int, budget: int, bounds: Bounds, mode: str, metric: str) -> None:
    """One-line errors for a search that cannot run as asked."""
    if mode not in MODES:
        raise SearchError(f"unknown mode '{mode}'; choose one of: {', '.join(MODES)}")
    if metric not in ("score", "loss"):
        raise SearchError(f"unknown metric sense '{metric}'; choose score (higher is better) or loss")
    if n_tasks < 2:
        raise SearchError(f"a Pareto front needs at least 2 tasks, got {n_tasks}")
    low, high = bounds
    if not (np.isfinite(low) and np.isfinite(high) and low < high):
        raise SearchError(f"bounds must be two finite numbers, low < high; got {list(bounds)}")
    if mode == "nested" and low != 0:
        raise SearchError(
            f"nested mode needs bounds that start at 0 (it multiplies coefficients), got {list(bounds)}"
        )
    smallest = n_tasks + 3 * (n_tasks - 1) if mode == "nested" else n_tasks + 1
    if budget < smallest:
        why = "T for the tasks alone and 3 per pair" if mode == "nested" else "T + 1"
        raise SearchError(f"budget {budget} is smaller than {smallest} ({why}, with T = {n_tasks} tasks)")


def amortized_pareto_front(
    evaluate: Evaluate,
    n_tasks: int,
    budget: int | None = None,
    bounds: Bounds = (0.0, 1.0),
    mode: Mode = "map",
    seed: int = 0,
    metric: MetricSense = "score",
    warp: Warp | None = None,
    preference: Sequence[float] | None = None,
    similarity: np.ndarray | None = None,
    known: Iterable[Evaluation] = (),
    on_evaluation: Callable[[Evaluation], None] | None = None,
    search: SearchSettings | None = None,
    evaluate_many: EvaluateMany | None = None,
) -> ParetoFront:
    """The amortized Pareto front of ``evaluate`` over the coefficient box ``bounds``.

    ``evaluate(c)`` takes a (T,) array and returns T metrics (higher is better, or lower
    with ``metric="loss"``); it is called at most ``budget`` times (default (T+1)(T+2)).
    ``warp`` is the surrogate's warp (sigmoid for bounded scores, softplus for losses).
    ``nested`` uses ``preference`` to merge pairs and ``similarity`` (a T x T Gram matrix
    of the task vectors) to choose them. ``known`` evaluations (from an earlier run) are
    reused instead of evaluated again; ``on_evaluation`` sees each new one.
    ``evaluate_many(points)``, when given, evaluates each batch of new points the search
    asks for at once (batched forward passes, an executor's workers), in order.
    """
    if budget is not None and (isinstance(budget, bool) or int(budget) != budget):
        raise SearchError(f"budget must be a whole number of evaluations, got {budget!r}")
    budget = default_budget(n_tasks, mode) if budget is None else int(budget)
    check_search_inputs(n_tasks, budget, bounds, mode, metric)
    warp = warp or Warp()
    search = search or SearchSettings()
    log = EvaluationLog(evaluate, n_tasks, budget, known, on_evaluation, evaluate_many)
    sign = -1.0 if metric == "loss" else 1.0
    if mode == "nested":
        from m3sb.pareto.nested import nested_front

        front = nested_front(log, n_tasks, preference, similarity, bounds, seed, warp, sign, search)
    elif mode == "bayesian":
        front = _bayesian_front(log, n_tasks, budget, bounds, seed, warp, sign, search)
    else:
        points = initial_design(n_tasks, budget, bounds, seed)
        metrics = log(points, "design")
        surrogates = fit_surrogates(points, metrics, warp, "quadratic", seed=seed)
        front = _searched_front(surrogates, n_tasks, bounds, sign, seed, search, points)
    front.evaluated, front.reused, front.metric, front.mode = log.evaluations, log.reused, metric, mode
    return front


def _searched_front(
    surrogates: TaskSurrogates,
    n_var: int,
    bounds: Bounds,
    sign: float,
    seed: int,
    settings: SearchSettings,
    evaluated_points: np.ndarray,
) -> ParetoFront:
    """NSGA-III (and, for quadratics, weighted-sum solves) on the surrogates; the non-dominated
    points, ordered along the first task."""
    forms = surrogates.warped_quadratics()
    points = search_front(
        lambda x: -sign * surrogates.predict(x),
        n_var,
        bounds,
        seed,
        settings,
        seeds=evaluated_points,
        forms=None if forms is None else forms.scaled(sign),
    )  # already non-dominated under the surrogates
    predicted = surrogates.predict(points)
    order = np.argsort(-sign * predicted[:, 0], kind="stable")
    return ParetoFront(points[order], predicted[order], [], surrogates.r2, "score", "map", surrogates)


def _bayesian_front(
    log: EvaluationLog,
    n_tasks: int,
    budget: int,
    bounds: Bounds,
    seed: int,
    warp: Warp,
    sign: float,
    settings: SearchSettings,
) -> ParetoFront:
    """60% of the budget on the initial design, the rest in ``ADAPTIVE_ROUNDS`` batches that
    maximise the expected hypervolume improvement of per-task GPs refitted before each
    (:func:`m3sb.pareto.acquisition.propose_batch`).

    The last fit takes, per task, the quadratic or the quadratic-plus-GP, whichever
    predicts held-out evaluations better, and its front is searched as map's is.
    """
    from m3sb.pareto.acquisition import propose_batch

    # More than a quadratic's parameters, so its residuals (what the GP sees) are not all zero.
    first = min(budget, max(n_tasks + 1, -(-budget * DESIGN_SHARE_PERCENT // 100)))
    points = initial_design(n_tasks, first, bounds, seed)
    metrics = log(points, "design")
    batch = max(1, -(-(budget - first) // ADAPTIVE_ROUNDS))
    round_number = 0
    while log.remaining > 0:
        round_number += 1
        chosen = propose_batch(
            points, metrics, warp, sign, bounds, min(batch, log.remaining), seed + round_number
        )
        if len(chosen) == 0:  # no point of the box is new any more (a box narrower than 1e-9)
            break
        points = np.vstack([points, chosen])
        metrics = np.vstack([metrics, log(chosen, f"adaptive {round_number}")])
    surrogates = fit_surrogates(points, metrics, warp, "best", seed=seed)
    return _searched_front(surrogates, n_tasks, bounds, sign, seed, settings, points)
