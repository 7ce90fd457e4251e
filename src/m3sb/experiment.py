"""M3SB experiments: merge the task models' backbones, rebuild one classifier per task, score.

``Experiment`` merges full weights; ``TaskVectorExperiment`` merges task vectors (model -
base) and adds the merge back to the base. Every checkpoint and dataset is loaded once
per run; the fine-tuned models and the base (with each task's head) are scored too, as
reference rows, and each row carries its accuracy normalised by the fine-tuned one.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from m3sb.data import DatasetSpec, TaskInputs, load_task_data, parse_dataset_spec, prepare_inputs
from m3sb.devices import resolve_device
from m3sb.errors import ConfigError
from m3sb.eval import classification_metrics, predict
from m3sb.methods import get_method, merge_group
from m3sb.models import TaskModel, check_shared_backbone, load_task_model

RESULT_COLUMNS = (
    "experiment",
    "merge_method",
    "dataset",
    "accuracy",
    "precision",
    "recall",
    "f1_score",
    "normalized_accuracy",
    "samples",
    "skipped_images",
)
FINETUNED, BASE = "finetuned", "base"


def _dataset_label(spec: DatasetSpec) -> str:
    """A short name for a dataset: its folder name or hub id."""
    path = Path(spec.dataset_name)
    return path.name if path.exists() else spec.dataset_name


class Experiment:
    """Merge the models' backbones with each configured method and score every task.

    ``merge_configs`` maps a label to the method's parameters: ``{"ties": {"weights":
    [...], "density": 0.5}}``; the label is the method's name unless the parameters
    name one with ``method``. ``datasets_config`` lists one dataset per model, in order.
    """

    space = "weights"

    def __init__(
        self,
        name: str,
        model_checkpoints: Sequence[str],
        datasets_config: Sequence[Mapping[str, Any]],
        merge_configs: Mapping[str, Mapping[str, Any]],
        base_model_checkpoint: str | None = None,
        device: str = "cpu",
        batch_size: int = 256,
        trust_remote_code: bool = False,
        log: Callable[[str], None] | None = None,
    ) -> None:
        if not model_checkpoints:
            raise ConfigError(f"experiment '{name}': no model_checkpoints")
        if len(datasets_config) != len(model_checkpoints):
            raise ConfigError(
                f"experiment '{name}': {len(model_checkpoints)} model_checkpoints but "
                f"{len(datasets_config)} datasets_config entries; give one dataset per model"
            )
        self.name = name
        self.model_checkpoints = list(model_checkpoints)
        self.datasets = [
            parse_dataset_spec(d, f"datasets_config[{i}]") for i, d in enumerate(datasets_config)
        ]
        self.merge_configs = {label: dict(params) for label, params in merge_configs.items()}
        self.base_model_checkpoint = base_model_checkpoint
        self.device = resolve_device(device)
        self.batch_size = batch_size
        self.trust_remote_code = trust_remote_code
        self._log = log or (lambda _: None)
        self._rows: list[dict[str, Any]] = []
        self.points: dict[str, torch.Tensor] = {}
        self.point_kinds: dict[str, str] = {}
        self._check_merge_configs()

    def _check_merge_configs(self) -> None:
        """Method names, weight counts and base requirements, before anything is loaded."""
        count = len(self.model_checkpoints)
        for label, params in self.merge_configs.items():
            method = get_method(str(params.get("method", label)))
            for key in params:
                if key not in ("method", "weights") and method.param(key) is None:
                    allowed = ", ".join(p.name for p in method.all_params if p.name != "weight")
                    raise ConfigError(
                        f"merge_configs['{label}']: unknown parameter '{key}' for '{method.name}'; "
                        f"allowed: {allowed}"
                    )
            weights = params.get("weights")
            if weights is not None and len(weights) != count:
                raise ConfigError(
                    f"merge_configs['{label}']: {len(weights)} weights for {count} models; give one per model"
                )
            space = self.space if method.space == "either" else None
            if method.merges_task_vectors(space) and self.base_model_checkpoint is None:
                raise ConfigError(
                    f"merge_configs['{label}']: method '{method.name}' needs base_model_checkpoint"
                )

    def _merge(
        self, label: str, tasks: Sequence[TaskModel], base: TaskModel | None
    ) -> dict[str, torch.Tensor]:
        """The merged backbone for one merge config."""
        params = dict(self.merge_configs[label])
        method = get_method(str(params.pop("method", label)))
        weights = params.pop("weights", None)
        if method.space == "either":
            params.setdefault("space", self.space)
        merged = {}
        base_backbone = base.backbone if base is not None else None
        for name, reference in tasks[0].backbone.items():
            if not reference.is_floating_point():
                merged[name] = reference
                continue
            group = [task.weights[name] for task in tasks]
            base_tensor = base_backbone[name] if base_backbone is not None else None
            merged[name] = merge_group(method.name, group, weights, base_tensor, tensor_name=name, **params)
        return merged

    def _score(
        self, task: TaskModel, inputs: TaskInputs, backbone: dict[str, torch.Tensor] | None
    ) -> dict[str, float]:
        model = task.use_backbone(backbone)
        return classification_metrics(
            predict(model, inputs.pixel_values, self.device, self.batch_size), inputs.labels
        )

    def run(self) -> Any:
        """Load everything once, score the references and every merge; returns the results table."""
        tasks = [load_task_model(c, self.trust_remote_code) for c in self.model_checkpoints]
        base = None
        if self.base_model_checkpoint is not None:
            base = load_task_model(self.base_model_checkpoint, self.trust_remote_code, with_processor=False)
        check_shared_backbone([*tasks, *([base] if base else [])])
        inputs = []
        for task, spec in zip(tasks, self.datasets, strict=True):
            dataset = load_task_data(spec)
            inputs.append(prepare_inputs(dataset, spec, task.processor, task.num_channels, task.num_labels))
        self._rows = []
        self.points, self.point_kinds = {}, {}
        if base is not None:
            self._keep_point(BASE, "base", base.backbone)
        for task, spec in zip(tasks, self.datasets, strict=True):
            self._keep_point(_dataset_label(spec), "finetuned", task.backbone)
        finetuned: list[float] = []
        for task, spec, data in zip(tasks, self.datasets, inputs, strict=True):
            metrics = self._score(task, data, None)
            finetuned.append(metrics["accuracy"])
            self._record(FINETUNED, spec, data, metrics, metrics["accuracy"])
        if base is not None:
            for task, spec, data, reference in zip(tasks, self.datasets, inputs, finetuned, strict=True):
                self._record(BASE, spec, data, self._score(task, data, base.backbone), reference)
        for label in self.merge_configs:
            self._log(f"merging with {label}")
            backbone = self._merge(label, tasks, base)
            self._keep_point(label, "merge", backbone)
            for task, spec, data, reference in zip(tasks, self.datasets, inputs, finetuned, strict=True):
                self._record(label, spec, data, self._score(task, data, backbone), reference)
        for task in tasks:
            task.use_backbone(None)
        return self.get_results_df()

    def _keep_point(self, label: str, kind: str, backbone: dict[str, torch.Tensor]) -> None:
        """Keep a flattened copy of a backbone for the plot of the models on the sphere."""
        floats = [tensor.reshape(-1).float() for tensor in backbone.values() if tensor.is_floating_point()]
        self.points[label] = torch.cat(floats)
        self.point_kinds[label] = kind

    def _record(
        self, label: str, spec: DatasetSpec, data: TaskInputs, metrics: dict[str, float], finetuned: float
    ) -> None:
        normalized = 100.0 * metrics["accuracy"] / finetuned if finetuned > 0 else float("nan")
        self._rows.append(
            {
                "experiment": self.name,
                "merge_method": label,
                "dataset": _dataset_label(spec),
                **metrics,
                "normalized_accuracy": normalized,
                "samples": len(data.labels),
                "skipped_images": data.skipped,
            }
        )

    def get_results_df(self) -> Any:
        """The results as a pandas DataFrame (one row per method and dataset)."""
        import pandas as pd

        return pd.DataFrame(self._rows, columns=list(RESULT_COLUMNS))


class TaskVectorExperiment(Experiment):
    """Like :class:`Experiment`, merging task vectors (model - base) and adding them to the base."""

    space = "task_vectors"


__all__ = ["Experiment", "TaskVectorExperiment"]
