"""barycenter_seed: the M3SB seed's published barycenter loop, against references written here.

The references below are written from the seed's algorithm as described (directions,
start at model 1, tangents zero above cos 0.9995, weighted tangent sum, geodesic step,
stop on the step angle), in float64 on whole vectors, and share no code with m3sb.
"""

from __future__ import annotations

import math

import pytest
import torch

from m3sb import geometry
from m3sb.errors import ConfigError, MergeError
from m3sb.methods import METHODS, get_method, merge_group

DIM = 1000


def _unit(vector: torch.Tensor) -> torch.Tensor:
    return vector / vector.norm()


def _angle(a: torch.Tensor, b: torch.Tensor) -> float:
    """Angle between two vectors in float64, accurate near 0."""
    ua, ub = _unit(a.double().reshape(-1)), _unit(b.double().reshape(-1))
    return 2.0 * math.asin(min(1.0, float((ua - ub).norm()) / 2.0))


def _log(base: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    cosine = float(base @ target)
    orthogonal = target - cosine * base
    length = float(orthogonal.norm())
    return torch.zeros_like(base) if length == 0.0 else orthogonal / length * math.acos(cosine)


def _exp(base: torch.Tensor, tangent: torch.Tensor) -> torch.Tensor:
    length = float(tangent.norm())
    return base if length == 0.0 else math.cos(length) * base + math.sin(length) * tangent / length


def _reference_karcher(tensors: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """The exact weighted Karcher mean direction, iterated to float64 convergence."""
    units = [_unit(t.double().reshape(-1)) for t in tensors]
    w = [x / sum(weights) for x in weights]
    mean = _unit(sum(wi * u for wi, u in zip(w, units, strict=True)))  # type: ignore[arg-type]
    for _ in range(1000):
        step = sum(wi * _log(mean, u) for wi, u in zip(w, units, strict=True))
        mean = _unit(_exp(mean, step))  # type: ignore[arg-type]
        if float(step.norm()) < 1e-15:  # type: ignore[union-attr]
            break
    return mean


def _reference_seed(
    tensors: list[torch.Tensor], weights: list[float], iterations: int = 20, threshold: float = 1e-5
) -> torch.Tensor:
    """The seed's loop as published, in float64: result = direction * weighted mean norm."""
    flats = [t.double().reshape(-1) for t in tensors]
    units = [_unit(f) for f in flats]
    center = units[0].clone()
    for _ in range(iterations):
        tangents = [
            torch.zeros_like(center) if float(u @ center) > 0.9995 else _log(center, u) for u in units
        ]
        step = sum(w * t for w, t in zip(weights, tangents, strict=True))
        new_center = _exp(center, step)  # type: ignore[arg-type]
        moved = math.acos(max(-1.0, min(1.0, float(center @ new_center))))
        center = new_center
        if moved < threshold:
            break
    norm = sum(w * float(f.norm()) for w, f in zip(weights, flats, strict=True))
    return (center * norm).reshape(tensors[0].shape)


def _near_parallel() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(11)
    center = torch.randn(DIM, generator=generator)
    return [center + 0.014 * torch.randn(DIM, generator=generator) for _ in range(3)]


def _well_separated() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(12)
    center = torch.randn(DIM, generator=generator)
    scales = (0.5, 1.0, 2.0)
    return [s * (center + torch.randn(DIM, generator=generator)) for s in scales]


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(_unit(a.double()) @ _unit(b.double()))


def test_near_parallel_models_collapse_onto_model_1_while_barycenter_finds_the_mean() -> None:
    models = _near_parallel()
    cosines = [_cosine(models[i], models[j]) for i in range(3) for j in range(i + 1, 3)]
    assert all(0.9997 < c < 0.9999 for c in cosines), cosines
    weights = [0.3333, 0.3334, 0.3333]
    seed = merge_group("barycenter_seed", models, weights)
    exact = merge_group("barycenter", models, weights)

    mean_norm = sum(w * float(m.double().norm()) for w, m in zip(weights, models, strict=True))
    assert _cosine(seed, models[0]) > 1 - 1e-6
    assert abs(float(seed.double().norm()) - mean_norm) < 1e-6 * mean_norm

    assert _angle(exact, _reference_karcher(models, weights)) < 1e-6
    # the exact mean sits about 0.012 rad from model 1: cosine 1 - 7e-5, far outside rounding
    assert _cosine(exact, models[0]) < _cosine(seed, models[0]) - 3e-5

    order = [1, 2, 0]
    reordered = [models[i] for i in order]
    reordered_weights = [weights[i] for i in order]
    seed_reordered = merge_group("barycenter_seed", reordered, reordered_weights)
    assert _cosine(seed_reordered, models[1]) > 1 - 1e-6
    assert _angle(seed_reordered, seed) > 0.01
    assert _angle(merge_group("barycenter", reordered, reordered_weights), exact) < 1e-6


def test_well_separated_models_follow_the_seed_loop_and_reach_the_karcher_mean() -> None:
    models = _well_separated()
    cosines = [_cosine(models[i], models[j]) for i in range(3) for j in range(i + 1, 3)]
    assert all(0.3 < c < 0.7 for c in cosines), cosines
    weights = [0.2, 0.5, 0.3]
    seed = merge_group("barycenter_seed", models, weights)
    reference = _reference_seed(models, weights)
    assert float((seed.double() - reference).norm() / reference.norm()) < 1e-5
    assert _angle(seed, _reference_karcher(models, weights)) < 1e-4
    # with one step the loop has not converged, in both implementations alike
    one_step = merge_group("barycenter_seed", models, weights, iterations=1)
    assert _angle(one_step, _reference_karcher(models, weights)) > 1e-3
    assert float((one_step.double() - _reference_seed(models, weights, 1)).norm() / reference.norm()) < 1e-5


def test_weights_are_divided_by_their_sum() -> None:
    models = _well_separated()
    assert torch.allclose(
        merge_group("barycenter_seed", models, [2.0, 5.0, 3.0]),
        merge_group("barycenter_seed", models, [0.2, 0.5, 0.3]),
        rtol=1e-6,
        atol=1e-6,
    )


@pytest.mark.parametrize("which", [0, 1, 2])
def test_one_hot_weights_return_that_model(which: int) -> None:
    for models in (_near_parallel(), _well_separated()):
        weights = [1.0 if i == which else 0.0 for i in range(3)]
        assert torch.equal(merge_group("barycenter_seed", models, weights), models[which])


@pytest.mark.parametrize("t", [0.25, 0.7])
def test_two_models_give_slerp(t: float) -> None:
    models = _well_separated()[:2]
    merged = merge_group("barycenter_seed", models, [1.0 - t, t])
    expected = geometry.slerp(models[0].double(), models[1].double(), t)
    assert float((merged.double() - expected).norm() / expected.norm()) < 1e-6


def test_task_vectors_are_merged_and_added_to_the_base() -> None:
    models = _well_separated()
    base = 0.5 * models[0]
    merged = merge_group(
        "barycenter_seed", models[1:], [0.4, 0.6], base, space="task_vectors", **{"lambda": 0.5}
    )
    expected = base + 0.5 * merge_group("barycenter_seed", [m - base for m in models[1:]], [0.4, 0.6])
    assert torch.allclose(merged, expected, rtol=0, atol=1e-6)


def test_dot_threshold_1_ignores_no_model_and_gives_the_karcher_mean_on_near_parallel_models() -> None:
    models = _near_parallel()
    merged = merge_group("barycenter_seed", models, [1.0] * 3, dot_threshold=1.0, threshold=1e-9)
    assert _angle(merged, _reference_karcher(models, [1.0] * 3)) < 1e-6


def test_antipodal_inputs_are_a_one_line_merge_error() -> None:
    x = _well_separated()[0]
    for other in (-x, -x + 0.01 * torch.ones_like(x)):  # exactly and nearly (cosine < -0.9995)
        with pytest.raises(MergeError, match="antipodal") as caught:
            merge_group("barycenter_seed", [x, other], [0.5, 0.5])
        assert "\n" not in str(caught.value)


def test_registered_with_the_seeds_parameters_and_nonnegative_weights() -> None:
    method = get_method("barycenter_seed")
    assert METHODS["barycenter_seed"] is method and method.space == "either"
    assert [(p.name, p.default) for p in method.params] == [
        ("iterations", 20),
        ("threshold", 1e-5),
        ("dot_threshold", 0.9995),
    ]
    assert "mehdiamlal/m3sb" in method.reference and "published" in method.summary
    with pytest.raises(ConfigError, match="non-negative"):
        merge_group("barycenter_seed", _well_separated(), [1.0, -0.5, 0.5])
    with pytest.raises(ConfigError, match="dot_threshold"):
        merge_group("barycenter_seed", _well_separated(), dot_threshold=1.5)
