"""Facts about ``mode="bayesian"``: its budget, its phases, its batches, and its fronts against map's.

Fronts are compared by the hypervolume (pymoo ``HV``) of their points re-evaluated on the true
function, with the worst value of each task over a 201 x 201 grid as the reference point: a
front closer to the true one, or covering more of it, has a larger hypervolume.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import numpy as np
import pytest
from pymoo.indicators.hv import HV

from m3sb.pareto import (
    Evaluation,
    ParetoFront,
    SearchSettings,
    Warp,
    acquisition,
    amortized_pareto_front,
    grid,
    initial_design,
)
from m3sb.pareto.acquisition import SAME_POINT, propose_batch

# NSGA-III with 50 reference directions instead of 200: bayesian runs in about 2 s instead of 6
SMALL = SearchSettings(generations=30, partitions=49)
SEEDS = (0, 1)


def plateau(points: np.ndarray) -> np.ndarray:
    """Accuracy-like: saturating in the task's own coefficient, a cubic penalty from the other's."""
    c = np.atleast_2d(points)
    return np.stack(
        [np.tanh(3 * c[:, 0]) - 0.8 * c[:, 1] ** 3, np.tanh(3 * c[:, 1]) - 0.8 * c[:, 0] ** 3], axis=1
    )


def bumpy(points: np.ndarray) -> np.ndarray:
    """A Gaussian bump per task plus a sine ripple from the other coefficient."""
    c = np.atleast_2d(points)
    return np.stack(
        [
            np.exp(-4 * ((c[:, 0] - 0.9) ** 2 + 0.6 * c[:, 1] ** 2)) + 0.15 * np.sin(5 * c[:, 1]),
            np.exp(-4 * ((c[:, 1] - 0.9) ** 2 + 0.6 * c[:, 0] ** 2)) + 0.15 * np.sin(5 * c[:, 0]),
        ],
        axis=1,
    )


def hypervolume(function: Callable[[np.ndarray], np.ndarray], coefficients: np.ndarray) -> float:
    reference = function(grid(201, 2, (0.0, 1.0))).min(axis=0)
    return float(HV(ref_point=-reference)(-function(coefficients)))


class StoppedError(RuntimeError):
    pass


class Recorder:
    """An evaluator that counts its calls, keeps what ``on_evaluation`` reports, and can stop.

    With ``stop`` given, call ``stop + 1`` raises ``StoppedError``.
    """

    def __init__(self, function: Callable[[np.ndarray], np.ndarray], stop: int | None = None) -> None:
        self.function = function
        self.calls = 0
        self.stop = stop
        self.reported: list[Evaluation] = []

    def __call__(self, point: np.ndarray) -> np.ndarray:
        if self.calls == self.stop:
            raise StoppedError(f"stopped after {self.stop} evaluations")
        self.calls += 1
        return self.function(point)[0]


def _run(
    function: Callable[[np.ndarray], np.ndarray],
    mode: str,
    seed: int,
    search: SearchSettings = SMALL,
    known: list[Evaluation] | tuple[()] = (),
    stop: int | None = None,
) -> tuple[ParetoFront, Recorder]:
    recorder = Recorder(function, stop)
    front = amortized_pareto_front(
        recorder,
        2,
        mode=mode,  # type: ignore[arg-type]
        seed=seed,
        search=search,
        known=known,
        on_evaluation=recorder.reported.append,
    )
    return front, recorder


@pytest.fixture(scope="module")
def plateau_runs() -> dict[tuple[str, int], tuple[ParetoFront, Recorder]]:
    return {(mode, seed): _run(plateau, mode, seed) for mode in ("map", "bayesian") for seed in SEEDS}


@pytest.mark.parametrize("seed", SEEDS)
def test_bayesian_spends_exactly_the_budget_60_percent_on_the_design(plateau_runs, seed: int) -> None:
    front, recorder = plateau_runs["bayesian", seed]
    assert recorder.calls == 12 == len(front.evaluated) == len(recorder.reported)
    assert front.reused == 0 and front.mode == "bayesian"
    phases = Counter(e.phase for e in front.evaluated)
    # budget 12: ceil(0.6 * 12) = 8 design points, then ceil(4 / 4) = 1 per adaptive round
    assert phases == {"design": 8, "adaptive 1": 1, "adaptive 2": 1, "adaptive 3": 1, "adaptive 4": 1}
    design = np.stack([e.coefficients for e in front.evaluated[:8]])
    assert np.array_equal(design, initial_design(2, 8, (0.0, 1.0), seed))
    assert [e.phase for e in front.evaluated] == [e.phase for e in recorder.reported]


@pytest.mark.parametrize("seed", SEEDS)
def test_bayesian_evaluates_twelve_different_points_inside_the_box(plateau_runs, seed: int) -> None:
    front, _ = plateau_runs["bayesian", seed]
    points = np.stack([e.coefficients for e in front.evaluated])
    assert len(np.unique(np.round(points, 9), axis=0)) == 12
    assert np.all((points >= 0.0) & (points <= 1.0))
    assert np.all((front.coefficients >= 0.0) & (front.coefficients <= 1.0))
    assert np.array_equal(np.stack([e.metrics for e in front.evaluated]), plateau(points))


def _mean_hypervolumes(function: Callable[[np.ndarray], np.ndarray], runs) -> dict[str, float]:
    return {
        mode: float(np.mean([hypervolume(function, runs[mode, seed][0].coefficients) for seed in SEEDS]))
        for mode in ("map", "bayesian")
    }


def test_bayesian_front_beats_map_on_a_plateau_landscape(plateau_runs) -> None:
    """Within 1% of the 201 x 201 grid's hypervolume (3.0884); measured ~3.075 (qLogNEHVI batches) against
    map's ~3.054 (the earlier spread-near-the-front batches: 3.066)."""
    volumes = _mean_hypervolumes(plateau, plateau_runs)
    best = hypervolume(plateau, grid(201, 2, (0.0, 1.0)))
    assert volumes["map"] + 0.01 < volumes["bayesian"] <= best + 1e-9
    assert volumes["bayesian"] > 0.99 * best


