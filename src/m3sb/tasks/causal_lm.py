"""The causal language-model family: any ``AutoModelForCausalLM``, every tensor merged (the
head too), scored on text in one of three formats.

- ``text``: the mean token loss and perplexity of ``text_col``; ``accuracy`` is next-token
  accuracy, precision, recall and F1 are macro averages over the token classes.
- ``exact_match``: a ``prompt_col`` answered by ``answer_col``. ``accuracy`` is the share
  of prompts whose greedy continuation is exactly the answer's tokens (at most
  ``max_new_tokens`` of them) followed by a stop token (the tokenizer's end of sequence or
  any of the model's ``generation_config.eos_token_id``; with no end token at all, the
  continuation need only begin with the answer). Greedy decoding reproduces a sequence exactly
  when the most likely next token, given the prompt and the answer so far, is the
  answer's own at every step, so one batched forward pass over prompt and answer decides
  it (no token-by-token generation). Loss and perplexity are over the answer's tokens.
- ``multiple_choice``: ``prompt_col`` continued by each of ``choices_col``; the prediction
  is the choice of the largest summed log-likelihood, ``label_col`` the right one. Loss and
  perplexity are over the right choice's tokens.

A split is tokenised once with the model's own tokenizer (the base's when it has none)
into the on-disk cache: each example is (rows, 2, length) int32, token ids and each
token's role (padding, context, scored target, end), padded to the split's longest
sequence. Tokenising runs in two passes over the split (its shape, then the batches
written), so it holds a batch of examples at a time, not the split.
Every metric is accumulated as counts batch by batch: memory does not grow with the split.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from m3sb.errors import CheckpointError, ConfigError, first_line
from m3sb.tasks import cache
from m3sb.tasks.data import DataError, DatasetSpec, load_task_data
from m3sb.tasks.metrics import autocast
from m3sb.tasks.model import TaskModel, as_parameters_of, quiet_transformers

KIND = "causal_lm"
DEFAULT_MAX_LENGTH = 512
DEFAULT_MAX_NEW_TOKENS = 32
PAD, CONTEXT, TARGET, END = 0, 1, 2, 3  # a token's role (END: the stop after an answer)
Row = tuple[list[int], list[int]]  # a sequence's token ids and their roles
ENCODE_BATCH = 256
ENCODING_VERSION = 2  # how examples become ids and roles; a change makes new cache entries


@dataclass(frozen=True)
class TextFormat:
    """How a split is read and scored: its format, columns and length limits."""

    format: str
    columns: tuple[str, ...]
    max_length: int
    max_new_tokens: int
    chat_template: bool


def text_format(spec: DatasetSpec) -> TextFormat:
    """The format a dataset entry asks for, with the default column names filled in."""
    kind = spec.format or "text"
    if kind == "text":
        columns: tuple[str, ...] = (spec.text_col or "text",)
    elif kind == "exact_match":
        columns = (spec.prompt_col or "prompt", spec.answer_col or "answer")
    else:
        columns = (spec.prompt_col or "prompt", spec.choices_col or "choices", spec.label_col)
    return TextFormat(
        kind,
        columns,
        spec.max_length or DEFAULT_MAX_LENGTH,
        spec.max_new_tokens or DEFAULT_MAX_NEW_TOKENS,
        bool(spec.chat_template),
    )


def tied_aliases(model: Any) -> frozenset[str]:
    """Names in ``model``'s state dict that share storage with an earlier name (tied embeddings)."""
    seen: set[tuple[int, int, tuple[int, ...]]] = set()
    aliases = set()
    for name, tensor in model.state_dict().items():
        identity = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if identity in seen:
            aliases.add(name)
        seen.add(identity)
    return frozenset(aliases)


def load_tokenizer(checkpoint: str, fallback: str | None = None) -> tuple[Any, str]:
    """The tokenizer of ``checkpoint``, else of ``fallback`` (the base), and where it came from."""
    from transformers import AutoTokenizer

    quiet_transformers()
    failures = []
    for source in dict.fromkeys(s for s in (checkpoint, fallback) if s is not None):
        try:
            return AutoTokenizer.from_pretrained(source), source
        except Exception as error:  # noqa: BLE001 (any loading failure becomes one line)
            failures.append(f"{source}: {first_line(error)[:160]}")
    raise CheckpointError(
        f"{checkpoint}: no tokenizer can be loaded ({'; '.join(failures)}); "
        "set processor_checkpoint to a model that has one"
    )


