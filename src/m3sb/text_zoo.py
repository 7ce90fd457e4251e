"""The text zoo: a tiny Llama with its own character tokenizer, pre-trained on a mixed
synthetic corpus and fine-tuned on four skills whose answers are exact.

Skills: ``add`` (``add 12+7=`` -> ``19``), ``reverse`` (``rev cabd=`` -> ``dbac``),
``sort`` (``sort 4132=`` -> ``1234``) and ``count`` (``count b in abcbd=`` -> ``2``). The
base learns the characters and the prompt shapes (copying, free text) but none of the
skills, so it answers them badly; each fine-tune learns its own skill. Everything is
saved as ordinary Hugging Face artefacts (``save_pretrained`` model and tokenizer,
``datasets`` splits with ``save_to_disk``), so what runs on the zoo runs on hub models.
Each skill's dataset has ``prompt`` and ``answer`` (exact match) and ``choices`` and
``label`` (multiple choice: the answer and three wrong ones); ``corpus`` holds ``text``
(loss and perplexity).
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

from m3sb.zoo import built_manifest

TEXT_ZOO_VERSION = 1
CHARACTERS = "0123456789abcdefghijklmnopqrstuvwxyz +="
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")
SPLIT_SIZES = {"train": 1500, "validation": 150, "test": 150}


@dataclass(frozen=True)
class TextZooRecipe:
    """Everything that determines the text zoo; a change rebuilds it."""

    seed: int = 0
    hidden_size: int = 64
    layers: int = 2
    pretrain_steps: int = 600
    finetune_steps: int = 300
    batch_size: int = 64
    version: int = TEXT_ZOO_VERSION


Example = tuple[str, str]  # prompt, answer


def _letters(rng: np.random.Generator, alphabet: str, low: int, high: int) -> str:
    return "".join(rng.choice(list(alphabet), size=int(rng.integers(low, high + 1))))


def _add(rng: np.random.Generator) -> Example:
    a, b = int(rng.integers(0, 50)), int(rng.integers(0, 50))
    return f"add {a}+{b}=", str(a + b)


def _reverse(rng: np.random.Generator) -> Example:
    word = _letters(rng, "abcdefgh", 3, 5)
    return f"rev {word}=", word[::-1]


def _sort(rng: np.random.Generator) -> Example:
    digits = _letters(rng, "0123456789", 3, 5)
    return f"sort {digits}=", "".join(sorted(digits))


def _count(rng: np.random.Generator) -> Example:
    word = _letters(rng, "abcd", 4, 7)
    letter = str(rng.choice(list("abcd")))
    return f"count {letter} in {word}=", str(word.count(letter))


SKILLS: dict[str, Callable[[np.random.Generator], Example]] = {
    "add": _add,
    "reverse": _reverse,
    "sort": _sort,
    "count": _count,
}


def _copy(rng: np.random.Generator) -> str:
    word = _letters(rng, "abcdefghij0123456789", 2, 6)
    return f"copy {word}={word}"


def _free_text(rng: np.random.Generator) -> str:
    words = [
        _letters(rng, "abcdefghijklmnopqrstuvwxyz0123456789", 1, 5) for _ in range(int(rng.integers(2, 5)))
    ]
    return " ".join(words)


def _skill_shaped(rng: np.random.Generator) -> str:
    """A skill's prompt with a random answer of the right kind: the base sees every prompt
    shape, and learns that an answer follows, but not which."""
    name = str(rng.choice(list(SKILLS)))
    prompt, answer = SKILLS[name](rng)
    alphabet = "abcdefgh" if name == "reverse" else "0123456789"
    return prompt + _letters(rng, alphabet, max(1, len(answer) - 1), len(answer) + 1)


def corpus_line(rng: np.random.Generator) -> str:
    """One line of the pre-training corpus: copying, free text or a skill-shaped line."""
    kind = rng.integers(0, 3)
    return _copy(rng) if kind == 0 else _free_text(rng) if kind == 1 else _skill_shaped(rng)


def build_tokenizer() -> Any:
    """A character-level ``PreTrainedTokenizerFast``: one token per character of
    :data:`CHARACTERS`, ``<s>`` before every text, ``</s>`` ending answers."""
    from tokenizers import Tokenizer, decoders, models, processors
    from transformers import PreTrainedTokenizerFast

    vocabulary = {token: index for index, token in enumerate([*SPECIAL_TOKENS, *CHARACTERS])}
    backend = Tokenizer(models.BPE(vocab=vocabulary, merges=[], unk_token="<unk>"))
    backend.decoder = decoders.Fuse()
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", vocabulary["<s>"])]
    )
    return PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


def _llama(tokenizer: Any, recipe: TextZooRecipe) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=recipe.hidden_size,
        intermediate_size=3 * recipe.hidden_size,
        num_hidden_layers=recipe.layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaForCausalLM(config)


def _batch(sequences: Sequence[tuple[list[int], int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids and labels (-100 before each sequence's scored start and on padding)."""
    length = max(len(ids) for ids, _ in sequences)
    ids = torch.full((len(sequences), length), pad, dtype=torch.long)
    labels = torch.full((len(sequences), length), -100, dtype=torch.long)
    for row, (tokens, start) in enumerate(sequences):
        ids[row, : len(tokens)] = torch.tensor(tokens)
        labels[row, start : len(tokens)] = torch.tensor(tokens[start:])
    return ids, labels


