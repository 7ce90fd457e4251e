"""The digits zoo: a tiny ViT pre-trained on scikit-learn's digits and fine-tuned per task.

Everything is built offline in well under a minute on two CPU cores and saved as
ordinary Hugging Face artefacts (``save_pretrained`` checkpoints with an image processor,
``datasets`` splits saved with ``save_to_disk``), so the experiment code that runs on the
zoo runs unchanged on real hub checkpoints. Tasks transform the 8x8 digit images
(rotation, mirror, inversion, a fixed pixel permutation) or relabel them (parity), so
their fine-tunes pull the shared backbone in different directions and merging them is a
real trade-off. Their heads differ in size (10 or 2 classes).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

ZOO_VERSION = 1
IMAGE_COLUMN = "image"
LABEL_COLUMN = "label"


@dataclass(frozen=True)
class ZooRecipe:
    """Everything that determines the zoo; a change rebuilds it."""

    seed: int = 0
    hidden_size: int = 64
    layers: int = 4
    pretrain_epochs: int = 30
    finetune_epochs: int = 12
    version: int = ZOO_VERSION


@dataclass(frozen=True)
class DigitsTask:
    """A task built from the digits: how images are transformed and labels assigned."""

    name: str
    num_classes: int
    transform: Callable[[np.ndarray, np.random.Generator], np.ndarray]
    relabel: Callable[[np.ndarray], np.ndarray]


def _permute_pixels(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    order = rng.permutation(64)
    return images.reshape(len(images), 64)[:, order].reshape(images.shape)


TASKS = (
    DigitsTask("rotated", 10, lambda x, _: np.rot90(x, 1, axes=(1, 2)), lambda y: y),
    DigitsTask("mirrored", 10, lambda x, _: x[:, :, ::-1], lambda y: y),
    DigitsTask("inverted", 10, lambda x, _: 16.0 - x, lambda y: y),
    DigitsTask("permuted", 10, _permute_pixels, lambda y: y),
    DigitsTask("parity", 2, lambda x, _: x, lambda y: y % 2),
)


def to_uint8(images: np.ndarray) -> np.ndarray:
    """Digits pixels (0-16) as 0-255 grey levels."""
    return np.ascontiguousarray(np.round(images * (255.0 / 16.0)).astype(np.uint8))


def pixel_values(images_uint8: np.ndarray) -> torch.Tensor:
    """What the zoo's image processor produces: rescale to [0, 1], normalise with mean 0.5, std 0.5."""
    values = torch.from_numpy(images_uint8.astype(np.float32) / 255.0)
    return ((values - 0.5) / 0.5).unsqueeze(1)


def splits_of(count: int, seed: int) -> dict[str, np.ndarray]:
    """Deterministic 60/20/20 train/validation/test indices."""
    order = np.random.default_rng(seed).permutation(count)
    train, validation = int(0.6 * count), int(0.8 * count)
    return {"train": order[:train], "validation": order[train:validation], "test": order[validation:]}