def vocabulary_size(model: Any) -> int:
    """How many token ids the model's input embedding has rows for."""
    return int(model.get_input_embeddings().weight.shape[0])


def check_tokenizer(tokenizer: Any, model: Any, checkpoint: str, source: str) -> None:
    """Refuse a tokenizer with ids the model has no embedding for, in one line."""
    size = vocabulary_size(model)
    if len(tokenizer) > size:
        raise CheckpointError(
            f"{checkpoint}: the tokenizer of {source} has {len(tokenizer)} tokens but the model's "
            f"vocabulary has {size}; they do not belong together"
        )


def load_task_model(
    checkpoint: str,
    trust_remote_code: bool = False,
    with_processor: bool = True,
    processor_checkpoint: str | None = None,
    base_checkpoint: str | None = None,
) -> TaskModel:
    """Load a causal language model and its tokenizer (``processor_checkpoint``'s when given,
    else the model's own, else the base's) from a folder or a hub id. Every tensor is
    backbone (merged); a tied alias (``lm_head`` sharing the embedding) is left out."""
    from transformers import AutoModelForCausalLM

    quiet_transformers()
    try:
        model = AutoModelForCausalLM.from_pretrained(checkpoint, trust_remote_code=trust_remote_code)
    except Exception as error:  # noqa: BLE001 (any loading failure becomes one line)
        raise CheckpointError(
            f"{checkpoint}: cannot load a causal language model ({first_line(error)[:200]})"
        ) from None
    tokenizer, source = None, None
    if with_processor:
        tokenizer, source = load_tokenizer(processor_checkpoint or checkpoint, base_checkpoint)
        check_tokenizer(tokenizer, model, checkpoint, source)
    aliases = tied_aliases(model)
    weights = {
        name: tensor.detach().clone() for name, tensor in model.state_dict().items() if name not in aliases
    }
    model.eval()  # type: ignore[no-untyped-call]
    return TaskModel(checkpoint, model, tokenizer, weights, frozenset(), source, aliases=aliases)


# --- tokenising a split ------------------------------------------------------------------


@dataclass(frozen=True)
class Encoder:
    """How prompts and their continuations become token ids with one tokenizer.

    A continuation (an answer, a choice) is encoded together with its prompt, and its ids
    are those after the prompt's, as lm-eval does: SentencePiece tokenizers encode ``4``
    alone as ``▁4`` but ``...=4`` with a plain ``4``. A tokenizer that appends its end
    token to every text has it removed from prompts (the end belongs after the answer)."""

    tokenizer: Any
    chat: bool = False

    @functools.cached_property
    def appends_end(self) -> bool:
        """Whether the tokenizer's special tokens end every text with its end-of-sequence token."""
        end = self.tokenizer.eos_token_id
        if end is None:
            return False
        with_special = self.tokenizer("a")["input_ids"]
        return (
            bool(with_special)
            and with_special[-1] == end
            and self.tokenizer("a", add_special_tokens=False)["input_ids"][-1:] != [end]
        )

    def ids(self, text: str, special: bool) -> list[int]:
        """``text``'s ids, with the tokenizer's special tokens when ``special`` (no end token)."""
        ids = [int(i) for i in self.tokenizer(text, add_special_tokens=special)["input_ids"]]
        if special and ids and self.appends_end and ids[-1] == self.tokenizer.eos_token_id:
            ids = ids[:-1]
        return ids

    def prompt(self, prompt: str) -> tuple[str, bool]:
        """The prompt's text as the model reads it (through the chat template when asked), and
        whether the tokenizer's special tokens are still to be added (a template writes its own)."""
        if not self.chat:
            return prompt, True
        text = self.tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
        )
        return str(text), False

    def split(self, prompt: str, continuation: str) -> tuple[list[int], list[int]]:
        """(prompt ids, continuation ids): the continuation encoded after the prompt."""
        text, special = self.prompt(prompt)
        context = self.ids(text, special)
        whole = self.ids(text + continuation, special)
        if len(whole) > len(context) and whole[: len(context)] == context:
            return context, whole[len(context) :]
        return context, self.ids(continuation, False)  # the prompt's last token merged with it


