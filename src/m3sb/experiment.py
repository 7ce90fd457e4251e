"""M3SB experiments: merge the task models' backbones, rebuild one classifier per task, score.

``Experiment`` merges full weights; ``TaskVectorExperiment`` merges task vectors (model -
base) and adds the merge back to the base. Every checkpoint and dataset is loaded once
per run; the fine-tuned models and the base (with each task's head) are scored too, as
reference rows, and each row carries its accuracy normalised by the fine-tuned one.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from m3sb.checkpoints import append_text_durably, write_text_atomic
from m3sb.config import StatisticsSettings
from m3sb.devices import resolve_device
from m3sb.errors import ConfigError
from m3sb.methods import get_method, merge_backbones
from m3sb.methods.registry import check_param_values, check_weights
from m3sb.statistics import whole_norm
from m3sb.tasks.metrics import check_autocast
from m3sb.tasks.model import TaskModel
from m3sb.tasks.registry import LoadSettings, Task, TaskSpec, load_tasks, parse_task_entry

RESULT_COLUMNS = (
    "experiment",
    "merge_method",
    "dataset",
    "accuracy",
    "precision",
    "recall",
    "f1_score",
    "loss",
    "normalized_accuracy",
    "samples",
    "skipped_images",
    "control",
)
FINETUNED, BASE = "finetuned", "base"
SCORES = "scores.jsonl"  # the record of finished scores that makes ``m3sb experiment`` resumable


class Experiment:
    """Merge the models' backbones with each configured method and score every task.

    ``merge_configs`` maps a label to the method's parameters: ``{"ties": {"weights":
    [...], "density": 0.5}}``; the label is the method's name unless the parameters
    name one with ``method``. ``datasets_config`` lists one dataset per model, in order;
    an entry may say ``kind`` (the task kind, default ``image_classification``) and
    ``control: true`` (the model is not merged; its task is scored with every merge, and
    the merge's ``weights`` list one weight per merged model). Evaluation runs on
    ``device`` (``auto``: the GPU when there is one), streaming each split from the
    preprocessing cache (``cache_dir``, default ``$M3SB_CACHE_DIR`` or ``~/.cache/m3sb``).
    A fine-tune without an image processor uses the base model's, and
    ``processor_checkpoint`` makes one processor serve every task. The data-dependent
    methods (regmean, fisher) compute each merged model's statistics on its task's
    ``statistics`` split (default: the first 256 examples of ``train``).
    """

    space = "weights"

    def __init__(
        self,
        name: str,
        model_checkpoints: Sequence[str],
        datasets_config: Sequence[Mapping[str, Any]],
        merge_configs: Mapping[str, Mapping[str, Any]],
        base_model_checkpoint: str | None = None,
        device: str = "auto",
        batch_size: int = 256,
        trust_remote_code: bool = False,
        log: Callable[[str], None] | None = None,
        autocast: str = "none",
        processor_checkpoint: str | None = None,
        cache_dir: str | Path | None = None,
        statistics: StatisticsSettings | Mapping[str, Any] | None = None,
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
        self.task_specs = [
            _task_spec(checkpoint, entry, f"datasets_config[{i}]")
            for i, (checkpoint, entry) in enumerate(zip(model_checkpoints, datasets_config, strict=True))
        ]
        self.datasets = [spec.dataset for spec in self.task_specs]
        if all(spec.control for spec in self.task_specs):
            raise ConfigError(f"experiment '{name}': every task is a control; merge at least one model")
        self.merge_configs = {label: dict(params) for label, params in merge_configs.items()}
        self.base_model_checkpoint = base_model_checkpoint
        self.device_name = device
        self.batch_size = batch_size
        self.autocast = check_autocast(autocast)
        self.trust_remote_code = trust_remote_code
        self.processor_checkpoint = processor_checkpoint
        self.cache_dir = None if cache_dir is None else str(cache_dir)
        self._log = log or (lambda _: None)
        self._rows: list[dict[str, Any]] = []
        self.points: dict[str, torch.Tensor] = {}
        self.point_kinds: dict[str, str] = {}
        self.statistics = _statistics_settings(statistics)
        self._check_merge_configs()

    def _check_merge_configs(self) -> None:
        """Method names, weight counts and base requirements, before anything is loaded."""
        for label, params in self.merge_configs.items():
            where = f"merge_configs['{label}']"
            if label in (FINETUNED, BASE):
                raise ConfigError(f"{where}: '{label}' names the reference rows; give the merge another name")
            method = get_method(str(params.get("method", label)))
            settings = {k: v for k, v in params.items() if k not in ("method", "weights")}
            check_param_values(method, settings, where, sum(not t.control for t in self.task_specs))
            weights = params.get("weights")
            if weights is not None:
                self._check_weights(method, weights, settings, where)
            space = self.space if method.space == "either" else None
            if method.merges_task_vectors(space) and self.base_model_checkpoint is None:
                raise ConfigError(
                    f"merge_configs['{label}']: method '{method.name}' needs base_model_checkpoint"
                )

    def _check_weights(self, method: Any, weights: Any, settings: dict[str, Any], where: str) -> None:
        """A list of one valid weight per model that the method can use."""
        weight = method.param("weight")
        if weight is None:
            raise ConfigError(f"{where}: method '{method.name}' takes no weights")
        count = sum(not spec.control for spec in self.task_specs)
        merged = "merged " if count < len(self.task_specs) else ""
        if not isinstance(weights, list | tuple):
            raise ConfigError(f"{where}: weights must be a list of {count} numbers, one per {merged}model")
        if len(weights) != count:
            raise ConfigError(
                f"{where}: {len(weights)} weights for {count} {merged}models; give one per {merged}model"
                + (" (control tasks take none)" if merged else "")
            )
        checked = [float(weight.check(value, where)) for value in weights]
        normalize = method.param("normalize")
        default = normalize.default if normalize is not None else None
        check_weights(method, checked, settings.get("normalize", default), f"in {where}")

    def run(
        self,
        executor: str = "local",
        ray_address: str | None = None,
        workers: int | None = None,
        record: Path | None = None,
    ) -> Any:
        """Load everything once, score the references and every merge; returns the results table.

        The scoring runs on ``executor`` (``local`` or ``ray``). With ``record`` (a JSON-lines
        file) each finished merge's rows are appended to it as soon as they are known, and
        a rerun with the same record reuses them instead of scoring that merge again.
        """
        from m3sb.executors import check_executor, open_executor

        kind = check_executor(executor, ray_address)
        labels = [FINETUNED, *([BASE] if self.base_model_checkpoint else []), *self.merge_configs]
        configs = {label: self.merge_configs.get(label) for label in labels}
        keeper = ExperimentRecord(record, self._fingerprint(), configs) if record is not None else None
        done = keeper.load() if keeper is not None else {}
        if done:
            self._log(f"resuming: {len(done)} of {len(labels)} scored in {record}")
        todo = [label for label in labels if label not in done]
        scored: dict[str, list[dict[str, float]]] = dict(done)
        points: dict[str, np.ndarray] = {}
        if not todo:
            problem = self._load()
        else:
            with open_executor(kind, self.device_name, ray_address, workers) as pool:  # checked first
                problem = self._load()
                pool.start(problem)
                if keeper is not None:
                    keeper.start(done)
                for label, outcome in zip(todo, pool.map(todo), strict=True):
                    self._log(f"scored {label}")
                    scored[label] = outcome.metrics
                    if outcome.point is not None:
                        points[label] = outcome.point
                    if keeper is not None:
                        keeper.append(label, outcome.metrics)
        self._collect(problem, labels, scored, points)
        return self.get_results_df()

    def _load(self) -> ExperimentProblem:
        """The task models, the base and the preprocessed task data, loaded once."""
        settings = LoadSettings(self.trust_remote_code, self.processor_checkpoint, self.cache_dir)
        tasks, base = load_tasks(self.task_specs, self.base_model_checkpoint, settings, self._log)
        problem = ExperimentProblem(
            tasks, base, self.merge_configs, self.space, self.batch_size, self.autocast
        )
        from m3sb.statistics import tasks_statistics

        device = resolve_device(self.device_name)
        for kind in self._statistics_kinds():
            if kind == "gram_plusplus":  # measured through each merge: one set per merge config
                continue
            self._log(
                f"computing {kind} statistics of {len(problem.merged)} models "
                f"on their {self.statistics.split} splits"
            )
            problem.statistics[kind] = tasks_statistics(
                problem.merged, kind, self.statistics, self.cache_dir, device
            )
        for label, params in self.merge_configs.items():
            if get_method(str(params.get("method", label))).statistics == "gram_plusplus":
                self._log(f"{label}: measuring each layer's inputs through the merged earlier layers")
                problem.statistics[label] = tasks_statistics(
                    problem.merged, "gram_plusplus", self.statistics, self.cache_dir, device, params
                )
        return problem

    def _statistics_kinds(self) -> list[str]:
        """The kinds of statistics the configured merges need."""
        kinds = (
            get_method(str(params.get("method", label))).statistics
            for label, params in self.merge_configs.items()
        )
        return sorted({kind for kind in kinds if kind is not None})

    def _fingerprint(self) -> dict[str, Any]:
        """What decides the scores: a record made under another one is not reused."""
        return {
            "space": self.space,
            "model_checkpoints": self.model_checkpoints,
            "base_model_checkpoint": self.base_model_checkpoint,
            "datasets": [spec.dataset.model_dump() for spec in self.task_specs],
            "kinds": [spec.kind for spec in self.task_specs],
            "controls": [spec.control for spec in self.task_specs],
            "processor_checkpoint": self.processor_checkpoint,
            "autocast": self.autocast,
            **({"statistics": self.statistics.model_dump()} if self._statistics_kinds() else {}),
        }

    def _collect(
        self,
        problem: ExperimentProblem,
        labels: Sequence[str],
        scored: Mapping[str, list[dict[str, float]]],
        points: dict[str, np.ndarray],
    ) -> None:
        """The rows of every label, in order, and the points of the plot of the models."""
        self._rows = []
        self.points, self.point_kinds = {}, {}
        if problem.base is not None:
            self._keep_point(BASE, "base", flatten_backbone(problem.base.backbone))
        for task in problem.merged:
            self._keep_point(task.name, "finetuned", flatten_backbone(task.model.backbone))
        finetuned = [metrics["accuracy"] for metrics in scored[FINETUNED]]
        for label in labels:
            if label not in (FINETUNED, BASE):
                point = points[label] if label in points else flatten_backbone(problem.merge(label))
                self._keep_point(label, "merge", point)
            for task, metrics, reference in zip(problem.tasks, scored[label], finetuned, strict=True):
                self._record(label, task, metrics, reference)

    def _keep_point(self, label: str, kind: str, point: np.ndarray) -> None:
        """Keep a flattened backbone for the plot of the models on the sphere."""
        self.points[label] = torch.from_numpy(np.array(point))  # a copy: workers' arrays are read-only
        self.point_kinds[label] = kind

    def _record(self, label: str, task: Task, metrics: dict[str, float], finetuned: float) -> None:
        normalized = 100.0 * metrics["accuracy"] / finetuned if finetuned > 0 else float("nan")
        self._rows.append(
            {
                "experiment": self.name,
                "merge_method": label,
                "dataset": task.name,
                **metrics,
                "normalized_accuracy": normalized,
                "samples": task.data.count,
                "skipped_images": task.data.skipped,
                "control": task.control,
            }
        )

    def get_results_df(self) -> Any:
        """The results as a pandas DataFrame (one row per method and dataset)."""
        import pandas as pd

        return pd.DataFrame(self._rows, columns=list(RESULT_COLUMNS))


def flatten_backbone(backbone: Mapping[str, torch.Tensor]) -> np.ndarray:
    """A backbone's floating-point tensors as one float32 vector (a point of the plot)."""
    floats = [tensor.reshape(-1).float() for tensor in backbone.values() if tensor.is_floating_point()]
    return torch.cat(floats).numpy()


@dataclass(frozen=True)
class ScoredMerge:
    """A worker's answer for one label: each task's metrics, and the merged backbone flattened."""

    metrics: list[dict[str, float]]
    point: np.ndarray | None


@dataclass
class ExperimentProblem:
    """What scoring an experiment needs, device-free and picklable (what executors ship)."""

    tasks: list[Task]
    base: TaskModel | None
    merge_configs: dict[str, dict[str, Any]]
    space: str
    batch_size: int
    autocast: str
    statistics: dict[str, list[dict[str, torch.Tensor]]] = field(default_factory=dict)  # per model, by kind
    # (gram_plusplus: by merge label, as they depend on the merge)

    @property
    def merged(self) -> list[Task]:
        """The tasks whose models take part in the merges (every task but the controls)."""
        return [task for task in self.tasks if not task.control]

    def build(self, device: str) -> ExperimentWorker:
        """The worker scoring on ``device``."""
        return ExperimentWorker(self, resolve_device(device))

    def merge(self, label: str) -> dict[str, torch.Tensor]:
        """The merged backbone for one merge config."""
        params = dict(self.merge_configs[label])
        method = get_method(str(params.pop("method", label)))
        weights = params.pop("weights", None)
        if method.space == "either":
            params.setdefault("space", self.space)
        merged = self.merged
        base = self.base.backbone if self.base is not None else None
        if method.space == "if_base" and self.space == "weights":
            base = None  # the base would make these methods merge task vectors
        key = label if method.statistics == "gram_plusplus" else method.statistics  # per merge, or per kind
        statistics = self.statistics.get(key, []) if key else []
        norms = [whole_norm(own) for own in statistics] if method.statistics == "fisher" else []
        return merge_backbones(
            method.name,
            merged[0].model.backbone,
            [task.model.weights for task in merged],
            weights,
            base,
            statistics,
            norms,
            **params,
        )


class ExperimentWorker:
    """Scores a label's backbone on every task: the fine-tunes' own, the base's, or a merge's."""

    def __init__(self, problem: ExperimentProblem, device: torch.device) -> None:
        self.problem = problem
        self.device = device

    def score(self, backbone: Mapping[str, torch.Tensor] | None) -> list[dict[str, float]]:
        """Every task's metrics with ``backbone`` (each task's own when None) and its own head."""
        problem = self.problem
        return [
            task.evaluate(backbone, self.device, problem.batch_size, problem.autocast)
            for task in problem.tasks
        ]

    def run(self, label: str) -> ScoredMerge:
        """The metrics of every task for ``label`` (``finetuned``, ``base`` or a merge config)."""
        problem = self.problem
        if label == FINETUNED:
            return ScoredMerge(self.score(None), None)
        if label == BASE:
            assert problem.base is not None
            return ScoredMerge(self.score(problem.base.backbone), None)
        backbone = problem.merge(label)
        return ScoredMerge(self.score(backbone), flatten_backbone(backbone))


def _statistics_settings(value: StatisticsSettings | Mapping[str, Any] | None) -> StatisticsSettings:
    """The statistics settings, validated (one line naming the key on a bad one)."""
    if isinstance(value, StatisticsSettings):
        return value
    from pydantic import ValidationError

    try:
        return StatisticsSettings.model_validate(dict(value or {}))
    except ValidationError as error:
        first = error.errors()[0]
        key = ".".join(str(part) for part in first["loc"])
        raise ConfigError(f"statistics.{key}: {first['msg']}") from None


def _task_spec(checkpoint: str, entry: Mapping[str, Any], where: str) -> TaskSpec:
    """One task of an experiment: a model and its ``datasets_config`` entry."""
    kind, control, dataset = parse_task_entry(entry, where)
    spec = TaskSpec("", checkpoint, dataset, kind, control)
    return TaskSpec(spec.family.dataset_label(dataset), checkpoint, dataset, kind, control)


class ExperimentRecord:
    """The scores of finished labels: a fingerprint line, then one JSON line per label
    (its merge config and its metrics), fsynced. A label is reused only while its merge
    config is the same as when it was scored."""

    def __init__(self, path: Path, fingerprint: dict[str, Any], configs: Mapping[str, Any]) -> None:
        self.path = Path(path)
        self.header = json.dumps({"fingerprint": fingerprint}, sort_keys=True)
        self.configs = {label: _canonical(config) for label, config in configs.items()}

    def load(self) -> dict[str, list[dict[str, float]]]:
        """The finished labels' metrics; nothing when the file is absent, an error when it
        belongs to another experiment.

        A last line torn by a crash is ignored (that label is scored again), and so is a
        label whose merge config has changed since.
        """
        if not self.path.is_file():
            return {}
        lines = self.path.read_text(encoding="utf-8").splitlines()
        if not lines:
            return {}
        if lines[0] != self.header:
            raise ConfigError(
                f"{self.path}: holds the scores of another experiment (other models, datasets or "
                "autocast); choose another --out, or delete the file to start again"
            )
        done = {}
        for line in lines[1:]:
            try:
                entry = json.loads(line)
                label = str(entry["label"])
                metrics = [{key: float(value) for key, value in m.items()} for m in entry["metrics"]]
            except (json.JSONDecodeError, KeyError, TypeError, AttributeError, ValueError):
                break
            if label in self.configs and _canonical(entry.get("config")) == self.configs[label]:
                done[label] = metrics
        return done

    def start(self, done: Mapping[str, list[dict[str, float]]]) -> None:
        """Rewrite the file with its header and the ``done`` labels only (atomically)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        entries = [self._line(label, metrics) for label, metrics in done.items()]
        write_text_atomic(self.path, "".join([self.header + "\n", *entries]))

    def append(self, label: str, metrics: list[dict[str, float]]) -> None:
        """Add one label's metrics, on disk before this returns."""
        append_text_durably(self.path, self._line(label, metrics))

    def _line(self, label: str, metrics: list[dict[str, float]]) -> str:
        config = json.loads(self.configs[label])
        return json.dumps({"label": label, "config": config, "metrics": metrics}) + "\n"


def _canonical(config: Any) -> str:
    """A merge config as text that compares equal exactly when the configs do."""
    return json.dumps(config, sort_keys=True, default=str)


class TaskVectorExperiment(Experiment):
    """Like :class:`Experiment`, merging task vectors (model - base) and adding them to the base."""

    space = "task_vectors"


__all__ = ["Experiment", "TaskVectorExperiment"]
