"""Fisher merging: a weighted mean of the models, entry by entry, weighted by each model's
diagonal Fisher information (Matena & Raffel 2022).

``merged = sum_i c_i (F_i + m) theta_i / sum_i c_i (F_i + m)`` with ``F_i`` from ``m3sb
statistics --kind fisher``, ``m`` = ``minimal_fisher`` (keeps entries no model's data touches
finite) and ``c_i`` the model's ``weight``. With ``normalize`` (FusionBench's default) each
``c_i`` is also divided by the norm of model i's whole Fisher vector (normalised to sum to
1), so a model whose loss is sharper everywhere does not take over. Tensors without a
Fisher in any model get the weighted mean.
"""

from __future__ import annotations

import torch

from m3sb.methods.registry import MergeMethod, Param


def fisher_coefficients(
    weights: list[float], norms: list[float], normalize: bool, floor: float
) -> list[float]:
    """Each model's coefficient: its weight, times its share of the inverse Fisher norms when
    ``normalize``."""
    if not normalize:
        return list(weights)
    inverse = [1.0 / (norm + floor) for norm in norms]
    return [w * i / sum(inverse) for w, i in zip(weights, inverse, strict=True)]


def fisher(
    tensors: list[torch.Tensor],
    weights: list[float],
    statistics: list[torch.Tensor | None],
    statistic_norms: list[float],
    normalize: bool = True,
    minimal_fisher: float = 1e-6,
) -> torch.Tensor:
    """The Fisher-weighted mean of one tensor."""
    if all(information is None for information in statistics):
        total = sum(w * t for w, t in zip(weights, tensors, strict=True))
        assert isinstance(total, torch.Tensor)
        return total / sum(weights)
    coefficients = fisher_coefficients(weights, statistic_norms, normalize, minimal_fisher)
    numerator = torch.zeros_like(tensors[0])
    denominator = torch.zeros_like(tensors[0])
    for tensor, information, coefficient in zip(tensors, statistics, coefficients, strict=True):
        assert information is not None  # the engine checks every model has one where any has
        weighting = (information.to(tensor.dtype) + minimal_fisher) * coefficient
        numerator += weighting * tensor
        denominator += weighting
    return numerator / denominator


METHOD = MergeMethod(
    name="fisher",
    function=fisher,
    summary="entry-wise mean of the models weighted by their diagonal Fisher information",
    params=(
        Param(
            "normalize", bool, True, "divide each model's Fisher by its whole norm (FusionBench's default)"
        ),
        Param(
            "minimal_fisher",
            float,
            1e-6,
            "added to every Fisher entry (keeps untouched entries finite)",
            minimum=1e-30,
        ),
    ),
    min_models=1,
    nonnegative_weights=True,
    statistics="fisher",
    reference="https://arxiv.org/abs/2111.09832",
)
