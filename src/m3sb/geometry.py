"""Sphere maths on flat tensors: Gram matrices, SLERP, the weighted Karcher mean, the seed's barycenter.

Every spherical merge of N tensors returns a linear combination of those tensors: the
SLERP of two points and the Karcher mean of many both lie in the span of their inputs.
So the maths here runs in two steps:

1. one pass over the data computes the N x N Gram matrix in float64 (chunked, so it
   costs a few MB whatever the tensor size);
2. the geodesic computations run on that small matrix in float64, which yields one
   coefficient per input; one more pass forms ``sum_j coefficient_j * tensor_j``.

Besides being fast (two passes over the data, however many Karcher iterations), this is
precise: angles between near-parallel fine-tunes are resolved from float64 inner
products instead of float32 element-wise arithmetic.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from m3sb.errors import MergeError

# Below this angle, sin(k x) / sin(x) and x / sin(x) use their Taylor series.
_SMALL_ANGLE = 1e-4
# Points whose cosine is closer than this to -1 are treated as antipodal.
_ANTIPODAL_GAP = 1e-12
_GRAM_CHUNK_ELEMENTS = 1 << 20  # fastest here: blocks stay in cache


def gram_matrix(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Return the float64 Gram matrix ``K[i, j] = <tensor_i, tensor_j>`` of same-sized tensors."""
    accumulator = GramAccumulator(len(tensors), tensors[0].numel(), tensors[0].device)
    accumulator.add(tensors)
    return accumulator.result()


