"""M3SB's spherical methods over N models: the weighted barycenter and pairwise SLERP.

``barycenter`` is the weighted Karcher mean of the models' directions on the unit sphere,
scaled by their weighted mean norm. ``karcher`` is the same under mergekit's name and
conventions (equal weights unless given; a base model counts as one more point).
``pairwise_slerp`` folds the models in order with SLERP, giving model i the share
``w_i / (w_1 + ... + w_i)`` of each step: equal to the barycenter for two models, and
dependent on the order for more. The seed's published variant of the barycenter is
``barycenter_seed`` (its own module).
"""

from __future__ import annotations

import torch

from m3sb import geometry
from m3sb.methods.registry import MergeMethod, Param

# The M3SB seed wrote these as ``threshold`` and ``iterations``. Its loop stopped when the
# angle between successive estimates fell below ``threshold``; the steps here are unit
# Riemannian gradient steps, so that angle is the gradient norm and the names map exactly.
KARCHER_PARAMS = (
    Param(
        "tol",
        float,
        1e-7,
        "stop when the Riemannian gradient norm, the angle of the step (radians), is below this",
        minimum=0.0,
        aliases=("threshold",),
    ),
    Param("max_iter", int, 100, "most gradient steps", minimum=1, aliases=("iterations",)),
)


def barycenter(
    tensors: list[torch.Tensor],
    weights: list[float],
    tol: float = 1e-7,
    max_iter: int = 100,
    gram: torch.Tensor | None = None,
) -> torch.Tensor:
    """The weighted Karcher mean of the directions, scaled by the weighted mean norm (``gram``:
    the whole tensors' Gram matrix, when these are blocks of their rows)."""
    return geometry.karcher_mean(tensors, weights, tol=tol, max_iter=max_iter, gram=gram)


def pairwise_slerp(tensors: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """Fold the models in order: ``acc = slerp(acc, x_i, w_i / (w_1 + ... + w_i))``."""
    shares = geometry.normalized_weights(weights)
    active = [i for i, share in enumerate(shares) if share > 0.0]
    if len(active) == 1:
        return tensors[active[0]].clone()
    gram = geometry.gram_matrix(tensors)
    coefficients = torch.zeros(len(tensors), dtype=torch.float64)
    coefficients[active[0]] = 1.0
    seen = shares[active[0]]
    for i in active[1:]:
        seen += shares[i]
        column = gram[:, i]
        pair = torch.tensor(
            [
                [float(coefficients @ gram @ coefficients), float(coefficients @ column)],
                [float(coefficients @ column), float(gram[i, i])],
            ],
            dtype=torch.float64,
        )
        keep, add = geometry.slerp_coefficients(pair, shares[i] / seen)
        coefficients *= keep
        coefficients[i] += add
    return geometry.combine(tensors, coefficients.tolist())


BARYCENTER = MergeMethod(
    name="barycenter",
    function=barycenter,
    summary="weighted Karcher mean on the unit sphere, scaled by the weighted mean norm",
    params=KARCHER_PARAMS,
    nonnegative_weights=True,
    space="either",
    reference="Buss & Fillmore 2001, ACM TOG 20(2)",
    row_blocks="gram",
)
KARCHER = MergeMethod(
    name="karcher",
    function=barycenter,
    summary="barycenter with mergekit's conventions: base_model is one more point",
    params=KARCHER_PARAMS,
    base_is_input=True,
    nonnegative_weights=True,
    reference="Buss & Fillmore 2001, ACM TOG 20(2)",
    row_blocks="gram",
)
PAIRWISE_SLERP = MergeMethod(
    name="pairwise_slerp",
    function=pairwise_slerp,
    summary="fold the models in order with SLERP at t_i = w_i / (w_1 + ... + w_i)",
    nonnegative_weights=True,
    space="either",
)
