from __future__ import annotations

import math

import pytest
import torch

from m3sb.errors import MergeError
from m3sb.methods import merge_group


def test_two_orthogonal_unit_vectors_meet_halfway_on_the_circle() -> None:
    a, b = torch.tensor([1.0, 0.0], dtype=torch.float64), torch.tensor([0.0, 2.0], dtype=torch.float64)
    merged = merge_group("multislerp", [a, b])
    torch.testing.assert_close(merged, torch.tensor([1.0, 1.0], dtype=torch.float64) / math.sqrt(2) * 1.5)


def test_one_step_is_not_the_karcher_mean_for_three_spread_vectors() -> None:
    vectors = [
        torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64),
        torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64),
        torch.tensor([0.6, 0.0, 0.8], dtype=torch.float64),
    ]
    weights = [0.6, 0.3, 0.1]
    one_step = merge_group("multislerp", vectors, weights)
    exact = merge_group("barycenter", vectors, weights)
    assert float(one_step.norm()) == pytest.approx(1.0) and float(exact.norm()) == pytest.approx(1.0)
    assert 1e-4 < float((one_step - exact).norm()) < 0.1  # close, but only the barycenter is exact


def test_unchanged_tensors_and_cancelling_directions() -> None:
    base = torch.tensor([1.0, 2.0])
    assert torch.equal(merge_group("multislerp", [base.clone(), base.clone(), base.clone()], base=base), base)
    a = torch.tensor([1.0, 0.0])
    with pytest.raises(MergeError, match="weighted mean of the directions is zero"):
        merge_group("multislerp", [a, -a, a, -a])
