"""NearSwap: take the second model's value where it is close to the first's (mergekit's).

Per entry, with ``d = |b - a|`` (``a`` the base or first model, ``b`` the other), the result
is ``w * b + (1 - w) * a`` with ``w = clamp(t / max(d, 1e-6), 0, 1)``: entries closer than
``t`` are swapped in whole, farther ones in proportion to ``t / d``.
"""

from __future__ import annotations

import torch

from m3sb.methods.registry import MergeMethod, Param

DISTANCE_FLOOR = 1e-6  # mergekit's clamp of |b - a|


def nearswap(tensors: list[torch.Tensor], weights: list[float], t: float) -> torch.Tensor:
    """``a`` moved towards ``b`` by ``clamp(t / |b - a|, 0, 1)`` per entry."""
    first, second = tensors
    share = (t / (second - first).abs().clamp(min=DISTANCE_FLOOR)).clamp(0.0, 1.0)
    return share * second + (1 - share) * first


METHOD = MergeMethod(
    name="nearswap",
    function=nearswap,
    summary="per entry, move the base towards the model by clamp(t / abs(model - base), 0, 1)",
    params=(Param("t", float, None, "distance below which the model's value is taken whole", minimum=0.0),),
    base_is_input=True,
    uses_weights=False,
    min_models=2,
    max_models=2,
    reference="https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001",
)
