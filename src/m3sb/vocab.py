"""Output tokenizers and vocabulary alignment: mergekit's ``tokenizer_source`` and ``tokenizer:``.

The output vocabulary is the base model's tokenizer (``base``), one model's (a location),
or the ``union`` of every input's (the base model's tokens first, then each model's new
tokens in recipe order, then their added tokens), plus the tokens the ``tokens:`` section
names. Every vocabulary-indexed tensor (embeddings, ``lm_head``) of every input is then
re-indexed by token: a token the input has keeps the input's row; a token it lacks, or one
whose setting says ``force``, takes its setting's source (a model's row for the token,
another token of a model, or zeros), else, as mergekit does, the row of the only model
that has it, else the ``base_model``'s row (when the recipe names one), else the mean over
the models that have it.
``pad_to_multiple_of`` rounds the rows up, filling them with the mean embedding. The
output's ``config.json`` gets the new ``vocab_size``. Nothing is truncated or padded
silently: a token that no input has and that its setting does not fill is an error, and the
tokens of the chosen tokenizer that no input has (zero rows, as mergekit fills them) are
reported.

The output tokenizer builds on ``base_model``'s, else the first model's. Tokenizers are read with
``transformers`` (never with remote code); a model without tokenizer files is taken to
share the base model's vocabulary when its embedding rows allow it.
"""

from __future__ import annotations

import copy
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from m3sb.checkpoints import TOKENIZER_FILES, Checkpoint, model_folder
from m3sb.config import MergeConfig, ModelToken, TokenizerSpec, TokenSetting, ZeroToken
from m3sb.errors import CheckpointError, ConfigError
from m3sb.slices import layer_index

VOCABULARY_MARKS = (
    "embed_tokens",
    "lm_head",
    "wte",
    "word_embeddings",
    "embed_in",
    "embed_out",
    "tok_embeddings",
)


def vocabulary_rows(checkpoint: Checkpoint) -> int | None:
    """The model's vocabulary size from its config.json (top level or ``text_config``)."""
    config = checkpoint.read_config()
    size = config.get("vocab_size")
    text = config.get("text_config")
    if not isinstance(size, int) and isinstance(text, dict):
        size = text.get("vocab_size")
    return size if isinstance(size, int) and size > 0 else None


@lru_cache(maxsize=256)
def rows_of(checkpoint: Checkpoint) -> int | None:
    """A checkpoint's vocabulary size (config.json), read once."""
    return vocabulary_rows(checkpoint)


def is_vocabulary_tensor(name: str, shape: Sequence[int], rows: int | None) -> bool:
    """Whether a tensor has one row per token: outside the layers, named like an embedding or
    output head, and ``rows`` long in its first dimension."""
    return (
        rows is not None
        and layer_index(name) is None
        and len(shape) in (1, 2)
        and shape[0] == rows
        and any(mark in name for mark in VOCABULARY_MARKS)
    )


def load_tokenizer(folder: Path | None, label: str) -> Any | None:
    """The fast tokenizer in a model folder, or None when it has no tokenizer files."""
    if folder is None or not any((folder / name).is_file() for name in TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)
    except Exception as error:  # noqa: BLE001 (any tokenizer failure becomes one line)
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(f"{label}: cannot read its tokenizer ({first[:200]})") from None


