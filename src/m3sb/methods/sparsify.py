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
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from m3sb.methods.registry import MIN_WEIGHT_SUM
from m3sb.methods.registry import task_vector as form_task_vector

_CPU_SLICE = 1 << 18  # 1 MB of float32: TIES's temporaries stay in cache (20% faster than 1 << 16 here)
_DEVICE_SLICE = 1 << 22  # on a GPU, fewer and larger kernels


def _slices(numel: int, device: torch.device) -> Iterator[slice]:
    size = _CPU_SLICE if device.type == "cpu" else _DEVICE_SLICE
    for start in range(0, numel, size):
        yield slice(start, min(start + size, numel))


def kth_largest_magnitude(tensor: torch.Tensor, k: int) -> float:
    """The k-th largest absolute value (1-based) of a tensor: in one pass over it where a
    sample brackets that value (:class:`BracketedSelection`), else by partitioning a copy of
    its magnitudes."""
    flat = tensor.detach().reshape(-1)
    found = None
    if 1 <= k <= flat.numel():
        selection = BracketedSelection(k, flat.numel())
        selection.add(flat)
        found = selection.result()
    return found if found is not None else _kth_largest_in_place(flat.abs(), k)


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


_BRACKET_SAMPLE = 1 << 16  # elements sampled to bracket the k-th (a 2% bracket around the median)
_BRACKET_MIN = 8 * _BRACKET_SAMPLE  # fewer elements than this: partitioned whole


