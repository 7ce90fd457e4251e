"""Small primitives that TIES, DARE and Model Breadcrumbs are built from.

Each takes a task vector (or several) and returns a mask or a merged tensor. Masks keep
elements by magnitude rank through a selection of the k-th largest magnitude (linear
time, unlike a full sort); elements tied with that threshold are all kept. The
element-wise merges run over slices (65,536 elements on the CPU, 4M on a GPU), so their
temporaries stay small, and in cache on the CPU, whatever the size of the tensor.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence

import torch

from m3sb.methods.registry import MIN_WEIGHT_SUM

_CPU_SLICE = 1 << 16  # 256 KB of float32: a slice's temporaries stay in cache (25% faster than 1 << 22 here)
_DEVICE_SLICE = 1 << 22  # on a GPU, fewer and larger kernels


def _slices(numel: int, device: torch.device) -> Iterator[slice]:
    size = _CPU_SLICE if device.type == "cpu" else _DEVICE_SLICE
    for start in range(0, numel, size):
        yield slice(start, min(start + size, numel))


def kth_largest_magnitude(tensor: torch.Tensor, k: int) -> float:
    """The k-th largest absolute value (1-based) of a tensor."""
    magnitude = tensor.detach().abs().reshape(-1)
    position = magnitude.numel() - k
    if magnitude.device.type == "cpu" and magnitude.dtype in (torch.float32, torch.float64):
        values = magnitude.numpy()
        values.partition(position)  # in place: no index array, unlike torch.kthvalue
        return float(values[position])
    return float(magnitude.float().kthvalue(position + 1).values)


def kept_count(density: float, numel: int) -> int | None:
    """How many elements a magnitude mask of ``density`` keeps by rank; None when it keeps all
    (density >= 1) and 0 when none."""
    if density >= 1.0 or numel == 0:
        return None
    if density <= 0.0:
        return 0
    return max(1, int(density * numel))


def magnitude_threshold(task_vector: torch.Tensor, density: float) -> float:
    """The magnitude from which a ``density`` mask keeps elements (0: all, inf: none)."""
    keep = kept_count(density, task_vector.numel())
    if keep is None:
        return 0.0
    return math.inf if keep == 0 else kth_largest_magnitude(task_vector, keep)


def magnitude_mask(task_vector: torch.Tensor, density: float, threshold: float | None = None) -> torch.Tensor:
    """Boolean mask keeping the ``density`` fraction of largest-magnitude elements (at least one);
    with ``threshold`` (what :func:`magnitude_threshold` gives for the whole tensor), the
    mask of a block of its rows."""
    if threshold is None:
        if kept_count(density, task_vector.numel()) is None:
            return torch.ones_like(task_vector, dtype=torch.bool)
        threshold = magnitude_threshold(task_vector, density)
    return task_vector.abs() >= threshold


_HIGH_BITS = 16  # a float32's bits are selected in two rounds of 16


def streaming_kth_largest_magnitude(blocks: Callable[[], Iterable[torch.Tensor]], k: int) -> float:
    """The k-th largest absolute value (1-based) of the float32 elements that ``blocks()``
    yields, found exactly in two passes over them with histograms of their bit patterns (a
    non-negative float32 orders as its bits read as an integer): the upper 16 bits first,
    then the lower 16 of the elements in the bucket that holds the k-th. Memory: two
    histograms of 65,536 counts, whatever the number of elements."""
    buckets = 1 << _HIGH_BITS
    high = torch.zeros(buckets, dtype=torch.int64)
    for block in blocks():
        high += torch.bincount(_magnitude_bits(block) >> _HIGH_BITS, minlength=buckets).cpu()
    bucket, above = _bucket_of_kth(high, k)
    low = torch.zeros(buckets, dtype=torch.int64)
    for block in blocks():
        bits = _magnitude_bits(block)
        inside = bits[(bits >> _HIGH_BITS) == bucket]
        low += torch.bincount(inside & (buckets - 1), minlength=buckets).cpu()
    offset, _ = _bucket_of_kth(low, k - above)
    value = torch.tensor([(bucket << _HIGH_BITS) | offset], dtype=torch.int32).view(torch.float32)
    return float(value[0])


def _magnitude_bits(block: torch.Tensor) -> torch.Tensor:
    """The bit patterns of a float32 block's absolute values, as non-negative int32 (flat)."""
    if block.dtype != torch.float32:
        raise TypeError(f"streaming selection reads float32 blocks, got {block.dtype}")
    return block.detach().abs().reshape(-1).view(torch.int32)


