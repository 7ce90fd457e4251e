"""DELLA's MAGPRUNE drop: probabilities by magnitude rank, mergekit's distribution, unbiased rescaling."""

from __future__ import annotations

import pytest
import torch

from m3sb.errors import ConfigError
from m3sb.methods import merge_group
from m3sb.methods.della import keep_probabilities


def test_keep_probabilities_rise_with_the_magnitude_rank_in_each_row() -> None:
    tensor = torch.tensor([[0.1, -3.0, 2.0, 0.5, -1.0], [5.0, 4.0, -3.0, 2.0, 1.0]])
    probabilities = keep_probabilities(tensor, density=0.5, epsilon=0.2)
    # ranks by |x| per row: [0, 4, 3, 1, 2] and [4, 3, 2, 1, 0]; p = 0.3 + 0.4 * rank / 4
    expected = 0.3 + 0.1 * torch.tensor([[0.0, 4, 3, 1, 2], [4, 3, 2, 1, 0]])
    torch.testing.assert_close(probabilities, expected)
    flat = keep_probabilities(torch.tensor([3.0, 1.0, 2.0]), density=0.5, epsilon=0.1)
    torch.testing.assert_close(flat, torch.tensor([0.6, 0.4, 0.5]))


def test_keep_frequencies_match_mergekits_magprune() -> None:
    sparsify = pytest.importorskip("mergekit.sparsify", reason="mergekit is in the dev dependency group")
    torch.manual_seed(0)
    tensor = torch.randn(3, 40)
    draws = 600
    theirs = torch.zeros_like(tensor)
    ours = torch.zeros_like(tensor)
    for seed in range(draws):
        torch.manual_seed(seed)
        theirs += sparsify.della_magprune(tensor, density=0.4, epsilon=0.15) != 0
        ours += (
            merge_group(
                "della_linear",
                [tensor],
                base=torch.zeros_like(tensor),
                density=0.4,
                epsilon=0.15,
                random_seed=seed,
            )
            != 0
        )
    expected = keep_probabilities(tensor, 0.4, 0.15)
    bound = 5 * (0.25 / draws) ** 0.5  # five standard deviations of a frequency
    assert float((theirs / draws - expected).abs().max()) < bound
    assert float((ours / draws - expected).abs().max()) < bound


def test_survivors_are_divided_by_their_probability_so_the_mean_is_the_task_vector() -> None:
    torch.manual_seed(1)
    task = torch.randn(2, 30, dtype=torch.float64)
    base = torch.zeros_like(task)
    runs = [
        merge_group("della_linear", [task], base=base, density=0.5, epsilon=0.2, random_seed=s)
        for s in range(800)
    ]
    one = runs[0]
    kept = one != 0
    torch.testing.assert_close(one[kept], (task / keep_probabilities(task, 0.5, 0.2))[kept])
    mean = torch.stack(runs).mean(dim=0)
    assert float((mean - task).abs().max() / task.abs().max()) < 0.35
    assert float((mean - task).norm() / task.norm()) < 0.08


def test_della_is_reproducible_and_elects_signs() -> None:
    a, b, base = torch.tensor([1.0, -2.0, 3.0, 4.0]), torch.tensor([-1.0, 2.0, 3.0, 1.0]), torch.zeros(4)
    first = merge_group("della", [a, b], base=base, density=0.5, epsilon=0.1, random_seed=3)
    assert torch.equal(
        first, merge_group("della", [a, b], base=base, density=0.5, epsilon=0.1, random_seed=3)
    )
    every = merge_group("della", [a, b], base=base, density=1.0)
    assert torch.equal(every, merge_group("ties", [a, b], base=base))  # density 1: TIES without trimming


def test_epsilon_must_keep_probabilities_inside_zero_one() -> None:
    a, base = torch.ones(4), torch.zeros(4)
    with pytest.raises(
        ConfigError, match=r"tensor 'w': density 0.2 with epsilon 0.3 gives keep probabilities"
    ):
        merge_group("della", [a, a * 2], base=base, tensor_name="w", density=0.2, epsilon=0.3)
