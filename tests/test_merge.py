"""The merge engine on tiny real Hugging Face models."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from m3sb.checkpoints import open_checkpoint
from m3sb.config import parse_merge_config
from m3sb.merge import build_plan, merge_to_folder
from m3sb.toy import Family


def _merge(recipe: dict[str, Any], out: Path, **options: Any) -> dict[str, torch.Tensor]:
    merge_to_folder(parse_merge_config(recipe), out, **options)
    checkpoint = open_checkpoint(out)
    return {name: checkpoint.load(name) for name in checkpoint.tensors}


def _state(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path / "model.safetensors")


@pytest.mark.parametrize("method", ["barycenter", "pairwise_slerp", "linear", "karcher"])
def test_one_hot_weights_reproduce_the_model_exactly(method: str, family: Family, tmp_path: Path) -> None:
    models = [
        {"model": str(path), "parameters": {"weight": 1.0 if i == 1 else 0.0}}
        for i, path in enumerate(family.models)
    ]
    merged = _merge({"merge_method": method, "models": models}, tmp_path / "out")
    expected = _state(family.models[1])
    assert merged.keys() == expected.keys()
    assert all(torch.equal(merged[name], expected[name]) for name in expected)


def test_output_is_a_loadable_hugging_face_model_with_card_and_config(family: Family, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    recipe = {
        "merge_method": "linear",
        "models": [{"model": str(p)} for p in family.models],
        "out_dtype": "bfloat16",
    }
    merged = _merge(recipe, tmp_path / "out", out_shard_size=20_000)
    out = tmp_path / "out"
    assert (out / "model.safetensors.index.json").is_file()
    assert len(list(out.glob("model-*-of-*.safetensors"))) > 1
    config = json.loads((out / "config.json").read_text())
    assert config.get("dtype", config.get("torch_dtype")) == "bfloat16"
    card = (out / "README.md").read_text()
    assert "linear" in card and str(family.models[0]) in card
    model = AutoModelForCausalLM.from_pretrained(out)
    loaded = model.state_dict()
    inputs = [_state(p) for p in family.models]
    for name, tensor in merged.items():
        assert tensor.dtype == torch.bfloat16
        expected = (sum(state[name] for state in inputs) / 3).to(torch.bfloat16)
        assert torch.equal(tensor, expected)
        assert torch.equal(loaded[name], tensor)


def test_base_listed_among_models_is_the_base_as_in_mergekit(family: Family, tmp_path: Path) -> None:
    sparse = [{"model": str(p), "parameters": {"density": 0.5}} for p in family.models]
    recipe = {"merge_method": "ties", "base_model": str(family.base), "models": sparse}
    plain = _merge(recipe, tmp_path / "plain")
    listed = _merge(recipe | {"models": [{"model": str(family.base)}, *sparse]}, tmp_path / "listed")
    assert all(torch.equal(plain[name], listed[name]) for name in plain)


def test_slerp_starts_at_the_base_model(family: Family, tmp_path: Path) -> None:
    recipe = {
        "merge_method": "slerp",
        "base_model": str(family.base),
        "models": [{"model": str(family.models[0])}, {"model": str(family.base)}],
        "parameters": {"t": 0.0},
    }
    merged = _merge(recipe, tmp_path / "out")
    base = _state(family.base)
    assert all(torch.equal(merged[name], base[name]) for name in base)


def test_gradient_parameters_vary_over_layers(family: Family, tmp_path: Path) -> None:
    recipe = {
        "merge_method": "slerp",
        "models": [{"model": str(family.models[0])}, {"model": str(family.models[1])}],
        "parameters": {"t": [0.0, 1.0]},  # the toy family has two layers: layer 0 -> t=0, layer 1 -> t=1
    }
    merged = _merge(recipe, tmp_path / "out")
    first, second = _state(family.models[0]), _state(family.models[1])
    name0, name1 = "model.layers.0.mlp.up_proj.weight", "model.layers.1.mlp.up_proj.weight"
    assert torch.equal(merged[name0], first[name0]) and torch.equal(merged[name1], second[name1])


def test_non_float_tensors_are_copied_and_mixed_dtypes_merge(tmp_path: Path) -> None:
    a = {"w": torch.tensor([1.0, 2.0], dtype=torch.float16), "ids": torch.tensor([1, 2, 3])}
    b = {"w": torch.tensor([3.0, 4.0], dtype=torch.float32), "ids": torch.tensor([7, 8, 9])}
    save_file(a, tmp_path / "a.safetensors")
    save_file(b, tmp_path / "b.safetensors")
    recipe = {
        "merge_method": "linear",
        "models": [{"model": str(tmp_path / n)} for n in ("a.safetensors", "b.safetensors")],
    }
    merged = _merge(recipe, tmp_path / "out")
    assert merged["w"].dtype == torch.float32 and merged["w"].tolist() == [2.0, 3.0]  # float16 + float32
    assert torch.equal(merged["ids"], a["ids"])


def test_same_config_and_seed_give_bit_identical_files(family: Family, tmp_path: Path) -> None:
    recipe = {
        "merge_method": "dare_ties",
        "base_model": str(family.base),
        "models": [{"model": str(p), "parameters": {"density": 0.4}} for p in family.models],
        "parameters": {"random_seed": 11},
    }
    _merge(recipe, tmp_path / "one")
    _merge(recipe, tmp_path / "two")
    assert (tmp_path / "one" / "model.safetensors").read_bytes() == (
        tmp_path / "two" / "model.safetensors"
    ).read_bytes()


def test_plan_checks_everything_before_reading_tensors(family: Family, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(family.models[0], broken)
    state = _state(broken)
    state["model.layers.1.mlp.up_proj.weight"] = torch.zeros(3, 3)
    save_file(state, broken / "model.safetensors")
    recipe = {"merge_method": "linear", "models": [{"model": str(family.models[1])}, {"model": str(broken)}]}
    with pytest.raises(
        Exception, match=r"tensor 'model\.layers\.1\.mlp\.up_proj\.weight' has shape \[64, 32\]"
    ):
        build_plan(parse_merge_config(recipe))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("method", ["barycenter", "ties", "linear"])
@pytest.mark.parametrize("memory", [None, 3_000])  # 3,000 bytes: blocks of rows, read ahead
def test_merging_on_the_gpu_matches_the_cpu(
    method: str, memory: int | None, family: Family, tmp_path: Path
) -> None:
    recipe = {
        "merge_method": method,
        "base_model": str(family.base),
        "models": [{"model": str(p), "parameters": {"weight": 1.0}} for p in family.models],
    }
    if method == "barycenter":
        recipe["parameters"] = {"space": "task_vectors"}
    on_cpu = _merge(recipe, tmp_path / "cpu", memory=memory)
    on_gpu = _merge(recipe, tmp_path / "gpu", device="cuda", memory=memory)
    for name, tensor in on_cpu.items():
        assert torch.allclose(on_gpu[name], tensor, rtol=1e-5, atol=1e-6), name


def test_a_model_filter_that_does_not_match_falls_back_to_the_top_level_value(family: Family) -> None:
    recipe = {
        "merge_method": "ties",
        "base_model": str(family.base),
        "models": [
            {"model": str(family.models[0]), "parameters": {"density": [{"filter": "mlp", "value": 0.3}]}},
            {"model": str(family.models[1])},
        ],
        "parameters": {"density": 0.5},
    }
    jobs = {job.name: job for job in build_plan(parse_merge_config(recipe)).jobs}
    assert jobs["model.layers.0.mlp.up_proj.weight"].params["density"] == [0.3, 0.5]
    assert jobs["model.layers.0.self_attn.q_proj.weight"].params["density"] == [0.5, 0.5]


def test_numbers_written_in_scientific_notation_are_numbers(family: Family) -> None:
    recipe = {"merge_method": "barycenter", "models": [{"model": str(p)} for p in family.models]}
    plan = build_plan(parse_merge_config(recipe | {"parameters": {"tol": "1e-8"}}))
    assert plan.jobs[0].params["tol"] == 1e-8


def test_output_config_keeps_the_dtype_key_convention_of_the_copied_config(
    family: Family, tmp_path: Path
) -> None:
    recipe = {
        "merge_method": "ties",
        "base_model": str(family.base),
        "models": [{"model": str(p), "parameters": {"density": 0.5}} for p in family.models],
        "out_dtype": "bfloat16",
    }
    _merge(recipe, tmp_path / "out")
    source = json.loads((family.base / "config.json").read_text())
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    keys = [key for key in ("dtype", "torch_dtype") if key in source] or ["dtype"]
    assert all(written[key] == "bfloat16" for key in keys)
    assert {k for k in ("dtype", "torch_dtype") if k in written} == set(keys)


def test_mergekit_parameters_that_change_nothing_are_accepted(family: Family, tmp_path: Path) -> None:
    from m3sb.errors import ConfigError

    models = [str(path) for path in family.models]
    stock = {
        "merge_method": "model_stock",
        "base_model": str(family.base),
        "models": [{"model": m, "parameters": {"weight": 0.5}} for m in models],
    }
    plan = build_plan(parse_merge_config(stock))
    assert plan.method.name == "model_stock"
    slerp = {
        "merge_method": "slerp",
        "base_model": str(family.base),
        "models": [{"model": models[0]}],
        "parameters": {"t": 0.3, "normalize": True},
    }
    assert build_plan(parse_merge_config(slerp)).jobs[0].params["t"] == 0.3
    ties = {
        "merge_method": "ties",
        "base_model": str(family.base),
        "models": [{"model": m, "parameters": {"density": 0.5}} for m in models],
        "parameters": {"int8_mask": "yes"},
    }
    with pytest.raises(ConfigError, match="parameter 'int8_mask' must be true or false"):
        build_plan(parse_merge_config(ties))


def test_what_a_method_ignores_is_noted_with_the_reason(family: Family) -> None:
    models = [str(path) for path in family.models]
    recipe = {
        "merge_method": "linear",
        "models": [{"model": models[0], "parameters": {"normalize": False}}, {"model": models[1]}],
        "parameters": {"lambda": 0.5},
    }
    notes = build_plan(parse_merge_config(recipe)).notes
    assert (
        "model '" + models[0] + "': parameter 'normalize' applies to the whole merge, not to one model; "
        "ignored, as mergekit does" in notes
    )
    assert (
        "parameter 'lambda' has no effect on linear without task vectors; ignored, as mergekit does" in notes
    )
    sliced = {
        "merge_method": "linear",
        "slices": [
            {
                "sources": [{"model": m, "layer_range": [0, 2]} for m in models[:2]],
                "parameters": {"space": "task_vectors"},
            }
        ],
    }
    from m3sb.errors import ConfigError

    with pytest.raises(ConfigError, match=r"slices\[0\]: space applies to the whole merge"):
        build_plan(parse_merge_config(sliced))


def test_gpt_neox_output_head_comes_from_the_last_slice() -> None:
    from m3sb.slices import is_embedding

    assert is_embedding("gpt_neox.embed_in.weight") and is_embedding("model.embed_tokens.weight")
    assert not is_embedding("embed_out.weight") and not is_embedding("lm_head.weight")
    assert not is_embedding("model.norm.weight")


def test_a_sliced_multimodal_config_gets_its_text_towers_layer_count(family: Family, tmp_path: Path) -> None:
    source = tmp_path / "nested"
    shutil.copytree(family.models[0], source)
    config = json.loads((source / "config.json").read_text())
    layers = config.pop("num_hidden_layers")
    (source / "config.json").write_text(json.dumps(config | {"text_config": {"num_hidden_layers": layers}}))
    recipe = {
        "merge_method": "passthrough",
        "slices": [
            {"sources": [{"model": str(source), "layer_range": [0, 2]}]},
            {"sources": [{"model": str(source), "layer_range": [1, 2]}]},
        ],
    }
    out = merge_to_folder(parse_merge_config(recipe), tmp_path / "out").out_dir
    written = json.loads((out / "config.json").read_text())
    assert written["text_config"]["num_hidden_layers"] == 3 and "num_hidden_layers" not in written
