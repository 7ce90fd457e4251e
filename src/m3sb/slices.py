"""mergekit's ``slices``: which input tensors make each output tensor, layer by layer.

A recipe with ``slices`` builds its output from layer ranges of its inputs: every source
of a slice gives the same number of layers, the slice's layer ``i`` is merged from each
source's layer ``start + i``, and the slices are stacked in order, so the output's layers
are renumbered from 0 (a slice may repeat or interleave layers: frankenmerges). Tensors
outside the numbered layers come from the first slice's sources (embeddings) or the last
slice's (the final norm, ``lm_head``). Gradients are read at ``i / (n - 1)`` within a slice
of ``n`` layers (1 for a one-layer slice), and at 0 outside the layers, as mergekit reads
them. Layers are recognised by name (``...layers.N...``, ``h.N``, ``blocks.N``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from m3sb.config import LAYER_INDEX

_EMBEDDING_MARKS = ("embed", "wte", "wpe", "word_embeddings")


def layer_index(tensor_name: str) -> int | None:
    """The layer a tensor belongs to (``model.layers.3.mlp...`` -> 3), or None."""
    match = LAYER_INDEX.search(tensor_name)
    return int(match.group(1)) if match else None


def renumbered(tensor_name: str, index: int) -> str:
    """``tensor_name`` with its layer number replaced by ``index``."""
    match = LAYER_INDEX.search(tensor_name)
    assert match is not None, tensor_name
    start, end = match.span(1)
    return f"{tensor_name[:start]}{index}{tensor_name[end:]}"


_HEAD_MARKS = ("embed_out", "lm_head")  # output heads, after the layers whatever their names say


def is_embedding(tensor_name: str) -> bool:
    """Whether a tensor outside the layers sits before them (embeddings) rather than after."""
    lowered = tensor_name.lower()
    if any(mark in lowered for mark in _HEAD_MARKS):
        return False
    return any(mark in lowered for mark in _EMBEDDING_MARKS)


def layers_of(tensor_names: Iterable[str]) -> dict[int, list[str]]:
    """The tensor names of each layer, in checkpoint order."""
    grouped: dict[int, list[str]] = {}
    for name in tensor_names:
        index = layer_index(name)
        if index is not None:
            grouped.setdefault(index, []).append(name)
    return grouped


@dataclass(frozen=True)
class SlicedTensor:
    """One output tensor of a sliced recipe: its name, the slice it belongs to, the name of the
    tensor in each of that slice's sources (in the sources' order), and where gradients are read."""

    name: str
    slice_index: int
    source_names: tuple[str, ...]
    position: float


def _outside_layers(names: Sequence[str], slice_index: int, sources: int, before: bool) -> list[SlicedTensor]:
    return [
        SlicedTensor(name, slice_index, (name,) * sources, 0.0)
        for name in names
        if layer_index(name) is None and is_embedding(name) == before
    ]


def sliced_tensors(
    first_source_names: Sequence[Sequence[str]], ranges: Sequence[Sequence[tuple[int, int]]]
) -> list[SlicedTensor]:
    """Every output tensor, in writing order: embeddings, the stacked layers, then the rest.

    ``first_source_names[k]`` are the tensor names of slice k's first source (its layout
    decides the tensors of each layer); ``ranges[k]`` the layer range of each of its sources.
    """
    last = len(ranges) - 1
    planned = _outside_layers(first_source_names[0], 0, len(ranges[0]), before=True)
    output_layer = 0
    for slice_index, (names, slice_ranges) in enumerate(zip(first_source_names, ranges, strict=True)):
        grouped = layers_of(names)
        start, end = slice_ranges[0]
        count = end - start
        for offset in range(count):
            position = offset / (count - 1) if count > 1 else 1.0
            for name in grouped.get(start + offset, []):
                source_names = tuple(renumbered(name, begin + offset) for begin, _ in slice_ranges)
                planned.append(
                    SlicedTensor(renumbered(name, output_layer), slice_index, source_names, position)
                )
            output_layer += 1
    planned += _outside_layers(first_source_names[last], last, len(ranges[last]), before=False)
    return planned


def sliced_layer_types(layer_types: Sequence[object], ranges: Sequence[tuple[int, int]]) -> list[object]:
    """A config's per-layer list (``layer_types``) for the output: each slice's first source's
    entries for the layers it takes."""
    return [layer_types[index] for start, end in ranges for index in range(start, end)]


LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers")
