"""The exact selections and the disjoint merge that TIES is built from: the one-pass bracketed
selection of the k-th largest magnitude against the sort-based definition (ties included, on
float32, float64 and bfloat16-derived data), and the disjoint merge's fast float path bit for
bit against the slice-by-slice reference it replaces."""

from __future__ import annotations

import itertools

import pytest
import torch

from m3sb.methods.registry import task_vector
from m3sb.methods.sparsify import (
    _BRACKET_MIN,
    _CPU_SLICE,
    BracketedSelection,
    _disjoint_slice,
    _slices,
    _trim,
    disjoint_merge,
    kth_largest_magnitude,
)

ROWS, COLUMNS = 1024, 640  # 655,360 elements: enough to bracket, in three slices


def _by_sorting(values: torch.Tensor, k: int) -> float:
    return float(torch.sort(values.abs().reshape(-1), descending=True).values[k - 1])


def _cases() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    base = torch.randn(ROWS, COLUMNS, generator=generator) * 0.02
    fine_tuned = (base + torch.randn(ROWS, COLUMNS, generator=generator) * 2e-4).bfloat16().float()
    decoy = torch.randn(ROWS, COLUMNS, generator=generator)
    decoy.view(-1)[:: decoy.numel() // (1 << 16)] = 0.5  # the sample sees one value; the counts refute it
    half = torch.cat(
        [torch.full((ROWS * COLUMNS // 2,), -0.25), torch.randn(ROWS * COLUMNS // 2, generator=generator)]
    )
    signed_zeros = torch.randn(ROWS, COLUMNS, generator=generator)
    signed_zeros[: ROWS // 2] = 0.0
    signed_zeros[ROWS // 2 : ROWS // 2 + 8] = -0.0
    return {
        "bfloat16 task vector (few distinct values)": fine_tuned - base.bfloat16().float(),
        "gaussian": torch.randn(ROWS, COLUMNS, generator=generator),
        "gaussian float64": torch.randn(ROWS, COLUMNS, generator=generator, dtype=torch.float64),
        "half of it one value": half.reshape(ROWS, COLUMNS),
        "a sample that misleads": decoy,
        "half of it zeros of either sign": signed_zeros,
    }


KS = (1, 7, 1000, ROWS * COLUMNS // 5, ROWS * COLUMNS // 2, ROWS * COLUMNS - 3, ROWS * COLUMNS)


@pytest.mark.parametrize("case", list(_cases()))
def test_the_bracketed_selection_is_the_sort_based_one(case: str) -> None:
    values = _cases()[case]
    found = 0
    for k in KS:
        expected = _by_sorting(values, k)
        for cuts in ([0, ROWS], [0, ROWS - 190, ROWS - 100, ROWS]):  # whole, and in uneven chunks
            selection = BracketedSelection(k, values.numel())
            for start, stop in itertools.pairwise(cuts):
                selection.add(values[start:stop])
            result = selection.result()
            assert result is None or result == expected, (k, cuts)  # None: the caller selects another way
            found += result is not None
        assert kth_largest_magnitude(values, k) == expected, k
    if case != "a sample that misleads":
        assert found >= len(KS)  # the one-pass selection does find these


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_the_selection_of_task_vectors_formed_slice_by_slice_is_the_sort_based_one(
    dtype: torch.dtype,
) -> None:
    generator = torch.Generator().manual_seed(1)
    base = (torch.randn(ROWS, COLUMNS, generator=generator) * 0.02).bfloat16().float()
    tensor = (base + torch.randn(ROWS, COLUMNS, generator=generator) * 2e-3).to(dtype)
    tensor[3, :50] = base[3, :50].to(dtype)  # entries equal to the base: zeros of the task vector
    vectors = task_vector(tensor, base)
    for k in KS:
        expected = _by_sorting(vectors, k)
        for cuts in ([0, ROWS], [0, ROWS - 200, ROWS - 1, ROWS]):
            selection = BracketedSelection(k, vectors.numel())
            for start, stop in itertools.pairwise(cuts):
                selection.add_task_vector(tensor[start:stop], base[start:stop])
            assert selection.result() == expected, (k, cuts)


def test_a_selection_that_cannot_bracket_says_so() -> None:
    values = torch.randn(ROWS, COLUMNS, generator=torch.Generator().manual_seed(2))
    small_first = BracketedSelection(10, values.numel())
    small_first.add(values[:1])  # too few to sample
    small_first.add(values[1:])
    assert small_first.result() is None
    assert BracketedSelection(10, _BRACKET_MIN - 1).failed  # too few elements in all
    overflowing = BracketedSelection(values.numel() // 2, values.numel(), gather_limit=100)
    overflowing.add(values)
    assert overflowing.failed and overflowing.result() is None
    unfinished = BracketedSelection(10, values.numel())
    unfinished.add(values[: ROWS - 1])
    assert unfinished.result() is None
    with pytest.raises(ValueError, match="asked for element 0"):
        BracketedSelection(0, 10)


def _disjoint_reference(
    vectors: list[torch.Tensor], weights: list[float], normalize: bool, thresholds: list[float | None]
) -> torch.Tensor:
    """The disjoint merge as it was written before its float fast path: trimmed copies of each
    slice passed to ``_disjoint_slice``."""
    flat = [vector.reshape(-1) for vector in vectors]
    trims = [_trim(limit, vector.dtype) for vector, limit in zip(flat, thresholds, strict=True)]
    merged = torch.empty_like(flat[0])
    for part in _slices(merged.numel(), merged.device):
        merged[part] = _disjoint_slice(
            [trim(vector[part]) for vector, trim in zip(flat, trims, strict=True)], weights, normalize
        )
    return merged.reshape(vectors[0].shape)


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.view(torch.int32 if tensor.dtype == torch.float32 else torch.int64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize(
    "weights",
    [[1.0, 1.0, 1.0], [0.5, -0.7, 1.2], [0.0, 2.0, -1.0], [0.3, 0.3, 0.0], [0.0, 0.0, 0.0], [1e-3, 7.0, 0.1]],
)
def test_the_fast_disjoint_merge_is_the_reference_bit_for_bit(
    dtype: torch.dtype, normalize: bool, weights: list[float]
) -> None:
    generator = torch.Generator().manual_seed(4)
    numel = 2 * _CPU_SLICE + 12_345  # two whole slices and a ragged one
    base = (torch.randn(numel, generator=generator) * 0.02).bfloat16().float()
    vectors = [
        ((base + torch.randn(numel, generator=generator) * 2e-3).bfloat16().float() - base).to(dtype)
        for _ in range(3)
    ]
    vectors[1][:1000] = vectors[0][:1000]  # equal entries: ties at the same thresholds
    vectors[2][1000:2000] = -vectors[0][1000:2000]  # opposite entries: elected sums of 0
    vectors[0][2000:2100] = 0.0
    vectors[1][2000:2100] = -0.0
    vectors = [vector.reshape(-1, 7) if numel % 7 == 0 else vector for vector in vectors]
    medians: list[float | None] = [kth_largest_magnitude(vector, numel // 2) for vector in vectors]
    choices: list[list[float | None]] = [[None, None, None], medians, [medians[0], 0.0, float("inf")]]
    for thresholds in choices:
        merged = disjoint_merge(vectors, weights, normalize, thresholds)
        expected = _disjoint_reference(vectors, weights, normalize, thresholds)
        assert merged.dtype == dtype
        assert torch.equal(_bits(merged), _bits(expected)), thresholds
