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


def mask_generators(random_seed: int, density: list[float], numel: int) -> list[torch.Generator | None]:
    """Each model's generator positioned where its mask starts in the stream that one
    generator seeded ``random_seed`` draws for all the models in turn (None for a model
    kept whole, which draws nothing): blocks of rows then draw their masks in order."""
    shared = torch.Generator().manual_seed(random_seed)
    buffer = torch.empty(min(numel, 1 << 22))
    generators: list[torch.Generator | None] = []
    for keep in density:
        if keep >= 1.0:
            generators.append(None)
            continue
        own = torch.Generator()
        own.set_state(shared.get_state())
        generators.append(own)
        for start in range(0, numel, len(buffer)):  # past this model's draws
            torch.rand(min(len(buffer), numel - start), generator=shared, out=buffer[: numel - start])
    return generators


def _drop(
    task_vectors: list[torch.Tensor],
    density: list[float],
    rescale: bool,
    random_seed: int,
    generators: list[torch.Generator | None] | None = None,
) -> list[torch.Tensor]:
    """The task vectors with each entry kept with probability ``density`` (and rescaled);
    ``generators`` (from :func:`mask_generators`) when these are blocks of rows."""
    shared = torch.Generator().manual_seed(random_seed)
    own = generators if generators is not None else [shared] * len(task_vectors)
    dropped = []
    for task_vector, keep, generator in zip(task_vectors, density, own, strict=True):
        if keep >= 1.0:
            dropped.append(task_vector)
            continue
        assert generator is not None
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
    generators: list[torch.Generator | None] | None = None,
) -> torch.Tensor:
    """Weighted sum of the randomly dropped task vectors."""
    return weighted_sum(_drop(task_vectors, density, rescale, random_seed, generators), weights, normalize)


def dare_ties(
    task_vectors: list[torch.Tensor],
    weights: list[float],
    density: list[float],
    rescale: bool = True,
    random_seed: int = 0,
    normalize: bool = False,
    generators: list[torch.Generator | None] | None = None,
) -> torch.Tensor:
    """TIES's sign election and disjoint merge over the randomly dropped task vectors."""
    dropped = _drop(task_vectors, density, rescale, random_seed, generators)
    return disjoint_merge(dropped, weights, normalize)


DARE_LINEAR = MergeMethod(
    name="dare_linear",
    function=dare_linear,
    summary="random drop (keep density), rescale, weighted sum of task vectors",
    params=PARAMS,
    space="task_vectors",
    reference="https://arxiv.org/abs/2311.03099",
    row_blocks="random_mask",
)
DARE_TIES = MergeMethod(
    name="dare_ties",
    function=dare_ties,
    summary="random drop (keep density), rescale, TIES sign election and disjoint merge",
    params=PARAMS,
    space="task_vectors",
    reference="https://arxiv.org/abs/2311.03099",
    row_blocks="random_mask",
)
