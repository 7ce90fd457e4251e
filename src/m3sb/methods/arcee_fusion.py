"""Arcee Fusion: keep the model's changes where they matter most (mergekit's ``arcee_fusion``).

With ``a`` the base (or first model) and ``b`` the other, each entry's importance is
``|b - a|`` times the KL divergence between softmax(b) and softmax(a) along the last axis
(one divergence per row); entries whose importance reaches ``median + 1.5 * IQR`` of all
importances take ``b``'s value, the rest keep ``a``'s. The quartiles are read as mergekit
reads them, the sorted value at index ``floor(q (n - 1))``, but always exactly: mergekit
estimates them from a random sample of a million entries for larger tensors.
"""

from __future__ import annotations

import torch

from m3sb.methods.registry import MergeMethod

KL_EPS = 1e-8  # added to both softmaxes, as mergekit does


def importance(model: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """``|model - base|`` times each row's KL(softmax(model) || softmax(base))."""
    p = torch.softmax(model, dim=-1) + KL_EPS
    q = torch.softmax(base, dim=-1) + KL_EPS
    divergence = (p * torch.log(p / q)).sum(dim=-1, keepdim=True)
    return (model - base).abs() * divergence


def lower_quantile(values: torch.Tensor, q: float) -> torch.Tensor:
    """The sorted value at index ``floor(q * (n - 1))`` (0-based), found without a full sort."""
    flat = values.reshape(-1)
    index = int(q * (flat.numel() - 1))
    return flat.kthvalue(index + 1).values


def arcee_fusion(tensors: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """``a`` with ``b``'s values where the importance reaches median + 1.5 IQR."""
    base, model = tensors
    scores = importance(model, base)
    first, median, third = (lower_quantile(scores, q) for q in (0.25, 0.5, 0.75))
    chosen = scores >= median + 1.5 * (third - first)
    return torch.where(chosen, model, base)


METHOD = MergeMethod(
    name="arcee_fusion",
    function=arcee_fusion,
    summary="take the model's value where abs(model - base) times its row's KL reaches median + 1.5 IQR",
    base_is_input=True,
    uses_weights=False,
    min_models=2,
    max_models=2,
    reference="https://arcee.ai",
)
