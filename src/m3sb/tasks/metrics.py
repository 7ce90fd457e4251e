"""Scoring a classifier on a task: predictions and the seed's metrics (percent, macro averages)."""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from m3sb.errors import ConfigError

AUTOCAST_DTYPES = ("none", "float16", "bfloat16")


def check_autocast(name: str) -> str:
    """``name`` if it is an autocast choice; a one-line error naming the choices otherwise."""
    if name not in AUTOCAST_DTYPES:
        raise ConfigError(f"autocast '{name}': choose one of {', '.join(AUTOCAST_DTYPES)}")
    return name


def autocast(device: torch.device, dtype_name: str) -> contextlib.AbstractContextManager[Any]:
    """Forward passes in ``dtype_name`` (float16 or bfloat16) where it is safe; nothing for ``none``."""
    if check_autocast(dtype_name) == "none":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=getattr(torch, dtype_name))


@torch.inference_mode()
def predict(
    model: Any,
    pixel_values: torch.Tensor,
    device: torch.device,
    batch_size: int = 256,
    autocast_dtype: str = "none",
) -> torch.Tensor:
    """Class predictions for every image, in batches (under autocast when asked)."""
    model.to(device)
    predictions = []
    for start in range(0, len(pixel_values), batch_size):
        batch = pixel_values[start : start + batch_size].to(device)
        with autocast(device, autocast_dtype):
            logits = model(pixel_values=batch).logits
        predictions.append(logits.float().argmax(-1).cpu())
    return torch.cat(predictions)


def classification_metrics(predictions: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Accuracy and macro precision, recall and F1, in percent (classes never predicted count as 0)."""
    from sklearn.metrics import accuracy_score, precision_recall_fscore_support

    truth, guess = labels.numpy(), predictions.numpy()
    precision, recall, f1, _ = precision_recall_fscore_support(truth, guess, average="macro", zero_division=0)
    return {
        "accuracy": 100.0 * float(accuracy_score(truth, guess)),
        "precision": 100.0 * float(precision),
        "recall": 100.0 * float(recall),
        "f1_score": 100.0 * float(f1),
    }
