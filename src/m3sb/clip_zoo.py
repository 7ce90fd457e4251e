"""The CLIP zoo: a tiny CLIP pre-trained on the digits with captions, and vision fine-tunes per task.

As MAP's and FusionBench's CLIP fine-tunes were made, each task's fine-tune trains only the
vision tower against that task's zero-shot head (the frozen text tower's embedding of the
task's class names in its templates); projection and text tower stay the base's. The base is
a whole ``CLIPModel`` with its own word-level tokenizer and image processor in Hugging Face
format; fine-tunes are saved vision-only (``CLIPVisionModel``), as FusionBench publishes them.
Tasks are the digits zoo's (rotated, mirrored, inverted, permuted, parity), so the base,
trained on plain digits only, is poor at each of them zero-shot and merges trade them off.
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

from m3sb.zoo import (
    IMAGE_COLUMN,
    LABEL_COLUMN,
    TASKS,
    built_manifest,
    pixel_values,
    save_dataset,
    splits_of,
    to_uint8,
)

CLIP_ZOO_VERSION = 1
DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
PARITY_NAMES = ("even", "odd")
CAPTIONS = ("a photo of the number {}", "a drawing of the digit {}", "the digit {}", "a picture of {}")
TASK_TEMPLATES = {
    "digits": ("a photo of the number {}", "the digit {}"),
    "parity": ("a photo of an {} number", "an {} digit"),
}
SPECIAL_TOKENS = ("<unk>", "<bos>", "<pad>", "<eos>")  # eos is not id 2: transformers' legacy pooling


@dataclass(frozen=True)
class ClipZooRecipe:
    """Everything that determines the CLIP zoo; a change rebuilds it."""

    seed: int = 0
    vision_width: int = 64
    vision_layers: int = 4
    text_width: int = 32
    text_layers: int = 2
    projection_dim: int = 32
    pretrain_epochs: int = 30
    finetune_epochs: int = 10
    version: int = CLIP_ZOO_VERSION


def class_names_of(task_name: str) -> tuple[str, ...]:
    """The words that name a zoo task's classes."""
    return PARITY_NAMES if task_name == "parity" else DIGIT_NAMES


def templates_of(task_name: str) -> tuple[str, ...]:
    """The zero-shot templates of a zoo task."""
    return TASK_TEMPLATES["parity" if task_name == "parity" else "digits"]


def vocabulary() -> list[str]:
    """Every word the zoo's captions and templates use, special tokens first."""
    words = list(SPECIAL_TOKENS)
    texts = [*CAPTIONS, *(t for group in TASK_TEMPLATES.values() for t in group)]
    for text in [*texts, *DIGIT_NAMES, *PARITY_NAMES]:
        for word in text.replace("{}", " ").split():
            if word not in words:
                words.append(word)
    return words


