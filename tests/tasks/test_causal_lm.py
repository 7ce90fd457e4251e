"""The causal-LM family: each format's metrics against a direct computation with
transformers, the streamed macro averages against scikit-learn, local data files, and
bad input named in one line before any evaluation."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from sklearn.metrics import precision_recall_fscore_support

from m3sb.errors import CheckpointError, ConfigError
from m3sb.tasks.causal_lm import TokenCounts, evaluate, load_task_model, prepare, row_scores
from m3sb.tasks.data import DataError, DatasetSpec
from m3sb.text_zoo import TextZooRecipe, _llama, build_tokenizer

CPU = torch.device("cpu")


def _save_model(folder: Path, seed: int = 0, vocabulary: int | None = None) -> Path:
    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    model = _llama(tokenizer, TextZooRecipe(hidden_size=32))
    if vocabulary is not None:
        model.resize_token_embeddings(vocabulary)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _save_model(tmp_path_factory.mktemp("lm") / "model")


def _texts(count: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    letters = list("abcdefgh 0123456789+=")
    return ["".join(rng.choice(letters, size=int(rng.integers(3, 20)))) for _ in range(count)]


def _direct_log_likelihood(
    model: Any, context: list[int], continuation: list[int]
) -> tuple[float, list[int]]:
    """Summed log-probability of ``continuation`` after ``context`` and the argmax predictions, unpadded."""
    ids = torch.tensor([context + continuation])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].double()
    logp = torch.log_softmax(logits, -1)
    start = len(context)
    total = sum(float(logp[start - 1 + i, token]) for i, token in enumerate(continuation))
    predicted = [int(logits[start - 1 + i].argmax()) for i in range(len(continuation))]
    return total, predicted


def test_text_loss_perplexity_and_token_accuracy_match_transformers(model_dir: Path, tmp_path: Path) -> None:
    texts = _texts(37, 0)
    data = _write_jsonl(tmp_path / "corpus.jsonl", [{"body": t} for t in texts])
    task = load_task_model(str(model_dir))
    spec = DatasetSpec(dataset_name=str(data), format="text", text_col="body")
    metrics = evaluate(task, None, prepare(spec, task, tmp_path / "cache"), CPU, batch_size=8)
    nll, tokens, hits, truths, guesses = 0.0, 0, 0, [], []
    for text in texts:
        ids = task.processor(text)["input_ids"]
        total, predicted = _direct_log_likelihood(task.model, ids[:1], ids[1:])
        nll -= total
        tokens += len(ids) - 1
        hits += sum(p == t for p, t in zip(predicted, ids[1:], strict=True))
        truths += ids[1:]
        guesses += predicted
    assert metrics["loss"] == pytest.approx(nll / tokens, rel=1e-5)
    assert metrics["perplexity"] == pytest.approx(math.exp(nll / tokens), rel=1e-5)
    assert metrics["accuracy"] == pytest.approx(100.0 * hits / tokens)
    precision, recall, f1, _ = precision_recall_fscore_support(
        truths, guesses, average="macro", zero_division=0
    )
    assert metrics["precision"] == pytest.approx(100 * precision)
    assert metrics["recall"] == pytest.approx(100 * recall)
    assert metrics["f1_score"] == pytest.approx(100 * f1)


def test_multiple_choice_picks_the_most_likely_choice_as_transformers_scores_it(
    model_dir: Path, tmp_path: Path
) -> None:
    rng = np.random.default_rng(1)
    rows = []
    for index in range(30):
        choices = _texts(int(rng.integers(2, 5)), 100 + index)
        rows.append({"question": f"q {index}=", "options": choices, "gold": int(rng.integers(len(choices)))})
    data = _write_jsonl(tmp_path / "test.jsonl", rows)
    task = load_task_model(str(model_dir))
    spec = DatasetSpec(
        dataset_name=str(tmp_path),
        format="multiple_choice",
        prompt_col="question",
        choices_col="options",
        label_col="gold",
    )
    assert data.parent == tmp_path  # a folder of files: test.jsonl is the split "test"
    metrics = evaluate(task, None, prepare(spec, task, tmp_path / "cache"), CPU, batch_size=4)
    picks, nll, tokens = [], 0.0, 0
    for row in rows:
        context = task.processor(row["question"])["input_ids"]
        scores = []
        for choice in row["options"]:
            continuation = task.processor(choice, add_special_tokens=False)["input_ids"]
            scores.append(_direct_log_likelihood(task.model, context, continuation)[0])
        picks.append(int(np.argmax(scores)))
        right = task.processor(row["options"][row["gold"]], add_special_tokens=False)["input_ids"]
        nll -= scores[row["gold"]]
        tokens += len(right)
    gold = [row["gold"] for row in rows]
    accuracy = 100.0 * np.mean(np.array(picks) == np.array(gold))
    assert metrics["accuracy"] == pytest.approx(accuracy)
    precision, recall, f1, _ = precision_recall_fscore_support(gold, picks, average="macro", zero_division=0)
    assert (metrics["precision"], metrics["recall"], metrics["f1_score"]) == pytest.approx(
        (100 * precision, 100 * recall, 100 * f1)
    )
    assert metrics["loss"] == pytest.approx(nll / tokens, rel=1e-5)


def test_exact_match_is_greedy_decoding_of_the_answer_then_end_of_sequence() -> None:
    # rows: "ab" right then EOS right; a wrong second token; right tokens but no EOS
    vocabulary, eos = 6, 2
    ids = torch.tensor([[1, 4, 5, 2], [1, 4, 5, 2], [1, 4, 5, 2]])
    roles = torch.tensor([[1, 2, 2, 2]] * 3)
    logits = torch.full((3, 4, vocabulary), -5.0)
    for row, predicted in enumerate(([4, 5, 2], [4, 3, 2], [4, 5, 0])):
        for position, token in enumerate(predicted):
            logits[row, position, token] = 5.0
    scores = row_scores(logits, ids, roles)
    assert scores.all_correct.tolist() == [True, False, False]
    assert scores.targets.tolist() == [3, 3, 3]
    expected = float(torch.log_softmax(logits[0, 0], -1)[4]) * 3
    assert float(scores.log_likelihood[0]) == pytest.approx(expected, abs=1e-6)  # float32 log-softmax
    assert eos == 2


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_streamed_macro_averages_equal_scikit_learn(seed: int) -> None:
    rng = np.random.default_rng(seed)
    truth, guess = rng.integers(0, 12, 500), rng.integers(0, 15, 500)
    counts = TokenCounts(20)
    for start in range(0, 500, 64):
        counts.add(torch.from_numpy(guess[start : start + 64]), torch.from_numpy(truth[start : start + 64]))
    precision, recall, f1, _ = precision_recall_fscore_support(truth, guess, average="macro", zero_division=0)
    macro = counts.macro()
    assert (macro["precision"], macro["recall"], macro["f1_score"]) == pytest.approx(
        (100 * precision, 100 * recall, 100 * f1)
    )


def test_bad_inputs_are_named_before_any_evaluation(model_dir: Path, tmp_path: Path) -> None:
    task = load_task_model(str(model_dir))
    data = _write_jsonl(tmp_path / "qa.jsonl", [{"prompt": "add 1+2=", "answer": "3" * 40}])
    cache_dir = tmp_path / "cache"
    with pytest.raises(DataError, match=r"row 0: the answer has 40 tokens, more than max_new_tokens 32"):
        prepare(DatasetSpec(dataset_name=str(data), format="exact_match"), task, cache_dir)
    with pytest.raises(DataError, match=r"no column 'question'; columns are prompt, answer"):
        prepare(
            DatasetSpec(dataset_name=str(data), format="exact_match", prompt_col="question"), task, cache_dir
        )
    choices = _write_jsonl(tmp_path / "mc.jsonl", [{"prompt": "x=", "choices": ["a", "b"], "label": 2}])
    with pytest.raises(DataError, match=r"label 2 is not the index of one of its 2 choices"):
        prepare(DatasetSpec(dataset_name=str(choices), format="multiple_choice"), task, cache_dir)
    notes = tmp_path / "notes.txt"
    notes.write_text("prompt,answer\n")
    with pytest.raises(DataError, match=r"notes.txt: not a dataset file"):
        prepare(DatasetSpec(dataset_name=str(notes), format="exact_match"), task, cache_dir)
    small = _save_model(tmp_path / "small", vocabulary=20)
    size = len(build_tokenizer())
    with pytest.raises(CheckpointError, match=rf"has {size} tokens but the model's vocabulary has 20"):
        load_task_model(str(small))


def test_chat_template_wraps_each_prompt_before_its_answer(tmp_path: Path) -> None:
    folder = _save_model(tmp_path / "chat")
    tokenizer = build_tokenizer()
    tokenizer.chat_template = (
        "{% for m in messages %}q {{ m['content'] }}{% endfor %}{% if add_generation_prompt %} a {% endif %}"
    )
    tokenizer.save_pretrained(folder)
    data = _write_jsonl(tmp_path / "qa.jsonl", [{"prompt": "rev ab=", "answer": "ba"}])
    task = load_task_model(str(folder))
    plain = prepare(DatasetSpec(dataset_name=str(data), format="exact_match"), task, tmp_path / "c")
    chat = prepare(
        DatasetSpec(dataset_name=str(data), format="exact_match", chat_template=True), task, tmp_path / "c"
    )
    assert plain.folder != chat.folder  # another cache entry
    ids, roles = chat.values()[0, 0]
    context = ids[roles == 1].tolist()
    assert context == tokenizer("q rev ab= a ", add_special_tokens=False)["input_ids"]
    assert ids[roles >= 2].tolist() == [  # the answer, then its end (role 3)
        *tokenizer("ba", add_special_tokens=False)["input_ids"],
        tokenizer.eos_token_id,
    ]
    plain_ids, plain_roles = plain.values()[0, 0]
    assert plain_ids[plain_roles == 1].tolist() == tokenizer("rev ab=")["input_ids"]


def _sentencepiece_tokenizer() -> Any:
    """A Llama-style (Metaspace, SentencePiece-like) tokenizer: ``4`` alone encodes as ``▁4``."""
    from transformers import LlamaTokenizer

    characters = [c for c in "0123456789+=abcdefghijklmnopqrstuvwxyz"]
    vocabulary = {"<unk>": 0, "<s>": 1, "</s>": 2, "▁": 3}
    for character in characters:
        vocabulary.setdefault(character, len(vocabulary))
        vocabulary.setdefault("▁" + character, len(vocabulary))
    return LlamaTokenizer(vocab=vocabulary, merges=[("▁", c) for c in characters])


def test_a_continuation_is_encoded_after_its_prompt_as_lm_eval_does() -> None:
    from m3sb.tasks.causal_lm import Encoder

    tokenizer = _sentencepiece_tokenizer()
    assert tokenizer.convert_ids_to_tokens(tokenizer("4", add_special_tokens=False)["input_ids"]) == ["▁4"]
    context, answer = Encoder(tokenizer).split("add 2+2=", "4")
    assert context + answer == tokenizer("add 2+2=4")["input_ids"]
    assert tokenizer.convert_ids_to_tokens(answer) == ["4"]


def test_an_end_token_the_tokenizer_appends_is_kept_out_of_the_prompt(tmp_path: Path) -> None:
    from tokenizers import processors

    folder = _save_model(tmp_path / "m")
    tokenizer = build_tokenizer()
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", bos), ("</s>", eos)]
    )
    tokenizer.save_pretrained(folder)
    task = load_task_model(str(folder))
    data = _write_jsonl(tmp_path / "qa.jsonl", [{"prompt": "add 1+2=", "answer": 3}])
    split = prepare(DatasetSpec(dataset_name=str(data), format="exact_match"), task, tmp_path / "c")
    ids, roles = split.values()[0, 0]
    tokens = task.processor.convert_ids_to_tokens(ids[roles != 0].tolist())
    assert tokens == ["<s>", "a", "d", "d", " ", "1", "+", "2", "=", "3", "</s>"]
    assert roles[roles != 0].tolist() == [1] * 9 + [2, 3]


def test_any_stop_token_ends_an_exact_answer() -> None:
    ids = torch.tensor([[1, 4, 2], [1, 4, 2]])
    roles = torch.tensor([[1, 2, 3], [1, 2, 3]])
    logits = torch.full((2, 3, 8), -5.0)
    logits[:, 0, 4] = 5.0
    logits[0, 1, 7] = 5.0  # another stop token (a chat model's end of turn)
    logits[1, 1, 6] = 5.0  # not a stop token
    scores = row_scores(logits, ids, roles, torch.tensor([2, 7]))
    assert scores.all_correct.tolist() == [True, False]
    assert row_scores(logits, ids, roles).all_correct.tolist() == [False, False]


def test_chat_template_without_a_template_and_nothing_to_score_are_refused(
    model_dir: Path, tmp_path: Path
) -> None:
    task = load_task_model(str(model_dir))
    data = _write_jsonl(tmp_path / "qa.jsonl", [{"prompt": "x=", "answer": "y"}])
    with pytest.raises(ConfigError, match=r"chat_template is true but its tokenizer has no chat template"):
        prepare(DatasetSpec(dataset_name=str(data), format="exact_match", chat_template=True), task, tmp_path)
    empty = _write_jsonl(tmp_path / "empty.jsonl", [{"text": ""}, {"text": ""}])
    with pytest.raises(DataError, match=r"no token to score"):
        prepare(DatasetSpec(dataset_name=str(empty), format="text"), task, tmp_path)
    missing = _write_jsonl(tmp_path / "null.jsonl", [{"prompt": "x=", "answer": None}])
    with pytest.raises(DataError, match=r"row 0: column 'answer' holds NoneType, not text"):
        prepare(DatasetSpec(dataset_name=str(missing), format="exact_match"), task, tmp_path)


def test_a_split_is_tokenised_a_batch_at_a_time_into_the_same_entry(
    model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import m3sb.tasks.causal_lm as causal_lm_module

    data = _write_jsonl(tmp_path / "corpus.jsonl", [{"text": t} for t in _texts(23, 5)])
    task = load_task_model(str(model_dir))
    spec = DatasetSpec(dataset_name=str(data), format="text")
    whole = prepare(spec, task, tmp_path / "whole").values()
    packed: list[int] = []
    real_packed = causal_lm_module._packed

    def counting(examples: Any, rows: int, length: int) -> Any:
        packed.append(len(examples))
        return real_packed(examples, rows, length)

    monkeypatch.setattr(causal_lm_module, "ENCODE_BATCH", 5)
    monkeypatch.setattr(causal_lm_module, "_packed", counting)
    batched = prepare(spec, task, tmp_path / "batched").values()
    assert packed == [5, 5, 5, 5, 3]
    assert torch.equal(batched, whole)
