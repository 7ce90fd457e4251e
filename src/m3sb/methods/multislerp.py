"""Multi-SLERP: mergekit's one-step spherical average of many models.

The tensors (task vectors when a base is given) are flattened and normalised; their
weighted Euclidean mean direction m is the tangent point; the weighted mean of the unit
vectors' tangent components at m is mapped back to the sphere by the exponential map and
scaled by the weighted mean norm. This is one step of the Karcher iteration from the
Euclidean mean, not the spherical barycenter: m3sb's ``barycenter`` and ``karcher``
iterate to the exact weighted Karcher mean.
"""

from __future__ import annotations

import torch

from m3sb.errors import MergeError
from m3sb.methods.registry import MergeMethod, Param

EPS = 1e-8  # mergekit's guard on norms


def multislerp(
    tensors: list[torch.Tensor], weights: list[float], normalize_weights: bool = True
) -> torch.Tensor:
    """The exponential map at the mean direction of the weighted mean tangent, times the mean norm."""
    if len(tensors) == 1:
        return tensors[0].clone()
    flat = torch.stack([tensor.reshape(-1) for tensor in tensors])
    shares = torch.tensor(weights, dtype=flat.dtype, device=flat.device)
    if normalize_weights:
        shares = shares / shares.sum()
    norms = flat.norm(dim=-1, keepdim=True)
    units = flat / (norms + EPS)
    del flat
    mean = (units * shares[:, None]).sum(0)
    mean_norm = mean.norm()
    if bool((norms < EPS).all()):
        return torch.zeros_like(tensors[0])  # every input is zero here (a tensor no fine-tune changed)
    if mean_norm < EPS:
        if len(tensors) == 2:
            return (tensors[0] * shares[0] + tensors[1] * shares[1]).reshape(tensors[0].shape)
        raise MergeError("the weighted mean of the directions is zero (antipodal models); change the weights")
    mean = mean / mean_norm
    tangents = units - (units * mean).sum(-1, keepdim=True) * mean
    step = (tangents * shares[:, None]).sum(0)
    length = step.norm() + EPS
    result: torch.Tensor = mean * torch.cos(length) + step * (torch.sin(length) / length)
    scaled: torch.Tensor = result * (norms.squeeze(-1) * shares).sum()
    return scaled.reshape(tensors[0].shape)


METHOD = MergeMethod(
    scales=False,
    name="multislerp",
    function=multislerp,
    summary="one tangent-space step from the Euclidean mean direction, scaled by the mean norm "
    "(barycenter is the exact Karcher mean)",
    params=(Param("normalize_weights", bool, True, "divide the weights by their sum"),),
    space="if_base",
    reference="https://goddard.blog/posts/multislerp-wow-what-a-cool-idea",
)