@dataclass
class Vocabulary:
    """The output tokenizer and, for each input checkpoint, the row of each output token in it
    (-1 where it lacks the token)."""

    tokenizer: Any
    tokens: dict[str, int]
    rows: int
    index: dict[int, torch.Tensor]  # id(checkpoint) -> LongTensor of len(tokens)
    settings: dict[str, TokenSetting]
    sources: dict[str, Checkpoint]  # a setting's model location -> its checkpoint
    vocabularies: dict[int, dict[str, int]]
    base: Checkpoint | None  # the recipe's base_model, whose rows fill the tokens others lack
    unfilled: list[str]  # tokens of the output vocabulary in no input model: zero rows
    folder: Path | None = None  # the tokenizer's own folder, when it is not an input's

    def align(self, tensors: Sequence[tuple[Checkpoint, torch.Tensor]]) -> list[torch.Tensor]:
        """Each input's vocabulary-indexed tensor re-indexed to the output vocabulary."""
        present = torch.stack([self.index[id(checkpoint)] >= 0 for checkpoint, _ in tensors])
        forced = torch.zeros(len(self.tokens), dtype=torch.bool)
        for token, setting in self.settings.items():
            if setting.force:
                forced[self.tokens[token]] = True
        needs = (~present.all(dim=0)) | forced
        defaults = {
            token_id: self._default(token, token_id, tensors, present)
            for token, token_id in self.tokens.items()
            if bool(needs[token_id])
        }
        aligned = []
        for checkpoint, tensor in tensors:
            index = self.index[id(checkpoint)]
            out = torch.zeros((self.rows, *tensor.shape[1:]), dtype=tensor.dtype, device=tensor.device)
            kept = (index >= 0) & ~forced
            positions = torch.arange(len(self.tokens))[kept]
            out[positions] = tensor[index[kept]]
            for token_id, row in defaults.items():
                if not bool(kept[token_id]):
                    out[token_id] = row
            if self.rows > len(self.tokens):
                out[len(self.tokens) :] = out[: len(self.tokens)].mean(dim=0)
            aligned.append(out)
        return aligned

    def _default(
        self,
        token: str,
        token_id: int,
        tensors: Sequence[tuple[Checkpoint, torch.Tensor]],
        present: torch.Tensor,
    ) -> torch.Tensor:
        """The row a token takes where an input lacks it (or everywhere, when forced)."""
        setting = self.settings.get(token)
        source = setting.source if setting is not None else None
        if isinstance(source, ZeroToken):
            return torch.zeros_like(tensors[0][1][0])
        if isinstance(source, ModelToken):
            checkpoint = self.sources[source.model]
            row = (
                source.token_id
                if source.token_id is not None
                else self.vocabularies[id(checkpoint)][str(source.token)]
            )
            return self._row(checkpoint, row, tensors, token)
        if isinstance(source, str):
            checkpoint = self.sources[source]
            return self._row(checkpoint, int(self.index[id(checkpoint)][token_id]), tensors, token)
        having = [i for i in range(len(tensors)) if bool(present[i, token_id])]
        if not having:  # noted when planned (mergekit fills these with zeros too)
            return torch.zeros_like(tensors[0][1][0])
        if len(having) == 1:
            checkpoint, tensor = tensors[having[0]]
            return tensor[int(self.index[id(checkpoint)][token_id])]
        base_position = next((i for i in having if tensors[i][0] is self.base), None)
        if base_position is not None and self.base is not None:
            return tensors[base_position][1][int(self.index[id(self.base)][token_id])]
        rows = [tensors[i][1][int(self.index[id(tensors[i][0])][token_id])] for i in having]
        return torch.stack(rows).mean(dim=0)

    @staticmethod
    def _row(
        checkpoint: Checkpoint, row: int, tensors: Sequence[tuple[Checkpoint, torch.Tensor]], token: str
    ) -> torch.Tensor:
        for candidate, tensor in tensors:
            if candidate is checkpoint:
                if not 0 <= row < tensor.shape[0]:
                    raise ConfigError(
                        f"token {token!r}: row {row} is outside {checkpoint.label}'s vocabulary"
                    )
                return tensor[row]
        raise ConfigError(f"token {token!r}: its source {checkpoint.label} is not an input of this tensor")


def _union(base_tokenizer: Any, tokenizers: Sequence[tuple[Any, int]]) -> Any:
    """The base tokenizer with every other tokenizer's tokens (those that have rows) added."""
    vocabulary: dict[str, None] = {}
    added: dict[str, Any] = {}
    for tokenizer, rows in tokenizers:
        special = tokenizer.added_tokens_decoder
        special_names = {info.content for info in special.values()}
        for token, token_id in tokenizer.get_vocab().items():
            if token_id < rows and token not in special_names:
                vocabulary.setdefault(token, None)
        for token_id, info in special.items():
            if token_id < rows:
                added.setdefault(info.content, info)
    result = copy.deepcopy(base_tokenizer)
    known = base_tokenizer.get_vocab()
    for token in vocabulary:
        if token not in known and token not in added:
            result.add_tokens(token)
    for info in added.values():
        result.add_tokens(info)
    return result


