"""Facts about resuming map and nested searches from an earlier run's evaluations (``known=``).

(Bayesian's resumption is tested in test_pareto_bayesian.py, on the runs made there.)
Toy: a non-quadratic landscape, so the surrogates depend on every metric value.
"""

from __future__ import annotations

import numpy as np
import pytest

from m3sb.pareto import Evaluation, ParetoFront, SearchSettings, amortized_pareto_front

SETTINGS = {"map": SearchSettings(generations=30), "nested": SearchSettings(generations=20, partitions=49)}
TASKS = {"map": 2, "nested": 3}


def landscape(point: np.ndarray) -> np.ndarray:
    c = np.asarray(point, dtype=float)
    return np.array([np.tanh(3 * c[i]) - 0.8 * (np.sum(c**3) - c[i] ** 3) for i in range(len(c))])


class StoppedError(RuntimeError):
    pass


class Evaluator:
    """Counts calls; raises ``StoppedError`` on call ``stop + 1`` when ``stop`` is given."""

    def __init__(self, stop: int | None = None) -> None:
        self.calls = 0
        self.stop = stop

    def __call__(self, point: np.ndarray) -> np.ndarray:
        if self.stop is not None and self.calls == self.stop:
            raise StoppedError(f"stopped after {self.stop} evaluations")
        self.calls += 1
        return landscape(point)


def _search(
    mode: str, evaluate: Evaluator, known=(), reported: list[Evaluation] | None = None
) -> ParetoFront:
    return amortized_pareto_front(
        evaluate,
        TASKS[mode],
        mode=mode,  # type: ignore[arg-type]
        seed=0,
        known=known,
        on_evaluation=None if reported is None else reported.append,
        search=SETTINGS[mode],
    )


@pytest.fixture(scope="module")
def first_run() -> tuple[ParetoFront, list[Evaluation], int]:
    """map run once, uninterrupted, reporting every evaluation."""
    reported: list[Evaluation] = []
    evaluate = Evaluator()
    return _search("map", evaluate, reported=reported), reported, evaluate.calls


def _same_evaluations(first: list[Evaluation], second: list[Evaluation]) -> bool:
    return [e.phase for e in first] == [e.phase for e in second] and all(
        np.array_equal(a.coefficients, b.coefficients) and np.array_equal(a.metrics, b.metrics)
        for a, b in zip(first, second, strict=True)
    )


def test_on_evaluation_reports_every_new_evaluation_once(first_run) -> None:
    front, reported, calls = first_run
    assert calls == len(reported) == len(front.evaluated) == 12
    assert _same_evaluations(reported, front.evaluated)


def test_replaying_all_known_evaluations_calls_nothing_and_gives_the_same_front(first_run) -> None:
    front, reported, _ = first_run
    evaluate, again = Evaluator(), []
    replay = _search("map", evaluate, known=reported, reported=again)
    assert evaluate.calls == 0 and again == []
    assert replay.reused == 12
    assert np.array_equal(replay.coefficients, front.coefficients)
    assert np.array_equal(replay.predicted, front.predicted)
    assert _same_evaluations(replay.evaluated, front.evaluated)


@pytest.mark.parametrize("stop", [1, 5, 11])
def test_an_interrupted_run_resumes_to_the_same_front(first_run, stop: int) -> None:
    """Stopped on call stop + 1, then resumed."""
    front, _, _ = first_run
    reported: list[Evaluation] = []
    with pytest.raises(StoppedError):
        _search("map", Evaluator(stop), reported=reported)
    assert len(reported) == stop
    evaluate, more = Evaluator(), []
    resumed = _search("map", evaluate, known=reported, reported=more)
    assert evaluate.calls == len(more) == 12 - stop
    assert resumed.reused == stop
    assert np.array_equal(resumed.coefficients, front.coefficients)
    assert _same_evaluations(resumed.evaluated, front.evaluated)


def test_known_evaluations_of_other_points_are_ignored(first_run) -> None:
    """Another seed's design shares only the two one-hot corners with seed 0's."""
    front, _, _ = first_run
    other: list[Evaluation] = []
    amortized_pareto_front(Evaluator(), 2, seed=1, on_evaluation=other.append, search=SETTINGS["map"])
    evaluate = Evaluator()
    resumed = _search("map", evaluate, known=other)
    assert evaluate.calls == 10 and resumed.reused == 2
    assert np.array_equal(resumed.coefficients, front.coefficients)


def test_nested_replay_calls_nothing_and_gives_the_same_front() -> None:
    reported: list[Evaluation] = []
    evaluate = Evaluator()
    front = _search("nested", evaluate, reported=reported)
    # budget 24: 3 leaves, then (24 - 3) // 2 = 10 new points per pair; the pairs' corners that are
    # leaves (2 in {0} + {1}, 1 in {0,1} + {2}) are asked for again, for free, on top of the 10
    assert len(front.evaluated) == 26 and front.reused == 3
    assert evaluate.calls == len(reported) == 23
    replay_evaluate = Evaluator()
    replay = _search("nested", replay_evaluate, known=reported)
    assert replay_evaluate.calls == 0
    assert np.array_equal(replay.coefficients, front.coefficients)
    assert _same_evaluations(replay.evaluated, front.evaluated)
