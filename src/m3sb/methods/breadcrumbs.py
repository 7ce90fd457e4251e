"""Model Breadcrumbs: drop each task vector's outliers and its smallest entries (Davari & Belilovsky 2023)."""

from __future__ import annotations

import torch

from m3sb.methods.registry import MergeMethod, Param
from m3sb.methods.sparsify import outlier_mask, weighted_sum


def breadcrumbs(
    task_vectors: list[torch.Tensor],
    weights: list[float],
    density: list[float],
    gamma: list[float],
    normalize: bool = False,
) -> torch.Tensor:
    """Weighted sum of the task vectors without their largest ``gamma`` and smallest entries."""
    masked = [
        task_vector * outlier_mask(task_vector, keep, drop_top)
        for task_vector, keep, drop_top in zip(task_vectors, density, gamma, strict=True)
    ]
    return weighted_sum(masked, weights, normalize)


METHOD = MergeMethod(
    name="breadcrumbs",
    function=breadcrumbs,
    summary="drop the largest gamma and the smallest entries (keep density), weighted sum",
    params=(
        Param(
            "density",
            float,
            0.9,
            "fraction of each task vector kept",
            per_model=True,
            minimum=0.0,
            maximum=1.0,
        ),
        Param(
            "gamma",
            float,
            0.01,
            "fraction of largest magnitudes dropped",
            per_model=True,
            minimum=0.0,
            maximum=1.0,
        ),
        Param("normalize", bool, False, "divide by the sum of weights"),
    ),
    space="task_vectors",
    reference="https://arxiv.org/abs/2312.06795",
)
