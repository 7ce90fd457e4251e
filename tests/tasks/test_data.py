"""Task datasets: formats, columns, labels, and unreadable images skipped and counted."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from datasets import ClassLabel, Dataset, DatasetDict, Features, Image
from PIL import Image as PILImage
from transformers import ViTImageProcessor

from m3sb.tasks.data import DataError, DatasetSpec, load_task_data, prepare_inputs

PROCESSOR = ViTImageProcessor(
    do_resize=False, image_mean=[0.5], image_std=[0.5], size={"height": 8, "width": 8}
)


def _png(value: int) -> bytes:
    buffer = io.BytesIO()
    PILImage.fromarray(np.full((8, 8), value, dtype=np.uint8), mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    images = [
        {"bytes": _png(0), "path": None},
        {"bytes": b"not an image", "path": None},
        {"bytes": _png(255), "path": None},
    ]
    features = Features({"image": Image(), "label": ClassLabel(num_classes=3)})
    split = Dataset.from_dict({"image": images, "label": [0, 1, 2]}, features=features)
    DatasetDict({"test": split}).save_to_disk(str(tmp_path / "data"))
    return tmp_path / "data"


def test_unreadable_images_are_skipped_and_counted(saved: Path) -> None:
    spec = DatasetSpec(dataset_name=str(saved))
    inputs = prepare_inputs(load_task_data(spec), spec, PROCESSOR, num_channels=1, num_labels=3)
    assert inputs.skipped == 1
    assert inputs.labels.tolist() == [0, 2]
    assert inputs.pixel_values.shape == (2, 1, 8, 8)
    assert inputs.pixel_values[0].max() == -1.0 and inputs.pixel_values[1].min() == 1.0


def test_missing_split_column_and_out_of_range_labels_are_named(saved: Path) -> None:
    with pytest.raises(DataError, match="no split 'validation'; it has test"):
        load_task_data(DatasetSpec(dataset_name=str(saved), split="validation"))
    with pytest.raises(DataError, match="no column 'img'; columns are image, label"):
        load_task_data(DatasetSpec(dataset_name=str(saved), image_col="img"))
    spec = DatasetSpec(dataset_name=str(saved))
    with pytest.raises(DataError, match=r"label 2 is outside the classifier's range 0\.\.1"):
        prepare_inputs(load_task_data(spec), spec, PROCESSOR, num_channels=1, num_labels=2)


def test_max_samples_and_image_folders(saved: Path, tmp_path: Path) -> None:
    assert len(load_task_data(DatasetSpec(dataset_name=str(saved), max_samples=2))) == 2
    for label in ("cat", "dog"):
        (tmp_path / "folder" / "test" / label).mkdir(parents=True)
        (tmp_path / "folder" / "test" / label / "a.png").write_bytes(_png(10))
    folder = load_task_data(DatasetSpec(dataset_name=str(tmp_path / "folder")))
    assert sorted(folder["label"]) == [0, 1]
