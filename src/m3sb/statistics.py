"""Per-model statistics for the data-dependent merges, written as tensors named like the weights.

``gram`` (RegMean): for every linear layer of the backbone, the mean over input rows (tokens
included) of ``x x^T``, the input Gram matrix, caught with forward hooks, under the name of
the layer's weight. ``fisher`` (Fisher merging): for every floating backbone parameter, the
diagonal Fisher information ``E_x E_{y ~ p(y|x)} [(d log p(y|x) / d theta)^2]``, estimated
with one label drawn per example from the model's own predictions (seeded), under the
parameter's name. The first ``samples`` examples of the split are used.

The file is safetensors; its metadata names the kind, the model it was computed for (a
fingerprint of its weights, checked when merging), the number of examples and, for Fisher,
the norm of the whole Fisher vector (what Fisher merging's normalisation divides by).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import torch

from m3sb.checkpoints import content_fingerprint, open_checkpoint
from m3sb.errors import CheckpointError, ConfigError
from m3sb.statistics_files import FINGERPRINT_KEY, GRAM_KINDS, KIND_KEY, KINDS, NORM_KEY
from m3sb.tasks.cache import CachedSplit
from m3sb.tasks.model import TaskModel
from m3sb.tasks.registry import Task, TaskSpec

if TYPE_CHECKING:
    from m3sb.config import StatisticsSettings

Batch = TypeVar("Batch")


def checkpoint_names(model: Any, state_names: Iterable[str], saved_names: Iterable[str]) -> dict[str, str]:
    """Each state-dict name's name in the saved checkpoint. transformers 5 renames some
    modules when it loads a checkpoint (ViT's ``encoder.layer.N.attention.attention.query``
    is ``layers.N.attention.q_proj`` in memory) and saves a ``CLIPVisionModel`` without its
    ``vision_model.`` prefix: the renaming is undone as ``save_pretrained`` undoes it, then a
    leading prefix is dropped where the checkpoint has the shorter name."""
    state = model.state_dict()
    reverted_of = {name: name for name in state}
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # transformers 4 keeps the checkpoint's names in memory
        pass
    else:
        by_identity = {
            id(tensor): saved for saved, tensor in revert_weight_conversion(model, dict(state)).items()
        }
        reverted_of = {name: by_identity.get(id(tensor), name) for name, tensor in state.items()}
    saved = set(saved_names)
    result = {}
    for name in state_names:
        parts = reverted_of.get(name, name).split(".")
        suffixes = (".".join(parts[k:]) for k in range(len(parts)))
        match = next((suffix for suffix in suffixes if suffix in saved), None)
        if match is not None:
            result[name] = match
    return result


def first_examples(
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]], samples: int
) -> Iterator[torch.Tensor]:
    """The input batches, cut to ``samples`` examples in all (copies: the loader reuses its buffers)."""
    left = samples
    for values, _ in batches:
        if left <= 0:
            return
        taken = values[:left].clone()
        left -= len(taken)
        yield taken


def gram_matrices(
    model: torch.nn.Module,
    logits_of: Callable[[Batch], object],
    batches: Iterable[Batch],
    weight_names: set[str],
) -> dict[str, torch.Tensor]:
    """The mean input Gram matrix (over every input row) of each linear layer whose weight is
    among ``weight_names``, under that weight's name, in float64, while ``logits_of`` runs
    ``model`` on each batch."""
    sums: dict[str, torch.Tensor] = {}
    rows: dict[str, int] = {}

    def hook_for(name: str) -> Callable[..., None]:
        def hook(module: torch.nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).double()
            sums[name] = sums[name] + x.T @ x if name in sums else x.T @ x
            rows[name] = rows.get(name, 0) + x.shape[0]

        return hook

    handles = [
        module.register_forward_hook(hook_for(f"{name}.weight"))
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and f"{name}.weight" in weight_names
    ]
    try:
        with torch.inference_mode():
            for values in batches:
                logits_of(values)
    finally:
        for handle in handles:
            handle.remove()
    return {name: total / rows[name] for name, total in sums.items()}


def diagonal_fisher(
    model: torch.nn.Module,
    logits_of: Callable[[torch.Tensor], torch.Tensor],
    batches: Iterable[torch.Tensor],
    parameter_names: set[str],
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """The diagonal Fisher of each named parameter: per example, the squared gradient of the
    log-probability of a label drawn from the model's prediction, averaged, in float64."""
    parameters = {name: p for name, p in model.named_parameters() if name in parameter_names}
    for parameter in parameters.values():
        parameter.requires_grad_(True)
    sums = {name: torch.zeros(p.shape, dtype=torch.float64) for name, p in parameters.items()}
    generator = torch.Generator().manual_seed(seed)
    count = 0
    for values in batches:
        for example in values:
            log_probabilities = torch.log_softmax(logits_of(example.unsqueeze(0)).double(), dim=-1)[0]
            label = int(torch.multinomial(log_probabilities.detach().exp().cpu(), 1, generator=generator))
            gradients = torch.autograd.grad(
                log_probabilities[label], list(parameters.values()), allow_unused=True
            )
            for (name, _), gradient in zip(parameters.items(), gradients, strict=True):
                if gradient is not None:
                    sums[name] += gradient.detach().double().cpu().square()
            count += 1
    return {name: total / max(count, 1) for name, total in sums.items()}


