"""Output tokenizers and vocabulary alignment: models with different vocabularies merge token by
token, as mergekit merges them (compared by token, since mergekit orders a union's new tokens
by hash), with ``tokens`` settings, padding and chat templates."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from m3sb.checkpoints import open_checkpoint
from m3sb.config import parse_merge_config
from m3sb.errors import CheckpointError, ConfigError
from m3sb.merge import build_plan, merge_to_folder
from m3sb.toy import Family, make_family, save_toy_tokenizer

WORDS = [f"w{i}" for i in range(62)]
VOCABULARY_TENSORS = ("model.embed_tokens.weight", "lm_head.weight")


def _retokenize(
    folder: Path, tokens: list[str], special: tuple[str, ...], rows: dict[str, int], seed: int
) -> None:
    """Give the model in ``folder`` a new tokenizer; each token's embedding rows come from the old
    row ``rows[token]`` (new random rows for tokens not in ``rows``)."""
    state = load_file(folder / "model.safetensors")
    generator = torch.Generator().manual_seed(seed)
    order = [*special, *tokens]
    for name in VOCABULARY_TENSORS:
        old = state[name]
        fresh = torch.randn((len(order), old.shape[1]), generator=generator) * float(old.std())
        state[name] = torch.stack([old[rows[t]] if t in rows else fresh[i] for i, t in enumerate(order)])
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config | {"vocab_size": len(order)}))
    save_toy_tokenizer(folder, tokens, special)


@pytest.fixture(scope="module")
def vocab_family(tmp_path_factory: pytest.TempPathFactory) -> Family:
    """A base and three fine-tunes: A shares the base's 64 tokens, B adds three (one an added
    special token), C has the base's tokens in another order with one replaced."""
    family = make_family(tmp_path_factory.mktemp("vocab"), n_models=3, seed=7)
    special = ("<unk>", "<s>")
    same = {token: i for i, token in enumerate([*special, *WORDS])}
    for folder in (family.base, family.models[0]):
        save_toy_tokenizer(folder, WORDS, special)
    _retokenize(family.models[1], [*WORDS, "newB1", "newB2"], (*special, "<|im_start|>"), same, seed=1)
    shuffled = [*WORDS[::-1][:-1], "onlyC"]
    _retokenize(family.models[2], shuffled, special, same, seed=2)
    return family


def _rows(folder: Path) -> tuple[dict[str, int], dict[str, torch.Tensor]]:
    from transformers import AutoTokenizer

    vocabulary = AutoTokenizer.from_pretrained(str(folder)).get_vocab()
    checkpoint = open_checkpoint(folder)
    return vocabulary, {name: checkpoint.load(name) for name in checkpoint.tensors}


def _same_by_token(ours: Path, theirs: Path) -> None:
    our_vocab, our_tensors = _rows(ours)
    their_vocab, their_tensors = _rows(theirs)
    assert set(our_vocab) == set(their_vocab)
    assert set(our_tensors) == set(their_tensors)
    for name, tensor in their_tensors.items():
        mine = our_tensors[name]
        assert mine.shape == tensor.shape, name
        if name in VOCABULARY_TENSORS:
            for token, row in their_vocab.items():
                torch.testing.assert_close(mine[our_vocab[token]], tensor[row], rtol=1e-6, atol=1e-7)
            if mine.shape[0] > len(our_vocab):  # padding rows: the mean embedding
                torch.testing.assert_close(
                    mine[len(our_vocab) :], tensor[len(their_vocab) :], rtol=1e-6, atol=1e-7
                )
        else:
            torch.testing.assert_close(mine, tensor, rtol=1e-6, atol=1e-7)
    for folder in (ours, theirs):
        assert (
            json.loads((folder / "config.json").read_text())["vocab_size"]
            == our_tensors[VOCABULARY_TENSORS[0]].shape[0]
        )


def _recipes(family: Family) -> dict[str, dict[str, Any]]:
    a, b, c = (str(path) for path in family.models)
    base = str(family.base)
    return {
        "union_linear": {
            "merge_method": "linear",
            "tokenizer_source": "union",
            "models": [
                {"model": m, "parameters": {"weight": w}}
                for m, w in zip((a, b, c), (0.5, 0.3, 0.2), strict=True)
            ],
        },
        "base_vocabulary_task_arithmetic": {
            "merge_method": "task_arithmetic",
            "base_model": base,
            "tokenizer_source": "base",
            "models": [{"model": m, "parameters": {"weight": 0.5}} for m in (a, b, c)],
        },
        "tokens_and_padding_ties": {
            "merge_method": "ties",
            "base_model": base,
            "tokenizer": {
                "source": "union",
                "pad_to_multiple_of": 16,
                "tokens": {
                    "newB1": {"source": {"kind": "zero"}},
                    "w3": {"source": c, "force": True},
                    "extra": {"source": {"kind": "model_token", "model": a, "token": "w5"}},
                },
            },
            "models": [{"model": m, "parameters": {"weight": 1.0, "density": 0.5}} for m in (a, b, c)],
        },
        "one_models_vocabulary": {
            "merge_method": "linear",
            "tokenizer_source": b,
            "models": [{"model": m, "parameters": {"weight": 1.0}} for m in (a, b)],
        },
    }


