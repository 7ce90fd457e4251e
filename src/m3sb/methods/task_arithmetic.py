"""Task arithmetic: add the weighted task vectors to the base (Ilharco et al. 2023)."""

from __future__ import annotations

import torch

from m3sb.methods.registry import MergeMethod, Param
from m3sb.methods.sparsify import weighted_sum


def task_arithmetic(
    tensors: list[torch.Tensor],
    weights: list[float],
    base: torch.Tensor | None,
    normalize: bool = False,
    lambda_: float = 1.0,
) -> torch.Tensor:
    """``base + lambda * sum_i w_i * (x_i - base)`` (divided by ``sum_i w_i`` when ``normalize``)."""
    assert base is not None
    merged = weighted_sum([tensor - base for tensor in tensors], weights, normalize)
    return merged.mul_(lambda_).add_(base)


METHOD = MergeMethod(
    name="task_arithmetic",
    function=task_arithmetic,
    summary="base + lambda * sum_i w_i * tau_i",
    params=(
        Param("normalize", bool, False, "divide the sum of task vectors by the sum of weights"),
        Param("lambda", float, 1.0, "scale of the merged task vector"),
    ),
    base="required",
    reference="https://arxiv.org/abs/2212.04089",
)
