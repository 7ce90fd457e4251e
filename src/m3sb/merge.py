"""The merge engine: plan a merge from a config, then stream it tensor by tensor.

``build_plan`` does every check that needs no tensor data (method, parameters, inputs,
tensor names and shapes, per-tensor weights) so that bad input fails before any heavy
work. ``merge_tensors`` then yields merged tensors one name at a time, holding about one
tensor per input; ``merge_to_folder`` writes them as a Hugging Face checkpoint.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import yaml

from m3sb.checkpoints import (
    SUPPORT_FILES,
    TOKENIZER_FILES,
    Checkpoint,
    SafetensorsWriter,
    TensorInfo,
    atomic_output_folder,
    content_fingerprint,
    copy_support_files,
    open_checkpoint,
)
from m3sb.config import (
    DTYPE_ALIASES,
    MergeConfig,
    ModuleEntry,
    ParamSpec,
    close_match,
    count_layers,
    layer_fraction,
    resolve_at,
)
from m3sb.devices import resolve_device
from m3sb.errors import CheckpointError, ConfigError, MergeError
from m3sb.geometry import GramAccumulator
from m3sb.memory import reused_heap
from m3sb.methods import MergeMethod, apply_method, canonical_params, get_method
from m3sb.methods.dare import mask_generators
from m3sb.methods.registry import ParamValue, check_weights, task_vector, tensor_seed
from m3sb.methods.sparsify import (
    BracketedSelection,
    gathered_kth_largest_magnitude,
    kept_count,
    streaming_kth_largest_magnitude,
)
from m3sb.modules import (
    ARCHITECTURE_MODULES,
    ModuleLayout,
    architecture_modules,
    config_value,
    layer_count_key,
    module_of,
    unclaimed,
    with_value,
)
from m3sb.slices import LAYER_COUNT_KEYS, sliced_layer_types, sliced_tensors
from m3sb.statistics_files import GRAM_KINDS, check_merge_settings, check_statistics_for, read_statistics
from m3sb.vocab import (
    Vocabulary,
    chat_template_text,
    is_vocabulary_tensor,
    load_tokenizer,
    plan_vocabulary,
    rows_of,
    save_tokenizer,
)

Progress = Callable[[str, int], None]


@dataclass(frozen=True)
class TensorSource:
    """One input of an output tensor: a checkpoint and the tensor's name in it."""

    checkpoint: Checkpoint
    name: str


@dataclass(frozen=True)
class TensorJob:
    """One output tensor: its inputs, how to compute it and what it will look like."""

    name: str
    shape: tuple[int, ...]
    out_dtype: torch.dtype
    weights: tuple[float, ...]
    params: dict[str, ParamValue | list[ParamValue]]
    mergeable: bool
    sources: tuple[TensorSource, ...]
    base: TensorSource | None = None
    vocabulary: bool = False  # re-indexed to the output vocabulary before merging
    statistics: tuple[TensorSource | None, ...] = ()  # each input's, for the data-dependent methods

    @property
    def copied_from(self) -> TensorSource:
        """Where a tensor that is not merged (integers, say) is copied from."""
        return self.base or self.sources[0]


@dataclass(frozen=True)
class MergePlan:
    """A validated merge: the method, its inputs in order, and one job per tensor."""

    method: MergeMethod
    inputs: tuple[Checkpoint, ...]
    base: Checkpoint | None
    jobs: tuple[TensorJob, ...]
    compute_dtype: torch.dtype
    config: MergeConfig
    config_overrides: dict[str, object] = field(default_factory=dict)
    vocabulary: Vocabulary | None = None
    chat_template: str | None = None
    notes: list[str] = field(default_factory=list)  # what the recipe asked that was ignored
    statistic_norms: tuple[float, ...] = ()  # each input's whole-statistics norm (Fisher)

    @property
    def config_source(self) -> Checkpoint:
        """The checkpoint whose config.json (and tokenizer, by default) the output takes."""
        return self.base or self.inputs[0]

    @property
    def sources(self) -> tuple[Checkpoint, ...]:
        """Every checkpoint the merge reads."""
        return _with_base(self.inputs, self.base)

    @property
    def layout(self) -> dict[str, TensorInfo]:
        """Names, shapes and dtypes of the merged checkpoint, in writing order."""
        return {job.name: TensorInfo(job.shape, job.out_dtype) for job in self.jobs}


def _with_base(inputs: Sequence[Checkpoint], base: Checkpoint | None) -> tuple[Checkpoint, ...]:
    """The inputs, then the base when it is not one of them."""
    return (*inputs, *([base] if base is not None and base not in inputs else []))


@dataclass(frozen=True)
class MergeResult:
    """What a finished merge reports."""

    out_dir: Path
    tensors: int
    bytes_written: int
    seconds: float


def _dtype_name(dtype: torch.dtype) -> str:
    """``float32`` for ``torch.float32``."""
    return str(dtype).removeprefix("torch.")


def _torch_dtype(name: str | None) -> torch.dtype | None:
    return None if name is None else getattr(torch, DTYPE_ALIASES[name])


def _canonical_names(method: MergeMethod, config: MergeConfig) -> MergeConfig:
    """``config`` with every parameter alias (``iterations``) written as its name (``max_iter``)."""

    def named(entry: Any, where: str) -> Any:
        return entry.model_copy(update={"parameters": canonical_params(method, entry.parameters, where)})

    update: dict[str, Any] = {"parameters": canonical_params(method, config.parameters, "parameters")}
    if config.models is not None:
        update["models"] = [named(entry, f"model '{entry.model}'") for entry in config.models]
    if config.slices is not None:
        update["slices"] = [
            named(entry, f"slices[{k}]").model_copy(
                update={
                    "sources": [
                        named(source, f"slices[{k}].sources[{j}]") for j, source in enumerate(entry.sources)
                    ]
                }
            )
            for k, entry in enumerate(config.slices)
        ]
    result = config.model_copy(update=update)
    if config.modules is not None:
        recipes = _module_recipes(result)
        result = _with_module_recipes(result, {n: _canonical_names(method, r) for n, r in recipes.items()})
    return result


def _module_recipes(config: MergeConfig) -> dict[str, MergeConfig]:
    """Each module of a ``modules`` recipe as a recipe of its own: the module's models or slices
    and its parameters in place of the top level's (with the whole merge's ``space``)."""
    assert config.modules is not None
    space = {"space": config.parameters["space"]} if "space" in config.parameters else {}
    return {
        name: config.model_copy(
            update={
                "modules": None,
                "models": module.models,
                "slices": module.slices,
                "parameters": {**space, **module.parameters},
            }
        )
        for name, module in config.modules.items()
    }


def _with_module_recipes(config: MergeConfig, recipes: Mapping[str, MergeConfig]) -> MergeConfig:
    """``config`` with its modules rebuilt from recipes made by ``_module_recipes``."""
    assert config.modules is not None
    modules = {}
    for name, recipe in recipes.items():
        own = config.modules[name].parameters
        parameters = {k: v for k, v in recipe.parameters.items() if k != "space" or "space" in own}
        modules[name] = ModuleEntry.model_construct(
            models=recipe.models, slices=recipe.slices, parameters=parameters
        )
    return config.model_copy(update={"modules": modules})


def _check_level(method: MergeMethod, params: Mapping[str, Any], where: str, per_model_only: bool) -> None:
    """Every key of ``params`` is a parameter of the method, allowed at this level."""
    allowed = ", ".join(p.label for p in method.all_params)
    for key in params:
        param = method.param(key)
        if param is None:
            raise ConfigError(
                f"{where}unknown parameter '{key}' for merge_method '{method.name}'; allowed: {allowed}"
            )
        if per_model_only and not param.per_model:
            raise ConfigError(
                f"{where}parameter '{key}' of '{method.name}' applies to the whole "
                "merge; put it under the top-level 'parameters'"
            )


