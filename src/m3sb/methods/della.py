"""DELLA: drop task-vector entries at random, the smaller ones more often (MAGPRUNE), and
rescale the survivors (Deep et al. 2024, https://arxiv.org/abs/2406.11617).

Within each row of a task vector (a 1-D tensor is one row) the entries are ranked by
magnitude; the entry of rank r among n is kept with probability
``density - epsilon + 2 * epsilon * r / (n - 1)``, from ``density - epsilon`` for the
smallest to ``density + epsilon`` for the largest, as in mergekit. A survivor is divided
by its own keep probability (the paper's rescaling, so the expected task vector is the
task vector; mergekit instead matches the L1 norm). ``della`` merges the survivors with
TIES's sign election, ``della_linear`` by a weighted sum. Masks are drawn on the CPU from a
generator seeded by ``random_seed`` and the tensor's name.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from m3sb.errors import ConfigError
from m3sb.methods.registry import INT8_MASK, MergeMethod, Param
from m3sb.methods.sparsify import disjoint_merge, weighted_sum
from m3sb.methods.ties import DENSITY

_BLOCK = 1 << 22  # elements ranked at once: the int64 ranks of a block stay small


def keep_probabilities(task_vector: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """Each entry's keep probability, from its magnitude rank within its row."""
    rows = (
        task_vector.reshape(1, -1) if task_vector.dim() < 2 else task_vector.reshape(task_vector.shape[0], -1)
    )
    width = rows.shape[1]
    probabilities = torch.empty(rows.shape, dtype=task_vector.dtype, device=task_vector.device)
    step = max(1, _BLOCK // max(1, width))
    for start in range(0, rows.shape[0], step):
        block = rows[start : start + step].abs()
        ranks = block.argsort(dim=1).argsort(dim=1).to(task_vector.dtype)
        spread = ranks / (width - 1) if width > 1 else torch.ones_like(ranks)
        probabilities[start : start + step] = (density - epsilon) + 2 * epsilon * spread
    return probabilities.reshape(task_vector.shape)


def magprune(
    task_vector: torch.Tensor, density: float, epsilon: float, rescale: bool, generator: torch.Generator
) -> torch.Tensor:
    """The task vector with MAGPRUNE's random drop applied (survivors rescaled when asked)."""
    if density >= 1.0:
        return task_vector
    if density <= 0.0:
        return torch.zeros_like(task_vector)
    probabilities = keep_probabilities(task_vector, density, epsilon)
    draws = torch.rand(task_vector.shape, generator=generator).to(task_vector.device, task_vector.dtype)
    kept = torch.where(draws < probabilities, task_vector, 0.0)
    return kept.div_(probabilities) if rescale else kept


def _pruned(
    task_vectors: list[torch.Tensor],
    density: list[float],
    epsilon: list[float],
    rescale: bool,
    random_seed: int,
) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(random_seed)
    return [
        magprune(task_vector, keep, spread, rescale, generator)
        for task_vector, keep, spread in zip(task_vectors, density, epsilon, strict=True)
    ]


def della(
    task_vectors: list[torch.Tensor],
    weights: list[float],
    density: list[float],
    epsilon: list[float],
    rescale: bool = True,
    random_seed: int = 0,
    normalize: bool = True,
) -> torch.Tensor:
    """TIES's sign election and disjoint merge over the MAGPRUNE-dropped task vectors."""
    pruned = _pruned(task_vectors, density, epsilon, rescale, random_seed)
    return disjoint_merge(pruned, weights, normalize)


def della_linear(
    task_vectors: list[torch.Tensor],
    weights: list[float],
    density: list[float],
    epsilon: list[float],
    rescale: bool = True,
    random_seed: int = 0,
    normalize: bool = False,
) -> torch.Tensor:
    """Weighted sum of the MAGPRUNE-dropped task vectors."""
    return weighted_sum(_pruned(task_vectors, density, epsilon, rescale, random_seed), weights, normalize)


def check_epsilon(params: Mapping[str, Any], where: str) -> None:
    """Keep probabilities must lie in (0, 1): density - epsilon > 0 and density + epsilon < 1."""
    for keep, spread in zip(params["density"], params["epsilon"], strict=True):
        if keep < 1.0 and not (keep - spread > 0.0 and keep + spread < 1.0):
            raise ConfigError(
                f"{where}: density {keep:g} with epsilon {spread:g} gives keep probabilities outside "
                "(0, 1); choose epsilon < min(density, 1 - density)"
            )


EPSILON = Param(
    "epsilon",
    float,
    0.15,
    "half the spread of keep probabilities between the smallest and largest entries",
    per_model=True,
    minimum=0.0,
    maximum=0.5,
)


def _params(normalize: bool) -> tuple[Param, ...]:
    return (
        DENSITY,
        EPSILON,
        Param("rescale", bool, True, "divide each survivor by its keep probability"),
        Param("random_seed", int, 0, "seed of the random drop masks", minimum=0),
        Param("normalize", bool, normalize, "divide by the (agreeing) weights' sum"),
        INT8_MASK,
    )


DELLA = MergeMethod(
    name="della",
    function=della,
    summary="drop entries at random, smaller ones more often (MAGPRUNE), rescale, TIES merge",
    params=_params(normalize=True),
    space="task_vectors",
    reference="https://arxiv.org/abs/2406.11617",
    validate=check_epsilon,
)
DELLA_LINEAR = MergeMethod(
    name="della_linear",
    function=della_linear,
    summary="drop entries at random, smaller ones more often (MAGPRUNE), rescale, weighted sum",
    params=_params(normalize=False),
    space="task_vectors",
    reference="https://arxiv.org/abs/2406.11617",
    validate=check_epsilon,
)