def _bucket_of_kth(counts: torch.Tensor, k: int) -> tuple[int, int]:
    """The bucket holding the k-th largest element of a histogram, and how many lie above it."""
    from_top = torch.cumsum(counts.flip(0), dim=0)
    index = int(torch.searchsorted(from_top, torch.tensor([k]), side="left")[0])
    if index >= len(counts):
        raise ValueError(f"asked for element {k} of {int(from_top[-1])}")
    above = int(from_top[index - 1]) if index > 0 else 0
    return len(counts) - 1 - index, above


def outlier_mask(task_vector: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """Mask dropping the ``gamma`` fraction of largest magnitudes, then the smallest, to keep ``density``."""
    numel = task_vector.numel()
    if density >= 1.0 or numel == 0:
        return torch.ones_like(task_vector, dtype=torch.bool)
    if density <= 0.0:
        return torch.zeros_like(task_vector, dtype=torch.bool)
    keep = max(1, int(density * numel))
    drop_top = int(gamma * numel)
    drop_bottom = max(0, numel - keep - drop_top)
    high = kth_largest_magnitude(task_vector, numel - drop_bottom - keep + 1)
    low = kth_largest_magnitude(task_vector, numel - drop_bottom)
    magnitude = task_vector.abs()
    return (magnitude >= low) & (magnitude <= high)


def random_mask(
    shape: torch.Size, density: float, generator: torch.Generator, device: torch.device
) -> torch.Tensor:
    """Mask keeping each element with probability ``density``, drawn on the CPU for reproducibility."""
    return (torch.rand(shape, generator=generator) < density).to(device)


def _elected_sign(
    task_vectors: Sequence[torch.Tensor], masks: Sequence[torch.Tensor | None], weights: Sequence[float]
) -> torch.Tensor:
    """Per element, the sign (+1 or -1) of the sum of the kept, weighted entries; ties go to +1."""
    total = torch.zeros_like(task_vectors[0])
    for task_vector, mask, weight in zip(task_vectors, masks, weights, strict=True):
        total.add_(task_vector if mask is None else torch.where(mask, task_vector, 0.0), alpha=weight)
    return torch.where(total >= 0, 1.0, -1.0).to(total.dtype)


def disjoint_merge(
    task_vectors: Sequence[torch.Tensor],
    masks: Sequence[torch.Tensor | None],
    weights: Sequence[float],
    normalize: bool,
) -> torch.Tensor:
    """Sum the kept, weighted entries whose sign agrees with the elected one (TIES).

    The elected sign of an element is that of the sum of its kept, weighted entries.
    With ``normalize``, each element is divided by the sum of the weights of the models
    that agree there (1 where none does), as in mergekit. Zero entries and zero-weight
    models take no side.
    """
    flat = [task_vector.reshape(-1) for task_vector in task_vectors]
    flat_masks = [None if mask is None else mask.reshape(-1) for mask in masks]
    merged = torch.empty_like(flat[0])
    for part in _slices(merged.numel(), merged.device):
        vectors = [vector[part] for vector in flat]
        kept = [None if mask is None else mask[part] for mask in flat_masks]
        sign = _elected_sign(vectors, kept, weights)
        total = torch.zeros_like(sign)
        agreeing_weight = torch.zeros_like(sign)
        for vector, mask, weight in zip(vectors, kept, weights, strict=True):
            if weight == 0.0:
                continue
            agrees = torch.sign(vector) == (sign if weight > 0 else -sign)
            if mask is not None:
                agrees &= mask
            total.add_(torch.where(agrees, vector, 0.0), alpha=weight)
            agreeing_weight.add_(agrees.to(sign.dtype), alpha=weight)
        if normalize:
            agreeing_weight[agreeing_weight == 0] = 1.0
            total.div_(agreeing_weight)
        merged[part] = total
    return merged.reshape(task_vectors[0].shape)


def weighted_sum(
    task_vectors: Sequence[torch.Tensor], weights: Sequence[float], normalize: bool
) -> torch.Tensor:
    """``sum_i w_i * tau_i``, divided by ``sum_i w_i`` when ``normalize`` (and that sum is not 0)."""
    total = float(sum(weights))
    divisor = total if normalize and abs(total) >= MIN_WEIGHT_SUM else 1.0
    merged = torch.zeros_like(task_vectors[0])
    for task_vector, weight in zip(task_vectors, weights, strict=True):
        merged.add_(task_vector, alpha=weight / divisor)
    return merged
