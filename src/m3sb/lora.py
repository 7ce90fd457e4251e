"""LoRA inputs (mergekit's ``model+adapter``): a model with a PEFT LoRA adapter applied on the fly.

Each adapted tensor is computed when it is read, ``W + scale * B @ A`` (transposed for
``fan_in_fan_out`` layers and for embeddings, as PEFT merges them), with
``scale = alpha / r`` (``alpha / sqrt(r)`` with rsLoRA, ``rank_pattern`` and
``alpha_pattern`` applied per module), summed in float32 and stored in the model's dtype;
tensors the adapter saves whole (``modules_to_save``) replace the model's. No merged copy
of the model is made or cached. Only the adapter's JSON config and its safetensors (or a
pickle read by the loader that runs no code) are read. An adapter that names a module the
model lacks, or whose shapes do not fit it (an adapter for another base), and DoRA or
non-LoRA adapters are refused with one line.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from m3sb.checkpoints import HUB_ID, Checkpoint, TensorInfo, download_from_hub, open_checkpoint
from m3sb.errors import CheckpointError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
ADAPTER_PATTERNS = (ADAPTER_CONFIG, *ADAPTER_WEIGHTS)
PREFIX = "base_model.model."


def split_reference(location: str) -> tuple[str, str] | None:
    """``(model, adapter)`` for mergekit's ``model+adapter`` syntax, None for a plain location."""
    if "+" not in location or Path(location).expanduser().exists():
        return None
    model, _, adapter = location.rpartition("+")
    if not model or not adapter:
        raise CheckpointError(f"{location}: expected MODEL+ADAPTER")
    return model, adapter


@dataclass(frozen=True)
class _Adapted:
    """How one tensor of the model changes: low-rank factors (or a whole replacement) and scale."""

    a: str | None
    b: str | None
    scale: float
    transpose: bool
    replacement: str | None = None


def _adapter_folder(location: str) -> Path:
    path = Path(location).expanduser()
    if path.is_dir():
        return path
    if HUB_ID.match(location) and not location.startswith((".", "/")):
        return download_from_hub(location, ADAPTER_PATTERNS)
    raise CheckpointError(f"{location}: no such LoRA adapter (a folder with {ADAPTER_CONFIG} or a hub id)")


