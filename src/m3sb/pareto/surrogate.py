"""Per-task surrogates of the metric landscape: a full quadratic in the coefficients,
optionally seen through a warp (sigmoid for bounded scores, softplus for losses) as in
the MAP paper, and optionally corrected by a Gaussian process on its residuals.

Everything is fitted with scikit-learn: ``PolynomialFeatures(2)`` plus ``Ridge`` for the
quadratic, ``GaussianProcessRegressor`` for the residuals, ``cross_val_predict`` for the
cross-validated R^2 that tells the user how far to trust the front.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from sklearn.base import BaseEstimator, RegressorMixin

WarpName = Literal["none", "sigmoid", "softplus"]
SurrogateKind = Literal["quadratic", "quadratic+gp", "best"]  # best: per task, by cross-validated R^2
_EDGE = 1e-4  # how close to the ends of its range a warped score may get


@dataclass(frozen=True)
class Warp:
    """A monotone map from metric units to the space where the surrogate is a quadratic."""

    name: WarpName = "none"
    low: float = 0.0
    high: float = 1.0

    def __post_init__(self) -> None:
        from m3sb.pareto.evaluations import SearchError

        if self.name not in ("none", "sigmoid", "softplus"):
            raise SearchError(f"unknown warp '{self.name}'; choose none, sigmoid or softplus")
        if self.name == "sigmoid" and not (
            np.isfinite(self.low) and np.isfinite(self.high) and self.low < self.high
        ):
            raise SearchError(
                f"a sigmoid warp needs a finite range low < high, got [{self.low}, {self.high}]"
            )

    def forward(self, values: np.ndarray) -> np.ndarray:
        """Metric units to warped units."""
        if self.name == "sigmoid":
            share = np.clip((values - self.low) / (self.high - self.low), _EDGE, 1 - _EDGE)
            return np.asarray(np.log(share / (1 - share)))
        if self.name == "softplus":
            positive = np.maximum(values, _EDGE)
            return np.asarray(positive + np.log(-np.expm1(-positive)))
        return values

    def inverse(self, warped: np.ndarray) -> np.ndarray:
        """Warped units back to metric units."""
        if self.name == "sigmoid":
            from scipy.special import expit

            return np.asarray(self.low + (self.high - self.low) * expit(warped))
        if self.name == "softplus":
            return np.asarray(np.logaddexp(0.0, warped))
        return warped

    def slope(self, warped: np.ndarray) -> np.ndarray:
        """d(metric)/d(warped) at ``warped``: turns a warped-space spread into metric units."""
        from scipy.special import expit

        if self.name == "sigmoid":
            share = expit(warped)
            return np.asarray((self.high - self.low) * share * (1 - share))
        if self.name == "softplus":
            return np.asarray(expit(warped))
        return np.ones_like(warped)


def quadratic_model(alpha: float = 1e-10) -> Any:
    """A full second-order polynomial (squares, cross terms, linear terms, constant)."""
    from sklearn.linear_model import Ridge
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import PolynomialFeatures

    return make_pipeline(PolynomialFeatures(degree=2, include_bias=False), Ridge(alpha=alpha))


class QuadraticWithGP(RegressorMixin, BaseEstimator):  # type: ignore[misc]
    """A quadratic trend plus a Gaussian process fitted to its residuals.

    Where the landscape is quadratic the process stays near zero; where it is not, it
    bends the fit through the evaluated points, and its standard deviation says where
    the surrogate is unsure.
    """

    def __init__(self, alpha: float = 1e-10, seed: int = 0) -> None:
        self.alpha = alpha
        self.seed = seed

    def fit(self, points: np.ndarray, values: np.ndarray) -> QuadraticWithGP:
        """Fit the trend, then the process on what the trend leaves."""
        from sklearn.exceptions import ConvergenceWarning
        from sklearn.gaussian_process import GaussianProcessRegressor
        from sklearn.gaussian_process.kernels import RBF, ConstantKernel, WhiteKernel

        self.trend_ = quadratic_model(self.alpha).fit(points, values)
        residuals = values - self.trend_.predict(points)
        scale = float(np.std(residuals)) or 1.0
        kernel = ConstantKernel(1.0, (1e-3, 1e3)) * RBF(
            length_scale=np.full(points.shape[1], 0.3), length_scale_bounds=(0.1, 1e2)
        ) + WhiteKernel(1e-3, (1e-8, 1.0))
        self.process_ = GaussianProcessRegressor(
            kernel=kernel, normalize_y=False, n_restarts_optimizer=2, random_state=self.seed
        )
        self.scale_ = scale
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            self.process_.fit(points, residuals / scale)
        return self

    def predict(self, points: np.ndarray) -> np.ndarray:
        """Trend plus the process's mean correction."""
        return np.asarray(self.trend_.predict(points) + self.scale_ * self.process_.predict(points))

    def predict_std(self, points: np.ndarray) -> np.ndarray:
        """The process's standard deviation (warped units)."""
        _, std = self.process_.predict(points, return_std=True)
        return np.asarray(std) * self.scale_


def _new_model(kind: SurrogateKind, alpha: float, seed: int) -> Any:
    return quadratic_model(alpha) if kind == "quadratic" else QuadraticWithGP(alpha, seed)  # never "best"


