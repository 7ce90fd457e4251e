from __future__ import annotations

import torch

from m3sb.methods import merge_group


def test_base_plus_scaled_weighted_task_vectors() -> None:
    base = torch.tensor([1.0, 0.0, -1.0])
    models = [torch.tensor([2.0, 0.0, -1.0]), torch.tensor([1.0, 4.0, -3.0])]
    merged = merge_group("task_arithmetic", models, [1.0, 0.5], base, **{"lambda": 0.5})
    assert merged.tolist() == [1.5, 1.0, -1.5]  # base + 0.5 * ([1, 0, 0] + 0.5 * [0, 4, -2])


def test_normalize_divides_by_the_weight_sum() -> None:
    models = [torch.tensor([2.0, 4.0]), torch.tensor([4.0, 0.0])]
    merged = merge_group("task_arithmetic", models, [1.0, 3.0], torch.zeros(2), normalize=True)
    assert merged.tolist() == [3.5, 1.0]


def test_negative_weight_subtracts_a_task() -> None:
    assert merge_group("task_arithmetic", [torch.tensor([3.0])], [-1.0], torch.tensor([1.0])).tolist() == [
        -1.0
    ]
