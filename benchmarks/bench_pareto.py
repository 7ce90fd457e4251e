"""Benchmark the MAP Pareto-front search on synthetic landscapes whose fronts are known.

Every landscape maps coefficients ``c`` in the box [0, 1]^T to T metrics in [0, 1]
(higher is better). Task ``i`` peaks near its one-hot corner and loses as the other
coefficients grow, as a merged model does, so the tasks conflict and the front is a
real trade-off. Landscapes (``--landscapes``), deterministic given (seed, T):

* ``quadratic-sigmoid``   -- each metric is ``sigmoid(q_i(c))`` with ``q_i`` a full random
  concave quadratic (rotated, so with cross terms): exactly the surrogate's family.
* ``gaussian-bumps``      -- each metric is a floor plus an anisotropic Gaussian bump at
  the task's peak plus a smaller bump somewhere inside the box (a "synergy" region);
  smooth, but not a quadratic under a sigmoid.
* ``cosine-interference`` -- ``sigmoid(q_i(c) + a_i cos(2 pi w_i . c + phi_i))``: the
  quadratic landscape with a slow ripple (under one cycle across the box), which bends
  the front and can split the Pareto-optimal coefficients into pieces.

Methods (``--methods``), all spending the same budget B = (T+1)(T+2) of true evaluations:

* ``map``, ``bayesian``, ``nested`` -- ``m3sb.pareto.amortized_pareto_front`` in that mode,
  with a sigmoid warp over [0, 1] (``nested`` pairs the closest predicted profiles).
* ``nested-map`` -- nested mode as MAP publishes it (``SearchSettings(pairing="accuracy")``):
  the closest fine-tuned accuracies pair, each side's surrogate is fitted on its weighted
  metric.
* ``random`` -- B uniform points in the box; the non-dominated evaluated ones.
* ``grid``   -- the largest regular grid with at most B points (n = floor(B^(1/T)) per
  axis); the non-dominated evaluated ones. From T = 6 on no grid of 2 per axis fits the
  budget (2^T > B): the grid is not run there and shows as ``-``.

Quality is the hypervolume of a method's front *re-evaluated on the true function*
(for the surrogate modes the true function is called at every ``res.coefficients`` row;
those calls are for scoring only) divided by the hypervolume of the true front. The
true front is approximated by NSGA-III run directly on the true function (300-364
reference directions, ``--generations``, an archive of its later populations), joined
with every point any method evaluated or returned, then refined by jittering and
mixing the front's coefficient vectors (100,000 cheap vectorised evaluations; NSGA-III
alone misses a few per cent of the hypervolume at T = 4) and non-dominated filtered;
so a ratio is at most 1 and measures the distance to the best front known.

Hypervolumes are exact up to T = 5 (pymoo). From T = 6 on, exact hypervolume of thousands
of points is out of reach, so it is estimated by Monte Carlo: ``HV_SAMPLES`` points drawn
uniformly (fixed seed) in the box between the reference point and the true front's ideal
point, the same points for every method of an instance, and the ratio is the share a
method's front dominates over the share the true front dominates (standard error about
0.005 at a ratio near 1).

The reference point is the true front's nadir minus 10% of its ideal-nadir range per
task. That keeps the ratio sensitive to the front's shape rather than to the empty box
below it, so ratios are lower than with a far-away reference point (and a per-task
shortfall compounds over T tasks). Also reported: IGD+ to the true front (the mean
shortfall, in metric units, from a true-front point to the method's front), the median
absolute error of ``res.predicted`` against the true metrics at the front points, the
seconds per run and the distinct true evaluations each surrogate mode made (nested can
make fewer than B); then how often each surrogate mode beats each sampler (and
bayesian beats map) on the same landscape instance.

Usage (from the repository root; the full default run, 3 landscapes x T = 2, 3, 4 x 3
seeds, takes 7-9 minutes on 2 cores, most of it in ``bayesian``; ``--tasks 6 8`` adds
the many-task cases, where the true front dominates the time)::

    uv run python benchmarks/bench_pareto.py
    uv run python benchmarks/bench_pareto.py --quick
    uv run python benchmarks/bench_pareto.py --tasks 2 3 --seeds 5 --landscapes gaussian-bumps

Progress goes to stderr; the markdown tables go to stdout.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from scipy.special import expit, logit

from m3sb.pareto import SearchSettings, Warp, amortized_pareto_front, grid

LANDSCAPES = ("quadratic-sigmoid", "gaussian-bumps", "cosine-interference")
METHODS = ("map", "bayesian", "nested", "nested-map", "random", "grid")
SEARCH_MODES = ("map", "bayesian", "nested", "nested-map")
BOUNDS = (0.0, 1.0)
REF_MARGIN = 0.1  # reference point: nadir minus this share of the ideal-nadir range
# das-dennis: 300, 300, 364, 330, 252, 210, 330 directions
TRUE_FRONT_PARTITIONS = {2: 299, 3: 23, 4: 11, 5: 7, 6: 5, 7: 4, 8: 4}
EXACT_HV_TASKS = 5  # above this many tasks the hypervolume is estimated by Monte Carlo
HV_SAMPLES = 20_000
ARCHIVE_EVERY = 10  # the true front keeps every 10th population of the second half of its run
IGD_POINTS = 5000  # IGD+ is measured against at most this many points of the true front
DENSIFY_ROUNDS = ((10_000, 0.03), (20_000, 0.01), (20_000, 0.005))  # (count, sigma) per refinement

Metrics = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class Landscape:
    """A synthetic T-task landscape: ``metrics`` maps (n, T) coefficients to (n, T) scores."""

    name: str
    n_tasks: int
    metrics: Metrics

    def evaluate(self, coefficients: np.ndarray) -> np.ndarray:
        """The T metrics at one coefficient vector (the black box the search calls)."""
        return np.asarray(self.metrics(np.atleast_2d(np.asarray(coefficients, dtype=float)))[0])


@dataclass
class RunResult:
    """One method on one landscape instance."""

    front: np.ndarray  # true metrics of the method's front, non-dominated, (K, T)
    points: np.ndarray  # coefficients the method returned (samplers: the evaluated ones), (m, T)
    evaluated: np.ndarray  # every point the method really evaluated, (n, T) coefficients
    evaluated_metrics: np.ndarray  # their metrics, (n, T)
    seconds: float
    calls: int  # how many times the method called the true function (at most the budget)
    surrogate_error: float = float("nan")
    hv_ratio: float = float("nan")
    igd_plus: float = float("nan")


@dataclass
class Cell:
    """Results of one (landscape, T, method) over the seeds."""

    hv_ratios: list[float] = field(default_factory=list)
    igd_plus: list[float] = field(default_factory=list)
    errors: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    calls: list[float] = field(default_factory=list)


# ---------------------------------------------------------------------------- landscapes


def _random_rotation(rng: np.random.Generator, n: int) -> np.ndarray:
    """A random orthogonal matrix (QR of a Gaussian matrix, signs fixed)."""
    q, r = np.linalg.qr(rng.standard_normal((n, n)))
    return np.asarray(q * np.sign(np.diag(r)))


def _box_vertices(n_tasks: int) -> np.ndarray:
    """The 2^T corners of the coefficient box."""
    return np.asarray(grid(2, n_tasks, BOUNDS))


def _peak(rng: np.random.Generator, task: int, n_tasks: int) -> np.ndarray:
    """Where task ``task`` is best: near its one-hot corner, the others slightly off zero."""
    peak = rng.uniform(-0.15, 0.1, size=n_tasks)
    peak[task] = rng.uniform(0.8, 1.1)
    return peak


def _quadratic_logits(rng: np.random.Generator, n_tasks: int) -> Callable[[np.ndarray], np.ndarray]:
    """Per-task concave quadratics ``q_i`` in logit units, (n, T) -> (n, T).

    ``q_i`` is ``top_i`` at the task's peak and falls to ``logit(low_i)`` at the worst
    corner of the box (a concave function's minimum over a box is at a corner), with
    top in [0.85, 0.93] and low in [0.08, 0.15] in metric units.
    """
    peaks, forms, tops, slopes = [], [], [], []
    vertices = _box_vertices(n_tasks)
    for task in range(n_tasks):
        peak = _peak(rng, task, n_tasks)
        rotation = _random_rotation(rng, n_tasks)
        form = rotation @ np.diag(rng.uniform(0.3, 1.0, size=n_tasks)) @ rotation.T
        top = float(logit(rng.uniform(0.85, 0.93)))
        low = float(logit(rng.uniform(0.08, 0.15)))
        offsets = vertices - peak
        worst = float(np.max(np.einsum("nj,jk,nk->n", offsets, form, offsets)))
        peaks.append(peak)
        forms.append(form)
        tops.append(top)
        slopes.append((top - low) / worst)

    def logits(points: np.ndarray) -> np.ndarray:
        columns = []
        for peak, form, top, slope in zip(peaks, forms, tops, slopes, strict=True):
            offsets = points - peak
            columns.append(top - slope * np.einsum("nj,jk,nk->n", offsets, form, offsets))
        return np.stack(columns, axis=1)

    return logits


def quadratic_sigmoid(rng: np.random.Generator, n_tasks: int) -> Metrics:
    """``sigmoid(q_i(c))``: exactly a quadratic under a sigmoid, the surrogate's own family."""
    logits = _quadratic_logits(rng, n_tasks)
    return lambda points: np.asarray(expit(logits(points)))


def gaussian_bumps(rng: np.random.Generator, n_tasks: int) -> Metrics:
    """A floor, a broad anisotropic bump at the task's peak and a narrow bump inside the box.

    The floor is in [0.08, 0.12], the main bump's height in [0.7, 0.78] and the inner
    bump's in [0.1, 0.14], so every metric stays in about [0.08, 0.95].
    """
    tasks = []
    for task in range(n_tasks):
        peak = _peak(rng, task, n_tasks)
        rotation = _random_rotation(rng, n_tasks)
        widths = rng.uniform(0.45, 0.75, size=n_tasks)
        precision = rotation @ np.diag(1.0 / widths**2) @ rotation.T
        inner = rng.uniform(0.2, 0.6, size=n_tasks)
        inner[task] = rng.uniform(0.35, 0.65)
        heights = (rng.uniform(0.08, 0.12), rng.uniform(0.7, 0.78), rng.uniform(0.1, 0.14))
        tasks.append((peak, precision, inner, rng.uniform(0.15, 0.25), heights))

    def metrics(points: np.ndarray) -> np.ndarray:
        columns = []
        for peak, precision, inner, width, (floor, main, extra) in tasks:
            offsets = points - peak
            broad = np.exp(-0.5 * np.einsum("nj,jk,nk->n", offsets, precision, offsets))
            narrow = np.exp(-0.5 * np.sum((points - inner) ** 2, axis=1) / width**2)
            columns.append(floor + main * broad + extra * narrow)
        return np.stack(columns, axis=1)

    return metrics


def cosine_interference(rng: np.random.Generator, n_tasks: int) -> Metrics:
    """``sigmoid(q_i(c) + a_i cos(2 pi w_i . c + phi_i))``: a quadratic landscape with a ripple.

    ``a_i`` is in [0.3, 0.5] logit units and ``w_i`` a random direction with 0.6 to 1
    cycle per unit length: a slow ripple that bends the front (and can split the set of
    Pareto-optimal coefficients into pieces) but keeps every metric smooth.
    """
    logits = _quadratic_logits(rng, n_tasks)
    directions = rng.standard_normal((n_tasks, n_tasks))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    frequencies = directions * rng.uniform(0.6, 1.0, size=(n_tasks, 1))
    phases = rng.uniform(0.0, 2 * np.pi, size=n_tasks)
    amplitudes = rng.uniform(0.3, 0.5, size=n_tasks)

    def metrics(points: np.ndarray) -> np.ndarray:
        ripple = amplitudes * np.cos(2 * np.pi * points @ frequencies.T + phases)
        return np.asarray(expit(logits(points) + ripple))

    return metrics


BUILDERS: dict[str, Callable[[np.random.Generator, int], Metrics]] = {
    "quadratic-sigmoid": quadratic_sigmoid,
    "gaussian-bumps": gaussian_bumps,
    "cosine-interference": cosine_interference,
}


def make_landscape(name: str, n_tasks: int, seed: int) -> Landscape:
    """The landscape ``name`` for T = ``n_tasks``, fully determined by (name, T, seed)."""
    rng = np.random.default_rng([seed, n_tasks, LANDSCAPES.index(name)])
    return Landscape(name, n_tasks, BUILDERS[name](rng, n_tasks))


# ---------------------------------------------------------------------------- fronts


def _non_dominated_index(values: np.ndarray) -> np.ndarray:
    """Indices of the rows of ``values`` (to maximise) that no other row dominates."""
    from pymoo.util.nds.non_dominated_sorting import NonDominatedSorting

    if len(values) == 0:
        return np.empty(0, dtype=int)
    return np.asarray(NonDominatedSorting().do(-values, only_non_dominated_front=True), dtype=int)


def non_dominated_rows(values: np.ndarray) -> np.ndarray:
    """The rows of ``values`` (to maximise) that no other row dominates, duplicates dropped."""
    values = np.unique(values, axis=0) if len(values) else values
    return np.asarray(values[_non_dominated_index(values)])


def _nsga3_front(landscape: Landscape, seed: int, generations: int) -> tuple[np.ndarray, np.ndarray]:
    """NSGA-III on the true metrics; the non-dominated (metrics, coefficients) of its last half.

    The archive keeps every ``ARCHIVE_EVERY``-th population from the middle of the run on.
    """
    from pymoo.algorithms.moo.nsga3 import NSGA3
    from pymoo.core.callback import Callback
    from pymoo.core.problem import Problem
    from pymoo.optimize import minimize
    from pymoo.util.ref_dirs import get_reference_directions

    n_tasks = landscape.n_tasks

    class TrueProblem(Problem):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__(n_var=n_tasks, n_obj=n_tasks, xl=BOUNDS[0], xu=BOUNDS[1])

        def _evaluate(self, x: np.ndarray, out: dict[str, Any], *args: Any, **kwargs: Any) -> None:
            out["F"] = -landscape.metrics(x)

    class Archive(Callback):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__()
            self.points: list[np.ndarray] = []

        def notify(self, algorithm: Any) -> None:
            if algorithm.n_gen >= generations // 2 and algorithm.n_gen % ARCHIVE_EVERY == 0:
                self.points.append(np.asarray(algorithm.pop.get("X"), dtype=float))

    partitions = TRUE_FRONT_PARTITIONS[n_tasks]
    directions = get_reference_directions("das-dennis", n_tasks, n_partitions=partitions)
    archive = Archive()
    algorithm = NSGA3(ref_dirs=directions, pop_size=len(directions) + len(directions) % 2)
    problem = TrueProblem()
    result = minimize(problem, algorithm, ("n_gen", generations), seed=seed, callback=archive, verbose=False)
    points = np.vstack([np.atleast_2d(np.asarray(result.X, dtype=float)), *archive.points])
    values = landscape.metrics(points)
    keep = _non_dominated_index(values)
    return values[keep], points[keep]


def _densify(
    landscape: Landscape, points: np.ndarray, rng: np.random.Generator, count: int, sigma: float
) -> tuple[np.ndarray, np.ndarray]:
    """Refine a front in decision space: ``count`` jittered copies of its points (Gaussian,
    ``sigma``, clipped to the box) and ``count`` random convex mixes of two of them; return
    the non-dominated (metrics, coefficients) of the old and new points together.
    """
    first, second = rng.integers(len(points), size=(2, count))
    jittered = np.clip(points[first] + rng.normal(0.0, sigma, size=(count, points.shape[1])), *BOUNDS)
    share = rng.uniform(size=(count, 1))
    mixed = share * points[first] + (1 - share) * points[second]
    candidates = np.vstack([points, jittered, mixed])
    values = landscape.metrics(candidates)
    keep = _non_dominated_index(values)
    return values[keep], candidates[keep]


def true_front(landscape: Landscape, seed: int, generations: int, extra: np.ndarray) -> np.ndarray:
    """The best known front of ``landscape`` (metrics, higher is better), shape (K, T).

    NSGA-III on the true function, joined with the coefficient vectors in ``extra`` (the
    methods' evaluated and returned points), then refined by ``DENSIFY_ROUNDS`` of
    jittering and mixing the front's coefficient vectors. NSGA-III alone leaves a few
    per cent of the hypervolume uncovered at T = 4; the refinement closes most of it.
    """
    _, points = _nsga3_front(landscape, seed, generations)
    points = np.vstack([points, extra])
    rng = np.random.default_rng([seed, landscape.n_tasks, 104729])
    values = landscape.metrics(points)
    for count, sigma in DENSIFY_ROUNDS:
        values, points = _densify(landscape, points, rng, count, sigma)
    return non_dominated_rows(values)


def hypervolume(front: np.ndarray, reference: np.ndarray, upper: np.ndarray) -> float:
    """Hypervolume (metrics maximised) dominated by ``front`` above ``reference``; exact up to
    ``EXACT_HV_TASKS`` tasks, else a Monte Carlo estimate over the box [reference, upper]
    (``upper`` at least every front's ideal point; the same samples for every front)."""
    from pymoo.indicators.hv import HV

    inside = front[np.all(front > reference, axis=1)]
    if len(inside) == 0:
        return 0.0
    if front.shape[1] <= EXACT_HV_TASKS:
        return float(HV(ref_point=-reference)(-inside))
    rng = np.random.default_rng(HV_SAMPLES)
    samples = reference + rng.uniform(size=(HV_SAMPLES, front.shape[1])) * (upper - reference)
    dominated = 0
    for start in range(0, HV_SAMPLES, 64):
        chunk = samples[start : start + 64]
        dominated += int(np.any(np.all(inside[None] >= chunk[:, None], axis=2), axis=1).sum())
    return float(np.prod(upper - reference) * dominated / HV_SAMPLES)


def reference_point(front: np.ndarray) -> np.ndarray:
    """The true front's nadir minus ``REF_MARGIN`` of its ideal-nadir range, per task."""
    ideal, nadir = front.max(axis=0), front.min(axis=0)
    return np.asarray(nadir - REF_MARGIN * np.maximum(ideal - nadir, 1e-9))


def igd_plus(front: np.ndarray, reference_front: np.ndarray) -> float:
    """IGD+ of ``front`` to ``reference_front`` (metrics maximised), in metric units.

    The mean over reference points of how far the front falls short of each, counting
    only the tasks where it falls short; at most ``IGD_POINTS`` reference points (a fixed
    random subset) keep it fast.
    """
    from pymoo.indicators.igd_plus import IGDPlus

    if len(reference_front) > IGD_POINTS:
        rng = np.random.default_rng(0)
        reference_front = reference_front[rng.choice(len(reference_front), IGD_POINTS, replace=False)]
    return float(IGDPlus(-reference_front)(-front))


# ---------------------------------------------------------------------------- methods


def grid_points_per_axis(budget: int, n_tasks: int) -> int:
    """The largest n with n^T <= budget (for T <= 5 and B = (T+1)(T+2), n >= 2)."""
    n = max(1, round(budget ** (1.0 / n_tasks)))
    while n > 1 and n**n_tasks > budget:
        n -= 1
    while (n + 1) ** n_tasks <= budget:
        n += 1
    return int(n)


def run_sampler(landscape: Landscape, points: np.ndarray) -> RunResult:
    """Evaluate ``points`` on the true function; the front is the non-dominated evaluated ones."""
    start = time.perf_counter()
    values = np.stack([landscape.evaluate(point) for point in points])
    seconds = time.perf_counter() - start
    return RunResult(non_dominated_rows(values), points, points, values, seconds, len(points))


SEARCH = [SearchSettings()]  # how the surrogate modes search (set from the command line)


def run_search(landscape: Landscape, method: str, budget: int, seed: int) -> RunResult:
    """``amortized_pareto_front`` in ``method``'s mode; its front re-evaluated on the true function."""
    mode = "nested" if method == "nested-map" else method
    settings = replace(SEARCH[0], pairing="accuracy") if method == "nested-map" else SEARCH[0]
    calls = 0

    def evaluate(coefficients: np.ndarray) -> np.ndarray:
        nonlocal calls
        calls += 1
        return landscape.evaluate(coefficients)

    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = amortized_pareto_front(
            evaluate,
            n_tasks=landscape.n_tasks,
            budget=budget,
            bounds=BOUNDS,
            mode=mode,
            seed=seed,
            metric="score",
            warp=Warp("sigmoid", 0.0, 1.0),
            search=settings,
        )
    seconds = time.perf_counter() - start
    distinct = len({tuple(e.coefficients) for e in res.evaluated})  # a point asked again is free
    if calls > budget or distinct > budget:
        raise RuntimeError(f"{method} made {calls} evaluations ({distinct} distinct points), budget {budget}")
    actual = landscape.metrics(res.coefficients)
    error = float(np.median(np.abs(res.predicted - actual))) if len(actual) else float("nan")
    evaluated = np.stack([e.coefficients for e in res.evaluated])
    evaluated_metrics = np.stack([e.metrics for e in res.evaluated])
    front = non_dominated_rows(actual)
    return RunResult(front, res.coefficients, evaluated, evaluated_metrics, seconds, calls, error)


def run_method(landscape: Landscape, method: str, budget: int, seed: int) -> RunResult:
    """One method on one landscape at ``budget`` true evaluations."""
    n_tasks = landscape.n_tasks
    if method in SEARCH_MODES:
        return run_search(landscape, method, budget, seed)
    if method == "random":
        rng = np.random.default_rng([seed, n_tasks, 7919])
        return run_sampler(landscape, rng.uniform(BOUNDS[0], BOUNDS[1], size=(budget, n_tasks)))
    if method == "grid":
        return run_sampler(landscape, grid(grid_points_per_axis(budget, n_tasks), n_tasks, BOUNDS))
    raise ValueError(f"unknown method {method!r}")


def runs_at(method: str, n_tasks: int) -> bool:
    """Whether ``method`` runs at ``n_tasks`` tasks (no grid of 2 per axis fits from T = 6 on)."""
    return method != "grid" or grid_points_per_axis((n_tasks + 1) * (n_tasks + 2), n_tasks) >= 2


def score_instance(
    landscape: Landscape, methods: Sequence[str], seed: int, generations: int
) -> tuple[dict[str, RunResult], int]:
    """Run every method that runs at this T on one landscape, then score each against the
    joint true front.

    Returns the results by method and the number of points on the reference front.
    """
    budget = (landscape.n_tasks + 1) * (landscape.n_tasks + 2)
    results = {
        method: run_method(landscape, method, budget, seed)
        for method in methods
        if runs_at(method, landscape.n_tasks)
    }
    extra = np.vstack([r.points for r in results.values()] + [r.evaluated for r in results.values()])
    pool = [true_front(landscape, seed, generations, extra)]
    pool += [r.front for r in results.values()] + [r.evaluated_metrics for r in results.values()]
    reference_front = non_dominated_rows(np.vstack(pool))
    reference = reference_point(reference_front)
    upper = reference_front.max(axis=0)
    best = hypervolume(reference_front, reference, upper)
    for result in results.values():
        result.hv_ratio = hypervolume(result.front, reference, upper) / best
        result.igd_plus = igd_plus(result.front, reference_front)
    return results, len(reference_front)


# ---------------------------------------------------------------------------- reporting


def _mean_std(values: Sequence[float], digits: int = 3) -> str:
    """``mean ± std`` of the finite values (just the mean for one value; ``-`` for none)."""
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return "-"
    mean = f"{statistics.fmean(finite):.{digits}f}"
    return f"{mean} ± {statistics.stdev(finite):.{digits}f}" if len(finite) > 1 else mean


def _mean(values: Sequence[float], fmt: str) -> str:
    finite = [v for v in values if math.isfinite(v)]
    return format(statistics.fmean(finite), fmt) if finite else "-"


def hv_table(cells: dict[tuple[str, int, str], Cell], methods: Sequence[str]) -> list[str]:
    """Markdown rows: mean ± std of the HV ratio per (landscape, T) and method."""
    columns = ["landscape", "T", "budget", *methods, "best"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for landscape, n_tasks in dict.fromkeys((name, t) for name, t, _ in cells):
        row = {m: cells.get((landscape, n_tasks, m), Cell()) for m in methods}
        best = max((m for m in methods if row[m].hv_ratios), key=lambda m: statistics.fmean(row[m].hv_ratios))
        budget = (n_tasks + 1) * (n_tasks + 2)
        values = [_mean_std(row[m].hv_ratios) for m in methods]
        lines.append(f"| {landscape} | {n_tasks} | {budget} | " + " | ".join(values) + f" | {best} |")
    return lines


def detail_table(cells: dict[tuple[str, int, str], Cell], methods: Sequence[str]) -> list[str]:
    """Markdown rows: surrogate error, seconds per run and true evaluations of the search modes."""
    searched = [m for m in methods if m in SEARCH_MODES]
    columns = ["landscape", "T", *(f"{m} err" for m in searched), *(f"{m} s" for m in searched)]
    columns += [f"{m} evals" for m in searched]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for landscape, n_tasks in dict.fromkeys((name, t) for name, t, _ in cells):
        row = [cells.get((landscape, n_tasks, m), Cell()) for m in searched]
        values = [_mean_std(cell.errors) for cell in row] + [_mean(cell.seconds, ".2f") for cell in row]
        values += [_mean(cell.calls, ".1f") for cell in row]
        lines.append(f"| {landscape} | {n_tasks} | " + " | ".join(values) + " |")
    return lines


def igd_table(cells: dict[tuple[str, int, str], Cell], methods: Sequence[str]) -> list[str]:
    """Markdown rows: mean IGD+ per (landscape, T) and method."""
    columns = ["landscape", "T", *methods]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for landscape, n_tasks in dict.fromkeys((name, t) for name, t, _ in cells):
        values = [_mean(cells.get((landscape, n_tasks, m), Cell()).igd_plus, ".3f") for m in methods]
        lines.append(f"| {landscape} | {n_tasks} | " + " | ".join(values) + " |")
    return lines


def comparisons(methods: Sequence[str]) -> list[tuple[str, str]]:
    """(search mode, rival) pairs to count wins for: each mode against each sampler, and
    bayesian against map."""
    modes = [m for m in methods if m in SEARCH_MODES]
    samplers = [m for m in methods if m not in SEARCH_MODES]
    pairs = [(mode, rival) for mode in modes for rival in samplers]
    if "bayesian" in modes and "map" in modes:
        pairs.append(("bayesian", "map"))
    return pairs


def wins_lines(per_seed: dict[tuple[str, int, str], list[float]], methods: Sequence[str]) -> list[str]:
    """How often (per landscape, over T and seeds) the first of each pair has the higher HV ratio."""
    landscapes = list(dict.fromkeys(name for name, _, _ in per_seed))
    task_counts = sorted({t for _, t, _ in per_seed})
    lines = []
    for mode, rival in comparisons(methods):
        counts = []
        for name in landscapes:
            pairs = [
                (a, b)
                for t in task_counts
                if (name, t, rival) in per_seed  # the grid does not run from T = 6 on
                for a, b in zip(per_seed[name, t, mode], per_seed[name, t, rival], strict=True)
            ]
            counts.append(f"{name} {sum(a > b for a, b in pairs)}/{len(pairs)}")
        lines.append(f"- {mode} > {rival}: " + ", ".join(counts))
    return lines


# ---------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Parse and validate the command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--tasks", type=int, nargs="+", default=[2, 3, 4], choices=range(2, 9), help="task counts T"
    )
    parser.add_argument("--landscapes", nargs="+", default=list(LANDSCAPES), choices=LANDSCAPES)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 per (landscape, T)")
    parser.add_argument(
        "--generations", type=int, default=150, help="NSGA-III generations for the true front"
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: one seed, T = 2")
    parser.add_argument(
        "--refine", action="store_true", help="refine the surrogate modes' fronts (SearchSettings.refine)"
    )
    parser.add_argument(
        "--search-generations",
        type=int,
        default=None,
        help="NSGA-III generations on the surrogates (default: by T, SearchSettings)",
    )
    parser.add_argument(
        "--densify",
        type=int,
        default=None,
        help="candidates per densifying round of the surrogate modes' fronts (0: none; default: by T)",
    )
    parser.add_argument(
        "--scalarise",
        type=int,
        default=None,
        help="weighted-sum sub-problems of the quadratic surrogates' fronts (0: none; default: by T)",
    )
    args = parser.parse_args(argv)
    SEARCH[0] = SearchSettings(
        generations=args.search_generations,
        refine=args.refine,
        densify=args.densify,
        scalarise=args.scalarise,
    )
    if args.quick:
        args.seeds, args.tasks = 1, [2]
    if args.seeds < 1:
        parser.error("--seeds must be >= 1")
    if any(t < 2 for t in args.tasks):
        parser.error("--tasks must all be >= 2")
    return args


def code_version() -> str:
    """Where the imported m3sb comes from: its git commit (``+dirty`` when its pareto
    package has local changes), or its folder when that is not a git checkout."""
    import m3sb

    package = Path(m3sb.__file__).resolve().parent

    def git(*command: str) -> str:
        done = subprocess.run(["git", *command], cwd=package, capture_output=True, text=True, check=True)
        return done.stdout.strip()

    try:
        commit = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "--", str(package / "pareto"))
    except (OSError, subprocess.CalledProcessError):
        return f"from {package} (not a git checkout)"
    return commit + ("+dirty" if dirty else "")


def run_all(args: argparse.Namespace) -> dict[tuple[str, int, str], Cell]:
    """Every method on every (landscape, T, seed); progress lines go to stderr."""
    cells: dict[tuple[str, int, str], Cell] = {}
    for landscape_name in args.landscapes:
        for n_tasks in args.tasks:
            for seed in range(args.seeds):
                landscape = make_landscape(landscape_name, n_tasks, seed)
                results, n_front = score_instance(landscape, args.methods, seed, args.generations)
                for method, result in results.items():
                    cell = cells.setdefault((landscape_name, n_tasks, method), Cell())
                    cell.hv_ratios.append(result.hv_ratio)
                    cell.igd_plus.append(result.igd_plus)
                    cell.errors.append(result.surrogate_error)
                    cell.seconds.append(result.seconds)
                    cell.calls.append(result.calls)
                summary = " ".join(f"{m}={r.hv_ratio:.3f}" for m, r in results.items())
                print(
                    f"{landscape_name} T={n_tasks} seed={seed}: {summary} (true front {n_front} points)",
                    file=sys.stderr,
                    flush=True,
                )
    return cells


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print the tables."""
    args = parse_args(argv)
    version = code_version()  # before the run: the checkout may change while it runs
    started = time.perf_counter()
    cells = run_all(args)
    elapsed = time.perf_counter() - started
    per_seed = {key: cell.hv_ratios for key, cell in cells.items()}
    print(f"m3sb {version}, numpy {np.__version__}, {os.cpu_count()} CPUs\n")
    print(f"Hypervolume ratio vs the true front (mean ± std over {args.seeds} seeds; 1 is best)\n")
    print("\n".join(hv_table(cells, args.methods)))
    print("\nIGD+ to the true front (mean over seeds; metric units, 0 is best)\n")
    print("\n".join(igd_table(cells, args.methods)))
    print(
        "\nSurrogate error (median |predicted - true| at the front points), seconds per run and"
        " distinct true evaluations made (of the budget)\n"
    )
    print("\n".join(detail_table(cells, args.methods)))
    print("\nWins (higher HV ratio on the same landscape instance, over T and seeds)\n")
    print("\n".join(wins_lines(per_seed, args.methods)))
    print(f"\nTotal time: {elapsed:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
