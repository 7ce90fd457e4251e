"""Task kinds and the one way experiments, ``m3sb pareto`` and the demo load their tasks.

A config names a task's ``kind`` (default ``image_classification``); each kind is one
module of this package implementing :class:`Family`. A task marked ``control: true`` is
scored with every merge but takes no part in it (its model only lends its head).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from m3sb.errors import ConfigError
from m3sb.tasks import causal_lm, clip_zero_shot, harness, image_classification
from m3sb.tasks.cache import CachedSplit
from m3sb.tasks.data import HARNESS_KEYS, LM_KEYS, DatasetSpec, parse_dataset_spec
from m3sb.tasks.model import TaskModel, check_shared_backbone

DEFAULT_KIND = "image_classification"


class Family(Protocol):
    """What a model family provides: loading, data preparation, evaluation."""

    def load_task_model(
        self,
        checkpoint: str,
        trust_remote_code: bool = False,
        with_processor: bool = True,
        processor_checkpoint: str | None = None,
        base_checkpoint: str | None = None,
    ) -> TaskModel: ...

    def prepare(
        self,
        spec: DatasetSpec,
        task: TaskModel,
        cache_dir: str | Path | None = None,
        workers: int | None = None,
        log: Callable[[str], None] | None = None,
    ) -> CachedSplit: ...

    def logits_function(
        self, task: TaskModel, device: torch.device
    ) -> Callable[[torch.Tensor], torch.Tensor]: ...

    def evaluate(
        self,
        task: TaskModel,
        backbone: Mapping[str, torch.Tensor] | None,
        data: CachedSplit,
        device: torch.device,
        batch_size: int = 256,
        autocast_dtype: str = "none",
    ) -> dict[str, float]: ...

    def evaluate_candidates(
        self,
        task: TaskModel,
        flats: torch.Tensor,
        views: Callable[[torch.Tensor], dict[str, torch.Tensor]],
        data: CachedSplit,
        device: torch.device,
        batch_size: int = 256,
        autocast_dtype: str = "none",
    ) -> list[dict[str, float]]: ...

    def dataset_label(self, spec: DatasetSpec) -> str: ...


FAMILIES: dict[str, Family] = {
    image_classification.KIND: image_classification,
    clip_zero_shot.KIND: clip_zero_shot,
    causal_lm.KIND: causal_lm,
    harness.KIND: harness,
}
ZERO_SHOT_KEYS = ("class_names", "templates")


def check_kind(kind: str, where: str) -> str:
    """``kind`` if it is a known task kind; a one-line error naming the kinds otherwise."""
    if kind not in FAMILIES:
        raise ConfigError(f"{where}: unknown kind '{kind}'; choose one of: {', '.join(FAMILIES)}")
    return kind


@dataclass(frozen=True)
class TaskSpec:
    """One task as a config describes it: the model, its data, its kind, whether it is a control."""

    name: str
    checkpoint: str
    dataset: DatasetSpec
    kind: str = DEFAULT_KIND
    control: bool = False

    @property
    def family(self) -> Family:
        """The model family that loads and evaluates this task."""
        return FAMILIES[self.kind]


def parse_task_entry(entry: Mapping[str, Any], where: str) -> tuple[str, bool, DatasetSpec]:
    """A dataset entry of a config, with the task keys ``kind`` and ``control``: (kind, control, dataset)."""
    if not isinstance(entry, Mapping):
        raise ConfigError(f"{where}: expected a mapping, got {type(entry).__name__}")
    fields = dict(entry)
    kind = fields.pop("kind", DEFAULT_KIND)
    control = fields.pop("control", False)
    if not isinstance(kind, str):
        raise ConfigError(f"{where}: kind: expected a name, got {kind!r}")
    if not isinstance(control, bool):
        raise ConfigError(f"{where}: control: expected true or false, got {control!r}")
    dataset = parse_dataset_spec(fields, where)
    return check_kind_keys(check_kind(kind, where), dataset, where), control, dataset


def check_kind_keys(kind: str, dataset: DatasetSpec, where: str) -> str:
    """``kind`` if ``dataset`` uses only keys that kind reads; a one-line error otherwise."""
    if kind != clip_zero_shot.KIND:
        for key in ZERO_SHOT_KEYS:
            if getattr(dataset, key) is not None:
                raise ConfigError(f"{where}: {key}: only kind {clip_zero_shot.KIND} uses {key}")
    readers = {key: [causal_lm.KIND] for key in LM_KEYS}
    for key in HARNESS_KEYS:
        readers.setdefault(key, []).append(harness.KIND)
    for key, kinds in readers.items():
        if kind not in kinds and getattr(dataset, key) is not None:
            raise ConfigError(f"{where}: {key}: only kind {' and '.join(kinds)} uses {key}")
    return kind


@dataclass
class Task:
    """A loaded task: its model (own head), its preprocessed data, and how to evaluate it."""

    spec: TaskSpec
    model: TaskModel
    data: CachedSplit

    @property
    def name(self) -> str:
        """The task's name."""
        return self.spec.name

    @property
    def control(self) -> bool:
        """Whether the task is scored without taking part in the merge."""
        return self.spec.control

    def evaluate(
        self,
        backbone: Mapping[str, torch.Tensor] | None,
        device: torch.device,
        batch_size: int,
        autocast_dtype: str = "none",
    ) -> dict[str, float]:
        """Every metric with ``backbone`` (the model's own when None) and the task's own head."""
        return self.spec.family.evaluate(self.model, backbone, self.data, device, batch_size, autocast_dtype)

    def evaluate_candidates(
        self,
        flats: torch.Tensor,
        views: Callable[[torch.Tensor], dict[str, torch.Tensor]],
        device: torch.device,
        batch_size: int,
        autocast_dtype: str = "none",
    ) -> list[dict[str, float]]:
        """Every metric for each row of ``flats`` (B candidate backbones, flat) in shared passes."""
        return self.spec.family.evaluate_candidates(
            self.model, flats, views, self.data, device, batch_size, autocast_dtype
        )


@dataclass(frozen=True)
class LoadSettings:
    """How tasks are loaded: remote code, one processor for all, the cache, preprocessing workers."""

    trust_remote_code: bool = False
    processor_checkpoint: str | None = None
    cache_dir: str | None = None
    workers: int | None = None


def load_tasks(
    specs: Sequence[TaskSpec],
    base_checkpoint: str | None,
    settings: LoadSettings | None = None,
    log: Callable[[str], None] | None = None,
) -> tuple[list[Task], TaskModel | None]:
    """Load every task's model and preprocessed data, and the base model; backbones must match."""
    settings = settings or LoadSettings()
    models = [
        spec.family.load_task_model(
            spec.checkpoint,
            settings.trust_remote_code,
            processor_checkpoint=settings.processor_checkpoint,
            base_checkpoint=base_checkpoint,
        )
        for spec in specs
    ]
    base = None
    if base_checkpoint is not None:
        base = specs[0].family.load_task_model(
            base_checkpoint, settings.trust_remote_code, with_processor=False
        )
    check_shared_backbone([*models, *([base] if base is not None else [])])
    tasks = [
        Task(spec, model, spec.family.prepare(spec.dataset, model, settings.cache_dir, settings.workers, log))
        for spec, model in zip(specs, models, strict=True)
    ]
    return tasks, base
