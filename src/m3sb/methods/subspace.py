"""What the subspace methods (TSV-M, ISO-C, ISO-CTS, WUDI) share: weighted task vectors,
their mean for tensors that are not matrices, and the orthogonal polar factor.

These methods work on the singular vectors of each 2-D tensor; a tensor of any other rank
(biases, norms, convolution kernels) is merged as the mean of the weighted task vectors,
as FusionBench does. The cost is one SVD (or eigendecomposition) of each matrix per task:
a few seconds for a 4096 x 4096 tensor on two cores.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def weighted(task_vectors: Sequence[torch.Tensor], weights: Sequence[float]) -> list[torch.Tensor]:
    """Each task vector times its model's weight (the vectors themselves where a weight is 1)."""
    pairs = zip(task_vectors, weights, strict=True)
    return [vector if weight == 1.0 else vector * weight for vector, weight in pairs]


def mean(task_vectors: Sequence[torch.Tensor]) -> torch.Tensor:
    """The mean of the task vectors, as a new tensor."""
    total = task_vectors[0].clone()
    for vector in task_vectors[1:]:
        total.add_(vector)
    return total.div_(len(task_vectors))


def is_matrix(tensor: torch.Tensor) -> bool:
    """Whether the subspace methods merge this tensor through its singular vectors."""
    return tensor.dim() == 2 and min(tensor.shape) > 0


def polar_factor(matrix: torch.Tensor) -> torch.Tensor:
    """The orthogonal factor ``U V^T`` of the polar decomposition: the matrix with orthonormal
    columns (or rows) nearest to ``matrix``."""
    u, _, vh = torch.linalg.svd(matrix, full_matrices=False)
    orthogonal: torch.Tensor = u @ vh
    return orthogonal


def flat_spectrum(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor) -> torch.Tensor:
    """``U diag(mean(s)) V^T``: the same singular vectors with every singular value set to their mean."""
    return (u * s.mean()) @ vh
