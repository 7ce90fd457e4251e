"""Scoring on a task: the seed's metrics (percent, macro averages) and the mean loss, from
batches of logits; and the autocast choices of forward passes."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable
from typing import Any

import torch

from m3sb.errors import ConfigError
from m3sb.memory import steady_heap
from m3sb.tasks.cache import CachedSplit

AUTOCAST_DTYPES = ("none", "float16", "bfloat16")
SCORE_METRICS = ("accuracy", "precision", "recall", "f1_score")
METRICS = (*SCORE_METRICS, "loss")


def check_autocast(name: str) -> str:
    """``name`` if it is an autocast choice; a one-line error naming the choices otherwise."""
    if name not in AUTOCAST_DTYPES:
        raise ConfigError(f"autocast '{name}': choose one of {', '.join(AUTOCAST_DTYPES)}")
    return name


def check_metric(metric: str) -> str:
    """``metric`` if evaluations produce it; a one-line error naming the choices otherwise."""
    if metric not in METRICS:
        raise ConfigError(
            f"metric '{metric}' is not one the evaluator produces; choose one of: {', '.join(METRICS)}"
        )
    return metric


def autocast(device: torch.device, dtype_name: str) -> contextlib.AbstractContextManager[Any]:
    """Forward passes in ``dtype_name`` (float16 or bfloat16) where it is safe; nothing for ``none``."""
    if check_autocast(dtype_name) == "none":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=getattr(torch, dtype_name))


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


class ClassificationTally:
    """Predictions and summed cross-entropy gathered batch by batch; every metric at the end."""

    def __init__(self) -> None:
        self.predictions: list[torch.Tensor] = []
        self.labels: list[torch.Tensor] = []
        self.loss_sum = 0.0

    def add(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        """One batch of logits (any device) and its labels (CPU)."""
        logits = logits.float()
        self.predictions.append(logits.argmax(-1).cpu())
        self.labels.append(labels.clone())
        loss = torch.nn.functional.cross_entropy(logits, labels.to(logits.device), reduction="sum")
        self.loss_sum += float(loss.double().item())

    def metrics(self) -> dict[str, float]:
        """Accuracy, macro precision/recall/F1 (percent) and the mean cross-entropy ``loss``."""
        labels = torch.cat(self.labels)
        return {
            **classification_metrics(torch.cat(self.predictions), labels),
            "loss": self.loss_sum / max(1, len(labels)),
        }


def score_split(
    logits_of: Callable[[torch.Tensor], torch.Tensor],
    data: CachedSplit,
    device: torch.device,
    batch_size: int,
    autocast_dtype: str = "none",
) -> dict[str, float]:
    """Every metric of ``logits_of`` (a batch of inputs on ``device`` to logits) over ``data``, streamed."""
    steady_heap()
    tally = ClassificationTally()
    with torch.inference_mode():
        for values, labels in data.batches(batch_size):
            with autocast(device, autocast_dtype):
                logits = logits_of(values.to(device))
            tally.add(logits, labels)
    return tally.metrics()


def score_candidates(
    logits_of: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    flats: torch.Tensor,
    data: CachedSplit,
    device: torch.device,
    batch_size: int,
    autocast_dtype: str = "none",
) -> list[dict[str, float]]:
    """Every metric for each row of ``flats`` (B flat candidates) at once: ``vmap`` of
    ``logits_of(row, inputs)`` over the rows, in shared streamed passes over ``data``."""
    steady_heap()
    every = torch.func.vmap(logits_of, in_dims=(0, None))
    tallies = [ClassificationTally() for _ in range(len(flats))]
    with torch.inference_mode(), warnings.catch_warnings():
        # vmap falls back to a loop for CPU flash attention: correct, said here
        warnings.filterwarnings("ignore", message="There is a performance drop", category=UserWarning)
        for values, labels in data.batches(batch_size):
            with autocast(device, autocast_dtype):
                batch = every(flats, values.to(device))
            for tally, candidate in zip(tallies, batch, strict=True):
                tally.add(candidate, labels)
    return [tally.metrics() for tally in tallies]
