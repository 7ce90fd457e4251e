"""Search a surrogate for its Pareto front with NSGA-III (pymoo).

Problem, algorithm and termination are separate pymoo objects joined by ``minimize``;
the problem is the surrogate seen as T objectives to minimise (scores are negated).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from m3sb.pareto.design import Bounds

# Reference directions per objective count: das-dennis partitions giving 200-330 directions.
_PARTITIONS = {1: 1, 2: 199, 3: 19, 4: 9, 5: 6, 6: 5, 7: 4, 8: 4}


@dataclass(frozen=True)
class SearchSettings:
    """How hard NSGA-III searches a surrogate."""

    generations: int = 100
    partitions: int | None = None  # None: 200-330 reference directions, whatever T


def reference_directions(n_objectives: int, partitions: int | None = None) -> np.ndarray:
    """Das-Dennis reference directions on the simplex (one niche of the front each)."""
    from pymoo.util.ref_dirs import get_reference_directions

    if partitions is None:
        partitions = _PARTITIONS.get(n_objectives, 3)
    return np.asarray(get_reference_directions("das-dennis", n_objectives, n_partitions=partitions))


def _surrogate_problem(objectives: Callable[[np.ndarray], np.ndarray], n_var: int, bounds: Bounds) -> Any:
    from pymoo.core.problem import Problem

    n_obj = int(objectives(np.full((1, n_var), bounds[0])).shape[1])

    class SurrogateProblem(Problem):  # type: ignore[misc]
        """The surrogate's objectives (to minimise) over the coefficient box."""

        def __init__(self) -> None:
            super().__init__(n_var=n_var, n_obj=n_obj, xl=bounds[0], xu=bounds[1])

        def _evaluate(self, x: np.ndarray, out: dict[str, Any], *args: Any, **kwargs: Any) -> None:
            out["F"] = objectives(x)

    return SurrogateProblem()


def search_front(
    objectives: Callable[[np.ndarray], np.ndarray],
    n_var: int,
    bounds: Bounds,
    seed: int = 0,
    settings: SearchSettings = SearchSettings(),
    seeds: np.ndarray | None = None,
) -> np.ndarray:
    """Non-dominated points of ``objectives`` (minimised) over the box, shape (K, n_var).

    ``seeds``, when given, join NSGA-III's first population (for instance the evaluated
    points), so the search starts from what is known.
    """
    from pymoo.algorithms.moo.nsga3 import NSGA3
    from pymoo.optimize import minimize
    from pymoo.termination import get_termination
    from threadpoolctl import threadpool_limits

    problem = _surrogate_problem(objectives, n_var, bounds)
    directions = reference_directions(problem.n_obj, settings.partitions)
    pop_size = len(directions) + (len(directions) % 2)
    options: dict[str, Any] = {}
    if seeds is not None and len(seeds):
        rng = np.random.default_rng(seed)
        rest = rng.uniform(bounds[0], bounds[1], size=(max(pop_size - len(seeds), 0), n_var))
        options["sampling"] = np.vstack([seeds[:pop_size], rest])
    algorithm = NSGA3(ref_dirs=directions, pop_size=pop_size, **options)
    termination = get_termination("n_gen", settings.generations)  # never the clock: runs are reproducible
    archive = _archive(settings.generations // 2)
    with threadpool_limits(limits=1, user_api="blas"):
        result = minimize(problem, algorithm, termination, seed=seed, verbose=False, callback=archive)
    points = np.vstack([np.atleast_2d(np.asarray(result.X, dtype=float)), *archive.points])
    points = _unique_rows(points)
    return np.asarray(points[non_dominated(-objectives(points))])


def _archive(first_generation: int) -> Any:
    """A pymoo callback keeping each generation's non-dominated points from ``first_generation`` on.

    NSGA-III keeps about one point per reference direction; the union over the later
    generations fills the gaps between them, so the front is denser than one population.
    """
    from pymoo.core.callback import Callback

    class Archive(Callback):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__()
            self.points: list[np.ndarray] = []

        def notify(self, algorithm: Any) -> None:
            if algorithm.n_gen >= first_generation and algorithm.opt is not None:
                self.points.append(np.atleast_2d(np.asarray(algorithm.opt.get("X"), dtype=float)))

    return Archive()


def _unique_rows(points: np.ndarray) -> np.ndarray:
    _, keep = np.unique(np.round(points, 12), axis=0, return_index=True)
    return points[np.sort(keep)]


def non_dominated(values: np.ndarray) -> np.ndarray:
    """Indices of the rows of ``values`` (to maximise) that no other row dominates."""
    from pymoo.util.nds.non_dominated_sorting import NonDominatedSorting

    if len(values) == 0:
        return np.empty(0, dtype=int)
    return np.asarray(NonDominatedSorting().do(-values, only_non_dominated_front=True), dtype=int)
