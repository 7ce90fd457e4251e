"""Task datasets: formats, columns, labels, splits (names, slices, carves) and unreadable images."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from datasets import ClassLabel, Dataset, DatasetDict, Features, Image, Value
from PIL import Image as PILImage

from m3sb.errors import ConfigError
from m3sb.tasks.data import CarveSpec, DataError, DatasetSpec, load_task_data, parse_dataset_spec


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


@pytest.fixture
def numbered(tmp_path: Path) -> Path:
    """A 'train' split of 200 rows whose label is the row number modulo 10 and an 'id' column."""
    rows = 200
    features = Features({"image": Image(), "label": ClassLabel(num_classes=10), "id": Value("int64")})
    columns = {
        "image": [{"bytes": _png(i % 256), "path": None} for i in range(rows)],
        "label": [i % 10 for i in range(rows)],
        "id": list(range(rows)),
    }
    split = Dataset.from_dict(columns, features=features)
    DatasetDict({"train": split}).save_to_disk(str(tmp_path / "numbered"))
    return tmp_path / "numbered"


def _ids(folder: Path, split: object) -> list[int]:
    spec = DatasetSpec.model_validate({"dataset_name": str(folder), "split": split})
    return list(load_task_data(spec)["id"])


def test_missing_split_and_column_are_named(saved: Path) -> None:
    with pytest.raises(DataError, match="no split 'validation'; it has test"):
        load_task_data(DatasetSpec(dataset_name=str(saved), split="validation"))
    with pytest.raises(DataError, match="no column 'img'; columns are image, label"):
        load_task_data(DatasetSpec(dataset_name=str(saved), image_col="img"))


def test_max_samples_and_image_folders(saved: Path, tmp_path: Path) -> None:
    assert len(load_task_data(DatasetSpec(dataset_name=str(saved), max_samples=2))) == 2
    for label in ("cat", "dog"):
        (tmp_path / "folder" / "test" / label).mkdir(parents=True)
        (tmp_path / "folder" / "test" / label / "a.png").write_bytes(_png(10))
    folder = load_task_data(DatasetSpec(dataset_name=str(tmp_path / "folder")))
    assert sorted(folder["label"]) == [0, 1]
    flat = tmp_path / "flat"  # images with their labels in metadata.csv: not a split file
    flat.mkdir()
    for index in range(3):
        (flat / f"{index}.png").write_bytes(_png(index))
    (flat / "metadata.csv").write_text("file_name,label\n0.png,2\n1.png,0\n2.png,1\n")
    labelled = load_task_data(DatasetSpec(dataset_name=str(flat), split="train"))
    assert sorted(labelled["label"]) == [0, 1, 2]


def test_slices_follow_the_datasets_syntax(numbered: Path) -> None:
    assert _ids(numbered, "train[90%:]") == list(range(180, 200))
    assert _ids(numbered, "train[:25]") == list(range(25))
    assert _ids(numbered, "train[10:20]") == list(range(10, 20))
    with pytest.raises(DataError, match="no split 'test'; it has train"):
        _ids(numbered, "test[:10%]")


def test_a_carve_is_seeded_reproducible_and_disjoint_from_its_rest(numbered: Path) -> None:
    carve = {"carve": "train", "fraction": 0.1, "max_examples": 5000, "seed": 0}
    carved = _ids(numbered, carve)
    assert len(carved) == 20 and carved == sorted(carved)
    assert carved == _ids(numbered, carve)  # the same examples on every run
    import torch

    rest_part, validation = torch.utils.data.random_split(
        range(200), [180, 20], generator=torch.Generator().manual_seed(0)
    )
    assert carved == sorted(validation.indices)  # MAP's and FusionBench's validation sets
    rest = _ids(numbered, carve | {"part": "rest"})
    assert rest == sorted(rest_part.indices)
    assert (
        len(rest) == 180
        and not set(rest) & set(carved)
        and sorted(set(rest) | set(carved)) == list(range(200))
    )
    assert _ids(numbered, carve | {"seed": 1}) != carved
    assert len(_ids(numbered, {"carve": "train", "fraction": 0.5, "max_examples": 30})) == 30
    assert len(_ids(numbered, {"carve": "train", "max_examples": 7})) == 7
    sliced = _ids(numbered, {"carve": "train[:100]", "fraction": 0.2})
    assert len(sliced) == 20 and max(sliced) < 100


def test_a_carve_larger_than_its_source_is_named(numbered: Path) -> None:
    with pytest.raises(
        DataError, match=r"carve of 500 examples is larger than its source 'train' \(200 examples\)"
    ):
        _ids(numbered, {"carve": "train", "max_examples": 500})
    with pytest.raises(
        ConfigError, match=r"datasets_config\[0\]: split: carve fraction 1\.5 is larger than its source"
    ):
        parse_dataset_spec(
            {"dataset_name": "x", "split": {"carve": "train", "fraction": 1.5}}, "datasets_config[0]"
        )
    with pytest.raises(ConfigError, match="a carve needs a fraction, max_examples or both"):
        parse_dataset_spec({"dataset_name": "x", "split": {"carve": "train"}}, "d")
    with pytest.raises(ConfigError, match=r"d: split\.sed: Extra inputs are not permitted"):
        parse_dataset_spec({"dataset_name": "x", "split": {"carve": "train", "fraction": 0.1, "sed": 1}}, "d")


def test_carve_sizes() -> None:
    assert CarveSpec(carve="train", fraction=0.1, max_examples=5000).size(60_000) == 5000
    assert CarveSpec(carve="train", fraction=0.1, max_examples=5000).size(20_000) == 2000
    assert CarveSpec(carve="train", fraction=0.001).size(10) == 1
