"""Linear: the weighted average of the models (Wortsman et al. 2022, model soups)."""

from __future__ import annotations

import torch

from m3sb.errors import MergeError
from m3sb.geometry import combine
from m3sb.methods.registry import MIN_WEIGHT_SUM, MergeMethod, Param


def linear(tensors: list[torch.Tensor], weights: list[float], normalize: bool = True) -> torch.Tensor:
    """``sum_i w_i * x_i``, divided by ``sum_i w_i`` when ``normalize``."""
    total = float(sum(weights))
    if normalize and abs(total) < MIN_WEIGHT_SUM:
        raise MergeError(f"linear: weights sum to zero ({weights}); cannot normalize")
    divisor = total if normalize else 1.0
    return combine(tensors, [weight / divisor for weight in weights])


METHOD = MergeMethod(
    name="linear",
    function=linear,
    summary="weighted average of the models",
    params=(Param("normalize", bool, True, "divide by the sum of the weights"),),
    space="either",
    reference="https://arxiv.org/abs/2203.05482",
    row_blocks="elementwise",
)
