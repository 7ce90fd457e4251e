"""Task datasets: load a split from a hub id, a ``save_to_disk`` folder or an image folder,
and turn it into model inputs with the task's own image processor.

Unreadable images are skipped and counted, never fatal; a missing column or a label the
classifier cannot produce is an error that names the dataset, before any evaluation.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field

from m3sb.errors import ConfigError, M3SBError, first_line


class DataError(M3SBError):
    """A dataset cannot be found, read or used as asked."""


class DatasetSpec(BaseModel):
    """Where a task's evaluation data is and which columns hold images and labels."""

    model_config = ConfigDict(extra="forbid")
    dataset_name: str = Field(min_length=1)
    split: str = "test"
    image_col: str = "image"
    label_col: str = "label"
    max_samples: int | None = Field(default=None, gt=0)


@dataclass(frozen=True)
class TaskInputs:
    """A task's preprocessed evaluation data."""

    pixel_values: torch.Tensor
    labels: torch.Tensor
    skipped: int


def _load_split(spec: DatasetSpec) -> Any:
    """The requested split as a ``datasets.Dataset``."""
    import datasets

    datasets.disable_progress_bars()
    path = Path(spec.dataset_name).expanduser()
    try:
        if path.is_dir() and (
            (path / "dataset_dict.json").is_file() or (path / "dataset_info.json").is_file()
        ):
            loaded = datasets.load_from_disk(str(path))
            if isinstance(loaded, datasets.DatasetDict):
                if spec.split not in loaded:
                    raise DataError(
                        f"{spec.dataset_name}: no split '{spec.split}'; it has {', '.join(loaded)}"
                    )
                return loaded[spec.split]
            return loaded
        if path.is_dir():
            return datasets.load_dataset("imagefolder", data_dir=str(path), split=spec.split)
        return datasets.load_dataset(spec.dataset_name, split=spec.split)
    except DataError:
        raise
    except Exception as error:  # noqa: BLE001 (every loading failure becomes one line)
        raise DataError(
            f"{spec.dataset_name}: cannot load split '{spec.split}' ({first_line(error)[:200]})"
        ) from None


def load_task_data(spec: DatasetSpec) -> Any:
    """Load a task's split, check its columns and keep at most ``max_samples`` rows."""
    dataset = _load_split(spec)
    for column in (spec.image_col, spec.label_col):
        if column not in dataset.column_names:
            raise DataError(
                f"{spec.dataset_name}: no column '{column}'; columns are {', '.join(dataset.column_names)}"
            )
    if spec.max_samples is not None and spec.max_samples < len(dataset):
        dataset = dataset.select(range(spec.max_samples))
    return dataset


def prepare_inputs(
    dataset: Any, spec: DatasetSpec, processor: Any, num_channels: int, num_labels: int
) -> TaskInputs:
    """Preprocess every readable image with ``processor``; count the unreadable ones."""
    mode = "L" if num_channels == 1 else "RGB"
    labels = [int(label) for label in dataset[spec.label_col]]
    bad = [label for label in labels if not 0 <= label < num_labels]
    if bad:
        raise DataError(
            f"{spec.dataset_name}: label {bad[0]} is outside the classifier's range 0..{num_labels - 1}"
        )
    images, kept, skipped = [], [], 0
    column = dataset.with_format(None)
    for index in range(len(dataset)):
        try:
            image = column[index][spec.image_col]
            images.append(image.convert(mode))
            kept.append(labels[index])
        except Exception:  # noqa: BLE001 (a corrupt image is skipped and counted)
            skipped += 1
    if not images:
        raise DataError(f"{spec.dataset_name}: no readable image in split '{spec.split}'")
    pixels = processor(images=images, return_tensors="pt")["pixel_values"]
    return TaskInputs(pixels, torch.tensor(kept), skipped)


def parse_dataset_spec(data: Any, where: str) -> DatasetSpec:
    """Validate one dataset entry of an experiment config."""
    from pydantic import ValidationError

    try:
        return DatasetSpec.model_validate(data)
    except ValidationError as error:
        first = error.errors()[0]
        location = ".".join(str(p) for p in first["loc"])
        raise ConfigError(f"{where}: {location}: {first['msg']}") from None
