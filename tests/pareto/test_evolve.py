"""``m3sb evolve``: CMA-ES over a merge's genome for one preference-weighted objective.

Model-free facts on a synthetic objective whose optimum is known; then, on the digits zoo,
the evolved merge beats its start, a killed run resumes to the same log and best, a
gradient genome sets each tensor's weights as mergekit reads gradients, and bad input is
one line.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from typer.testing import CliRunner

from m3sb.cli import app
from m3sb.config import ParetoConfig, count_layers
from m3sb.errors import ConfigError
from m3sb.methods import merge_group
from m3sb.pareto.evaluations import Evaluation
from m3sb.pareto.evolve import Genome, evolve
from m3sb.pareto.evolve_run import EvolveProblem, evolve_genome, evolve_settings, run_evolve
from m3sb.pareto.merging import MergeEvaluator

runner = CliRunner()

# Two tasks; task t's metric is 100 - 100 |g - TARGET[t]|^2 over the 5 genes of a 2-group,
# global-density genome. With preference (1, 3) the optimum is the weighted mean of the
# targets, where the objective is 100 - 100 * (1 * |opt - T0|^2 + 3 * |opt - T1|^2) / 4.
TARGET = np.array([[0.2, 0.8, 0.5, 0.5, 0.7], [0.6, 0.6, 0.1, 0.9, 0.7]])
PREFERENCE = [1.0, 3.0]
OPTIMUM = (TARGET[0] + 3 * TARGET[1]) / 4
BEST_OBJECTIVE = 100 - 100 * (((OPTIMUM - TARGET[0]) ** 2).sum() + 3 * ((OPTIMUM - TARGET[1]) ** 2).sum()) / 4
GENOME = Genome(("a", "b"), layer_groups=2, density="global")


class StoppedError(RuntimeError):
    pass


class Synthetic:
    """``evaluate_many`` of the synthetic tasks; counts evaluations and raises ``StoppedError``
    on evaluation ``stop + 1`` when ``stop`` is given."""

    def __init__(self, stop: int | None = None) -> None:
        self.calls = 0
        self.batches: list[int] = []
        self.stop = stop

    def __call__(self, points: np.ndarray) -> Iterator[np.ndarray]:
        self.batches.append(len(points))
        for point in points:
            if self.stop is not None and self.calls == self.stop:
                raise StoppedError
            self.calls += 1
            yield 100 - 100 * ((point - TARGET) ** 2).sum(axis=1)


def _evolve(evaluate: Synthetic, known: Any = (), reported: list[Evaluation] | None = None, **kw: Any) -> Any:
    settings = {"generations": 12, "population": 8, "seed": 3, "preference": PREFERENCE} | kw
    return evolve(
        evaluate,
        GENOME,
        GENOME.vector(0.3, 0.5),
        2,
        known=known,
        on_evaluation=None if reported is None else reported.append,
        **settings,
    )


def test_cma_es_finds_the_known_optimum_of_a_synthetic_objective() -> None:
    evaluate = Synthetic()
    result = _evolve(evaluate, generations=40)
    assert result.start_objective == pytest.approx(44.0)
    assert result.best_objective == pytest.approx(BEST_OBJECTIVE, abs=0.05)  # 90.25
    np.testing.assert_allclose(result.best.coefficients, OPTIMUM, atol=0.03)
    assert evaluate.batches == [1] + [8] * 40  # the start, then one batch per generation
    assert evaluate.calls == len(result.evaluated) == 321 and result.stopped is None

    # a loss is minimised: the same landscape upside down reaches the same genome
    def losses(points: np.ndarray) -> Iterator[np.ndarray]:
        return (100 - metrics for metrics in Synthetic()(points))

    low = evolve(
        losses, GENOME, GENOME.vector(0.3, 0.5), 2, 40, 8, seed=3, sense="loss", preference=PREFERENCE
    )
    assert low.best_objective == pytest.approx(100 - BEST_OBJECTIVE, abs=0.05)


@pytest.mark.parametrize("stop", [1, 5, 9, 30])
def test_an_interrupted_evolution_resumes_to_the_same_evaluations_and_best(stop: int) -> None:
    whole = _evolve(Synthetic())
    reported: list[Evaluation] = []
    with pytest.raises(StoppedError):
        _evolve(Synthetic(stop), reported=reported)
    assert len(reported) == stop
    evaluate, more = Synthetic(), []
    resumed = _evolve(evaluate, known=reported, reported=more)
    assert evaluate.calls == len(more) == len(whole.evaluated) - stop and resumed.reused == stop
    assert [e.phase for e in resumed.evaluated] == [e.phase for e in whole.evaluated]
    for a, b in zip(resumed.evaluated, whole.evaluated, strict=True):
        assert a.coefficients.tolist() == b.coefficients.tolist() and a.metrics.tolist() == b.metrics.tolist()
    assert resumed.best_index == whole.best_index and resumed.best_objective == whole.best_objective
    other = _evolve(Synthetic(), seed=4)
    assert other.evaluated[1].coefficients.tolist() != whole.evaluated[1].coefficients.tolist()


def test_a_gradient_genome_gives_each_tensor_its_layers_weights() -> None:
    genome = Genome(("a", "b"), layer_groups=3, density="per_model", density_bounds=(0.1, 0.9))
    assert genome.columns == [
        *(f"weight_a_{k}" for k in range(3)),
        *(f"weight_b_{k}" for k in range(3)),
        "density_a",
        "density_b",
    ]
    genes = np.array([0.0, 0.5, 1.0, 1.0, 1.0, 0.0, 0.3, 0.6])
    names = [f"model.layers.{i}.mlp.weight" for i in range(5)] + [
        "model.embed_tokens.weight",
        "lm_head.weight",
    ]
    weights_of = genome.weights_of(genes, names)  # 5 layers: layer i is read at i / 4
    expected = {0: [0.0, 1.0], 1: [0.25, 1.0], 2: [0.5, 1.0], 3: [0.75, 0.5], 4: [1.0, 0.0]}
    for layer, weights in expected.items():
        assert weights_of(f"model.layers.{layer}.mlp.weight") == pytest.approx(weights, abs=1e-15)
    assert weights_of("model.embed_tokens.weight") == [0.0, 1.0]  # outside the layers: the first value
    assert weights_of("lm_head.weight") == [0.0, 1.0]
    assert genome.density_parameter(genes) == pytest.approx([0.3, 0.6])
    assert genome.vector([0.4, 2.0], [0.05, 0.5]).tolist() == [0.4] * 3 + [1.0] * 3 + [0.1, 0.5]  # clipped
    one = Genome(("a", "b"), density="global")
    assert one.columns == ["weight_a", "weight_b", "density"] and not one.plain and Genome(("a", "b")).plain
    assert one.vector(0.3, [0.2, 0.4]).tolist() == pytest.approx([0.3, 0.3, 0.3])


# ----------------------------------------------------------------- the digits zoo


def _config(zoo_manifest: Path, **overrides: Any) -> dict[str, Any]:
    zoo = json.loads(zoo_manifest.read_text())
    tasks = [
        {
            "name": t["name"],
            "model": t["checkpoint"],
            "dataset": {"dataset_name": t["dataset"]["dataset_name"], "max_samples": 90},
        }
        for t in zoo["tasks"][:2]
    ]
    return {"base_model": zoo["base_model_checkpoint"], "tasks": tasks, **overrides}


@pytest.mark.slow
def test_evolve_on_the_digits_zoo_beats_its_start_and_a_rerun_evaluates_nothing(
    zoo_manifest: Path, tmp_path: Path
) -> None:
    config = ParetoConfig.model_validate(_config(zoo_manifest, metric="loss"))
    folder = tmp_path / "run"
    first = run_evolve(config, folder, generations=3, population=6, device="cpu", save_model=True)
    evolution = first.evolution
    assert evolution.best_objective < evolution.start_objective - 0.01  # a loss: lower is better
    table = pd.read_csv(folder / "evaluations.csv")
    names = first.task_names
    assert list(table.columns[:3]) == ["phase", *(f"weight_{n}" for n in names)]
    assert len(table) == first.new_evaluations == 1 + 3 * 6
    assert table["phase"].tolist() == ["start"] + [f"generation {g}" for g in (1, 2, 3) for _ in range(6)]
    assert table.iloc[0][[f"weight_{n}" for n in names]].tolist() == [0.3, 0.3]
    best = json.loads((folder / "best.json").read_text())
    row = table.iloc[evolution.best_index]
    assert [best["weights"][n] for n in names] == [row[f"weight_{n}"] for n in names]
    assert [best["measured"][n] for n in names] == [row[f"loss_{n}"] for n in names]
    assert best["objective"]["best"] == pytest.approx(np.mean([row[f"loss_{n}"] for n in names]))
    assert best["objective"]["start"] == pytest.approx(np.mean([table.iloc[0][f"loss_{n}"] for n in names]))
    for name in names:  # the best merge, with each task's own head
        assert (folder / "model" / name / "model.safetensors").is_file()
    again = run_evolve(config, folder, generations=3, population=6, device="cpu")
    assert again.new_evaluations == 0 and again.reused_evaluations == len(table)
    assert json.loads((folder / "best.json").read_text()) == best
    assert not (folder / "model").exists()  # a run without --save-model keeps no earlier models
    with pytest.raises(ConfigError, match="holds evaluations of a different search"):
        run_evolve(config, folder, generations=3, layer_groups=2, device="cpu")


@pytest.mark.slow
def test_a_killed_evolution_resumes_to_the_same_log_and_best(
    zoo_manifest: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ties with a 2-group gradient and a density per model: every tensor through merge_group."""
    config = ParetoConfig.model_validate(
        _config(
            zoo_manifest, merge_method="ties", evolve={"generations": 2, "population": 4, "layer_groups": 2}
        )
    )
    run_evolve(config, tmp_path / "whole", device="cpu", seed=1)
    original = MergeEvaluator.score
    calls = {"count": 0}

    def dies_on_the_fourth(self: MergeEvaluator, backbone: Any) -> np.ndarray:
        calls["count"] += 1
        if calls["count"] == 4:
            raise KeyboardInterrupt
        return original(self, backbone)

    monkeypatch.setattr(MergeEvaluator, "score", dies_on_the_fourth)
    with pytest.raises(KeyboardInterrupt):
        run_evolve(config, tmp_path / "cut", device="cpu", seed=1)
    assert len(pd.read_csv(tmp_path / "cut" / "evaluations.csv")) == 3
    monkeypatch.setattr(MergeEvaluator, "score", original)
    resumed = run_evolve(config, tmp_path / "cut", device="cpu", seed=1)
    assert resumed.reused_evaluations == 3 and resumed.new_evaluations == 1 + 2 * 4 - 3
    whole = pd.read_csv(tmp_path / "whole" / "evaluations.csv")
    assert list(whole.columns[1:7]) == [
        *(f"weight_{n}_{k}" for n in resumed.task_names for k in (0, 1)),
        *(f"density_{n}" for n in resumed.task_names),
    ]
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "cut" / "evaluations.csv"), whole)
    same = [json.loads((tmp_path / where / "best.json").read_text()) for where in ("whole", "cut")]
    assert same[0] == same[1] and same[0]["density"].keys() == set(resumed.task_names)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["task_arithmetic", "ties"])
