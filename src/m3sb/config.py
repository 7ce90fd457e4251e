"""Schemas of the YAML files users write, validated with pydantic.

The merge config follows mergekit's schema for the methods both tools share, so an
existing mergekit YAML works unchanged::

    models:
      - model: org/finetune-a
        parameters: {weight: 0.6, density: 0.5}
      - model: ./finetune-b
        parameters: {weight: 0.4, density: 0.5}
    merge_method: ties
    base_model: org/base
    parameters: {normalize: true, lambda: 1.0}
    dtype: float32

A parameter value is a number (or boolean or string), a *gradient* (a list of numbers
interpolated over the layers), or a list of ``{filter: SUBSTRING, value: V}`` entries
where the first entry whose filter occurs in the tensor's name applies (an entry
without ``filter``, or with ``filter: "*"``, matches every tensor). A model's own value
that matches no filter falls back to the top-level one, then to the method's default.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from m3sb.errors import ConfigError

Scalar = float | int | bool | str


class FilteredValue(BaseModel):
    """A parameter value that applies to tensors whose name contains ``filter``."""

    model_config = ConfigDict(extra="forbid")
    filter: str | None = None
    value: Scalar | list[float]


ParamSpec = Scalar | list[float] | list[FilteredValue]

DTYPE_ALIASES = {
    "float32": "float32",
    "fp32": "float32",
    "float": "float32",
    "float16": "float16",
    "fp16": "float16",
    "half": "float16",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float64": "float64",
    "fp64": "float64",
}


def _dtype_name(value: str | None) -> str | None:
    if value is None:
        return None
    if value not in DTYPE_ALIASES:
        raise ValueError(f"unknown dtype '{value}'; choose one of: {', '.join(DTYPE_ALIASES)}")
    return DTYPE_ALIASES[value]


class ModelEntry(BaseModel):
    """One input model, its per-model parameters and, for the data-dependent methods (regmean,
    fisher), the file of its statistics that ``m3sb statistics`` wrote."""

    model_config = ConfigDict(extra="forbid")
    model: str = Field(min_length=1)
    parameters: dict[str, ParamSpec] = Field(default_factory=dict)
    statistics: str | None = Field(default=None, min_length=1)


class ZeroToken(BaseModel):
    """A token's embedding rows set to zero (``{kind: zero}``)."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["zero"]


class ModelToken(BaseModel):
    """A token's embedding rows taken from another token of one model (``{kind: model_token, ...}``)."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["model_token"]
    model: str = Field(min_length=1)
    token_id: int | None = Field(default=None, ge=0)
    token: str | None = None

    @model_validator(mode="after")
    def _one_token(self) -> ModelToken:
        if (self.token_id is None) == (self.token is None):
            raise ValueError("give exactly one of token_id and token")
        return self


class TokenSetting(BaseModel):
    """Where one output token's embedding rows come from, and whether that overrides the models' own."""

    model_config = ConfigDict(extra="forbid")
    source: str | ZeroToken | ModelToken | None = None
    force: bool = False


class TokenizerSpec(BaseModel):
    """mergekit's ``tokenizer:`` section: the output vocabulary and how new tokens are filled."""

    model_config = ConfigDict(extra="forbid")
    source: str = Field(default="union", min_length=1)  # union, base or a model
    tokens: dict[str, TokenSetting] = Field(default_factory=dict)
    pad_to_multiple_of: int | None = Field(default=None, gt=0)


class SliceSource(BaseModel):
    """One model's layers ``[start, end)`` feeding an output slice, with its own parameters."""

    model_config = ConfigDict(extra="forbid")
    model: str = Field(min_length=1)
    layer_range: tuple[int, int]
    parameters: dict[str, ParamSpec] = Field(default_factory=dict)

    @field_validator("layer_range")
    @classmethod
    def _ordered(cls, layer_range: tuple[int, int]) -> tuple[int, int]:
        start, end = layer_range
        if not 0 <= start < end:
            raise ValueError(f"expected [start, end) with 0 <= start < end, got {list(layer_range)}")
        return layer_range


class SliceEntry(BaseModel):
    """An output slice (mergekit's ``slices``): the same number of layers from each source,
    merged layer by layer; slices are stacked in order to make the output's layers."""

    model_config = ConfigDict(extra="forbid")
    sources: list[SliceSource] = Field(min_length=1)
    base_model: str | None = None
    parameters: dict[str, ParamSpec] = Field(default_factory=dict)
    residual_weight: float | None = None  # in mergekit's schema, unused there too (noted when given)


