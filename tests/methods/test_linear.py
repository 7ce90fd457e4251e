from __future__ import annotations

import pytest
import torch

from m3sb.errors import MergeError
from m3sb.methods import merge_group
from m3sb.methods.linear import linear


def test_weighted_average_reference_values() -> None:
    merged = linear([torch.tensor([1.0, 2.0]), torch.tensor([3.0, 6.0])], [1.0, 3.0])
    assert merged.tolist() == [2.5, 5.0]


def test_without_normalize_the_weighted_sum_is_returned() -> None:
    merged = linear([torch.tensor([1.0, 2.0]), torch.tensor([3.0, 6.0])], [1.0, 3.0], normalize=False)
    assert merged.tolist() == [10.0, 20.0]


def test_weights_summing_to_zero_cannot_be_normalized() -> None:
    with pytest.raises(MergeError, match="sum to zero"):
        linear([torch.ones(2), torch.ones(2)], [1.0, -1.0])


def test_task_vector_space_adds_the_scaled_mean_task_vector_to_the_base() -> None:
    base = torch.tensor([1.0, 1.0])
    models = [torch.tensor([2.0, 1.0]), torch.tensor([1.0, 3.0])]
    merged = merge_group("linear", models, base=base, space="task_vectors", **{"lambda": 2.0})
    assert merged.tolist() == [2.0, 3.0]  # base + 2 * mean([1, 0], [0, 2])
    assert models[0].tolist() == [2.0, 1.0]  # inputs untouched