def _check_param_names(method: MergeMethod, config: MergeConfig) -> None:
    """Every parameter in the config must be declared by the method, at a level it allows."""
    if config.modules is not None:
        _check_level(method, config.parameters, "", per_model_only=False)
        for name, module in config.modules.items():
            if "space" in module.parameters:
                raise ConfigError(
                    f"modules.{name}: space applies to the whole merge; put it under the top-level parameters"
                )
            recipe = _module_recipes(config)[name]
            recipe = recipe.model_copy(update={"parameters": {**config.parameters, **module.parameters}})
            try:
                _check_param_names(method, recipe)
            except ConfigError as error:
                raise ConfigError(f"modules.{name}: {error}") from None
        return
    _check_level(method, config.parameters, "", per_model_only=False)
    for entry in config.models or []:
        _check_level(method, entry.parameters, f"model '{entry.model}': ", per_model_only=True)
    for k, piece in enumerate(config.slices or []):
        _check_level(method, piece.parameters, f"slices[{k}]: ", per_model_only=False)
        if "space" in piece.parameters:
            raise ConfigError(
                f"slices[{k}]: space applies to the whole merge; put it under the top-level parameters"
            )
        if piece.residual_weight is not None:
            raise ConfigError(
                f"slices[{k}]: residual_weight is used neither by mergekit nor by m3sb; remove it"
            )
        for j, source in enumerate(piece.sources):
            _check_level(method, source.parameters, f"slices[{k}].sources[{j}]: ", per_model_only=True)
    scales = "lambda" in config.parameters or any(
        "lambda" in piece.parameters for piece in config.slices or []
    )
    if scales and not _merges_task_vectors(method, config):
        raise ConfigError(
            f"parameter 'lambda' of '{method.name}' scales task vectors; it needs space: task_vectors"
        )
    slice_params = [piece.parameters for piece in config.slices or []]
    for param in method.all_params:
        in_every_slice = bool(slice_params) and all(param.name in params for params in slice_params)
        if param.default is None and not (param.name in config.parameters or in_every_slice):
            raise ConfigError(f"merge_method '{method.name}' needs parameter '{param.name}' ({param.help})")


def _merges_task_vectors(method: MergeMethod, config: MergeConfig) -> bool:
    return method.merges_task_vectors(config.parameters.get("space"), config.base_model is not None)


def _uses_base(method: MergeMethod, config: MergeConfig) -> bool:
    return method.base_is_input or _merges_task_vectors(method, config)


def _identity(location: str) -> str:
    """What a model location points at: the resolved path of a local file or folder, else the id."""
    path = Path(location).expanduser()
    return str(path.resolve()) if path.exists() else location


def _every(tensor_name: str) -> bool:
    """Keep every tensor (a plan over the whole checkpoint)."""
    return True


BASE_JOINS = ("linear",)  # methods of mergekit's that merge a base_model as one more model


def _select_inputs(
    method: MergeMethod, config: MergeConfig
) -> tuple[list[str], list[dict[str, ParamSpec]], str | None]:
    """The method's input locations with their per-model parameters, and the base location."""
    assert config.models is not None
    locations = [entry.model for entry in config.models]
    identities = [_identity(location) for location in locations]
    for i, location in enumerate(locations):
        if identities[i] in identities[:i]:
            first = locations[identities.index(identities[i])]
            same = "" if first == location else f" (as '{first}')"
            raise ConfigError(f"model '{location}' is listed twice{same}; give it a larger weight instead")
    specs = [dict(entry.parameters) for entry in config.models]
    joins = method.name in BASE_JOINS and not _uses_base(method, config)
    if config.base_model and joins and _identity(config.base_model) not in identities:
        locations.append(config.base_model)  # mergekit adds a base_model missing from the models
        specs.append({})
    base = config.base_model if _uses_base(method, config) else None
    if base is not None:  # the base may be written another way among the models
        base_identity = _identity(base)
        base = next(
            (loc for loc, ident in zip(locations, identities, strict=True) if ident == base_identity), base
        )
    if base is None and _merges_task_vectors(method, config):
        with_space = " with space: task_vectors" if method.space == "either" else ""
        raise ConfigError(f"merge_method '{method.name}'{with_space} needs a base_model")
    if base is not None:
        base_specs = [spec for location, spec in zip(locations, specs, strict=True) if location == base]
        kept = [(location, spec) for location, spec in zip(locations, specs, strict=True) if location != base]
        locations, specs = [k[0] for k in kept], [k[1] for k in kept]
        if method.base_is_input:
            locations.insert(0, base)
            specs.insert(0, base_specs[0] if base_specs else {})
            base = None
    if locations or base is None:  # the base alone: mergekit's merge of no task vector is the base
        method.check_input_count(len(locations))
    return locations, specs, base


def _check_alignment(
    checkpoints: Sequence[Checkpoint], realigned: bool = False, keep: Callable[[str], bool] = _every
) -> dict[str, TensorInfo]:
    """All checkpoints must hold the same tensor names (those ``keep`` keeps) with the same
    shapes (vocabulary-indexed tensors may differ in rows when ``realigned`` to an output
    vocabulary); returns the first's."""
    reference = checkpoints[0]
    names = {name: info for name, info in reference.tensors.items() if keep(name)}
    if not names:
        raise MergeError(f"{reference.label}: the checkpoint holds no tensors")
    for other in checkpoints[1:]:
        for name in names:
            if name not in other.tensors:
                raise MergeError(f"tensor '{name}' is in {reference.label} but missing from {other.label}")
        for name in other.tensors:
            if keep(name) and name not in names:
                raise MergeError(f"tensor '{name}' is in {other.label} but missing from {reference.label}")
        for name, info in names.items():
            theirs = other.tensors[name]
            if theirs.shape != info.shape:
                _check_rows(name, reference, other, realigned)
            both_float = info.dtype.is_floating_point and theirs.dtype.is_floating_point
            if theirs.dtype != info.dtype and not both_float:
                raise MergeError(
                    f"tensor '{name}' is {_dtype_name(info.dtype)} in {reference.label} "
                    f"but {_dtype_name(theirs.dtype)} in {other.label}"
                )
    return names


def _check_rows(
    name: str, first: Checkpoint, other: Checkpoint, realigned: bool, other_name: str = ""
) -> None:
    """Tensors of different shapes may only be vocabulary-indexed ones realigned by token."""
    other_name = other_name or name
    mine, theirs = first.tensors[name].shape, other.tensors[other_name].shape
    vocabulary = is_vocabulary_tensor(name, mine, rows_of(first)) and is_vocabulary_tensor(
        other_name, theirs, rows_of(other)
    )
    if vocabulary and realigned and tuple(mine[1:]) == tuple(theirs[1:]):
        return
    hint = (
        "; the vocabularies differ: set tokenizer_source (union or base)"
        if vocabulary and not realigned
        else ""
    )
    raise MergeError(
        f"tensor '{name}' has shape {list(mine)} in {first.label} but {list(theirs)} in {other.label}{hint}"
    )


def _num_layers(checkpoint: Checkpoint) -> int:
    """The depth over which gradient parameters are spread: from config.json, else the tensor names."""
    config = checkpoint.read_config()
    layers = config.get("num_hidden_layers") or config.get("n_layer") or config.get("num_layers")
    return layers if isinstance(layers, int) and layers > 0 else count_layers(checkpoint.tensors)


def _resolve(
    specs: Sequence[ParamSpec | None],
    param_name: str,
    method: MergeMethod,
    tensor: str,
    position: float,
    where: str,
) -> ParamValue:
    """The first of ``specs`` (most specific first) that has a value for ``tensor``, checked."""
    param = method.param(param_name)
    assert param is not None
    for spec in specs:
        if spec is None:
            continue
        if isinstance(spec, list) and not spec:
            raise ConfigError(f"{where}: parameter '{param_name}' is an empty list")
        value = resolve_at(spec, tensor, position)
        if value is not None:
            context = where if not isinstance(spec, list) else f"{where} (tensor '{tensor}')"
            return param.check(value, context)
    if param.default is None:
        raise ConfigError(f"{where}: no filter of parameter '{param_name}' matches tensor '{tensor}'")
    return param.default


def _promoted(info: TensorInfo, sources: Sequence[TensorSource]) -> TensorInfo:
    """``info`` with the dtype that holds every input's (float16 and bfloat16 give float32), so
    that a merge of mixed dtypes does not depend on the order of the models."""
    dtype = info.dtype
    for source in sources:
        other = source.checkpoint.tensors[source.name].dtype
        if other != dtype and other.is_floating_point and dtype.is_floating_point:
            dtype = torch.promote_types(dtype, other)
    return info if dtype == info.dtype else TensorInfo(info.shape, dtype)


@dataclass(frozen=True)
class _Settings:
    """Where one output tensor's parameters come from, most specific first: per input (its model's
    or slice source's, with the tensor's name in that input) and shared (slice, then top level)."""

    model_specs: tuple[tuple[Mapping[str, ParamSpec], ...], ...]
    shared_specs: tuple[Mapping[str, ParamSpec], ...]
    labels: tuple[str, ...]
    position: float