class ModuleEntry(BaseModel):
    """One tower of a multi-tower model (mergekit's ``modules``): its own models or slices and
    its own parameters, which come after its slices' and models' and before the top level's."""

    model_config = ConfigDict(extra="forbid")
    models: list[ModelEntry] | None = Field(default=None, min_length=1)
    slices: list[SliceEntry] | None = Field(default=None, min_length=1)
    parameters: dict[str, ParamSpec] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _models_or_slices(self) -> ModuleEntry:
        if (self.models is None) == (self.slices is None):
            raise ValueError("give exactly one of 'models' and 'slices'")
        return self


class MergeConfig(BaseModel):
    """A merge: which models (or layer slices of them), which method, which parameters, which dtypes."""

    model_config = ConfigDict(extra="forbid")
    models: list[ModelEntry] | None = Field(default=None, min_length=1)
    slices: list[SliceEntry] | None = Field(default=None, min_length=1)
    modules: dict[str, ModuleEntry] | None = Field(default=None, min_length=1)
    merge_method: str
    base_model: str | None = None
    parameters: dict[str, ParamSpec] = Field(default_factory=dict)
    dtype: str | None = None
    out_dtype: str | None = None
    tokenizer_source: str | None = None
    tokenizer: TokenizerSpec | None = None
    chat_template: str | None = Field(default=None, min_length=1)
    name: str | None = None

    _dtypes = field_validator("dtype", "out_dtype")(_dtype_name)

    _notes: list[str] = PrivateAttr(default_factory=list)

    @property
    def notes(self) -> list[str]:
        """What reading the recipe ignored (keys mergekit ignores too), for the user to see."""
        return self._notes

    @model_validator(mode="after")
    def _models_or_slices(self) -> MergeConfig:
        if [self.models, self.slices, self.modules].count(None) != 2:
            raise ValueError("give exactly one of 'models', 'slices' and 'modules'")
        if self.tokenizer is not None and self.tokenizer_source is not None:
            raise ValueError("give tokenizer_source or a tokenizer section, not both")
        return self

    @property
    def tokenizer_spec(self) -> TokenizerSpec | None:
        """The output vocabulary asked for: the ``tokenizer`` section, or ``tokenizer_source``."""
        if self.tokenizer is not None:
            return self.tokenizer
        return None if self.tokenizer_source is None else TokenizerSpec(source=self.tokenizer_source)

    @property
    def model_locations(self) -> list[str]:
        """Every model the recipe names, in order of first mention (base model last)."""
        bodies: list[MergeConfig | ModuleEntry] = [self, *(self.modules or {}).values()]
        named = [entry.model for body in bodies for entry in body.models or []]
        pieces = [piece for body in bodies for piece in body.slices or []]
        named += [source.model for piece in pieces for source in piece.sources]
        named += [piece.base_model for piece in pieces if piece.base_model]
        named += [self.base_model] if self.base_model else []
        return list(dict.fromkeys(named))


_NESTED_SCHEMAS: dict[tuple[str, str], type[BaseModel]] = {
    ("MergeConfig", "models"): ModelEntry,
    ("MergeConfig", "slices"): SliceEntry,
    ("SliceEntry", "sources"): SliceSource,
    ("MergeConfig", "tokenizer"): TokenizerSpec,
    ("MergeConfig", "modules"): ModuleEntry,  # a mapping of them, by module name
    ("ModuleEntry", "models"): ModelEntry,
    ("ModuleEntry", "slices"): SliceEntry,
}


