"""Where ``mode="bayesian"`` evaluates next: expected hypervolume improvement on per-task GPs.

Each task's metric, seen through the search's :class:`~m3sb.pareto.surrogate.Warp`, gets
a botorch ``SingleTaskGP`` whose mean function is a full quadratic in the coefficients
(its coefficients start at the least-squares fit and are then trained with the kernel's
hyperparameters by the marginal likelihood), so the process models what the quadratic
misses. Inputs are scaled to the unit cube, outputs standardised.

The criterion is botorch's ``qLogNoisyExpectedHypervolumeImprovement`` of the metrics
themselves: posterior samples go back through the warp before the hypervolume is taken,
so the volume is measured in the units the front is judged in, with the reference point
a tenth of the observed front's range below its nadir. A batch is chosen greedily, one
point at a time with the earlier ones pending; a point that coincides with an evaluated
or already chosen one (the optimiser likes the box's corners, where the one-hot design
points sit) is replaced by the best raw candidate that does not, so no evaluation of
the budget is spent twice.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

from m3sb.pareto.design import Bounds
from m3sb.pareto.surrogate import Warp

SAME_POINT = 1e-9  # closer than this (in coefficient units) is the same point to the search
REF_MARGIN = 0.1  # reference point: observed nadir minus this share of the ideal-nadir range
EHVI_MAX_TASKS = 4  # above: qLogNParEGO (the hypervolume's box decompositions grow too fast)
FIT_STEPS = 60  # L-BFGS-B steps of each marginal-likelihood fit


@dataclass(frozen=True)
class AcquisitionSettings:
    """How hard each batch is searched for: MC samples of the posterior, the optimiser's
    random starts and the raw (Sobol) candidates they are picked from, L-BFGS-B steps."""

    mc_samples: int = 64
    restarts: int = 4
    raw_samples: int = 128
    maxiter: int = 60


LIGHT = AcquisitionSettings(mc_samples=32, restarts=2, raw_samples=64, maxiter=30)


def _quadratic_mean(dim: int, outputs: int) -> Any:
    """A gpytorch mean, one per output, ``b + w.x + sum_{i<=j} a_ij x_i x_j`` with trainable
    coefficients (batch shape ``(outputs,)``, as botorch's multi-output GP asks)."""
    import torch
    from gpytorch.means import Mean

    rows, cols = np.triu_indices(dim)

    class QuadraticMean(Mean):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__()
            self.rows, self.cols = rows.tolist(), cols.tolist()
            for name, size in (("constant", 1), ("linear", dim), ("quadratic", len(rows))):
                zeros = torch.zeros(outputs, size, dtype=torch.float64)
                self.register_parameter(name, torch.nn.Parameter(zeros))

        def forward(self, x: Any) -> Any:
            products = x[..., self.rows] * x[..., self.cols]
            linear = (x * self.linear.unsqueeze(-2)).sum(-1)
            return self.constant + linear + (products * self.quadratic.unsqueeze(-2)).sum(-1)

    return QuadraticMean()


def _quadratic_features(x: np.ndarray) -> np.ndarray:
    rows, cols = np.triu_indices(x.shape[1])
    return np.hstack([np.ones((len(x), 1)), x, x[:, rows] * x[:, cols]])


def _fit_model(x: Any, standard: np.ndarray) -> Any:
    """One GP per column of ``standard`` (standardised warped metrics), batched in one botorch
    model: a quadratic mean started at its ridge fit, botorch's default kernel and priors,
    all hyperparameters and mean coefficients then fitted by the marginal likelihood."""
    import torch
    from botorch.fit import fit_gpytorch_mll
    from botorch.models import SingleTaskGP
    from gpytorch.mlls import ExactMarginalLogLikelihood

    features = _quadratic_features(x.numpy())
    # A light ridge: the quadratic may have about as many coefficients as there are points.
    gram = features.T @ features + 1e-3 * np.eye(features.shape[1])
    start = np.linalg.solve(gram, features.T @ standard).T  # (outputs, coefficients)
    dim = x.shape[1]
    mean = _quadratic_mean(dim, standard.shape[1])
    with torch.no_grad():
        mean.constant.copy_(torch.as_tensor(start[:, :1]))
        mean.linear.copy_(torch.as_tensor(start[:, 1 : 1 + dim]))
        mean.quadratic.copy_(torch.as_tensor(start[:, 1 + dim :]))
    model = SingleTaskGP(x, torch.as_tensor(standard), mean_module=mean, outcome_transform=None)
    fit_gpytorch_mll(
        ExactMarginalLogLikelihood(model.likelihood, model),
        optimizer_kwargs={"options": {"maxiter": FIT_STEPS}},
    )
    return model


def _torch_inverse(warp: Warp) -> Any:
    """``warp.inverse`` on tensors (differentiable), for posterior samples."""
    import torch

    if warp.name == "sigmoid":
        return lambda z: warp.low + (warp.high - warp.low) * torch.sigmoid(z)
    if warp.name == "softplus":
        return torch.nn.functional.softplus
    return lambda z: z


def reference_point(objectives: np.ndarray) -> np.ndarray:
    """The nadir of the non-dominated rows of ``objectives`` (maximised) minus a tenth of
    the front's ideal-nadir range (at least 1e-6) per task."""
    better = np.all(objectives[:, None, :] <= objectives[None, :, :], axis=2) & np.any(
        objectives[:, None, :] < objectives[None, :, :], axis=2
    )  # better[i, j]: row j dominates row i
    front = objectives[~better.any(axis=1)]
    nadir, ideal = front.min(axis=0), front.max(axis=0)
    return np.asarray(nadir - REF_MARGIN * np.maximum(ideal - nadir, 1e-6))


def propose_batch(
    points: np.ndarray,
    metrics: np.ndarray,
    warp: Warp,
    sign: float,
    bounds: Bounds,
    size: int,
    seed: int,
    settings: AcquisitionSettings | None = None,
) -> np.ndarray:
    """``size`` new coefficient vectors, shape (size, T), chosen by qLogNEHVI.

    ``points`` (n, T) were evaluated with ``metrics`` (n, T; higher is better when
    ``sign`` is +1, lower when -1). No returned point is within ``SAME_POINT`` of an
    evaluated point or of another returned one. Deterministic for a given ``seed``.
    """
    import torch

    warped = warp.forward(metrics)
    if settings is None:  # above EHVI_MAX_TASKS, lighter: T = 8 stays near 10 s of CPU a batch
        settings = AcquisitionSettings() if points.shape[1] <= EHVI_MAX_TASKS else LIGHT
    _no_kernel_build()
    threads = torch.get_num_threads()
    with torch.random.fork_rng(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(seed)
        torch.set_num_threads(1)  # tiny matrices: threads only cost here
        try:
            return _propose(points, metrics, warped, warp, sign, bounds, size, seed, settings)
        finally:
            torch.set_num_threads(threads)


def _no_kernel_build() -> None:
    """Keep botorch from compiling its fused qLogEHVI C++ kernel on first use (a minute of
    compiler time, and a compiler, at the first search); a prebuilt one is still used."""
    from botorch.acquisition.multi_objective import logei

    if not getattr(logei, "_load_attempted", True):
        try:
            import logei_fused_ext
        except ImportError:
            logei._load_attempted = True
        else:
            logei._C, logei._load_attempted = logei_fused_ext, True


def _propose(
    points: np.ndarray,
    metrics: np.ndarray,
    warped: np.ndarray,
    warp: Warp,
    sign: float,
    bounds: Bounds,
    size: int,
    seed: int,
    settings: AcquisitionSettings,
) -> np.ndarray:
    import torch
    from botorch.acquisition.multi_objective.logei import (
        qLogNoisyExpectedHypervolumeImprovement,
    )
    from botorch.acquisition.multi_objective.objective import GenericMCMultiOutputObjective
    from botorch.acquisition.multi_objective.parego import qLogNParEGO
    from botorch.optim.optimize import optimize_acqf
    from botorch.sampling.normal import SobolQMCNormalSampler
    from botorch.utils.sampling import sample_simplex

    low, high = bounds
    width = high - low
    n_var = points.shape[1]
    inverse = _torch_inverse(warp)
    x = torch.as_tensor((points - low) / width, dtype=torch.float64)
    shift, scale = warped.mean(axis=0), np.where(warped.std(axis=0) > 0, warped.std(axis=0), 1.0)
    model = _fit_model(x, (warped - shift) / scale)
    shifts, scales = torch.as_tensor(shift), torch.as_tensor(scale)

    def to_metrics(samples: Any, X: Any = None) -> Any:  # noqa: N803 (botorch passes X=)
        """Posterior samples (standardised warped units) to metrics, higher is better."""
        return sign * inverse(shifts + scales * samples)

    objective = GenericMCMultiOutputObjective(to_metrics)
    unit = torch.stack([torch.zeros(n_var), torch.ones(n_var)]).to(torch.float64)
    sobol = torch.quasirandom.SobolEngine(n_var, scramble=True, seed=seed)  # type: ignore[no-untyped-call]
    raw = sobol.draw(512, dtype=torch.float64)
    weights = sample_simplex(n_var, n=size, qmc=True, seed=seed, dtype=torch.float64)
    taken = [row for row in x]
    chosen: list[Any] = []
    acquisition: Any = None
    for step in range(size):
        pending = torch.stack(chosen) if chosen else None
        sampler = SobolQMCNormalSampler(torch.Size([settings.mc_samples]), seed=seed)
        if n_var <= EHVI_MAX_TASKS:
            if step == 0:
                acquisition = qLogNoisyExpectedHypervolumeImprovement(
                    model=model,
                    ref_point=torch.as_tensor(reference_point(sign * metrics), dtype=torch.float64),
                    X_baseline=x,
                    sampler=sampler,
                    objective=objective,
                    prune_baseline=True,
                    cache_root=True,
                )
            elif pending is not None:
                acquisition.set_X_pending(pending)
        else:  # one random Chebyshev scalarisation of the metrics per point
            acquisition = qLogNParEGO(
                model=model,
                X_baseline=x,
                scalarization_weights=weights[step],
                sampler=sampler,
                objective=objective,
                X_pending=pending,
                prune_baseline=True,
                cache_root=True,
            )
        candidate, _ = optimize_acqf(
            acquisition,
            bounds=unit,
            q=1,
            num_restarts=settings.restarts,
            raw_samples=settings.raw_samples,
            options={"seed": seed + step, "maxiter": settings.maxiter, "batch_limit": settings.restarts},
        )
        point = candidate[0].detach()
        if _nearest(point[None], taken, width)[0] <= SAME_POINT:
            point = _best_fresh(acquisition, raw, taken, width)
            if point is None:  # every raw candidate is an evaluated or chosen point
                break
        chosen.append(point)
        taken.append(point)
    if not chosen:
        return np.empty((0, n_var))
    return np.asarray(low + width * torch.stack(chosen).numpy())


def _nearest(candidates: Any, taken: list[Any], width: float) -> Any:
    """Each candidate's distance, in coefficient units, to the nearest of ``taken``."""
    import torch

    # Not the matrix-product shortcut: its rounding puts equal points ~1e-8 apart.
    distances = torch.cdist(candidates, torch.stack(taken), compute_mode="donot_use_mm_for_euclid_dist")
    return width * distances.min(dim=1).values


def _best_fresh(acquisition: Any, raw: Any, taken: list[Any], width: float) -> Any:
    """The raw candidate with the highest acquisition value among those away from ``taken``
    (the farthest from them when the acquisition cannot tell the candidates apart); None
    when none is away from them."""
    import torch

    distance = _nearest(raw, taken, width)
    if not bool((distance > SAME_POINT).any()):
        return None
    with torch.no_grad():
        values = acquisition(raw[:, None, :])
    usable = (distance > SAME_POINT) & torch.isfinite(values)
    if not usable.any() or float(values[usable].max() - values[usable].min()) == 0.0:
        return raw[int(torch.argmax(distance))]
    return raw[int(torch.argmax(torch.where(usable, values, -torch.inf)))]