def _tensor_job(
    name: str,
    method: MergeMethod,
    config: MergeConfig,
    sources: tuple[TensorSource, ...],
    base: TensorSource | None,
    settings: _Settings,
) -> TensorJob:
    """Resolve every parameter for one tensor and check the weights make sense for the method."""
    first = sources[0] if sources else base
    assert first is not None
    every = (*sources, *([base] if base else []))
    info = _promoted(first.checkpoint.tensors[first.name], every)
    out_dtype = _torch_dtype(config.out_dtype) or _torch_dtype(config.dtype) or info.dtype
    if not info.dtype.is_floating_point:
        return TensorJob(name, info.shape, info.dtype, (), {}, False, sources, base)
    params: dict[str, ParamValue | list[ParamValue]] = {}
    for param in method.all_params:
        shared = [specs.get(param.name) for specs in settings.shared_specs]
        if param.per_model:
            params[param.name] = [
                _resolve(
                    [*(specs.get(param.name) for specs in own), *shared],
                    param.name,
                    method,
                    source.name,
                    settings.position,
                    label,
                )
                for source, own, label in zip(sources, settings.model_specs, settings.labels, strict=True)
            ]
        else:
            params[param.name] = _resolve(shared, param.name, method, name, settings.position, "parameters")
    declared_weights = params.pop("weight", [1.0] * len(sources))
    assert isinstance(declared_weights, list)
    weights = tuple(float(w) for w in declared_weights)
    check_weights(method, weights, params.get("normalize"), f"for tensor '{name}'")
    if method.validate is not None:
        method.validate(params, f"tensor '{name}'")
    return TensorJob(name, info.shape, out_dtype, weights, params, True, sources, base)


def check_recipe(config: MergeConfig, strict: bool = False) -> None:
    """The checks that need no model: the method, its parameters and where they are given."""
    method = get_method(config.merge_method)
    _check_param_names(method, _lenient(method, _canonical_names(method, config), strict, []))


def _lenient(method: MergeMethod, config: MergeConfig, strict: bool, notes: list[str]) -> MergeConfig:
    """``config`` without what mergekit ignores (each noted), unless ``strict``: parameters the
    method does not take, and a second entry of a model (the model is merged once, with its
    last entry's parameters, as mergekit reads it)."""
    if strict:
        return config
    names = [name for param in method.all_params for name in (param.name, *param.aliases)]
    scaled = _merges_task_vectors(method, config)

    def kept(params: Mapping[str, ParamSpec], where: str, per_model: bool = False) -> dict[str, ParamSpec]:
        result = {}
        for key, value in params.items():
            param = method.param(key)
            if param is not None and (key != "lambda" or scaled) and (param.per_model or not per_model):
                result[key] = value
                continue
            if param is not None and per_model:
                why = "applies to the whole merge, not to one model"
            elif param is not None:
                why = f"has no effect on {method.name} without task vectors"
            else:
                similar = close_match(key, names)
                why = f"is not one of {method.name}'s" + (f" (did you mean '{similar}'?)" if similar else "")
            notes.append(f"{where}parameter '{key}' {why}; ignored, as mergekit does")
        return result

    update: dict[str, Any] = {"parameters": kept(config.parameters, "")}
    for k, piece in enumerate(config.slices or []):
        if piece.residual_weight is not None:
            notes.append(f"slices[{k}]: residual_weight is used neither by mergekit nor by m3sb; ignored")
    if config.models is not None:
        update["models"] = _last_entries(config, notes, kept)
    if config.slices is not None:
        update["slices"] = [
            piece.model_copy(
                update={
                    "residual_weight": None,
                    "parameters": kept(piece.parameters, f"slices[{k}]: "),
                    "sources": [
                        source.model_copy(
                            update={
                                "parameters": kept(
                                    source.parameters, f"slices[{k}].sources[{j}]: ", per_model=True
                                )
                            }
                        )
                        for j, source in enumerate(piece.sources)
                    ],
                }
            )
            for k, piece in enumerate(config.slices)
        ]
    result = config.model_copy(update=update)
    if config.modules is not None:
        recipes = {}
        for name, recipe in _module_recipes(result).items():
            own: list[str] = []
            recipes[name] = _lenient(method, recipe, strict, own)
            notes.extend(f"modules.{name}: {note}" for note in own)
        result = _with_module_recipes(result, recipes)
    return result


def _last_entries(
    config: MergeConfig, notes: list[str], kept: Callable[..., dict[str, ParamSpec]]
) -> list[Any]:
    """The model entries, each model once, with the parameters of its last entry (mergekit's reading)."""
    assert config.models is not None
    last: dict[str, Any] = {}
    for entry in config.models:
        identity = _identity(entry.model)
        if identity in last:
            notes.append(
                f"model '{entry.model}' is listed twice; merged once, with its last entry's parameters"
            )
        earlier = last.get(identity)
        statistics = entry.statistics or (earlier.statistics if earlier is not None else None)
        last[identity] = entry.model_copy(
            update={
                "parameters": kept(entry.parameters, f"model '{entry.model}': ", per_model=True),
                "statistics": statistics,
            }
        )
    order = list(dict.fromkeys(_identity(entry.model) for entry in config.models))
    return [last[identity] for identity in order]


def build_plan(config: MergeConfig, strict: bool = False) -> MergePlan:
    """Check a merge config against its method and its inputs, reading no tensor data (``strict``:
    refuse what mergekit would ignore)."""
    method = get_method(config.merge_method)
    notes = list(config.notes)
    named = _lenient(method, _canonical_names(method, config), strict, notes)  # the card keeps the recipe
    _check_param_names(method, named)
    compute_dtype = torch.float64 if config.dtype == "float64" else torch.float32
    spec = named.tokenizer_spec
    if named.modules is not None:
        inputs, base, jobs, overrides = plan_modules(method, named, realigned=spec is not None)
    elif named.slices is not None:
        inputs, base, jobs, overrides = plan_slices(method, named, realigned=spec is not None)
    else:
        inputs, base, jobs = _plan_models(method, named, realigned=spec is not None)
        overrides = {}
    every = _with_base(inputs, base)
    norms: tuple[float, ...] = ()
    if method.statistics is not None:
        jobs, norms = _with_statistics(method, named, inputs, jobs)
    else:
        for entry in [
            *(named.models or []),
            *(e for m in (named.modules or {}).values() for e in m.models or []),
        ]:
            if entry.statistics is not None:
                notes.append(
                    f"model '{entry.model}': statistics are read only by regmean and fisher; ignored"
                )
    vocabulary = None
    if spec is not None:
        vocabulary = plan_vocabulary(spec, named, every, open_checkpoint, _identity)
        jobs = _realigned(jobs, vocabulary)
        overrides["vocab_size"] = vocabulary.rows
    template = None
    if named.chat_template is not None:
        template = chat_template_text(named.chat_template, [checkpoint.folder for checkpoint in every])
        donor = base or inputs[0]
        if vocabulary is None and load_tokenizer(donor.folder, donor.label) is None:
            raise ConfigError(f"chat_template: {donor.label} has no tokenizer to put it in")
    if vocabulary is not None and vocabulary.unfilled:
        shown = ", ".join(repr(token) for token in vocabulary.unfilled[:3])
        more = f" and {len(vocabulary.unfilled) - 3} more" if len(vocabulary.unfilled) > 3 else ""
        notes.append(
            f"{len(vocabulary.unfilled)} tokens of the output vocabulary ({shown}{more}) are in no input "
            "model; their rows are zero (give them a source under tokenizer.tokens)"
        )
    plan = MergePlan(
        method, inputs, base, jobs, compute_dtype, config, overrides, vocabulary, template, [], norms
    )
    plan.notes.extend(notes)
    return plan


def _with_statistics(
    method: MergeMethod, config: MergeConfig, inputs: Sequence[Checkpoint], jobs: Sequence[TensorJob]
) -> tuple[tuple[TensorJob, ...], tuple[float, ...]]:
    """The jobs with each input's statistics for their tensor, and each input's statistics norm;
    every file checked against its model first (kind, model, tensor names and shapes)."""
    kind = method.statistics
    assert kind is not None
    if config.models is None:
        raise ConfigError(
            f"merge_method '{method.name}' reads each model's statistics: give 'models' (no slices, modules)"
        )
    if config.tokenizer_spec is not None:
        raise ConfigError(f"merge_method '{method.name}' cannot realign statistics to another vocabulary")
    entries = {_identity(entry.model): entry for entry in config.models}
    files = []
    for checkpoint in inputs:
        entry = entries[_identity(checkpoint.label)]
        if entry.statistics is None:
            made_by = (
                "m3sb statistics MODEL... FOLDER --task ... --kind gram_plusplus, all models at once"
                if kind == "gram_plusplus"
                else f"m3sb statistics {entry.model} FILE --task ... --kind {kind}"
            )
            raise ConfigError(
                f"model '{entry.model}': merge_method '{method.name}' needs its {kind} statistics; add "
                f"'statistics: FILE' (made by: {made_by})"
            )
        header = read_statistics(entry.statistics)
        shapes = {name: tuple(info.shape) for name, info in checkpoint.tensors.items()}
        check_statistics_for(header, kind, content_fingerprint(checkpoint), shapes, checkpoint.label)
        files.append((header, open_checkpoint(header.path)))
    result = []
    for job in jobs:
        if not job.mergeable:
            result.append(job)
            continue
        present = [source.name in file.shapes for source, (file, _) in zip(job.sources, files, strict=True)]
        if any(present) and not all(present):
            lacking = files[present.index(False)][0].path
            raise ConfigError(
                f"{lacking}: no statistics for tensor '{job.name}', which other models' files have"
            )
        sources = tuple(
            TensorSource(opened, source.name) if has else None
            for source, (_, opened), has in zip(job.sources, files, present, strict=True)
        )
        if kind == "gram_plusplus" and any(present):
            ratio = job.params["reduce_non_diagonal_ratio"]
            assert isinstance(ratio, float)
            for file, _ in files:
                check_merge_settings(file, job.weights, ratio)
        result.append(replace(job, statistics=sources))
    norms = tuple(file.norm() for file, _ in files) if kind == "fisher" else ()
    return tuple(result), norms


