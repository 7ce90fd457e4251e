from __future__ import annotations

import torch

from m3sb.methods import merge_group
from m3sb.methods.sce import variance_mask


def test_sce_weighs_task_vectors_by_mean_square_among_agreeing_signs() -> None:
    base = torch.zeros(3)
    a = torch.tensor([2.0, 2.0, -2.0])  # mean square 4
    b = torch.tensor([1.0, -1.0, -1.0])  # mean square 1
    merged = merge_group("sce", [base + a, base + b], base=base)
    # shares 0.8 and 0.2; entry 1: sum 1 > 0 elects +, so only a agrees there
    expected = torch.tensor([(0.8 * 2 + 0.2 * 1) / 1.0, 2.0, (0.8 * -2 + 0.2 * -1) / 1.0])
    torch.testing.assert_close(merged, expected)


def test_select_topk_keeps_the_entries_that_vary_most() -> None:
    a = torch.tensor([1.0, 1.0, 5.0, 0.0])
    b = torch.tensor([1.0, 3.0, -5.0, 0.0])  # variances: 0, 1, 25, 0
    mask = variance_mask([a, b], 0.5)
    assert mask is not None and mask.tolist() == [False, False, True, False]  # half of the 2 that vary
    merged = merge_group("sce", [a, b], base=torch.zeros(4), select_topk=0.5)
    assert merged.tolist() == [0.0, 0.0, 5.0, 0.0]  # + elected (sum 0), a alone agrees


def test_zero_task_vectors_give_the_base() -> None:
    base = torch.tensor([1.0, 2.0])
    assert torch.equal(merge_group("sce", [base.clone(), base.clone()], base=base), base)
