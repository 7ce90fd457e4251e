"""WUDI merging (Cheng et al., "Whoever Started the Interference Should End It", 2025).

Per 2-D tensor, the merged task vector ``tau`` minimises the interference loss

    L(tau) = sum_i || (tau - tau_i) tau_i^T ||_F^2 / || tau_i ||_F^2

against every task vector ``tau_i``. The loss is a convex quadratic, so ``solver: exact``
(the default) finds its minimum in closed form: ``tau A = B`` with ``A = sum_i tau_i^T tau_i
/ n_i`` and ``B = sum_i tau_i tau_i^T tau_i / n_i``, solved in float64 through the
eigendecomposition of the smaller of ``A`` and its dual (the minimum-norm solution, which is
where gradient descent from ``sum_i tau_i`` converges). ``solver: adam`` runs FusionBench's
procedure instead (Adam from ``sum_i tau_i``, ``iterations`` steps of ``step_size``), whose
loss is higher. Task vectors that are all zero take no part in the loss; other tensors are
averaged.
"""

from __future__ import annotations

import torch

from m3sb.methods.registry import MergeMethod, Param
from m3sb.methods.subspace import is_matrix, mean, weighted


def interference_loss(merged: torch.Tensor, task_vectors: list[torch.Tensor]) -> torch.Tensor:
    """WUDI's loss of ``merged`` against the task vectors (zero ones left out)."""
    total = merged.new_zeros(())
    for vector in task_vectors:
        norm = vector.square().sum()
        if norm > 0:
            total = total + ((merged - vector) @ vector.T).square().sum() / norm
    return total


def _symmetric_pinv(matrix: torch.Tensor) -> torch.Tensor:
    """The pseudo-inverse of a symmetric positive semi-definite matrix (eigenvalues below
    ``size * eps`` of the largest count as zero)."""
    values: torch.Tensor
    vectors: torch.Tensor
    values, vectors = torch.linalg.eigh(matrix)
    cutoff = values.abs().max() * matrix.shape[0] * torch.finfo(matrix.dtype).eps
    inverted = torch.where(values > cutoff, 1.0 / values.clamp_min(cutoff), 0.0)
    pseudo_inverse: torch.Tensor = (vectors * inverted) @ vectors.T
    return pseudo_inverse


def exact_minimiser(task_vectors: list[torch.Tensor]) -> torch.Tensor:
    """The minimum-norm minimiser of the interference loss, computed in float64."""
    vectors = [v.double() for v in task_vectors if bool(v.any())]
    if not vectors:
        return task_vectors[0].new_zeros(task_vectors[0].shape)
    columns = vectors[0].shape[1]
    scaled = torch.cat([v / v.norm() for v in vectors])  # X, stacked tau_i / ||tau_i||
    grams = torch.cat([(v @ v.T) / v.norm() for v in vectors], dim=1)  # C, with B = C X
    if columns <= scaled.shape[0]:
        solution = (grams @ scaled) @ _symmetric_pinv(scaled.T @ scaled)
    else:  # X (X^T X)^+ = (X X^T)^+ X: invert the smaller Gram matrix
        solution = grams @ (_symmetric_pinv(scaled @ scaled.T) @ scaled)
    return solution.to(task_vectors[0].dtype)


def adam_minimiser(task_vectors: list[torch.Tensor], iterations: int, step_size: float) -> torch.Tensor:
    """FusionBench's procedure: Adam on the loss from the sum of the task vectors."""
    stacked = torch.stack(task_vectors)
    norms = stacked.flatten(1).square().sum(dim=1)
    keep = norms > 0
    stacked, norms = stacked[keep], norms[keep]
    with torch.enable_grad():
        merged = torch.nn.Parameter(torch.stack(task_vectors).sum(dim=0))
        optimiser = torch.optim.Adam([merged], lr=step_size)
        for _ in range(iterations if len(stacked) else 0):
            product = (merged.unsqueeze(0) - stacked) @ stacked.transpose(1, 2)
            loss = (product.square() / norms[:, None, None]).sum()
            optimiser.zero_grad()
            loss.backward()  # type: ignore[no-untyped-call]
            optimiser.step()
    return merged.detach()


def wudi(
    task_vectors: list[torch.Tensor],
    weights: list[float],
    solver: str = "exact",
    iterations: int = 400,
    step_size: float = 1e-5,
) -> torch.Tensor:
    """The task vector that minimises WUDI's interference loss (the mean for non-matrices)."""
    vectors = weighted(task_vectors, weights)
    if not is_matrix(vectors[0]):
        return mean(vectors)
    if solver == "adam":
        return adam_minimiser(vectors, iterations, step_size)
    return exact_minimiser(vectors)


METHOD = MergeMethod(
    name="wudi",
    function=wudi,
    summary="the task vector minimising the interference loss against every task vector",
    params=(
        Param(
            "solver",
            str,
            "exact",
            "exact: the loss's minimum in closed form; adam: FusionBench's iterations",
            choices=("exact", "adam"),
        ),
        Param("iterations", int, 400, "Adam steps (solver: adam; FusionBench's setting)", minimum=1),
        Param("step_size", float, 1e-5, "Adam's learning rate (solver: adam)", minimum=0.0),
    ),
    space="task_vectors",
    reference="https://arxiv.org/abs/2503.08099",
)