def _realigned(jobs: Sequence[TensorJob], vocabulary: Vocabulary) -> tuple[TensorJob, ...]:
    """The jobs with every vocabulary-indexed tensor re-indexed to the output vocabulary's rows."""
    result = []
    for job in jobs:
        first = job.sources[0] if job.sources else job.base
        assert first is not None
        if job.mergeable and is_vocabulary_tensor(first.name, job.shape, rows_of(first.checkpoint)):
            job = replace(job, shape=(vocabulary.rows, *job.shape[1:]), vocabulary=True)
        result.append(job)
    return tuple(result)


@dataclass(frozen=True)
class _Scope:
    """The tensors a plan covers (all, or one module's of a multi-tower model), the layout of
    that module, and the module's parameters (between the slices' and the top level's)."""

    keep: Callable[[str], bool] = _every
    layout: ModuleLayout | None = None
    parameters: tuple[Mapping[str, ParamSpec], ...] = ()

    def depth(self, checkpoint: Checkpoint) -> int:
        """The number of layers of the covered part of ``checkpoint``."""
        if self.layout is None:
            return _num_layers(checkpoint)
        config = checkpoint.read_config()
        key = layer_count_key(config, self.layout)
        if key is not None:
            value = config_value(config, key)
            assert isinstance(value, int)
            return value
        return count_layers(name for name in checkpoint.tensors if self.keep(name))


def _opener() -> Callable[[str], Checkpoint]:
    """``open_checkpoint`` that opens each model once, however it is written."""
    opened: dict[str, Checkpoint] = {}

    def checkpoint(location: str) -> Checkpoint:
        key = _identity(location)
        if key not in opened:
            opened[key] = open_checkpoint(location)
        return opened[key]

    return checkpoint


def _plan_models(
    method: MergeMethod,
    named: MergeConfig,
    realigned: bool,
    scope: _Scope = _Scope(),
    checkpoint: Callable[[str], Checkpoint] | None = None,
) -> tuple[tuple[Checkpoint, ...], Checkpoint | None, tuple[TensorJob, ...]]:
    """The inputs, base and jobs of a recipe with ``models`` (over the tensors ``scope`` keeps)."""
    locations, specs, base_location = _select_inputs(method, named)
    checkpoint = checkpoint or _opener()
    inputs = tuple(checkpoint(location) for location in locations)
    base = checkpoint(base_location) if base_location else None
    names = _check_alignment([*inputs, *([base] if base else [])], realigned, scope.keep)
    num_layers = scope.depth(inputs[0] if inputs else base)  # type: ignore[arg-type]
    labels = tuple(f"model '{location}'" for location in locations)
    model_specs = tuple((spec,) for spec in specs)
    shared = (*scope.parameters, named.parameters)
    jobs = tuple(
        _tensor_job(
            name,
            method,
            named,
            tuple(TensorSource(checkpoint, name) for checkpoint in inputs),
            TensorSource(base, name) if base else None,
            _Settings(model_specs, shared, labels, layer_fraction(name, num_layers)),
        )
        for name in names
    )
    return inputs, base, jobs


def plan_slices(
    method: MergeMethod,
    config: MergeConfig,
    realigned: bool = False,
    scope: _Scope = _Scope(),
    checkpoint: Callable[[str], Checkpoint] | None = None,
) -> tuple[tuple[Checkpoint, ...], Checkpoint | None, tuple[TensorJob, ...], dict[str, object]]:
    """The inputs, base, jobs and config.json changes of a recipe with ``slices`` (over the
    tensors ``scope`` keeps)."""
    assert config.slices is not None
    checkpoint = checkpoint or _opener()
    pieces = [_slice_inputs(method, config, k, checkpoint, scope.depth) for k in range(len(config.slices))]
    planned = sliced_tensors(
        [[name for name in piece.ordered[0][0].tensors if scope.keep(name)] for piece in pieces],
        [[layer_range for _, layer_range, _, _ in piece.ordered] for piece in pieces],
    )
    jobs = []
    for tensor in planned:
        piece = pieces[tensor.slice_index]
        sources = []
        for entry, source_name in zip(piece.ordered, tensor.source_names, strict=True):
            source = TensorSource(entry[0], source_name)
            if source.name not in source.checkpoint.tensors:
                raise MergeError(f"tensor '{source.name}' is missing from {source.checkpoint.label}")
            sources.append(source)
        _check_shapes(sources, realigned)
        base = sources.pop(piece.base_index) if piece.base_index is not None else None
        kept = [entry for i, entry in enumerate(piece.ordered) if i != piece.base_index]
        settings = _Settings(
            tuple((entry[2],) for entry in kept),
            (piece.parameters, *scope.parameters, config.parameters),
            tuple(entry[3] for entry in kept),
            tensor.position,
        )
        jobs.append(_tensor_job(tensor.name, method, config, tuple(sources), base, settings))
    base_location = config.base_model if _uses_base(method, config) and config.base_model else None
    config_from = checkpoint(base_location) if base_location else pieces[0].ordered[0][0]
    inputs = tuple(dict.fromkeys(entry[0] for piece in pieces for entry in piece.ordered))
    ordered_inputs = (config_from, *(c for c in inputs if c is not config_from))
    return ordered_inputs, None, tuple(jobs), _sliced_config(config_from, pieces, scope.layout)


@dataclass(frozen=True)
class _SliceInputs:
    """One slice's sources in the method's input order (checkpoint, layer range, parameters,
    label), the index of its base among them (None when the method takes no base), and the
    slice's own parameters."""

    ordered: tuple[tuple[Checkpoint, tuple[int, int], Mapping[str, ParamSpec], str], ...]
    base_index: int | None
    parameters: Mapping[str, ParamSpec]


def _slice_inputs(
    method: MergeMethod,
    config: MergeConfig,
    k: int,
    checkpoint: Callable[[str], Checkpoint],
    depth_of: Callable[[Checkpoint], int] = lambda checkpoint: _num_layers(checkpoint),
) -> _SliceInputs:
    """Slice ``k``'s sources, checked (depths, equal lengths, no model twice) and ordered."""
    assert config.slices is not None
    piece = config.slices[k]
    entries = []
    seen: dict[str, int] = {}
    for j, source in enumerate(piece.sources):
        where = f"slices[{k}].sources[{j}]"
        identity = _identity(source.model)
        if identity in seen:
            raise ConfigError(
                f"{where}: model '{source.model}' is already source {seen[identity]} of this slice"
            )
        seen[identity] = j
        opened = checkpoint(source.model)
        depth = depth_of(opened)
        start, end = source.layer_range
        if end > depth:
            raise ConfigError(
                f"{where}: layer_range [{start}, {end}] is past the {depth} layers of {opened.label}"
            )
        entries.append((opened, (start, end), dict(source.parameters), f"{where} ('{source.model}')"))
    lengths = {end - start for _, (start, end), _, _ in entries}
    if len(lengths) > 1:
        raise ConfigError(
            f"slices[{k}]: its sources give {' and '.join(map(str, sorted(lengths)))} layers; "
            "every source of a slice must give the same number"
        )
    base_location = piece.base_model or config.base_model
    with_base = config.model_copy(update={"base_model": base_location})  # the slice's own base
    base_index = None
    if base_location is not None and _uses_base(method, with_base):
        base_identity = _identity(base_location)
        if base_identity not in seen:
            raise ConfigError(
                f"slices[{k}]: base_model '{base_location}' is not among the slice's sources; "
                "give it a layer_range there"
            )
        base_index = seen[base_identity]
        if method.base_is_input:
            entries.insert(0, entries.pop(base_index))
            base_index = None
    merged = len(entries) - (base_index is not None)
    try:
        if merged or base_index is None:
            method.check_input_count(merged)
    except ConfigError as error:
        raise ConfigError(f"slices[{k}]: {error}") from None
    if base_index is None and _merges_task_vectors(method, with_base):
        raise ConfigError(f"slices[{k}]: merge_method '{method.name}' needs a base_model")
    return _SliceInputs(tuple(entries), base_index, dict(piece.parameters))


