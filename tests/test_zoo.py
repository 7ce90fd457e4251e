"""The digits zoo builds offline and makes a useful merging benchmark."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from m3sb.methods import merge_group
from m3sb.zoo import TASKS, build_zoo


@pytest.fixture(scope="module")
def zoo(zoo_manifest: Path) -> dict[str, Any]:
    return dict(json.loads(zoo_manifest.read_text()))


def _test_split(task: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    from datasets import load_from_disk
    from transformers import AutoImageProcessor

    dataset = load_from_disk(task["dataset"]["dataset_name"])["test"]
    processor = AutoImageProcessor.from_pretrained(task["checkpoint"])
    pixels = processor(images=list(dataset["image"]), return_tensors="pt")["pixel_values"]
    return pixels, torch.tensor(list(dataset["label"]))


def _accuracy(task: dict[str, Any], backbone: dict[str, torch.Tensor] | None) -> float:
    from transformers import ViTForImageClassification

    model = ViTForImageClassification.from_pretrained(task["checkpoint"]).eval()
    if backbone is not None:
        incompatible = model.load_state_dict(backbone, strict=False)
        assert incompatible.unexpected_keys == [] and set(incompatible.missing_keys) <= {
            "classifier.weight",
            "classifier.bias",
        }
    pixels, labels = _test_split(task)
    with torch.inference_mode():
        return float((model(pixel_values=pixels).logits.argmax(-1) == labels).float().mean()) * 100


def _backbone(checkpoint: str) -> dict[str, torch.Tensor]:
    """The backbone as the loaded model names it (transformers 5 renames ViT keys on load)."""
    from transformers import ViTForImageClassification

    state = ViTForImageClassification.from_pretrained(checkpoint).state_dict()
    return {name: tensor for name, tensor in state.items() if not name.startswith("classifier.")}


@pytest.mark.slow
def test_zoo_layout_and_datasets(zoo: dict[str, Any]) -> None:
    from datasets import load_from_disk

    assert [task["name"] for task in zoo["tasks"]] == [task.name for task in TASKS]
    assert {task["num_classes"] for task in zoo["tasks"]} == {10, 2}
    for task in zoo["tasks"]:
        splits = load_from_disk(task["dataset"]["dataset_name"])
        assert set(splits) == {"train", "validation", "test"}
        assert sum(len(splits[s]) for s in splits) == 1797
        assert set(splits["test"].column_names) == {"image", "label"}
        assert max(splits["test"]["label"]) == task["num_classes"] - 1
        assert (Path(task["checkpoint"]) / "preprocessor_config.json").is_file()


@pytest.mark.slow
def test_each_finetune_is_good_at_its_own_task_and_the_base_is_not(zoo: dict[str, Any]) -> None:
    base = _backbone(zoo["base_model_checkpoint"])
    for task in zoo["tasks"]:
        finetuned = _accuracy(task, None)
        assert finetuned == pytest.approx(task["finetuned_accuracy"], abs=0.01)
        assert finetuned >= 90.0, task["name"]
        assert _accuracy(task, base) <= finetuned - 10.0, task["name"]


@pytest.mark.slow
def test_an_equal_weight_linear_merge_keeps_part_of_the_accuracy(zoo: dict[str, Any]) -> None:
    backbones = [_backbone(task["checkpoint"]) for task in zoo["tasks"]]
    merged = {name: merge_group("linear", [b[name] for b in backbones]) for name in backbones[0]}
    normalized = [_accuracy(task, merged) / task["finetuned_accuracy"] for task in zoo["tasks"]]
    assert 0.40 <= float(np.mean(normalized)) <= 0.95, normalized


@pytest.mark.slow
def test_a_second_build_is_a_cache_hit(zoo: dict[str, Any], tmp_path: Path) -> None:
    manifest = Path(zoo["base_model_checkpoint"]).parent / "zoo.json"
    before = manifest.stat().st_mtime_ns
    assert build_zoo(manifest.parent) == manifest
    assert manifest.stat().st_mtime_ns == before


@pytest.mark.slow
def test_the_zoo_is_deterministic_from_its_seed(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from m3sb.zoo import ZooRecipe

    recipe = ZooRecipe(pretrain_epochs=1, finetune_epochs=1)
    first = json.loads(build_zoo(tmp_path / "one", recipe).read_text())
    second = json.loads(build_zoo(tmp_path / "two", recipe).read_text())
    for a, b in zip(first["tasks"], second["tasks"], strict=True):
        assert a["finetuned_accuracy"] == b["finetuned_accuracy"]
        left, right = (load_file(Path(t["checkpoint"]) / "model.safetensors") for t in (a, b))
        assert all(torch.equal(left[name], right[name]) for name in left)
