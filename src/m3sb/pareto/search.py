"""Search a surrogate for its Pareto front with NSGA-III (pymoo).

Problem, algorithm and termination are separate pymoo objects joined by ``minimize``;
the problem is the surrogate seen as T objectives to minimise (scores are negated).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from m3sb.pareto.design import Bounds

if TYPE_CHECKING:
    from m3sb.pareto.surrogate import QuadraticForms

Pairing = Literal["similarity", "accuracy"]
PAIRINGS: tuple[str, ...] = ("similarity", "accuracy")

# NSGA-III's generations, then the densifying rounds' candidates, by objective count: measured
# on benchmarks/bench_pareto.py, where the surrogate is exact (see SearchSettings).
GENERATIONS = {2: 100, 3: 100, 4: 100, 5: 60, 6: 50, 7: 40, 8: 30}
DENSIFY = {2: 1000, 3: 2000, 4: 4000, 5: 8000, 6: 16000, 7: 20000, 8: 20000}
# Weighted-sum solves when the surrogates are concave quadratics (then the whole search).
SCALARISE = {2: 4000, 3: 10000, 4: 15000, 5: 20000, 6: 30000, 7: 40000, 8: 50000}

# Reference directions per objective count: das-dennis partitions giving 200-330 directions.
_PARTITIONS = {1: 1, 2: 199, 3: 19, 4: 9, 5: 6, 6: 5, 7: 4, 8: 4}


@dataclass(frozen=True)
class SearchSettings:
    """How a surrogate's front is searched: NSGA-III's generations and reference directions,
    then :func:`densify_front`'s candidates per round, which fill the gaps between NSGA-III's
    niches (by default more as the objectives grow: on benchmarks/bench_pareto.py, where the
    surrogate is exact, the hypervolume ratio at T = 4 goes from 0.95 without to 0.99, and at
    T = 8 from 0.91 at 5,000 candidates to 0.98 at 20,000, the front then holding about
    100,000 points). ``refine`` moves NSGA-III's points onto the surrogate's front by a local
    solve each (:func:`refine_front`; off by default: it lifts the ratio at T = 4 from 0.952
    to 0.964 only, at 2-10x the seconds). Where the surrogates are concave quadratics (in
    warped units) none of that runs: ``scalarise`` weighted sums are solved exactly instead
    (:func:`scalarised_front`), every point on the front."""

    generations: int | None = None  # None: by the objective count (GENERATIONS)
    partitions: int | None = None  # None: 200-330 reference directions, whatever T
    refine: bool = False
    # nested mode: "similarity" pairs the most similar task vectors (closest predicted profiles
    # without a Gram matrix) and searches per-task surrogates; "accuracy" is MAP's published
    # procedure: the closest fine-tuned accuracies pair, each side's surrogate is fitted on its
    # preference-weighted metric.
    pairing: Pairing = "similarity"
    densify: int | None = None  # candidates per densifying round (0: none; None: DENSIFY by objectives)
    scalarise: int | None = None  # weighted-sum solves of concave quadratics (0: none; None: SCALARISE)

    def __post_init__(self) -> None:
        from m3sb.pareto.evaluations import SearchError

        if self.pairing not in PAIRINGS:
            raise SearchError(f"pairing '{self.pairing}': choose one of {', '.join(PAIRINGS)}")
        for name, least in (("generations", 1), ("partitions", 1), ("densify", 0), ("scalarise", 0)):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or int(value) != value or value < least):
                raise SearchError(f"{name} {value!r}: needs a whole number >= {least}")

    def generations_for(self, n_objectives: int) -> int:
        """NSGA-III's generations for ``n_objectives`` objectives."""
        if self.generations is not None:
            return self.generations
        return GENERATIONS.get(n_objectives, GENERATIONS[max(GENERATIONS)])

    def densify_for(self, n_objectives: int) -> int:
        """Candidates per densifying round for ``n_objectives`` objectives (0: none)."""
        if self.densify is not None:
            return self.densify
        return DENSIFY.get(n_objectives, DENSIFY[max(DENSIFY)])

    def scalarise_for(self, n_objectives: int) -> int:
        """Weighted-sum sub-problems for ``n_objectives`` objectives (0: none)."""
        if self.scalarise is not None:
            return self.scalarise
        return SCALARISE.get(n_objectives, SCALARISE[max(SCALARISE)])


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
    forms: QuadraticForms | None = None,
) -> np.ndarray:
    """Non-dominated points of ``objectives`` (minimised) over the box, shape (K, n_var).

    ``seeds``, when given, join NSGA-III's first population (for instance the evaluated
    points), so the search starts from what is known, and its final candidates.
    ``forms``, when given, are quadratics (to maximise) with the same Pareto set as
    ``objectives`` (the surrogates in warped units). Where every form is concave, the front
    is the maximisers of their weighted sums (:func:`scalarised_front`), exactly, and
    NSGA-III is not run. Where one is not, weighted sums miss the front's non-convex parts
    and the solves add nothing measurable (bench_pareto.py, gaussian-bumps at T = 8: the
    same hypervolume, 4.5 s more), so NSGA-III and the densifying rounds search it.
    """
    from pymoo.algorithms.moo.nsga3 import NSGA3
    from pymoo.optimize import minimize
    from pymoo.termination import get_termination
    from threadpoolctl import threadpool_limits

    problem = _surrogate_problem(objectives, n_var, bounds)
    solves = settings.scalarise_for(problem.n_obj)
    if forms is not None and solves and forms.concave():
        exact = _unique_rows(scalarised_front(forms, bounds, np.random.default_rng([seed, 2]), solves))
        return np.asarray(exact[non_dominated(-objectives(exact))])
    directions = reference_directions(problem.n_obj, settings.partitions)
    pop_size = len(directions) + (len(directions) % 2)
    options: dict[str, Any] = {}
    if seeds is not None and len(seeds):
        rng = np.random.default_rng(seed)
        rest = rng.uniform(bounds[0], bounds[1], size=(max(pop_size - len(seeds), 0), n_var))
        options["sampling"] = np.vstack([seeds[:pop_size], rest])
    algorithm = NSGA3(ref_dirs=directions, pop_size=pop_size, **options)
    known = [np.clip(seeds, bounds[0], bounds[1])] if seeds is not None and len(seeds) else []
    generations = settings.generations_for(problem.n_obj)
    termination = get_termination("n_gen", generations)  # never the clock: runs are reproducible
    archive = _archive(generations // 2)
    with threadpool_limits(limits=1, user_api="blas"):
        result = minimize(problem, algorithm, termination, seed=seed, verbose=False, callback=archive)
    # the seeds join the candidates: NSGA-III's niches can lose the corners (a task's optimum)
    points = np.vstack([np.atleast_2d(np.asarray(result.X, dtype=float)), *archive.points, *known])
    points = _unique_rows(points)
    points = points[non_dominated(-objectives(points))]
    if settings.refine:
        points = _unique_rows(np.vstack([points, refine_front(objectives, points, bounds)]))
        points = points[non_dominated(-objectives(points))]
    candidates = settings.densify_for(problem.n_obj)
    if candidates:
        with threadpool_limits(limits=1, user_api="blas"):
            points = densify_front(objectives, points, bounds, np.random.default_rng([seed, 1]), candidates)
    return np.asarray(points)


DENSIFY_SIGMAS = (0.03, 0.01, 0.003)  # jitter per round, as a share of the box's side


def densify_front(
    objectives: Callable[[np.ndarray], np.ndarray],
    points: np.ndarray,
    bounds: Bounds,
    rng: np.random.Generator,
    count: int,
) -> np.ndarray:
    """The front of ``objectives`` (minimised) filled in: per round, ``count`` jittered copies
    of its points and ``count`` convex mixes of two of them join it, and the non-dominated
    ones are kept."""
    low, high = bounds
    for sigma in DENSIFY_SIGMAS:
        first, second = rng.integers(len(points), size=(2, count))
        noise = rng.normal(0.0, sigma * (high - low), (count, points.shape[1]))
        jittered = np.clip(points[first] + noise, low, high)
        share = rng.uniform(size=(count, 1))
        mixed = share * points[first] + (1 - share) * points[second]
        candidates = _unique_rows(np.vstack([points, jittered, mixed]))  # clipping repeats corners
        points = candidates[non_dominated(-objectives(candidates))]
    return points


# Dirichlet's concentration: sparse weights reach the front's edges (T = 8: hypervolume 0.967
# against 0.940 at 1 and 0.866 at 2)
WEIGHT_CONCENTRATION = 0.5
SCALARISE_ITERATIONS = 200  # at most: on bench_pareto.py's fits at T = 8 every solve settles within 100
SETTLED = 1e-13  # the solves stop once no point moves further than this in a step


def scalarised_front(
    forms: QuadraticForms, bounds: Bounds, rng: np.random.Generator, count: int
) -> np.ndarray:
    """Maximisers over the box of ``count`` weighted sums of the quadratics ``forms``, shape
    (count, n): each task alone, then weights drawn from a Dirichlet, each solved from a
    random start by projected accelerated gradient ascent (restarted where a step loses).

    Where the weighted sums are concave every Pareto-optimal point of the quadratics
    maximises one of them, so these are points of the exact front; elsewhere they are
    local maximisers, which the non-dominated filter sorts out. Deterministic for ``rng``.
    """
    n_tasks, n = forms.linear.shape
    low, high = bounds
    drawn = rng.dirichlet(np.full(n_tasks, WEIGHT_CONCENTRATION), size=max(count - n_tasks, 0))
    weights = np.vstack([np.eye(n_tasks), drawn])[:count]
    curvature = np.einsum("kt,tij->kij", weights, forms.curvature)
    linear = weights @ forms.linear
    lipschitz = 2.0 * np.abs(np.linalg.eigvalsh(curvature)).max(axis=1)
    step = (1.0 / np.maximum(lipschitz, 1e-12))[:, None]

    current = rng.uniform(low, high, size=(len(weights), n))
    bent = np.einsum("kij,kj->ki", curvature, current)  # curvature @ current, kept per point
    best = np.sum(current * (bent + linear), axis=1)
    ahead, bent_ahead, momentum = current, bent, np.ones(len(weights))
    for _ in range(SCALARISE_ITERATIONS):
        moved = np.clip(ahead + step * (2.0 * bent_ahead + linear), low, high)
        bent_moved = np.einsum("kij,kj->ki", curvature, moved)
        reached = np.sum(moved * (bent_moved + linear), axis=1)
        # momentum overshot (beyond rounding): go on from the better point, without it
        restart = reached < best - 1e-12 * np.maximum(np.abs(best), 1.0)
        moved[restart], bent_moved[restart], reached[restart] = current[restart], bent[restart], best[restart]
        following = np.where(restart, 1.0, (1.0 + np.sqrt(1.0 + 4.0 * momentum**2)) / 2.0)
        share = np.where(restart, 0.0, (momentum - 1.0) / following)[:, None]
        ahead = moved + share * (moved - current)
        bent_ahead = bent_moved + share * (bent_moved - bent)  # curvature @ ahead, by linearity
        settled = not restart.any() and float(np.max(np.abs(moved - current), initial=0.0)) <= SETTLED
        current, bent, best, momentum = moved, bent_moved, reached, following
        if settled:
            break
    return current


_STEP = 1e-6  # finite-difference step of the refinement's gradients, in coefficient units


def _values_and_jacobian(
    objectives: Callable[[np.ndarray], np.ndarray], x: np.ndarray, bounds: Bounds
) -> tuple[np.ndarray, np.ndarray]:
    """The objectives at ``x`` and their Jacobian (T, n) by central differences, one batched call
    (one-sided at the box's faces)."""
    n = len(x)
    low = np.maximum(x - _STEP, bounds[0])
    high = np.minimum(x + _STEP, bounds[1])
    probes = np.vstack([x, np.where(np.eye(n, dtype=bool), high, x), np.where(np.eye(n, dtype=bool), low, x)])
    values = objectives(probes)
    spans = (high - low)[:, None]
    jacobian = (values[1 : n + 1] - values[n + 1 :]) / np.where(spans > 0, spans, 1.0)
    return values[0], jacobian.T


def refine_front(
    objectives: Callable[[np.ndarray], np.ndarray], points: np.ndarray, bounds: Bounds
) -> np.ndarray:
    """Each point moved onto the front of ``objectives`` (minimised) by a local solve.

    From a point x0 with objectives y0, SLSQP minimises t subject to (f_i(x) - y0_i) / s_i <= t
    for every objective i, over the box (s: each objective's spread over ``points``): the
    largest equal improvement of every objective (Pascoletti and Serafini's scalarisation),
    so the point moves to the front where it already points and a point on the front stays
    put. The solution is weakly Pareto-optimal for the smooth surrogate; NSGA-III's points
    are typically 1e-3 away from it. Deterministic: no randomness.
    """
    if len(points) == 0:
        return points
    values = objectives(points)
    scale = np.ptp(values, axis=0)
    scale = np.where(scale > 0, scale, 1.0)
    return np.asarray(
        [_refined(objectives, x, y, scale, bounds) for x, y in zip(points, values, strict=True)]
    )


def _refined(
    objectives: Callable[[np.ndarray], np.ndarray],
    start: np.ndarray,
    target: np.ndarray,
    scale: np.ndarray,
    bounds: Bounds,
) -> np.ndarray:
    """One point of :func:`refine_front`: ``start`` where the solve does not improve on it."""
    from scipy.optimize import minimize

    n = len(start)
    cache: dict[bytes, tuple[np.ndarray, np.ndarray]] = {}

    def at(z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        key = z[:n].tobytes()
        if key not in cache:
            cache.clear()
            cache[key] = _values_and_jacobian(objectives, np.clip(z[:n], bounds[0], bounds[1]), bounds)
        return cache[key]

    constraint = {
        "type": "ineq",  # t - (f(x) - y0) / s >= 0
        "fun": lambda z: z[n] - (at(z)[0] - target) / scale,
        "jac": lambda z: np.hstack([-at(z)[1] / scale[:, None], np.ones((len(scale), 1))]),
    }
    result = minimize(
        lambda z: z[n],
        np.append(start, 0.0),
        jac=lambda z: np.append(np.zeros(n), 1.0),
        method="SLSQP",
        bounds=[(float(bounds[0]), float(bounds[1]))] * n + [(None, 0.0)],
        constraints=[constraint],
        options={"maxiter": 100, "ftol": 1e-12},
    )
    moved = np.clip(result.x[:n], bounds[0], bounds[1])
    return moved if np.all(objectives(moved[None])[0] <= target + 1e-12) else start


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


def spread_subset(values: np.ndarray, count: int, first: Sequence[int] = ()) -> np.ndarray:
    """Indices of at most ``count`` rows of ``values`` spread over them: ``first`` (kept), then
    repeatedly the row farthest from those taken, each column scaled to [0, 1]
    (farthest-point sampling; deterministic)."""
    if len(values) <= count:
        return np.arange(len(values))
    span = np.ptp(values, axis=0)
    scaled = (values - values.min(axis=0)) / np.where(span > 0, span, 1.0)
    taken = list(dict.fromkeys(int(i) for i in first)) or [int(np.argmax(scaled.sum(axis=1)))]
    nearest = np.min(np.linalg.norm(scaled[:, None, :] - scaled[taken][None], axis=2), axis=1)
    nearest[taken] = -np.inf
    while len(taken) < count and nearest.max() > 0:  # rows equal to one taken add nothing
        index = int(np.argmax(nearest))
        taken.append(index)
        nearest = np.minimum(nearest, np.linalg.norm(scaled - scaled[index], axis=1))
        nearest[index] = -np.inf
    return np.asarray(taken[:count])


def _unique_rows(points: np.ndarray) -> np.ndarray:
    _, keep = np.unique(np.round(points, 12), axis=0, return_index=True)
    return points[np.sort(keep)]


def non_dominated(values: np.ndarray) -> np.ndarray:
    """Indices of the rows of ``values`` (to maximise) that no other row dominates."""
    from pymoo.util.nds.non_dominated_sorting import NonDominatedSorting

    if len(values) == 0:
        return np.empty(0, dtype=int)
    return np.asarray(NonDominatedSorting().do(-values, only_non_dominated_front=True), dtype=int)
