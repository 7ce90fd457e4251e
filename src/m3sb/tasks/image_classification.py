"""The task side of a merge: load image classifiers and swap their backbones.

A classifier is a backbone shared by every task and a head of its own. Tensors are
matched by name, never by position; the head is every tensor under a classification
module (``classifier``, ``head``, ``fc``, ``score``), so this works for any
``AutoModelForImageClassification`` whose backbone the checkpoints share.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from m3sb.errors import CheckpointError, MergeError, first_line

HEAD_MODULES = ("classifier", "head", "fc", "score", "distillation_classifier", "classifier_distill")


def is_head(name: str) -> bool:
    """Whether a tensor belongs to the classification head."""
    return name.split(".", 1)[0] in HEAD_MODULES


@dataclass
class TaskModel:
    """A loaded classifier, its image processor, and a copy of its own weights."""

    checkpoint: str
    model: Any
    processor: Any
    weights: dict[str, torch.Tensor]

    @property
    def backbone(self) -> dict[str, torch.Tensor]:
        """The model's own backbone tensors, by name."""
        return {name: tensor for name, tensor in self.weights.items() if not is_head(name)}

    @property
    def num_labels(self) -> int:
        """How many classes the head predicts."""
        return int(self.model.config.num_labels)

    @property
    def num_channels(self) -> int:
        """Colour channels the model expects (1 for greyscale, 3 for RGB)."""
        return int(getattr(self.model.config, "num_channels", 3))

    def use_backbone(self, backbone: dict[str, torch.Tensor] | None) -> Any:
        """The model with ``backbone`` (or its own, when None) and its own head; returned in eval mode."""
        state = self.weights if backbone is None else {**self.weights, **backbone}
        self.model.load_state_dict(state, strict=True)
        return self.model.eval()


def load_task_model(
    checkpoint: str, trust_remote_code: bool = False, with_processor: bool = True
) -> TaskModel:
    """Load an image classifier (and its image processor) from a folder or a hub id."""
    from transformers import AutoImageProcessor, AutoModelForImageClassification
    from transformers.utils import logging

    logging.set_verbosity_error()  # type: ignore[no-untyped-call]
    logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    try:
        model = AutoModelForImageClassification.from_pretrained(
            checkpoint, trust_remote_code=trust_remote_code
        )
        processor = AutoImageProcessor.from_pretrained(checkpoint) if with_processor else None  # type: ignore[no-untyped-call]
    except Exception as error:  # noqa: BLE001 (any loading failure becomes one line)
        raise CheckpointError(
            f"{checkpoint}: cannot load an image classifier ({first_line(error)[:200]})"
        ) from None
    weights = {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}
    return TaskModel(checkpoint, model.eval(), processor, weights)


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