@pytest.mark.slow
@pytest.mark.parametrize(
    "name",
    ["union_linear", "base_vocabulary_task_arithmetic", "tokens_and_padding_ties", "one_models_vocabulary"],
)
def test_models_with_different_vocabularies_merge_as_mergekit_merges_them(
    name: str, vocab_family: Family, tmp_path: Path
) -> None:
    mergekit_config = pytest.importorskip("mergekit.config")
    mergekit_merge = pytest.importorskip("mergekit.merge")
    recipe = _recipes(vocab_family)[name] | {"dtype": "float32"}
    theirs = tmp_path / "mergekit"
    mergekit_merge.run_merge(
        mergekit_config.MergeConfiguration.model_validate(recipe),
        str(theirs),
        options=mergekit_merge.MergeOptions(quiet=True, write_model_card=False),
    )
    ours = merge_to_folder(parse_merge_config(recipe), tmp_path / "m3sb").out_dir
    _same_by_token(ours, theirs)


def test_union_orders_tokens_base_first_then_recipe_order(vocab_family: Family, tmp_path: Path) -> None:
    plan = build_plan(parse_merge_config(_recipes(vocab_family)["union_linear"]))
    assert plan.vocabulary is not None
    tokens = list(plan.vocabulary.tokens)
    assert tokens[:64] == ["<unk>", "<s>", *WORDS]
    assert set(tokens[64:]) == {"newB1", "newB2", "onlyC", "<|im_start|>"}
    assert tokens.index("newB1") < tokens.index("onlyC")  # model B before model C
    jobs = {job.name: job for job in plan.jobs}
    assert (
        jobs["model.embed_tokens.weight"].shape == (68, 32) and jobs["model.embed_tokens.weight"].vocabulary
    )
    assert not jobs["model.norm.weight"].vocabulary


def test_settings_fill_tokens_as_they_say(vocab_family: Family, tmp_path: Path) -> None:
    a, b, c = (str(path) for path in vocab_family.models)
    recipe = {
        "merge_method": "linear",  # the plain mean shows what each input's row became
        "tokenizer": {
            "pad_to_multiple_of": 16,
            "tokens": {
                "newB1": {"source": {"kind": "zero"}},
                "w3": {"source": c, "force": True},
                "extra": {"source": {"kind": "model_token", "model": a, "token": "w5"}},
            },
        },
        "models": [{"model": m} for m in (a, b, c)],
    }
    vocabulary, tensors = _rows(merge_to_folder(parse_merge_config(recipe), tmp_path / "out").out_dir)
    merged = tensors["model.embed_tokens.weight"]
    rows = {}
    for name, folder in zip("abc", vocab_family.models, strict=True):
        own_vocabulary, own = _rows(folder)
        rows[name] = {token: own["model.embed_tokens.weight"][row] for token, row in own_vocabulary.items()}
    assert len(vocabulary) == 69 and merged.shape == (80, 32)  # 64 + newB1, newB2, <|im_start|>, onlyC, extra

    def close(token: str, expected: torch.Tensor) -> None:
        torch.testing.assert_close(merged[vocabulary[token]], expected, rtol=1e-5, atol=1e-6)

    close("newB1", rows["b"]["newB1"] / 3)  # B keeps its row, A and C take zeros
    close("w3", rows["c"]["w3"])  # forced: every input takes C's row
    close("extra", rows["a"]["w5"])  # another token of A
    close("onlyC", rows["c"]["onlyC"])  # the only model that has it
    close("w0", (rows["a"]["w0"] + rows["b"]["w0"]) / 2)  # C lacks it, no base_model: the mean of A and B
    close("w7", (rows["a"]["w7"] + rows["b"]["w7"] + rows["c"]["w7"]) / 3)  # found by token in C's order
    torch.testing.assert_close(merged[69:], merged[:69].mean(dim=0).expand(11, 32), rtol=1e-5, atol=1e-6)