def _text_of(example: Mapping[str, Any], column: str, where: str) -> str:
    value = example[column]
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    raise DataError(f"{where}: column '{column}' holds {type(value).__name__}, not text")


def _rows_of(
    example: Mapping[str, Any], fmt: TextFormat, encoder: Encoder, where: str
) -> tuple[list[Row], int]:
    """The example as (list of (ids, roles) rows, label)."""
    if fmt.format == "text":
        ids = [int(i) for i in encoder.tokenizer(_text_of(example, fmt.columns[0], where))["input_ids"]]
        ids = ids[: fmt.max_length]
        return [(ids, [CONTEXT] * min(1, len(ids)) + [TARGET] * (len(ids) - 1))], 0
    prompt = _text_of(example, fmt.columns[0], where)
    if fmt.format == "exact_match":
        context, target = encoder.split(prompt, _text_of(example, fmt.columns[1], where))
        if len(target) > fmt.max_new_tokens:
            raise DataError(
                f"{where}: the answer has {len(target)} tokens, more than max_new_tokens {fmt.max_new_tokens}"
            )
        roles = [CONTEXT] * len(context) + [TARGET] * len(target)
        end = encoder.tokenizer.eos_token_id
        if end is not None:
            target, roles = [*target, int(end)], [*roles, END]
        rows = [(context + target, roles)]
        label = 0
    else:
        choices, label = example[fmt.columns[1]], example[fmt.columns[2]]
        if not isinstance(choices, Sequence) or isinstance(choices, str) or not choices:
            raise DataError(f"{where}: column '{fmt.columns[1]}' must hold a list of choices")
        if not isinstance(label, int) or not 0 <= label < len(choices):
            raise DataError(f"{where}: label {label!r} is not the index of one of its {len(choices)} choices")
        rows = []
        for choice in choices:
            context, target = encoder.split(prompt, str(choice))
            if not target:
                raise DataError(f"{where}: an empty choice")
            rows.append((context + target, [CONTEXT] * len(context) + [TARGET] * len(target)))
    longest = max(len(ids) for ids, _ in rows)
    if longest > fmt.max_length:
        raise DataError(f"{where}: {longest} tokens, more than max_length {fmt.max_length}")
    return rows, label


def check_chat_template(tokenizer: Any, asked: bool, checkpoint: str) -> None:
    """Refuse ``chat_template: true`` where the tokenizer has no template, in one line."""
    if asked and not getattr(tokenizer, "chat_template", None):
        raise ConfigError(f"{checkpoint}: chat_template is true but its tokenizer has no chat template")


def tokenizer_identity(tokenizer: Any) -> str:
    """A hash of everything about a tokenizer that changes the ids it produces."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    extra = json.dumps(
        [type(tokenizer).__name__, tokenizer.eos_token_id, getattr(tokenizer, "chat_template", None)],
        default=str,
    )
    return hashlib.sha256((text + extra).encode()).hexdigest()[:24]


def encoded_examples(
    dataset: Any, fmt: TextFormat, tokenizer: Any, name: str, vocabulary: int
) -> Iterator[tuple[list[Row], int]]:
    """Each example of ``dataset`` as (rows of ids and roles, label), checked, one at a time."""
    encoder = Encoder(tokenizer, fmt.chat_template)
    for index, example in enumerate(dataset):
        rows, label = _rows_of(example, fmt, encoder, f"{name}: row {index}")
        top = max(max(ids, default=0) for ids, _ in rows)
        if top >= vocabulary:
            raise DataError(
                f"{name}: row {index}: token id {top} is outside the model's vocabulary of {vocabulary}; "
                "the tokenizer does not match the model"
            )
        yield rows, label


@dataclass(frozen=True)
class SplitShape:
    """What padding a split's examples to one array needs: its examples, most rows, longest row."""

    count: int
    rows: int
    length: int


def split_shape(examples: Iterable[tuple[list[Row], int]], name: str) -> SplitShape:
    """The shape of a split from one pass over its encoded examples (nothing kept); refuses
    an empty split and one with nothing to score."""
    count = rows = length = 0
    scored = False
    for example, _ in examples:
        count += 1
        rows = max(rows, len(example))
        length = max([length, *(len(ids) for ids, _ in example)])
        scored = scored or any(role != CONTEXT for _, roles in example for role in roles)
    if count == 0:
        raise DataError(f"{name}: the split is empty")
    if not scored:
        raise DataError(f"{name}: no token to score (every text is empty or a single token)")
    return SplitShape(count, rows, length)