def _format_validation_error(error: ValidationError, source: str) -> str:
    """The first pydantic complaint as one line: where it is and what is allowed (an unknown
    key first: a misspelt key also makes the key it meant missing)."""
    problems = error.errors()
    wrong_kind = {  # union members whose ``kind`` is not the one written: their complaints do not apply
        part
        for e in problems
        if e["type"] == "literal_error"
        for part in e["loc"]
        if part in ("ZeroToken", "ModelToken")
    }
    problems = [e for e in problems if not wrong_kind & set(map(str, e["loc"]))] or problems
    problems = [e for e in problems if "str" not in map(str, e["loc"][1:])] or problems  # a mapping was given
    first = next((e for e in problems if e["type"] == "extra_forbidden"), problems[0])
    members = ("ZeroToken", "ModelToken", "str")  # names of union members in pydantic's locations
    shown = [str(part) for part in first["loc"] if str(part) not in members and "[" not in str(part)]
    location = ".".join(shown) or "(top level)"
    if first["type"] == "extra_forbidden":
        key = str(first["loc"][-1])
        allowed = _allowed_keys(first["loc"][:-1])
        hint = f"; {UNSUPPORTED[key]}" if key in UNSUPPORTED else ""
        similar = close_match(key, allowed.split(", "))
        if similar:
            hint = f" (did you mean '{similar}'?)"
        return f"{source}: unknown key '{key}' at {location}; allowed: {allowed}{hint}"
    if first["type"] == "missing":
        return f"{source}: missing required key '{location}'"
    message = str(first["msg"]).removeprefix("Value error, ")
    return f"{source}: {location}: {message}"


UNSUPPORTED: dict[str, str] = {}  # keys of mergekit's schema that m3sb does not read yet, and why


def _allowed_keys(location: tuple[int | str, ...]) -> str:
    """The keys allowed at a location of the merge config."""
    fields: dict[str, Any]
    if location[:2] == ("tokenizer", "tokens"):
        kinds: dict[str, type[BaseModel]] = {"ZeroToken": ZeroToken, "ModelToken": ModelToken}
        member = next((kinds[str(part)] for part in location if str(part) in kinds), TokenSetting)
        fields = dict(member.model_fields)
    elif location[:1] == ("tokenizer",):
        fields = dict(TokenizerSpec.model_fields)
    elif not location:
        fields = dict(MergeConfig.model_fields)
    elif location[0] == "modules":
        return _allowed_keys(location[2:]) if len(location) > 2 else ", ".join(ModuleEntry.model_fields)
    elif location[0] == "models" and len(location) == 2:
        fields = dict(ModelEntry.model_fields)
    elif location[0] == "slices" and len(location) == 2:
        fields = dict(SliceEntry.model_fields)
    elif location[0] == "slices" and len(location) == 4 and location[2] == "sources":
        fields = dict(SliceSource.model_fields)
    else:
        fields = dict(FilteredValue.model_fields)
    return ", ".join(fields)


def parse_merge_config(data: Any, source: str = "config", strict: bool = False) -> MergeConfig:
    """Validate a loaded YAML document as a merge config, or raise a one-line ConfigError.

    Keys that mergekit's schema does not know are ignored with a note (``config.notes``, with
    the known key a misspelt one looks like), as mergekit ignores them, so that a published
    recipe makes the model it made there; with ``strict`` they are errors.
    """
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level, got {type(data).__name__}")
    notes: list[str] = []
    cleaned = _without_unknown_keys(data, MergeConfig, "", notes, strict)
    try:
        config = MergeConfig.model_validate(cleaned)
    except ValidationError as error:
        raise ConfigError(_format_validation_error(error, source)) from None
    config.notes.extend(notes)
    return config


TYPO_SIMILARITY = 0.8  # an unknown key this close to a known one is taken for a misspelling


def close_match(key: str, known: Iterable[str]) -> str | None:
    """The known name that ``key`` looks like a misspelling of, if any."""
    import difflib

    matches = difflib.get_close_matches(key, list(known), n=1, cutoff=TYPO_SIMILARITY)
    return matches[0] if matches else None


def _without_unknown_keys(
    data: Any, schema: type[BaseModel], where: str, notes: list[str], strict: bool
) -> Any:
    """``data`` without the keys ``schema`` does not know (noted), recursing into known parts."""
    if not isinstance(data, dict):
        return data
    fields = schema.model_fields
    result = {}
    for key, value in data.items():
        if key not in fields:
            if strict or str(key) in UNSUPPORTED:
                result[key] = value  # pydantic names it, with a suggestion
            else:
                similar = close_match(str(key), fields)
                hint = f" (did you mean '{similar}'?)" if similar else ""
                notes.append(
                    f"{where}{key}: not a key of mergekit's schema here; ignored, as mergekit does{hint}"
                )
            continue
        nested = _NESTED_SCHEMAS.get((schema.__name__, str(key)))
        if schema is TokenizerSpec and key == "tokens" and isinstance(value, dict):
            value = {
                token: _without_unknown_keys(
                    setting, TokenSetting, f"{where}tokens[{token!r}].", notes, strict
                )
                for token, setting in value.items()
            }
        elif schema is TokenSetting and key == "source" and isinstance(value, dict):
            kind = ModelToken if value.get("kind") == "model_token" else ZeroToken
            value = _without_unknown_keys(value, kind, f"{where}source.", notes, strict)
        elif schema is MergeConfig and key == "modules" and isinstance(value, dict):
            value = {
                module: _without_unknown_keys(body, ModuleEntry, f"{where}modules.{module}.", notes, strict)
                for module, body in value.items()
            }
        elif nested is not None and isinstance(value, list):
            value = [
                _without_unknown_keys(item, nested, f"{where}{key}[{i}].", notes, strict)
                for i, item in enumerate(value)
            ]
        elif nested is not None:
            value = _without_unknown_keys(value, nested, f"{where}{key}.", notes, strict)
        result[key] = value
    return result


