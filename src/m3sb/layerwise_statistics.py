"""RegMean++'s statistics: each model's input Gram matrices measured on the merged model's
own earlier layers (Nguyen et al. 2025, FusionBench's ``regmean_plusplus``).

RegMean measures model i's layer inputs with model i's own earlier layers; RegMean++ feeds
each model's layer ``l`` with what the *merged* layers ``0..l-1`` make of model i's data, so
each layer's merge sees the representation it will really receive. The walk:

1. every tensor outside the stack of layers (embeddings, the final norm) is the weighted mean
   of the models' (FusionBench averages the embeddings too; it leaves the tensors after the
   stack at the base's values, m3sb averages them);
2. each model's data goes through that merged prefix to the first layer's input;
3. for each layer in turn: model i's own layer runs on model i's current inputs, its linear
   layers' input Gram matrices are recorded, the layer is merged with RegMean on them, and
   the merged layer turns every model's inputs into the next layer's.

The result is each model's Gram matrices, named like its weights: the merge itself is then
RegMean's formula on them (``merge_method: regmean_plusplus``), the same function that merged
each layer during the walk. The stack is found without knowing the family: the largest
``ModuleList`` of same-typed layers, whose call arguments are captured as the model makes
them (attention masks, position embeddings).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from m3sb.errors import ConfigError, MergeError
from m3sb.methods import merge_group
from m3sb.statistics import as_saved, first_examples, gram_matrices, prepare_statistics_data
from m3sb.statistics_files import MERGE_KEY, merge_settings
from m3sb.tasks.model import TaskModel, check_shared_backbone
from m3sb.tasks.registry import TaskSpec

CACHE_ARGUMENTS = frozenset({"past_key_values", "past_key_value", "layer_past"})


class _StackReachedError(Exception):
    """Raised by the hook on the first layer: the inputs are captured, the rest is not needed."""


@dataclass
class LayerInput:
    """One batch's input to a layer of the stack: the hidden states and the other arguments
    the model passes to every layer (masks, position embeddings)."""

    hidden: torch.Tensor
    args: tuple[Any, ...]
    kwargs: dict[str, Any]

    def through(self, layer: torch.nn.Module) -> torch.Tensor:
        """``layer``'s output hidden states on this input."""
        output = layer(self.hidden, *self.args, **self.kwargs)
        return output[0] if isinstance(output, tuple) else output  # type: ignore[no-any-return]

    @staticmethod
    def through_of(layer: torch.nn.Module) -> Callable[[LayerInput], torch.Tensor]:
        """A function running ``layer`` on a batch's input."""
        return lambda batch: batch.through(layer)


def layer_stack(model: torch.nn.Module, label: str) -> tuple[str, torch.nn.ModuleList]:
    """The model's stack of layers (its largest ``ModuleList`` of same-typed modules) and its
    state-dict prefix; a one-line error naming ``label`` if it has none."""
    best: tuple[str, torch.nn.ModuleList, int] | None = None
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.ModuleList) or len(module) == 0:
            continue
        if len({type(layer) for layer in module}) != 1:
            continue
        size = sum(parameter.numel() for parameter in module.parameters())
        if best is None or size > best[2]:
            best = (name, module, size)
    if best is None or best[2] == 0:
        raise ConfigError(
            f"{label}: no stack of layers found; regmean_plusplus merges a model layer by layer"
        )
    return best[0], best[1]


