"""Model Breadcrumbs: drop each task vector's outliers and its smallest entries (Davari &
Belilovsky 2023); ``breadcrumbs_ties`` then merges them with TIES's sign election, as mergekit's."""

from __future__ import annotations

import torch

from m3sb.methods.registry import INT8_MASK, MergeMethod, Param
from m3sb.methods.sparsify import disjoint_merge, outlier_mask, weighted_sum


def breadcrumbs(
    task_vectors: list[torch.Tensor],
    weights: list[float],
    density: list[float],
    gamma: list[float],
    normalize: bool = False,
) -> torch.Tensor:
    """Weighted sum of the task vectors without their largest ``gamma`` and smallest entries."""
    return weighted_sum(_trimmed(task_vectors, density, gamma), weights, normalize)


def breadcrumbs_ties(
    task_vectors: list[torch.Tensor],
    weights: list[float],
    density: list[float],
    gamma: list[float],
    normalize: bool = False,
) -> torch.Tensor:
    """TIES's disjoint merge of the task vectors without their largest ``gamma`` and smallest entries."""
    trimmed = _trimmed(task_vectors, density, gamma)
    return disjoint_merge(trimmed, weights, normalize)


def _trimmed(
    task_vectors: list[torch.Tensor], density: list[float], gamma: list[float]
) -> list[torch.Tensor]:
    return [
        task_vector * outlier_mask(task_vector, keep, drop_top)
        for task_vector, keep, drop_top in zip(task_vectors, density, gamma, strict=True)
    ]


PARAMS = (
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
    Param("normalize", bool, False, "divide by the sum of (agreeing) weights"),
    INT8_MASK,
)
METHOD = MergeMethod(
    name="breadcrumbs",
    function=breadcrumbs,
    summary="drop the largest gamma and the smallest entries (keep density), weighted sum",
    params=PARAMS,
    space="task_vectors",
    reference="https://arxiv.org/abs/2312.06795",
)
TIES = MergeMethod(
    name="breadcrumbs_ties",
    function=breadcrumbs_ties,
    summary="breadcrumbs' trimming, then TIES's sign election and disjoint merge",
    params=PARAMS,
    space="task_vectors",
    reference="https://arxiv.org/abs/2312.06795",
)