def load_yaml(path: str | Path) -> Any:
    """Load a YAML file safely (no Python objects), naming the file on any error."""
    documents = load_yaml_documents(path)
    if len(documents) > 1:
        raise ConfigError(f"{path}: holds {len(documents)} YAML documents; expected one")
    return documents[0] if documents else None


def load_yaml_documents(path: str | Path) -> list[Any]:
    """Every document of a YAML file (several are separated by ``---``), loaded safely."""
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{file}: no such file") from None
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"{file}: cannot read: {error}") from None
    try:
        return [document for document in yaml.safe_load_all(text) if document is not None] or [None]
    except RecursionError:
        raise ConfigError(f"{file}: nested too deeply to read") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ConfigError(f"{file}: malformed YAML{where}: {problem}") from None


def load_merge_config(path: str | Path, strict: bool = False) -> MergeConfig:
    """Read and validate a merge config YAML file."""
    return parse_merge_config(load_yaml(path), source=str(path), strict=strict)


LAYER_INDEX = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)\.")


def count_layers(tensor_names: Iterable[str]) -> int:
    """The number of numbered layers (``...layers.N...``) among tensor names; at least 1."""
    indices = [int(match.group(1)) for name in tensor_names if (match := LAYER_INDEX.search(name))]
    return max(indices, default=0) + 1


def layer_fraction(tensor_name: str, num_layers: int) -> float:
    """Where a gradient is read for a tensor, as mergekit reads it: layer i of N at i / (N - 1)
    (1 for a one-layer model), and every tensor outside the numbered layers (embeddings,
    the final norm, ``lm_head``) at 0, the gradient's first value."""
    match = LAYER_INDEX.search(tensor_name)
    if not match:
        return 0.0
    if num_layers <= 1:
        return 1.0
    return min(1.0, int(match.group(1)) / (num_layers - 1))


def _interpolate(gradient: list[float], fraction: float) -> float:
    """Piecewise-linear interpolation of evenly spaced values at ``fraction`` in [0, 1]."""
    if len(gradient) == 1:
        return float(gradient[0])
    position = fraction * (len(gradient) - 1)
    low = min(int(position), len(gradient) - 2)
    share = position - low
    return float(gradient[low]) * (1.0 - share) + float(gradient[low + 1]) * share


def resolve_value(spec: ParamSpec, tensor_name: str, num_layers: int) -> Scalar | None:
    """The value a parameter takes for one tensor of a model with ``num_layers`` layers;
    None when no filter entry matches it."""
    return resolve_at(spec, tensor_name, layer_fraction(tensor_name, num_layers))


def resolve_at(spec: ParamSpec, tensor_name: str, position: float) -> Scalar | None:
    """The value a parameter takes for one tensor whose gradients are read at ``position``
    (0 to 1); None when no filter entry matches it."""
    if not isinstance(spec, list):
        return spec
    if not spec or not isinstance(spec[0], FilteredValue):
        return _interpolate([float(v) for v in spec if not isinstance(v, FilteredValue)], position)
    for entry in spec:
        assert isinstance(entry, FilteredValue)
        if entry.filter in (None, "*") or entry.filter in tensor_name:
            value = entry.value
            if isinstance(value, list):
                return _interpolate(value, position)
            return value
    return None


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)?\s*$", re.IGNORECASE)


