from __future__ import annotations

import torch

from m3sb import geometry
from m3sb.methods import merge_group
from m3sb.methods.barycenter import barycenter, pairwise_slerp

GENERATOR = torch.Generator().manual_seed(3)
CENTER = torch.randn(30, 20, generator=GENERATOR, dtype=torch.float64)
MODELS = [CENTER + 0.3 * torch.randn(30, 20, generator=GENERATOR, dtype=torch.float64) for _ in range(4)]


def _close(a: torch.Tensor, b: torch.Tensor, tolerance: float = 1e-10) -> bool:
    return float((a - b).norm() / b.norm()) < tolerance


def test_pairwise_slerp_folds_in_order_with_cumulative_shares() -> None:
    weights = [1.0, 2.0, 3.0, 4.0]
    expected = MODELS[0]
    seen = weights[0]
    for model, weight in zip(MODELS[1:], weights[1:], strict=True):
        seen += weight
        expected = geometry.slerp(expected, model, weight / seen)
    assert _close(pairwise_slerp(MODELS, weights), expected)


def test_pairwise_slerp_and_barycenter_agree_for_two_models_and_differ_for_more() -> None:
    assert _close(pairwise_slerp(MODELS[:2], [1.0, 3.0]), barycenter(MODELS[:2], [1.0, 3.0]))
    assert not _close(pairwise_slerp(MODELS, [1.0] * 4), barycenter(MODELS, [1.0] * 4), 1e-6)


def test_pairwise_slerp_skips_zero_weight_models() -> None:
    assert torch.equal(pairwise_slerp(MODELS, [0.0, 0.0, 5.0, 0.0]), MODELS[2])
    assert _close(pairwise_slerp(MODELS, [0.0, 1.0, 0.0, 1.0]), geometry.slerp(MODELS[1], MODELS[3], 0.5))


def test_task_vector_barycenter_is_base_plus_scaled_spherical_mean_of_task_vectors() -> None:
    base = CENTER
    merged = merge_group(
        "barycenter", MODELS, [1.0, 2.0, 3.0, 4.0], base, space="task_vectors", **{"lambda": 0.7}
    )
    task_vectors = [model - base for model in MODELS]
    expected = base + 0.7 * geometry.karcher_mean(task_vectors, [1.0, 2.0, 3.0, 4.0])
    assert _close(merged, expected)


def test_karcher_is_the_barycenter_under_mergekits_name() -> None:
    assert torch.equal(merge_group("karcher", MODELS), barycenter(MODELS, [1.0] * 4))


def test_karcher_in_memory_takes_the_base_as_one_more_point() -> None:
    with_base = merge_group("karcher", MODELS[1:], base=MODELS[0])
    assert torch.equal(with_base, merge_group("karcher", MODELS))
