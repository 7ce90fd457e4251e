"""The merge YAML schema: mergekit's keys, filters and gradients, sizes."""

from __future__ import annotations

from pathlib import Path

import pytest

from m3sb.config import (
    FilteredValue,
    count_layers,
    layer_fraction,
    load_merge_config,
    parse_merge_config,
    parse_size,
    resolve_value,
)
from m3sb.errors import ConfigError

MERGEKIT_EXAMPLE = """
models:
  - model: org/a
    parameters:
      density: [1, 0.7, 0.1]
      weight: 1.0
  - model: org/b
    parameters:
      density: 0.5
      weight: [0, 0.3, 0.7, 1]
merge_method: ties
base_model: org/base
parameters:
  normalize: true
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - filter: mlp
      value: [1, 0.5, 0.7, 0.3, 0]
    - value: 0.5
dtype: bfloat16
"""


def test_a_mergekit_yaml_parses(tmp_path: Path) -> None:
    path = tmp_path / "ties.yml"
    path.write_text(MERGEKIT_EXAMPLE)
    config = load_merge_config(path)
    assert config.merge_method == "ties"
    assert config.dtype == "bfloat16"
    assert config.models[1].parameters["density"] == 0.5
    assert isinstance(config.parameters["t"], list) and isinstance(config.parameters["t"][0], FilteredValue)


@pytest.mark.parametrize(
    ("name", "layers", "fraction"),
    [
        ("model.embed_tokens.weight", 4, 0.0),
        ("model.layers.0.mlp.up_proj.weight", 4, 0.0),
        ("model.layers.2.self_attn.q_proj.weight", 5, 0.5),
        ("model.layers.3.mlp.up_proj.weight", 4, 1.0),
        ("lm_head.weight", 4, 0.0),  # mergekit reads gradients at t = 0 outside the layers
        ("model.norm.weight", 4, 0.0),
        ("model.layers.0.mlp.up_proj.weight", 1, 1.0),  # one layer: t = 1, as mergekit's
        ("h.0.attn.c_attn.weight", 12, 0.0),  # gpt2's keys have no prefix
        ("transformer.h.11.mlp.c_fc.weight", 12, 1.0),
    ],
)
def test_layer_fraction(name: str, layers: int, fraction: float) -> None:
    assert layer_fraction(name, layers) == fraction


def test_count_layers_from_tensor_names() -> None:
    names = ["model.embed_tokens.weight", "model.layers.0.mlp.w", "model.layers.11.mlp.w", "lm_head.weight"]
    assert count_layers(names) == 12
    assert count_layers(["w", "b"]) == 1


def test_gradients_interpolate_over_layers_and_filters_pick_the_first_match() -> None:
    config = parse_merge_config(
        {
            "models": [{"model": "x"}],
            "merge_method": "slerp",
            "parameters": {"t": [{"filter": "self_attn", "value": [0.0, 1.0]}, {"value": 0.25}]},
        }
    )
    spec = config.parameters["t"]
    assert resolve_value(spec, "model.layers.1.self_attn.q_proj.weight", 5) == 0.25  # 1/4 of the way
    assert resolve_value(spec, "model.layers.4.self_attn.q_proj.weight", 5) == 1.0
    assert resolve_value(spec, "model.layers.4.mlp.up_proj.weight", 5) == 0.25
    assert resolve_value([0.0, 1.0, 0.0], "model.layers.1.x", 5) == 0.5
    assert resolve_value([FilteredValue(filter="mlp", value=1.0)], "attn", 2) is None
    assert resolve_value([FilteredValue(filter="*", value=0.3)], "attn", 2) == 0.3  # mergekit's wildcard


