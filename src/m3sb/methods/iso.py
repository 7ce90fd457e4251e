"""Isotropic merging, ISO-C and ISO-CTS (Marczak et al., "No Task Left Behind", ICML 2025).

ISO-C: per 2-D tensor, the SVD of the sum of the task vectors with its spectrum flattened to
the mean singular value, so every direction of the common subspace is scaled alike.

ISO-CTS: the top ``common_space_fraction`` of that sum's singular directions form a common
subspace; the rest of the rank is shared equally among the tasks, each taking the top
directions of its own task vector once the common subspace is projected out; the left and
right blocks are orthogonalised (polar factors) and the spectrum flattened as in ISO-C. The
task-specific share is rounded to a multiple of T as FusionBench rounds it (Python's round),
and never exceeds the rank. Other tensors are averaged in both.
"""

from __future__ import annotations

import torch

from m3sb.methods.registry import MergeMethod, Param
from m3sb.methods.subspace import flat_spectrum, is_matrix, mean, polar_factor, weighted


def iso_c(task_vectors: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """The sum of the weighted task vectors with a flat spectrum (the mean for non-matrices)."""
    vectors = weighted(task_vectors, weights)
    if not is_matrix(vectors[0]):
        return mean(vectors)
    u, s, vh = torch.linalg.svd(torch.stack(vectors).sum(dim=0), full_matrices=False)
    return flat_spectrum(u, s, vh)


def subspace_sizes(rank: int, tasks: int, common_space_fraction: float) -> tuple[int, int]:
    """The size of ISO-CTS's common subspace and the number of directions each task adds."""
    common = int(rank * common_space_fraction)
    per_task = min(round((rank - common) / tasks), rank // tasks)
    return rank - per_task * tasks, per_task


def iso_cts(
    task_vectors: list[torch.Tensor], weights: list[float], common_space_fraction: float = 0.8
) -> torch.Tensor:
    """ISO-CTS: common and task-specific singular directions, orthogonalised, flat spectrum."""
    vectors = weighted(task_vectors, weights)
    if not is_matrix(vectors[0]):
        return mean(vectors)
    rows, columns = vectors[0].shape
    common, per_task = subspace_sizes(min(rows, columns), len(vectors), common_space_fraction)
    u, s, vh = torch.linalg.svd(torch.stack(vectors).sum(dim=0), full_matrices=False)
    common_u = u[:, :common]
    left, values, right = [], [], []
    for vector in vectors:
        specific = vector - common_u @ (common_u.T @ vector)
        su, ss, svh = torch.linalg.svd(specific, full_matrices=False)
        left.append(su[:, :per_task])
        values.append(ss[:per_task])
        right.append(svh[:per_task, :])
    left.append(common_u)
    values.append(s[:common])
    right.append(vh[:common, :])
    return flat_spectrum(
        polar_factor(torch.cat(left, dim=1)), torch.cat(values), polar_factor(torch.cat(right, dim=0))
    )


ISO_C = MergeMethod(
    name="iso_c",
    function=iso_c,
    summary="SVD of the summed task vectors with the spectrum flattened to its mean; others averaged",
    space="task_vectors",
    reference="https://arxiv.org/abs/2502.04959",
)

ISO_CTS = MergeMethod(
    name="iso_cts",
    function=iso_cts,
    summary="ISO-C's common subspace plus each task's own directions, orthogonalised, flat spectrum",
    params=(
        Param(
            "common_space_fraction",
            float,
            0.8,
            "fraction of the rank given to the common subspace",
            minimum=0.0,
            maximum=1.0,
        ),
    ),
    space="task_vectors",
    reference="https://arxiv.org/abs/2502.04959",
)
