"""MAP's model side on the digits zoo: candidates from flat task vectors, per-task scores."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from m3sb.errors import ConfigError
from m3sb.methods import merge_group
from m3sb.pareto.merging import (
    FlatTaskVectors,
    MergeEvaluator,
    MergeProblem,
    MethodMerge,
    TaskVectorSpace,
    check_metric,
    check_search_method,
    merged_backbone,
)
from m3sb.tasks.data import DatasetSpec
from m3sb.tasks.metrics import METRICS, classification_metrics
from m3sb.tasks.model import TaskModel
from m3sb.tasks.registry import Task, TaskSpec, load_tasks

pytestmark = pytest.mark.slow
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def loaded(zoo_manifest: Path) -> dict[str, Any]:
    zoo = json.loads(zoo_manifest.read_text())
    specs = [
        TaskSpec(
            task["name"],
            task["checkpoint"],
            DatasetSpec.model_validate(task["dataset"] | {"split": "validation", "max_samples": 150}),
        )
        for task in zoo["tasks"][:3]
    ]
    tasks, base = load_tasks(specs, zoo["base_model_checkpoint"])
    return {"tasks": tasks, "base": base}


def _evaluator(loaded: dict[str, Any], metric: str = "accuracy", **options: Any) -> MergeEvaluator:
    return MergeProblem(loaded["tasks"], loaded["base"], metric, **options).build(CPU)


def test_one_hot_candidate_is_that_model_and_zero_is_the_base(loaded: dict[str, Any]) -> None:
    tasks: list[TaskModel] = [task.model for task in loaded["tasks"]]
    space = TaskVectorSpace(FlatTaskVectors.of(loaded["base"].backbone, [t.backbone for t in tasks]), CPU)
    for index, task in enumerate(tasks):
        candidate = space.candidate(np.eye(len(tasks))[index])
        for name, tensor in task.backbone.items():
            torch.testing.assert_close(candidate[name], tensor, rtol=0, atol=2e-6)
    base = space.candidate(np.zeros(len(tasks)))
    for name, tensor in loaded["base"].backbone.items():
        assert torch.equal(base[name], tensor)


def test_fast_candidate_equals_task_arithmetic_tensor_by_tensor(loaded: dict[str, Any]) -> None:
    tasks, base = [task.model for task in loaded["tasks"]], loaded["base"]
    coefficients = [0.7, -0.2, 0.45]
    fast = _evaluator(loaded, params={"lambda": 0.8}).backbone(coefficients)
    for name, tensor in base.backbone.items():
        expected = merge_group(
            "task_arithmetic", [t.weights[name] for t in tasks], coefficients, tensor, lambda_=0.8
        )
        torch.testing.assert_close(fast[name], expected, rtol=1e-5, atol=1e-6)


def test_gram_matrix_is_that_of_the_task_vectors(loaded: dict[str, Any]) -> None:
    tasks, base = [task.model for task in loaded["tasks"]], loaded["base"]
    gram = _evaluator(loaded).problem.flat.gram()
    vectors = [
        torch.cat([(t.backbone[n] - base.backbone[n]).reshape(-1).double() for n in base.backbone])
        for t in tasks
    ]
    expected = np.array([[float(a @ b) for b in vectors] for a in vectors])
    np.testing.assert_allclose(gram, expected, rtol=1e-5)
    assert np.all(np.linalg.eigvalsh(gram) > 0)


def test_one_hot_scores_are_the_finetuned_models_own(loaded: dict[str, Any]) -> None:
    evaluator = _evaluator(loaded)
    for index, task in enumerate(loaded["tasks"]):
        with torch.inference_mode():
            logits = task.model.use_backbone(None)(pixel_values=task.data.values()).logits
        own = classification_metrics(logits.argmax(-1), task.data.labels)
        assert evaluator(np.eye(3)[index])[index] == pytest.approx(own["accuracy"], abs=1e-9)


def test_loss_metric_is_the_mean_cross_entropy(loaded: dict[str, Any]) -> None:
    losses = _evaluator(loaded, "loss")(np.eye(3)[0])
    task = loaded["tasks"][0]
    with torch.inference_mode():
        logits = task.model.use_backbone(None)(pixel_values=task.data.values()).logits
    expected = float(torch.nn.functional.cross_entropy(logits, task.data.labels))
    assert losses[0] == pytest.approx(expected, rel=1e-5)
    assert np.all(losses > 0)


def test_other_methods_take_the_coefficients_as_weights(loaded: dict[str, Any]) -> None:
    tasks, base = [task.model for task in loaded["tasks"]], loaded["base"]
    evaluator = _evaluator(loaded, method_name="ties", params={"density": 0.5})
    assert not evaluator.problem.fast
    merged = evaluator.backbone([0.5, 0.3, 0.2])
    name = next(iter(base.backbone))
    expected = merge_group(
        "ties", [t.weights[name] for t in tasks], [0.5, 0.3, 0.2], base.backbone[name], density=0.5
    )
    assert torch.equal(merged[name], expected)
    again = merged_backbone(
        "ties", {"density": 0.5}, [0.5, 0.3, 0.2], [t.weights for t in tasks], base.backbone
    )
    assert torch.equal(again[name], expected)


def test_metric_and_method_are_checked_with_one_line() -> None:
    with pytest.raises(ConfigError, match="metric 'bleu' is not one the evaluator produces"):
        check_metric("bleu")
    with pytest.raises(ConfigError, match="'slerp' has no per-model weights"):
        check_search_method("slerp", {}, (0.0, 1.0))
    with pytest.raises(ConfigError, match="unknown parameter 'densty' for 'ties'"):
        check_search_method("ties", {"densty": 0.5}, (0.0, 1.0))


@pytest.mark.parametrize("metric", ["accuracy", "loss"])
def test_batched_candidates_score_like_one_at_a_time(loaded: dict[str, Any], metric: str) -> None:
    points = np.random.default_rng(0).uniform(0.0, 1.0, size=(5, 3))
    one_by_one = np.stack(list(_evaluator(loaded, metric).evaluate_many(points)))
    batched = np.stack(list(_evaluator(loaded, metric, candidates_per_pass=3).evaluate_many(points)))
    np.testing.assert_allclose(batched, one_by_one, rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(one_by_one[2], _evaluator(loaded, metric)(points[2]))


def test_workers_get_heads_only_and_score_exactly_the_same(loaded: dict[str, Any]) -> None:
    import pickle

    problem = MergeProblem(loaded["tasks"], loaded["base"], "loss")
    shipped = problem.for_workers()
    backbone_bytes = 4 * problem.flat.base.size
    full = len(pickle.dumps(problem))
    light = len(pickle.dumps(shipped))
    assert full - light > 2 * len(problem.tasks) * backbone_bytes  # model and weights copies left behind
    points = np.random.default_rng(1).uniform(0.0, 1.0, size=(3, 3))
    ours = problem.build(CPU).run(points)
    theirs = pickle.loads(pickle.dumps(shipped)).build("cpu").run(points)
    np.testing.assert_array_equal(np.stack(theirs), np.stack(ours))


def test_a_baseline_merge_on_rebuilt_task_models_matches_the_original_weights(loaded: dict[str, Any]) -> None:
    tasks, base = [task.model for task in loaded["tasks"]], loaded["base"]
    problem = MergeProblem(loaded["tasks"], base, "loss")
    evaluator = problem.for_workers().build(CPU)
    space_base, rebuilt = evaluator.space.backbones()
    for name, tensor in base.backbone.items():
        assert torch.equal(space_base[name], tensor)
    for index, task in enumerate(tasks):
        for name, tensor in task.backbone.items():
            torch.testing.assert_close(rebuilt[index][name], tensor, rtol=0, atol=2e-6)
    measured = evaluator.run(MethodMerge("ties", {"density": 0.5}))
    merged = merged_backbone("ties", {"density": 0.5}, [1.0] * 3, [t.weights for t in tasks], base.backbone)
    np.testing.assert_allclose(measured, problem.build(CPU).score(merged), rtol=1e-4)


def test_half_precision_models_ship_float32_heads_and_score_alike(loaded: dict[str, Any]) -> None:
    import copy
    import pickle

    def halved(task: TaskModel) -> TaskModel:
        twin = copy.deepcopy(task)
        twin.model.half()
        twin.weights = {k: v.half() if v.is_floating_point() else v for k, v in twin.weights.items()}
        return twin

    problem = MergeProblem(
        [Task(t.spec, halved(t.model), t.data) for t in loaded["tasks"]], halved(loaded["base"]), "loss"
    )
    shipped = pickle.loads(pickle.dumps(problem.for_workers()))
    for task in shipped.tasks:
        assert {t.dtype for t in task.model.weights.values() if t.is_floating_point()} == {torch.float32}
    points = np.random.default_rng(2).uniform(0.0, 1.0, size=(2, 3))
    np.testing.assert_array_equal(
        np.stack(shipped.build("cpu").run(points)), np.stack(problem.build(CPU).run(points))
    )


def test_one_evaluation_records_every_metric_of_every_task(loaded: dict[str, Any]) -> None:
    evaluator = _evaluator(loaded, "loss")
    table = evaluator.run(np.array([[0.3, 0.4, 0.2]]))[0]
    assert table.shape == (len(METRICS), 3)
    accuracy = _evaluator(loaded, "accuracy")(np.array([0.3, 0.4, 0.2]))
    np.testing.assert_array_equal(table[METRICS.index("accuracy")], accuracy)
    np.testing.assert_array_equal(table[METRICS.index("loss")], evaluator(np.array([0.3, 0.4, 0.2])))


def test_a_control_task_is_scored_but_has_no_coefficient(loaded: dict[str, Any]) -> None:
    import dataclasses

    tasks = list(loaded["tasks"])
    control = dataclasses.replace(tasks[2], spec=dataclasses.replace(tasks[2].spec, control=True))
    problem = MergeProblem([tasks[0], tasks[1], control], loaded["base"], "accuracy")
    assert problem.flat.vectors.shape[0] == 2  # two task vectors: the control's model is not merged
    evaluator = problem.build(CPU)
    table = evaluator.run(np.array([[1.0, 0.0]]))[0]
    assert table.shape == (len(METRICS), 3) and evaluator(np.array([1.0, 0.0])).shape == (2,)
    first = tasks[0].model.backbone
    expected = control.evaluate(first, CPU, 256)
    assert table[METRICS.index("accuracy"), 2] == pytest.approx(expected["accuracy"], abs=1e-9)
    assert table[METRICS.index("accuracy"), 0] == pytest.approx(
        tasks[0].evaluate(None, CPU, 256)["accuracy"], abs=1e-9
    )
