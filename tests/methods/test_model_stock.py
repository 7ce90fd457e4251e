from __future__ import annotations

import math

import pytest
import torch

from m3sb.methods import merge_group


@pytest.mark.parametrize(
    ("second_direction", "ratio"),
    [
        ((0.0, 1.0), 0.0),  # orthogonal task vectors: stay at the base
        ((1.0, 0.0), 1.0),  # parallel: take the average
        ((0.5, math.sqrt(3) / 2), 2.0 / 3.0),  # cos 0.5: t = 2 * 0.5 / (1 + 0.5)
    ],
)
def test_interpolation_ratio_follows_the_task_vectors_angle(
    second_direction: tuple[float, float], ratio: float
) -> None:
    base = torch.tensor([1.0, 1.0], dtype=torch.float64)
    models = [
        base + torch.tensor([2.0, 0.0], dtype=torch.float64),
        base + torch.tensor(second_direction, dtype=torch.float64),
    ]
    merged = merge_group("model_stock", models, base=base)
    expected = ratio * (models[0] + models[1]) / 2 + (1 - ratio) * base
    assert torch.allclose(merged, expected, atol=1e-12)


def test_filter_wise_computes_the_ratio_per_row() -> None:
    base = torch.zeros(2, 2, dtype=torch.float64)
    first = torch.tensor([[2.0, 0.0], [1.0, 0.0]], dtype=torch.float64)
    second = torch.tensor([[0.0, 1.0], [3.0, 0.0]], dtype=torch.float64)  # row 0 orthogonal, row 1 parallel
    merged = merge_group("model_stock", [first, second], base=base, filter_wise=True)
    torch.testing.assert_close(merged, torch.tensor([[0.0, 0.0], [2.0, 0.0]], dtype=torch.float64))
    whole = merge_group("model_stock", [first, second], base=base)
    cosine = 3.0 / (5**0.5 * 10**0.5)
    ratio = 2 * cosine / (1 + cosine)
    torch.testing.assert_close(whole, ratio * (first + second) / 2)
