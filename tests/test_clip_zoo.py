"""The CLIP zoo: a real trade-off for zero-shot merging, and MAP finding better points on it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from m3sb.clip_zoo import DIGIT_NAMES, PARITY_NAMES, vocabulary
from m3sb.config import ParetoConfig
from m3sb.methods import METHODS
from m3sb.pareto.run import TASK_ARITHMETIC_SCALE, run_pareto

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def zoo(clip_zoo_manifest: Path) -> dict[str, Any]:
    document: dict[str, Any] = json.loads(clip_zoo_manifest.read_text())
    return document


def test_every_fine_tune_beats_the_zero_shot_base_by_a_wide_margin(zoo: dict[str, Any]) -> None:
    names = [task["name"] for task in zoo["tasks"]]
    assert names == ["rotated", "mirrored", "inverted", "permuted", "parity"]
    for task in zoo["tasks"]:
        assert task["finetuned_accuracy"] >= 85.0, task
        assert task["finetuned_accuracy"] - task["zero_shot_accuracy"] >= 40.0, task


def test_the_base_is_a_clip_with_its_own_tokenizer_and_the_fine_tunes_are_vision_only(
    zoo: dict[str, Any],
) -> None:
    from datasets import load_from_disk
    from transformers import AutoConfig, AutoTokenizer

    base = zoo["base_model_checkpoint"]
    assert AutoConfig.from_pretrained(base).model_type == "clip"
    tokenizer = AutoTokenizer.from_pretrained(base)
    ids = tokenizer("the digit seven")["input_ids"]
    words = vocabulary()
    assert ids == [words.index(w) for w in ("<bos>", "the", "digit", "seven", "<eos>")]
    assert tokenizer.eos_token_id != 2  # transformers' legacy CLIP pooling (argmax of ids) would apply
    for task in zoo["tasks"]:
        assert AutoConfig.from_pretrained(task["checkpoint"]).model_type == "clip_vision_model"
        names = load_from_disk(task["dataset"]["dataset_name"])["test"].features["label"].names
        assert tuple(names) == (PARITY_NAMES if task["name"] == "parity" else DIGIT_NAMES)


def experiment_methods() -> dict[str, dict[str, Any]]:
    """Every method an experiment over five models can run (slerp takes exactly two)."""
    parameters: dict[str, dict[str, Any]] = {
        "task_arithmetic": {"lambda": TASK_ARITHMETIC_SCALE},
        "ties": {"density": 0.2},
        "dare_linear": {"density": 0.3, "lambda": 0.5},
        "dare_ties": {"density": 0.3, "lambda": 0.5},
        "breadcrumbs": {"lambda": 0.5},
    }
    five = [
        name
        for name, method in METHODS.items()
        if (method.max_models or 5) >= 5 and method.statistics is None
    ]  # not slerp, nuslerp...
    return {name: parameters.get(name, {}) for name in five}


def test_the_experiment_table_has_every_method_and_its_base_row_is_the_zoos_zero_shot(
    zoo: dict[str, Any], tmp_path: Path
) -> None:
    from m3sb.experiment import Experiment

    methods = experiment_methods()
    results = Experiment(
        "clip zoo",
        model_checkpoints=[task["checkpoint"] for task in zoo["tasks"]],
        datasets_config=[{**task["dataset"], "kind": "clip_zero_shot"} for task in zoo["tasks"]],
        merge_configs=methods,
        base_model_checkpoint=zoo["base_model_checkpoint"],
        device="cpu",
        cache_dir=tmp_path,
    ).run()
    assert list(dict.fromkeys(results["merge_method"])) == ["finetuned", "base", *methods]
    table = results.pivot_table(index="merge_method", columns="dataset", values="accuracy")
    for task in zoo["tasks"]:  # the task layer's head and the zoo's own agree image for image
        assert table.loc["base", task["name"]] == pytest.approx(task["zero_shot_accuracy"], abs=0.01)
        assert table.loc["finetuned", task["name"]] == pytest.approx(task["finetuned_accuracy"], abs=0.01)
    merged = table.drop(index=["finetuned", "base"])
    assert (merged.to_numpy() < table.loc["finetuned"].to_numpy() - 5).any(axis=0).all()  # a real trade-off


def pareto_config(zoo: dict[str, Any], names: list[str], cache: Path) -> ParetoConfig:
    tasks = [
        {
            "name": task["name"],
            "model": task["checkpoint"],
            "kind": "clip_zero_shot",
            "dataset": {**task["dataset"], "split": "validation"},
        }
        for task in zoo["tasks"]
        if task["name"] in names
    ]
    return ParetoConfig.model_validate(
        {"base_model": zoo["base_model_checkpoint"], "tasks": tasks, "cache_dir": str(cache)}
    )


@pytest.mark.parametrize(
    ("mode", "names"),
    [("map", ["rotated", "mirrored"]), ("nested", ["rotated", "mirrored", "parity"])],
)
def test_map_picks_a_point_that_beats_task_arithmetic_at_its_default_scale(
    zoo: dict[str, Any], tmp_path: Path, mode: str, names: list[str]
) -> None:
    preference = np.array([2.0] + [1.0] * (len(names) - 1))
    outcome = run_pareto(
        pareto_config(zoo, names, tmp_path / "cache"), tmp_path / mode, mode=mode, preference=list(preference)
    )
    assert outcome.selected is not None
    measured = np.array([outcome.selected["measured"][name] for name in outcome.task_names])
    arithmetic = outcome.baselines[f"task arithmetic ({TASK_ARITHMETIC_SCALE:g})"]
    chosen, baseline = preference @ measured / preference.sum(), preference @ arithmetic / preference.sum()
    assert chosen > baseline + 5.0, (chosen, baseline)


def test_the_bayesian_mode_runs_on_zero_shot_tasks(zoo: dict[str, Any], tmp_path: Path) -> None:
    config = pareto_config(zoo, ["rotated", "parity"], tmp_path / "cache")
    outcome = run_pareto(config, tmp_path / "bayes", mode="bayesian", preference=[1.0, 1.0], baselines=False)
    assert outcome.selected is not None and outcome.new_evaluations >= 12
    assert all(0.0 <= outcome.selected["measured"][n] <= 100.0 for n in outcome.task_names)
    assert len(outcome.front.coefficients) > 10
