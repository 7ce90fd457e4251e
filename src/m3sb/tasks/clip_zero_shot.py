"""The CLIP zero-shot family: vision towers fine-tuned per task, each scored with a zero-shot
head built from a CLIP text tower (MAP's and FusionBench's eight-task benchmark).

Checkpoints are Hugging Face ``CLIPModel`` (both towers) or vision-only fine-tunes
(``CLIPVisionModel``, ``CLIPVisionModelWithProjection``, as FusionBench publishes them).
Every task model is held as a ``CLIPVisionModelWithProjection``: the tensors that merge are
the vision tower's (``vision_model.*``) and its projection (``visual_projection.weight``,
taken from the base when a fine-tune has none). No tensor is the task's own: the head is
computed, once per task, from the base model's text tower (the checkpoint's own when there
is no base and it has one):

    head[c] = exp(logit_scale) * normalise(mean_t normalise(text_projection(text(t(c)))))
    logits  = normalise(visual_projection(vision(image))) @ head.T

for every class ``c`` and template ``t``. Class names come from the dataset's label
feature or ``class_names``; templates from ``templates`` or the built-in set named like
the dataset (``clip_templates``). Heads are cached on disk beside the preprocessed splits.
"""

from __future__ import annotations

import contextlib
import functools
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from m3sb.errors import CheckpointError, first_line
from m3sb.tasks import cache
from m3sb.tasks.clip_templates import TEMPLATES, class_names_for, templates_for
from m3sb.tasks.data import DataError, DatasetSpec, load_task_data
from m3sb.tasks.image_classification import dataset_label, image_mode, load_processor, prepare_images
from m3sb.tasks.metrics import score_candidates, score_split
from m3sb.tasks.model import TaskModel, as_parameters_of, quiet_transformers

KIND = "clip_zero_shot"
TEXT_SOURCE, HEAD = "text_source", "zero_shot_head"
PROJECTION = "visual_projection.weight"
TEXT_BATCH = 256

__all__ = [
    "KIND",
    "class_names_of",
    "dataset_label",
    "evaluate",
    "evaluate_candidates",
    "load_task_model",
    "logits_function",
    "prepare",
    "zero_shot_head",
]


@functools.lru_cache(maxsize=1)
def _full_clip(checkpoint: str, trust_remote_code: bool = False) -> Any:
    """A whole ``CLIPModel`` (the last one asked for stays loaded: the base serves every task)."""
    from transformers import CLIPModel

    quiet_transformers()
    try:
        model: Any = CLIPModel.from_pretrained(checkpoint, trust_remote_code=trust_remote_code)
        return model.eval()
    except Exception as error:  # noqa: BLE001 (any loading failure becomes one line)
        raise CheckpointError(f"{checkpoint}: cannot load a CLIP model ({first_line(error)[:200]})") from None


def _model_type(checkpoint: str, trust_remote_code: bool) -> str:
    from transformers import AutoConfig

    quiet_transformers()
    try:
        config = AutoConfig.from_pretrained(checkpoint, trust_remote_code=trust_remote_code)
    except Exception as error:  # noqa: BLE001 (any loading failure becomes one line)
        raise CheckpointError(f"{checkpoint}: cannot read its config ({first_line(error)[:200]})") from None
    return str(config.model_type)


def vision_of(full: Any) -> Any:
    """The vision tower and projection of a ``CLIPModel`` as a ``CLIPVisionModelWithProjection``
    (same tensor names: ``vision_model.*``, ``visual_projection.weight``)."""
    from transformers import CLIPVisionModelWithProjection

    config = full.config.vision_config.__class__(**full.config.vision_config.to_dict())
    config.projection_dim = full.config.projection_dim
    vision = CLIPVisionModelWithProjection(config)
    state = {
        name: tensor
        for name, tensor in full.state_dict().items()
        if name.startswith("vision_model.") or name == PROJECTION
    }
    vision.load_state_dict(state, strict=True)
    return vision.eval()  # type: ignore[no-untyped-call]


def _vision_only(checkpoint: str, base_checkpoint: str | None, trust_remote_code: bool) -> Any:
    """A vision-only fine-tune; its projection is the base's when the checkpoint has none."""
    from transformers import CLIPVisionModelWithProjection

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loaded: Any = CLIPVisionModelWithProjection.from_pretrained(
                checkpoint, trust_remote_code=trust_remote_code, output_loading_info=True
            )
        vision, info = loaded
    except Exception as error:  # noqa: BLE001 (any loading failure becomes one line)
        raise CheckpointError(
            f"{checkpoint}: cannot load a CLIP vision tower ({first_line(error)[:200]})"
        ) from None
    missing = set(info.get("missing_keys", ()))
    if missing - {PROJECTION}:
        raise CheckpointError(f"{checkpoint}: the vision tower lacks tensor '{sorted(missing)[0]}'")
    if PROJECTION in missing:
        if base_checkpoint is None:
            raise CheckpointError(
                f"{checkpoint}: a vision tower without {PROJECTION} needs base_model "
                "(the CLIP whose projection and text tower make the zero-shot head)"
            )
        base = _full_clip(base_checkpoint, trust_remote_code)
        if base.config.vision_config.hidden_size != vision.config.hidden_size:
            raise CheckpointError(
                f"{checkpoint}: its vision tower has width {vision.config.hidden_size}, "
                f"{base_checkpoint}'s {base.config.vision_config.hidden_size}"
            )
        vision.config.projection_dim = base.config.projection_dim
        tower = {n: t for n, t in vision.state_dict().items() if n != PROJECTION}
        vision = CLIPVisionModelWithProjection(vision.config)
        vision.load_state_dict({**tower, PROJECTION: base.visual_projection.weight.detach()}, strict=True)
    return vision.eval()


