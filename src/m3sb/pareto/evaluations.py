"""The record of a search's evaluations: budget, validation, reuse of earlier results."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np

from m3sb.errors import M3SBError

Evaluate = Callable[[np.ndarray], "np.ndarray | list[float] | tuple[float, ...]"]
# Evaluates the rows of a (n, T) array, yielding one metrics vector per row, in order.
EvaluateMany = Callable[[np.ndarray], Iterable[object]]


class SearchError(M3SBError):
    """A Pareto search cannot run as asked (bad budget, preference or evaluator output)."""


@dataclass(frozen=True)
class Evaluation:
    """One really evaluated candidate: its coefficients, the T metrics, and why it was asked for."""

    coefficients: np.ndarray
    metrics: np.ndarray
    phase: str


def point_key(coefficients: np.ndarray) -> tuple[float, ...]:
    """A hashable key for a coefficient vector (equal up to 1e-12)."""
    return tuple(float(round(value, 12)) + 0.0 for value in np.asarray(coefficients, dtype=float))


class EvaluationLog:
    """Calls ``evaluate`` for new points, reuses known ones, and keeps the budget.

    Each distinct point a search asks for counts once against ``budget``, whether it is
    evaluated now or found among ``known`` (the evaluations of an earlier, interrupted
    run), so a resumed search takes exactly the same decisions; asking again for a point
    this search already asked for is free. ``on_evaluation`` sees each new evaluation as
    soon as it finishes.
    """

    def __init__(
        self,
        evaluate: Evaluate,
        n_tasks: int,
        budget: int | None,
        known: Iterable[Evaluation] = (),
        on_evaluation: Callable[[Evaluation], None] | None = None,
        evaluate_many: EvaluateMany | None = None,
    ) -> None:
        self.evaluate = evaluate
        self.evaluate_many = evaluate_many or (lambda points: (evaluate(point.copy()) for point in points))
        self.n_tasks = n_tasks
        self.budget = budget
        self.spent = 0
        self.evaluations: list[Evaluation] = []
        self.reused = 0
        self._known = {
            point_key(e.coefficients): check_metrics(
                e.metrics, n_tasks, f"known evaluation at {_show(e.coefficients)}"
            )
            for e in known
        }
        self._on_evaluation = on_evaluation
        self._asked: set[tuple[float, ...]] = set()

    def asked(self, point: np.ndarray) -> bool:
        """Whether this search has asked for ``point`` already (asking again is free)."""
        return point_key(point) in self._asked

    @property
    def remaining(self) -> int:
        """How many more points the budget allows (a large number when there is no budget)."""
        return 1 << 62 if self.budget is None else self.budget - self.spent

    def __call__(self, points: np.ndarray, phase: str) -> np.ndarray:
        """The metrics at every row of ``points``, shape (n, T).

        The points not known yet go to ``evaluate_many`` together (one batch, which an
        executor may spread over workers); each result is recorded as it arrives, in the
        order of ``points``, so the record never depends on which worker finished first.
        """
        points = np.atleast_2d(np.asarray(points, dtype=float))
        keys = [point_key(point) for point in points]
        charged = len(set(keys) - self._asked)
        if charged > self.remaining:
            raise SearchError(f"the search asked for {charged} evaluations with {self.remaining} left")
        seen, fresh = set(self._known), []
        for index, key in enumerate(keys):
            if key not in seen:
                seen.add(key)
                fresh.append(index)
        outputs = iter(self.evaluate_many(points[fresh])) if fresh else iter(())
        for index in fresh:
            try:
                output = next(outputs)
            except StopIteration:
                raise SearchError(
                    f"evaluate_many returned {fresh.index(index)} results for {len(fresh)} points"
                ) from None
            metrics = check_metrics(output, self.n_tasks, f"evaluate({_show(points[index])})")
            self._known[keys[index]] = metrics
            if self._on_evaluation is not None:
                self._on_evaluation(Evaluation(points[index].copy(), metrics, phase))
        if next(outputs, None) is not None:
            raise SearchError(
                f"evaluate_many returned more results than the {len(fresh)} points it was given"
            )
        self.reused += len(points) - len(fresh)
        self.spent += charged
        self._asked.update(keys)
        for point, key in zip(points, keys, strict=True):
            self.evaluations.append(Evaluation(point.copy(), self._known[key], phase))
        return np.stack([self._known[key] for key in keys]) if keys else np.empty((0, self.n_tasks))


def check_metrics(output: object, n_tasks: int, source: str) -> np.ndarray:
    """``output`` as T finite floats; a one-line SearchError naming ``source`` otherwise."""
    not_numbers = SearchError(f"{source} returned {type(output).__name__}, not numbers")
    if output is None or isinstance(output, str | bytes | dict | set):
        raise not_numbers
    try:
        array = np.asarray(output)
    except (TypeError, ValueError):
        raise not_numbers from None
    if array.dtype.kind not in "fiu":
        raise not_numbers
    metrics = array.astype(float).reshape(-1)
    if metrics.shape != (n_tasks,):
        raise SearchError(f"{source} returned {metrics.size} metrics for {n_tasks} tasks")
    bad = np.flatnonzero(~np.isfinite(metrics))
    if bad.size:
        raise SearchError(f"{source} returned {metrics[bad[0]]} for task {bad[0]}")
    return metrics


def _show(point: np.ndarray) -> str:
    return "[" + ", ".join(f"{value:.4g}" for value in point) + "]"
