"""RAM: reinforced agent merging (https://arxiv.org/abs/2601.13572), as mergekit computes it.

An entry of a task vector *contributes* when its magnitude exceeds ``epsilon``. Per entry,
``ram`` takes the one contribution where a single model contributes and the mean of the
contributions where several do (0 where none does). ``ramplus_tl`` also scales each model's
unique contributions by ``1 + r * clamp(rho, 0, alpha)``, where ``rho`` is the model's count
of shared contributions over its count of unique ones in this tensor.
"""

from __future__ import annotations

import torch

from m3sb.methods.registry import IGNORED_WEIGHT, MergeMethod, Param


def _contributions(
    task_vectors: list[torch.Tensor], epsilon: float
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Each task vector's contributing entries (a mask each) and the count of contributors per entry."""
    masks = [vector.abs() > epsilon for vector in task_vectors]
    counts = torch.zeros(task_vectors[0].shape, dtype=torch.int32, device=task_vectors[0].device)
    for mask in masks:
        counts.add_(mask.to(torch.int32))
    return masks, counts


def _merged(
    task_vectors: list[torch.Tensor], masks: list[torch.Tensor], counts: torch.Tensor, scales: list[float]
) -> torch.Tensor:
    unique = counts == 1
    shared_divisor = counts.clamp(min=1).to(task_vectors[0].dtype)
    merged = torch.zeros_like(task_vectors[0])
    for vector, mask, scale in zip(task_vectors, masks, scales, strict=True):
        kept = torch.where(mask, vector, 0.0)
        merged.add_(torch.where(unique, kept * scale, kept / shared_divisor))
    return merged


def ram(task_vectors: list[torch.Tensor], weights: list[float], epsilon: float = 1e-5) -> torch.Tensor:
    """Per entry, the mean of the task vectors' contributions (entries above ``epsilon``)."""
    masks, counts = _contributions(task_vectors, epsilon)
    return _merged(task_vectors, masks, counts, [1.0] * len(task_vectors))


def ramplus_tl(
    task_vectors: list[torch.Tensor],
    weights: list[float],
    r: float = 0.1,
    alpha: float = 0.2,
    epsilon: float = 1e-5,
) -> torch.Tensor:
    """RAM with each model's unique contributions scaled up by its share of shared ones."""
    masks, counts = _contributions(task_vectors, epsilon)
    scales = []
    for mask in masks:
        shared = int((mask & (counts > 1)).sum())
        unique = int((mask & (counts == 1)).sum())
        rho = shared / max(float(unique), epsilon)
        scales.append(1.0 + r * min(max(rho, 0.0), alpha))
    return _merged(task_vectors, masks, counts, scales)


EPSILON = Param("epsilon", float, 1e-5, "magnitude above which a task-vector entry contributes", minimum=0.0)
RAM = MergeMethod(
    scales=False,
    name="ram",
    function=ram,
    summary="per entry, the mean of the task vectors' entries above epsilon",
    params=(EPSILON, IGNORED_WEIGHT),
    space="task_vectors",
    uses_weights=False,
    reference="https://arxiv.org/abs/2601.13572",
)
RAMPLUS_TL = MergeMethod(
    scales=False,
    name="ramplus_tl",
    function=ramplus_tl,
    summary="ram, with each model's unique entries scaled by 1 + r * clamp(shared / unique, 0, alpha)",
    params=(
        Param("r", float, 0.1, "how much unique entries are scaled up", minimum=0.0),
        Param("alpha", float, 0.2, "cap on the shared-to-unique ratio", minimum=0.0),
        EPSILON,
        IGNORED_WEIGHT,
    ),
    space="task_vectors",
    uses_weights=False,
    reference="https://arxiv.org/abs/2601.13572",
)
