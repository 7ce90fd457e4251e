from __future__ import annotations

import torch

from m3sb.methods import merge_group
from m3sb.methods.sparsify import outlier_mask


def test_outlier_mask_drops_the_top_gamma_and_the_smallest() -> None:
    magnitudes = torch.arange(1.0, 101.0) * torch.tensor([1.0, -1.0]).repeat(50)
    mask = outlier_mask(magnitudes, density=0.9, gamma=0.05)
    kept = magnitudes.abs()[mask]
    assert kept.numel() == 90
    assert float(kept.min()) == 6.0 and float(kept.max()) == 95.0


def test_breadcrumbs_is_the_weighted_sum_of_masked_task_vectors() -> None:
    base = torch.zeros(100)
    task = torch.arange(1.0, 101.0)
    merged = merge_group(
        "breadcrumbs", [base + task, base + 2 * task], [1.0, 0.5], base, density=0.9, gamma=0.05
    )
    expected = torch.where((task > 5) & (task < 96), 2 * task, 0.0)
    assert torch.allclose(merged, expected)


def test_a_one_element_tensor_keeps_its_entry() -> None:
    merged = merge_group("breadcrumbs", [torch.tensor(1.0), torch.tensor(2.0)], base=torch.tensor(3.0))
    assert float(merged) == 0.0  # 3 + (1 - 3) + (2 - 3): no entry dropped
