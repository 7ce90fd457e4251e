"""Small primitives that TIES, DARE and Model Breadcrumbs are built from.

Each takes a task vector (or several) and returns a mask or a merged tensor. Masks keep
elements by magnitude rank through a selection of the k-th largest magnitude (linear
time, unlike a full sort); elements tied with that threshold are all kept. The
element-wise merges run over slices (262,144 elements on the CPU, 4M on a GPU), so their
temporaries stay small, and in cache on the CPU, whatever the size of the tensor.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence

import torch

from m3sb.methods.registry import MIN_WEIGHT_SUM

_CPU_SLICE = 1 << 18  # 1 MB of float32: TIES's temporaries stay in cache (20% faster than 1 << 16 here)
_DEVICE_SLICE = 1 << 22  # on a GPU, fewer and larger kernels


def _slices(numel: int, device: torch.device) -> Iterator[slice]:
    size = _CPU_SLICE if device.type == "cpu" else _DEVICE_SLICE
    for start in range(0, numel, size):
        yield slice(start, min(start + size, numel))


def kth_largest_magnitude(tensor: torch.Tensor, k: int) -> float:
    """The k-th largest absolute value (1-based) of a tensor."""
    return _kth_largest_in_place(tensor.detach().abs().reshape(-1), k)


_SAMPLE = 1 << 14  # elements sampled to look for a value tied around the k-th


def _kth_largest_in_place(values: torch.Tensor, k: int) -> float:
    """The k-th largest of a flat tensor's values (1-based), reordering them on the CPU."""
    tied = _tied_kth_largest(values, k)
    if tied is not None:
        return tied
    position = values.numel() - k
    if values.device.type == "cpu" and values.dtype in (torch.float32, torch.float64):
        array = values.numpy()
        array.partition(position)  # in place: no index array, unlike torch.kthvalue
        return float(array[position])
    return float(values.float().kthvalue(position + 1).values)


def _tied_kth_largest(values: torch.Tensor, k: int) -> float | None:
    """The k-th largest value when an evenly spaced sample shows one value filling the ranks
    around it (task vectors of bfloat16 models hold few distinct values, and partitioning
    them is slow), checked exactly by two counts; None otherwise."""
    count = values.numel()
    if count < 8 * _SAMPLE:
        return None
    sample = torch.sort(values[:: count // _SAMPLE], descending=True).values
    rank = k / count * sample.numel()
    spread = 4.0 * math.sqrt(rank * (1.0 - k / count)) + 4.0  # four standard deviations of the rank
    upper, lower = int(rank - spread), math.ceil(rank + spread)
    if upper < 0 or lower >= sample.numel() or bool(sample[upper] != sample[lower]):
        return None
    value = float(sample[upper])
    if int(torch.count_nonzero(values > value)) < k <= int(torch.count_nonzero(values >= value)):
        return value
    return None


def gathered_kth_largest_magnitude(blocks: Iterable[torch.Tensor], k: int, numel: int) -> float:
    """The k-th largest absolute value (1-based) of the ``numel`` elements that ``blocks``
    yields, gathered into one buffer of their magnitudes (one pass, one copy)."""
    magnitudes: torch.Tensor | None = None
    filled = 0
    for block in blocks:
        flat = block.detach().reshape(-1)
        if magnitudes is None:
            magnitudes = torch.empty(numel, dtype=flat.dtype, device=flat.device)
        torch.abs(flat, out=magnitudes[filled : filled + flat.numel()])
        filled += flat.numel()
    if magnitudes is None or filled != numel:
        raise ValueError(f"the blocks hold {filled} elements, not {numel}")
    return _kth_largest_in_place(magnitudes, k)


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


def magnitude_mask(task_vector: torch.Tensor, density: float) -> torch.Tensor:
    """Boolean mask keeping the ``density`` fraction of largest-magnitude elements (at least one)."""
    return task_vector.abs() >= magnitude_threshold(task_vector, density)


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


def disjoint_merge(
    task_vectors: Sequence[torch.Tensor],
    weights: Sequence[float],
    normalize: bool,
    thresholds: Sequence[float] | None = None,
) -> torch.Tensor:
    """Sum the kept, weighted entries whose sign agrees with the elected one (TIES).

    An entry is kept where its magnitude reaches its task vector's ``thresholds`` entry
    (every entry without thresholds). The elected sign of an element is that of the sum
    of its kept, weighted entries (+1 where that sum is 0). With ``normalize``, each
    element is divided by the sum of the weights of the models that agree there (1 where
    none does), as in mergekit. Zero entries and zero-weight models take no side.
    """
    limits: Sequence[float | None] = [None] * len(task_vectors) if thresholds is None else thresholds
    flat = [task_vector.reshape(-1) for task_vector in task_vectors]
    trims = [_trim(limit, vector.dtype) for vector, limit in zip(flat, limits, strict=True)]
    merged = torch.empty_like(flat[0])
    for part in _slices(merged.numel(), merged.device):
        kept = [trim(vector[part]) for vector, trim in zip(flat, trims, strict=True)]
        merged[part] = _disjoint_slice(kept, weights, normalize)
    return merged.reshape(task_vectors[0].shape)


def _trim(threshold: float | None, dtype: torch.dtype) -> Callable[[torch.Tensor], torch.Tensor]:
    """A function returning a fresh copy of a slice with the entries below ``threshold`` in
    magnitude set to 0 (every entry kept without a positive threshold)."""
    if threshold is None or threshold <= 0.0:
        return torch.clone
    if dtype in (torch.float32, torch.float64):  # one pass: |x| > the value just below
        below = float(torch.nextafter(torch.tensor(threshold, dtype=dtype), torch.tensor(0.0, dtype=dtype)))
        return lambda vector: torch.nn.functional.hardshrink(vector, below)
    return lambda vector: torch.where(vector.abs() >= threshold, vector, 0.0)


def _disjoint_slice(kept: list[torch.Tensor], weights: Sequence[float], normalize: bool) -> torch.Tensor:
    """TIES's disjoint merge of one slice of kept entries (overwrites ``kept``).

    An entry agrees with the elected sign s where ``entry * s * sign(weight) > 0``; that
    product, clamped at 0, is the entry's magnitude where it agrees and 0 elsewhere, so
    ``s * sum |w| * clamp(entry * s * sign(w), 0)`` is the sum of the agreeing weighted
    entries (multiplying by +-1 is exact, so this equals summing them directly).
    """
    elected = torch.mul(kept[0], weights[0])
    for entries, weight in zip(kept[1:], weights[1:], strict=True):
        elected.add_(entries, alpha=weight)
    sign = torch.ones_like(elected).copysign_(elected)  # -1 at -0.0 too: only where every entry is 0
    total = torch.zeros_like(sign)
    agreeing_weight = torch.zeros_like(sign) if normalize else None
    for entries, weight in zip(kept, weights, strict=True):
        if weight == 0.0:
            continue
        agreeing = entries.mul_(sign) if weight > 0 else entries.mul_(sign).neg_()
        agreeing.clamp_min_(0.0)
        total.add_(agreeing, alpha=abs(weight))
        if agreeing_weight is not None:
            agreeing_weight.add_(torch.sign(agreeing), alpha=weight)  # sign: 1 where it agrees, else 0
    total.mul_(sign).add_(0.0)  # + 0.0: no negative zero where no entry agrees
    if agreeing_weight is not None:
        total.div_(agreeing_weight.masked_fill_(agreeing_weight == 0, 1.0))
    return total


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
