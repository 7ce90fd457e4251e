"""Multi-stage recipes (mergekit-multimerge's format): several YAML documents in one file.

Each document is a merge recipe; every one but the final merge has a ``name``, and later
documents may name earlier ones wherever a model goes (``model:``, ``base_model:``, a
slice source, ``tokenizer_source:``). The final merge is the document without a name
(at most one), else the last one; it is written to the output folder, every other stage
to ``STAGES_DIR/<name>``. Stages run in dependency order. A finished stage keeps a record
of what made it (its recipe, the stages it read, the size and time of its local inputs'
files), so a rerun reuses every stage whose record still matches and merges the rest.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from m3sb.config import MergeConfig, ModuleEntry, load_yaml_documents, parse_merge_config
from m3sb.errors import ConfigError

STAGE_RECORD = "m3sb-stage.json"  # written into each finished stage's folder


@dataclass(frozen=True)
class Stage:
    """One merge of a multi-stage recipe, with stage names replaced by their folders."""

    name: str | None
    config: MergeConfig
    out_dir: Path
    fingerprint: str
    final: bool


def load_documents(path: str | Path, strict: bool = False) -> list[MergeConfig]:
    """Every merge recipe of a YAML file, validated (documents named by position on errors)."""
    documents = load_yaml_documents(path)
    if len(documents) == 1:
        return [parse_merge_config(documents[0], source=str(path), strict=strict)]
    return [
        parse_merge_config(document, source=f"{path} (document {index + 1})", strict=strict)
        for index, document in enumerate(documents)
    ]


def _final_index(configs: Sequence[MergeConfig], source: str) -> int:
    unnamed = [index for index, config in enumerate(configs) if config.name is None]
    if len(unnamed) > 1:
        which = " and ".join(str(index + 1) for index in unnamed)
        raise ConfigError(
            f"{source}: documents {which} have no name; every stage but the final merge needs one"
        )
    return unnamed[0] if unnamed else len(configs) - 1


def _check_names(configs: Sequence[MergeConfig], source: str) -> None:
    seen: set[str] = set()
    for index, config in enumerate(configs):
        name = config.name
        if name is None:
            continue
        if not name.strip() or any(mark in name for mark in ("/", "\\", "\0")) or name.startswith("."):
            raise ConfigError(f"{source} (document {index + 1}): name {name!r} must be a plain folder name")
        if name in seen:
            raise ConfigError(f"{source}: two stages are named '{name}'; give each its own name")
        seen.add(name)


def map_models(document: dict[str, Any], change: Callable[[str], str]) -> None:
    """Apply ``change`` to every model a recipe document (a mapping, as YAML gives it) names:
    ``models``, slice sources and bases (of the recipe and of each of its ``modules``),
    ``base_model``, the tokenizer's source and the models its token settings take rows from.
    In place."""

    def changed(location: Any) -> Any:
        return change(str(location)) if location else location

    modules = document.get("modules")
    towers = modules.values() if isinstance(modules, dict) else []
    for body in [document, *(tower for tower in towers if isinstance(tower, dict))]:
        for entry in body.get("models") or []:
            entry["model"] = changed(entry.get("model"))
        for piece in body.get("slices") or []:
            for source in piece.get("sources") or []:
                source["model"] = changed(source.get("model"))
            if piece.get("base_model"):
                piece["base_model"] = changed(piece["base_model"])
    if document.get("base_model"):
        document["base_model"] = changed(document["base_model"])
    if document.get("tokenizer_source") not in (None, "base", "union"):
        document["tokenizer_source"] = changed(document["tokenizer_source"])
    tokenizer = document.get("tokenizer")
    if isinstance(tokenizer, dict):
        if tokenizer.get("source") not in (None, "base", "union"):
            tokenizer["source"] = changed(tokenizer["source"])
        for setting in (tokenizer.get("tokens") or {}).values():
            source = setting.get("source") if isinstance(setting, dict) else None
            if isinstance(source, str):
                setting["source"] = changed(source)
            elif isinstance(source, dict) and source.get("model"):
                source["model"] = changed(source["model"])


def _references(config: MergeConfig) -> list[str]:
    """Every string of the recipe that names a model, in order of first mention."""
    found: list[str] = []

    def note(location: str) -> str:
        found.append(location)
        return location

    map_models(config.model_dump(), note)
    return list(dict.fromkeys(found))


def _replaced(config: MergeConfig, folders: dict[str, Path]) -> MergeConfig:
    """``config`` with every model named like a stage pointing at that stage's folder."""
    data: dict[str, Any] = config.model_dump()
    map_models(data, lambda location: str(folders[location]) if location in folders else location)
    replaced = MergeConfig.model_validate(data)
    replaced.notes.extend(config.notes)
    return replaced


