"""Facts about the per-task surrogates: quadratics recovered, warps, the GP correction, R^2."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.special import expit

from m3sb.pareto import Warp, initial_design
from m3sb.pareto.surrogate import fit_surrogates

SETTINGS = settings(max_examples=40, deadline=None)
LOGIT_EDGE = float(np.log(1e-4 / (1 - 1e-4)))  # where the sigmoid warp clips: -9.2102...


def _quadratic(points: np.ndarray, seed: int) -> np.ndarray:
    """A fixed full quadratic (cross terms included) in ``points.shape[1]`` variables."""
    rng = np.random.default_rng(seed)
    n_var = points.shape[1]
    matrix = rng.uniform(-1.0, 1.0, (n_var, n_var))
    linear = rng.uniform(-1.0, 1.0, n_var)
    return np.einsum("ni,ij,nj->n", points, matrix, points) + points @ linear + 0.5


def _held_out(n_var: int, count: int = 300) -> np.ndarray:
    return np.random.default_rng(12345).uniform(0.0, 1.0, (count, n_var))


@pytest.mark.parametrize("n_var", [2, 3, 4])
def test_a_quadratic_is_recovered_when_unregularised(n_var: int) -> None:
    points = initial_design(n_var, (n_var + 1) * (n_var + 2), (0.0, 1.0), seed=0)
    values = _quadratic(points, n_var)
    surrogates = fit_surrogates(points, values[:, None], alpha=1e-12)
    new = _held_out(n_var)
    assert np.max(np.abs(surrogates.predict(new)[:, 0] - _quadratic(new, n_var))) < 1e-8
    assert surrogates.r2[0] == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("n_var", [2, 3, 4])
def test_a_quadratic_is_recovered_to_5e_5_with_the_default_ridge(n_var: int) -> None:
    points = initial_design(n_var, (n_var + 1) * (n_var + 2), (0.0, 1.0), seed=0)
    values = _quadratic(points, n_var)
    surrogates = fit_surrogates(points, values[:, None])
    new = _held_out(n_var)
    assert np.max(np.abs(surrogates.predict(new)[:, 0] - _quadratic(new, n_var))) < 5e-5
    assert surrogates.r2[0] > 1 - 1e-7


@pytest.mark.parametrize("n_var", [2, 4])
def test_a_quadratic_is_recovered_to_1e_6_with_the_default_ridge(n_var: int) -> None:
    points = initial_design(n_var, (n_var + 1) * (n_var + 2), (0.0, 1.0), seed=0)
    surrogates = fit_surrogates(points, _quadratic(points, n_var)[:, None])
    new = _held_out(n_var)
    assert np.max(np.abs(surrogates.predict(new)[:, 0] - _quadratic(new, n_var))) < 1e-6


def test_several_tasks_are_fitted_column_by_column() -> None:
    points = initial_design(3, 20, (0.0, 1.0), seed=1)
    metrics = np.stack([_quadratic(points, seed) for seed in (7, 8, 9)], axis=1)
    surrogates = fit_surrogates(points, metrics, alpha=1e-12)
    new = _held_out(3, 50)
    predicted = surrogates.predict(new)
    assert predicted.shape == (50, 3)
    for task, seed in enumerate((7, 8, 9)):
        assert np.max(np.abs(predicted[:, task] - _quadratic(new, seed))) < 1e-8
    assert np.array_equal(surrogates.predict_std(new), np.zeros((50, 3)))


def test_sigmoid_warp_recovers_a_percent_score_that_is_a_sigmoid_of_a_quadratic() -> None:
    points = initial_design(2, 12, (0.0, 1.0), seed=0)

    def percent(x: np.ndarray) -> np.ndarray:
        return 100.0 * expit(3.0 * _quadratic(x, 5) - 1.0)

    new = _held_out(2)
    assert percent(points).min() > 1.0 and percent(points).max() < 99.0  # inside the unclipped range
    warped = fit_surrogates(points, percent(points)[:, None], Warp("sigmoid", 0.0, 100.0))
    plain = fit_surrogates(points, percent(points)[:, None])
    warped_error = np.max(np.abs(warped.predict(new)[:, 0] - percent(new)))
    assert warped_error < 1e-2  # percent points: 1e-4 of the range
    assert warped.r2[0] > 1 - 1e-8
    assert np.max(np.abs(plain.predict(new)[:, 0] - percent(new))) > 100 * warped_error
    assert np.all((warped.predict(new) > 0.0) & (warped.predict(new) < 100.0))


def test_softplus_warp_recovers_a_positive_loss_that_is_a_softplus_of_a_quadratic() -> None:
    points = initial_design(2, 12, (0.0, 1.0), seed=0)

    def loss(x: np.ndarray) -> np.ndarray:
        return np.logaddexp(0.0, 2.0 * _quadratic(x, 6) - 0.5)

    new = _held_out(2)
    warped = fit_surrogates(points, loss(points)[:, None], Warp("softplus"))
    plain = fit_surrogates(points, loss(points)[:, None])
    warped_error = np.max(np.abs(warped.predict(new)[:, 0] - loss(new)))
    assert warped_error < 1e-4
    assert warped.r2[0] > 1 - 1e-8
    assert np.max(np.abs(plain.predict(new)[:, 0] - loss(new))) > 100 * warped_error
    assert np.all(warped.predict(new) > 0.0)


@SETTINGS
@given(
    low=st.floats(-100.0, 100.0),
    width=st.floats(0.5, 200.0),
    shares=st.lists(st.floats(2e-4, 1 - 2e-4), min_size=1, max_size=20),
)
def test_sigmoid_warp_round_trips_inside_its_range(low: float, width: float, shares: list[float]) -> None:
    warp = Warp("sigmoid", low, low + width)
    values = low + width * np.array(shares)
    assert np.allclose(warp.inverse(warp.forward(values)), values, rtol=0, atol=1e-9 * (abs(low) + width))
    warped = np.linspace(LOGIT_EDGE + 0.01, -LOGIT_EDGE - 0.01, 41)
    assert np.allclose(warp.forward(warp.inverse(warped)), warped, rtol=0, atol=1e-6)


def test_sigmoid_warp_clips_at_the_ends_of_its_range() -> None:
    warp = Warp("sigmoid", 0.0, 100.0)
    assert warp.forward(np.array([0.0, -5.0]))[0] == pytest.approx(LOGIT_EDGE, abs=1e-12)
    assert warp.forward(np.array([-5.0]))[0] == pytest.approx(LOGIT_EDGE, abs=1e-12)
    assert warp.forward(np.array([100.0, 150.0])) == pytest.approx([-LOGIT_EDGE] * 2, abs=1e-12)
    assert warp.forward(np.array([50.0]))[0] == 0.0
    assert warp.inverse(np.array([0.0]))[0] == 50.0


@SETTINGS
@given(values=st.lists(st.floats(2e-4, 50.0), min_size=1, max_size=20))
def test_softplus_warp_round_trips_for_positive_values(values: list[float]) -> None:
    warp = Warp("softplus")
    array = np.array(values)
    assert np.allclose(warp.inverse(warp.forward(array)), array, rtol=1e-9, atol=1e-12)
    warped = np.linspace(-8.0, 40.0, 97)
    assert np.allclose(warp.forward(warp.inverse(warped)), warped, rtol=0, atol=1e-7)


def test_no_warp_is_the_identity() -> None:
    values = np.array([-3.0, 0.0, 0.25, 1e6])
    assert np.array_equal(Warp().forward(values), values)
    assert np.array_equal(Warp().inverse(values), values)
    assert np.array_equal(Warp().slope(values), np.ones(4))


@pytest.mark.parametrize("warp", [Warp("sigmoid", -2.0, 3.0), Warp("softplus"), Warp()])
def test_warp_slope_is_the_derivative_of_the_inverse(warp: Warp) -> None:
    warped = np.linspace(-6.0, 6.0, 25)
    step = 1e-6
    numeric = (warp.inverse(warped + step) - warp.inverse(warped - step)) / (2 * step)
    assert np.allclose(warp.slope(warped), numeric, rtol=1e-6, atol=1e-9)


def _bumpy(points: np.ndarray) -> np.ndarray:
    return np.sin(4.0 * points[:, 0]) * np.cos(3.0 * points[:, 1])


@pytest.fixture(scope="module")
def bumpy_fits() -> tuple[np.ndarray, object, object]:
    points = initial_design(2, 20, (0.0, 1.0), seed=0)
    values = _bumpy(points)[:, None]
    plain = fit_surrogates(points, values, with_r2=False)
    corrected = fit_surrogates(points, values, kind="quadratic+gp", with_r2=False)
    return points, plain, corrected


def test_gp_correction_interpolates_a_non_quadratic_far_better_than_the_quadratic(bumpy_fits) -> None:
    points, plain, corrected = bumpy_fits
    new = _held_out(2)
    plain_rmse = float(np.sqrt(np.mean((plain.predict(new)[:, 0] - _bumpy(new)) ** 2)))
    corrected_rmse = float(np.sqrt(np.mean((corrected.predict(new)[:, 0] - _bumpy(new)) ** 2)))
    assert plain_rmse > 0.2  # the quadratic cannot follow sin(4x) cos(3y)
    assert corrected_rmse < 0.1 * plain_rmse
    assert np.max(np.abs(corrected.predict(points)[:, 0] - _bumpy(points))) < 1e-3


def test_gp_spread_vanishes_at_evaluated_points_and_grows_away_from_them(bumpy_fits) -> None:
    points, plain, corrected = bumpy_fits
    new = _held_out(2)
    at_points = corrected.predict_std(points)
    away = corrected.predict_std(new)
    assert at_points.shape == (20, 1)
    assert np.max(at_points) < 1e-3
    assert np.max(away) > 10 * np.max(at_points)
    distance = np.min(np.linalg.norm(new[:, None, :] - points[None], axis=2), axis=1)
    far, near = away[distance > np.quantile(distance, 0.8), 0], away[distance < np.quantile(distance, 0.2), 0]
    assert np.median(far) > np.median(near)
    assert np.array_equal(plain.predict_std(new), np.zeros((len(new), 1)))


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_cross_validated_r2_is_low_on_pure_noise(seed: int) -> None:
    points = initial_design(2, 30, (0.0, 1.0), seed=seed)
    noise = np.random.default_rng(seed).normal(size=(30, 2))
    assert np.all(fit_surrogates(points, noise, seed=seed).r2 < 0.5)


def test_cross_validated_r2_is_nan_for_an_exactly_constant_metric_or_too_few_points() -> None:
    points = initial_design(2, 12, (0.0, 1.0), seed=0)
    assert np.isnan(fit_surrogates(points, np.full((12, 1), 0.5)).r2[0])  # np.var is exactly 0.0
    assert np.isnan(fit_surrogates(points[:2], _quadratic(points[:2], 1)[:, None]).r2[0])
    assert np.all(np.isnan(fit_surrogates(points, np.ones((12, 2)), with_r2=False).r2))


def test_cross_validated_r2_is_nan_for_a_constant_metric_with_rounding() -> None:
    points = initial_design(2, 12, (0.0, 1.0), seed=0)
    assert np.isnan(fit_surrogates(points, np.full((12, 1), 0.7)).r2[0])


@pytest.mark.parametrize(("n_var", "warp"), [(2, Warp()), (4, Warp("sigmoid")), (8, Warp("softplus"))])
def test_warped_quadratics_are_the_fitted_surrogates_in_warped_units(n_var: int, warp: Warp) -> None:
    points = initial_design(n_var, (n_var + 1) * (n_var + 2), (0.0, 1.0), seed=0)
    rng = np.random.default_rng(n_var)
    metrics = rng.uniform(0.1, 0.9, (len(points), 3))
    surrogates = fit_surrogates(points, metrics, warp, with_r2=False)
    forms = surrogates.warped_quadratics()
    assert forms is not None and forms.curvature.shape == (3, n_var, n_var)
    assert np.array_equal(forms.curvature, np.transpose(forms.curvature, (0, 2, 1)))
    new = _held_out(n_var)
    warped = np.stack([model.predict(new) for model in surrogates.models], axis=1)
    assert np.max(np.abs(forms.values(new) - warped)) < 1e-9
    assert np.allclose(forms.scaled(-2.0).values(new), -2.0 * forms.values(new), atol=1e-12)


def test_a_surrogate_with_a_gp_has_no_explicit_quadratics() -> None:
    points = initial_design(2, 12, (0.0, 1.0), seed=0)
    values = np.sin(6 * points[:, :1]) + points[:, 1:] ** 2
    assert fit_surrogates(points, values, kind="quadratic+gp", with_r2=False).warped_quadratics() is None
