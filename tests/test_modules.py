"""mergekit's ``modules`` recipes on multi-tower models: same tensors and config as mergekit
0.1.5 on tiny Mistral 3 and T5 stand-ins, each module's parameters where they belong, and
one-line errors for modules a model does not have or a recipe leaves out."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from m3sb.checkpoints import open_checkpoint
from m3sb.cli import app
from m3sb.config import parse_merge_config
from m3sb.errors import ConfigError
from m3sb.merge import build_plan, merge_to_folder
from m3sb.modules import ARCHITECTURE_MODULES, module_of, unclaimed
from m3sb.stages import map_models
from m3sb.toy import Family

runner = CliRunner()


def _fine_tunes(base: Path, count: int = 2) -> tuple[Path, ...]:
    """Copies of a saved model with Gaussian noise scaled to each tensor's spread."""
    made = []
    state = load_file(base / "model.safetensors")
    for k in range(1, count + 1):
        folder = base.parent / f"{base.name}_ft{k}"
        shutil.copytree(base, folder, dirs_exist_ok=True)
        generator = torch.Generator().manual_seed(k)
        noisy = {
            name: tensor + 0.05 * tensor.std() * torch.randn(tensor.shape, generator=generator)
            for name, tensor in state.items()
        }
        save_file(noisy, folder / "model.safetensors", metadata={"format": "pt"})
        made.append(folder)
    return tuple(made)


def _save(model: Any, folder: Path) -> Family:
    from transformers.utils import logging

    logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    model.save_pretrained(folder)
    return Family(folder, _fine_tunes(folder))


