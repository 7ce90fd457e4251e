"""SCE: select, calculate, erase (Wan et al. 2024, https://arxiv.org/abs/2408.07990), as mergekit.

*Select* keeps the ``select_topk`` fraction of entries (of those that vary at all) whose
variance across the task vectors is largest, in every task vector; *calculate* weighs each
task vector by its mean squared entry over the tensor, normalised to sum to 1; *erase*
keeps, per entry, the task vectors whose sign agrees with the sign of their sum (TIES's
election) and averages those with their weights. mergekit falls back to equal weights
when the weights' sum is below 1e-6, which happens for typical fine-tunes (entries of
1e-3 give mean squares of 1e-6); m3sb does so only when every task vector is zero here.
"""

from __future__ import annotations

import torch

from m3sb.methods.registry import IGNORED_WEIGHT, INT8_MASK, MergeMethod, Param
from m3sb.methods.sparsify import kth_largest_magnitude

DIVISOR_FLOOR = 1e-6  # mergekit's clamp of the agreeing weights' sum


def variance_mask(task_vectors: list[torch.Tensor], fraction: float) -> torch.Tensor | None:
    """Entries among the ``fraction`` of non-constant ones with the largest variance across models
    (all tied at the threshold kept); None when everything is kept."""
    if fraction >= 1.0:
        return None
    stacked = torch.stack(task_vectors)
    variance = stacked.var(dim=0, unbiased=False)
    del stacked
    count = int(int(torch.count_nonzero(variance)) * fraction)
    if count == 0:
        return torch.zeros_like(variance, dtype=torch.bool)
    return (variance >= kth_largest_magnitude(variance, count)) & (variance > 0)


def sce(task_vectors: list[torch.Tensor], weights: list[float], select_topk: float = 1.0) -> torch.Tensor:
    """The sign-agreeing task vectors averaged with weights from their mean squares."""
    mask = variance_mask(task_vectors, select_topk)
    selected = task_vectors if mask is None else [torch.where(mask, vector, 0.0) for vector in task_vectors]
    energies = [float(vector.double().square().mean()) for vector in selected]
    total = sum(energies)
    shares = [energy / total for energy in energies] if total > 0 else [1.0 / len(selected)] * len(selected)
    elected = torch.zeros_like(selected[0])
    for vector in selected:
        elected.add_(vector)
    sign = torch.where(elected >= 0, 1.0, -1.0).to(elected.dtype)
    del elected
    merged = torch.zeros_like(sign)
    divisor = torch.zeros_like(sign)
    for vector, share in zip(selected, shares, strict=True):
        agrees = torch.sign(vector) == sign
        merged.add_(torch.where(agrees, vector, 0.0), alpha=share)
        divisor.add_(agrees.to(sign.dtype), alpha=share)
    return merged.div_(divisor.clamp_(min=DIVISOR_FLOOR))


METHOD = MergeMethod(
    scales=False,
    name="sce",
    function=sce,
    summary="keep the entries that vary most across models, weigh each task vector by its mean square, "
    "TIES's sign election",
    params=(
        Param(
            "select_topk",
            float,
            1.0,
            "fraction of entries kept, by variance across the task vectors",
            minimum=0.0,
            maximum=1.0,
        ),
        INT8_MASK,
        IGNORED_WEIGHT,
    ),
    space="task_vectors",
    uses_weights=False,
    reference="https://arxiv.org/abs/2408.07990",
)
