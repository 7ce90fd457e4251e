from __future__ import annotations

import pytest
import torch

from m3sb.methods import merge_group
from m3sb.methods.sparsify import magnitude_mask

BASE = torch.zeros(4)
MODELS = [
    torch.tensor([1.0, -2.0, 3.0, 0.1]),
    torch.tensor([-1.0, -1.5, 2.0, 0.2]),
    torch.tensor([2.0, 1.0, -4.0, 0.05]),
]


def test_without_trimming_entries_against_the_elected_sign_are_dropped() -> None:
    merged = merge_group("ties", MODELS, base=BASE)
    # elected signs [+, -, +, +]; agreeing means: (1+2)/2, (-2-1.5)/2, (3+2)/2, 0.35/3
    assert torch.allclose(merged, torch.tensor([1.5, -1.75, 2.5, 0.35 / 3]))


def test_trimming_and_weights_reference_values() -> None:
    merged = merge_group("ties", MODELS, [1.0, 2.0, 1.0], BASE, density=0.5)
    # kept: [0,-2,3,0], 2*[0,-1.5,2,0], [2,0,-4,0]; signs [+,-,+,+]
    assert torch.allclose(merged, torch.tensor([2.0, -5.0 / 3.0, 7.0 / 3.0, 0.0]))


def test_without_normalize_the_agreeing_entries_are_summed_and_scaled() -> None:
    merged = merge_group("ties", MODELS, base=BASE + 1.0, normalize=False, **{"lambda": 0.5})
    # task vectors MODELS - 1: [0,-3,2,-.9], [-2,-2.5,1,-.8], [1,0,-5,-.95]; elected signs all -1,
    # zeros take no side; agreeing sums [-2, -5.5, -5, -2.65]; result 1 + 0.5 * sums
    assert torch.allclose(merged, torch.tensor([0.0, -1.75, -1.5, -0.325]))


def test_a_negative_weight_flips_the_side_a_model_votes_for() -> None:
    merged = merge_group("ties", MODELS[:2], [1.0, -1.0], BASE, normalize=False)
    # weighted entries [1,-2,3,.1] and [1,1.5,-2,-.2]: signs [+,-,+,-]; the agreeing entries add up.
    # (With normalize, weights summing to zero are refused, as by the merge engine.)
    assert torch.allclose(merged, torch.tensor([2.0, -2.0, 3.0, -0.2]))


@pytest.mark.parametrize(("density", "kept"), [(0.25, 1), (0.5, 2), (0.75, 3), (0.01, 1), (1.0, 4), (0.0, 0)])
def test_magnitude_mask_keeps_the_largest_entries(density: float, kept: int) -> None:
    mask = magnitude_mask(torch.tensor([0.1, -4.0, 3.0, -2.0]), density)
    by_decreasing_magnitude = [1, 2, 3, 0]
    assert [bool(mask[i]) for i in by_decreasing_magnitude] == [True] * kept + [False] * (4 - kept)