class GramAccumulator:
    """The Gram matrix of ``count`` flat vectors of ``numel`` elements each, fed as consecutive
    pieces (blocks of rows, say): float64 products summed over fixed chunks of the flat
    index, so that any split into pieces sums exactly what the whole vectors do."""

    def __init__(self, count: int, numel: int, device: torch.device) -> None:
        self.gram = torch.zeros(count, count, dtype=torch.float64, device=device)
        self.chunk = max(1, _GRAM_CHUNK_ELEMENTS // count)
        self.buffer = torch.empty(count, max(1, min(self.chunk, numel)), dtype=torch.float64, device=device)
        self.filled = 0  # elements of the current chunk already in the buffer

    def add(self, pieces: Sequence[torch.Tensor]) -> None:
        """Feed the next piece of every vector (same length each)."""
        flats = [piece.reshape(-1) for piece in pieces]
        numel, start = flats[0].numel(), 0
        while start < numel:
            take = min(self.buffer.shape[1] - self.filled, numel - start)
            for row, flat in enumerate(flats):
                self.buffer[row, self.filled : self.filled + take].copy_(flat[start : start + take])
            self.filled += take
            start += take
            if self.filled == self.buffer.shape[1]:
                self._flush()

    def result(self) -> torch.Tensor:
        """The Gram matrix of everything fed (on the CPU)."""
        if self.filled:
            self._flush()
        return self.gram.cpu()

    def _flush(self) -> None:
        view = self.buffer[:, : self.filled]
        self.gram.addmm_(view, view.T)
        self.filled = 0


def combine(tensors: Sequence[torch.Tensor], coefficients: Sequence[float]) -> torch.Tensor:
    """Return ``sum_j coefficients[j] * tensors[j]`` in the tensors' dtype."""
    terms = [(t, float(c)) for t, c in zip(tensors, coefficients, strict=True) if c != 0.0]
    if not terms:
        return torch.zeros_like(tensors[0])
    result = torch.mul(terms[0][0], terms[0][1])
    for tensor, coefficient in terms[1:]:
        result.add_(tensor, alpha=coefficient)
    return result


def _sin_ratio(k: float, theta: float) -> float:
    """Return sin(k * theta) / sin(theta), continuous at theta = 0 (where it is k)."""
    if theta < _SMALL_ANGLE:
        return k * (1.0 + (1.0 - k * k) * theta * theta / 6.0)
    return math.sin(k * theta) / math.sin(theta)


def _theta_over_sin(theta: float) -> float:
    """Return theta / sin(theta), continuous at theta = 0 (where it is 1)."""
    if theta < _SMALL_ANGLE:
        return 1.0 + theta * theta / 6.0
    return theta / math.sin(theta)


def _angle(cosine: float) -> float:
    """Return the angle in [0, pi] whose cosine is given, stable near 0 and pi."""
    cosine = min(1.0, max(-1.0, cosine))
    return math.atan2(math.sqrt(max(0.0, (1.0 - cosine) * (1.0 + cosine))), cosine)


def slerp_coefficients(gram: torch.Tensor, t: float) -> tuple[float, float]:
    """Coefficients (a, b) such that ``a * x0 + b * x1`` is the SLERP of x0 and x1 at ``t``.

    The directions move along the great circle; the norm moves linearly from ||x0|| to
    ||x1||. ``gram`` is the 2 x 2 Gram matrix of x0 and x1. A zero tensor has no
    direction, so SLERP with one falls back to linear interpolation.
    """
    norm0, norm1 = math.sqrt(float(gram[0, 0])), math.sqrt(float(gram[1, 1]))
    if norm0 == 0.0 or norm1 == 0.0:
        return 1.0 - t, t
    cosine = float(gram[0, 1]) / (norm0 * norm1)
    if 1.0 + cosine < _ANTIPODAL_GAP:
        raise MergeError(
            "SLERP between antipodal tensors (cosine -1) is undefined: every great circle joins them"
        )
    theta = _angle(cosine)
    norm_t = (1.0 - t) * norm0 + t * norm1
    return (
        norm_t * _sin_ratio(1.0 - t, theta) / norm0,
        norm_t * _sin_ratio(t, theta) / norm1,
    )


def slerp(x0: torch.Tensor, x1: torch.Tensor, t: float) -> torch.Tensor:
    """Spherical interpolation of two whole tensors; norms interpolated linearly."""
    if t == 0.0:
        return x0.clone()
    if t == 1.0:
        return x1.clone()
    return combine((x0, x1), slerp_coefficients(gram_matrix((x0, x1)), t))


def normalized_weights(weights: Sequence[float]) -> list[float]:
    """Return non-negative weights divided by their sum; reject negative or all-zero ones."""
    if any(weight < 0 for weight in weights):
        raise MergeError(f"weights must be non-negative for a spherical mean, got {list(weights)}")
    total = float(sum(weights))
    if total <= 0.0:
        raise MergeError(f"weights sum to zero: {list(weights)}")
    return [float(weight) / total for weight in weights]


def karcher_coefficients(
    gram: torch.Tensor,
    weights: Sequence[float],
    tol: float = 1e-7,
    max_iter: int = 100,
) -> tuple[list[float], int]:
    """Coefficients of the weighted Karcher mean, and the number of gradient steps taken.

    The mean direction minimises ``sum_i w_i * angle(m, u_i)^2`` over unit vectors m,
    where ``u_i`` are the inputs' directions; it is scaled by the weighted mean norm.
    Riemannian gradient steps start from the normalised weighted mean of the ``u_i``
    and stop after the step whose gradient norm (radians) is below ``tol``. Zero-weight inputs
    do not take part; zero-norm inputs add their (zero) norm but no direction.
    """
    weight = normalized_weights(weights)
    count = len(weight)
    norms = [math.sqrt(max(0.0, float(gram[i, i]))) for i in range(count)]
    scale = sum(w * n for w, n in zip(weight, norms, strict=True))
    points = [i for i in range(count) if weight[i] > 0.0 and norms[i] > 0.0]
    coefficients = [0.0] * count
    if not points:
        return coefficients, 0
    if len(points) == 1:
        only = points[0]
        coefficients[only] = scale / norms[only]
        return coefficients, 0

    index = torch.tensor(points)
    point_norms = torch.tensor([norms[i] for i in points], dtype=torch.float64)
    unit_gram = gram[index][:, index] / torch.outer(point_norms, point_norms)
    w = torch.tensor([weight[i] for i in points], dtype=torch.float64)
    w = w / w.sum()

    def unit(vector: torch.Tensor) -> torch.Tensor | None:
        squared = float(vector @ unit_gram @ vector)
        return vector / math.sqrt(squared) if squared > 1e-24 else None

    mean = unit(w.clone())
    if mean is None:  # the directions cancel out; start from the heaviest point
        mean = torch.zeros_like(w)
        mean[int(torch.argmax(w))] = 1.0
    steps = 0
    while steps < max_iter:
        steps += 1
        cosines = (unit_gram @ mean).clamp(-1.0, 1.0)
        if float(cosines.min()) < -1.0 + _ANTIPODAL_GAP:
            raise MergeError("Karcher mean is undefined: an input is antipodal to the mean")
        factors = torch.tensor(
            [w_i * _theta_over_sin(_angle(c)) for w_i, c in zip(w.tolist(), cosines.tolist(), strict=True)],
            dtype=torch.float64,
        )
        # Riemannian gradient: sum_i w_i * theta_i / sin(theta_i) * (u_i - cos_i * m).
        gradient = factors - (factors @ cosines) * mean
        gradient_norm = math.sqrt(max(0.0, float(gradient @ unit_gram @ gradient)))
        if gradient_norm == 0.0:
            break
        # Steps cost O(N^2) here, so the last small step is taken too rather than skipped.
        stepped = math.cos(gradient_norm) * mean + (math.sin(gradient_norm) / gradient_norm) * gradient
        mean = unit(stepped)
        if mean is None:
            raise MergeError("Karcher mean iteration left the sphere (degenerate inputs)")
        if gradient_norm < tol:
            break
    for slot, i in enumerate(points):
        coefficients[i] = scale * float(mean[slot]) / norms[i]
    return coefficients, steps


def seed_barycenter_coefficients(
    gram: torch.Tensor,
    weights: Sequence[float],
    iterations: int = 20,
    threshold: float = 1e-5,
    dot_threshold: float = 0.9995,
) -> tuple[list[float], int]:
    """Coefficients of the M3SB seed's published barycenter, and the number of steps taken.

    The seed's loop (mehdiamlal/m3sb ``geometry.barycenter``) on the directions ``u_i``:
    start at the first direction, ``b = u_1``; each step maps every ``u_i`` to the tangent
    space at ``b`` (zero where ``cos(u_i, b) > dot_threshold``, else the log map) and moves
    ``b`` along the geodesic by ``v = sum_i w_i * tangent_i``; it stops after the step whose
    angle ``|v|`` (the angle between successive estimates) is below ``threshold``, or after
    ``iterations`` steps. The direction is scaled by the weighted mean norm.

    Where no input is within ``arccos(dot_threshold)`` of the estimate this is the
    Karcher iteration of :func:`karcher_coefficients` from another start; inputs nearer
    than that are ignored, so near-parallel inputs stay at the first one. ``weights`` are
    divided by their sum. The loop starts at the first input with a positive weight and a
    non-zero norm (input 1 in every seed config); zero-norm inputs add their norm (zero)
    and no tangent, their weight still counting, as in the seed. An input within
    ``arccos(-dot_threshold)`` of antipodal to the estimate, where the seed drew a random
    tangent, is a MergeError.
    """
    weight = normalized_weights(weights)
    count = len(weight)
    norms = [math.sqrt(max(0.0, float(gram[i, i]))) for i in range(count)]
    scale = sum(w * n for w, n in zip(weight, norms, strict=True))
    points = [i for i in range(count) if weight[i] > 0.0 and norms[i] > 0.0]
    coefficients = [0.0] * count
    if not points:
        return coefficients, 0
    if len(points) == 1:
        only = points[0]
        coefficients[only] = scale / norms[only]
        return coefficients, 0

    index = torch.tensor(points)
    point_norms = torch.tensor([norms[i] for i in points], dtype=torch.float64)
    unit_gram = gram[index][:, index] / torch.outer(point_norms, point_norms)
    w = [weight[i] for i in points]  # not renormalised over the points: zero norms shorten steps
    estimate = torch.zeros(len(points), dtype=torch.float64)
    estimate[0] = 1.0
    steps = 0
    while steps < iterations:
        steps += 1
        cosines = (unit_gram @ estimate).clamp(-1.0, 1.0).tolist()
        if min(cosines) < -dot_threshold or min(cosines) < -1.0 + _ANTIPODAL_GAP:
            raise MergeError(
                f"the seed's barycenter is undefined: an input is antipodal to the estimate "
                f"(cosine {min(cosines):.6f} < -dot_threshold), where the seed drew a random direction"
            )
        # The log map of u_i at b is theta_i / sin(theta_i) * (u_i - cos_i * b), or zero.
        factors = torch.tensor(
            [
                w_i * _theta_over_sin(_angle(c)) if c <= dot_threshold else 0.0
                for w_i, c in zip(w, cosines, strict=True)
            ],
            dtype=torch.float64,
        )
        step = factors - float(factors @ torch.tensor(cosines, dtype=torch.float64)) * estimate
        length = math.sqrt(max(0.0, float(step @ unit_gram @ step)))
        if length == 0.0:
            break
        moved = math.cos(length) * estimate + (math.sin(length) / length) * step
        estimate = moved / math.sqrt(float(moved @ unit_gram @ moved))  # unit, up to rounding
        if length < threshold:
            break
    for slot, i in enumerate(points):
        coefficients[i] = scale * float(estimate[slot]) / norms[i]
    return coefficients, steps


def karcher_mean(
    tensors: Sequence[torch.Tensor],
    weights: Sequence[float],
    tol: float = 1e-7,
    max_iter: int = 100,
    gram: torch.Tensor | None = None,
) -> torch.Tensor:
    """Weighted spherical barycenter of tensors (Karcher mean of directions, mean norm);
    ``gram``: the Gram matrix of the whole tensors when these are blocks of their rows."""
    weight = normalized_weights(weights)
    active = [i for i, w in enumerate(weight) if w > 0.0]
    if len(active) == 1:
        return tensors[active[0]].clone()
    gram = gram_matrix(tensors) if gram is None else gram
    coefficients, _ = karcher_coefficients(gram, weight, tol, max_iter)
    return combine(tensors, coefficients)


def log_map(base_point: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Tangent vector at unit ``base_point`` pointing to unit ``target``, of length their angle."""
    base64, target64 = base_point.double().reshape(-1), target.double().reshape(-1)
    cosine = float(base64 @ target64)
    orthogonal = target64 - cosine * base64
    return (_theta_over_sin(_angle(cosine)) * orthogonal).reshape(base_point.shape)