def _check_shapes(sources: Sequence[TensorSource], realigned: bool) -> None:
    """Every input of an output tensor has the same shape (vocabulary rows aside, when realigned)."""
    first = sources[0]
    info = first.checkpoint.tensors[first.name]
    for other in sources[1:]:
        if other.checkpoint.tensors[other.name].shape != info.shape:
            _check_rows(first.name, first.checkpoint, other.checkpoint, realigned, other.name)


def _sliced_config(
    config_from: Checkpoint, pieces: Sequence[_SliceInputs], layout: ModuleLayout | None = None
) -> dict[str, object]:
    """config.json keys that follow the output's layers: the layer count and per-layer lists
    (of the module ``layout`` describes, when the slices are one module's)."""
    existing = config_from.read_config()
    total = sum(end - start for piece in pieces for _, (start, end), _, _ in piece.ordered[:1])
    if layout is not None:
        return _sliced_module_config(existing, pieces, layout, total)
    overrides: dict[str, object] = {
        key: total for key in LAYER_COUNT_KEYS if isinstance(existing.get(key), int)
    }
    text = existing.get("text_config")
    if not overrides and isinstance(text, dict) and isinstance(text.get("num_hidden_layers"), int):
        overrides["text_config"] = {**text, "num_hidden_layers": total}  # a multimodal config's text tower
    first_config = pieces[0].ordered[0][0].read_config()
    layer_types = first_config.get("layer_types")
    if isinstance(layer_types, list):
        ranges = [piece.ordered[0][1] for piece in pieces]
        if all(end <= len(layer_types) for _, end in ranges):
            overrides["layer_types"] = sliced_layer_types(layer_types, ranges)
    return overrides


def _sliced_module_config(
    existing: Mapping[str, object], pieces: Sequence[_SliceInputs], layout: ModuleLayout, total: int
) -> dict[str, object]:
    """The config.json changes of one module's slices: its layer count, and the per-layer list
    (``layer_types``) that sits beside it."""
    key = layer_count_key(existing, layout)
    if key is None:
        return {}
    updated = dict(existing)
    updated.update(with_value(updated, key, total))
    parent = key.rpartition(".")[0]
    types_key = f"{parent}.layer_types" if parent else "layer_types"
    layer_types = config_value(pieces[0].ordered[0][0].read_config(), types_key)
    ranges = [piece.ordered[0][1] for piece in pieces]
    if isinstance(layer_types, list) and all(end <= len(layer_types) for _, end in ranges):
        updated.update(with_value(updated, types_key, sliced_layer_types(layer_types, ranges)))
    return {top: updated[top] for top in {key.split(".")[0], types_key.split(".")[0]} if top in updated}


def plan_modules(
    method: MergeMethod, config: MergeConfig, realigned: bool = False
) -> tuple[tuple[Checkpoint, ...], Checkpoint | None, tuple[TensorJob, ...], dict[str, object]]:
    """The inputs, base, jobs and config.json changes of a recipe with ``modules``: each module
    planned as a recipe of its own over its own tensors."""
    assert config.modules is not None
    checkpoint = _opener()
    first = checkpoint(config.model_locations[0])
    layouts = _module_layouts(first, config.modules)
    inputs: list[Checkpoint] = []
    bases: list[Checkpoint] = []
    jobs: list[TensorJob] = []
    overrides: dict[str, object] = {}
    for name, module in config.modules.items():
        scope = _Scope(
            keep=lambda tensor, name=name: module_of(tensor, layouts) == name,  # type: ignore[misc]
            layout=layouts[name],
            parameters=(module.parameters,),
        )
        recipe = config.model_copy(update={"modules": None, "models": module.models, "slices": module.slices})
        try:
            if module.models is not None:
                own_inputs, base, own_jobs = _plan_models(method, recipe, realigned, scope, checkpoint)
                changes: dict[str, object] = {}
            else:
                planned = plan_slices(method, recipe, realigned, scope, checkpoint)
                own_inputs, base, own_jobs, changes = planned
        except ConfigError as error:
            raise ConfigError(f"modules.{name}: {error}") from None
        inputs += own_inputs
        bases += [base] if base is not None else []
        jobs += own_jobs
        overrides.update(changes)
    base = bases[0] if bases else None
    ordered = tuple(c for c in dict.fromkeys(inputs) if c is not base)
    return ordered, base, tuple(jobs), overrides


def _module_layouts(first: Checkpoint, modules: Mapping[str, ModuleEntry]) -> dict[str, ModuleLayout]:
    """The modules of ``first``'s architecture, checked against the ones a recipe names: each a
    module of it, and every module that holds tensors named (mergekit would leave it out)."""
    config = first.read_config()
    known = architecture_modules(config)
    if known is None:
        names = config.get("architectures")
        listed = [str(name) for name in names] if isinstance(names, list) else []
        what = f"a {', '.join(listed)}" if listed else "of no named architecture"
        raise ConfigError(
            f"modules: {first.label} is {what}; m3sb knows the modules of "
            f"{', '.join(ARCHITECTURE_MODULES)}; merge it with 'models' or 'slices'"
        )
    architecture, layouts = known
    for name in modules:
        if name not in layouts:
            similar = close_match(name, layouts)
            hint = f" (did you mean '{similar}'?)" if similar else ""
            raise ConfigError(
                f"modules.{name}: not a module of {architecture}; its modules are {', '.join(layouts)}{hint}"
            )
    stray = unclaimed(first.tensors, layouts)
    if stray:
        raise MergeError(
            f"tensor '{stray[0]}' of {first.label} belongs to none of {architecture}'s modules "
            f"({', '.join(layouts)})"
        )
    present = [name for name in layouts if any(module_of(t, layouts) == name for t in first.tensors)]
    for name in present:
        if name not in modules:
            raise ConfigError(
                f"modules: {architecture}'s module '{name}' is not in the recipe; mergekit would leave "
                "its tensors out of the output; give it its own models"
            )
    for name in modules:
        if name not in present:
            raise ConfigError(f"modules.{name}: {first.label} holds no tensor of this module")
    return layouts


def _check_destination(plan: MergePlan, destination: Path) -> None:
    """Refuse an output folder that is, or contains, one of the inputs (--force would delete it)."""
    inputs = [(checkpoint.label, file) for checkpoint in plan.sources for file in checkpoint.files]
    statistics = {source.checkpoint for job in plan.jobs for source in job.statistics if source is not None}
    inputs += [
        (f"statistics {checkpoint.label}", file) for checkpoint in statistics for file in checkpoint.files
    ]
    if plan.vocabulary is not None and plan.vocabulary.folder is not None:
        inputs.append(
            (f"tokenizer {plan.vocabulary.folder}", plan.vocabulary.folder / "tokenizer_config.json")
        )
    for label, file in inputs:
        resolved = file.resolve()
        if destination == resolved or destination in resolved.parents:
            raise ConfigError(f"{destination}: the output folder holds input {label}; choose another")


def _all_finite(tensor: torch.Tensor) -> bool:
    """Whether no element is NaN or infinite (a sum first: one cheap pass in the usual case)."""
    return bool(torch.isfinite(tensor.sum())) or bool(torch.isfinite(tensor).all())


def _refuse_non_finite(tensor: torch.Tensor, name: str, checkpoint: Checkpoint) -> None:
    """A one-line error naming the tensor and its checkpoint where an element is NaN or Inf."""
    if not _all_finite(tensor):
        raise MergeError(f"tensor '{name}' in {checkpoint.label} contains NaN or Inf")