@dataclass(frozen=True)
class QuadraticForms:
    """T quadratics of n coefficients, ``q_t(x) = constant_t + linear_t . x + x' curvature_t x``
    (``curvature`` symmetric, shape (T, n, n); ``linear`` (T, n); ``constant`` (T,))."""

    curvature: np.ndarray
    linear: np.ndarray
    constant: np.ndarray

    def values(self, points: np.ndarray) -> np.ndarray:
        """Every quadratic at every row of ``points`` (shape (K, n)), shape (K, T)."""
        points = np.atleast_2d(points)
        bilinear = np.einsum("kn,tnm,km->kt", points, self.curvature, points)
        return np.asarray(self.constant + points @ self.linear.T + bilinear)

    def concave(self) -> bool:
        """Whether every quadratic is concave (so is every weighted sum of them)."""
        eigenvalues = np.linalg.eigvalsh(self.curvature)
        return bool(np.all(eigenvalues <= 1e-9 * max(1.0, float(np.abs(eigenvalues).max()))))

    def scaled(self, factor: float) -> QuadraticForms:
        """The same quadratics times ``factor``."""
        return QuadraticForms(factor * self.curvature, factor * self.linear, factor * self.constant)


def quadratic_form(model: Any) -> tuple[np.ndarray, np.ndarray, float] | None:
    """(curvature, linear, constant) of a fitted :func:`quadratic_model`; None for other models."""
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import PolynomialFeatures

    if not isinstance(model, Pipeline) or not isinstance(model.steps[0][1], PolynomialFeatures):
        return None
    powers = np.asarray(model.steps[0][1].powers_)
    coefficients = np.asarray(model.steps[-1][1].coef_, dtype=float).reshape(-1)
    n = powers.shape[1]
    curvature, linear = np.zeros((n, n)), np.zeros(n)
    constant = float(np.asarray(model.steps[-1][1].intercept_).reshape(-1)[0])
    for power, coefficient in zip(powers, coefficients, strict=True):
        variables = np.flatnonzero(power)
        if power.sum() == 0:
            constant += coefficient
        elif power.sum() == 1:
            linear[variables[0]] += coefficient
        elif len(variables) == 1:
            curvature[variables[0], variables[0]] += coefficient
        else:
            first, second = variables
            curvature[first, second] += coefficient / 2
            curvature[second, first] += coefficient / 2
    return curvature, linear, constant


@dataclass
class TaskSurrogates:
    """One fitted surrogate per task; predictions are in metric units."""

    models: list[Any]
    warp: Warp
    kind: SurrogateKind
    r2: np.ndarray = field(default_factory=lambda: np.empty(0))

    def predict(self, points: np.ndarray) -> np.ndarray:
        """Predicted metrics, shape (n, T)."""
        warped = np.stack([model.predict(points) for model in self.models], axis=1)
        return self.warp.inverse(warped)

    def warped_quadratics(self) -> QuadraticForms | None:
        """The surrogates in warped units as explicit quadratics, when every task's is a bare
        quadratic (the warp is monotone, so their Pareto set is the surrogates'); else None."""
        forms = [quadratic_form(model) for model in self.models]
        if not forms or any(form is None for form in forms):
            return None
        curvature, linear, constant = zip(*[form for form in forms if form is not None], strict=True)
        return QuadraticForms(np.stack(curvature), np.stack(linear), np.asarray(constant, dtype=float))

    def predict_std(self, points: np.ndarray) -> np.ndarray:
        """Predictive standard deviation in metric units, shape (n, T); zero for a bare quadratic."""
        warped = np.stack([model.predict(points) for model in self.models], axis=1)
        spread = np.stack(
            [
                model.predict_std(points) if hasattr(model, "predict_std") else np.zeros(len(points))
                for model in self.models
            ],
            axis=1,
        )
        return np.asarray(spread * self.warp.slope(warped))


def cross_validated_r2(
    points: np.ndarray, values: np.ndarray, warp: Warp, kind: SurrogateKind, alpha: float, seed: int
) -> float:
    """R^2 in metric units of out-of-fold predictions (k-fold, at most 10 folds)."""
    from sklearn.metrics import r2_score
    from sklearn.model_selection import KFold, cross_val_predict

    folds = min(len(points), 10)
    if folds < 3 or float(np.ptp(values)) <= 1e-12 * max(1.0, float(np.abs(values).max())):
        return float("nan")
    splitter = KFold(n_splits=folds, shuffle=True, random_state=seed)
    warped = cross_val_predict(_new_model(kind, alpha, seed), points, warp.forward(values), cv=splitter)
    return float(r2_score(values, warp.inverse(warped)))


def fit_surrogates(
    points: np.ndarray,
    metrics: np.ndarray,
    warp: Warp = Warp(),
    kind: SurrogateKind = "quadratic",
    alpha: float = 1e-10,
    seed: int = 0,
    with_r2: bool = True,
) -> TaskSurrogates:
    """Fit one surrogate per column of ``metrics`` (shape (n, T)) on ``points`` (shape (n, d)).

    ``kind="best"`` fits, for each task, whichever of the quadratic and the
    quadratic-plus-GP has the higher cross-validated R^2.
    """
    from threadpoolctl import threadpool_limits

    kinds: list[SurrogateKind] = ["quadratic", "quadratic+gp"] if kind == "best" else [kind]
    models, r2 = [], []
    with threadpool_limits(limits=1, user_api="blas"):  # tiny matrices: threads only cost here
        for column in metrics.T:
            scores = [
                cross_validated_r2(points, column, warp, k, alpha, seed)
                if with_r2 or len(kinds) > 1
                else np.nan
                for k in kinds
            ]
            best = int(np.nanargmax(scores)) if not np.all(np.isnan(scores)) else 0
            models.append(_new_model(kinds[best], alpha, seed).fit(points, warp.forward(column)))
            r2.append(scores[best])
    return TaskSurrogates(models, warp, kind, np.array(r2, dtype=float))
