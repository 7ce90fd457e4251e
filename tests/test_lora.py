"""LoRA inputs (``model+adapter``): the adapter merged on the fly equals PEFT's own merge and
mergekit's; adapters that do not fit are refused in one line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from m3sb.checkpoints import open_checkpoint
from m3sb.config import parse_merge_config
from m3sb.errors import CheckpointError
from m3sb.merge import merge_to_folder
from m3sb.toy import Family, make_family, save_toy_adapter

peft = pytest.importorskip("peft")


def _peft_merged(model_folder: Path, adapter: Path) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_folder)
    merged = peft.PeftModel.from_pretrained(model, adapter).merge_and_unload()
    return {name: tensor.detach() for name, tensor in merged.state_dict().items()}


SETTINGS = {
    "plain": {},
    "rslora_with_patterns": {
        "use_rslora": True,
        "target_modules": ["q_proj", "v_proj", "down_proj"],
        "rank_pattern": {"down_proj": 2},
        "alpha_pattern": {"v_proj": 3},
    },
    "embeddings_and_a_saved_head": {
        "target_modules": ["embed_tokens", "o_proj"],
        "modules_to_save": ["lm_head"],
    },
}


@pytest.mark.parametrize("kind", list(SETTINGS))
def test_adapter_applied_on_the_fly_equals_peft_merge_and_unload(
    kind: str, family: Family, tmp_path: Path
) -> None:
    adapter = save_toy_adapter(family.models[0], tmp_path / "adapter", seed=1, **SETTINGS[kind])
    ours = open_checkpoint(f"{family.models[0]}+{adapter}")
    reference = _peft_merged(family.models[0], adapter)
    plain = open_checkpoint(family.models[0])
    changed = 0
    for name in plain.tensors:
        if name not in reference:
            continue  # tied or derived buffers
        torch.testing.assert_close(ours.load(name), reference[name], rtol=1e-6, atol=1e-7)
        changed += not torch.equal(plain.load(name), reference[name])
    assert changed >= 2  # the adapter moved some tensors, and m3sb moved the same ones


@pytest.mark.slow
def test_a_lora_input_merges_as_mergekit_merges_it(family: Family, tmp_path: Path) -> None:
    mergekit_config = pytest.importorskip("mergekit.config")
    mergekit_merge = pytest.importorskip("mergekit.merge")
    adapter = save_toy_adapter(family.models[0], tmp_path / "adapter", seed=2)
    recipe = {
        "merge_method": "task_arithmetic",
        "base_model": str(family.base),
        "dtype": "float32",
        "models": [
            {"model": f"{family.models[0]}+{adapter}", "parameters": {"weight": 0.6}},
            {"model": str(family.models[1]), "parameters": {"weight": 0.4}},
        ],
    }
    theirs = tmp_path / "mergekit"
    mergekit_merge.run_merge(
        mergekit_config.MergeConfiguration.model_validate(recipe),
        str(theirs),
        options=mergekit_merge.MergeOptions(
            quiet=True, copy_tokenizer=False, write_model_card=False, lora_merge_cache=str(tmp_path / "cache")
        ),
    )
    ours = merge_to_folder(parse_merge_config(recipe), tmp_path / "m3sb").out_dir
    a, b = open_checkpoint(ours), open_checkpoint(theirs)
    assert set(a.tensors) == set(b.tensors)
    for name in a.tensors:
        x, y = a.load(name).double(), b.load(name).double()
        assert float((x - y).norm() / y.norm().clamp_min(1e-30)) < 1e-6, name


def test_adapters_that_do_not_fit_are_refused_in_one_line(family: Family, tmp_path: Path) -> None:
    other = make_family(tmp_path / "wide", n_models=1, seed=3, hidden=48)
    foreign = save_toy_adapter(other.models[0], tmp_path / "foreign", seed=4)
    with pytest.raises(
        CheckpointError, match=r"has shape \[48, 48\] but .* tensor is \[32, 32\]; is the adapter for another"
    ):
        open_checkpoint(f"{family.models[0]}+{foreign}")
    dora = save_toy_adapter(family.models[0], tmp_path / "dora", seed=5, use_dora=True)
    with pytest.raises(CheckpointError, match=r"a DoRA adapter \(use_dora\)"):
        open_checkpoint(f"{family.models[0]}+{dora}")
    renamed = tmp_path / "renamed"
    renamed.mkdir()
    plain = save_toy_adapter(family.models[0], tmp_path / "plain", seed=6)
    (renamed / "adapter_config.json").write_text((plain / "adapter_config.json").read_text())
    from safetensors.torch import load_file, save_file

    state = load_file(plain / "adapter_model.safetensors")
    save_file(
        {k.replace("q_proj", "qq_proj"): v for k, v in state.items()}, renamed / "adapter_model.safetensors"
    )
    with pytest.raises(CheckpointError, match=r"adapts '.*qq_proj.weight', which .* does not have"):
        open_checkpoint(f"{family.models[0]}+{renamed}")
    with pytest.raises(CheckpointError, match="no such LoRA adapter"):
        open_checkpoint(f"{family.models[0]}+{tmp_path / 'missing'}")
    config = json.loads((plain / "adapter_config.json").read_text()) | {"peft_type": "IA3"}
    (renamed / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(
        CheckpointError, match=r"a IA3 adapter \(peft_type\); only LoRA adapters can be merged"
    ):
        open_checkpoint(f"{family.models[0]}+{renamed}")


def _small_adapter(folder: Path, alpha: int = 8) -> Path:
    from safetensors.torch import save_file

    folder.mkdir(exist_ok=True)
    (folder / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": alpha})
    )
    prefix = "base_model.model.model.layers.0.self_attn.q_proj"
    save_file(
        {f"{prefix}.lora_A.weight": torch.ones(4, 32), f"{prefix}.lora_B.weight": torch.ones(32, 4) * 0.01},
        folder / "adapter_model.safetensors",
    )
    return folder


def test_adapter_files_are_inputs_for_fingerprints_and_the_output_check(
    family: Family, tmp_path: Path
) -> None:
    from m3sb.stages import _input_signature

    adapter = _small_adapter(tmp_path / "adapter")
    location = f"{family.models[0]}+{adapter}"
    before = _input_signature(location)
    _small_adapter(adapter, alpha=64)
    assert _input_signature(location) != before  # a changed adapter makes its stage merge again
    recipe = {"merge_method": "linear", "models": [{"model": location}, {"model": str(family.models[1])}]}
    from m3sb.errors import ConfigError

    with pytest.raises(ConfigError, match="the output folder holds input"):
        merge_to_folder(parse_merge_config(recipe), adapter, force=True)
    assert (adapter / "adapter_config.json").is_file()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"r": None}, r"r must be a positive number, got None"),
        ({"rank_pattern": {"q_proj": 0}}, r"rank_pattern\['q_proj'\] must be a positive number, got 0"),
        ({"rank_pattern": "q_proj"}, r"rank_pattern must map module patterns to numbers"),
        ({"alpha_pattern": {"q_proj(": 2}}, r"alpha_pattern: pattern 'q_proj\(' is not a regex"),
        ({"peft_type": None}, r"a None adapter \(peft_type\)"),
    ],
)
def test_malformed_adapter_configs_are_one_line(
    change: dict[str, Any], message: str, family: Family, tmp_path: Path
) -> None:
    adapter = _small_adapter(tmp_path / "adapter")
    config = json.loads((adapter / "adapter_config.json").read_text()) | change
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=message):
        open_checkpoint(f"{family.models[0]}+{adapter}")