@pytest.mark.parametrize(
    ("document", "message"),
    [
        (
            {
                "models": [{"model": "a"}],
                "merge_method": "linear",
                "slices": [{"sources": [{"model": "a", "layer_range": [0, 1]}]}],
            },
            r"\(top level\): give exactly one of 'models', 'slices' and 'modules'",
        ),
        (
            {"merge_method": "passthrough", "slices": [{"sources": [{"model": "a", "layer_range": [3, 1]}]}]},
            r"slices\.0\.sources\.0\.layer_range: expected \[start, end\) with 0 <= start < end, "
            r"got \[3, 1\]",
        ),
        (
            {"merge_method": "passthrough", "slices": [{"sources": [{"model": "a", "layers": [0, 1]}]}]},
            "unknown key 'layers'.*allowed: model, layer_range, parameters",
        ),
        (
            {"merge_method": "linear", "modules": {"text": {}}},
            r"modules\.text: give exactly one of 'models' and 'slices'",
        ),
        (
            {"merge_method": "linear", "modules": {"text": {"models": [{"model": "a"}], "weights": 1}}},
            "unknown key 'weights' at modules.text.weights; allowed: models, slices, parameters",
        ),
        (
            {"merge_method": "linear", "modules": {"text": {"models": [{"model": "a", "weight": 1}]}}},
            "unknown key 'weight' at modules.text.models.0.weight; allowed: model, parameters",
        ),
        (
            {"models": [{"model": "a"}], "merge_method": "linear", "weird": 1},
            "unknown key 'weird'.*allowed: models",
        ),
        (
            {"models": [{"model": "a", "params": {}}], "merge_method": "linear"},
            "unknown key 'params'.*allowed: model",
        ),
        ({"merge_method": "linear"}, "give exactly one of 'models', 'slices' and 'modules'"),
        ({"models": [], "merge_method": "linear"}, "models"),
        ({"models": [{"model": "a"}], "merge_method": "linear", "dtype": "float8"}, "unknown dtype 'float8'"),
        (["not", "a", "mapping"], "expected a mapping"),
    ],
)
def test_schema_errors_are_one_line_and_name_the_key(document: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as caught:
        parse_merge_config(document, source="recipe.yml", strict=True)
    assert "\n" not in str(caught.value)
    assert str(caught.value).startswith("recipe.yml")


def test_malformed_yaml_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.yml"
    path.write_text("models:\n  - model: a\n   merge_method: [\n")
    with pytest.raises(ConfigError, match=r"bad\.yml: malformed YAML \(line \d+"):
        load_merge_config(path)


def test_yaml_is_loaded_safely(tmp_path: Path) -> None:
    path = tmp_path / "evil.yml"
    path.write_text("models: !!python/object/apply:os.system ['touch PWNED']\nmerge_method: linear\n")
    with pytest.raises(ConfigError, match="malformed YAML"):
        load_merge_config(path)
    assert not (tmp_path / "PWNED").exists()


@pytest.mark.parametrize(
    ("text", "size"),
    [("5GB", 5 * 10**9), ("500MB", 5 * 10**8), ("2GiB", 2 * 2**30), ("1.5G", 1_500_000_000), ("123", 123)],
)
def test_parse_size(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["five", "0", "-1GB", "5XB"])
def test_parse_size_rejects_nonsense(text: str) -> None:
    with pytest.raises(ConfigError, match="size"):
        parse_size(text)


@pytest.mark.parametrize("name", ["../escape", "a/b", "a\\b", ".hidden", " padded"])
def test_task_names_cannot_leave_the_results_folder(name: str) -> None:
    from m3sb.config import ParetoConfig, _validated

    tasks = [{"name": name, "model": "m", "dataset": {}}, {"name": "other", "model": "m", "dataset": {}}]
    with pytest.raises(ConfigError, match=r"^p\.yaml: tasks\.0\.name: .*must be a plain folder name"):
        _validated(ParetoConfig, {"base_model": "b", "tasks": tasks}, "p.yaml")


def test_unknown_keys_of_token_settings_are_noted_or_named() -> None:
    recipe = {
        "models": [{"model": "a"}],
        "merge_method": "linear",
        "tokenizer": {
            "tokens": {"<x>": {"source": "a", "forse": True}, "<y>": {"source": {"kind": "zero", "x": 1}}}
        },
    }
    notes = parse_merge_config(recipe).notes
    assert any("tokens['<x>'].forse" in note and "did you mean 'force'" in note for note in notes), notes
    assert any("tokens['<y>'].source.x" in note for note in notes), notes
    with pytest.raises(
        ConfigError, match=r"unknown key 'forse' at tokenizer\.tokens\.<x>\.forse; allowed: source, force"
    ):
        parse_merge_config(recipe, strict=True)
    lacking = recipe | {"tokenizer": {"tokens": {"<z>": {"source": {"kind": "model_token", "model": "a"}}}}}
    with pytest.raises(
        ConfigError, match=r"tokenizer\.tokens\.<z>\.source: give exactly one of token_id and token"
    ):
        parse_merge_config(lacking)