def load_task_model(
    checkpoint: str,
    trust_remote_code: bool = False,
    with_processor: bool = True,
    processor_checkpoint: str | None = None,
    base_checkpoint: str | None = None,
) -> TaskModel:
    """Load a CLIP (whole or vision-only) as a vision tower with projection, and its image processor.

    The processor is ``processor_checkpoint``'s when given, else the model's own, else the
    base's. The zero-shot head will come from ``base_checkpoint``'s text tower, or the
    checkpoint's own when there is no base.
    """
    kind = _model_type(checkpoint, trust_remote_code)
    if kind == "clip":
        vision = vision_of(_full_clip(checkpoint, trust_remote_code))
    elif kind == "clip_vision_model":
        vision = _vision_only(checkpoint, base_checkpoint, trust_remote_code)
    else:
        raise CheckpointError(
            f"{checkpoint}: a '{kind}' model is not a CLIP; kind {KIND} needs CLIPModel or "
            "CLIPVisionModel checkpoints"
        )
    processor, source = None, None
    if with_processor:
        processor, source = load_processor(processor_checkpoint or checkpoint, base_checkpoint)
    text_source = base_checkpoint or (checkpoint if kind == "clip" else None)
    weights = {name: tensor.detach().clone() for name, tensor in vision.state_dict().items()}
    return TaskModel(checkpoint, vision, processor, weights, frozenset(), source, {TEXT_SOURCE: text_source})


def class_names_of(spec: DatasetSpec, dataset: Any) -> list[str]:
    """The task's class names: ``class_names`` from the config (a list or a built-in set),
    else the label feature's names."""
    feature = dataset.features.get(spec.label_col)
    names = getattr(feature, "names", None)
    if spec.class_names is not None:
        given = spec.class_names
        chosen = list(class_names_for(given) if isinstance(given, str) else given)
        if names and len(names) != len(chosen):
            what = f"built-in set '{given}'" if isinstance(given, str) else "list"
            raise DataError(
                f"{spec.dataset_name}: class_names ({what}) has {len(chosen)} names but label "
                f"column '{spec.label_col}' has {len(names)} classes"
            )
        return chosen
    if not names:
        raise DataError(
            f"{spec.dataset_name}: label column '{spec.label_col}' has no class names; "
            "give class_names for the zero-shot head"
        )
    return [str(name).replace("_", " ") for name in names]


def templates_of(spec: DatasetSpec) -> tuple[str, ...]:
    """The task's prompt templates: the config's, a built-in set it names, or the dataset's default."""
    if isinstance(spec.templates, list):
        return tuple(spec.templates)
    if isinstance(spec.templates, str):
        return TEMPLATES[spec.templates]
    return templates_for(spec.dataset_name)


def _features(output: Any) -> torch.Tensor:
    """Projected features from ``get_text_features`` (a tensor, or an output whose pooler holds them)."""
    features: torch.Tensor = output if isinstance(output, torch.Tensor) else output.pooler_output
    return features


@torch.inference_mode()
def zero_shot_head(
    clip: Any, tokenizer: Any, class_names: Sequence[str], templates: Sequence[str]
) -> torch.Tensor:
    """The (classes x projection) zero-shot head of ``clip``'s text tower, scaled by exp(logit_scale)."""
    texts = [template.replace("{}", name) for name in class_names for template in templates]
    chunks = []
    for start in range(0, len(texts), TEXT_BATCH):
        tokens = tokenizer(texts[start : start + TEXT_BATCH], padding=True, return_tensors="pt")
        chunks.append(_features(clip.get_text_features(**tokens)).float())
    embedded = torch.cat(chunks).reshape(len(class_names), len(templates), -1)
    embedded = embedded / embedded.norm(dim=-1, keepdim=True)
    mean = embedded.mean(dim=1)
    scale: torch.Tensor = clip.logit_scale.detach().float().exp()
    head: torch.Tensor = mean / mean.norm(dim=-1, keepdim=True) * scale
    return head


def _source_identity(checkpoint: str) -> list[Any]:
    """What identifies a checkpoint's files: names, sizes and times for a folder; the id otherwise."""
    path = Path(checkpoint).expanduser()
    if not path.is_dir():
        return [checkpoint]
    files = []
    for entry in sorted(path.iterdir()):
        with contextlib.suppress(OSError):
            if entry.is_file():
                stat = entry.stat()
                files.append([entry.name, stat.st_size, stat.st_mtime_ns])
    return [str(path.resolve()), files]