def _packed(examples: Sequence[list[Row]], rows: int, length: int) -> np.ndarray:
    """Examples as one (count, rows, 2, length) int32 array, padded with id 0 and role PAD."""
    array = np.zeros((len(examples), rows, 2, length), dtype=np.int32)
    for index, example in enumerate(examples):
        for row, (ids, roles) in enumerate(example):
            array[index, row, 0, : len(ids)] = ids
            array[index, row, 1, : len(roles)] = roles
    return array


def prepare(
    spec: DatasetSpec,
    task: TaskModel,
    cache_dir: str | Path | None = None,
    workers: int | None = None,
    log: Callable[[str], None] | None = None,
) -> cache.CachedSplit:
    """The task's split, tokenised with its tokenizer: from the cache, or built into it once.

    A missing column, an answer longer than ``max_new_tokens``, a prompt or choice longer
    than ``max_length`` or a token the model has no embedding for is an error before any
    evaluation."""
    del workers  # tokenising is fast; it runs in the process
    fmt = text_format(spec)
    if task.processor is None:
        raise ConfigError(f"{task.checkpoint}: a causal_lm task needs a tokenizer")
    check_chat_template(task.processor, fmt.chat_template, task.checkpoint)
    dataset = load_task_data(spec, fmt.columns)
    describe = {
        "dataset": dataset_label(spec),
        "split": spec.split_name,
        "format": fmt.format,
        "columns": list(fmt.columns),
        "max_length": fmt.max_length,
        "max_new_tokens": fmt.max_new_tokens,
        "chat_template": fmt.chat_template,
        "tokenizer": tokenizer_identity(task.processor),
        "encoding": ENCODING_VERSION,
    }
    key = cache.cache_key({"kind": KIND, "data": cache.dataset_identity(dataset), **describe})
    root = cache.cache_root(cache_dir)
    entry = cache.open_entry(root / key, key)
    if entry is not None:
        return entry
    say = log or (lambda _: None)
    say(f"tokenising {len(dataset)} examples of {describe['dataset']} ({spec.split_name}) into {root}")
    vocabulary = vocabulary_size(task.model)

    def examples() -> Iterator[tuple[list[Row], int]]:
        return encoded_examples(dataset, fmt, task.processor, spec.dataset_name, vocabulary)

    shape = split_shape(examples(), spec.dataset_name)  # a first pass: every example is checked

    def batches() -> Iterator[cache.Preprocessed]:  # a second: ENCODE_BATCH examples held at a time
        part: list[list[Row]] = []
        labels: list[int] = []
        for rows, label in examples():
            part.append(rows)
            labels.append(label)
            if len(part) == ENCODE_BATCH:
                yield cache.Preprocessed(_packed(part, shape.rows, shape.length), np.asarray(labels), 0)
                part, labels = [], []
        if part:
            yield cache.Preprocessed(_packed(part, shape.rows, shape.length), np.asarray(labels), 0)

    try:
        return cache.build_entry(root, key, shape.count, batches, describe)
    except (OSError, ValueError) as error:
        raise DataError(
            f"{spec.dataset_name}: cannot write the tokenised split into {root} ({first_line(error)[:200]})"
        ) from None


def dataset_label(spec: DatasetSpec) -> str:
    """A short name for a dataset: its folder or file name, or hub id."""
    path = Path(spec.dataset_name)
    return path.stem if path.is_file() else path.name if path.exists() else spec.dataset_name


# --- scoring -----------------------------------------------------------------------------