def check_kind(kind: str) -> None:
    """A one-line error unless ``kind`` is a kind of statistics m3sb computes."""
    if kind not in KINDS:
        raise ConfigError(f"kind: expected one of {', '.join(KINDS)}, got {kind!r}")


def model_statistics(
    task: TaskModel,
    logits_of: Callable[[torch.Tensor], torch.Tensor],
    data: CachedSplit,
    kind: str,
    samples: int = 256,
    batch_size: int = 32,
    seed: int = 0,
    device: torch.device | None = None,
) -> dict[str, torch.Tensor]:
    """The statistics of a loaded task model on the first ``samples`` examples of ``data``,
    keyed by the model's state-dict names (float64)."""
    check_kind(kind)
    if kind == "gram_plusplus":
        raise ConfigError(
            "gram_plusplus statistics are measured through the merge of all the models together"
        )
    if data.count == 0:
        raise ConfigError(f"{task.checkpoint}: the statistics split holds no examples")
    device = device or torch.device("cpu")
    model = task.model.to(device)
    batches = (values.to(device) for values in first_examples(data.batches(batch_size), samples))
    floating = {name for name, tensor in task.backbone.items() if tensor.is_floating_point()}
    if kind == "gram":
        grams = gram_matrices(model, logits_of, batches, floating)
        return {name: gram.cpu() for name, gram in grams.items()}  # beside the CPU weights that merge
    with torch.enable_grad():
        return diagonal_fisher(model, logits_of, batches, floating, seed)


def prepare_statistics_data(
    spec: TaskSpec, task: TaskModel, samples: int, cache_dir: str | None
) -> CachedSplit:
    """The examples statistics are computed on: the first ``samples`` of the task's split."""
    dataset = spec.dataset
    if dataset.max_samples is None or dataset.max_samples > samples:  # prepare only what is used
        dataset = dataset.model_copy(update={"max_samples": samples})
    return spec.family.prepare(dataset, task, cache_dir)


def whole_norm(tensors: Mapping[str, torch.Tensor]) -> float:
    """The Euclidean norm of all the tensors together (Fisher merging's normaliser)."""
    return math.sqrt(sum(float(t.double().square().sum()) for t in tensors.values()))


