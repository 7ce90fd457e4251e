from __future__ import annotations

import pytest
import torch

from m3sb.methods import merge_group
from m3sb.methods.sparsify import magnitude_mask, magnitude_threshold
from m3sb.methods.ties import ties

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


def _selection_cases() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    base = torch.randn(600, 500, generator=generator) * 0.02
    fine_tuned = (base + torch.randn(600, 500, generator=generator) * 2e-4).bfloat16().float()
    decoy = torch.randn(600, 500, generator=generator)
    decoy.view(-1)[:: decoy.numel() // (1 << 14)] = 0.5  # the sample sees one value; the counts refute it
    return {
        "bfloat16 task vector (few distinct values)": fine_tuned - base.bfloat16().float(),
        "gaussian": torch.randn(600, 500, generator=generator),
        "half of it one value": torch.cat(
            [torch.full((150_000,), -0.25), torch.randn(150_000, generator=generator)]
        ),
        "a sample that misleads": decoy,
    }


@pytest.mark.parametrize("case", list(_selection_cases()))
@pytest.mark.parametrize("density", [0.001, 0.2, 0.5, 0.77, 0.999])
def test_the_threshold_and_mask_are_the_sort_based_ones(case: str, density: float) -> None:
    values = _selection_cases()[case]
    k = max(1, int(density * values.numel()))
    kth = float(torch.sort(values.abs().reshape(-1), descending=True).values[k - 1])
    assert magnitude_threshold(values, density) == kth
    mask = magnitude_mask(values, density)
    assert torch.equal(mask, values.abs() >= kth)  # every entry tied with the k-th is kept
    assert int(mask.sum()) >= k


def _disjoint_by_definition(
    task_vectors: list[torch.Tensor], weights: list[float], densities: list[float], normalize: bool
) -> torch.Tensor:
    """TIES written out elementwise in float64: trim, elect, sum the agreeing entries."""
    kept = []
    for vector, density in zip(task_vectors, densities, strict=True):
        k = max(1, int(density * vector.numel()))
        kth = torch.sort(vector.abs().reshape(-1), descending=True).values[k - 1]
        kept.append(torch.where(vector.abs() >= kth, vector, 0.0).double())
    elected = torch.sign(sum(w * entries for w, entries in zip(weights, kept, strict=True)))
    elected[elected == 0] = 1.0
    total = torch.zeros_like(kept[0])
    agreeing = torch.zeros_like(kept[0])
    for w, entries in zip(weights, kept, strict=True):
        agrees = (torch.sign(entries) == torch.sign(torch.tensor(w)) * elected) & (entries != 0) & (w != 0)
        total += torch.where(agrees, w * entries, 0.0)
        agreeing += agrees.double() * w
    if normalize:
        agreeing[agreeing == 0] = 1.0
        total /= agreeing
    return total


@pytest.mark.parametrize("weights", [[1.0, 1.0, 1.0], [0.5, -0.7, 1.2], [0.0, 2.0, -1.0]])
@pytest.mark.parametrize("normalize", [True, False])
def test_ties_is_its_definition_over_many_slices(weights: list[float], normalize: bool) -> None:
    generator = torch.Generator().manual_seed(1)
    task_vectors = [torch.randn(700, 300, generator=generator) for _ in range(3)]  # 210,000: four slices
    task_vectors[1][:100] = task_vectors[0][:100]  # equal entries: ties at the same thresholds
    densities = [0.3, 0.6, 0.9]
    merged = ties([v.clone() for v in task_vectors], weights, densities, normalize)
    expected = _disjoint_by_definition(task_vectors, weights, densities, normalize)
    torch.testing.assert_close(merged.double(), expected, rtol=1e-6, atol=1e-7)