class TokenCounts:
    """Per-class counts of predictions against truths: macro precision, recall and F1 as
    scikit-learn computes them (classes seen in either; 0 where undefined), streamed."""

    def __init__(self, classes: int) -> None:
        self.hits = torch.zeros(classes, dtype=torch.int64)
        self.predicted = torch.zeros(classes, dtype=torch.int64)
        self.true = torch.zeros(classes, dtype=torch.int64)

    def add(self, predictions: torch.Tensor, truths: torch.Tensor) -> None:
        """One batch of predicted and true classes (flat, any device)."""
        predictions, truths = predictions.reshape(-1).cpu().long(), truths.reshape(-1).cpu().long()
        size = len(self.hits)
        self.predicted += torch.bincount(predictions, minlength=size)
        self.true += torch.bincount(truths, minlength=size)
        self.hits += torch.bincount(truths[predictions == truths], minlength=size)

    def macro(self) -> dict[str, float]:
        """Macro precision, recall and F1 in percent."""
        seen = (self.predicted > 0) | (self.true > 0)
        if not bool(seen.any()):
            return {"precision": 0.0, "recall": 0.0, "f1_score": 0.0}
        hits, predicted, true = (t[seen].double() for t in (self.hits, self.predicted, self.true))
        precision = torch.where(predicted > 0, hits / predicted.clamp_min(1), 0.0)
        recall = torch.where(true > 0, hits / true.clamp_min(1), 0.0)
        f1 = 2 * hits / (predicted + true)
        return {
            "precision": 100.0 * float(precision.mean()),
            "recall": 100.0 * float(recall.mean()),
            "f1_score": 100.0 * float(f1.mean()),
        }


@dataclass
class RowScores:
    """What one forward pass says of each row: summed log-likelihood and token count of its
    targets, whether greedy decoding reproduces them all, and the predicted and true target
    tokens (flat)."""

    log_likelihood: torch.Tensor
    targets: torch.Tensor
    all_correct: torch.Tensor
    predicted: torch.Tensor
    truth: torch.Tensor


def row_scores(
    logits: torch.Tensor, ids: torch.Tensor, roles: torch.Tensor, stops: torch.Tensor | None = None
) -> RowScores:
    """Score rows of (ids, roles) from the logits of the model on ``ids`` (rows, length, vocab).

    At an END position (the stop after an answer) greedy decoding is right when it picks any
    of ``stops`` (the tokenizer's end token and the model's other stop tokens, such as a
    chat model's end of turn); the likelihood is that of the stored end token."""
    following_roles = roles[:, 1:]
    target = (following_roles == TARGET) | (following_roles == END)
    following = ids[:, 1:].long()
    scored = logits[:, :-1][target].float()  # (targets, vocab): only where a target is predicted
    truth = following[target]
    predicted = scored.argmax(-1)
    token_ll = torch.log_softmax(scored, dim=-1).gather(-1, truth.unsqueeze(-1)).squeeze(-1)
    right = predicted == truth
    if stops is not None and len(stops):
        at_end = following_roles[target] == END
        right |= at_end & torch.isin(predicted, stops.to(predicted.device))
    owner = torch.nonzero(target)[:, 0]  # the row of each target
    count = len(ids)
    log_likelihood = torch.zeros(count, dtype=torch.float64, device=logits.device)
    log_likelihood.index_add_(0, owner, token_ll.double())
    targets = target.sum(1)
    wrong = torch.zeros(count, dtype=torch.int64, device=logits.device)
    wrong.index_add_(0, owner, (~right).long())
    return RowScores(log_likelihood, targets, (wrong == 0) & (targets > 0), predicted, truth)


def stop_tokens(task: TaskModel) -> torch.Tensor:
    """The ids that end greedy generation: the tokenizer's end token and the model's
    ``generation_config.eos_token_id`` (one id or several)."""
    found: set[int] = set()
    end = getattr(task.processor, "eos_token_id", None)
    if end is not None:
        found.add(int(end))
    configured = getattr(getattr(task.model, "generation_config", None), "eos_token_id", None)
    if isinstance(configured, int):
        found.add(configured)
    elif isinstance(configured, (list, tuple)):
        found.update(int(i) for i in configured)
    return torch.tensor(sorted(found), dtype=torch.long)


