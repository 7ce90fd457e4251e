"""A loaded task model, whatever its family: the model, its preprocessor, and its weights
split into the shared backbone (what merges) and the tensors that stay the task's own."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from m3sb.errors import MergeError


@dataclass
class TaskModel:
    """A loaded model, its preprocessor, and a copy of its own weights.

    ``own`` names the tensors that are the task's own (a classification head, say);
    every other tensor is the backbone that merges. The family that loads the model
    decides which are which.
    """

    checkpoint: str
    model: Any
    processor: Any
    weights: dict[str, torch.Tensor]
    own: frozenset[str] = field(default_factory=frozenset)
    processor_source: str | None = None

    @property
    def backbone(self) -> dict[str, torch.Tensor]:
        """The model's own backbone tensors, by name."""
        return {name: tensor for name, tensor in self.weights.items() if name not in self.own}

    def use_backbone(self, backbone: Mapping[str, torch.Tensor] | None) -> Any:
        """The model with ``backbone`` (or its own, when None) and its own tensors; in eval mode."""
        state = self.weights if backbone is None else {**self.weights, **backbone}
        self.model.load_state_dict(state, strict=True)
        return self.model.eval()


def check_shared_backbone(models: Sequence[TaskModel]) -> None:
    """All models must have the same backbone tensor names and shapes; name the first difference."""
    reference = models[0]
    names = reference.backbone
    for other in models[1:]:
        theirs = other.backbone
        for name in names.keys() ^ theirs.keys():
            owner, missing = (reference, other) if name in names else (other, reference)
            raise MergeError(
                f"backbones differ: tensor '{name}' is in {owner.checkpoint} but not in {missing.checkpoint}"
            )
        for name, tensor in names.items():
            if theirs[name].shape != tensor.shape:
                raise MergeError(
                    f"backbones differ: tensor '{name}' has shape {list(tensor.shape)} in "
                    f"{reference.checkpoint} but {list(theirs[name].shape)} in {other.checkpoint}"
                )
