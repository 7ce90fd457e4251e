"""TSV-M, task singular vectors merging (Gargiulo et al., CVPR 2025).

For each 2-D tensor, each of the T task vectors keeps its top ``rank // T`` singular
triplets; the kept left vectors are placed side by side (task after task), as are the right
ones and the singular values; the two blocks of vectors are replaced by their orthogonal
polar factors, which removes the interference between tasks' subspaces, and the result is
``U_orth diag(s) V_orth^T``. Other tensors are averaged. FusionBench computes the kept count
as ``int(rank * (1 / T))``, which floating point can make one less than ``rank // T``.
"""

from __future__ import annotations

import torch

from m3sb.methods.registry import MergeMethod
from m3sb.methods.subspace import is_matrix, mean, polar_factor, weighted


def tsv_m(task_vectors: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """The TSV-M merge of the weighted task vectors."""
    vectors = weighted(task_vectors, weights)
    if not is_matrix(vectors[0]):
        return mean(vectors)
    rows, columns = vectors[0].shape
    rank = min(rows, columns)
    kept = rank // len(vectors)
    left = vectors[0].new_zeros(rows, rank)
    values = vectors[0].new_zeros(rank)
    right = vectors[0].new_zeros(rank, columns)
    for i, vector in enumerate(vectors):
        u, s, vh = torch.linalg.svd(vector, full_matrices=False)
        block = slice(i * kept, (i + 1) * kept)
        left[:, block] = u[:, :kept]
        values[block] = s[:kept]
        right[block, :] = vh[:kept, :]
    return (polar_factor(left) * values) @ polar_factor(right)


METHOD = MergeMethod(
    name="tsv_m",
    function=tsv_m,
    summary="each task's top rank/T singular vectors side by side, orthogonalised; others averaged",
    space="task_vectors",
    min_models=1,
    reference="https://arxiv.org/abs/2412.00081",
)
