"""``selected.yaml``: the selected point as a recipe that ``m3sb merge`` runs, reproducing the
selected model (``--save-model``) bit for bit."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file
from typer.testing import CliRunner

from m3sb.cli import app
from m3sb.config import ParetoConfig
from m3sb.pareto import SearchSettings
from m3sb.pareto.recipe import SELECTED_RECIPE, selected_recipe, unrecipeable_reason
from m3sb.pareto.run import run_pareto

runner = CliRunner()
QUICK = SearchSettings(generations=10)


def _config(zoo_manifest: Path, **overrides: Any) -> ParetoConfig:
    zoo = json.loads(zoo_manifest.read_text())
    tasks = [  # rotated and mirrored: both 10-way, so every tensor lines up between the checkpoints
        {
            "name": t["name"],
            "model": t["checkpoint"],
            "dataset": {"dataset_name": t["dataset"]["dataset_name"], "max_samples": 60},
        }
        for t in zoo["tasks"][:2]
    ]
    return ParetoConfig.model_validate(
        {"base_model": zoo["base_model_checkpoint"], "tasks": tasks, "budget": 6, **overrides}
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    ("method", "parameters"),
    [
        ("task_arithmetic", {"lambda": 0.8}),
        ("ties", {"density": 0.5}),
        ("linear", {}),
        ("ties", {"density": [0.2, 0.9]}),  # per model: in each model's entry, not a gradient
    ],
)
def test_merging_selected_yaml_reproduces_the_saved_backbone_bit_for_bit(
    zoo_manifest: Path, tmp_path: Path, method: str, parameters: dict[str, Any]
) -> None:
    config = _config(zoo_manifest, merge_method=method, parameters=parameters)
    folder = tmp_path / "run"
    outcome = run_pareto(
        config, folder, preference=[1.0, 2.0], save_model=True, baselines=False, search=QUICK
    )
    assert outcome.files["selected_recipe"] == folder / SELECTED_RECIPE
    recipe = yaml.safe_load((folder / SELECTED_RECIPE).read_text())
    chosen = json.loads((folder / "selected.json").read_text())["coefficients"]
    assert [entry["parameters"]["weight"] for entry in recipe["models"]] == [
        chosen[task.name] for task in config.merged_tasks
    ]
    assert recipe["merge_method"] == method
    given = {k: v for k, v in recipe.get("parameters", {}).items() if k != "space"}
    for entry in recipe["models"]:
        for key, value in entry["parameters"].items():
            if key != "weight":
                given.setdefault(key, []).append(value)
    assert given == parameters

    result = runner.invoke(app, ["merge", str(folder / SELECTED_RECIPE), str(tmp_path / "out"), "--quiet"])
    assert result.exit_code == 0, result.output
    merged = load_file(tmp_path / "out" / "model.safetensors")
    for task in config.merged_tasks:
        saved = load_file(folder / "model" / task.name / "model.safetensors")
        backbone = [name for name in saved if not name.startswith("classifier.")]
        assert len(backbone) > 10
        for name in backbone:  # bit for bit: same dtype, same bytes
            assert merged[name].dtype == saved[name].dtype, name
            assert merged[name].view(torch.uint8).equal(saved[name].view(torch.uint8)), name


def test_a_data_dependent_method_gets_no_recipe_and_says_why(zoo_manifest: Path) -> None:
    config = _config(zoo_manifest, merge_method="regmean")
    reason = unrecipeable_reason(config)
    assert reason is not None and "regmean" in reason and "share" in reason
    assert unrecipeable_reason(_config(zoo_manifest)) is None


def test_a_random_mask_method_gets_no_recipe_where_the_loaded_names_are_not_the_files(
    zoo_manifest: Path,
) -> None:
    """DARE seeds its masks by tensor name; transformers 5 holds the zoo's ViT tensors under
    other names than its files, so a recipe would drop other entries than the search did."""
    from safetensors import safe_open

    from m3sb.pareto.run import load_problem

    config = _config(zoo_manifest, merge_method="dare_ties", parameters={"density": 0.5})
    held = load_problem(config, lambda _: None).flat.layout.names
    reason = unrecipeable_reason(config, held)
    with safe_open(Path(config.base_model) / "model.safetensors", "pt") as stored:
        in_files = set(stored.keys())
    renamed = sorted(set(held) - in_files)
    assert renamed, "the zoo's loaded names are its files' now: this test no longer tests anything"
    assert reason is not None and reason.startswith("merge_method 'dare_ties' seeds its random masks")
    assert f"'{renamed[0]}' (and {len(renamed) - 1} more)" in reason
    kept = sorted(set(held) & in_files)
    assert kept and unrecipeable_reason(config, kept) is None  # names as the files hold them: a recipe
    assert unrecipeable_reason(_config(zoo_manifest, merge_method="ties"), held) is None  # no random masks


def test_task_heads_of_different_shapes_get_no_recipe_and_say_which(zoo_manifest: Path) -> None:
    zoo = json.loads(zoo_manifest.read_text())
    parity = next(t for t in zoo["tasks"] if t["num_classes"] == 2)
    config = _config(zoo_manifest)
    tasks = [*config.tasks[:1], config.tasks[1].model_copy(update={"model": parity["checkpoint"]})]
    reason = unrecipeable_reason(config.model_copy(update={"tasks": tasks}))
    assert reason is not None
    assert reason.startswith("tensor 'classifier.") and "[2" in reason and "--save-model" in reason


def test_the_recipe_states_weights_method_parameters_and_dtypes(zoo_manifest: Path) -> None:
    config = _config(zoo_manifest, merge_method="barycenter")
    text = selected_recipe(config, [0.25, 0.5], "bfloat16", comment="chosen\nby a test")
    assert text.startswith("# chosen\n# by a test\n")
    recipe = yaml.safe_load(text)
    assert recipe["base_model"] == str(Path(config.base_model).resolve())  # runs from any folder
    models = [str(Path(task.model).resolve()) for task in config.merged_tasks]
    assert [m["model"] for m in recipe["models"]] == models
    assert [m["parameters"]["weight"] for m in recipe["models"]] == [0.25, 0.5]
    assert recipe["parameters"] == {"space": "task_vectors"}  # as the search merges it
    assert (recipe["dtype"], recipe["out_dtype"]) == ("float32", "bfloat16")
    with pytest.raises(ValueError, match="3 coefficients for 2 merged tasks"):
        selected_recipe(config, [0.1, 0.2, 0.3])