def parse_size(text: str | int) -> int:
    """Bytes in a size such as ``5GB``, ``500MB``, ``2GiB`` or a plain integer."""
    if isinstance(text, int):
        return text
    match = _SIZE.match(text)
    if not match:
        raise ConfigError(f"size '{text}': expected a number with an optional unit (KB, MB, GB, GiB, ...)")
    number, unit = float(match.group(1)), (match.group(2) or "").upper()
    base = 1024 if "I" in unit else 1000
    power = {"": 0, "B": 0, "K": 1, "M": 2, "G": 3, "T": 4}[unit[:1] if unit[:1] in "KMGT" else ""]
    size = int(number * base**power)
    if size <= 0:
        raise ConfigError(f"size '{text}' must be positive")
    return size


class StatisticsSettings(BaseModel):
    """Where the data-dependent merges (regmean, regmean_plusplus, fisher) of an experiment or
    a search take each model's statistics from: its task's dataset, this split, the first
    ``samples`` examples."""

    model_config = ConfigDict(extra="forbid")
    split: str = Field(default="train", min_length=1)
    samples: int = Field(default=256, gt=0)
    batch_size: int = Field(default=32, gt=0)
    seed: int = 0


class ExperimentConfig(BaseModel):
    """An M3SB experiment: task models, their datasets, the merges to compare."""

    model_config = ConfigDict(extra="forbid")
    name: str = "experiment"
    model_checkpoints: list[str] = Field(min_length=1)
    datasets_config: list[dict[str, Any]] = Field(min_length=1)
    merge_configs: dict[str, dict[str, Any]] = Field(min_length=1)
    base_model_checkpoint: str | None = None
    task_vectors: bool = False
    batch_size: int = Field(default=256, gt=0)
    autocast: Literal["none", "float16", "bfloat16"] = "none"
    executor: Literal["local", "ray"] = "local"
    ray_address: str | None = None
    trust_remote_code: bool = False
    processor_checkpoint: str | None = Field(default=None, min_length=1)
    cache_dir: str | None = Field(default=None, min_length=1)
    statistics: StatisticsSettings = Field(default_factory=StatisticsSettings)


def _validated(schema: type[BaseModel], data: Any, path: str | Path) -> Any:
    """``data`` validated against ``schema``; the first problem as one line naming ``path``."""
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    try:
        return schema.model_validate(data)
    except ValidationError as error:
        first = error.errors()[0]
        location = ".".join(str(part) for part in first["loc"]) or "(top level)"
        if first["type"] == "extra_forbidden":
            allowed = f"; allowed: {', '.join(schema.model_fields)}" if len(first["loc"]) == 1 else ""
            raise ConfigError(f"{path}: unknown key '{location}'{allowed}") from None
        raise ConfigError(f"{path}: {location}: {first['msg']}") from None


def load_experiment_config(path: str | Path) -> ExperimentConfig:
    """Read and validate an experiment YAML file."""
    return _validated(ExperimentConfig, load_yaml(path), path)  # type: ignore[no-any-return]


