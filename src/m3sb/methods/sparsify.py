"""Small primitives that TIES, DARE and Model Breadcrumbs are built from.

Each takes a task vector (or a stack of them) and returns a mask or a merged tensor.
Masks keep elements by magnitude rank through ``torch.kthvalue`` (linear time, unlike a
full sort); elements that tie with the threshold value are all kept.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def _kth_smallest(values: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th smallest (1-based) of a flat tensor, in float32 at least (kthvalue needs it)."""
    work = values if values.dtype in (torch.float32, torch.float64) else values.float()
    return work.kthvalue(k).values


def magnitude_mask(task_vector: torch.Tensor, density: float) -> torch.Tensor:
    """Boolean mask keeping the ``density`` fraction of largest-magnitude elements (at least one)."""
    numel = task_vector.numel()
    if density >= 1.0 or numel == 0:
        return torch.ones_like(task_vector, dtype=torch.bool)
    if density <= 0.0:
        return torch.zeros_like(task_vector, dtype=torch.bool)
    keep = max(1, int(density * numel))
    magnitude = task_vector.abs()
    threshold = _kth_smallest(magnitude.reshape(-1), numel - keep + 1)
    return magnitude >= threshold


def outlier_mask(task_vector: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """Mask dropping the ``gamma`` fraction of largest magnitudes, then the smallest, to keep ``density``."""
    numel = task_vector.numel()
    if density >= 1.0 or numel == 0:
        return torch.ones_like(task_vector, dtype=torch.bool)
    keep = int(density * numel)
    if keep == 0:
        return torch.zeros_like(task_vector, dtype=torch.bool)
    drop_top = int(gamma * numel)
    drop_bottom = max(0, numel - keep - drop_top)
    magnitude = task_vector.abs()
    flat = magnitude.reshape(-1)
    low = _kth_smallest(flat, drop_bottom + 1)
    high = _kth_smallest(flat, drop_bottom + keep)
    return (magnitude >= low) & (magnitude <= high)


def random_mask(
    shape: torch.Size, density: float, generator: torch.Generator, device: torch.device
) -> torch.Tensor:
    """Mask keeping each element with probability ``density``, drawn on the CPU for reproducibility."""
    return (torch.rand(shape, generator=generator) < density).to(device)


def elect_sign(
    task_vectors: Sequence[torch.Tensor], masks: Sequence[torch.Tensor | None], weights: Sequence[float]
) -> torch.Tensor:
    """Per element, the sign (+1 or -1) of the sum of the kept, weighted entries; ties go to +1."""
    total = torch.zeros_like(task_vectors[0])
    for task_vector, mask, weight in zip(task_vectors, masks, weights, strict=True):
        total.add_(task_vector if mask is None else task_vector * mask, alpha=weight)
    return torch.where(total >= 0, 1.0, -1.0).to(total.dtype)


def disjoint_merge(
    task_vectors: Sequence[torch.Tensor],
    masks: Sequence[torch.Tensor | None],
    weights: Sequence[float],
    normalize: bool,
) -> torch.Tensor:
    """Sum the kept, weighted entries whose sign agrees with the elected one.

    With ``normalize``, each element is divided by the weights of the models that agree
    there (1 where none does). Zero entries and zero-weight models take no side.
    """
    sign = elect_sign(task_vectors, masks, weights)
    merged = torch.zeros_like(sign)
    agreeing_weight = torch.zeros_like(sign)
    for task_vector, mask, weight in zip(task_vectors, masks, weights, strict=True):
        if weight == 0.0:
            continue
        agrees = torch.sign(task_vector) == sign * (1.0 if weight > 0 else -1.0)
        if mask is not None:
            agrees &= mask
        merged.add_(task_vector * agrees, alpha=weight)
        agreeing_weight.add_(agrees.to(sign.dtype), alpha=weight)
    if normalize:
        agreeing_weight[agreeing_weight == 0] = 1.0
        merged.div_(agreeing_weight)
    return merged


def weighted_sum(
    task_vectors: Sequence[torch.Tensor], weights: Sequence[float], normalize: bool
) -> torch.Tensor:
    """``sum_i w_i * tau_i``, divided by ``sum_i w_i`` when ``normalize`` (and that sum is not 0)."""
    total = float(sum(weights))
    divisor = total if normalize and abs(total) > 1e-8 else 1.0
    merged = torch.zeros_like(task_vectors[0])
    for task_vector, weight in zip(task_vectors, weights, strict=True):
        merged.add_(task_vector, alpha=weight / divisor)
    return merged
