"""The record of a search's evaluations: budget, validation, reuse of earlier results."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np

from m3sb.errors import M3SBError

Evaluate = Callable[[np.ndarray], "np.ndarray | list[float] | tuple[float, ...]"]


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

    Every point a search asks for counts against ``budget``, whether it is evaluated now
    or found among ``known`` (the evaluations of an earlier, interrupted run), so a
    resumed search takes exactly the same decisions. ``on_evaluation`` sees each new
    evaluation as soon as it finishes.
    """

    def __init__(
        self,
        evaluate: Evaluate,
        n_tasks: int,
        budget: int | None,
        known: Iterable[Evaluation] = (),
        on_evaluation: Callable[[Evaluation], None] | None = None,
    ) -> None:
        self.evaluate = evaluate
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

    @property
    def remaining(self) -> int:
        """How many more points the budget allows (a large number when there is no budget)."""
        return 1 << 62 if self.budget is None else self.budget - self.spent

    def __call__(self, points: np.ndarray, phase: str, charge: bool = True) -> np.ndarray:
        """The metrics at every row of ``points``, shape (n, T)."""
        points = np.atleast_2d(np.asarray(points, dtype=float))
        if charge and len(points) > self.remaining:
            raise SearchError(f"the search asked for {len(points)} evaluations with {self.remaining} left")
        rows = [self._one(point, phase) for point in points]
        if charge:
            self.spent += len(points)
        return np.stack(rows) if rows else np.empty((0, self.n_tasks))

    def _one(self, point: np.ndarray, phase: str) -> np.ndarray:
        key = point_key(point)
        if key in self._known:
            self.reused += 1
            metrics = self._known[key]
        else:
            metrics = self._checked(self.evaluate(point.copy()), point)
            self._known[key] = metrics
            evaluation = Evaluation(point.copy(), metrics, phase)
            if self._on_evaluation is not None:
                self._on_evaluation(evaluation)
        self.evaluations.append(Evaluation(point.copy(), metrics, phase))
        return metrics

    def _checked(self, output: object, point: np.ndarray) -> np.ndarray:
        return check_metrics(output, self.n_tasks, f"evaluate({_show(point)})")


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
