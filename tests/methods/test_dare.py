from __future__ import annotations

import torch

from m3sb.methods import merge_group

GENERATOR = torch.Generator().manual_seed(0)
BASE = torch.randn(50, 40, generator=GENERATOR)
MODELS = [BASE + 0.1 * torch.randn(50, 40, generator=GENERATOR) for _ in range(3)]
WEIGHTS = [0.5, 0.3, 0.2]


def test_density_one_reduces_to_task_arithmetic_and_ties() -> None:
    dare_linear = merge_group("dare_linear", MODELS, WEIGHTS, BASE)
    assert torch.allclose(dare_linear, merge_group("task_arithmetic", MODELS, WEIGHTS, BASE))
    dare_ties = merge_group("dare_ties", MODELS, WEIGHTS, BASE, normalize=True)
    assert torch.allclose(dare_ties, merge_group("ties", MODELS, WEIGHTS, BASE))


def test_dropped_entries_vanish_and_survivors_are_rescaled() -> None:
    merged = merge_group("dare_linear", MODELS[:1], [1.0], BASE, density=0.3, random_seed=5)
    delta = merged - BASE
    task_vector = MODELS[0] - BASE
    kept = delta != 0
    assert abs(float(kept.float().mean()) - 0.3) < 0.05
    assert torch.allclose(delta[kept], task_vector[kept] / 0.3, rtol=1e-5, atol=1e-6)


def test_same_seed_and_tensor_name_give_bit_identical_results() -> None:
    def run(name: str, seed: int) -> torch.Tensor:
        return merge_group("dare_ties", MODELS, base=BASE, tensor_name=name, density=0.5, random_seed=seed)

    first = run("layers.0.weight", 7)
    assert torch.equal(first, run("layers.0.weight", 7))
    assert not torch.equal(first, run("layers.1.weight", 7))
    assert not torch.equal(first, run("layers.0.weight", 8))
