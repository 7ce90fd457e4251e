"""Model Breadcrumbs: drop each task vector's outliers and its smallest entries (Davari & Belilovsky 2023)."""

from __future__ import annotations

import torch

from m3sb.methods.registry import MergeMethod, Param
from m3sb.methods.sparsify import outlier_mask, weighted_sum


def breadcrumbs(
    tensors: list[torch.Tensor],
    weights: list[float],
    base: torch.Tensor | None,
    density: list[float],
    gamma: list[float],
    normalize: bool = False,
    lambda_: float = 1.0,
) -> torch.Tensor:
    """Base plus lambda times the weighted sum of the masked task vectors."""
    assert base is not None
    masked = []
    for tensor, keep, drop_top in zip(tensors, density, gamma, strict=True):
        task_vector = tensor - base
        masked.append(task_vector.mul_(outlier_mask(task_vector, keep, drop_top)))
    return weighted_sum(masked, weights, normalize).mul_(lambda_).add_(base)


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
        Param("lambda", float, 1.0, "scale of the merged task vector"),
    ),
    base="required",
    reference="https://arxiv.org/abs/2312.06795",
)
