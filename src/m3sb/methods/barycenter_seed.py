"""The M3SB seed's published barycenter, kept as a method of its own to reproduce its tables.

The seed (mehdiamlal/m3sb, ``geometry.barycenter``) computed its barycenter with a loop
that differs from the exact weighted Karcher mean (``barycenter``) in two ways: it starts
at the first model's direction, and it ignores every model whose direction is within
``arccos(dot_threshold)`` (1.8 degrees by default) of the current estimate. Fine-tunes of
one base are often that close in weight space, and then the loop never moves: the
"barycenter" is model 1's direction scaled by the weighted mean norm, and reordering the
models changes the result. On well-separated inputs both converge to the same point.

The seed used the weights as given; here they are divided by their sum, which changes
nothing for the seed's configs (they all sum to 1). Its stopping angle was measured in
float32 (``acos`` of a float32 dot product reads angles below about 3e-4 rad as 0); here
it is the exact step length, so this loop may take a step or two more than the seed's.
"""

from __future__ import annotations

import torch

from m3sb import geometry
from m3sb.methods.registry import MergeMethod, Param


def barycenter_seed(
    tensors: list[torch.Tensor],
    weights: list[float],
    iterations: int = 20,
    threshold: float = 1e-5,
    dot_threshold: float = 0.9995,
) -> torch.Tensor:
    """The seed's barycenter of the directions, scaled by the weighted mean norm."""
    weight = geometry.normalized_weights(weights)
    active = [i for i, w in enumerate(weight) if w > 0.0]
    if len(active) == 1:
        return tensors[active[0]].clone()
    coefficients, _ = geometry.seed_barycenter_coefficients(
        geometry.gram_matrix(tensors), weight, iterations, threshold, dot_threshold
    )
    return geometry.combine(tensors, coefficients)


METHOD = MergeMethod(
    name="barycenter_seed",
    function=barycenter_seed,
    summary=(
        "the M3SB seed's published barycenter: starts at model 1 and ignores models within "
        "arccos(dot_threshold) of the estimate, so near-parallel models collapse onto model 1 "
        "(barycenter is the exact weighted Karcher mean)"
    ),
    params=(
        Param("iterations", int, 20, "most steps", minimum=1),
        Param(
            "threshold",
            float,
            1e-5,
            "stop when the angle between successive estimates (radians) is below this",
            minimum=0.0,
        ),
        Param(
            "dot_threshold",
            float,
            0.9995,
            "models whose cosine to the estimate exceeds this add no tangent",
            minimum=0.0,
            maximum=1.0,
        ),
    ),
    nonnegative_weights=True,
    space="either",
    reference="M³SB seed, mehdiamlal/m3sb geometry.barycenter",
)
