"""Statistics files (what ``m3sb statistics`` writes and the data-dependent merges read):
safetensors named like the model's weights, with metadata naming the kind, the model they
were computed for (a fingerprint of its weights) and, for Fisher, the norm of the whole."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from m3sb.errors import ConfigError

KINDS = ("gram", "gram_plusplus", "fisher")
GRAM_KINDS = ("gram", "gram_plusplus")  # Gram matrices of linear layers' inputs
KIND_KEY = "m3sb_statistics"
FINGERPRINT_KEY = "model_fingerprint"
NORM_KEY = "fisher_norm"
MERGE_KEY = "merge"  # gram_plusplus: the merge the statistics were measured through (JSON)


@dataclass(frozen=True)
class StatisticsFile:
    """A statistics file's header: its path, kind, tensors (name -> shape) and metadata."""

    path: Path
    kind: str
    shapes: dict[str, tuple[int, ...]]
    metadata: dict[str, str]

    @property
    def fingerprint(self) -> str:
        """The fingerprint of the model the statistics were computed for."""
        return self.metadata.get(FINGERPRINT_KEY, "")

    def norm(self) -> float:
        """The Euclidean norm of all the file's tensors together (recorded, else computed)."""
        if NORM_KEY in self.metadata:
            return float(self.metadata[NORM_KEY])
        from safetensors import safe_open

        total = 0.0
        with safe_open(str(self.path), "pt") as handle:
            for name in self.shapes:
                total += float(handle.get_tensor(name).double().square().sum())
        return math.sqrt(total)


def read_statistics(path: str | Path) -> StatisticsFile:
    """A statistics file's header, checked to be one m3sb wrote; a one-line error otherwise."""
    from safetensors import SafetensorError, safe_open

    file = Path(path).expanduser()
    if not file.is_file():
        raise ConfigError(f"{file}: no such statistics file")
    try:
        with safe_open(str(file), "pt") as handle:
            metadata = dict(handle.metadata() or {})
            shapes = {name: tuple(handle.get_slice(name).get_shape()) for name in handle.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError) as error:
        raise ConfigError(f"{file}: not a safetensors statistics file: {error}") from None
    kind = metadata.get(KIND_KEY)
    if kind not in KINDS:
        raise ConfigError(
            f"{file}: not a statistics file made by 'm3sb statistics' (no {KIND_KEY} in its metadata)"
        )
    return StatisticsFile(file, kind, shapes, metadata)


def write_statistics(
    tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str], destination: Path
) -> None:
    """Write the statistics atomically: nothing appears at ``destination`` unless all of it does."""
    from safetensors.torch import save_file

    destination = Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    partial = destination.with_name(f".{destination.name}.partial-{os.getpid()}")
    try:
        save_file(dict(tensors), str(partial), metadata=dict(metadata))
        partial.replace(destination)
    finally:
        partial.unlink(missing_ok=True)


def check_statistics_for(
    statistics: StatisticsFile,
    kind: str,
    fingerprint: str,
    tensor_shapes: Mapping[str, tuple[int, ...]],
    label: str,
) -> None:
    """A statistics file fits a model: the kind a method needs, computed for this model, and
    every tensor named like one of the model's, with the shape its kind gives it."""
    where = f"{statistics.path}"
    if statistics.kind != kind:
        raise ConfigError(f"{where}: holds {statistics.kind} statistics; this method needs {kind}")
    if statistics.fingerprint != fingerprint:
        raise ConfigError(f"{where}: was computed for another model than {label} (its weights differ)")
    for name, shape in statistics.shapes.items():
        if name not in tensor_shapes:
            raise ConfigError(f"{where}: tensor '{name}' is not a tensor of {label}")
        own = tensor_shapes[name]
        gram = kind in GRAM_KINDS
        expected = (own[1], own[1]) if gram and len(own) == 2 else own
        if gram and len(own) != 2:
            raise ConfigError(f"{where}: tensor '{name}' of {label} is not a matrix; a Gram matrix needs one")
        if tuple(shape) != tuple(expected):
            raise ConfigError(
                f"{where}: tensor '{name}' has shape {list(shape)}; {label}'s needs {list(expected)}"
            )


def merge_settings(weights: Sequence[float], reduce_non_diagonal_ratio: float) -> str:
    """The record of the merge that RegMean++ statistics were measured through (their metadata):
    the models' weights, normalised to sum to one (RegMean ignores their scale), and the ratio."""
    total = sum(weights)
    return json.dumps(
        {"weights": [w / total for w in weights], "reduce_non_diagonal_ratio": reduce_non_diagonal_ratio}
    )


def check_merge_settings(
    statistics: StatisticsFile, weights: Sequence[float], reduce_non_diagonal_ratio: float
) -> None:
    """RegMean++ statistics fit only the merge they were measured through: the same weights and
    ratio; a one-line error otherwise."""
    recorded = json.loads(statistics.metadata.get(MERGE_KEY, "{}"))
    asked = json.loads(merge_settings(weights, reduce_non_diagonal_ratio))
    same_ratio = math.isclose(
        recorded.get("reduce_non_diagonal_ratio", math.nan), asked["reduce_non_diagonal_ratio"], abs_tol=1e-12
    )
    theirs = recorded.get("weights", [])
    same_weights = len(theirs) == len(asked["weights"]) and all(
        math.isclose(a, b, abs_tol=1e-9) for a, b in zip(theirs, asked["weights"], strict=True)
    )
    if not (same_ratio and same_weights):
        raise ConfigError(
            f"{statistics.path}: measured through a merge with weights {theirs} and "
            f"reduce_non_diagonal_ratio {recorded.get('reduce_non_diagonal_ratio')}; this recipe merges "
            f"with {asked['weights']} and {reduce_non_diagonal_ratio}: recompute them "
            f"(m3sb statistics --kind gram_plusplus)"
        )


def statistics_destinations(models: Sequence[str], out: Path, force: bool) -> list[Path]:
    """Where each model's statistics go: ``out`` itself for one model, ``out/<model name>.safetensors``
    for several; a one-line error for a destination that exists (without ``force``) or that
    lies inside a model's folder, where it would be read as weights."""
    out = Path(out).expanduser()
    if len(models) == 1:
        destinations = [out]
    else:
        if out.is_file():
            raise ConfigError(f"{out}: a file; with several models OUT is a folder for their statistics")
        names = [Path(model).name or f"model{index}" for index, model in enumerate(models)]
        repeated = {name for name in names if names.count(name) > 1}
        destinations = [
            out / (f"{index}-{name}.safetensors" if name in repeated else f"{name}.safetensors")
            for index, name in enumerate(names)
        ]
    resolved = out.resolve()
    for model in models:
        folder = Path(model).expanduser().resolve()
        if folder.is_dir() and (folder == resolved or folder in resolved.parents):
            raise ConfigError(f"{out}: inside the folder of {model}, where it would be read as weights")
    for destination in destinations:
        if destination.exists() and not force:
            raise ConfigError(f"{destination}: exists; pass --force to replace it")
    return destinations