def _vocab_of(tokenizer: Any, rows: int) -> dict[str, int]:
    return {token: token_id for token, token_id in tokenizer.get_vocab().items() if token_id < rows}


def plan_vocabulary(
    spec: TokenizerSpec,
    config: MergeConfig,
    checkpoints: Sequence[Checkpoint],
    opener: Any,
    identity: Any,
) -> Vocabulary:
    """The output tokenizer and every input's token rows, checked before any tensor is read.

    ``checkpoints`` are every input (base model included), ``opener`` opens a location and
    ``identity`` normalises one, so that settings can name models as the recipe does."""
    base_location = config.base_model or config.model_locations[0]
    by_identity = {identity(c.label): c for c in checkpoints}
    base = by_identity.get(identity(base_location)) or opener(base_location)
    base_rows = _row_count(base)
    chosen = None
    tokenizer_folder: Path | None = None
    if spec.source not in ("base", "union"):
        known = by_identity.get(identity(spec.source))
        folder = known.folder if known is not None else model_folder(spec.source)  # may hold a tokenizer only
        tokenizer_folder = None if known is not None else folder
        chosen = load_tokenizer(folder, spec.source)
        if chosen is None:
            raise CheckpointError(f"tokenizer_source {spec.source}: no tokenizer files in {folder}")
    base_tokenizer = load_tokenizer(base.folder, base.label) or chosen  # models without one share it
    if base_tokenizer is None:
        raise CheckpointError(
            f"{base.label}: no tokenizer files; tokenizer_source {spec.source} builds on the base model's"
        )
    tokenizers: dict[int, Any] = {}
    rows: dict[int, int] = {}
    for checkpoint in [base, *[c for c in checkpoints if c is not base]]:
        count = _row_count(checkpoint)
        tokenizer = (
            base_tokenizer if checkpoint is base else load_tokenizer(checkpoint.folder, checkpoint.label)
        )
        if tokenizer is None:
            if count != base_rows:
                raise CheckpointError(
                    f"{checkpoint.label}: no tokenizer files, and its {count} embedding rows differ from "
                    f"the base model's {base_rows}; add its tokenizer"
                )
            tokenizer = base_tokenizer
        tokenizers[id(checkpoint)], rows[id(checkpoint)] = tokenizer, count
    if spec.source == "base":
        output = copy.deepcopy(base_tokenizer)
    elif spec.source == "union":
        output = _union(base_tokenizer, [(tokenizers[id(c)], rows[id(c)]) for c in [base, *checkpoints]])
    else:
        output = copy.deepcopy(chosen)
    for token in spec.tokens:
        if token not in output.get_vocab():
            output.add_tokens(token)
    tokens = dict(sorted(output.get_vocab().items(), key=lambda item: item[1]))
    if sorted(tokens.values()) != list(range(len(tokens))):
        raise CheckpointError(f"{base.label}: the output tokenizer's ids are not 0..{len(tokens) - 1}")
    vocabularies = {key: _vocab_of(tokenizer, rows[key]) for key, tokenizer in tokenizers.items()}
    index = {
        key: torch.tensor([vocabulary.get(token, -1) for token in tokens], dtype=torch.long)
        for key, vocabulary in vocabularies.items()
    }
    count = len(tokens)
    if spec.pad_to_multiple_of:
        count = -(-count // spec.pad_to_multiple_of) * spec.pad_to_multiple_of
    sources = _setting_sources(spec, [base, *checkpoints], by_identity, identity)
    preferred = base if config.base_model is not None else None
    unfilled = [
        token
        for token, token_id in tokens.items()
        if token not in spec.tokens and all(int(index[id(c)][token_id]) < 0 for c in checkpoints)
    ]
    vocabulary = Vocabulary(
        output,
        tokens,
        count,
        index,
        dict(spec.tokens),
        sources,
        vocabularies,
        preferred,
        unfilled,
        tokenizer_folder,
    )
    _check_settings(vocabulary, [base, *checkpoints])
    return vocabulary


def _row_count(checkpoint: Checkpoint) -> int:
    """A model's vocabulary size: its config's, else the rows of its embedding."""
    return rows_of(checkpoint) or _embedding_rows(checkpoint)


def _embedding_rows(checkpoint: Checkpoint) -> int:
    for name, info in checkpoint.tensors.items():
        if any(mark in name for mark in VOCABULARY_MARKS) and layer_index(name) is None and info.shape:
            return int(info.shape[0])
    raise CheckpointError(f"{checkpoint.label}: no vocab_size in config.json and no embedding tensor")


def _setting_sources(
    spec: TokenizerSpec,
    checkpoints: Sequence[Checkpoint],
    by_identity: Mapping[str, Checkpoint],
    identity: Any,
) -> dict[str, Checkpoint]:
    sources = {}
    for token, setting in spec.tokens.items():
        source = setting.source
        location = (
            source if isinstance(source, str) else source.model if isinstance(source, ModelToken) else None
        )
        if location is None:
            continue
        found = by_identity.get(identity(location))
        if found is None:
            raise ConfigError(
                f"tokenizer.tokens[{token!r}]: source '{location}' is not one of the recipe's models"
            )
        sources[location] = found
    return sources


def _check_settings(vocabulary: Vocabulary, checkpoints: Sequence[Checkpoint]) -> None:
    """Every token can be filled: its setting's source has it, or some input does."""
    for token, setting in vocabulary.settings.items():
        source = setting.source
        if isinstance(source, str):
            checkpoint = vocabulary.sources[source]
            if token not in vocabulary.vocabularies[id(checkpoint)]:
                raise ConfigError(
                    f"tokenizer.tokens[{token!r}]: its source {checkpoint.label} has no such token"
                )
        elif isinstance(source, ModelToken) and source.token is not None:
            checkpoint = vocabulary.sources[source.model]
            if source.token not in vocabulary.vocabularies[id(checkpoint)]:
                raise ConfigError(
                    f"tokenizer.tokens[{token!r}]: {checkpoint.label} has no token {source.token!r}"
                )
        elif isinstance(source, ModelToken) and source.token_id is not None:
            checkpoint = vocabulary.sources[source.model]
            rows = _row_count(checkpoint)
            if source.token_id >= rows:
                raise ConfigError(
                    f"tokenizer.tokens[{token!r}]: token_id {source.token_id} is past the {rows} rows of "
                    f"{checkpoint.label}"
                )
        elif source is None:
            token_id = vocabulary.tokens[token]
            if all(int(vocabulary.index[id(c)][token_id]) < 0 for c in checkpoints):
                raise ConfigError(
                    f"tokenizer.tokens[{token!r}]: no input model has this token; give it a source "
                    "(a model, {kind: zero} or {kind: model_token, ...})"
                )


BUILT_IN_TEMPLATES = ("alpaca", "chatml", "exaone", "llama3", "mistral")


def chat_template_text(value: str, folders: Sequence[Path | None]) -> str | None:
    """The Jinja text a recipe's ``chat_template`` asks for: ``auto`` (the most common among the
    inputs' tokenizers; None when none has one), a built-in name, or a template itself."""
    if value == "auto":
        templates = []
        for folder in folders:
            tokenizer = load_tokenizer(folder, str(folder))
            template = getattr(tokenizer, "chat_template", None) if tokenizer is not None else None
            if isinstance(template, dict):
                template = template.get("default")
            if template:
                templates.append(str(template).strip())
        return Counter(templates).most_common(1)[0][0] if templates else None
    if value in BUILT_IN_TEMPLATES:
        return (Path(__file__).with_name("chat_templates") / f"{value}.jinja").read_text(encoding="utf-8")
    if "{" not in value or len(value) < 20:
        raise ConfigError(
            f"chat_template '{value[:40]}' is neither auto, a built-in name "
            f"({', '.join(BUILT_IN_TEMPLATES)}) nor a Jinja template"
        )
    return value


def save_tokenizer(
    vocabulary: Vocabulary | None, config_source: Checkpoint, chat_template: str | None, folder: Path
) -> None:
    """Write the output tokenizer (the vocabulary's, else the config source's) with its chat template."""
    tokenizer = (
        vocabulary.tokenizer
        if vocabulary is not None
        else load_tokenizer(config_source.folder, config_source.label)
    )
    if tokenizer is None:
        raise CheckpointError(f"{config_source.label}: no tokenizer to put the chat template in")
    tokenizer = copy.deepcopy(tokenizer)
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    tokenizer.save_pretrained(str(folder))