def _train(
    model: Any,
    sequences: Sequence[tuple[list[int], int]],
    steps: int,
    lr: float,
    recipe: TextZooRecipe,
    seed: int,
    pad: int,
) -> None:
    """AdamW with a one-cycle schedule on random batches of (ids, first scored position)."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1)
    model.train()
    for _ in range(steps):
        chosen = torch.randint(len(sequences), (recipe.batch_size,), generator=generator)
        ids, labels = _batch([sequences[int(i)] for i in chosen], pad)
        loss = model(input_ids=ids, attention_mask=(ids != pad).long(), labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    model.eval()


def _answer_sequences(tokenizer: Any, examples: Sequence[Example]) -> list[tuple[list[int], int]]:
    """Prompt and answer ids (with ``</s>``), scored from the answer on."""
    sequences = []
    for prompt, answer in examples:
        context = tokenizer(prompt)["input_ids"]
        target = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        sequences.append((context + target, len(context)))
    return sequences


@torch.inference_mode()
def exact_match(model: Any, tokenizer: Any, examples: Sequence[Example]) -> float:
    """Percent of prompts whose greedy continuation is the answer then ``</s>`` (teacher-forced argmax)."""
    sequences = _answer_sequences(tokenizer, examples)
    ids, labels = _batch(sequences, tokenizer.pad_token_id)
    predicted = model(input_ids=ids).logits[:, :-1].argmax(-1)
    target = labels[:, 1:]
    wrong = ((predicted != target) & (target != -100)).any(1)
    return 100.0 * float((~wrong).float().mean())


def _wrong_answers(rng: np.random.Generator, name: str, answer: str, count: int) -> list[str]:
    """``count`` distinct plausible answers other than ``answer``."""
    wrong: list[str] = []
    while len(wrong) < count:
        if name in ("add", "count"):
            candidate = str(max(0, int(answer) + int(rng.integers(-3, 4))))
        else:
            candidate = "".join(rng.permutation(list(answer)))
            if candidate == answer:
                candidate = _letters(
                    rng, "abcdefgh" if name == "reverse" else "0123456789", len(answer), len(answer)
                )
        if candidate != answer and candidate not in wrong:
            wrong.append(candidate)
    return wrong


def _skill_splits(name: str, rng: np.random.Generator) -> dict[str, list[dict[str, Any]]]:
    """Train, validation and test rows of a skill, every prompt distinct (no test prompt is
    seen in training)."""
    needed = sum(SPLIT_SIZES.values())
    examples: dict[str, str] = {}
    for _ in range(100 * needed):
        prompt, answer = SKILLS[name](rng)
        examples.setdefault(prompt, answer)
        if len(examples) == needed:
            break
    rows = []
    for prompt, answer in examples.items():
        choices = [answer, *_wrong_answers(rng, name, answer, 3)]
        order = rng.permutation(len(choices))
        rows.append(
            {
                "prompt": prompt,
                "answer": answer,
                "choices": [choices[i] for i in order],
                "label": int(np.flatnonzero(order == 0)[0]),
            }
        )
    splits, start = {}, 0
    for split, size in SPLIT_SIZES.items():
        splits[split] = rows[start : start + size]
        start += size
    return splits


def _save_splits(folder: Path, splits: dict[str, list[dict[str, Any]]]) -> None:
    from datasets import Dataset, DatasetDict

    DatasetDict({split: Dataset.from_list(rows) for split, rows in splits.items()}).save_to_disk(str(folder))


def build_text_zoo(
    folder: str | Path, recipe: TextZooRecipe | None = None, log: Callable[[str], None] | None = None
) -> Path:
    """Build the text zoo in ``folder`` (or return at once if it is already there); returns zoo.json."""
    import datasets
    from transformers.utils import logging

    logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    logging.set_verbosity_error()  # type: ignore[no-untyped-call]
    datasets.disable_progress_bars()
    recipe = recipe or TextZooRecipe()
    folder = Path(folder).expanduser().absolute()
    existing = built_manifest(folder, recipe)
    if existing is not None:
        return existing
    manifest = folder / "zoo.json"
    say = log or (lambda _: None)
    started = time.perf_counter()
    torch.manual_seed(recipe.seed)
    rng = np.random.default_rng(recipe.seed)
    tokenizer = build_tokenizer()
    pad = tokenizer.pad_token_id

    lines = [corpus_line(rng) for _ in range(6000)]
    corpus = {"train": lines[:5000], "validation": lines[5000:5500], "test": lines[5500:]}
    _save_splits(folder / "datasets" / "corpus", {k: [{"text": t} for t in v] for k, v in corpus.items()})
    skills = {
        name: _skill_splits(name, np.random.default_rng(recipe.seed + i)) for i, name in enumerate(SKILLS, 1)
    }

    base = _llama(tokenizer, recipe)
    pretraining = [(tokenizer(line)["input_ids"], 1) for line in corpus["train"]]
    _train(base, pretraining, recipe.pretrain_steps, 3e-3, recipe, recipe.seed, pad)
    base.save_pretrained(folder / "base", safe_serialization=True)
    tokenizer.save_pretrained(folder / "base")
    base_scores = {
        name: exact_match(base, tokenizer, [(r["prompt"], r["answer"]) for r in rows["test"]])
        for name, rows in skills.items()
    }
    say("base: exact match " + ", ".join(f"{n} {s:.1f}%" for n, s in base_scores.items()))

    entries = []
    for offset, (name, rows) in enumerate(skills.items(), start=1):
        _save_splits(folder / "datasets" / name, rows)
        model = _llama(tokenizer, recipe)
        model.load_state_dict(base.state_dict())
        train = _answer_sequences(tokenizer, [(r["prompt"], r["answer"]) for r in rows["train"]])
        _train(model, train, recipe.finetune_steps, 2e-3, recipe, recipe.seed + offset, pad)
        score = exact_match(model, tokenizer, [(r["prompt"], r["answer"]) for r in rows["test"]])
        say(f"{name}: fine-tuned to {score:.1f}% exact match (base {base_scores[name]:.1f}%)")
        model.save_pretrained(folder / "models" / name, safe_serialization=True)
        tokenizer.save_pretrained(folder / "models" / name)
        entries.append(
            {
                "name": name,
                "checkpoint": str(folder / "models" / name),
                "dataset": {
                    "dataset_name": str(folder / "datasets" / name),
                    "split": "test",
                    "kind": "causal_lm",
                    "format": "exact_match",
                },
                "finetuned_exact_match": round(score, 2),
                "base_exact_match": round(base_scores[name], 2),
            }
        )
    document = {
        "base_model_checkpoint": str(folder / "base"),
        "corpus": str(folder / "datasets" / "corpus"),
        "tasks": entries,
        "recipe": asdict(recipe),
        "build_seconds": round(time.perf_counter() - started, 1),
    }
    manifest.write_text(json.dumps(document, indent=2) + "\n")
    return manifest