def compute_statistics(
    spec: TaskSpec,
    kind: str,
    samples: int = 256,
    batch_size: int = 32,
    seed: int = 0,
    device: torch.device | None = None,
    base_checkpoint: str | None = None,
    cache_dir: str | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The statistics of ``spec``'s model on the first ``samples`` examples of its data, keyed
    by the names of the model's saved tensors, with the file's metadata."""
    check_kind(kind)
    device = device or torch.device("cpu")
    task = spec.family.load_task_model(spec.checkpoint, base_checkpoint=base_checkpoint)
    data = prepare_statistics_data(spec, task, samples, cache_dir)
    logits_of = spec.family.logits_function(task, device)
    tensors = model_statistics(task, logits_of, data, kind, samples, batch_size, seed, device)
    return as_saved(spec.checkpoint, task, tensors, kind, min(samples, data.count))


def as_saved(
    checkpoint_id: str, task: TaskModel, tensors: Mapping[str, torch.Tensor], kind: str, examples: int
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A loaded model's statistics keyed by the names its checkpoint saves them under, in the
    dtype files keep, with the file's metadata (kind, the model's fingerprint, examples)."""
    checkpoint = open_checkpoint(checkpoint_id)
    names = checkpoint_names(task.model, tensors, checkpoint.tensors)
    missing = sorted(set(tensors) - set(names))
    if missing:
        raise CheckpointError(
            f"{checkpoint_id}: tensor '{missing[0]}' of the loaded model is not saved in it"
        )
    metadata = {
        KIND_KEY: kind,
        FINGERPRINT_KEY: content_fingerprint(checkpoint),
        "model": checkpoint_id,
        "examples": str(examples),
    }
    stored = torch.float64 if kind in GRAM_KINDS else torch.float32  # Gram matrices are ill-conditioned
    result = {names[name]: tensor.to(stored).contiguous() for name, tensor in tensors.items()}
    if kind == "fisher":
        metadata[NORM_KEY] = repr(whole_norm(result))
    return result, metadata


def parse_task(text: str, checkpoint: str) -> TaskSpec:
    """A task for ``checkpoint`` from a dataset entry (a YAML file, or a YAML mapping inline)."""
    import yaml

    from m3sb.config import load_yaml
    from m3sb.tasks.registry import parse_task_entry

    path = Path(text).expanduser()
    if path.is_file():
        entry: Any = load_yaml(path)
    else:
        try:
            entry = yaml.safe_load(text)
        except yaml.YAMLError:
            raise ConfigError(f"--task: neither a file nor a YAML mapping: {text!r}") from None
    if isinstance(entry, dict) and "split" not in entry:
        entry = {**entry, "split": "train"}  # statistics describe the data a model was trained on
    kind, _, dataset = parse_task_entry(entry, "--task")
    return TaskSpec(
        name=Path(checkpoint).name or checkpoint, checkpoint=checkpoint, dataset=dataset, kind=kind
    )


def statistics_input(
    task: Task, settings: StatisticsSettings, cache_dir: str | None, device: torch.device
) -> tuple[CachedSplit, Callable[[torch.Tensor], torch.Tensor]]:
    """A loaded task's statistics split (its dataset at ``settings.split``, prepared) and its
    logits function on ``device``; an evaluation split carved from that split is refused."""
    from dataclasses import replace

    from m3sb.tasks.data import CarveSpec

    evaluated = task.spec.dataset.split
    if isinstance(evaluated, CarveSpec) and evaluated.carve == settings.split:
        raise ConfigError(
            f"task '{task.name}': its evaluation split is carved from '{settings.split}', the "
            "statistics split; statistics would see evaluation examples: set statistics.split"
        )
    spec = replace(task.spec, dataset=task.spec.dataset.model_copy(update={"split": settings.split}))
    data = prepare_statistics_data(spec, task.model, settings.samples, cache_dir)
    return data, spec.family.logits_function(task.model, device)


def tasks_statistics(
    tasks: Sequence[Task],
    kind: str,
    settings: StatisticsSettings,
    cache_dir: str | None,
    device: torch.device,
    params: Mapping[str, Any] | None = None,
) -> list[dict[str, torch.Tensor]]:
    """Each loaded task model's statistics of ``kind`` on its statistics split (by state-dict
    name). ``gram_plusplus`` statistics are measured through the merge ``params`` configures
    (its ``weights`` and ``reduce_non_diagonal_ratio``)."""
    inputs = [statistics_input(task, settings, cache_dir, device) for task in tasks]
    if kind != "gram_plusplus":
        return [
            model_statistics(
                task.model,
                logits_of,
                data,
                kind,
                settings.samples,
                settings.batch_size,
                settings.seed,
                device,
            )
            for task, (data, logits_of) in zip(tasks, inputs, strict=True)
        ]
    from m3sb.layerwise_statistics import regmean_plusplus_statistics

    params = params or {}
    batches = [
        [values.to(device) for values in first_examples(data.batches(settings.batch_size), settings.samples)]
        for data, _ in inputs
    ]
    return regmean_plusplus_statistics(
        [task.model for task in tasks],
        [logits_of for _, logits_of in inputs],
        batches,
        params.get("weights"),
        float(params.get("reduce_non_diagonal_ratio", 0.95)),
    )
