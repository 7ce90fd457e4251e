"""Facts about the sphere maths: SLERP and the weighted Karcher mean."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from m3sb import geometry
from m3sb.errors import MergeError

SETTINGS = settings(max_examples=40, deadline=None)


def _tensors(seed: int, count: int, size: int, spread: float) -> list[torch.Tensor]:
    """``count`` float64 vectors near a common random direction, with varied norms."""
    generator = torch.Generator().manual_seed(seed)
    center = torch.randn(size, generator=generator, dtype=torch.float64)
    return [
        (center + spread * torch.randn(size, generator=generator, dtype=torch.float64))
        * (0.5 + torch.rand((), generator=generator, dtype=torch.float64))
        for _ in range(count)
    ]


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm()


def _reference_slerp(x0: torch.Tensor, x1: torch.Tensor, t: float) -> torch.Tensor:
    """Textbook SLERP of the directions in float64, norm interpolated linearly."""
    u0, u1 = _unit(x0.double()), _unit(x1.double())
    theta = torch.arccos(torch.clamp(u0 @ u1, -1, 1))
    direction = (torch.sin((1 - t) * theta) * u0 + torch.sin(t * theta) * u1) / torch.sin(theta)
    return direction * ((1 - t) * x0.double().norm() + t * x1.double().norm())


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@SETTINGS
@given(seed=st.integers(0, 10_000), t=st.floats(0.01, 0.99), spread=st.floats(0.05, 3.0))
def test_slerp_matches_textbook_formula(seed: int, t: float, spread: float) -> None:
    x0, x1 = _tensors(seed, 2, 257, spread)
    assert _relative_error(geometry.slerp(x0, x1, t), _reference_slerp(x0, x1, t)) < 1e-10


def test_slerp_endpoints_are_exact() -> None:
    x0, x1 = (t.float() for t in _tensors(1, 2, 100, 0.5))
    assert torch.equal(geometry.slerp(x0, x1, 0.0), x0)
    assert torch.equal(geometry.slerp(x0, x1, 1.0), x1)


def test_slerp_at_right_angle_follows_the_quarter_circle() -> None:
    x0 = torch.tensor([2.0, 0.0, 0.0], dtype=torch.float64)
    x1 = torch.tensor([0.0, 4.0, 0.0], dtype=torch.float64)
    middle = geometry.slerp(x0, x1, 0.5)
    expected = torch.tensor([1.0, 1.0, 0.0], dtype=torch.float64) / math.sqrt(2) * 3.0
    assert torch.allclose(middle, expected, atol=1e-12)


def test_slerp_of_nearly_identical_tensors_is_linear_and_finite() -> None:
    x0 = torch.linspace(-1, 1, 1000, dtype=torch.float64)
    x1 = x0 + 1e-12 * torch.linspace(1, -1, 1000, dtype=torch.float64)
    middle = geometry.slerp(x0, x1, 0.3)
    assert torch.isfinite(middle).all()
    assert torch.allclose(middle, 0.7 * x0 + 0.3 * x1, rtol=0, atol=1e-14)
    assert torch.equal(geometry.slerp(x0, x0.clone(), 0.5), x0)


def test_slerp_of_antipodal_tensors_is_an_error() -> None:
    x0 = torch.tensor([1.0, 2.0, 3.0])
    with pytest.raises(MergeError, match="antipodal"):
        geometry.slerp(x0, -x0, 0.5)


def test_slerp_with_a_zero_tensor_interpolates_linearly() -> None:
    x0 = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    assert torch.allclose(geometry.slerp(x0, torch.zeros(3, dtype=torch.float64), 0.25), 0.75 * x0)


@SETTINGS
@given(seed=st.integers(0, 10_000), w=st.floats(0.01, 0.99), spread=st.floats(0.01, 2.0))
def test_two_model_barycenter_equals_slerp_at_second_weight(seed: int, w: float, spread: float) -> None:
    x0, x1 = _tensors(seed, 2, 300, spread)
    barycenter = geometry.karcher_mean([x0, x1], [1 - w, w])
    assert _relative_error(barycenter, _reference_slerp(x0, x1, w)) < 1e-9


@SETTINGS
@given(seed=st.integers(0, 10_000), count=st.integers(2, 6), hot=st.integers(0, 5))
def test_one_hot_weights_return_that_model_exactly(seed: int, count: int, hot: int) -> None:
    tensors = [t.float() for t in _tensors(seed, count, 64, 0.3)]
    weights = [0.0] * count
    weights[hot % count] = 2.5
    assert torch.equal(geometry.karcher_mean(tensors, weights), tensors[hot % count])


@SETTINGS
@given(seed=st.integers(0, 10_000), count=st.integers(3, 6), spread=st.floats(0.01, 1.0))
def test_barycenter_does_not_depend_on_model_order(seed: int, count: int, spread: float) -> None:
    tensors = _tensors(seed, count, 200, spread)
    weights = [float(i + 1) for i in range(count)]
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed)).tolist()
    forward = geometry.karcher_mean(tensors, weights)
    shuffled = geometry.karcher_mean([tensors[i] for i in order], [weights[i] for i in order])
    assert _relative_error(shuffled, forward) < 1e-10


@SETTINGS
@given(seed=st.integers(0, 10_000), count=st.integers(2, 6), spread=st.floats(0.01, 1.5))
def test_weighted_log_maps_cancel_at_the_barycenter(seed: int, count: int, spread: float) -> None:
    """The first-order condition of the Karcher mean, to within the stopping tolerance."""
    tensors = _tensors(seed, count, 150, spread)
    weights = [float(w) for w in torch.rand(count, generator=torch.Generator().manual_seed(seed)) + 0.1]
    for tol in (1e-7, 1e-13):
        mean_direction = _unit(geometry.karcher_mean(tensors, weights, tol=tol))
        logs = [geometry.log_map(mean_direction, _unit(x)) for x in tensors]
        total = sum(w * log for w, log in zip(weights, logs, strict=True))
        assert float(total.norm()) / sum(weights) < max(tol, 1e-12)


@SETTINGS
@given(seed=st.integers(0, 10_000), count=st.integers(2, 5))
def test_barycenter_norm_is_the_weighted_mean_norm(seed: int, count: int) -> None:
    tensors = _tensors(seed, count, 100, 0.5)
    weights = [float(i + 1) for i in range(count)]
    expected = sum(w * float(x.norm()) for w, x in zip(weights, tensors, strict=True)) / sum(weights)
    assert math.isclose(float(geometry.karcher_mean(tensors, weights).norm()), expected, rel_tol=1e-12)


def test_near_parallel_finetunes_do_not_collapse_onto_the_first_model() -> None:
    """The seed zeroed tangents when cos > 0.9995 and so returned model 0; the mean must sit in the middle."""
    generator = torch.Generator().manual_seed(0)
    center = torch.randn(10_000, generator=generator)
    tensors = [center + 0.01 * torch.randn(10_000, generator=generator) for _ in range(3)]
    cosines = [float(_unit(a) @ _unit(b)) for a, b in [(tensors[0], tensors[1]), (tensors[0], tensors[2])]]
    assert min(cosines) > 0.9995
    merged = geometry.karcher_mean(tensors, [1.0, 1.0, 1.0])
    # The sphere is nearly flat there: the mean direction is the normalised average.
    expected = _unit(sum(tensors)) * (sum(float(x.norm()) for x in tensors) / 3)
    assert _relative_error(merged, expected) < 1e-6
    assert _relative_error(merged, tensors[0]) > 1000 * _relative_error(merged, expected)


def test_karcher_mean_of_symmetric_points_is_their_axis() -> None:
    """Three points at 60 degrees from the north pole, 120 degrees apart: the mean is the pole."""
    polar = math.radians(60)
    points = [
        torch.tensor(
            [math.sin(polar) * math.cos(a), math.sin(polar) * math.sin(a), math.cos(polar)],
            dtype=torch.float64,
        )
        * scale
        for a, scale in zip((0.0, 2 * math.pi / 3, 4 * math.pi / 3), (1.0, 2.0, 3.0), strict=True)
    ]
    merged = geometry.karcher_mean(points, [1.0, 1.0, 1.0])
    assert torch.allclose(merged, torch.tensor([0.0, 0.0, 2.0], dtype=torch.float64), atol=1e-12)


def test_karcher_mean_matches_an_independent_tensor_space_iteration() -> None:
    """The Gram-space iteration must agree with plain gradient steps on the full tensors."""
    tensors = _tensors(7, 4, 500, 1.0)
    weights = [0.1, 0.2, 0.3, 0.4]
    units = [_unit(x) for x in tensors]
    mean = _unit(sum(w * u for w, u in zip(weights, units, strict=True)))
    for _ in range(200):
        step = sum(w * geometry.log_map(mean, u) for w, u in zip(weights, units, strict=True))
        size = float(step.norm())
        mean = _unit(math.cos(size) * mean + math.sin(size) * step / size)
    expected = mean * sum(w * float(x.norm()) for w, x in zip(weights, tensors, strict=True))
    assert _relative_error(geometry.karcher_mean(tensors, weights, tol=1e-13), expected) < 1e-10


def test_karcher_mean_ignores_zero_norm_directions_but_counts_their_norm() -> None:
    x = torch.tensor([3.0, 4.0], dtype=torch.float64)
    merged = geometry.karcher_mean([x, torch.zeros(2, dtype=torch.float64)], [1.0, 1.0])
    assert torch.allclose(merged, x / 2)


def test_karcher_mean_rejects_negative_or_all_zero_weights() -> None:
    tensors = _tensors(0, 2, 10, 0.1)
    with pytest.raises(MergeError, match="non-negative"):
        geometry.karcher_mean(tensors, [1.0, -0.5])
    with pytest.raises(MergeError, match="sum to zero"):
        geometry.karcher_mean(tensors, [0.0, 0.0])


def test_karcher_mean_in_float32_is_as_accurate_as_float32_allows() -> None:
    tensors64 = _tensors(3, 3, 100_000, 0.02)
    merged32 = geometry.karcher_mean([x.float() for x in tensors64], [1.0, 2.0, 3.0])
    merged64 = geometry.karcher_mean(tensors64, [1.0, 2.0, 3.0])
    assert merged32.dtype == torch.float32
    assert _relative_error(merged32, merged64) < 1e-6


def test_gram_matrix_is_exact_in_float64_for_large_float32_inputs() -> None:
    generator = torch.Generator().manual_seed(0)
    tensors = [torch.randn(3_000_001, generator=generator) for _ in range(2)]
    gram = geometry.gram_matrix(tensors)
    expected = torch.stack([t.double() for t in tensors]) @ torch.stack([t.double() for t in tensors]).T
    # float32 accumulation would be off by ~0.1 here; float64 agrees to rounding of the sum order
    assert torch.allclose(gram, expected, rtol=1e-12, atol=1e-12 * float(expected.diagonal().max()))
