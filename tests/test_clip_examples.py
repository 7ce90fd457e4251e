"""The eight-task CLIP ViT-B/32 example (MAP's and FusionBench's benchmark) loads and validates
offline: the hub ids, datasets, prompts and carves are what the papers' code uses."""

from __future__ import annotations

from pathlib import Path

import pytest

from m3sb.compare import load_results
from m3sb.config import load_experiment_config, load_pareto_config, load_preference
from m3sb.experiment import BASE, FINETUNED, TaskVectorExperiment
from m3sb.methods import METHODS
from m3sb.pareto.front import default_budget
from m3sb.pareto.run import check_run, task_specs
from m3sb.tasks.clip_templates import TEMPLATES, class_names_for
from m3sb.tasks.data import CarveSpec

FOLDER = Path(__file__).resolve().parents[1] / "examples" / "clip_vit_b32"
TASKS = ("sun397", "stanford-cars", "resisc45", "eurosat", "svhn", "gtsrb", "mnist", "dtd")
DATASETS = (
    "tanganke/sun397",
    "tanganke/stanford_cars",
    "tanganke/resisc45",
    "tanganke/eurosat",
    "ufldl-stanford/svhn",
    "tanganke/gtsrb",
    "ylecun/mnist",
    "tanganke/dtd",
)
SETS = ("sun397", "cars", "resisc45", "eurosat", "svhn", "gtsrb", "mnist", "dtd")


def _experiment() -> TaskVectorExperiment:
    spec = load_experiment_config(FOLDER / "experiment.yaml")
    assert spec.task_vectors
    return TaskVectorExperiment(
        spec.name,
        spec.model_checkpoints,
        spec.datasets_config,
        spec.merge_configs,
        spec.base_model_checkpoint,
        processor_checkpoint=spec.processor_checkpoint,
    )


def test_the_experiment_merges_fusionbenchs_checkpoints_with_every_method() -> None:
    experiment = _experiment()
    assert experiment.base_model_checkpoint == "openai/clip-vit-base-patch32"
    assert experiment.model_checkpoints == [f"tanganke/clip-vit-base-patch32_{task}" for task in TASKS]
    assert tuple(spec.name for spec in experiment.task_specs) == DATASETS
    for spec, built_in in zip(experiment.task_specs, SETS, strict=True):
        assert spec.kind == "clip_zero_shot" and spec.dataset.split == "test"
        assert spec.dataset.class_names == built_in and spec.dataset.templates == built_in
    assert experiment.task_specs[4].dataset.subset == "cropped_digits"
    methods = {str(params.get("method", label)) for label, params in experiment.merge_configs.items()}
    takes_eight = {name for name, method in METHODS.items() if (method.max_models or 8) >= 8}
    assert methods == takes_eight  # every method that merges eight models (not slerp, nuslerp, ...)


def test_fusionbench_settings_are_the_published_ones() -> None:
    configs = _experiment().merge_configs
    assert configs["task_arithmetic"] == {"lambda": 0.3}
    assert configs["ties"] == {"density": 0.2, "lambda": 0.3, "normalize": False}
    assert configs["dare_linear"] == {"density": 0.5, "lambda": 0.3}
    assert configs["linear"] == {}  # simple averaging
    statistics = load_experiment_config(FOLDER / "experiment.yaml").statistics
    assert (statistics.split, statistics.samples, statistics.batch_size) == ("train", 256, 32)


def test_the_published_table_lines_up_with_the_experiments_rows() -> None:
    table = load_results([FOLDER / "fusionbench_published"])
    assert set(table["dataset"]) == set(DATASETS)
    assert table.groupby("merge_method").size().eq(8).all()
    mean = table.groupby("merge_method")["accuracy"].mean()
    published = {"base": 48.2, "finetuned": 90.3, "linear": 66.5, "task_arithmetic": 68.0, "ties": 72.2}
    published |= {"regmean": 82.4, "wudi": 84.5, "iso_c": 82.8, "iso_cts": 82.7, "fisher": 70.6}
    for method, average in published.items():
        assert mean[method] == pytest.approx(average, abs=0.1), method
    ours = set(_experiment().merge_configs) | {FINETUNED, BASE}
    for method in set(table["merge_method"]) & (set(METHODS) | {FINETUNED, BASE}):
        assert method in ours, f"the example has no '{method}' row to set beside FusionBench's"


def test_the_pareto_config_runs_in_every_mode_on_maps_validation_carve() -> None:
    spec = load_pareto_config(FOLDER / "pareto.yaml")
    names = [task.name for task in spec.tasks]
    preference = load_preference(FOLDER / "preference.yaml", names)
    assert len(names) == 8 and preference == [1.0] * 8
    assert spec.base_model == "openai/clip-vit-base-patch32" and spec.merge_method == "task_arithmetic"
    assert spec.budget is None and (default_budget(8, "map"), default_budget(8, "nested")) == (90, 84)
    for mode in ("map", "bayesian", "nested"):
        check_run(spec, mode, preference, grid_points=None)
    for task, dataset, built_in, model in zip(task_specs(spec), DATASETS, SETS, TASKS, strict=True):
        assert task.kind == "clip_zero_shot" and task.dataset.dataset_name == dataset
        assert task.checkpoint == f"tanganke/clip-vit-base-patch32_{model}"
        assert task.dataset.split == CarveSpec(carve="train", fraction=0.1, max_examples=5000, seed=0)
        assert class_names_for(built_in) and TEMPLATES[built_in]
    # MAP's carve of SVHN's 73,257 training images: 5,000 of them, the rest stays for training
    carve = task_specs(spec)[4].dataset.split
    assert isinstance(carve, CarveSpec) and len(carve.indices(73_257)) == 5000
