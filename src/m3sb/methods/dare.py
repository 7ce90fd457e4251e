"""DARE: drop task-vector entries at random and rescale the survivors (Yu et al. 2024).

Each model's mask is drawn on the CPU from a generator seeded by ``random_seed`` and the
tensor's name, so a merge is reproducible bit for bit on any device. Survivors are
divided by ``density`` (the paper's rescaling; mergekit instead matches the L1 norm).
"""

from __future__ import annotations

import torch

from m3sb.methods.registry import MergeMethod, Param
from m3sb.methods.sparsify import disjoint_merge, elect_sign, random_mask, weighted_sum
from m3sb.methods.ties import DENSITY

PARAMS = (
    DENSITY,
    Param("rescale", bool, True, "divide kept entries by density"),
    Param("random_seed", int, 0, "seed of the random drop masks", minimum=0),
    Param("normalize", bool, False, "divide by the (agreeing) weights' sum"),
    Param("lambda", float, 1.0, "scale of the merged task vector"),
)


def _dropped_task_vectors(
    tensors: list[torch.Tensor],
    weights: list[float],
    base: torch.Tensor,
    density: list[float],
    rescale: bool,
    random_seed: int,
) -> list[torch.Tensor]:
    """The weighted task vectors with entries dropped with probability ``1 - density``."""
    generator = torch.Generator().manual_seed(random_seed)
    dropped = []
    for tensor, weight, keep in zip(tensors, weights, density, strict=True):
        task_vector = tensor - base
        if keep < 1.0:
            task_vector.mul_(random_mask(task_vector.shape, keep, generator, task_vector.device))
            if rescale and keep > 0.0:
                task_vector.div_(keep)
        dropped.append(task_vector.mul_(weight))
    return dropped


def dare_linear(
    tensors: list[torch.Tensor],
    weights: list[float],
    base: torch.Tensor | None,
    density: list[float],
    rescale: bool = True,
    random_seed: int = 0,
    normalize: bool = False,
    lambda_: float = 1.0,
) -> torch.Tensor:
    """Base plus lambda times the sum of the randomly dropped, weighted task vectors."""
    assert base is not None
    dropped = _dropped_task_vectors(tensors, weights, base, density, rescale, random_seed)
    merged = weighted_sum(dropped, [1.0] * len(dropped), normalize=False)
    total = float(sum(weights))
    if normalize and abs(total) > 1e-8:
        merged.div_(total)
    return merged.mul_(lambda_).add_(base)


def dare_ties(
    tensors: list[torch.Tensor],
    weights: list[float],
    base: torch.Tensor | None,
    density: list[float],
    rescale: bool = True,
    random_seed: int = 0,
    normalize: bool = False,
    lambda_: float = 1.0,
) -> torch.Tensor:
    """Like TIES, with DARE's random drop in place of the magnitude trim."""
    assert base is not None
    dropped = _dropped_task_vectors(tensors, weights, base, density, rescale, random_seed)
    merged = disjoint_merge(dropped, weights, elect_sign(dropped), normalize)
    return merged.mul_(lambda_).add_(base)


DARE_LINEAR = MergeMethod(
    name="dare_linear",
    function=dare_linear,
    summary="random drop (keep density), rescale, weighted sum of task vectors",
    params=PARAMS,
    base="required",
    reference="https://arxiv.org/abs/2311.03099",
)
DARE_TIES = MergeMethod(
    name="dare_ties",
    function=dare_ties,
    summary="random drop (keep density), rescale, TIES sign election and disjoint merge",
    params=PARAMS,
    base="required",
    reference="https://arxiv.org/abs/2311.03099",
)