def _load(checkpoint: Checkpoint, name: str, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Read one tensor, move it to the compute device and dtype, and refuse NaN or Inf."""
    tensor = checkpoint.load(name).to(device=device, dtype=dtype)
    _refuse_non_finite(tensor, name, checkpoint)
    return tensor


def _load_rows(
    checkpoint: Checkpoint,
    name: str,
    rows: slice | None,
    dtype: torch.dtype,
    device: torch.device,
    checked: bool = True,
) -> torch.Tensor:
    """Read one tensor, or rows of it, to the compute device and dtype (to a CUDA device
    through page-locked memory, ordered on the current stream); refuse NaN or Inf (unless not
    ``checked``: a pass before the merge, which reads and checks the same rows)."""
    if rows is None and checked:
        return _load(checkpoint, name, dtype, device)
    view = checkpoint.load(name) if rows is None else checkpoint.load_rows(name, rows.start, rows.stop)
    if device.type == "cuda":  # from page-locked memory, so the copy runs beside what the GPU does
        tensor = view.pin_memory().to(device=device, non_blocking=True).to(dtype)
    else:
        tensor = view.to(device=device, dtype=dtype)
    if checked:
        _refuse_non_finite(tensor, name, checkpoint)
    return tensor


def bytes_per_row(plan: MergePlan, job: TensorJob) -> int:
    """What merging one row of a tensor holds: its inputs and the base in the compute dtype,
    a temporary and the result; the result in the output dtype, waiting to be written while
    the next row merges; and the inputs' own bytes, mapped from their files as they are read.
    TIES holds one temporary more: the magnitudes it selects its threshold from."""
    inputs = [*job.sources, *([job.base] if job.base is not None else [])]
    temporaries = 3 if plan.method.row_blocks == "magnitude_threshold" else 2
    working = plan.compute_dtype.itemsize * (len(inputs) + temporaries)
    mapped = sum(source.checkpoint.tensors[source.name].dtype.itemsize for source in inputs)
    return max(1, math.prod(job.shape[1:])) * (working + job.out_dtype.itemsize + mapped)


def row_blocks(plan: MergePlan, job: TensorJob, memory: int | None) -> list[slice] | None:
    """The blocks of rows a tensor is merged in, so that its inputs, task vectors and result
    stay within ``memory`` bytes; None where it is merged whole (it fits, the method cannot
    be merged in blocks, or its rows are realigned to another vocabulary)."""
    kind = plan.method.row_blocks
    if kind == "magnitude_threshold" and plan.compute_dtype != torch.float32:
        kind = "never"  # the streaming selection reads float32 bit patterns
    if kind in ("magnitude_threshold", "random_mask") and job.base is None:
        kind = "never"  # the trimmed and dropped ones merge task vectors
    if memory is None or kind == "never" or not job.mergeable or job.vocabulary:
        return None
    if len(job.shape) < 1 or job.shape[0] < 2:
        return None
    row_bytes = bytes_per_row(plan, job)
    if row_bytes * job.shape[0] <= memory:
        return None
    # as many blocks as the budget needs, of equal rows (the last may be shorter): blocks of
    # few sizes leave fewer holes in the reused heap
    count = -(-job.shape[0] // max(1, memory // row_bytes))
    per_block = -(-job.shape[0] // count)
    return [slice(start, min(start + per_block, job.shape[0])) for start in range(0, job.shape[0], per_block)]


@dataclass
class LoadedRows:
    """A block's inputs as :func:`merge_tensor` reads them (unchecked): each source's rows in
    its input dtype and the base's in the compute dtype, with the task vectors the method
    receives (each source's rows less the base's) where they were formed. The merge takes
    them out, so that each is freed as soon as the merge is done with it."""

    rows: slice | None  # None: the whole tensor
    tensors: list[torch.Tensor]
    base: torch.Tensor | None
    task_vectors: list[torch.Tensor] | None = None


def block_arguments(
    plan: MergePlan, job: TensorJob, device: torch.device, blocks: Sequence[slice], memory: int | None = None
) -> dict[str, object]:
    """What the method needs of the whole tensor to merge it in ``blocks`` of rows: for TIES,
    each task vector's threshold at its density, found exactly over the blocks (in one pass
    that reads the base once per block where a sample of the first block read brackets the
    threshold, :class:`BracketedSelection`; else by one pass into a buffer of its magnitudes
    where that and a block's task vector fit in ``memory``, or by a streaming selection in
    two passes); for DARE, each model's random generator where its mask starts; for the
    barycenter, the inputs' Gram matrix (one pass)."""
    return _block_pass(plan, job, device, blocks, memory)[0]


def _block_pass(
    plan: MergePlan, job: TensorJob, device: torch.device, blocks: Sequence[slice], memory: int | None
) -> tuple[dict[str, object], LoadedRows | None]:
    """:func:`block_arguments`, and the first block's inputs where the pass that found them
    read that block last and holds it (TIES: the block then merges without being read again)."""
    kind = plan.method.row_blocks
    if kind == "gram":
        return {"gram": _blocked_gram(plan, job, device, blocks)}, None
    if kind == "random_mask":
        seed, densities = job.params["random_seed"], job.params["density"]
        assert isinstance(seed, int) and isinstance(densities, list)
        floats = [float(density) for density in densities]
        generators = mask_generators(tensor_seed(seed, job.name), floats, math.prod(job.shape))
        return {"generators": generators}, None
    if kind != "magnitude_threshold":
        return {}, None
    numel = math.prod(job.shape)
    keeps = _kept_counts(job)
    thresholds, first = _bracketed_thresholds(plan, job, device, blocks, keeps, memory)
    if any(threshold is None for threshold in thresholds):
        first = None  # not held through the passes that follow
    for index, keep in enumerate(keeps):
        if thresholds[index] is not None:
            continue
        assert keep is not None

        def task_vector_blocks(index: int = index) -> Iterator[torch.Tensor]:
            for rows in blocks:
                # unchecked: each block is read again, and checked, when it merges
                yield _method_inputs(plan, job, device, rows, [job.sources[index]], checked=False)[0]

        if memory is not None and _gathered_selection_bytes(plan, job, blocks) <= memory:
            thresholds[index] = gathered_kth_largest_magnitude(task_vector_blocks(), keep, numel)
        else:
            thresholds[index] = streaming_kth_largest_magnitude(task_vector_blocks, keep)
    return {"thresholds": thresholds}, first


def _bracketed_thresholds(
    plan: MergePlan,
    job: TensorJob,
    device: torch.device,
    blocks: Sequence[slice],
    keeps: Sequence[int | None],
    memory: int | None,
) -> tuple[list[float | None], LoadedRows | None]:
    """Each task vector's trimming magnitude (``keeps``: how many entries it keeps by rank,
    None for all), found in one pass over the blocks that reads the base once per block
    (:class:`BracketedSelection`, bracketed by a sample of the block read first); None for
    those whose bracket missed, or that it cannot find (not on the CPU), for another pass to
    find. The pass reads the blocks last to first and returns the first block's inputs, so
    that the merge, which starts there, need not read them again."""
    thresholds, selections = _threshold_selections(plan, job, keeps, memory)
    base = job.base
    if not selections or base is None or device.type != "cpu" or not _subtracts_base(plan, job):
        return thresholds, None
    first: LoadedRows | None = None
    # the counts run in NumPy, one thread each: the task vectors are counted side by side
    with ThreadPoolExecutor(max(1, min(len(selections), torch.get_num_threads()))) as counters:
        for rows in reversed(blocks):
            if all(selection.failed for selection in selections.values()):
                return thresholds, None
            # unchecked: each block is checked when it merges
            origin = _load_rows(base.checkpoint, base.name, rows, plan.compute_dtype, device, checked=False)
            held = rows == blocks[0]
            tensors, task_vectors, counting = [], [], []
            for index, source in enumerate(job.sources):
                selection = selections.get(index)
                if selection is None and not held:
                    continue
                dtype = _input_dtype(plan, job, source)
                tensor = _load_rows(source.checkpoint, source.name, rows, dtype, device, checked=False)
                if held:  # formed once, for the selection and for the merge
                    tensors.append(tensor)
                    task_vectors.append(task_vector(tensor, origin))
                    if selection is not None and not selection.failed:
                        counting.append(counters.submit(selection.add, task_vectors[-1]))
                elif selection is not None and not selection.failed:
                    counting.append(counters.submit(selection.add_task_vector, tensor, origin))
                del tensor
            for count in counting:
                count.result()  # the block's tensors are released only once they are counted
            if held:
                first = LoadedRows(rows, tensors, origin, task_vectors)
            del origin, tensors, task_vectors, counting
    for index, selection in selections.items():
        thresholds[index] = selection.result()
    return thresholds, first


