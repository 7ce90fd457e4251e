"""DARE: drop task-vector entries at random and rescale the survivors (Yu et al. 2024).

Each model's mask is drawn on the CPU from a generator seeded by ``random_seed`` and the
tensor's name, so a merge is reproducible bit for bit on any device. Survivors are
divided by ``density`` (the paper's rescaling; mergekit instead matches the L1 norm).
"""

from __future__ import annotations

import torch

from m3sb.methods.registry import INT8_MASK, MergeMethod, Param
from m3sb.methods.sparsify import disjoint_merge, random_mask, weighted_sum
from m3sb.methods.ties import DENSITY

PARAMS = (
    DENSITY,
    Param("rescale", bool, True, "divide kept entries by density"),
    Param("random_seed", int, 0, "seed of the random drop masks", minimum=0),
    Param("normalize", bool, False, "divide by the (agreeing) weights' sum"),
    INT8_MASK,
)


def _drop(
    task_vectors: list[torch.Tensor], density: list[float], rescale: bool, random_seed: int
) -> list[torch.Tensor]:
    """The task vectors with each entry kept with probability ``density`` (and rescaled)."""
    generator = torch.Generator().manual_seed(random_seed)
    dropped = []
    for task_vector, keep in zip(task_vectors, density, strict=True):
        if keep >= 1.0:
            dropped.append(task_vector)
            continue
        kept = task_vector * random_mask(task_vector.shape, keep, generator, task_vector.device)
        dropped.append(kept.div_(keep) if rescale and keep > 0.0 else kept)
    return dropped


def dare_linear(
    task_vectors: list[torch.Tensor],
    weights: list[float],
    density: list[float],
    rescale: bool = True,
    random_seed: int = 0,
    normalize: bool = False,
) -> torch.Tensor:
    """Weighted sum of the randomly dropped task vectors."""
    return weighted_sum(_drop(task_vectors, density, rescale, random_seed), weights, normalize)


def dare_ties(
    task_vectors: list[torch.Tensor],
    weights: list[float],
    density: list[float],
    rescale: bool = True,
    random_seed: int = 0,
    normalize: bool = False,
) -> torch.Tensor:
    """TIES's sign election and disjoint merge over the randomly dropped task vectors."""
    dropped = _drop(task_vectors, density, rescale, random_seed)
    return disjoint_merge(dropped, [None] * len(dropped), weights, normalize)


DARE_LINEAR = MergeMethod(
    name="dare_linear",
    function=dare_linear,
    summary="random drop (keep density), rescale, weighted sum of task vectors",
    params=PARAMS,
    space="task_vectors",
    reference="https://arxiv.org/abs/2311.03099",
)
DARE_TIES = MergeMethod(
    name="dare_ties",
    function=dare_ties,
    summary="random drop (keep density), rescale, TIES sign election and disjoint merge",
    params=PARAMS,
    space="task_vectors",
    reference="https://arxiv.org/abs/2311.03099",
)
