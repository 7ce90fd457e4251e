"""The image-classification family: the preprocessing cache, streamed evaluation against the
in-memory computation, processors, labels and unreadable images."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from datasets import ClassLabel, Dataset, DatasetDict, Features, Image
from PIL import Image as PILImage
from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

from m3sb.errors import CheckpointError
from m3sb.tasks import cache
from m3sb.tasks.data import DataError, DatasetSpec
from m3sb.tasks.image_classification import evaluate, load_task_model, prepare
from m3sb.tasks.metrics import classification_metrics

CPU = torch.device("cpu")
ROWS = 150


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    PILImage.fromarray(pixels, mode="RGB").save(buffer, format="PNG")
    return buffer.getvalue()


def _images(rows: int, seed: int) -> list[dict[str, Any]]:
    rng = np.random.default_rng(seed)
    return [
        {"bytes": _png(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)), "path": None} for _ in range(rows)
    ]


def _save_data(folder: Path, seed: int = 0, broken: tuple[int, ...] = ()) -> Path:
    images = _images(ROWS, seed)
    for index in broken:
        images[index] = {"bytes": b"not an image", "path": None}
    labels = np.random.default_rng(seed + 1).integers(0, 5, ROWS).tolist()
    features = Features({"image": Image(), "label": ClassLabel(num_classes=5)})
    DatasetDict(
        {"test": Dataset.from_dict({"image": images, "label": labels}, features=features)}
    ).save_to_disk(str(folder))
    return folder


def _processor(mean: float = 0.5) -> ViTImageProcessor:
    return ViTImageProcessor(size={"height": 16, "width": 16}, image_mean=[mean] * 3, image_std=[0.25] * 3)


def _save_model(folder: Path, processor: ViTImageProcessor | None = None, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    config = ViTConfig(
        image_size=16,
        patch_size=4,
        num_channels=3,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        num_labels=5,
    )
    ViTForImageClassification(config).save_pretrained(folder)
    if processor is not None:
        processor.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def artefacts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("family")
    return {
        "data": _save_data(root / "data"),
        "model": _save_model(root / "model", _processor()),
        "bare": _save_model(root / "bare", None, seed=1),
    }


def _spec(folder: Path) -> DatasetSpec:
    return DatasetSpec(dataset_name=str(folder), split="test")


def test_streamed_evaluation_equals_the_in_memory_computation(
    artefacts: dict[str, Path], tmp_path: Path
) -> None:
    task = load_task_model(str(artefacts["model"]))
    data = prepare(_spec(artefacts["data"]), task, tmp_path)
    import datasets

    split = datasets.load_from_disk(str(artefacts["data"]))["test"]
    pictures = [row["image"].convert("RGB") for row in split]
    pixels = task.processor(images=pictures, return_tensors="pt")["pixel_values"]
    assert torch.equal(data.values(), pixels)  # the cache holds exactly the processor's output
    labels = torch.tensor(split["label"])
    assert torch.equal(data.labels, labels)
    with torch.inference_mode():
        logits = torch.cat([task.model(pixel_values=pixels[i : i + 32]).logits for i in range(0, ROWS, 32)])
    streamed = evaluate(task, None, data, CPU, batch_size=32)
    expected = classification_metrics(logits.argmax(-1), labels)
    assert {k: streamed[k] for k in expected} == expected  # to the last digit
    loss = float(torch.nn.functional.cross_entropy(logits, labels))
    assert streamed["loss"] == pytest.approx(loss, rel=1e-6)
    for batch_size in (7, 150, 1000):  # batching changes nothing but rounding of the loss
        again = evaluate(task, None, data, CPU, batch_size=batch_size)
        assert again["accuracy"] == expected["accuracy"] and again["loss"] == pytest.approx(loss, rel=1e-5)


def test_a_backbone_is_supplied_without_touching_the_model(
    artefacts: dict[str, Path], tmp_path: Path
) -> None:
    task = load_task_model(str(artefacts["model"]))
    other = load_task_model(str(artefacts["bare"]), base_checkpoint=str(artefacts["model"]))
    data = prepare(_spec(artefacts["data"]), task, tmp_path)
    with_other = evaluate(task, other.backbone, data, CPU, 64)
    task.use_backbone(other.backbone)
    loaded = evaluate(task, None, data, CPU, 64)
    task.use_backbone(None)
    assert with_other == loaded
    assert evaluate(task, None, data, CPU, 64) != loaded


def test_the_cache_is_reused_and_invalidated(artefacts: dict[str, Path], tmp_path: Path) -> None:
    task = load_task_model(str(artefacts["model"]))
    built: list[str] = []
    first = prepare(_spec(artefacts["data"]), task, tmp_path, log=built.append)
    assert len(built) == 1
    stamp = (first.folder / cache.VALUES).stat().st_mtime_ns
    second = prepare(_spec(artefacts["data"]), task, tmp_path, log=built.append)
    assert len(built) == 1 and second.folder == first.folder
    assert (second.folder / cache.VALUES).stat().st_mtime_ns == stamp
    # Another processor configuration: another entry.
    task.processor = _processor(mean=0.4)
    third = prepare(_spec(artefacts["data"]), task, tmp_path, log=built.append)
    assert len(built) == 2 and third.folder != first.folder
    assert not torch.equal(third.values(), first.values())
    # Other rows (a slice) and other data behind the same path: other entries.
    task.processor = _processor()
    sliced = prepare(DatasetSpec(dataset_name=str(artefacts["data"]), split="test[:50]"), task, tmp_path)
    assert sliced.count == 50 and torch.equal(sliced.values(), first.values()[:50])
    moved = _save_data(tmp_path / "rewritten", seed=5)
    rewritten = prepare(_spec(moved), task, tmp_path)
    _save_data(moved, seed=6)
    again = prepare(_spec(moved), task, tmp_path)
    assert again.folder != rewritten.folder and not torch.equal(again.values(), rewritten.values())


@pytest.mark.parametrize("damage", ["meta", "truncate", "labels", "missing"])
def test_an_unreadable_entry_is_rebuilt_not_trusted(
    artefacts: dict[str, Path], tmp_path: Path, damage: str
) -> None:
    task = load_task_model(str(artefacts["model"]))
    good = prepare(_spec(artefacts["data"]), task, tmp_path)
    expected = good.values()
    if damage == "meta":
        (good.folder / cache.META).write_text("{not json")
    elif damage == "truncate":
        with open(good.folder / cache.VALUES, "r+b") as handle:
            handle.truncate(1000)
    elif damage == "labels":
        (good.folder / cache.LABELS).write_bytes(b"garbage")
    else:
        (good.folder / cache.VALUES).unlink()
    built: list[str] = []
    rebuilt = prepare(_spec(artefacts["data"]), task, tmp_path, log=built.append)
    assert len(built) == 1 and torch.equal(rebuilt.values(), expected)
    assert json.loads((rebuilt.folder / cache.META).read_text())["count"] == ROWS


def test_workers_preprocess_exactly_as_the_process_does(artefacts: dict[str, Path], tmp_path: Path) -> None:
    task = load_task_model(str(artefacts["model"]))
    alone = prepare(_spec(artefacts["data"]), task, tmp_path / "alone", workers=0)
    pooled = prepare(_spec(artefacts["data"]), task, tmp_path / "pooled", workers=2)
    assert torch.equal(alone.values(), pooled.values()) and torch.equal(alone.labels, pooled.labels)


def test_unreadable_images_are_skipped_and_counted(artefacts: dict[str, Path], tmp_path: Path) -> None:
    folder = _save_data(tmp_path / "broken", broken=(3, 77))
    task = load_task_model(str(artefacts["model"]))
    data = prepare(_spec(folder), task, tmp_path / "cache")
    import datasets

    labels = datasets.load_from_disk(str(folder))["test"]["label"]
    assert data.skipped == 2 and data.count == ROWS - 2
    assert data.labels.tolist() == [label for i, label in enumerate(labels) if i not in (3, 77)]


def test_labels_outside_the_head_are_named_before_decoding(
    artefacts: dict[str, Path], tmp_path: Path
) -> None:
    task = load_task_model(str(artefacts["model"]))
    task.model.config.num_labels = 3
    with pytest.raises(DataError, match=r"data: label [34] is outside the classifier's range 0\.\.2"):
        prepare(_spec(artefacts["data"]), task, tmp_path)
    assert not any(tmp_path.iterdir())  # nothing was preprocessed


def test_processor_fallback_and_override(artefacts: dict[str, Path]) -> None:
    bare = load_task_model(str(artefacts["bare"]), base_checkpoint=str(artefacts["model"]))
    assert bare.processor_source == str(artefacts["model"])
    own = load_task_model(str(artefacts["model"]), base_checkpoint=str(artefacts["bare"]))
    assert own.processor_source == str(artefacts["model"])
    forced = load_task_model(str(artefacts["model"]), processor_checkpoint=str(artefacts["model"]))
    assert forced.processor_source == str(artefacts["model"])
    with pytest.raises(CheckpointError, match="bare: no image processor can be loaded"):
        load_task_model(str(artefacts["bare"]))
    with pytest.raises(CheckpointError, match="set processor_checkpoint"):
        load_task_model(str(artefacts["model"]), processor_checkpoint=str(artefacts["bare"]))


class _ShortReads:
    """A raw file that returns at most ``most`` bytes per read, as Linux does past 2 GiB."""

    def __init__(self, data: bytes, most: int) -> None:
        self.data, self.most, self.at = data, most, 0

    def readinto(self, target: memoryview) -> int:
        count = min(len(target), self.most, len(self.data) - self.at)
        target[:count] = self.data[self.at : self.at + count]
        self.at += count
        return count


def test_short_raw_reads_are_read_until_the_batch_is_full(tmp_path: Path) -> None:
    data = bytes(range(256)) * 4
    target = bytearray(1000)
    cache._read_exactly(_ShortReads(data, 7), memoryview(target), tmp_path / "values.bin")
    assert bytes(target) == data[:1000]
    with pytest.raises(OSError, match=r"shorter than its meta\.json says"):
        cache._read_exactly(_ShortReads(data[:999], 7), memoryview(bytearray(1000)), tmp_path / "values.bin")
