from __future__ import annotations

import math

import torch

from m3sb.methods import merge_group


def test_weights_set_t_and_orthogonal_vectors_move_on_the_circle() -> None:
    a, b = torch.tensor([1.0, 0.0], dtype=torch.float64), torch.tensor([0.0, 1.0], dtype=torch.float64)
    halfway = merge_group("nuslerp", [a, b], [1.0, 1.0])
    torch.testing.assert_close(halfway, torch.tensor([1.0, 1.0], dtype=torch.float64) / math.sqrt(2))
    third = merge_group("nuslerp", [a, b], [2.0, 1.0])  # t = 1/3: angle pi/6 from a
    torch.testing.assert_close(
        third, torch.tensor([math.cos(math.pi / 6), math.sin(math.pi / 6)], dtype=torch.float64)
    )


def test_parallel_vectors_interpolate_linearly_and_a_base_gives_task_vectors() -> None:
    a, b = torch.tensor([1.0, 2.0]), torch.tensor([3.0, 6.0])
    torch.testing.assert_close(merge_group("nuslerp", [a, b], [3.0, 1.0]), 0.75 * a + 0.25 * b)
    base = torch.tensor([1.0, 1.0])
    with_base = merge_group(
        "nuslerp", [base + torch.tensor([1.0, 0.0]), base + torch.tensor([0.0, 1.0])], base=base
    )
    torch.testing.assert_close(with_base, base + torch.tensor([1.0, 1.0]) / math.sqrt(2))


def test_row_wise_interpolates_columns_and_per_row_the_rows() -> None:
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    b = torch.tensor([[0.0, 1.0], [0.0, 1.0]], dtype=torch.float64)
    rows = merge_group("nuslerp", [a, b], nuslerp_flatten=False)
    torch.testing.assert_close(rows[0], torch.tensor([1.0, 1.0], dtype=torch.float64) / math.sqrt(2))
    torch.testing.assert_close(rows[1], torch.tensor([0.0, 1.0], dtype=torch.float64))
    columns = merge_group("nuslerp", [a, b], nuslerp_flatten=False, nuslerp_row_wise=True)
    # column 0: [1, 0] towards a zero vector (angle pi/2); column 1: [0, 1] towards [1, 1] (pi/4)
    torch.testing.assert_close(columns[:, 0], torch.tensor([math.sin(math.pi / 4), 0.0], dtype=torch.float64))
    arc = math.sin(math.pi / 8) / math.sin(math.pi / 4)
    torch.testing.assert_close(columns[:, 1], torch.tensor([arc, 2 * arc], dtype=torch.float64))