def test_each_tensor_is_merged_with_the_weights_its_layer_reads(zoo_manifest: Path, method: str) -> None:
    from m3sb.pareto.run import load_problem

    params = {"lambda": 0.5} if method == "task_arithmetic" else {}
    config = ParetoConfig.model_validate(
        _config(zoo_manifest, merge_method=method, parameters=params, evolve={"layer_groups": 2})
    )
    genome = evolve_genome(config, evolve_settings(config.evolve))
    problem = load_problem(config, lambda _: None, "cpu")
    worker = EvolveProblem(problem, genome).build("cpu")
    density = [0.3, 0.6] if method == "ties" else []
    genes = np.array([0.2, 0.8, 1.0, 0.0, *density])  # a: 0.2 -> 0.8, b: 1.0 -> 0.0 over the layers
    merged = {name: tensor.clone() for name, tensor in worker.backbone(genes).items()}
    base = problem.base.backbone
    models = [task.model.weights for task in problem.merged]
    assert count_layers(merged) == 4  # layer i is read at i / 3
    cases = {"vit.layers.2.mlp.fc1.weight": 2 / 3, "vit.layers.0.attention.q_proj.bias": 0.0}
    cases |= {"vit.layers.3.mlp.fc2.weight": 1.0, "vit.embeddings.cls_token": 0.0}  # outside: the first
    for name, at in cases.items():
        weights = [0.2 + 0.6 * at, 1.0 - at]
        if method == "task_arithmetic":
            vectors = [w * (m[name] - base[name]) for w, m in zip(weights, models, strict=True)]
            expected = base[name] + 0.5 * sum(vectors)
        else:
            group = [m[name] for m in models]
            expected = merge_group("ties", group, weights, base[name], name, density=[0.3, 0.6])
        torch.testing.assert_close(merged[name], expected.float(), rtol=1e-5, atol=1e-6)
    if method == "ties":  # and the densities count: other densities give another tensor
        name = "vit.layers.2.mlp.fc1.weight"
        other = merge_group("ties", [m[name] for m in models], [0.6, 1 / 3], base[name], name, density=0.9)
        assert not torch.allclose(merged[name], other)


