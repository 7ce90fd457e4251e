"""SLERP of two whole tensors: directions along the great circle, norm interpolated linearly.

This is M3SB's definition. mergekit's ``slerp`` instead interpolates each output row
separately between the normalised rows; results differ unless every row pair meets at
the same angle.
"""

from __future__ import annotations

import torch

from m3sb import geometry
from m3sb.methods.registry import MergeMethod, Param


def slerp(tensors: list[torch.Tensor], weights: list[float], t: float) -> torch.Tensor:
    """The point at fraction ``t`` of the way from the first tensor to the second."""
    return geometry.slerp(tensors[0], tensors[1], t)


METHOD = MergeMethod(
    name="slerp",
    function=slerp,
    summary="great-circle interpolation of two models (t=0: first or base, t=1: second); norm linear",
    params=(
        Param("t", float, None, "position along the arc", minimum=0.0, maximum=1.0),
        Param("normalize", bool, False, "accepted for mergekit recipes, which may give it", inert=True),
    ),
    base_is_input=True,
    uses_weights=False,
    min_models=2,
    max_models=2,
    reference="https://en.wikipedia.org/wiki/Slerp",
)