def _order(configs: Sequence[MergeConfig], source: str) -> list[int]:
    """The documents in an order where every stage comes after the stages it names."""
    names = {config.name: index for index, config in enumerate(configs) if config.name is not None}
    needs = {
        index: {names[ref] for ref in _references(config) if ref in names}
        for index, config in enumerate(configs)
    }
    for index, config in enumerate(configs):
        if index in needs[index]:
            raise ConfigError(f"{source}: stage '{config.name}' names itself as a model")
    ordered: list[int] = []
    waiting = dict(needs)
    while waiting:
        ready = [index for index, wanted in waiting.items() if wanted <= set(ordered)]
        if not ready:
            stuck = ", ".join(f"'{configs[index].name}'" for index in sorted(waiting) if configs[index].name)
            raise ConfigError(f"{source}: stages {stuck} name each other in a cycle")
        ordered.extend(sorted(ready))
        for index in ready:
            del waiting[index]
    return ordered


def _input_signature(location: str) -> list[list[object]]:
    """Size and modification time of a local input's files (nothing for a hub id); both the
    model's and the adapter's for ``MODEL+ADAPTER``."""
    path = Path(location).expanduser()
    if not path.exists() and "+" in location:
        model, _, adapter = location.rpartition("+")
        return [*_input_signature(model), ["+"], *_input_signature(adapter)]
    if not path.exists():
        return []
    files = sorted(path.iterdir()) if path.is_dir() else [path]
    signature: list[list[object]] = []
    for file in files:
        if file.is_file() and file.name != STAGE_RECORD:
            info = file.stat()
            signature.append([file.name, info.st_size, info.st_mtime_ns])
    return signature


def _statistics_files(config: MergeConfig) -> list[str]:
    """The statistics files a recipe's models name (regmean, fisher)."""
    bodies: list[MergeConfig | ModuleEntry] = [config, *(config.modules or {}).values()]
    return sorted({entry.statistics for body in bodies for entry in body.models or [] if entry.statistics})


def plan_stages(configs: Sequence[MergeConfig], source: str, out_dir: Path, stages_dir: Path) -> list[Stage]:
    """The stages of a recipe in running order, checked (names, references, cycles)."""
    _check_names(configs, source)
    final = _final_index(configs, source)
    folders = {
        config.name: (out_dir if index == final else stages_dir / config.name)
        for index, config in enumerate(configs)
        if config.name is not None
    }
    index_of = {config.name: index for index, config in enumerate(configs) if config.name is not None}
    fingerprints: dict[int, str] = {}
    stages = []
    for index in _order(configs, source):
        config = configs[index]
        references = _references(config)
        record = {
            "recipe": config.model_dump(mode="json"),
            "stages": sorted(fingerprints[index_of[ref]] for ref in references if ref in index_of),
            "inputs": {ref: _input_signature(ref) for ref in references if ref not in index_of},
            "statistics": {path: _input_signature(path) for path in _statistics_files(config)},
        }
        fingerprint = hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()
        fingerprints[index] = fingerprint
        out = out_dir if index == final else stages_dir / str(config.name)
        stages.append(Stage(config.name, _replaced(config, folders), out, fingerprint, index == final))
    return stages


def is_finished(stage: Stage) -> bool:
    """Whether the stage's folder holds a merge made from exactly this stage's record."""
    record = stage.out_dir / STAGE_RECORD
    try:
        return bool(json.loads(record.read_text(encoding="utf-8")).get("fingerprint") == stage.fingerprint)
    except (OSError, ValueError, AttributeError):
        return False


def stage_record(stage: Stage) -> str:
    """The record a finished stage keeps in its folder."""
    return json.dumps({"name": stage.name, "fingerprint": stage.fingerprint}, indent=2) + "\n"


def run_stages(
    stages: Sequence[Stage],
    merge: Callable[[Stage, bool], object],
    say: Callable[[str], None] = lambda _: None,
) -> None:
    """Run each stage that is not finished with ``merge(stage, replace)``; ``replace`` is
    True for intermediate stages (their folders are m3sb's to overwrite)."""
    for stage in stages:
        label = stage.name or "final merge"
        if not stage.final and is_finished(stage):
            say(f"stage {label}: unchanged, reusing {stage.out_dir}")
            continue
        say(f"stage {label}: merging with {stage.config.merge_method} -> {stage.out_dir}")
        merge(stage, not stage.final)