def test_chat_templates_render_as_mergekits(vocab_family: Family, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    recipe = _recipes(vocab_family)["union_linear"] | {"chat_template": "chatml"}
    out = merge_to_folder(parse_merge_config(recipe), tmp_path / "out").out_dir
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert (
        rendered
        == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nyo<|im_end|>\n<|im_start|>assistant\n"
    )
    jinja = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    plain = {
        "merge_method": "linear",
        "models": [{"model": str(vocab_family.models[0])}],
        "chat_template": jinja,
    }
    written = merge_to_folder(parse_merge_config(plain), tmp_path / "plain").out_dir
    assert AutoTokenizer.from_pretrained(str(written)).chat_template == jinja
    with pytest.raises(ConfigError, match="chat_template 'chatgpt' is neither auto, a built-in name"):
        build_plan(parse_merge_config(plain | {"chat_template": "chatgpt"}))


def test_templates_render_like_mergekits_bundled_ones() -> None:
    chat_templates = pytest.importorskip("mergekit._data.chat_templates")
    import importlib.resources

    from transformers.utils.chat_template_utils import _compile_jinja_template

    from m3sb.vocab import chat_template_text

    conversations = [
        [
            {"role": "user", "content": " hi "},
            {"role": "assistant", "content": "hello "},
            {"role": "user", "content": "?"},
        ],
        [
            {"role": "system", "content": " sys "},
            {"role": "user", "content": "q"},
            {"role": "assistant", "content": "a"},
        ],
    ]
    for name in ("alpaca", "chatml", "llama3", "mistral"):  # mergekit's exaone renders stray indentation
        theirs = _compile_jinja_template(
            importlib.resources.files(chat_templates).joinpath(f"{name}.jinja").read_text()
        )
        ours = _compile_jinja_template(str(chat_template_text(name, [])))
        for messages in conversations:
            for prompt in (False, True):
                settings = {
                    "messages": messages,
                    "add_generation_prompt": prompt,
                    "bos_token": "<s>",
                    "eos_token": "</s>",
                }
                assert ours.render(**settings) == theirs.render(**settings), name


def test_vocabulary_mistakes_are_named(vocab_family: Family, tmp_path: Path) -> None:
    a, b = (str(path) for path in vocab_family.models[:2])
    different = {"merge_method": "linear", "models": [{"model": a}, {"model": b}]}
    with pytest.raises(
        Exception, match=r"shape \[64, 32\] .* but \[67, 32\] .*the vocabularies differ: set tokenizer_source"
    ):
        build_plan(parse_merge_config(different))
    nobody = different | {"tokenizer": {"tokens": {"ghost": {}}}}
    with pytest.raises(
        ConfigError, match=r"tokenizer.tokens\['ghost'\]: no input model has this token; give it a source"
    ):
        build_plan(parse_merge_config(nobody))
    lacking = different | {"tokenizer": {"tokens": {"newB1": {"source": a}}}}
    with pytest.raises(
        ConfigError, match=r"tokenizer.tokens\['newB1'\]: its source .*finetune-0 has no such token"
    ):
        build_plan(parse_merge_config(lacking))
    outsider = different | {"tokenizer": {"tokens": {"newB1": {"source": str(vocab_family.models[2])}}}}
    with pytest.raises(ConfigError, match=r"source '.*finetune-2' is not one of the recipe's models"):
        build_plan(parse_merge_config(outsider))
    both = different | {"tokenizer_source": "union", "tokenizer": {"source": "base"}}
    with pytest.raises(ConfigError, match="give tokenizer_source or a tokenizer section, not both"):
        parse_merge_config(both)
    bare = make_family(tmp_path / "bare", n_models=1, seed=9, vocab=70)
    with pytest.raises(CheckpointError, match=r"no tokenizer files, and its 70 embedding rows differ"):
        build_plan(
            parse_merge_config(
                {
                    "merge_method": "linear",
                    "tokenizer_source": "base",
                    "models": [{"model": a}, {"model": str(bare.models[0])}],
                }
            )
        )


def test_a_slice_of_the_base_alone_is_realigned_too(vocab_family: Family, tmp_path: Path) -> None:
    base, b = str(vocab_family.base), str(vocab_family.models[1])
    recipe = {
        "merge_method": "task_arithmetic",
        "base_model": base,
        "tokenizer_source": "union",
        "slices": [
            {"sources": [{"model": base, "layer_range": [0, 1]}]},
            {"sources": [{"model": base, "layer_range": [1, 2]}, {"model": b, "layer_range": [1, 2]}]},
        ],
    }
    vocabulary, tensors = _rows(merge_to_folder(parse_merge_config(recipe), tmp_path / "out").out_dir)
    assert tensors["model.embed_tokens.weight"].shape == (len(vocabulary), 32) == (67, 32)
    base_rows = _rows(vocab_family.base)[1]["model.embed_tokens.weight"]
    torch.testing.assert_close(tensors["model.embed_tokens.weight"][vocabulary["w9"]], base_rows[2 + 9])


def test_a_token_id_past_its_models_rows_is_refused_before_merging(vocab_family: Family) -> None:
    a, b = (str(path) for path in vocab_family.models[:2])
    recipe = {
        "merge_method": "linear",
        "models": [{"model": a}, {"model": b}],
        "tokenizer": {"tokens": {"<tool>": {"source": {"kind": "model_token", "model": a, "token_id": 64}}}},
    }
    with pytest.raises(
        ConfigError, match=r"tokenizer\.tokens\['<tool>'\]: token_id 64 is past the 64 rows of"
    ):
        build_plan(parse_merge_config(recipe))