def word_tokenizer(words: Sequence[str]) -> Any:
    """A word-level Hugging Face tokenizer: ``<bos> words <eos>``, padded with ``<pad>``."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {word: index for index, word in enumerate(dict.fromkeys([*SPECIAL_TOKENS, *words]))}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<bos> $A <eos>", special_tokens=[("<bos>", vocab["<bos>"]), ("<eos>", vocab["<eos>"])]
    )
    return PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=tokenizer,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        model_max_length=16,
    )


def _clip(recipe: ClipZooRecipe, vocab_size: int, tokenizer: Any) -> Any:
    from transformers import CLIPConfig, CLIPModel

    config = CLIPConfig(
        text_config={
            "vocab_size": vocab_size,
            "hidden_size": recipe.text_width,
            "intermediate_size": 2 * recipe.text_width,
            "num_hidden_layers": recipe.text_layers,
            "num_attention_heads": 2,
            "max_position_embeddings": 16,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        },
        vision_config={
            "image_size": 8,
            "patch_size": 2,
            "num_channels": 1,
            "hidden_size": recipe.vision_width,
            "intermediate_size": 2 * recipe.vision_width,
            "num_hidden_layers": recipe.vision_layers,
            "num_attention_heads": 4,
        },
        projection_dim=recipe.projection_dim,
    )
    return CLIPModel(config)


def _processor() -> Any:
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(
        do_resize=False,
        do_center_crop=False,
        do_convert_rgb=False,
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=[0.5],
        image_std=[0.5],
    )


def _text_embeddings(clip: Any, tokenizer: Any, texts: list[str]) -> torch.Tensor:
    tokens = tokenizer(texts, padding=True, return_tensors="pt")
    output = clip.get_text_features(**tokens)
    features: torch.Tensor = output if isinstance(output, torch.Tensor) else output.pooler_output
    normalised: torch.Tensor = features / features.norm(dim=-1, keepdim=True)
    return normalised


def _image_embeddings(clip: Any, pixels: torch.Tensor) -> torch.Tensor:
    output = clip.get_image_features(pixel_values=pixels)
    features: torch.Tensor = output if isinstance(output, torch.Tensor) else output.pooler_output
    normalised: torch.Tensor = features / features.norm(dim=-1, keepdim=True)
    return normalised


def _batches(count: int, epochs: int, generator: torch.Generator) -> Any:
    for _ in range(epochs):
        order = torch.randperm(count, generator=generator)
        for start in range(0, count, 64):
            yield order[start : start + 64]


def _schedule(optimizer: torch.optim.Optimizer, lr: float, steps: int) -> Any:
    return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1)


def _pretrain(
    clip: Any, tokenizer: Any, pixels: torch.Tensor, labels: torch.Tensor, recipe: ClipZooRecipe
) -> None:
    """Contrastive pre-training on captioned digits: each image against a caption of every class
    (a template drawn per step), both towers and the temperature trained."""
    generator = torch.Generator().manual_seed(recipe.seed)
    optimizer = torch.optim.AdamW(clip.parameters(), lr=3e-3, weight_decay=0.01)
    steps = recipe.pretrain_epochs * ((len(labels) + 63) // 64)
    schedule = _schedule(optimizer, 3e-3, steps)
    clip.train()
    for batch in _batches(len(labels), recipe.pretrain_epochs, generator):
        template = CAPTIONS[int(torch.randint(len(CAPTIONS), (1,), generator=generator))]
        texts = _text_embeddings(clip, tokenizer, [template.format(name) for name in DIGIT_NAMES])
        images = _image_embeddings(clip, pixels[batch])
        logits = clip.logit_scale.exp() * images @ texts.T
        targets = labels[batch]
        image_loss = torch.nn.functional.cross_entropy(logits, targets)
        present = torch.unique(targets)  # captions whose class is in the batch, against the batch's images
        in_batch = targets[None, :] == present[:, None]
        caption_loss = -(logits.T[present].log_softmax(-1) * in_batch).sum(-1).div(in_batch.sum(-1)).mean()
        loss: Any = (image_loss + caption_loss) / 2
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        with torch.no_grad():
            clip.logit_scale.clamp_(0, 4.6052)  # at most 100, as CLIP
    clip.eval()


@torch.no_grad()
def zero_shot_head(clip: Any, tokenizer: Any, names: Sequence[str], templates: Sequence[str]) -> torch.Tensor:
    """The task's classifier from the text tower: templates averaged per class, times exp(logit_scale)."""
    embedded = torch.stack(
        [_text_embeddings(clip, tokenizer, [t.format(name) for t in templates]).mean(0) for name in names]
    )
    head: torch.Tensor = embedded / embedded.norm(dim=-1, keepdim=True) * clip.logit_scale.exp()
    return head


