"""examples/seed/: the M3SB seed notebook's 14 experiments as m3sb experiment configs.

Constructing an Experiment validates its merge configs and reads nothing from the Hub,
so these run offline.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from m3sb.config import ExperimentConfig, load_experiment_config
from m3sb.errors import ConfigError
from m3sb.experiment import Experiment, TaskVectorExperiment

SEED = Path(__file__).resolve().parents[1] / "examples" / "seed"
NAMES = [
    "ex1a",
    "ex1b",
    "ex2",
    "ex3a",
    "ex3b",
    "ex4a",
    "ex4b",
    "ex4c",
    "ex5a",
    "ex5b",
    "ex6",
    "ex7a",
    "ex7b",
    "ex7c",
]
TASK_VECTORS = {"ex5a", "ex5b", "ex6", "ex7a", "ex7b", "ex7c"}

# The seed notebook's cell, literally.
ex1a_config = {
    "name": "Experiment 1a: Merging Common Image Models",
    "model_checkpoints": [
        "pkr7098/cifar100-vit-base-patch16-224-in21k",
        "nateraw/food",
        "MaulikMadhavi/vit-base-flowers102"
    ],
    "datasets_config": [
        {"dataset_name": "cifar100", "split": "test", "image_col": "img", "label_col": "fine_label"},
        {"dataset_name": "food101", "split": "validation", "image_col": "image", "label_col": "label"},
        {"dataset_name": "nkirschi/oxford-flowers", "split": "test", "image_col": "image", "label_col": "label"}  # noqa: E501
    ],
    "merge_configs": {
        "barycenter": {"weights": [0.3333, 0.3334, 0.3333], "iterations": 20, "threshold": 1e-5},
        "linear": {"weights": [0.3333, 0.3334, 0.3333]},
        "pairwise_slerp": {"weights": [0.3333, 0.3334, 0.3333]}
    },
    "base_model_checkpoint": "google/vit-base-patch16-224-in21k"
}  # fmt: skip


def _spec(name: str) -> ExperimentConfig:
    return load_experiment_config(SEED / f"{name}.yaml")


def _build(spec: ExperimentConfig, merge_configs: dict[str, dict[str, Any]] | None = None) -> Experiment:
    kind = TaskVectorExperiment if spec.task_vectors else Experiment
    return kind(
        spec.name,
        spec.model_checkpoints,
        spec.datasets_config,
        merge_configs if merge_configs is not None else spec.merge_configs,
        spec.base_model_checkpoint,
    )


def test_the_folder_holds_exactly_the_seeds_14_experiments() -> None:
    assert sorted(p.stem for p in SEED.glob("*.yaml")) == sorted(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_each_config_loads_and_constructs_its_experiment_offline(name: str) -> None:
    spec = _spec(name)
    experiment = _build(spec)
    assert spec.task_vectors == (name in TASK_VECTORS)
    assert isinstance(experiment, TaskVectorExperiment) == (name in TASK_VECTORS)
    assert spec.base_model_checkpoint == "google/vit-base-patch16-224-in21k"
    count = 5 if name in ("ex2", "ex6") else 3
    assert len(spec.model_checkpoints) == len(experiment.datasets) == count
    for label, entry in spec.merge_configs.items():
        assert len(entry["weights"]) == count
        assert abs(sum(entry["weights"]) - 1.0) < 1e-9  # so normalising them changes nothing
        if label == "barycenter":
            assert entry["iterations"] == 20 and entry["threshold"] == 1e-5
            assert isinstance(entry["threshold"], float)


@pytest.mark.parametrize("name", [n for n in NAMES if "barycenter" in _spec(n).merge_configs])
def test_the_seed_barycenter_entries_also_run_as_barycenter_seed(name: str) -> None:
    spec = _spec(name)
    entry = spec.merge_configs["barycenter"]
    _build(spec, {"barycenter_seed": dict(entry)})
    _build(spec, {"barycenter": {**entry, "method": "barycenter_seed"}})
    with pytest.raises(ConfigError, match="'iterations' and 'max_iter'"):
        _build(spec, {"barycenter": {**entry, "max_iter": 20}})


def test_the_yaml_is_the_seed_notebooks_dict_and_the_dict_itself_works() -> None:
    spec = _spec("ex1a")
    for key in ("name", "model_checkpoints", "datasets_config", "merge_configs", "base_model_checkpoint"):
        assert getattr(spec, key) == ex1a_config[key], key
    experiment = Experiment(**ex1a_config)
    assert list(experiment.merge_configs) == ["barycenter", "linear", "pairwise_slerp"]


def test_the_cycle_consistency_experiments_permute_models_with_their_weights() -> None:
    for group in (("ex4a", "ex4b", "ex4c"), ("ex7a", "ex7b", "ex7c")):
        pairs = []
        for name in group:
            spec = _spec(name)
            weights = spec.merge_configs["pairwise_slerp"]["weights"]
            datasets = [d["dataset_name"] for d in spec.datasets_config]
            pairs.append(sorted(zip(spec.model_checkpoints, datasets, weights, strict=True)))
        assert pairs[0] == pairs[1] == pairs[2]
        orders = [tuple(_spec(name).model_checkpoints) for name in group]
        assert len(set(orders)) == 3