def _pattern_value(patterns: dict[str, object], module: str, default: float) -> float:
    """A ``rank_pattern`` / ``alpha_pattern`` value for ``module`` (PEFT's matching rule)."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module) and isinstance(value, int | float):
            return float(value)
    return default


class LoraCheckpoint(Checkpoint):
    """A model's tensors with a LoRA adapter merged into each one as it is read."""

    def __init__(self, label: str, model: Checkpoint, adapter_location: str) -> None:
        super().__init__(label, model.folder, model.files)
        self.model = model
        folder = _adapter_folder(adapter_location)
        config = self._config(folder, adapter_location)
        weights = next((folder / name for name in ADAPTER_WEIGHTS if (folder / name).is_file()), None)
        if weights is None:
            raise CheckpointError(f"{adapter_location}: no {' or '.join(ADAPTER_WEIGHTS)}")
        self.adapter = open_checkpoint(weights)
        self.files = (*model.files, folder / ADAPTER_CONFIG, weights)  # all of them are inputs
        self.adapted = self._plan(config, adapter_location)

    @staticmethod
    def _config(folder: Path, location: str) -> dict[str, object]:
        file = folder / ADAPTER_CONFIG
        try:
            config = json.loads(file.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise CheckpointError(f"{location}: no {ADAPTER_CONFIG}; is it a PEFT adapter?") from None
        except (OSError, ValueError) as error:
            raise CheckpointError(f"{file}: unreadable: {error}") from None
        if not isinstance(config, dict):
            raise CheckpointError(f"{file}: expected a JSON object")
        kind = config.get("peft_type", "LORA")
        if not isinstance(kind, str) or kind.upper() != "LORA":
            raise CheckpointError(
                f"{location}: a {kind} adapter (peft_type); only LoRA adapters can be merged"
            )
        if config.get("use_dora"):
            raise CheckpointError(f"{location}: a DoRA adapter (use_dora); only plain LoRA can be merged")
        for key in ("r", "lora_alpha"):
            value = config.get(key, 8)
            if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
                raise CheckpointError(f"{file}: {key} must be a positive number, got {value!r}")
        for key in ("rank_pattern", "alpha_pattern"):
            patterns = config.get(key) or {}
            if not isinstance(patterns, dict):
                raise CheckpointError(f"{file}: {key} must map module patterns to numbers, got {patterns!r}")
            for pattern, value in patterns.items():
                try:
                    re.compile(str(pattern))
                except re.error as error:
                    raise CheckpointError(
                        f"{file}: {key}: pattern {pattern!r} is not a regex ({error})"
                    ) from None
                if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
                    raise CheckpointError(
                        f"{file}: {key}[{pattern!r}] must be a positive number, got {value!r}"
                    )
        return config

    def _plan(self, config: dict[str, object], location: str) -> dict[str, _Adapted]:
        """Which model tensors the adapter changes, checked against the model's names and shapes."""
        rank = float(config.get("r", 8))  # type: ignore[arg-type]
        alpha = float(config.get("lora_alpha", rank))  # type: ignore[arg-type]
        rank_pattern = config.get("rank_pattern") or {}
        alpha_pattern = config.get("alpha_pattern") or {}
        assert isinstance(rank_pattern, dict) and isinstance(alpha_pattern, dict)
        fan_in_fan_out = bool(config.get("fan_in_fan_out", False))
        names = self.adapter.tensors
        replacements: dict[str, str] = {}  # saved whole (modules_to_save, resized embeddings)
        factors: dict[str, tuple[str, str, float, bool]] = {}
        for name in names:
            key = name.removeprefix(PREFIX)
            for a_suffix, b_suffix, embedding in (
                (".lora_A.weight", ".lora_B.weight", False),
                (".lora_embedding_A", ".lora_embedding_B", True),
            ):
                if key.endswith(a_suffix):
                    module = key.removesuffix(a_suffix)
                    partner = name.removesuffix(a_suffix) + b_suffix
                    if partner not in names:
                        raise CheckpointError(f"{location}: '{name}' has no '{partner}'")
                    r = _pattern_value(rank_pattern, module, rank)
                    a_scale = _pattern_value(alpha_pattern, module, alpha)
                    scale = a_scale / math.sqrt(r) if config.get("use_rslora") else a_scale / r
                    factors[f"{module}.weight"] = (name, partner, scale, embedding or fan_in_fan_out)
                    break
            else:
                if ".lora_B." in key or key.endswith(".lora_embedding_B"):
                    continue
                replacements[key.replace(".base_layer.weight", ".weight")] = name
        adapted = {
            target: _Adapted(None, None, 1.0, False, replacement)
            for target, replacement in replacements.items()
        }
        for target, (a, b, scale, transpose) in factors.items():
            adapted[target] = _Adapted(a, b, scale, transpose, replacements.get(target))
        for target, change in adapted.items():
            self._check(target, change, location)
        return adapted

    def _check(self, target: str, change: _Adapted, location: str) -> None:
        if target not in self.model.tensors:
            raise CheckpointError(
                f"{location}: adapts '{target}', which {self.model.label} does not have; "
                "is the adapter for another base model?"
            )
        expected = self.model.tensors[target].shape
        shapes = []
        if change.replacement is not None:
            shapes.append(tuple(self.adapter.tensors[change.replacement].shape))
        if change.a is not None and change.b is not None:
            a, b = self.adapter.tensors[change.a].shape, self.adapter.tensors[change.b].shape
            if len(a) != 2 or len(b) != 2 or a[0] != b[1]:
                raise CheckpointError(f"{location}: '{change.a}' and '{change.b}' are not LoRA factors")
            shapes.append((a[1], b[0]) if change.transpose else (b[0], a[1]))
        for shape in shapes:
            if tuple(shape) != tuple(expected):
                raise CheckpointError(
                    f"{location}: its change to '{target}' has shape {list(shape)} but {self.model.label}'s "
                    f"tensor is {list(expected)}; is the adapter for another base model?"
                )

    @property
    def tensors(self) -> dict[str, TensorInfo]:
        """The model's tensors (an adapter changes values, not names or shapes)."""
        return self.model.tensors

    def load(self, name: str) -> torch.Tensor:
        """The model's tensor with the adapter's change applied."""
        change = self.adapted.get(name)
        original = self.model.load(name)
        if change is None:
            return original
        start = original if change.replacement is None else self.adapter.load(change.replacement)
        if change.a is None or change.b is None:
            return start.to(original.dtype)
        delta = self.adapter.load(change.b).float() @ self.adapter.load(change.a).float()
        if change.transpose:
            delta = delta.T
        return (start.float() + delta * change.scale).to(original.dtype)

    def read_config(self) -> dict[str, object]:
        """The model's config.json."""
        return self.model.read_config()


def open_with_adapter(location: str, model: str, adapter: str) -> LoraCheckpoint:
    """``model`` with ``adapter`` applied, labelled as the user wrote it."""
    return LoraCheckpoint(location, open_checkpoint(model), adapter)
