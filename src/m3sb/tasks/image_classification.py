"""The image-classification family: ``AutoModelForImageClassification`` checkpoints, each a
backbone shared by every task and a head of its own.

Tensors are matched by name, never by position; the head is every tensor under a
classification module (``classifier``, ``head``, ``fc``, ``score``), so this works for any
image classifier whose backbone the checkpoints share. A split is preprocessed once with
the task's image processor (its own; the base's when it has none; ``processor_checkpoint``
for every task when given) into the on-disk cache and streamed from there.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from m3sb.errors import CheckpointError, first_line
from m3sb.memory import steady_heap
from m3sb.tasks import cache
from m3sb.tasks.data import DataError, DatasetSpec, load_task_data
from m3sb.tasks.metrics import score_candidates, score_split
from m3sb.tasks.model import TaskModel, as_parameters_of, quiet_transformers

KIND = "image_classification"
HEAD_MODULES = ("classifier", "head", "fc", "score", "distillation_classifier", "classifier_distill")
PREPROCESS_BATCH = 64


def is_head(name: str) -> bool:
    """Whether a tensor belongs to the classification head."""
    return name.split(".", 1)[0] in HEAD_MODULES


def load_processor(checkpoint: str, fallback: str | None = None) -> tuple[Any, str]:
    """The image processor of ``checkpoint``, else of ``fallback`` (the base, as the seed did),
    and where it came from."""
    from transformers import AutoImageProcessor

    quiet_transformers()
    failures = []
    for source in dict.fromkeys(s for s in (checkpoint, fallback) if s is not None):
        try:
            return AutoImageProcessor.from_pretrained(source), source  # type: ignore[no-untyped-call]
        except Exception as error:  # noqa: BLE001 (any loading failure becomes one line)
            failures.append(f"{source}: {first_line(error)[:160]}")
    raise CheckpointError(
        f"{checkpoint}: no image processor can be loaded ({'; '.join(failures)}); "
        "set processor_checkpoint to a model that has one"
    )


def load_task_model(
    checkpoint: str,
    trust_remote_code: bool = False,
    with_processor: bool = True,
    processor_checkpoint: str | None = None,
    base_checkpoint: str | None = None,
) -> TaskModel:
    """Load an image classifier and its image processor from a folder or a hub id.

    The processor is ``processor_checkpoint``'s when given, else the model's own, else
    ``base_checkpoint``'s (the base model's).
    """
    from transformers import AutoModelForImageClassification

    quiet_transformers()
    try:
        model = AutoModelForImageClassification.from_pretrained(
            checkpoint, trust_remote_code=trust_remote_code
        )
    except Exception as error:  # noqa: BLE001 (any loading failure becomes one line)
        raise CheckpointError(
            f"{checkpoint}: cannot load an image classifier ({first_line(error)[:200]})"
        ) from None
    processor, source = None, None
    if with_processor:
        if processor_checkpoint is not None:
            processor, source = load_processor(processor_checkpoint)
        else:
            processor, source = load_processor(checkpoint, base_checkpoint)
    weights = {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}
    head = frozenset(name for name in weights if is_head(name))
    return TaskModel(checkpoint, model.eval(), processor, weights, head, source)


class _Images(torch.utils.data.Dataset[tuple[int, Any]]):
    """Row ``i`` of a split decoded to a PIL image in ``mode`` (None when it cannot be read)."""

    def __init__(self, dataset: Any, column: str, mode: str) -> None:
        self.rows = dataset.select_columns([column]).with_format(None)
        self.column, self.mode = column, mode

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> tuple[int, Any]:
        try:
            return index, self.rows[index][self.column].convert(self.mode)
        except Exception:  # noqa: BLE001 (a corrupt image is skipped and counted)
            return index, None


class _Preprocess:
    """The collate function of the preprocessing DataLoader: decoded images to processor outputs."""

    def __init__(self, processor: Any, labels: np.ndarray, dataset_name: str) -> None:
        self.processor, self.labels, self.dataset_name = processor, labels, dataset_name

    def __call__(self, batch: list[tuple[int, Any]]) -> cache.Preprocessed:
        kept = [(index, image) for index, image in batch if image is not None]
        skipped = len(batch) - len(kept)
        if not kept:
            return cache.Preprocessed(np.empty((0,)), np.empty(0, dtype=np.int64), skipped)
        try:
            values = self.processor(images=[image for _, image in kept], return_tensors="np")["pixel_values"]
        except Exception as error:  # noqa: BLE001 (a processor failure becomes one line)
            raise DataError(
                f"{self.dataset_name}: the image processor fails on row {kept[0][0]} or after "
                f"({cache.describe_error(error)})"
            ) from None
        return cache.Preprocessed(np.asarray(values), self.labels[[index for index, _ in kept]], skipped)


def _single_thread(_: int) -> None:
    torch.set_num_threads(1)


def prepare(
    spec: DatasetSpec,
    task: TaskModel,
    cache_dir: str | Path | None = None,
    workers: int | None = None,
    log: Callable[[str], None] | None = None,
) -> cache.CachedSplit:
    """The task's split, preprocessed with its processor: from the cache, or built into it once.

    A label the classifier cannot produce is an error before any image is decoded.
    """
    classes = int(task.model.config.num_labels)
    return prepare_images(
        spec, task.processor, image_mode(task.model), classes, KIND, cache_dir, workers, log
    )


def image_mode(model: Any) -> str:
    """The PIL mode a vision model's inputs are decoded to: ``L`` for one channel, else ``RGB``."""
    return "L" if int(getattr(model.config, "num_channels", 3)) == 1 else "RGB"