class ParetoTaskConfig(BaseModel):
    """One task of a Pareto search: its name, fine-tuned model and validation data."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=200)
    model: str = Field(min_length=1)
    dataset: dict[str, Any]
    kind: str = "image_classification"
    control: bool = False

    @model_validator(mode="before")
    @classmethod
    def _kind_in_dataset(cls, data: Any) -> Any:
        """``kind`` may be written in the dataset entry, as experiments write it."""
        if isinstance(data, dict) and isinstance(data.get("dataset"), dict) and "kind" in data["dataset"]:
            dataset = dict(data["dataset"])
            kind = dataset.pop("kind")
            if "kind" in data and data["kind"] != kind:
                raise ValueError(f"kind '{data['kind']}' and dataset kind '{kind}' differ")
            data = {**data, "dataset": dataset, "kind": kind}
        return data

    @field_validator("name")
    @classmethod
    def _plain_name(cls, name: str) -> str:
        """Task names become folder names under the results folder: nothing that leaves it."""
        if any(mark in name for mark in ("/", "\\", "\0")) or name.startswith(".") or name != name.strip():
            raise ValueError(
                f"task name {name!r} must be a plain folder name (no '/', '\\', leading '.' or spaces)"
            )
        return name


DensityChoice = Literal["auto", "per_model", "global", "fixed"]
DENSITY_CHOICES: tuple[str, ...] = get_args(DensityChoice)


class EvolveSettings(BaseModel):
    """How ``m3sb evolve`` searches (the ``evolve:`` section of a Pareto config; ``m3sb pareto``
    ignores it): CMA-ES over per-model weights, read as gradients over ``layer_groups``
    evenly spaced points of the layers, and the method's density.

    ``density``: ``per_model`` (one gene per model), ``global`` (one gene), ``fixed`` (the
    config's parameters), or ``auto`` (per model where the method has a density, else fixed).
    ``sigma`` is CMA-ES's initial step, as a fraction of each gene's range. ``start_weight``:
    every weight's starting value (0.3, clipped to ``bounds``, by default).
    """

    model_config = ConfigDict(extra="forbid")
    generations: int = Field(default=10, gt=0)
    population: int | None = Field(default=None, ge=2)
    layer_groups: int = Field(default=1, gt=0, le=64)
    density: DensityChoice = "auto"
    sigma: float = Field(default=0.2, gt=0.0, le=1.0)
    start_weight: float | None = Field(default=None, allow_inf_nan=False)


class ParetoConfig(BaseModel):
    """A MAP search over the coefficients of the task vectors (``m3sb pareto``)."""

    model_config = ConfigDict(extra="forbid")
    base_model: str = Field(min_length=1)
    merge_method: str = "task_arithmetic"
    parameters: dict[str, Any] = Field(default_factory=dict)
    metric: str = "accuracy"
    budget: int | None = Field(default=None, gt=0)
    bounds: tuple[float, float] = (0.0, 1.0)
    batch_size: int = Field(default=256, gt=0)
    candidates_per_pass: int = Field(default=1, gt=0)
    candidate_dtype: Literal["float32", "model"] = "float32"
    autocast: Literal["none", "float16", "bfloat16"] = "none"
    executor: Literal["local", "ray"] = "local"
    ray_address: str | None = None
    trust_remote_code: bool = False
    processor_checkpoint: str | None = Field(default=None, min_length=1)
    cache_dir: str | None = Field(default=None, min_length=1)
    statistics: StatisticsSettings = Field(default_factory=StatisticsSettings)
    tasks: list[ParetoTaskConfig] = Field(min_length=2)
    evolve: EvolveSettings = Field(default_factory=EvolveSettings)  # read by m3sb evolve only

    @field_validator("tasks")
    @classmethod
    def _distinct_names(cls, tasks: list[ParetoTaskConfig]) -> list[ParetoTaskConfig]:
        seen: set[str] = set()
        for task in tasks:
            if task.name in seen:
                raise ValueError(f"two tasks share the name '{task.name}'; give each task its own name")
            seen.add(task.name)
        if sum(not task.control for task in tasks) < 2:
            raise ValueError("a search needs at least two tasks that are merged (not control tasks)")
        return tasks

    @property
    def merged_tasks(self) -> list[ParetoTaskConfig]:
        """The tasks whose task vectors the coefficients weigh (every task but the controls)."""
        return [task for task in self.tasks if not task.control]

    @field_validator("bounds")
    @classmethod
    def _ordered_bounds(cls, bounds: tuple[float, float]) -> tuple[float, float]:
        low, high = bounds
        if not (abs(low) <= 1e6 and abs(high) <= 1e6 and low < high):
            raise ValueError(f"expected two numbers in [-1e6, 1e6], low < high; got {list(bounds)}")
        return bounds


def load_pareto_config(path: str | Path) -> ParetoConfig:
    """Read and validate a Pareto search YAML file."""
    return _validated(ParetoConfig, load_yaml(path), path)  # type: ignore[no-any-return]


def load_preference(path: str | Path, task_names: Iterable[str]) -> list[float]:
    """A preference file (task name -> weight, the seed's format) as one weight per task, in order.

    Tasks the file leaves out weigh 0; an unknown task, a negative or non-numeric weight,
    or all-zero weights are errors.
    """
    names = list(task_names)
    data = load_yaml(path)
    if not isinstance(data, dict) or not data:
        raise ConfigError(f"{path}: expected a mapping of task name to weight")
    weights = dict.fromkeys(names, 0.0)
    for name, value in data.items():
        if name not in weights:
            raise ConfigError(f"{path}: unknown task '{name}'; tasks are {', '.join(names)}")
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not value >= 0
            or value == float("inf")
        ):
            raise ConfigError(f"{path}: weight of '{name}' must be a finite number >= 0, got {value!r}")
        weights[name] = float(value)
    if not any(weights.values()):
        raise ConfigError(f"{path}: all weights are zero; give at least one task a positive weight")
    return [weights[name] for name in names]
