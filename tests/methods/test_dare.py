from __future__ import annotations

import torch

from m3sb.methods import METHODS, apply_method
from m3sb.methods.dare import dare_linear, dare_ties
from m3sb.methods.task_arithmetic import task_arithmetic
from m3sb.methods.ties import ties

GENERATOR = torch.Generator().manual_seed(0)
BASE = torch.randn(50, 40, generator=GENERATOR)
MODELS = [BASE + 0.1 * torch.randn(50, 40, generator=GENERATOR) for _ in range(3)]


def test_density_one_reduces_to_task_arithmetic_and_ties() -> None:
    full = [1.0, 1.0, 1.0]
    weights = [0.5, 0.3, 0.2]
    assert torch.allclose(dare_linear(MODELS, weights, BASE, full), task_arithmetic(MODELS, weights, BASE))
    assert torch.allclose(
        dare_ties(MODELS, weights, BASE, full, normalize=True), ties(MODELS, weights, BASE, full)
    )


def test_dropped_entries_vanish_and_survivors_are_rescaled() -> None:
    merged = dare_linear(MODELS[:1], [1.0], BASE, [0.3], random_seed=5)
    delta = merged - BASE
    task_vector = MODELS[0] - BASE
    kept = delta != 0
    assert abs(float(kept.float().mean()) - 0.3) < 0.05
    assert torch.allclose(delta[kept], task_vector[kept] / 0.3, rtol=1e-5, atol=1e-6)


def test_same_seed_and_tensor_name_give_bit_identical_results() -> None:
    method = METHODS["dare_ties"]
    params = {"density": [0.5] * 3, "rescale": True, "random_seed": 7, "normalize": False, "lambda": 1.0}
    first = apply_method(method, MODELS, [1.0] * 3, BASE, params, "layers.0.weight")
    again = apply_method(method, MODELS, [1.0] * 3, BASE, params, "layers.0.weight")
    other_tensor = apply_method(method, MODELS, [1.0] * 3, BASE, params, "layers.1.weight")
    other_seed = apply_method(method, MODELS, [1.0] * 3, BASE, params | {"random_seed": 8}, "layers.0.weight")
    assert torch.equal(first, again)
    assert not torch.equal(first, other_tensor)
    assert not torch.equal(first, other_seed)