class TextTally:
    """A format's metrics gathered batch by batch as sums and counts."""

    def __init__(self, fmt: str, vocabulary: int, choices: int) -> None:
        self.format = fmt
        self.nll = 0.0
        self.tokens = 0
        self.examples = 0
        self.correct = 0
        self.token_correct = 0
        self.classes = TokenCounts(choices if fmt == "multiple_choice" else vocabulary)

    def add(self, scores: RowScores, labels: torch.Tensor, rows: int) -> None:
        """One batch: the row scores of ``len(labels)`` examples of ``rows`` rows each."""
        count = len(labels)
        self.examples += count
        if self.format == "multiple_choice":
            likelihood = scores.log_likelihood.reshape(count, rows).cpu()
            present = scores.targets.reshape(count, rows).cpu() > 0
            choice = likelihood.masked_fill(~present, -math.inf).argmax(1)
            self.correct += int((choice == labels).sum())
            self.classes.add(choice, labels)
            right = torch.arange(count) * rows + labels
            self.nll -= float(scores.log_likelihood.cpu()[right].sum())
            self.tokens += int(scores.targets.cpu()[right].sum())
            return
        self.nll -= float(scores.log_likelihood.sum())
        self.tokens += int(scores.targets.sum())
        self.correct += int(scores.all_correct.sum())
        self.token_correct += int((scores.predicted == scores.truth).sum())
        self.classes.add(scores.predicted, scores.truth)

    def metrics(self) -> dict[str, float]:
        """accuracy, precision, recall, f1_score (percent), loss (mean token NLL) and perplexity."""
        loss = self.nll / max(1, self.tokens)
        if self.format == "text":
            accuracy = 100.0 * self.token_correct / max(1, self.tokens)
        else:
            accuracy = 100.0 * self.correct / max(1, self.examples)
        return {
            "accuracy": accuracy,
            **self.classes.macro(),
            "loss": loss,
            "perplexity": math.exp(min(loss, 700.0)),
        }


def _logits(model: Any, parameters: Mapping[str, torch.Tensor] | None, ids: torch.Tensor) -> torch.Tensor:
    """The model's logits on right-padded ``ids`` (padding comes after every real token, so
    causal attention never sees it: no mask needed)."""
    if parameters is None:
        return model(input_ids=ids, use_cache=False).logits  # type: ignore[no-any-return]
    out = torch.func.functional_call(
        model, dict(parameters), args=(), kwargs={"input_ids": ids, "use_cache": False}
    )
    return out.logits  # type: ignore[no-any-return]


def _format_of(data: cache.CachedSplit) -> str:
    meta = json.loads((data.folder / cache.META).read_text(encoding="utf-8"))
    return str(meta["format"])


def score_text(
    logits_of: Callable[[torch.Tensor], torch.Tensor],
    data: cache.CachedSplit,
    vocabulary: int,
    device: torch.device,
    batch_size: int,
    autocast_dtype: str = "none",
    stops: torch.Tensor | None = None,
) -> dict[str, float]:
    """Every metric of ``logits_of`` (ids to logits) over a tokenised split, streamed
    (``stops``: the ids that end generation)."""
    rows, length = data.shape[0], data.shape[2]
    tally = TextTally(_format_of(data), vocabulary, rows)
    with torch.inference_mode():
        for values, labels in data.batches(batch_size):
            flat = values.reshape(-1, 2, length).to(device)
            ids, roles = flat[:, 0].long(), flat[:, 1]
            used = int((roles != PAD).sum(0).nonzero().max()) + 1 if bool((roles != PAD).any()) else 1
            ids, roles = ids[:, :used], roles[:, :used]  # this batch's longest row
            with autocast(device, autocast_dtype):
                logits = logits_of(ids)
            tally.add(row_scores(logits, ids, roles, stops), labels, rows)
    return tally.metrics()


def evaluate(
    task: TaskModel,
    backbone: Mapping[str, torch.Tensor] | None,
    data: cache.CachedSplit,
    device: torch.device,
    batch_size: int = 256,
    autocast_dtype: str = "none",
) -> dict[str, float]:
    """Every metric of the model with ``backbone`` (its own weights when None), streamed."""
    model = task.model.to(device).eval()
    parameters = None if backbone is None else as_parameters_of(model, backbone)
    return score_text(
        lambda ids: _logits(model, parameters, ids),
        data,
        vocabulary_size(model),
        device,
        batch_size,
        autocast_dtype,
        stop_tokens(task),
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
    """Every metric for each of B candidates (rows of ``flats``), one after another: a
    language model's activations are too large to vectorise candidates over."""
    return [evaluate(task, views(flat), data, device, batch_size, autocast_dtype) for flat in flats]


def logits_function(task: TaskModel, device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
    """Statistics (RegMean's Gram matrices, Fisher) are not computed for language models yet."""
    raise ConfigError(
        f"{task.checkpoint}: statistics (regmean, fisher) are not computed for causal_lm tasks yet"
    )
