"""The model-merging client of MAP: candidates built from flat task vectors, scored per task.

The base backbone and the T task vectors live on the device as one flat buffer each;
a candidate ``base + sum_i c_i tau_i`` is one fused ``addmv`` into a preallocated
buffer, and every task's classifier runs on views of that buffer through
``torch.func.functional_call`` (no copy into the model). Methods other than task
arithmetic build the candidate tensor by tensor with :func:`m3sb.methods.merge_group`,
with the coefficients as their per-model weights.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.func import functional_call

from m3sb.data import TaskInputs
from m3sb.errors import ConfigError
from m3sb.eval import classification_metrics
from m3sb.methods import get_method, merge_group
from m3sb.models import TaskModel

SCORE_METRICS = ("accuracy", "precision", "recall", "f1_score")
METRICS = (*SCORE_METRICS, "loss")


def check_metric(metric: str) -> str:
    """``metric`` if the evaluator produces it; a one-line error naming the choices otherwise."""
    if metric not in METRICS:
        raise ConfigError(
            f"metric '{metric}' is not one the evaluator produces; choose one of: {', '.join(METRICS)}"
        )
    return metric


def check_search_method(method_name: str, params: Mapping[str, Any], bounds: tuple[float, float]) -> None:
    """The method must take per-model weights (the coefficients) and accept ``params``."""
    method = get_method(method_name)
    if not method.uses_weights:
        raise ConfigError(
            f"merge_method '{method_name}' has no per-model weights for the coefficients to set"
        )
    if method.nonnegative_weights and bounds[0] < 0:
        raise ConfigError(f"merge_method '{method_name}' needs weights >= 0, but bounds start at {bounds[0]}")
    for key in params:
        if method.param(key) is None or key == "weight":
            allowed = ", ".join(p.name for p in method.all_params if p.name != "weight")
            raise ConfigError(
                f"parameters: unknown parameter '{key}' for '{method_name}'; allowed: {allowed or 'none'}"
            )


@dataclass(frozen=True)
class Layout:
    """Where each floating-point backbone tensor sits in the flat buffers."""

    names: tuple[str, ...]
    shapes: tuple[torch.Size, ...]
    offsets: tuple[int, ...]

    @property
    def size(self) -> int:
        """Number of elements of a flat buffer."""
        return self.offsets[-1]

    @classmethod
    def of(cls, backbone: Mapping[str, torch.Tensor]) -> Layout:
        """The layout of ``backbone``'s floating-point tensors, in its order."""
        names = tuple(name for name, tensor in backbone.items() if tensor.is_floating_point())
        shapes = tuple(backbone[name].shape for name in names)
        offsets = [0]
        for shape in shapes:
            offsets.append(offsets[-1] + shape.numel())
        return cls(names, shapes, tuple(offsets))

    def flatten(self, backbone: Mapping[str, torch.Tensor], device: torch.device) -> torch.Tensor:
        """One float32 vector of ``backbone``'s tensors, in layout order."""
        return torch.cat([backbone[name].reshape(-1).float() for name in self.names]).to(device)

    def views(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Tensors viewing ``flat`` (no copy), by name."""
        return {
            name: flat[start:end].view(shape)
            for name, shape, start, end in zip(
                self.names, self.shapes, self.offsets[:-1], self.offsets[1:], strict=True
            )
        }


class TaskVectorSpace:
    """The base backbone and T task vectors as flat device buffers; candidates on demand.

    This is a whole-model operation: it holds (T + 2) copies of the backbone in float32.
    """

    def __init__(
        self,
        base: Mapping[str, torch.Tensor],
        models: Sequence[Mapping[str, torch.Tensor]],
        device: torch.device,
    ) -> None:
        self.layout = Layout.of(base)
        self.device = device
        self.base = self.layout.flatten(base, device)
        self.vectors = torch.stack([self.layout.flatten(m, device) - self.base for m in models])
        self.buffer = torch.empty_like(self.base)
        self.fixed = {name: t.to(device) for name, t in base.items() if not t.is_floating_point()}

    @property
    def n_tasks(self) -> int:
        """How many task vectors there are."""
        return int(self.vectors.shape[0])

    def candidates(self, coefficients: np.ndarray) -> torch.Tensor:
        """``base + C @ tau`` for every row of ``coefficients`` (shape (B, T)): a (B, P) tensor."""
        weights = torch.as_tensor(np.asarray(coefficients, dtype=np.float32), device=self.device)
        return torch.addmm(self.base, weights, self.vectors)

    def candidate(self, coefficients: np.ndarray | Sequence[float]) -> dict[str, torch.Tensor]:
        """``base + sum_i c_i tau_i`` as views of one reused buffer (valid until the next call)."""
        weights = torch.as_tensor(np.asarray(coefficients, dtype=np.float32), device=self.device)
        torch.addmv(self.base, self.vectors.T, weights, out=self.buffer)
        return {**self.layout.views(self.buffer), **self.fixed}

    def gram(self) -> np.ndarray:
        """The T x T Gram matrix of the task vectors (float64), used to pair tasks in nested MAP."""
        vectors = self.vectors.double()
        return np.asarray((vectors @ vectors.T).cpu().numpy())


def merged_backbone(
    method_name: str,
    params: Mapping[str, Any],
    coefficients: Sequence[float],
    models: Sequence[TaskModel],
    base: TaskModel,
) -> dict[str, torch.Tensor]:
    """Any weighted method's merged backbone, tensor by tensor, with the coefficients as weights."""
    method = get_method(method_name)
    extra = dict(params)
    if method.space == "either":
        extra.setdefault("space", "task_vectors")
    merged = {}
    for name, reference in base.backbone.items():
        if not reference.is_floating_point():
            merged[name] = reference
            continue
        group = [model.weights[name] for model in models]
        merged[name] = merge_group(
            method_name, group, list(coefficients), reference, tensor_name=name, **extra
        )
    return merged


@torch.inference_mode()
def task_logits(
    task: TaskModel,
    backbone: Mapping[str, torch.Tensor],
    inputs: TaskInputs,
    device: torch.device,
    batch_size: int,
) -> torch.Tensor:
    """The task's classifier (its own head) run on ``backbone`` without loading it into the model."""
    model = task.model.to(device).eval()
    outputs = []
    for start in range(0, len(inputs.pixel_values), batch_size):
        batch = inputs.pixel_values[start : start + batch_size].to(device)
        result = functional_call(model, dict(backbone), args=(), kwargs={"pixel_values": batch})
        outputs.append(result.logits.float().cpu())
    return torch.cat(outputs)


@torch.inference_mode()
def batched_task_logits(
    task: TaskModel,
    flats: torch.Tensor,
    space: TaskVectorSpace,
    inputs: TaskInputs,
    device: torch.device,
    batch_size: int,
) -> torch.Tensor:
    """The task's classifier on B candidate backbones at once (``torch.func.vmap`` over the
    rows of ``flats``, shape (B, P)): logits of shape (B, N, classes)."""
    model = task.model.to(device).eval()

    def logits(flat: torch.Tensor, pixels: torch.Tensor) -> torch.Tensor:
        backbone = {**space.layout.views(flat), **space.fixed}
        return functional_call(model, backbone, args=(), kwargs={"pixel_values": pixels}).logits  # type: ignore[no-any-return]

    every = torch.func.vmap(logits, in_dims=(0, None))
    outputs = []
    with (
        warnings.catch_warnings()
    ):  # vmap falls back to a loop for CPU flash attention: correct, and said once here
        warnings.filterwarnings("ignore", message="There is a performance drop", category=UserWarning)
        for start in range(0, len(inputs.pixel_values), batch_size):
            pixels = inputs.pixel_values[start : start + batch_size].to(device)
            outputs.append(every(flats, pixels).float().cpu())
    return torch.cat(outputs, dim=1)


def task_metric(logits: torch.Tensor, labels: torch.Tensor, metric: str) -> float:
    """One metric from logits: the seed's scores in percent, or mean cross-entropy for ``loss``."""
    if metric == "loss":
        return float(torch.nn.functional.cross_entropy(logits, labels).item())
    return classification_metrics(logits.argmax(-1), labels)[metric]


class MergeEvaluator:
    """``evaluate(c) -> T metrics`` for MAP: merge with coefficients ``c``, score every task."""

    def __init__(
        self,
        tasks: Sequence[TaskModel],
        inputs: Sequence[TaskInputs],
        base: TaskModel,
        metric: str,
        device: torch.device,
        method_name: str = "task_arithmetic",
        params: Mapping[str, Any] | None = None,
        batch_size: int = 256,
        candidates_per_pass: int = 1,
    ) -> None:
        self.tasks, self.inputs, self.base = list(tasks), list(inputs), base
        for task in self.tasks:  # heads meet float32 candidate backbones: half-precision models too
            task.model.float()
        self.candidates_per_pass = candidates_per_pass
        self.metric = check_metric(metric)
        self.device = device
        self.method_name = method_name
        self.params = dict(params or {})
        self.batch_size = batch_size
        self.space = TaskVectorSpace(base.backbone, [t.backbone for t in self.tasks], device)
        self.fast = method_name == "task_arithmetic" and not self.params.get("normalize", False)
        self.scale = float(self.params.get("lambda", 1.0))

    def backbone(self, coefficients: Sequence[float] | np.ndarray) -> dict[str, torch.Tensor]:
        """The candidate backbone for ``coefficients`` (views of a reused buffer on the fast path)."""
        if self.fast:
            return self.space.candidate(self.scale * np.asarray(coefficients, dtype=float))
        merged = merged_backbone(self.method_name, self.params, list(coefficients), self.tasks, self.base)
        return {name: tensor.to(self.device) for name, tensor in merged.items()}

    def score(self, backbone: Mapping[str, torch.Tensor]) -> np.ndarray:
        """Every task's metric with ``backbone`` and its own head."""
        return np.array(
            [
                task_metric(
                    task_logits(task, backbone, data, self.device, self.batch_size), data.labels, self.metric
                )
                for task, data in zip(self.tasks, self.inputs, strict=True)
            ]
        )

    def __call__(self, coefficients: np.ndarray) -> np.ndarray:
        """The T metrics of the candidate merged with ``coefficients``."""
        return self.score(self.backbone(coefficients))

    def evaluate_many(self, points: np.ndarray) -> Iterator[np.ndarray]:
        """The metrics of each row of ``points``, in order.

        On the task-arithmetic path with ``candidates_per_pass`` > 1, that many candidates
        share each forward pass (vmap over their stacked backbones): worth it on a GPU;
        on a small CPU one candidate at a time is as fast.
        """
        if not self.fast or self.candidates_per_pass <= 1:
            yield from (self(point) for point in points)
            return
        for start in range(0, len(points), self.candidates_per_pass):
            chunk = self.scale * np.asarray(points[start : start + self.candidates_per_pass], dtype=float)
            flats = self.space.candidates(chunk)
            logits = [
                batched_task_logits(task, flats, self.space, data, self.device, self.batch_size)
                for task, data in zip(self.tasks, self.inputs, strict=True)
            ]
            for row in range(len(chunk)):
                yield np.array(
                    [
                        task_metric(batch[row], data.labels, self.metric)
                        for batch, data in zip(logits, self.inputs, strict=True)
                    ]
                )
