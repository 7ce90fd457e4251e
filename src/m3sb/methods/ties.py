"""TIES: trim each task vector, elect a sign per element, average the agreeing entries.

Yadav et al. 2023, https://arxiv.org/abs/2306.01708.
"""

from __future__ import annotations

import torch

from m3sb.methods.registry import INT8_MASK, MergeMethod, Param
from m3sb.methods.sparsify import disjoint_merge, magnitude_threshold

DENSITY = Param(
    "density",
    float,
    1.0,
    "fraction of each task vector kept",
    per_model=True,
    minimum=0.0,
    maximum=1.0,
)


def ties(
    task_vectors: list[torch.Tensor],
    weights: list[float],
    density: list[float],
    normalize: bool = True,
    thresholds: list[float] | None = None,
) -> torch.Tensor:
    """Disjoint merge of the task vectors trimmed to their largest ``density`` fraction
    (``thresholds``: each whole task vector's trimming magnitude, when these are blocks of
    its rows)."""
    if thresholds is None:
        thresholds = [
            magnitude_threshold(vector, keep) for vector, keep in zip(task_vectors, density, strict=True)
        ]
    return disjoint_merge(task_vectors, weights, normalize, thresholds)


METHOD = MergeMethod(
    name="ties",
    function=ties,
    summary="keep the top density fraction of each task vector by magnitude, elect signs, disjoint mean",
    params=(DENSITY, Param("normalize", bool, True, "divide by the sum of the agreeing weights"), INT8_MASK),
    space="task_vectors",
    reference="https://arxiv.org/abs/2306.01708",
    row_blocks="magnitude_threshold",
)
