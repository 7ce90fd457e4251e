"""Passthrough: one model's tensors as they are, optionally scaled (mergekit's frankenmerge method).

With ``slices`` it assembles a model from layer ranges of other models; on its own it
copies (``scale`` multiplies a tensor, e.g. ``[{filter: o_proj, value: 0.5}]``).
"""

from __future__ import annotations

import torch

from m3sb.methods.registry import MergeMethod, Param


def passthrough(tensors: list[torch.Tensor], weights: list[float], scale: list[float]) -> torch.Tensor:
    """The only input, times its ``scale``."""
    (tensor,) = tensors
    return tensor.clone() if scale[0] == 1.0 else tensor * scale[0]


METHOD = MergeMethod(
    name="passthrough",
    function=passthrough,
    summary="one model's tensors as they are (times scale): the method of slices-based frankenmerges",
    params=(Param("scale", float, 1.0, "factor applied to the tensor", per_model=True),),
    uses_weights=False,
    max_models=1,
    reference="mergekit",
)
