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
    decides which are which. ``extra`` holds what the family keeps beside the weights
    (for CLIP: where the text tower comes from, and the zero-shot head built from it).
    ``aliases`` names the model's tensors tied to another one (a language model's
    ``lm_head`` sharing its embedding): they are in neither the weights nor the backbone.
    """

    checkpoint: str
    model: Any
    processor: Any
    weights: dict[str, torch.Tensor]
    own: frozenset[str] = field(default_factory=frozenset)
    processor_source: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    aliases: frozenset[str] = field(default_factory=frozenset)

    @property
    def backbone(self) -> dict[str, torch.Tensor]:
        """The model's own backbone tensors, by name."""
        return {name: tensor for name, tensor in self.weights.items() if name not in self.own}

    def use_backbone(self, backbone: Mapping[str, torch.Tensor] | None) -> Any:
        """The model with ``backbone`` (or its own, when None) and its own tensors; in eval mode."""
        state = self.weights if backbone is None else {**self.weights, **backbone}
        missing, unexpected = self.model.load_state_dict(state, strict=False)
        if set(missing) - self.aliases or unexpected:
            wrong = sorted(set(missing) - self.aliases) or sorted(unexpected)
            raise MergeError(f"{self.checkpoint}: the weights do not fit the model (tensor '{wrong[0]}')")
        return self.model.eval()


def quiet_transformers() -> None:
    """Silence transformers' loading chatter (warnings and progress bars)."""
    from transformers.utils import logging

    logging.set_verbosity_error()  # type: ignore[no-untyped-call]
    logging.disable_progress_bar()  # type: ignore[no-untyped-call]


def as_parameters_of(model: Any, backbone: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``backbone``'s tensors on the device and in the dtype of ``model``'s own (as ``load_state_dict``
    would copy them); tensors already there are used as they are."""
    own = model.state_dict(keep_vars=True)
    return {
        name: tensor.to(device=own[name].device, dtype=own[name].dtype) for name, tensor in backbone.items()
    }


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