@pytest.fixture(scope="module")
def mistral3(tmp_path_factory: pytest.TempPathFactory) -> Family:
    """A tiny Mistral 3 (Pixtral vision tower, projector, Mistral text decoder) and two fine-tunes."""
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    torch.manual_seed(0)
    text = {"model_type": "mistral", "vocab_size": 64, "hidden_size": 16, "intermediate_size": 32}
    text |= {"num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 8}
    vision = {"model_type": "pixtral", "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2}
    vision |= {"num_attention_heads": 2, "head_dim": 8, "image_size": 32, "patch_size": 16}
    config = Mistral3Config(
        text_config=text, vision_config=vision, image_token_index=63, spatial_merge_size=1
    )
    return _save(Mistral3ForConditionalGeneration(config), tmp_path_factory.mktemp("mistral3") / "base")


@pytest.fixture(scope="module")
def t5(tmp_path_factory: pytest.TempPathFactory) -> Family:
    """A tiny gated T5 (encoder, decoder, shared embeddings and an untied head) and two fine-tunes."""
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    config = T5Config(
        vocab_size=64,
        d_model=16,
        d_kv=8,
        d_ff=32,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=2,
        feed_forward_proj="gated-gelu",
        tie_word_embeddings=False,
    )
    return _save(T5ForConditionalGeneration(config), tmp_path_factory.mktemp("t5") / "base")


def _mistral3_recipe(family: Family) -> dict[str, Any]:
    a, b = (str(path) for path in family.models)
    return {
        "merge_method": "linear",
        "parameters": {"weight": 0.6},
        "modules": {
            "text_decoder": {
                "models": [
                    {"model": a, "parameters": {"weight": [0.2, 0.8]}},
                    {"model": b},
                ],
                # no value for tensors outside the mlp: they fall through to the top level's 0.6
                "parameters": {"weight": [{"filter": "mlp", "value": 0.1}]},
            },
            "vision_tower": {
                "slices": [
                    {"sources": [{"model": a, "layer_range": [0, 2]}, {"model": b, "layer_range": [0, 2]}]},
                    {
                        "sources": [{"model": b, "layer_range": [1, 2]}, {"model": a, "layer_range": [1, 2]}],
                        "parameters": {"weight": 0.5},
                    },
                ],
                "parameters": {"weight": 0.3},
            },
            "multi_modal_projector": {"models": [{"model": a}, {"model": b, "parameters": {"weight": 0.9}}]},
        },
    }


def _t5_recipe(family: Family) -> dict[str, Any]:
    a, b = (str(path) for path in family.models)
    base = str(family.base)
    return {
        "merge_method": "ties",
        "base_model": base,
        "parameters": {"density": 0.5},
        "modules": {
            "encoder": {
                "models": [
                    {"model": a, "parameters": {"weight": 0.7}},
                    {"model": b, "parameters": {"weight": 0.3}},
                ]
            },
            "decoder": {
                "slices": [
                    {
                        "sources": [
                            {"model": base, "layer_range": [0, 2]},
                            {"model": a, "layer_range": [0, 2], "parameters": {"weight": 1.0}},
                            {"model": b, "layer_range": [0, 2], "parameters": {"weight": [0.0, 1.0]}},
                        ]
                    },
                    {
                        "sources": [
                            {"model": base, "layer_range": [1, 2]},
                            {"model": b, "layer_range": [1, 2], "parameters": {"weight": 1.0}},
                        ]
                    },
                ],
                "parameters": {"density": 0.8},
            },
            "shared": {"models": [{"model": a}, {"model": b}], "parameters": {"weight": 0.5}},
        },
    }


def _max_relative_error(ours: Path, theirs: Path) -> float:
    a, b = open_checkpoint(ours), open_checkpoint(theirs)
    assert set(a.tensors) == set(b.tensors)
    return max(
        float((a.load(name).double() - b.load(name).double()).norm() / b.load(name).double().norm())
        for name in a.tensors
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    ("family_name", "layer_keys"),
    [
        ("mistral3", (("text_config", "num_hidden_layers"), ("vision_config", "num_hidden_layers"))),
        ("t5", (("num_layers",), ("num_decoder_layers",))),
    ],
)
def test_modules_match_mergekit(
    family_name: str, layer_keys: tuple[tuple[str, ...], ...], request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    mergekit_config = pytest.importorskip("mergekit.config")
    mergekit_merge = pytest.importorskip("mergekit.merge")
    family = request.getfixturevalue(family_name)
    recipe = {"mistral3": _mistral3_recipe, "t5": _t5_recipe}[family_name](family) | {"dtype": "float32"}
    theirs = tmp_path / "mergekit"
    mergekit_merge.run_merge(
        mergekit_config.MergeConfiguration.model_validate(recipe),
        str(theirs),
        options=mergekit_merge.MergeOptions(quiet=True, copy_tokenizer=False, write_model_card=False),
    )
    ours = merge_to_folder(parse_merge_config(recipe), tmp_path / "m3sb").out_dir
    assert _max_relative_error(ours, theirs) <= 1e-6

    def counts(folder: Path) -> list[object]:
        config = json.loads((folder / "config.json").read_text())
        values = []
        for path in layer_keys:
            value = config
            for part in path:
                value = value[part]
            values.append(value)
        return values

    assert counts(ours) == counts(theirs) == [2, 3]  # the sliced module gained a repeated layer


def test_each_module_takes_its_own_parameters(mistral3: Family, tmp_path: Path) -> None:
    a, b = (open_checkpoint(path) for path in mistral3.models)
    ours = open_checkpoint(merge_to_folder(parse_merge_config(_mistral3_recipe(mistral3)), tmp_path).out_dir)

    def expected(name: str, weights: tuple[float, float], source: str | None = None) -> torch.Tensor:
        source = source or name
        return (weights[0] * a.load(source) + weights[1] * b.load(source)) / sum(weights)

    text = "language_model.model.layers.1.self_attn.q_proj.weight"
    torch.testing.assert_close(ours.load(text), expected(text, (0.8, 0.6)))  # gradient end, top level
    mlp = "language_model.model.layers.0.mlp.up_proj.weight"
    torch.testing.assert_close(ours.load(mlp), expected(mlp, (0.2, 0.1)))  # gradient start, module filter
    projector = "multi_modal_projector.linear_1.weight"
    torch.testing.assert_close(ours.load(projector), expected(projector, (0.6, 0.9)))
    vision = "vision_tower.transformer.layers.{}.attention.q_proj.weight"
    torch.testing.assert_close(ours.load(vision.format(0)), expected("", (0.3, 0.3), vision.format(0)))
    # output layer 2 is the second slice's (b, a) layer 1 at weight 0.5 each
    torch.testing.assert_close(ours.load(vision.format(2)), expected("", (0.5, 0.5), vision.format(1)))
    assert vision.format(3) not in ours.tensors


def _synthetic(folder: Path, names: list[str], architecture: str, seed: int) -> Path:
    """A checkpoint of random 2x2 tensors under the given names, with a config naming its class."""
    folder.mkdir(parents=True)
    generator = torch.Generator().manual_seed(seed)
    save_file({name: torch.randn(2, 2, generator=generator) for name in names}, folder / "model.safetensors")
    config = {"architectures": [architecture], "text_config": {"num_hidden_layers": 1}}
    (folder / "config.json").write_text(json.dumps(config | {"vision_config": {"depth": 1}}))
    return folder


QWEN2_VL_NAMES = [
    "model.embed_tokens.weight",
    "model.layers.0.mlp.up_proj.weight",
    "model.norm.weight",
    "lm_head.weight",
    "visual.patch_embed.proj.weight",
    "visual.blocks.0.attn.qkv.weight",
    "visual.merger.ln_q.weight",
    "visual.merger.mlp.0.weight",
]


def test_module_of_takes_the_longest_prefix() -> None:
    modules = ARCHITECTURE_MODULES["Qwen2VLForConditionalGeneration"]
    owners = [module_of(name, modules) for name in QWEN2_VL_NAMES]
    assert owners == ["text_decoder"] * 4 + ["vision_tower"] * 2 + ["multi_modal_projector"] * 2
    assert unclaimed(["visual.merger.x", "proj.weight", "lm_head.weight"], modules) == ["proj.weight"]


def test_modules_of_an_architecture_without_prefixes(tmp_path: Path) -> None:
    architecture = "Qwen2VLForConditionalGeneration"
    a = _synthetic(tmp_path / "a", QWEN2_VL_NAMES, architecture, 1)
    b = _synthetic(tmp_path / "b", QWEN2_VL_NAMES, architecture, 2)
    weights = {"text_decoder": (0.25, 0.75), "vision_tower": (0.9, 0.1), "multi_modal_projector": (0.5, 0.5)}
    recipe = {
        "merge_method": "linear",
        "modules": {
            module: {"models": [{"model": str(a), "parameters": {"weight": wa}}, {"model": str(b)}]}
            | {"parameters": {"weight": wb}}
            for module, (wa, wb) in weights.items()
        },
    }
    ours = open_checkpoint(merge_to_folder(parse_merge_config(recipe), tmp_path / "out").out_dir)
    first, second = open_checkpoint(a), open_checkpoint(b)
    modules = ARCHITECTURE_MODULES[architecture]
    for name in QWEN2_VL_NAMES:
        wa, wb = weights[str(module_of(name, modules))]
        torch.testing.assert_close(ours.load(name), wa * first.load(name) + wb * second.load(name))


def _cli_error(recipe: dict[str, Any], tmp_path: Path) -> str:
    path = tmp_path / "recipe.yml"
    path.write_text(json.dumps(recipe))
    result = runner.invoke(app, ["merge", str(path), str(tmp_path / "out")])
    assert result.exit_code == 1
    assert not (tmp_path / "out").exists()
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    return lines[0]


def test_a_misspelt_module_is_named_with_the_modules_it_could_be(mistral3: Family, tmp_path: Path) -> None:
    recipe = _mistral3_recipe(mistral3)
    recipe["modules"]["vison_tower"] = recipe["modules"].pop("vision_tower")
    message = _cli_error(recipe, tmp_path)
    assert "modules.vison_tower: not a module of Mistral3ForConditionalGeneration" in message
    assert "(did you mean 'vision_tower'?)" in message


def test_a_module_left_out_is_refused(mistral3: Family, tmp_path: Path) -> None:
    recipe = _mistral3_recipe(mistral3)
    del recipe["modules"]["multi_modal_projector"]
    message = _cli_error(recipe, tmp_path)
    assert "module 'multi_modal_projector' is not in the recipe" in message


def test_modules_of_a_model_without_known_modules_are_refused(family: Family, tmp_path: Path) -> None:
    recipe = {
        "merge_method": "linear",
        "modules": {"text_decoder": {"models": [{"model": str(family.base)}]}},
    }
    message = _cli_error(recipe, tmp_path)
    assert "is a LlamaForCausalLM; m3sb knows the modules of Gemma3ForConditionalGeneration" in message


def test_a_module_slice_is_checked_against_the_module_depth(mistral3: Family) -> None:
    recipe = _mistral3_recipe(mistral3)
    recipe["modules"]["vision_tower"]["slices"][0]["sources"][0]["layer_range"] = [0, 3]
    with pytest.raises(
        ConfigError, match=r"modules\.vision_tower: slices\[0\]\.sources\[0\]: .*past the 2 layers"
    ):
        build_plan(parse_merge_config(recipe))


def test_module_parameters_are_checked_like_any_level(mistral3: Family) -> None:
    recipe = _mistral3_recipe(mistral3)
    recipe["modules"]["vision_tower"]["parameters"] = {"wieght": 0.3}
    plan = build_plan(parse_merge_config(recipe))
    assert any(note.startswith("modules.vision_tower: parameter 'wieght'") for note in plan.notes)
    with pytest.raises(ConfigError, match=r"modules\.vision_tower: unknown parameter 'wieght'"):
        build_plan(parse_merge_config(recipe), strict=True)
    recipe["modules"]["vision_tower"]["parameters"] = {"space": "task_vectors"}
    with pytest.raises(ConfigError, match=r"modules\.vision_tower: space applies to the whole merge"):
        build_plan(parse_merge_config(recipe))


def test_stage_references_inside_modules_are_found() -> None:
    document = {
        "merge_method": "linear",
        "modules": {
            "encoder": {"models": [{"model": "first"}, {"model": "x"}]},
            "decoder": {
                "slices": [{"sources": [{"model": "first", "layer_range": [0, 1]}], "base_model": "y"}]
            },
        },
    }
    map_models(document, str.upper)
    assert document["modules"]["encoder"]["models"] == [{"model": "FIRST"}, {"model": "X"}]
    assert document["modules"]["decoder"]["slices"][0]["sources"][0]["model"] == "FIRST"
    assert document["modules"]["decoder"]["slices"][0]["base_model"] == "Y"
