"""Scoring a classifier on a task: predictions and the seed's metrics (percent, macro averages)."""

from __future__ import annotations

from typing import Any

import torch


@torch.inference_mode()
def predict(
    model: Any, pixel_values: torch.Tensor, device: torch.device, batch_size: int = 256
) -> torch.Tensor:
    """Class predictions for every image, in batches."""
    model.to(device)
    predictions = []
    for start in range(0, len(pixel_values), batch_size):
        batch = pixel_values[start : start + batch_size].to(device)
        predictions.append(model(pixel_values=batch).logits.argmax(-1).cpu())
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
