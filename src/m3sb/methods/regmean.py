"""RegMean: the linear layer that best fits every model's outputs on its own inputs (Jin et al. 2023),
and RegMean++ (Nguyen et al. 2025): the same formula on Gram matrices measured through the merged
model's earlier layers (``m3sb statistics --kind gram_plusplus``; see m3sb.layerwise_statistics).

For a linear layer ``y = W x`` with each model's input Gram matrix ``G_i`` (the mean of
``x x^T`` over the model's own data, from ``m3sb statistics --kind gram``), the merged
``W = (sum_i W_i G_i) (sum_i G_i)^-1`` minimises ``sum_i || W X_i - W_i X_i ||^2``. The
Gram matrices' off-diagonal entries are scaled by ``reduce_non_diagonal_ratio`` first (0.95
in FusionBench's CLIP runs; 1 is the exact solution, 0 a per-input-feature weighted mean),
and a model's ``weight`` scales its Gram matrix; the system is solved in float64. Tensors that
are not linear weights (no Gram matrix in any model) get the weighted mean.
"""

from __future__ import annotations

import torch

from m3sb.methods.registry import MergeMethod, Param


def shrink_off_diagonal(gram: torch.Tensor, ratio: float) -> torch.Tensor:
    """``gram`` with its off-diagonal entries multiplied by ``ratio``."""
    shrunk = gram * ratio
    shrunk.diagonal().copy_(gram.diagonal())
    return shrunk


def regmean(
    tensors: list[torch.Tensor],
    weights: list[float],
    statistics: list[torch.Tensor | None],
    reduce_non_diagonal_ratio: float = 0.95,
) -> torch.Tensor:
    """The RegMean merge of one tensor from the models' weights and input Gram matrices."""
    if all(gram is None for gram in statistics):
        total = sum(w * t for w, t in zip(weights, tensors, strict=True))
        assert isinstance(total, torch.Tensor)
        return total / sum(weights)
    grams = []  # in float64: Gram matrices of real inputs are ill-conditioned (1e11 on the digits zoo)
    for weight, gram in zip(weights, statistics, strict=True):
        assert gram is not None  # the engine checks every model has one where any has
        grams.append(weight * shrink_off_diagonal(gram.double(), reduce_non_diagonal_ratio))
    total_gram = torch.stack(grams).sum(dim=0)
    pairs = zip(tensors, grams, strict=True)
    weighted = torch.stack([tensor.double() @ gram for tensor, gram in pairs]).sum(dim=0)
    # W total_gram = weighted, solved as total_gram^T W^T = weighted^T (total_gram is symmetric)
    try:
        solution = torch.linalg.solve(total_gram, weighted.T).T
    except RuntimeError:  # torch's LinAlgError; inputs no model ever used: least squares
        solution = (torch.linalg.pinv(total_gram, hermitian=True) @ weighted.T).T
    merged: torch.Tensor = solution.to(tensors[0].dtype).contiguous()
    return merged


RATIO = Param(
    "reduce_non_diagonal_ratio",
    float,
    0.95,
    "scale of the Gram matrices' off-diagonal entries (1: exact RegMean)",
    minimum=0.0,
    maximum=1.0,
)

METHOD = MergeMethod(
    name="regmean",
    function=regmean,
    summary="per linear layer, the weights that best reproduce every model's outputs on its own inputs",
    params=(RATIO,),
    min_models=1,
    nonnegative_weights=True,
    statistics="gram",
    reference="https://arxiv.org/abs/2212.09849",
)

PLUSPLUS = MergeMethod(
    name="regmean_plusplus",
    function=regmean,
    summary="RegMean with each layer's inputs taken through the merged model's earlier layers",
    params=(RATIO,),
    min_models=2,
    nonnegative_weights=True,
    statistics="gram_plusplus",
    reference="https://arxiv.org/abs/2508.03121",
)