def test_bayesian_predictions_are_close_at_its_evaluated_points(plateau_runs) -> None:
    front, _ = plateau_runs["bayesian", 0]
    assert front.surrogates is not None and front.surrogates.kind == "best"
    points = np.stack([e.coefficients for e in front.evaluated])
    assert (
        np.max(np.abs(front.surrogates.predict(points) - plateau(points))) < 2e-2
    )  # the GP has a noise term
    assert np.all(front.r2 > 0.5)


@pytest.mark.xfail(
    strict=True,
    reason="front._bayesian_front (qLogNEHVI batches): with NSGA-III's default 200 reference directions, "
    "bayesian's front on the bumpy landscape has a lower true hypervolume than map's at the same budget "
    "(seed 0 at 30 generations: 0.6157 against 0.6245)",
)
def test_bayesian_front_is_at_least_as_good_as_map_on_a_bumpy_landscape() -> None:
    settings = SearchSettings(generations=30)
    volumes = {
        mode: hypervolume(bumpy, _run(bumpy, mode, 0, settings)[0].coefficients)
        for mode in ("map", "bayesian")
    }
    assert volumes["bayesian"] >= volumes["map"]


def test_bayesian_with_the_smallest_budget_is_the_design_alone() -> None:
    recorder = Recorder(plateau)
    front = amortized_pareto_front(
        recorder, 2, budget=3, mode="bayesian", search=SearchSettings(generations=5)
    )
    assert recorder.calls == 3
    assert [e.phase for e in front.evaluated] == ["design"] * 3


def _distinct(points: np.ndarray) -> bool:
    """Whether no two rows are within the search's SAME_POINT of each other."""
    distances = np.linalg.norm(points[:, None, :] - points[None], axis=2)
    return bool(np.all(distances[np.triu_indices(len(points), 1)] > SAME_POINT))


def saturating(points: np.ndarray) -> np.ndarray:
    """Both tasks best at (1, 1): no trade-off, so the acquisition keeps returning to that corner."""
    c = np.atleast_2d(points)
    return np.stack([c[:, 0] + 0.5 * c[:, 1], c[:, 1] + 0.5 * c[:, 0]], axis=1)


