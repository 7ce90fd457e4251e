from __future__ import annotations

import torch

from m3sb.methods import merge_group


def test_unique_entries_are_kept_and_shared_ones_averaged() -> None:
    base = torch.zeros(4)
    a = torch.tensor([1.0, 2.0, 0.0, 0.0])
    b = torch.tensor([0.0, 4.0, 3.0, 0.0])
    torch.testing.assert_close(merge_group("ram", [a, b], base=base), torch.tensor([1.0, 3.0, 3.0, 0.0]))


def test_ramplus_scales_each_models_unique_entries_by_its_overlap() -> None:
    base = torch.zeros(4)
    a = torch.tensor([1.0, 2.0, 0.0, 0.0])  # 1 shared, 1 unique: rho 1, capped at alpha 0.5
    b = torch.tensor([0.0, 4.0, 3.0, 5.0])  # 1 shared, 2 unique: rho 0.5
    merged = merge_group("ramplus_tl", [a, b], base=base, r=0.2, alpha=0.5)
    torch.testing.assert_close(merged, torch.tensor([1.0 * 1.1, 3.0, 3.0 * 1.1, 5.0 * 1.1]))
