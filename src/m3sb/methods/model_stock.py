"""Model Stock: move from the base towards the average by the task vectors' angle.

Jang et al. 2024, https://arxiv.org/abs/2403.19522: with N fine-tunes whose task vectors
meet at mean pairwise cosine c, the ratio is ``t = N c / (1 + (N - 1) c)`` and the result
``t * mean(x_i) + (1 - t) * base``, that is ``base + t * mean(tau_i)``.
"""

from __future__ import annotations

import itertools
import math

import torch

from m3sb.geometry import combine, gram_matrix
from m3sb.methods.registry import IGNORED_WEIGHT, MergeMethod, Param

NORM_FLOOR = 1e-6  # mergekit's clamp of the norm product, per row
SINGULAR = 1e-6  # |1 + (N - 1) c| below this: no finite ratio, keep the base


def interpolation_ratio(gram: torch.Tensor) -> float:
    """Model Stock's ratio t from the Gram matrix of the task vectors (0 where undefined)."""
    count = gram.shape[0]
    cosines = []
    for i, j in itertools.combinations(range(count), 2):
        norms = math.sqrt(max(0.0, float(gram[i, i]) * float(gram[j, j])))
        cosines.append(float(gram[i, j]) / max(norms, 1e-12))
    cosine = sum(cosines) / len(cosines)
    denominator = 1.0 + (count - 1) * cosine
    return 0.0 if abs(denominator) < 1e-6 else count * cosine / denominator


def model_stock(
    task_vectors: list[torch.Tensor], weights: list[float], filter_wise: bool = False
) -> torch.Tensor:
    """``t * mean(tau_i)`` with t from the task vectors' mean pairwise cosine (per row of the
    tensor with ``filter_wise``, as mergekit's option; a 1-D tensor is one row)."""
    if not filter_wise or task_vectors[0].dim() < 2:
        ratio = interpolation_ratio(gram_matrix(task_vectors))
        return combine(task_vectors, [ratio / len(task_vectors)] * len(task_vectors))
    return _row_wise(task_vectors)


def _row_wise(task_vectors: list[torch.Tensor]) -> torch.Tensor:
    """Model Stock's ratio computed and applied per row (along the last axis)."""
    count = len(task_vectors)
    norms = [vector.norm(dim=-1) for vector in task_vectors]
    cosines = [
        ((task_vectors[i] * task_vectors[j]).sum(dim=-1) / (norms[i] * norms[j]).clamp(min=NORM_FLOOR)).clamp(
            -1.0, 1.0
        )
        for i, j in itertools.combinations(range(count), 2)
    ]
    cosine = torch.stack(cosines).mean(dim=0)
    denominator = 1 + (count - 1) * cosine
    singular = denominator.abs() < SINGULAR
    ratio = torch.where(singular, 0.0, count * cosine / torch.where(singular, 1.0, denominator))
    average = torch.stack(task_vectors).mean(dim=0)
    return average * ratio.unsqueeze(-1)


METHOD = MergeMethod(
    name="model_stock",
    function=model_stock,
    summary="t * average + (1 - t) * base, t from the task vectors' mean pairwise cosine",
    params=(
        Param("filter_wise", bool, False, "compute the ratio per row (output filter), not per tensor"),
        IGNORED_WEIGHT,
    ),
    space="task_vectors",
    min_models=2,
    uses_weights=False,
    reference="https://arxiv.org/abs/2403.19522",
)