def prepare_images(
    spec: DatasetSpec,
    processor: Any,
    mode: str,
    classes: int,
    kind: str,
    cache_dir: str | Path | None = None,
    workers: int | None = None,
    log: Callable[[str], None] | None = None,
    dataset: Any = None,
) -> cache.CachedSplit:
    """A split of images decoded in ``mode`` and run through ``processor``: from the cache, or
    built into it once in DataLoader workers. Labels must lie in ``0..classes-1``; ``dataset``
    is the loaded split when the caller has it already."""
    steady_heap()
    dataset = load_task_data(spec) if dataset is None else dataset
    labels = np.asarray(dataset[spec.label_col], dtype=np.int64)
    bad = labels[(labels < 0) | (labels >= classes)]
    if bad.size:
        raise DataError(
            f"{spec.dataset_name}: label {int(bad[0])} is outside the classifier's range 0..{classes - 1}"
        )
    describe = {
        "dataset": dataset_label(spec),
        "split": spec.split_name,
        "columns": [spec.image_col, spec.label_col],
        "mode": mode,
        "processor": {"class": type(processor).__name__, "config": processor.to_dict()},
    }
    key = cache.cache_key({"kind": kind, "data": cache.dataset_identity(dataset), **describe})
    root = cache.cache_root(cache_dir)
    entry = cache.open_entry(root / key, key)
    if entry is not None:
        return entry
    say = log or (lambda _: None)
    say(f"preprocessing {len(dataset)} examples of {describe['dataset']} ({spec.split_name}) into {root}")
    count = len(dataset)
    jobs = cache.loader_workers(count, workers)

    def batches() -> Iterator[cache.Preprocessed]:
        loader = torch.utils.data.DataLoader(
            _Images(dataset, spec.image_col, mode),
            batch_size=PREPROCESS_BATCH,
            num_workers=jobs,
            collate_fn=_Preprocess(processor, labels, spec.dataset_name),
            worker_init_fn=_single_thread if jobs else None,
            prefetch_factor=2 if jobs else None,
        )
        yield from loader

    try:
        entry = cache.build_entry(root, key, count, batches, describe)
    except DataError:
        raise
    except (OSError, ValueError) as error:
        raise DataError(
            f"{spec.dataset_name}: cannot preprocess into {root} ({first_line(error)[:200]})"
        ) from None
    if entry.count == 0:
        raise DataError(f"{spec.dataset_name}: no readable image in split '{spec.split_name}'")
    return entry


def dataset_label(spec: DatasetSpec) -> str:
    """A short name for a dataset: its folder name or hub id."""
    path = Path(spec.dataset_name)
    return path.name if path.exists() else spec.dataset_name


def _forward(model: Any, backbone: Mapping[str, torch.Tensor] | None, values: torch.Tensor) -> torch.Tensor:
    """Logits of ``model`` on a batch, with ``backbone`` supplied by ``functional_call`` (no copy)."""
    if backbone is None:
        return model(pixel_values=values).logits  # type: ignore[no-any-return]
    result = torch.func.functional_call(model, dict(backbone), args=(), kwargs={"pixel_values": values})
    return result.logits  # type: ignore[no-any-return]


def logits_function(task: TaskModel, device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
    """The task's classifier with its own backbone, from a batch of inputs on ``device`` to logits."""
    model = task.model.to(device).eval()
    return lambda values: _forward(model, None, values)


def evaluate(
    task: TaskModel,
    backbone: Mapping[str, torch.Tensor] | None,
    data: cache.CachedSplit,
    device: torch.device,
    batch_size: int = 256,
    autocast_dtype: str = "none",
) -> dict[str, float]:
    """Every metric of the task's classifier run on ``backbone`` (its own when None), streamed."""
    model = task.model.to(device).eval()
    backbone = None if backbone is None else as_parameters_of(model, backbone)
    return score_split(
        lambda values: _forward(model, backbone, values), data, device, batch_size, autocast_dtype
    )


def evaluate_candidates(
    task: TaskModel,
    flats: torch.Tensor,
    views: Callable[[torch.Tensor], dict[str, torch.Tensor]],
    data: cache.CachedSplit,
    device: torch.device,
    batch_size: int = 256,
    autocast_dtype: str = "none",
) -> list[dict[str, float]]:
    """Every metric for each of B candidate backbones at once (``vmap`` over the rows of ``flats``,
    shape (B, P); ``views`` turns a row into the backbone's tensors)."""
    model = task.model.to(device).eval()

    def logits(flat: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        return _forward(model, views(flat), values)

    return score_candidates(logits, flats, data, device, batch_size, autocast_dtype)