def test_propose_batch_replaces_points_already_evaluated(monkeypatch) -> None:
    """(1, 1) is evaluated and best for both tasks: the optimiser proposes it again, and it is replaced."""
    replaced: list[int] = []
    best_fresh = acquisition._best_fresh

    def counting(*args, **kwargs):
        replaced.append(1)
        return best_fresh(*args, **kwargs)

    monkeypatch.setattr(acquisition, "_best_fresh", counting)
    points = np.vstack([initial_design(2, 6, (0.0, 1.0), seed=0), [[1.0, 1.0]]])
    chosen = propose_batch(points, saturating(points), Warp(), 1.0, (0.0, 1.0), 3, seed=0)
    assert replaced and chosen.shape == (3, 2)
    assert _distinct(np.vstack([points, chosen]))
    assert np.all((chosen >= 0.0) & (chosen <= 1.0))


def test_propose_batch_in_a_tiny_box_keeps_its_points_apart() -> None:
    low, high = 0.5, 0.5 + 1e-7
    points = initial_design(2, 6, (low, high), seed=0)
    metrics = plateau((points - low) / (high - low))
    chosen = propose_batch(points, metrics, Warp(), 1.0, (low, high), 4, seed=0)
    assert len(chosen) == 4
    assert _distinct(np.vstack([points, chosen]))
    assert np.all((chosen >= low) & (chosen <= high))


def test_propose_batch_returns_fewer_points_when_the_box_has_no_new_ones() -> None:
    """A box 1e-9 wide: its corners are all the distinct points there are."""
    bounds = (0.0, 1e-9)
    points = grid(2, 2, bounds)
    chosen = propose_batch(points, plateau(points), Warp(), 1.0, bounds, 2, seed=0)
    assert len(chosen) == 0


def test_bayesian_with_a_budget_beyond_its_useful_points_evaluates_distinct_points() -> None:
    """Budget 20 on a landscape whose front is one corner: every evaluation is a new point."""
    recorder = Recorder(saturating)
    front = amortized_pareto_front(
        recorder, 2, budget=20, mode="bayesian", search=SearchSettings(generations=5, partitions=9)
    )
    points = np.stack([e.coefficients for e in front.evaluated])
    assert recorder.calls == 20 == len(points) and front.reused == 0
    assert _distinct(points)


def test_propose_batch_is_reproducible_for_a_seed() -> None:
    points = initial_design(2, 8, (0.0, 1.0), seed=0)
    first, again, other = (
        propose_batch(points, bumpy(points), Warp(), 1.0, (0.0, 1.0), 2, seed=seed) for seed in (3, 3, 4)
    )
    assert np.array_equal(first, again)
    assert not np.array_equal(first, other)


def _same_evaluations(first: list[Evaluation], second: list[Evaluation]) -> bool:
    return [e.phase for e in first] == [e.phase for e in second] and all(
        np.array_equal(a.coefficients, b.coefficients) and np.array_equal(a.metrics, b.metrics)
        for a, b in zip(first, second, strict=True)
    )


def test_bayesian_replay_of_all_known_evaluations_calls_nothing_and_gives_the_same_front(
    plateau_runs,
) -> None:
    front, recorder = plateau_runs["bayesian", 0]
    assert _same_evaluations(recorder.reported, front.evaluated)
    replay, again = _run(plateau, "bayesian", 0, known=recorder.reported)
    assert again.calls == 0 and again.reported == []
    assert replay.reused == 12
    assert np.array_equal(replay.coefficients, front.coefficients)
    assert np.array_equal(replay.predicted, front.predicted)
    assert _same_evaluations(replay.evaluated, front.evaluated)


def test_bayesian_interrupted_inside_an_adaptive_batch_resumes_to_the_same_front(plateau_runs) -> None:
    """Stopped on call 10, the second adaptive batch (call 9 was the first), then resumed."""
    front, _ = plateau_runs["bayesian", 0]
    stopped = Recorder(plateau, stop=9)
    with pytest.raises(StoppedError):
        amortized_pareto_front(
            stopped, 2, mode="bayesian", search=SMALL, on_evaluation=stopped.reported.append
        )
    assert [e.phase for e in stopped.reported] == ["design"] * 8 + ["adaptive 1"]
    resumed, recorder = _run(plateau, "bayesian", 0, known=stopped.reported)
    assert recorder.calls == len(recorder.reported) == 12 - 9
    assert resumed.reused == 9
    assert np.array_equal(resumed.coefficients, front.coefficients)
    assert _same_evaluations(resumed.evaluated, front.evaluated)