@pytest.mark.slow
def test_bad_input_is_one_line_and_writes_nothing(zoo_manifest: Path, tmp_path: Path) -> None:
    good = _config(zoo_manifest)
    preference = tmp_path / "pref.yaml"
    preference.write_text(yaml.safe_dump({"nope": 1}))
    cases: dict[str, tuple[dict[str, Any], list[str]]] = {
        "--generations 0: needs at least 1": (good, ["--generations", "0"]),
        "--population 1: needs at least 2": (good, ["--population", "1"]),
        "--layer-groups 0: needs 1 <= G <= 64": (good, ["--layer-groups", "0"]),
        "--density most: choose one of auto, per_model, global, fixed": (good, ["--density", "most"]),
        "density per_model: merge_method 'task_arithmetic' has no density to evolve": (
            good,
            ["--density", "per_model"],
        ),
        "merge_method 'sce' has no per-model weights": (good | {"merge_method": "sce"}, []),
        "unknown task 'nope'": (good, ["--preference", str(preference)]),
        "executor 'slurm': choose one of local, ray": (good, ["--executor", "slurm"]),
        "evolve.generations: Input should be greater than 0": (good | {"evolve": {"generations": 0}}, []),
        "unknown key 'evolve.generatoins'": (good | {"evolve": {"generatoins": 3}}, []),
        "evolve.start_weight: Input should be a finite number": (
            good | {"evolve": {"start_weight": float("nan")}},
            [],
        ),
    }
    for message, (data, options) in cases.items():
        config = tmp_path / "config.yaml"
        config.write_text(yaml.safe_dump(data))
        out = tmp_path / "out"
        result = runner.invoke(app, ["evolve", str(config), "--results-path", str(out), *options])
        lines = result.output.strip().splitlines()
        assert result.exit_code == 1 and len(lines) == 1, result.output
        assert message in result.output and "Traceback" not in result.output, result.output
        assert not out.exists()