def _finetune(
    clip: Any, head: torch.Tensor, pixels: torch.Tensor, labels: torch.Tensor, epochs: int, seed: int
) -> None:
    """Train the vision tower alone against a fixed zero-shot head (projection and text frozen)."""
    parameters = list(clip.vision_model.parameters())
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(parameters, lr=1e-3, weight_decay=0.01)
    schedule = _schedule(optimizer, 1e-3, epochs * ((len(labels) + 63) // 64))
    clip.train()
    for batch in _batches(len(labels), epochs, generator):
        logits = _image_embeddings(clip, pixels[batch]) @ head.T
        loss: Any = torch.nn.functional.cross_entropy(logits, labels[batch])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    clip.eval()


@torch.inference_mode()
def _accuracy(clip: Any, head: torch.Tensor, pixels: torch.Tensor, labels: torch.Tensor) -> float:
    predictions = (_image_embeddings(clip, pixels) @ head.T).argmax(-1)
    return float((predictions == labels).float().mean()) * 100.0


def _save_vision_tower(clip: Any, folder: Path) -> None:
    from transformers import CLIPVisionModel

    vision = CLIPVisionModel(clip.config.vision_config)
    tower = getattr(vision, "vision_model", vision)  # transformers 5 flattened CLIPVisionModel
    tower.load_state_dict(clip.vision_model.state_dict())
    vision.save_pretrained(folder, safe_serialization=True)
    _processor().save_pretrained(folder)


def build_clip_zoo(
    folder: str | Path, recipe: ClipZooRecipe | None = None, log: Callable[[str], None] | None = None
) -> Path:
    """Build the CLIP zoo in ``folder`` (or return at once if it is already there); returns zoo.json."""
    import copy

    import datasets
    from sklearn.datasets import load_digits
    from transformers.utils import logging

    logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    logging.set_verbosity_error()  # type: ignore[no-untyped-call]
    datasets.disable_progress_bars()
    recipe = recipe or ClipZooRecipe()
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
    train, test = torch.from_numpy(splits["train"]), torch.from_numpy(splits["test"])

    tokenizer = word_tokenizer(vocabulary())
    base = _clip(recipe, len(tokenizer), tokenizer)
    pixels, labels = pixel_values(to_uint8(raw_images)), torch.from_numpy(raw_labels)
    _pretrain(base, tokenizer, pixels[train], labels[train], recipe)
    plain_head = zero_shot_head(base, tokenizer, DIGIT_NAMES, TASK_TEMPLATES["digits"])
    plain = _accuracy(base, plain_head, pixels[test], labels[test])
    say(f"clip base: pre-trained on captioned digits, {plain:.1f}% zero-shot on plain digits")
    base.save_pretrained(folder / "base", safe_serialization=True)
    tokenizer.save_pretrained(folder / "base")
    _processor().save_pretrained(folder / "base")

    entries = []
    for offset, task in enumerate(TASKS, start=1):
        rng = np.random.default_rng(recipe.seed + offset)
        images = to_uint8(task.transform(raw_images, rng))
        task_labels = task.relabel(raw_labels)
        names = class_names_of(task.name)
        save_dataset(folder / "datasets" / task.name, images, task_labels, splits, names)
        task_pixels, targets = pixel_values(images), torch.from_numpy(task_labels)
        head = zero_shot_head(base, tokenizer, names, templates_of(task.name))
        zero_shot = _accuracy(base, head, task_pixels[test], targets[test])
        model = copy.deepcopy(base)
        seed = recipe.seed + offset
        _finetune(model, head, task_pixels[train], targets[train], recipe.finetune_epochs, seed)
        accuracy = _accuracy(model, head, task_pixels[test], targets[test])
        say(f"{task.name}: zero-shot {zero_shot:.1f}%, fine-tuned {accuracy:.1f}% ({len(names)} classes)")
        _save_vision_tower(model, folder / "models" / task.name)
        entries.append(
            {
                "name": task.name,
                "checkpoint": str(folder / "models" / task.name),
                "num_classes": len(names),
                "dataset": {
                    "dataset_name": str(folder / "datasets" / task.name),
                    "split": "test",
                    "image_col": IMAGE_COLUMN,
                    "label_col": LABEL_COLUMN,
                    "templates": list(templates_of(task.name)),
                },
                "zero_shot_accuracy": round(zero_shot, 2),
                "finetuned_accuracy": round(accuracy, 2),
            }
        )
    document = {
        "kind": "clip_zero_shot",
        "base_model_checkpoint": str(folder / "base"),
        "tasks": entries,
        "recipe": asdict(recipe),
        "build_seconds": round(time.perf_counter() - started, 1),
    }
    manifest.write_text(json.dumps(document, indent=2) + "\n")
    return manifest
