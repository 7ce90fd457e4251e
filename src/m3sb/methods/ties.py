"""TIES: trim each task vector, elect a sign per element, average the agreeing entries.

Yadav et al. 2023, https://arxiv.org/abs/2306.01708.
"""

from __future__ import annotations

import torch

from m3sb.methods.registry import MergeMethod, Param
from m3sb.methods.sparsify import disjoint_merge, elect_sign, magnitude_mask

DENSITY = Param(
    "density", float, 1.0, "fraction of each task vector kept", per_model=True, minimum=0.0, maximum=1.0
)


def ties(
    tensors: list[torch.Tensor],
    weights: list[float],
    base: torch.Tensor | None,
    density: list[float],
    normalize: bool = True,
    lambda_: float = 1.0,
) -> torch.Tensor:
    """Base plus lambda times the disjoint merge of the trimmed, weighted task vectors."""
    assert base is not None
    trimmed = []
    for tensor, weight, keep in zip(tensors, weights, density, strict=True):
        task_vector = tensor - base
        task_vector.mul_(magnitude_mask(task_vector, keep)).mul_(weight)
        trimmed.append(task_vector)
    merged = disjoint_merge(trimmed, weights, elect_sign(trimmed), normalize)
    return merged.mul_(lambda_).add_(base)


METHOD = MergeMethod(
    name="ties",
    function=ties,
    summary="keep the top density fraction of each task vector by magnitude, elect signs, disjoint mean",
    params=(
        DENSITY,
        Param("normalize", bool, True, "divide by the sum of the agreeing weights"),
        Param("lambda", float, 1.0, "scale of the merged task vector"),
    ),
    base="required",
    reference="https://arxiv.org/abs/2306.01708",
)