def stack_inputs(
    first_layer: torch.nn.Module, forward: Callable[[torch.Tensor], Any], batches: Sequence[torch.Tensor]
) -> list[LayerInput]:
    """What the model gives its first layer on each batch (the forward stops there)."""
    captured: list[LayerInput] = []

    def hook(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        kwargs = dict(kwargs)
        for cache in CACHE_ARGUMENTS & kwargs.keys():  # replayed layers must not grow a cache
            kwargs[cache] = None
        if "use_cache" in kwargs:
            kwargs["use_cache"] = False
        hidden = args[0] if args else kwargs.pop("hidden_states")
        captured.append(LayerInput(hidden, tuple(args[1:]), kwargs))
        raise _StackReachedError

    handle = first_layer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.inference_mode():
            for values in batches:
                try:
                    forward(values)
                except _StackReachedError:
                    continue
                raise MergeError("the model's forward pass never reached its first layer")
    finally:
        handle.remove()
    return captured


def _merged(
    names: Sequence[str],
    models: Sequence[TaskModel],
    weights: Sequence[float],
    grams: Sequence[Mapping[str, torch.Tensor]],
    ratio: float,
) -> dict[str, torch.Tensor]:
    """RegMean's merge of the named backbone tensors (the weighted mean where no model has a Gram)."""
    result = {}
    for name in names:
        tensors = [model.weights[name] for model in models]
        if not tensors[0].is_floating_point():
            result[name] = tensors[0]
            continue
        statistics = [own.get(name) for own in grams]
        result[name] = merge_group(
            "regmean", tensors, weights, tensor_name=name, statistics=statistics,
            reduce_non_diagonal_ratio=ratio,
        )  # fmt: skip
    return result


def regmean_plusplus_statistics(
    models: Sequence[TaskModel],
    forwards: Sequence[Callable[[torch.Tensor], Any]],
    batches: Sequence[Sequence[torch.Tensor]],
    weights: Sequence[float] | None = None,
    reduce_non_diagonal_ratio: float = 0.95,
) -> list[dict[str, torch.Tensor]]:
    """Each model's RegMean++ Gram matrices (float64, on the CPU, by state-dict name).

    ``forwards[i]`` runs model i's module (``models[i].model``, already on its device) on a
    batch of ``batches[i]``; the merge uses ``weights`` and ``reduce_non_diagonal_ratio``,
    which the statistics therefore depend on. The models' modules are left with their own
    weights.
    """
    if len(models) < 2:
        raise ConfigError("regmean_plusplus merges at least two models")
    weight_list = [1.0] * len(models) if weights is None else [float(w) for w in weights]
    prefix, reference_stack = layer_stack(models[0].model, models[0].checkpoint)
    stacks = [layer_stack(model.model, model.checkpoint)[1] for model in models]
    backbone = list(models[0].backbone)
    outside = [name for name in backbone if not name.startswith(f"{prefix}.")]
    shared = _merged(outside, models, weight_list, [{}] * len(models), reduce_non_diagonal_ratio)
    inputs = []
    for model, stack, forward, own_batches in zip(models, stacks, forwards, batches, strict=True):
        model.model.load_state_dict(shared, strict=False)  # the merged prefix, for this capture only
        try:
            inputs.append(stack_inputs(stack[0], forward, own_batches))
        finally:
            model.model.load_state_dict({name: model.weights[name] for name in shared}, strict=False)
    statistics: list[dict[str, torch.Tensor]] = [{} for _ in models]
    for index in range(len(reference_stack)):
        layer_prefix = f"{prefix}.{index}."
        names = [name for name in backbone if name.startswith(layer_prefix)]
        relative = {name[len(layer_prefix) :] for name in names}
        grams = []
        for stack, own_inputs in zip(stacks, inputs, strict=True):
            layer = stack[index]
            measured = gram_matrices(layer, LayerInput.through_of(layer), own_inputs, relative)
            grams.append({layer_prefix + name: gram.cpu() for name, gram in measured.items()})
        merged = _merged(names, models, weight_list, grams, reduce_non_diagonal_ratio)
        merged_layer = copy.deepcopy(reference_stack[index])  # layers may differ (sliding attention...)
        merged_layer.load_state_dict(
            {name[len(layer_prefix) :]: t for name, t in merged.items()}, strict=False
        )
        merged_layer.eval()
        if index + 1 < len(reference_stack):
            with torch.inference_mode():
                for own_inputs in inputs:
                    for batch in own_inputs:
                        batch.hidden = batch.through(merged_layer)
        for own, measured_grams in zip(statistics, grams, strict=True):
            own.update(measured_grams)
    return statistics


def compute_plusplus_statistics(
    specs: Sequence[TaskSpec],
    weights: Sequence[float] | None = None,
    reduce_non_diagonal_ratio: float = 0.95,
    samples: int = 256,
    batch_size: int = 32,
    device: torch.device | None = None,
    base_checkpoint: str | None = None,
    cache_dir: str | None = None,
) -> list[tuple[dict[str, torch.Tensor], dict[str, str]]]:
    """Each model's RegMean++ statistics, from the first ``samples`` examples of its task's
    data, keyed by its saved tensors' names, with the file's metadata (which records the
    merge they were measured through)."""
    device = device or torch.device("cpu")
    weight_list = [1.0] * len(specs) if weights is None else [float(w) for w in weights]
    if len(weight_list) != len(specs):
        raise ConfigError(f"weights: {len(weight_list)} values for {len(specs)} models")
    if any(w < 0 for w in weight_list) or sum(weight_list) <= 0:
        raise ConfigError(
            f"weights: regmean_plusplus needs non-negative weights with a positive sum, got {weight_list}"
        )
    models = [spec.family.load_task_model(spec.checkpoint, base_checkpoint=base_checkpoint) for spec in specs]
    check_shared_backbone(models)
    data = [
        prepare_statistics_data(spec, model, samples, cache_dir)
        for spec, model in zip(specs, models, strict=True)
    ]
    for spec, split in zip(specs, data, strict=True):
        if split.count == 0:
            raise ConfigError(f"{spec.checkpoint}: the statistics split holds no examples")
    forwards = [spec.family.logits_function(model, device) for spec, model in zip(specs, models, strict=True)]
    batches = [
        [values.to(device) for values in first_examples(split.batches(batch_size), samples)] for split in data
    ]
    grams = regmean_plusplus_statistics(models, forwards, batches, weight_list, reduce_non_diagonal_ratio)
    record = merge_settings(weight_list, reduce_non_diagonal_ratio)
    results = []
    for spec, model, own, split in zip(specs, models, grams, data, strict=True):
        tensors, metadata = as_saved(spec.checkpoint, model, own, "gram_plusplus", min(samples, split.count))
        results.append((tensors, {**metadata, MERGE_KEY: record}))
    return results
