"""The example configs and notebook stay valid as the code changes."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

from m3sb.config import load_experiment_config
from m3sb.experiment import Experiment

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.mark.parametrize("name", sorted(p.name for p in EXAMPLES.glob("*.yaml")))
def test_example_configs_are_valid_experiments(name: str) -> None:
    spec = load_experiment_config(EXAMPLES / name)
    experiment = Experiment(
        spec.name,
        spec.model_checkpoints,
        spec.datasets_config,
        spec.merge_configs,
        spec.base_model_checkpoint,
    )
    assert len(experiment.datasets) == len(spec.model_checkpoints) >= 3


def test_seed_examples_name_the_seed_checkpoints() -> None:
    spec = load_experiment_config(EXAMPLES / "seed_experiment.yaml")
    assert spec.base_model_checkpoint == "google/vit-base-patch16-224-in21k"
    assert spec.model_checkpoints[1] == "nateraw/food"
    assert load_experiment_config(EXAMPLES / "seed_task_vector_experiment.yaml").task_vectors


def test_notebook_code_cells_parse() -> None:
    notebook = json.loads((EXAMPLES / "experiment.ipynb").read_text())
    code = [cell for cell in notebook["cells"] if cell["cell_type"] == "code"]
    assert len(code) >= 3
    for cell in code:
        ast.parse("".join(cell["source"]))


def test_pareto_example_and_its_preference_are_valid() -> None:
    from m3sb.config import load_pareto_config, load_preference
    from m3sb.pareto.run import check_run

    spec = load_pareto_config(EXAMPLES / "pareto" / "digits_zoo.yaml")
    names = [task.name for task in spec.tasks]
    preference = load_preference(EXAMPLES / "pareto" / "preference.yaml", names)
    assert names == ["rotated", "mirrored", "parity"] and preference == [1.0, 1.0, 2.0]
    for mode in ("map", "bayesian", "nested"):
        check_run(spec, mode, preference, grid_points=4)
    text = load_pareto_config(EXAMPLES / "pareto" / "text_zoo.yaml")
    assert [task.kind for task in text.tasks] == ["causal_lm", "causal_lm"]
    check_run(text, "map", None, grid_points=None)
