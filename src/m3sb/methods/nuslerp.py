"""NuSLERP: mergekit's SLERP of two models with weights, whole-tensor or along rows or columns.

The two tensors (their task vectors when a base is given) are interpolated at
``t = w_2 / (w_1 + w_2)`` (0.5 when the weights cancel) with the SLERP formula applied to
the vectors themselves, ``(sin((1 - t) theta) v_1 + sin(t theta) v_2) / sin(theta)``, theta
the angle between them: flattened (``nuslerp_flatten``, the default), or per vector along
the last axis, or along the first with ``nuslerp_row_wise``. Parallel vectors are
interpolated linearly. Unlike m3sb's ``slerp``, the norm is not interpolated separately.
"""

from __future__ import annotations

import torch

from m3sb.methods.registry import MergeMethod, Param

NORM_FLOOR = 1e-7  # mergekit's clamp of the norms that directions are divided by
PARALLEL = 1e-16  # 1 - cos^2 below this counts as parallel (mergekit's eps^2)
CANCELLING = 1e-6  # weights summing to less than this in magnitude interpolate halfway


def nuslerp_vectors(t: float, first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """SLERP of the vectors along the last axis of ``first`` and ``second``, at ``t``."""
    unit_first = first / first.norm(dim=-1, keepdim=True).clamp(min=NORM_FLOOR)
    unit_second = second / second.norm(dim=-1, keepdim=True).clamp(min=NORM_FLOOR)
    cosine = (unit_first * unit_second).sum(dim=-1, keepdim=True).clamp(-1.0, 1.0)
    parallel = (1 - cosine.square()) <= PARALLEL
    theta = torch.acos(torch.where(parallel, 0.0, cosine))
    curved = (torch.sin((1 - t) * theta) * first + torch.sin(t * theta) * second) / torch.sin(theta)
    return torch.where(parallel, (1 - t) * first + t * second, curved)


def nuslerp(
    tensors: list[torch.Tensor],
    weights: list[float],
    nuslerp_flatten: bool = True,
    nuslerp_row_wise: bool = False,
) -> torch.Tensor:
    """The two tensors interpolated at ``w_2 / (w_1 + w_2)`` as the options say."""
    first, second = tensors
    total = weights[0] + weights[1]
    t = 0.5 if abs(total) < CANCELLING else weights[1] / total
    if nuslerp_flatten or first.dim() == 0:
        return nuslerp_vectors(t, first.reshape(-1), second.reshape(-1)).reshape(first.shape)
    if nuslerp_row_wise:
        moved = nuslerp_vectors(t, first.transpose(0, -1), second.transpose(0, -1))
        return moved.transpose(0, -1).contiguous()
    return nuslerp_vectors(t, first, second)


METHOD = MergeMethod(
    scales=False,
    name="nuslerp",
    function=nuslerp,
    summary="SLERP formula on two models (their task vectors with a base) at t = w_2 / (w_1 + w_2)",
    params=(
        Param("nuslerp_flatten", bool, True, "interpolate the whole tensors as one vector each"),
        Param("nuslerp_row_wise", bool, False, "without flattening: vectors along the first axis"),
    ),
    space="if_base",
    min_models=2,
    max_models=2,
    reference="mergekit",
)
