"""Task arithmetic: add the weighted task vectors to the base (Ilharco et al. 2023)."""

from __future__ import annotations

import torch

from m3sb.methods.registry import INT8_MASK, MergeMethod, Param
from m3sb.methods.sparsify import weighted_sum


def task_arithmetic(
    task_vectors: list[torch.Tensor], weights: list[float], normalize: bool = False
) -> torch.Tensor:
    """``sum_i w_i * tau_i``, divided by ``sum_i w_i`` when ``normalize``."""
    return weighted_sum(task_vectors, weights, normalize)


METHOD = MergeMethod(
    name="task_arithmetic",
    function=task_arithmetic,
    summary="base + lambda * sum_i w_i * tau_i",
    params=(
        Param("normalize", bool, False, "divide the sum of task vectors by the sum of weights"),
        INT8_MASK,
    ),
    space="task_vectors",
    reference="https://arxiv.org/abs/2212.04089",
    row_blocks="elementwise",
)