def _vit(num_labels: int, recipe: ZooRecipe) -> Any:
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(
        image_size=8,
        patch_size=2,
        num_channels=1,
        hidden_size=recipe.hidden_size,
        num_hidden_layers=recipe.layers,
        num_attention_heads=4,
        intermediate_size=2 * recipe.hidden_size,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    config.num_labels = num_labels
    return ViTForImageClassification(config)


def _train(model: Any, pixels: torch.Tensor, labels: torch.Tensor, epochs: int, lr: float, seed: int) -> None:
    """Full-batch-shuffled AdamW training with a cosine schedule."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    steps_per_epoch = (len(labels) + 63) // 64
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=lr, total_steps=epochs * steps_per_epoch, pct_start=0.1
    )
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(labels), generator=generator)
        for start in range(0, len(labels), 64):
            batch = order[start : start + 64]
            loss = model(pixel_values=pixels[batch], labels=labels[batch]).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    model.eval()


@torch.inference_mode()
def _accuracy(model: Any, pixels: torch.Tensor, labels: torch.Tensor) -> float:
    predictions = model(pixel_values=pixels).logits.argmax(-1)
    return float((predictions == labels).float().mean()) * 100.0


def save_dataset(
    folder: Path,
    images: np.ndarray,
    labels: np.ndarray,
    splits: dict[str, np.ndarray],
    names: Sequence[str] | None = None,
) -> None:
    """Save grey images and their labels as a ``DatasetDict`` (one split per entry of ``splits``);
    ``names`` name the classes, else they are numbered."""
    from datasets import ClassLabel, Dataset, DatasetDict, Features, Image

    label = ClassLabel(names=list(names)) if names else ClassLabel(num_classes=int(labels.max()) + 1)
    features = Features({IMAGE_COLUMN: Image(), LABEL_COLUMN: label})
    parts = {}
    for split, index in splits.items():
        pictures = [image for image in images[index]]
        parts[split] = Dataset.from_dict(
            {IMAGE_COLUMN: [_png(p) for p in pictures], LABEL_COLUMN: labels[index].tolist()},
            features=features,
        )
    DatasetDict(parts).save_to_disk(str(folder))


def _png(image: np.ndarray) -> Any:
    from PIL import Image as PILImage

    return PILImage.fromarray(image, mode="L")


def _save_model(model: Any, folder: Path) -> None:
    from transformers import ViTImageProcessor

    model.save_pretrained(folder, safe_serialization=True)
    processor = ViTImageProcessor(
        do_resize=False,
        size={"height": 8, "width": 8},
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=[0.5],
        image_std=[0.5],
    )
    processor.save_pretrained(folder)


def built_manifest(folder: Path, recipe: Any) -> Path | None:
    """``folder``'s zoo.json where a zoo was built there from ``recipe`` (a dataclass), else None."""
    path = folder / "zoo.json"
    if path.is_file() and json.loads(path.read_text()).get("recipe") == asdict(recipe):
        return path
    return None


def build_zoo(
    folder: str | Path, recipe: ZooRecipe | None = None, log: Callable[[str], None] | None = None
) -> Path:
    """Build the digits zoo in ``folder`` (or return at once if it is already there); returns zoo.json."""
    import datasets
    from sklearn.datasets import load_digits
    from transformers.utils import logging

    logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    datasets.disable_progress_bars()
    recipe = recipe or ZooRecipe()
    folder = Path(folder).expanduser().absolute()
    existing = built_manifest(folder, recipe)
    if existing is not None:
        return existing
    manifest = folder / "zoo.json"
    say = log or (lambda _: None)
    started = time.perf_counter()
    torch.manual_seed(recipe.seed)
    digits = load_digits()
    raw_images = digits.images.astype(np.float32)
    raw_labels = digits.target.astype(np.int64)
    splits = splits_of(len(raw_labels), recipe.seed)

    base = _vit(10, recipe)
    pixels = pixel_values(to_uint8(raw_images))
    labels = torch.from_numpy(raw_labels)
    train = torch.from_numpy(splits["train"])
    _train(base, pixels[train], labels[train], recipe.pretrain_epochs, 3e-3, recipe.seed)
    test = torch.from_numpy(splits["test"])
    say(f"base: pre-trained to {_accuracy(base, pixels[test], labels[test]):.1f}% on plain digits")
    _save_model(base, folder / "base")

    entries = []
    for offset, task in enumerate(TASKS, start=1):
        rng = np.random.default_rng(recipe.seed + offset)
        images = to_uint8(task.transform(raw_images, rng))
        task_labels = task.relabel(raw_labels)
        save_dataset(folder / "datasets" / task.name, images, task_labels, splits)
        task_pixels, task_targets = pixel_values(images), torch.from_numpy(task_labels)
        model = _vit(task.num_classes, recipe)
        backbone = {k: v for k, v in base.state_dict().items() if not k.startswith("classifier.")}
        model.load_state_dict(backbone, strict=False)
        _train(
            model, task_pixels[train], task_targets[train], recipe.finetune_epochs, 1e-3, recipe.seed + offset
        )
        accuracy = _accuracy(model, task_pixels[test], task_targets[test])
        say(f"{task.name}: fine-tuned to {accuracy:.1f}% ({task.num_classes} classes)")
        _save_model(model, folder / "models" / task.name)
        entries.append(
            {
                "name": task.name,
                "checkpoint": str(folder / "models" / task.name),
                "num_classes": task.num_classes,
                "dataset": {
                    "dataset_name": str(folder / "datasets" / task.name),
                    "split": "test",
                    "image_col": IMAGE_COLUMN,
                    "label_col": LABEL_COLUMN,
                },
                "finetuned_accuracy": round(accuracy, 2),
            }
        )
    document = {
        "base_model_checkpoint": str(folder / "base"),
        "tasks": entries,
        "recipe": asdict(recipe),
        "build_seconds": round(time.perf_counter() - started, 1),
    }
    manifest.write_text(json.dumps(document, indent=2) + "\n")
    return manifest