def merged_in_one_pass(
    plan: MergePlan, job: TensorJob, device: torch.device, memory: int | None
) -> list[torch.Tensor] | None:
    """TIES's blocks of a tensor too large to merge whole, merged in one pass over its rows,
    or None where that does not apply (then the thresholds come from a pass of their own).

    A sample of the first block brackets each task vector's trimming magnitude; where each
    bracket is a single value (as with bfloat16 fine-tunes, whose task vectors hold few
    distinct values), the blocks merge with those values while every block is counted
    against them, and are held (in the output dtype) until the counts prove each value is
    the k-th largest magnitude of its whole task vector. So each input is read once, and the
    blocks are those of the two-pass merge bit for bit; where a count disproves a value,
    the held blocks are dropped."""
    kind = plan.method.row_blocks
    if kind != "magnitude_threshold" or device.type != "cpu" or memory is None or job.vocabulary:
        return None
    if plan.compute_dtype != torch.float32 or not _subtracts_base(plan, job) or not job.mergeable:
        return None
    base = job.base
    assert base is not None  # it subtracts the base
    numel = math.prod(job.shape)
    held_bytes = numel * job.out_dtype.itemsize
    if held_bytes > memory // 2:
        return None
    blocks = row_blocks(plan, job, memory - held_bytes)
    thresholds, selections = _threshold_selections(plan, job, _kept_counts(job), memory)
    if blocks is None or len(blocks) < 2 or not selections:
        return None
    if not BracketedSelection.can_bracket((blocks[0].stop - blocks[0].start) * (numel // job.shape[0])):
        return None
    merged: list[torch.Tensor] = []
    with ThreadPoolExecutor(max(1, min(len(selections), torch.get_num_threads()))) as counters:
        for rows in blocks:
            held = read_block(plan, job, device, rows)  # unchecked: merge_tensor checks it
            assert held.base is not None
            held.task_vectors = [task_vector(tensor, held.base) for tensor in held.tensors]
            counting = [counters.submit(s.add, held.task_vectors[i]) for i, s in selections.items()]
            for count in counting:
                count.result()
            if rows == blocks[0]:
                if any(s.failed or s.upper != s.lower for s in selections.values()):
                    return None  # a bracket of several values: known only once every block is read
                for index, selection in selections.items():
                    thresholds[index] = selection.upper
            del counting
            merged.append(merge_tensor(plan, job, device, rows, {"thresholds": thresholds}, held))
    if any(selection.result() != thresholds[index] for index, selection in selections.items()):
        return None
    return merged


def _kept_counts(job: TensorJob) -> list[int | None]:
    """How many entries each task vector keeps by rank at its density (None: all)."""
    densities = job.params["density"]
    assert isinstance(densities, list)
    numel = math.prod(job.shape)
    return [kept_count(float(density), numel) for density in densities]


def _threshold_selections(
    plan: MergePlan, job: TensorJob, keeps: Sequence[int | None], memory: int | None
) -> tuple[list[float | None], dict[int, BracketedSelection]]:
    """Each task vector's trimming magnitude where its ``keeps`` settles it (all kept: 0,
    none: infinity), None elsewhere; and a selection for each of those, whose magnitudes
    gathered inside its bracket may hold an eighth of ``memory`` between them."""
    thresholds: list[float | None] = [
        0.0 if keep is None else math.inf if keep == 0 else None for keep in keeps
    ]
    wanted = {index: keep for index, keep in enumerate(keeps) if keep is not None and keep > 0}
    share = 8 * plan.compute_dtype.itemsize * max(1, len(wanted))
    limit = None if memory is None else max(1 << 16, memory // share)
    numel = math.prod(job.shape)
    return thresholds, {index: BracketedSelection(keep, numel, limit) for index, keep in wanted.items()}


def _gathered_selection_bytes(plan: MergePlan, job: TensorJob, blocks: Sequence[slice]) -> int:
    """What finding a task vector's threshold in one gathered pass holds at most: the buffer
    of all its magnitudes, and one block's task vector and base in the compute dtype with
    the input's and the base's rows mapped."""
    assert job.base is not None
    row = max(1, math.prod(job.shape[1:]))
    stored = max(s.checkpoint.tensors[s.name].dtype.itemsize for s in job.sources)
    mapped = stored + job.base.checkpoint.tensors[job.base.name].dtype.itemsize
    rows = max(block.stop - block.start for block in blocks)
    compute = plan.compute_dtype.itemsize
    return int(row * (job.shape[0] * compute + rows * (2 * compute + mapped)))


def _subtracts_base(plan: MergePlan, job: TensorJob) -> bool:
    """Whether the method receives task vectors: each input less the base."""
    return job.base is not None and plan.method.merges_task_vectors(job.params.get("space"), True)


def _input_dtype(plan: MergePlan, job: TensorJob, source: TensorSource) -> torch.dtype:
    """The dtype an input is read in: as stored where the method's first step subtracts the
    base (in the compute dtype) and that subtraction promotes it exactly (bfloat16 or float16
    to float32: no float32 copy of the input is ever made), else the compute dtype."""
    stored = source.checkpoint.tensors[source.name].dtype
    exact = stored.is_floating_point and torch.promote_types(stored, plan.compute_dtype) == plan.compute_dtype
    return stored if exact and _subtracts_base(plan, job) and not job.vocabulary else plan.compute_dtype


def _method_inputs(
    plan: MergePlan,
    job: TensorJob,
    device: torch.device,
    rows: slice,
    sources: Sequence[TensorSource],
    checked: bool = True,
) -> list[torch.Tensor]:
    """Rows of what the method receives from ``sources``: their task vectors where it merges
    them (as ``apply_method`` forms them), else the tensors themselves (NaN and Inf refused
    where ``checked``)."""
    tensors = [
        _load_rows(s.checkpoint, s.name, rows, _input_dtype(plan, job, s), device, checked) for s in sources
    ]
    base = job.base
    if not _subtracts_base(plan, job):
        return tensors
    assert base is not None
    origin = _load_rows(base.checkpoint, base.name, rows, plan.compute_dtype, device, checked)
    return [task_vector(tensor, origin) for tensor in tensors]


def _blocked_gram(
    plan: MergePlan, job: TensorJob, device: torch.device, blocks: Sequence[slice]
) -> torch.Tensor:
    """The Gram matrix of the inputs the method receives (task vectors where it merges them),
    summed over ``blocks`` of rows exactly as over the whole tensors."""
    accumulator = GramAccumulator(len(job.sources), math.prod(job.shape), device)
    for rows in blocks:
        accumulator.add(_method_inputs(plan, job, device, rows, job.sources))
    return accumulator.result()


def merge_tensor(
    plan: MergePlan,
    job: TensorJob,
    device: torch.device,
    rows: slice | None = None,
    arguments: Mapping[str, object] | None = None,
    held: LoadedRows | None = None,
) -> torch.Tensor:
    """Compute one merged tensor, or the block ``rows`` of it (on the CPU, in its output dtype;
    ``arguments``: what :func:`block_arguments` found of the whole tensor; ``held``: the
    block's inputs, already read, checked here as they would be when read)."""
    if not job.mergeable:
        source = job.copied_from
        return source.checkpoint.load(source.name).clone()
    if held is not None:
        if held.rows != rows or len(held.tensors) != len(job.sources):
            raise ValueError(f"tensor '{job.name}': the inputs held are not those of rows {rows}")
        every = [*job.sources, *([job.base] if job.base else [])]
        for source, tensor in zip(every, [*held.tensors, *([held.base] if job.base else [])], strict=True):
            assert tensor is not None  # the base is held where the job has one
            _refuse_non_finite(tensor, source.name, source.checkpoint)
        tensors = held.task_vectors if held.task_vectors is not None else held.tensors
        base = held.base
        formed = held.task_vectors is not None
        held.tensors, held.base, held.task_vectors = [], None, None
    else:
        formed = False
        tensors = [
            _load_rows(s.checkpoint, s.name, rows, _input_dtype(plan, job, s), device) for s in job.sources
        ]
        base = (
            _load_rows(job.base.checkpoint, job.base.name, rows, plan.compute_dtype, device)
            if job.base
            else None
        )
    del held
    if job.vocabulary and plan.vocabulary is not None:
        every = [*job.sources, *([job.base] if job.base else [])]
        loaded = [*tensors, *([base] if base is not None else [])]
        aligned = plan.vocabulary.align([(s.checkpoint, t) for s, t in zip(every, loaded, strict=True)])
        tensors, base = aligned[: len(tensors)], (aligned[-1] if base is not None else None)
        del loaded, aligned
    if not tensors:  # no task vector to add: the base
        assert base is not None
        return base.to("cpu", job.out_dtype)
    statistics_dtype = torch.float64 if plan.method.statistics in GRAM_KINDS else plan.compute_dtype
    statistics = [
        None if source is None else _load(source.checkpoint, source.name, statistics_dtype, device)
        for source in job.statistics
    ]
    try:
        merged = apply_method(
            plan.method,
            tensors,
            job.weights,
            base,
            job.params,
            job.name,
            consume_inputs=True,
            statistics=statistics,
            statistic_norms=plan.statistic_norms,
            block_arguments=arguments,
            formed=formed,
        )
    except MergeError as error:
        raise MergeError(f"tensor '{job.name}': {error}") from None
    if not _all_finite(merged):
        raise MergeError(f"tensor '{job.name}': the merge produced NaN or Inf")
    narrowed = merged.dtype != job.out_dtype
    merged = merged.to(device="cpu", dtype=job.out_dtype)
    if narrowed and not _all_finite(merged):
        raise MergeError(
            f"tensor '{job.name}': merged values overflow {_dtype_name(job.out_dtype)}; "
            "choose a wider out_dtype"
        )
    return merged


def read_block(
    plan: MergePlan,
    job: TensorJob,
    device: torch.device,
    rows: slice | None,
    stream: torch.cuda.Stream | None = None,
) -> LoadedRows:
    """A block's inputs as :func:`merge_tensor` reads them, unchecked (it checks them): each
    source's rows in its input dtype and the base's in the compute dtype, on ``device``
    (with a CUDA ``stream``: copied on it, and complete on return)."""
    with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
        tensors = [
            _load_rows(s.checkpoint, s.name, rows, _input_dtype(plan, job, s), device, checked=False)
            for s in job.sources
        ]
        base = job.base
        origin = (
            None
            if base is None
            else _load_rows(base.checkpoint, base.name, rows, plan.compute_dtype, device, checked=False)
        )
    if stream is not None:
        stream.synchronize()
    return LoadedRows(rows, tensors, origin)


def _readable_ahead(job: TensorJob) -> bool:
    """Whether a tensor's inputs can be read before its turn: it is merged (not copied), and
    not realigned to another vocabulary or merged with statistics (read as it merges)."""
    return job.mergeable and not job.vocabulary and not any(job.statistics)


class ReadAhead:
    """Reads the next block's inputs on a thread of its own while the current block merges
    (the GPU pipeline: page-locked copies to the device overlap the arithmetic and the
    writing). At most one block is read ahead."""

    def __init__(self, plan: MergePlan, device: torch.device) -> None:
        self.plan, self.device = plan, device
        self._reader = ThreadPoolExecutor(1, thread_name_prefix="m3sb-reader")
        self._stream = torch.cuda.Stream(device) if device.type == "cuda" else None  # type: ignore[no-untyped-call]
        self._pending: tuple[TensorJob, slice | None, Future[LoadedRows]] | None = None

    def start(self, job: TensorJob, rows: slice | None) -> None:
        """Begin reading ``rows`` of ``job`` (None: the whole tensor), where it can be read ahead."""
        self.discard()
        if _readable_ahead(job):
            future = self._reader.submit(read_block, self.plan, job, self.device, rows, self._stream)
            self._pending = (job, rows, future)

    def take(self, job: TensorJob, rows: slice | None) -> LoadedRows | None:
        """The inputs read ahead for ``rows`` of ``job``, or None where another block was read
        (that one is dropped); a read's error is raised here, as where it would have been read."""
        pending, self._pending = self._pending, None
        if pending is None:
            return None
        pending_job, pending_rows, future = pending
        held = future.result()
        if pending_job is not job or pending_rows != rows:
            return None
        if self.device.type == "cuda":  # read on the reader's stream, used on this one
            current = torch.cuda.current_stream(self.device)
            for tensor in [*held.tensors, *([held.base] if held.base is not None else [])]:
                tensor.record_stream(current)
        return held

    def discard(self) -> None:
        """Drop what was read ahead and not taken (waiting for its read to end)."""
        pending, self._pending = self._pending, None
        if pending is not None:
            with contextlib.suppress(Exception):
                pending[2].result()

    def close(self) -> None:
        """Stop the reader thread."""
        self._pending = None
        self._reader.shutdown(wait=True, cancel_futures=True)


def _prefetch(job: TensorJob) -> None:
    """Start reading a tensor's inputs into the page cache (the OS reads on while we merge)."""
    for source in (*job.sources, *([job.base] if job.base is not None else [])):
        source.checkpoint.prefetch(source.name)


DEFAULT_MEMORY = 1 << 30  # bytes a tensor's merge may hold before it is merged in blocks of rows


def merge_tensors(
    plan: MergePlan,
    device: torch.device,
    progress: Progress | None = None,
    memory: int | None = DEFAULT_MEMORY,
    read_ahead: bool | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, merged tensor)`` in the plan's order; a tensor whose merge would hold more
    than ``memory`` bytes comes as consecutive blocks of its rows, where the method allows it
    (elementwise methods: the blocks are exactly the rows of the whole merge; TIES's may come
    from :func:`merged_in_one_pass`). With ``read_ahead`` (by default on a CUDA device) the
    next block's inputs are read while one merges (:class:`ReadAhead`)."""
    blocks_of = [row_blocks(plan, job, memory) for job in plan.jobs]
    units = [(index, rows) for index, blocks in enumerate(blocks_of) for rows in (blocks or (None,))]
    ahead = device.type == "cuda" if read_ahead is None else read_ahead
    reader = ReadAhead(plan, device) if ahead else None
    merged_whole = -1  # the job whose blocks were merged in one pass
    try:
        for unit, (index, rows) in enumerate(units):
            job, blocks = plan.jobs[index], blocks_of[index]
            if index == merged_whole:
                continue  # its blocks came from one pass
            if blocks is None or rows == blocks[0]:  # the tensor's first block, or the whole of it
                if index + 1 < len(plan.jobs):
                    _prefetch(plan.jobs[index + 1])  # read from disk while this one merges
                one_pass = merged_in_one_pass(plan, job, device, memory) if blocks and not reader else None
                if one_pass is not None:
                    merged_whole = index
                    one_pass.reverse()
                    while one_pass:  # each block let go of once written
                        block = one_pass.pop()
                        if progress is not None:
                            progress(job.name, block.numel() * block.element_size())
                        yield job.name, block
                        del block
                    continue
                arguments, first = (
                    _block_pass(plan, job, device, blocks, memory) if blocks is not None else (None, None)
                )
            held = reader.take(job, rows) if reader is not None else None
            if reader is not None and unit + 1 < len(units):
                following, following_rows = units[unit + 1]
                reader.start(plan.jobs[following], following_rows)
            merged = merge_tensor(plan, job, device, rows, arguments, first or held)
            first = held = None
            if progress is not None:
                progress(job.name, merged.numel() * merged.element_size())
            yield job.name, merged
            del merged  # free it before the next tensor is merged
    finally:
        if reader is not None:
            reader.close()


def _dtype_overrides(plan: MergePlan) -> dict[str, object]:
    """config.json keys that must follow the merged weights' dtype."""
    float_dtypes = {job.out_dtype for job in plan.jobs if job.mergeable}
    if len(float_dtypes) != 1:
        return {}
    name = _dtype_name(next(iter(float_dtypes)))
    existing = plan.config_source.read_config()
    keys = [key for key in ("torch_dtype", "dtype") if key in existing] or ["dtype"]
    return {key: name for key in keys}


def model_card(plan: MergePlan) -> str:
    """A short README naming the method, the inputs and the parameters."""
    config = plan.config
    sources = config.model_locations
    front = yaml.safe_dump({"library_name": "transformers", "tags": ["merge", "m3sb"], "base_model": sources})
    inputs = "\n".join(f"- `{source}`" for source in sources)
    recipe = yaml.safe_dump(config.model_dump(exclude_none=True), sort_keys=False)
    return (
        f"---\n{front}---\n\n# {config.name or 'Merged model'}\n\n"
        f"Merged with m3sb using **{plan.method.name}**: {plan.method.summary}"
        f"{f' ({plan.method.reference})' if plan.method.reference else ''}."
        f"\n\n## Inputs\n\n{inputs}\n\n## Configuration\n\n```yaml\n{recipe}```\n"
    )


def merge_to_folder(
    config: MergeConfig,
    out_dir: str | Path,
    device: str = "cpu",
    out_shard_size: int = 5 * 10**9,
    force: bool = False,
    progress: Progress | None = None,
    on_plan: Callable[[MergePlan], None] | None = None,
    extra_files: Mapping[str, str] | None = None,
    strict: bool = False,
    memory: int | None = DEFAULT_MEMORY,
) -> MergeResult:
    """Merge as ``config`` says and write a Hugging Face model folder at ``out_dir``, atomically
    (with ``extra_files``, name to text, written into it before it appears). ``memory`` bounds
    what one tensor's merge holds, where the method can merge blocks of rows."""
    started = time.perf_counter()
    torch_device = resolve_device(device)
    plan = build_plan(config, strict)
    destination = Path(out_dir).expanduser().resolve()
    _check_destination(plan, destination)
    if on_plan is not None:
        on_plan(plan)
    written = 0
    with atomic_output_folder(destination, force=force) as staging, reused_heap():
        writer = SafetensorsWriter(staging, plan.layout, out_shard_size)
        try:
            for name, tensor in merge_tensors(plan, torch_device, progress, memory):
                writer.write(name, tensor)
                written += tensor.numel() * tensor.element_size()
                del tensor
            writer.close()
            overrides = _dtype_overrides(plan) | plan.config_overrides
            retokenized = plan.vocabulary is not None or plan.chat_template is not None
            names = [name for name in SUPPORT_FILES if not (retokenized and name in TOKENIZER_FILES)]
            copy_support_files(plan.config_source.folder, staging, overrides, names)
            if retokenized:
                save_tokenizer(plan.vocabulary, plan.config_source, plan.chat_template, staging)
            (staging / "README.md").write_text(model_card(plan), encoding="utf-8")
            for name, text in (extra_files or {}).items():
                (staging / name).write_text(text, encoding="utf-8")
        except OSError as error:  # a full disk, a file-size limit, a vanished folder
            writer.abort()
            reason = error.strerror or str(error)
            raise CheckpointError(
                f"{destination}: cannot write the merged model ({reason}); nothing was left there"
            ) from None
        except BaseException:
            writer.abort()
            raise
    return MergeResult(destination, len(plan.jobs), written, time.perf_counter() - started)