class BracketedSelection:
    """The k-th largest absolute value (1-based) of ``numel`` elements added in chunks, found
    exactly in one pass over them: a sorted sample of the first chunk (evenly spaced
    elements) gives two magnitudes that bracket the k-th with a margin of four or five
    standard deviations of its rank; the pass counts the elements above the bracket and
    gathers those inside it, and the k-th is then selected among the gathered ones. Where
    the bracket holds a single value (task vectors of bfloat16 models hold few distinct
    values) the pass only counts. The counts prove the bracket: where it missed, or
    gathered more than ``gather_limit`` elements, or the chunks are not float32 or float64
    on the CPU, :meth:`result` is None and the caller selects another way.

    The pass runs over slices of each chunk with NumPy, in place in small buffers: about
    four times faster here than comparing and counting the whole tensor with torch, and
    single-threaded, so that it never waits for a busy second core.
    """

    def __init__(self, k: int, numel: int, gather_limit: int | None = None) -> None:
        if not 1 <= k <= numel:
            raise ValueError(f"asked for element {k} of {numel}")
        self.k, self.numel = k, numel
        self.gather_limit = max(1 << 20, numel // 8) if gather_limit is None else gather_limit
        self.seen = 0
        self.above = 0  # elements above the bracket
        self.inside = 0  # elements inside it (its two ends included)
        self.gathered: list[npt.NDArray[np.floating[Any]]] = []
        self.failed = numel < _BRACKET_MIN
        self.upper = self.lower = 0.0
        self._buffers: dict[tuple[str, np.dtype[Any]], npt.NDArray[Any]] = {}

    @staticmethod
    def can_bracket(first_chunk: int) -> bool:
        """Whether a first chunk of this many elements is large enough to set the bracket."""
        return first_chunk >= _BRACKET_MIN

    def add(self, values: torch.Tensor) -> None:
        """Count one chunk (any shape; its elements follow the previous chunk's)."""
        flat = values.detach().reshape(-1)
        first = self.seen == 0
        self.seen += flat.numel()
        if self.failed:
            return
        if flat.device.type != "cpu" or flat.dtype not in (torch.float32, torch.float64):
            self.failed = True
            return
        array = flat.numpy()
        if first and not self._bracket(array[:: max(1, array.size // _BRACKET_SAMPLE)], array.size):
            return
        for start in range(0, array.size, _CPU_SLICE):
            if not self._count(array[start : start + _CPU_SLICE]):
                return

    def add_task_vector(self, tensor: torch.Tensor, base: torch.Tensor) -> None:
        """Count the chunk ``task_vector(tensor, base)``, formed here slice by slice as that forms
        it, never whole (a bfloat16 ``tensor`` is widened by shifting its bits, as torch does)."""
        flat, origin = tensor.detach().reshape(-1), base.detach().reshape(-1)
        widened = {torch.bfloat16: np.uint16, torch.float16: np.float16, torch.float32: np.float32}
        if (
            flat.device.type != "cpu"
            or origin.device.type != "cpu"
            or origin.dtype != torch.float32
            or flat.dtype not in widened
            or flat.shape != origin.shape
        ):
            self.add(form_task_vector(tensor, base))
            return
        first = self.seen == 0
        self.seen += flat.numel()
        if self.failed:
            return
        stored = (
            (flat.view(torch.int16) if flat.dtype == torch.bfloat16 else flat)
            .numpy()
            .view(widened[flat.dtype])
        )
        subtrahend = origin.numpy()
        if first:
            step = max(1, stored.size // _BRACKET_SAMPLE)
            sample = self._difference(stored[::step], subtrahend[::step], "sample")
            if not self._bracket(sample, stored.size):
                return
        for start in range(0, stored.size, _CPU_SLICE):
            part = slice(start, start + _CPU_SLICE)
            if not self._count(self._difference(stored[part], subtrahend[part], "difference")):
                return

    def _buffer(self, name: str, size: int, dtype: np.dtype[Any]) -> npt.NDArray[Any]:
        """A buffer of at least ``size`` elements kept for the next slices (its first ``size``)."""
        buffer = self._buffers.get((name, dtype))
        if buffer is None or buffer.size < size:
            buffer = self._buffers[(name, dtype)] = np.empty(max(size, _CPU_SLICE), dtype=dtype)
        return buffer[:size]

    def _difference(
        self, stored: npt.NDArray[Any], subtrahend: npt.NDArray[np.float32], name: str
    ) -> npt.NDArray[np.float32]:
        """``stored`` widened to float32, less ``subtrahend``, in a buffer: the float32 of a
        bfloat16 is its 16 bits followed by 16 zero bits, exactly."""
        out = self._buffer(name, stored.size, np.dtype(np.float32))
        if stored.dtype == np.uint16:
            bits = out.view(np.uint32)
            np.copyto(bits, stored)
            np.left_shift(bits, 16, out=bits)
        else:
            np.copyto(out, stored)
        np.subtract(out, subtrahend, out=out)
        return out

    def _bracket(self, sample: npt.NDArray[np.floating[Any]], size: int) -> bool:
        """Set the bracket from an evenly spaced sample of the first chunk, of ``size`` elements
        (False, and failed: the chunk is too small to sample)."""
        if size < _BRACKET_MIN:
            self.failed = True
            return False
        ordered = np.sort(np.abs(sample))[::-1]
        share = self.k / self.numel
        rank = share * ordered.size
        deviation = math.sqrt(rank * (1.0 - share))  # of the k-th's rank in the sample
        for spread in (4.0 * deviation + 4.0, 5.0 * deviation + 8.0):  # one value fills the first: count only
            upper, lower = math.floor(rank - spread), math.ceil(rank + spread)
            self.upper = float(ordered[upper]) if upper >= 0 else math.inf
            self.lower = float(ordered[lower]) if lower < ordered.size else 0.0
            if self.upper == self.lower:
                break
        return True

    def _count(self, values: npt.NDArray[np.floating[Any]]) -> bool:
        """Count one slice's magnitudes against the bracket and gather those inside it (False,
        and failed: more than ``gather_limit`` are inside)."""
        count = values.size
        upper, lower = values.dtype.type(self.upper), values.dtype.type(self.lower)
        magnitudes = np.abs(values, out=self._buffer("magnitudes", count, values.dtype))
        flags = self._buffer("flags", count, np.dtype(np.bool_))
        above = int(np.count_nonzero(np.greater(magnitudes, upper, out=flags)))
        self.above += above
        np.greater_equal(magnitudes, lower, out=flags)
        if upper == lower:
            self.inside += int(np.count_nonzero(flags)) - above
            return True
        in_bracket = np.less_equal(magnitudes, upper, out=self._buffer("inside", count, np.dtype(np.bool_)))
        found = np.compress(np.logical_and(in_bracket, flags, out=in_bracket), magnitudes)
        self.inside += found.size
        if self.inside > self.gather_limit:
            self.failed = True
            self.gathered = []
            return False
        self.gathered.append(found)
        return True

    def result(self) -> float | None:
        """The k-th largest magnitude, or None where the bracket did not hold it (or no pass ran)."""
        if self.failed or self.seen != self.numel:
            return None
        if not self.above < self.k <= self.above + self.inside:
            return None
        if self.upper == self.lower:
            return self.upper
        candidates = np.concatenate(self.gathered)
        position = candidates.size - (self.k - self.above)
        candidates.partition(position)
        return float(candidates[position])


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
    merged = torch.empty_like(flat[0])
    if all(vector.dtype == merged.dtype for vector in flat) and merged.dtype in (
        torch.float32,
        torch.float64,
    ):
        merge_slice = _DisjointSlices(flat, weights, normalize, limits, merged)
        for part in _slices(merged.numel(), merged.device):
            merge_slice(part)
        return merged.reshape(task_vectors[0].shape)
    trims = [_trim(limit, vector.dtype) for vector, limit in zip(flat, limits, strict=True)]
    for part in _slices(merged.numel(), merged.device):
        kept = [trim(vector[part]) for vector, trim in zip(flat, trims, strict=True)]
        merged[part] = _disjoint_slice(kept, weights, normalize)
    return merged.reshape(task_vectors[0].shape)


class _DisjointSlices:
    """TIES's disjoint merge of float32 or float64 task vectors, slice by slice into ``merged``:
    the same values as trimming copies of the slices and passing them to :func:`_disjoint_slice`
    (every sum and product is the same operation on the same values), in 24 passes over a
    slice of three task vectors instead of 31, and in six slice-sized buffers reused from
    slice to slice: 40% less time here. Zeros may differ in sign along the way, never in
    the result.

    The trimmed entries are formed twice instead of being kept: once into a scratch buffer
    for the elected sum, and once with the elected sign applied, where one ``threshold``
    keeps an entry that agrees with the sign and reaches the trimming magnitude (its
    magnitude, that is) and sets every other to 0. Where every model that takes a side has
    a positive weight, an element that none agrees with is the only one whose agreeing
    weight is 0, and every other's is at least the smallest of those weights, so raising
    the agreeing weights to that smallest weight divides those elements' 0 by something
    other than 0, as replacing 0 by 1 does, in one pass instead of two.
    """

    def __init__(
        self,
        vectors: list[torch.Tensor],
        weights: Sequence[float],
        normalize: bool,
        thresholds: Sequence[float | None],
        merged: torch.Tensor,
    ) -> None:
        self.vectors, self.weights, self.normalize, self.merged = vectors, list(weights), normalize, merged
        self.belows = [_below(limit, merged.dtype) for limit in thresholds]
        size = _CPU_SLICE if merged.device.type == "cpu" else _DEVICE_SLICE
        size = min(size, max(1, merged.numel()))
        self.buffers = [torch.empty(size, dtype=merged.dtype, device=merged.device) for _ in range(6)]
        single = merged.dtype == torch.float32
        self.bits = torch.int32 if single else torch.int64
        self.sign_bit = -(2**31) if single else -(2**63)  # the sign bit alone, as a signed integer
        self.one_bits = 0x3F800000 if single else 0x3FF0000000000000  # the bits of 1.0
        sides = [weight for weight in self.weights if weight != 0.0]
        smallest = float(torch.tensor(min(sides), dtype=merged.dtype)) if sides else 0.0
        self.floor = smallest if smallest > 0.0 else None  # as the weights are applied: in the dtype

    def __call__(self, part: slice) -> None:
        count = part.stop - part.start
        elected, scratch, sign, agreeing, total, agreeing_weight = (buffer[:count] for buffer in self.buffers)
        vectors = [vector[part] for vector in self.vectors]
        for index, (vector, weight, below) in enumerate(zip(vectors, self.weights, self.belows, strict=True)):
            if index == 0:
                kept = vector if below is None else torch.hardshrink(vector, below, out=elected)
                if below is None or weight != 1.0:  # multiplying by 1 leaves every value as it is
                    torch.mul(kept, weight, out=elected)
                continue
            kept = vector if below is None else torch.hardshrink(vector, below, out=scratch)
            elected.add_(kept, alpha=weight)
        # copysign(1, elected), in two passes over its bits that take half the time of copysign's
        # one here: -1 at -0.0 too, only where every entry is 0
        bits = sign.view(self.bits)
        torch.bitwise_and(elected.view(self.bits), self.sign_bit, out=bits)
        bits.bitwise_or_(self.one_bits)
        first = True
        for vector, weight, below in zip(vectors, self.weights, self.belows, strict=True):
            if weight == 0.0:
                continue
            torch.mul(vector, sign, out=agreeing)
            if weight < 0:
                agreeing.neg_()
            torch.threshold_(
                agreeing, 0.0 if below is None else below, 0.0
            )  # its magnitude where it agrees, else 0
            if first:
                if abs(weight) == 1.0:
                    total, agreeing = agreeing, total
                else:
                    torch.mul(agreeing, abs(weight), out=total)
                if self.normalize:
                    torch.sign(total if abs(weight) == 1.0 else agreeing, out=agreeing_weight)
                    if weight != 1.0:
                        agreeing_weight.mul_(weight)
                first = False
                continue
            total.add_(agreeing, alpha=abs(weight))
            if self.normalize:
                agreeing_weight.add_(torch.sign(agreeing, out=scratch), alpha=weight)
        out = self.merged[part]
        if first:  # no model takes a side
            out.zero_()
            return
        total.mul_(sign).add_(0.0)  # + 0.0: no negative zero where no entry agrees
        if not self.normalize:
            out.copy_(total)
            return
        if self.floor is not None:
            agreeing_weight.clamp_min_(self.floor)
        else:
            agreeing_weight.masked_fill_(agreeing_weight == 0, 1.0)
        torch.div(total, agreeing_weight, out=out)


def _below(threshold: float | None, dtype: torch.dtype) -> float | None:
    """The largest magnitude that a ``threshold`` trims away: the value just below it in
    ``dtype`` (None where every entry is kept: no positive threshold)."""
    if threshold is None or threshold <= 0.0:
        return None
    return float(torch.nextafter(torch.tensor(threshold, dtype=dtype), torch.tensor(0.0, dtype=dtype)))


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
