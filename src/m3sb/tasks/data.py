"""Task datasets: load a split from a hub id, a ``save_to_disk`` folder, an image folder, or
local data files (``.jsonl``, ``.json``, ``.csv``, ``.parquet``: one file is the split asked
for; a folder of them holds one file per split, named after it: ``test.jsonl``).

A split is a name (``test``), a slice in the ``datasets`` syntax (``train[90%:]``,
``train[:500]``) or a seeded random *carve* of another split: a fraction of it, capped at
a number of examples, or the rest of it (MAP's validation sets are 10% of train, at most
5,000 examples, seed 0, drawn as ``torch.utils.data.random_split`` draws them)::

    split: {carve: train, fraction: 0.1, max_examples: 5000, seed: 0}
    split: {carve: train, fraction: 0.1, max_examples: 5000, seed: 0, part: rest}

The same carve gives the same examples on every run and machine; ``part: rest`` gives
exactly the examples the carve leaves out. A missing split or column, or a carve larger
than its source, is an error that names the dataset before any evaluation.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from m3sb.errors import ConfigError, M3SBError, first_line
from m3sb.tasks.clip_templates import TEMPLATES, check_template, class_names_for


class DataError(M3SBError):
    """A dataset cannot be found, read or used as asked."""


class CarveSpec(BaseModel):
    """A seeded random part of another split (or what is left of it)."""

    model_config = ConfigDict(extra="forbid")
    carve: str = Field(min_length=1)
    fraction: float | None = Field(default=None, gt=0)
    max_examples: int | None = Field(default=None, gt=0)
    seed: int = 0
    part: Literal["carved", "rest"] = "carved"

    @model_validator(mode="after")
    def _sized(self) -> CarveSpec:
        if self.fraction is None and self.max_examples is None:
            raise ValueError("a carve needs a fraction, max_examples or both")
        if self.fraction is not None and self.fraction > 1:
            raise ValueError(f"carve fraction {self.fraction} is larger than its source (at most 1)")
        return self

    def size(self, available: int) -> int:
        """How many examples the carve takes from a split of ``available`` examples."""
        count = available if self.fraction is None else int(self.fraction * available)
        if self.max_examples is not None:
            if self.fraction is None and self.max_examples > available:
                raise ValueError(
                    f"carve of {self.max_examples} examples is larger than its source "
                    f"'{self.carve}' ({available} examples)"
                )
            count = min(count, self.max_examples)
        return max(1, count) if available else 0

    def indices(self, available: int) -> np.ndarray:
        """The rows of the source split that this carve (or its rest) holds, in ascending order.

        They are the rows ``torch.utils.data.random_split(split, [rest, carved],
        generator=torch.Generator().manual_seed(seed))`` puts in its second part: the
        validation sets of the task-vectors project (MAP) and of FusionBench's
        ``train_validation_split``, given the same source split.
        """
        import torch

        order = torch.randperm(available, generator=torch.Generator().manual_seed(self.seed)).numpy()
        kept = available - self.size(available)
        return np.sort(order[kept:] if self.part == "carved" else order[:kept])

    def describe(self) -> str:
        """The carve as one short phrase for messages."""
        parts = [f"fraction {self.fraction:g}" if self.fraction is not None else ""]
        parts.append(f"at most {self.max_examples}" if self.max_examples is not None else "")
        what = ", ".join(p for p in parts if p)
        rest = "the rest of " if self.part == "rest" else ""
        return f"{rest}a carve ({what}, seed {self.seed}) of '{self.carve}'"


class DatasetSpec(BaseModel):
    """Where a task's evaluation data is and which columns hold images and labels.

    ``subset`` is the hub dataset's configuration (``cropped_digits`` for SVHN).
    ``class_names`` and ``templates`` are for zero-shot heads (kind ``clip_zero_shot``):
    the names of the labels 0..C-1 (instead of the label column's own) or the name of a
    built-in set (the eight standard tasks: ``eurosat``, ``cars``...), and the prompts
    (each with one ``{}``) or the name of a built-in set (``sun397``, ``generic``...).

    The language-model keys (kind ``causal_lm``): ``format`` (``text``: loss and
    perplexity of ``text_col``; ``exact_match``: ``prompt_col`` answered by ``answer_col``;
    ``multiple_choice``: ``prompt_col`` continued by each of ``choices_col``, ``label_col``
    the right one), ``max_length`` (tokens per sequence; longer texts are cut, longer
    prompts and choices refused), ``max_new_tokens`` (the cap on an answer's tokens) and
    ``chat_template`` (wrap each prompt in the tokenizer's chat template). Kind ``lm_eval``
    reads ``metric`` (lm-eval's result key, ``acc,none``), ``num_fewshot``, ``max_samples``
    (its ``limit``) and ``chat_template``; ``dataset_name`` is the lm-eval task or its YAML.
    """

    model_config = ConfigDict(extra="forbid")
    dataset_name: str = Field(min_length=1)
    subset: str | None = Field(default=None, min_length=1)
    split: str | CarveSpec = "test"
    image_col: str = "image"
    label_col: str = "label"
    max_samples: int | None = Field(default=None, gt=0)
    class_names: list[str] | str | None = Field(default=None, min_length=1)
    templates: list[str] | str | None = None
    format: Literal["text", "exact_match", "multiple_choice"] | None = None
    text_col: str | None = None
    prompt_col: str | None = None
    answer_col: str | None = None
    choices_col: str | None = None
    max_length: int | None = Field(default=None, gt=1)
    max_new_tokens: int | None = Field(default=None, gt=0)
    chat_template: bool | None = None
    metric: str | None = Field(default=None, min_length=1)
    num_fewshot: int | None = Field(default=None, ge=0)

    @model_validator(mode="after")
    def _prompts(self) -> DatasetSpec:
        if isinstance(self.templates, list):
            if not self.templates:
                raise ValueError("templates: give at least one template")
            for template in self.templates:
                check_template(template)
        elif isinstance(self.templates, str) and self.templates not in TEMPLATES:
            raise ValueError(
                f"templates: no built-in set '{self.templates}'; choose one of: {', '.join(TEMPLATES)}"
            )
        if isinstance(self.class_names, str):
            try:
                class_names_for(self.class_names)
            except ValueError as error:
                raise ValueError(f"class_names: {error}") from None
        elif self.class_names is not None and len(set(self.class_names)) != len(self.class_names):
            raise ValueError("class_names: a class name appears twice")
        return self

    @property
    def split_name(self) -> str:
        """The split as written (a carve is described in words)."""
        return self.split if isinstance(self.split, str) else self.split.describe()


_SPLIT = re.compile(r"^\s*([^\[\]\s]+)\s*(\[.*\])?\s*$")


LM_KEYS = (  # kind causal_lm's
    "format",
    "text_col",
    "prompt_col",
    "answer_col",
    "choices_col",
    "max_length",
    "max_new_tokens",
    "chat_template",
)
HARNESS_KEYS = ("metric", "num_fewshot", "chat_template")  # kind lm_eval's
DATA_FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


def _data_files(path: Path, name: str) -> tuple[str, str] | None:
    """(builder, file) of the split ``name`` where ``path`` is a data file or a folder of them."""
    if path.is_file():
        builder = DATA_FILE_BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise DataError(f"{path}: not a dataset file (expected {', '.join(DATA_FILE_BUILDERS)})")
        return builder, str(path)
    if path.is_dir():
        found = [
            path / f"{name}{suffix}" for suffix in DATA_FILE_BUILDERS if (path / f"{name}{suffix}").is_file()
        ]
        if found and name != "metadata":
            return DATA_FILE_BUILDERS[found[0].suffix.lower()], str(found[0])
        splits = sorted(  # metadata.*: an image folder's labels, not a split
            {
                f.stem
                for f in path.iterdir()
                if f.suffix.lower() in DATA_FILE_BUILDERS and f.stem != "metadata"
            }
        )
        if splits:
            raise DataError(f"{path}: no split '{name}'; it has {', '.join(splits)}")
    return None


def _named_split(dataset_name: str, name: str, subset: str | None = None) -> Any:
    """A whole named split as a ``datasets.Dataset``."""
    import datasets

    datasets.disable_progress_bars()
    path = Path(dataset_name).expanduser()
    if path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "dataset_info.json").is_file()):
        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            if name not in loaded:
                raise DataError(f"{dataset_name}: no split '{name}'; it has {', '.join(loaded)}")
            return loaded[name]
        return loaded
    files = _data_files(path, name)
    if files is not None:
        builder, file = files
        return datasets.load_dataset(builder, data_files={name: file}, split=name)
    if path.is_dir():
        return datasets.load_dataset("imagefolder", data_dir=str(path), split=name)
    return datasets.load_dataset(dataset_name, subset, split=name)


def _split(dataset_name: str, split: str, subset: str | None = None) -> Any:
    """A split written as a name or a slice (``train[10%:20%]``, ``train[:500]``)."""
    from datasets import ReadInstruction

    match = _SPLIT.match(split)
    if not match:
        raise DataError(f"{dataset_name}: split '{split}' is neither a name nor a slice such as train[:10%]")
    name, bounds = match.group(1), match.group(2)
    whole = _named_split(dataset_name, name, subset)
    if bounds is None:
        return whole
    try:
        (instruction,) = ReadInstruction.from_spec(f"{name}{bounds}").to_absolute({name: len(whole)})
    except (ValueError, AssertionError) as error:
        raise DataError(f"{dataset_name}: split '{split}': {first_line(error)[:200]}") from None
    return whole.select(range(instruction.from_, instruction.to))


def load_task_data(spec: DatasetSpec, columns: tuple[str, ...] | None = None) -> Any:
    """Load a task's split (named, sliced or carved), check it has ``columns`` (the image and
    label columns by default), keep at most ``max_samples`` rows."""
    carve = spec.split if isinstance(spec.split, CarveSpec) else None
    source = carve.carve if carve is not None else str(spec.split)
    try:
        dataset = _split(spec.dataset_name, source, spec.subset)
        if carve is not None:
            try:
                dataset = dataset.select(carve.indices(len(dataset)))
            except ValueError as error:
                raise DataError(f"{spec.dataset_name}: {error}") from None
    except DataError:
        raise
    except Exception as error:  # noqa: BLE001 (every loading failure becomes one line)
        raise DataError(
            f"{spec.dataset_name}: cannot load split '{source}' ({first_line(error)[:200]})"
        ) from None
    for column in columns if columns is not None else (spec.image_col, spec.label_col):
        if column not in dataset.column_names:
            raise DataError(
                f"{spec.dataset_name}: no column '{column}'; columns are {', '.join(dataset.column_names)}"
            )
    if spec.max_samples is not None and spec.max_samples < len(dataset):
        dataset = dataset.select(range(spec.max_samples))
    return dataset


def parse_dataset_spec(data: Any, where: str) -> DatasetSpec:
    """Validate one dataset entry of a config."""
    from pydantic import ValidationError

    try:
        return DatasetSpec.model_validate(data)
    except ValidationError as error:
        problems = error.errors()
        first = next(
            (e for e in problems if "str" not in e["loc"]), problems[0]
        )  # the carve's, for a mapping
        location = ".".join(str(p) for p in first["loc"] if str(p) != "str" and "CarveSpec" not in str(p))
        message = str(first["msg"]).removeprefix("Value error, ")
        raise ConfigError(f"{where}: {location}: {message}" if location else f"{where}: {message}") from None