# Deterministic methods only: DARE draws its masks over a tensor's elements in the order they
# are held, and transformers 5 holds some checkpoints' tensors under other names and layouts
# than the files store them, so the same seed drops other elements in memory than in m3sb merge.
@pytest.mark.slow
@pytest.mark.parametrize(
    ("method", "parameters", "groups", "density"),
    [
        ("ties", {}, 2, "per_model"),
        ("task_arithmetic", {"lambda": 0.7}, 3, "fixed"),
        ("breadcrumbs", {"gamma": 0.05}, 1, "global"),
    ],
)
def test_merging_best_yaml_reproduces_the_saved_best_bit_for_bit(
    zoo_manifest: Path, tmp_path: Path, method: str, parameters: dict[str, Any], groups: int, density: str
) -> None:
    config = ParetoConfig.model_validate(_config(zoo_manifest, merge_method=method, parameters=parameters))
    folder = tmp_path / "run"
    outcome = run_evolve(
        config,
        folder,
        generations=1,
        population=3,
        layer_groups=groups,
        density=density,
        device="cpu",
        save_model=True,
    )
    recipe = yaml.safe_load((folder / "best.yaml").read_text())
    best = json.loads((folder / "best.json").read_text())
    names = outcome.task_names
    assert [entry["parameters"]["weight"] for entry in recipe["models"]] == [
        best["weights"][n] for n in names
    ]
    if density == "per_model":
        assert [entry["parameters"]["density"] for entry in recipe["models"]] == [
            best["density"][n] for n in names
        ]
    if density == "global":
        assert recipe["parameters"]["density"] == best["density"]
    result = runner.invoke(app, ["merge", str(folder / "best.yaml"), str(tmp_path / "out"), "--quiet"])
    assert result.exit_code == 0, result.output
    from safetensors.torch import load_file

    merged = load_file(tmp_path / "out" / "model.safetensors")
    for name in names:
        saved = load_file(folder / "model" / name / "model.safetensors")
        backbone = [tensor for tensor in saved if not tensor.startswith("classifier.")]
        assert len(backbone) > 10
        for tensor in backbone:
            assert merged[tensor].view(torch.uint8).equal(saved[tensor].view(torch.uint8)), tensor


def test_layer_groups_without_layer_numbers_are_said_to_act_as_one() -> None:
    from m3sb.pareto.evolve_run import layer_groups_warning

    flat = ["embed.weight", "mlp.fc1.weight", "head.bias"]
    assert layer_groups_warning(3, flat) == (
        "--layer-groups 3: no tensor name holds a layer number ('layers.N'), "
        "so every tensor reads its gradient's first point"
    )
    assert layer_groups_warning(1, flat) is None
    assert layer_groups_warning(3, [*flat, "vit.layers.0.mlp.fc1.weight"]) is None