def cached_head(
    text_source: str,
    class_names: Sequence[str],
    templates: Sequence[str],
    cache_dir: str | Path | None = None,
    trust_remote_code: bool = False,
) -> torch.Tensor:
    """The zero-shot head from the cache (``heads/`` under the cache root), or computed and stored."""
    key = cache.cache_key(
        {
            "kind": KIND,
            "text": _source_identity(text_source),
            "classes": list(class_names),
            "templates": list(templates),
        }
    )
    folder = cache.cache_root(cache_dir) / "heads"
    path = folder / f"{key}.npy"
    with contextlib.suppress(OSError, ValueError):
        stored = np.load(path, allow_pickle=False)
        if stored.ndim == 2 and stored.shape[0] == len(class_names) and stored.dtype == np.float32:
            return torch.from_numpy(stored)
    from transformers import AutoTokenizer

    clip = _full_clip(text_source, trust_remote_code)
    try:
        tokenizer = AutoTokenizer.from_pretrained(text_source)
    except Exception as error:  # noqa: BLE001 (any loading failure becomes one line)
        raise CheckpointError(
            f"{text_source}: cannot load its tokenizer ({first_line(error)[:200]})"
        ) from None
    head = zero_shot_head(clip, tokenizer, class_names, templates).contiguous()
    with contextlib.suppress(OSError):
        folder.mkdir(parents=True, exist_ok=True)
        staging = folder / f".{key}.partial-{os.getpid()}.npy"
        np.save(staging, head.numpy(), allow_pickle=False)
        staging.replace(path)
    return head


def prepare(
    spec: DatasetSpec,
    task: TaskModel,
    cache_dir: str | Path | None = None,
    workers: int | None = None,
    log: Callable[[str], None] | None = None,
) -> cache.CachedSplit:
    """The task's split, preprocessed (cached), and its zero-shot head (cached), kept on ``task``."""
    text_source = task.extra.get(TEXT_SOURCE)
    if text_source is None:
        raise CheckpointError(
            f"{task.checkpoint}: a vision-only CLIP has no text tower for the zero-shot head; give base_model"
        )
    dataset = load_task_data(spec)
    names = class_names_of(spec, dataset)
    head = cached_head(text_source, names, templates_of(spec), cache_dir)
    if head.shape[1] != task.model.config.projection_dim:
        raise CheckpointError(
            f"{task.checkpoint}: its projection gives {task.model.config.projection_dim} features, "
            f"{text_source}'s text tower {head.shape[1]}"
        )
    task.extra[HEAD] = head
    return prepare_images(
        spec,
        task.processor,
        image_mode(task.model),
        len(names),
        KIND,
        cache_dir,
        workers,
        log,
        dataset=dataset,
    )


def _image_embeds(
    model: Any, backbone: Mapping[str, torch.Tensor] | None, values: torch.Tensor
) -> torch.Tensor:
    if backbone is None:
        return model(pixel_values=values).image_embeds  # type: ignore[no-any-return]
    result = torch.func.functional_call(model, dict(backbone), args=(), kwargs={"pixel_values": values})
    return result.image_embeds  # type: ignore[no-any-return]


def _logits(embeds: torch.Tensor, head: torch.Tensor) -> torch.Tensor:
    embeds = embeds / embeds.norm(dim=-1, keepdim=True)
    return embeds @ head.to(device=embeds.device, dtype=embeds.dtype).T


def _head(task: TaskModel) -> torch.Tensor:
    head = task.extra.get(HEAD)
    if head is None:
        raise RuntimeError(f"{task.checkpoint}: no zero-shot head; prepare the task's data first")
    return head  # type: ignore[no-any-return]


def logits_function(task: TaskModel, device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
    """The zero-shot classifier with the task's own vision tower, from a batch of images on
    ``device`` to logits (the head is built when the task's data is prepared)."""
    head = _head(task).to(device).clone()  # a normal tensor: gradients may flow through it
    model = task.model.to(device).eval()
    return lambda values: _logits(_image_embeds(model, None, values), head)


def evaluate(
    task: TaskModel,
    backbone: Mapping[str, torch.Tensor] | None,
    data: cache.CachedSplit,
    device: torch.device,
    batch_size: int = 256,
    autocast_dtype: str = "none",
) -> dict[str, float]:
    """Every metric of the zero-shot head on the vision tower ``backbone`` (its own when None)."""
    head = _head(task).to(device)
    model = task.model.to(device).eval()
    backbone = None if backbone is None else as_parameters_of(model, backbone)
    return score_split(
        lambda values: _logits(_image_embeds(model, backbone, values), head),
        data,
        device,
        batch_size,
        autocast_dtype,
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
    """Every metric for each of B candidate vision towers at once (``vmap`` over the rows of ``flats``)."""
    head = _head(task).to(device)
    model = task.model.to(device).eval()

    def logits(flat: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        return _logits(_image_embeds(model, views(flat), values), head)

    return score_candidates(logits, flats, data, device, batch_size, autocast_dtype)
