"""``m3sb pareto`` end to end on the digits zoo: files, resuming, bad input."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from typer.testing import CliRunner

from m3sb.cli import app
from m3sb.config import ParetoConfig, load_pareto_config, load_preference
from m3sb.errors import ConfigError
from m3sb.pareto import SearchSettings
from m3sb.pareto.evaluations import Evaluation
from m3sb.pareto.merging import MergeEvaluator
from m3sb.pareto.records import EvaluationRecord
from m3sb.pareto.run import run_pareto
from m3sb.tasks.metrics import METRICS

pytestmark = pytest.mark.slow
QUICK = SearchSettings(generations=20)
runner = CliRunner()


def _config(zoo_manifest: Path, count: int = 2, **overrides: Any) -> dict[str, Any]:
    zoo = json.loads(zoo_manifest.read_text())
    tasks = [
        {
            "name": t["name"],
            "model": t["checkpoint"],
            "dataset": {"dataset_name": t["dataset"]["dataset_name"], "max_samples": 90},
        }
        for t in zoo["tasks"][:count]
    ]
    return {"base_model": zoo["base_model_checkpoint"], "tasks": tasks, "budget": 8, **overrides}


def _write(path: Path, data: Any) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def test_run_writes_every_file_and_a_rerun_evaluates_nothing(zoo_manifest: Path, tmp_path: Path) -> None:
    config = ParetoConfig.model_validate(_config(zoo_manifest))
    folder = tmp_path / "run"
    first = run_pareto(config, folder, preference=[1.0, 3.0], grid_points=3, save_model=True, search=QUICK)
    names = first.task_names
    evaluations = pd.read_csv(folder / "evaluations.csv")
    assert list(evaluations.columns) == [
        "phase",
        *(f"c_{n}" for n in names),
        *(f"{metric}_{n}" for metric in METRICS for n in names),
    ]
    assert (evaluations["phase"] == "design").sum() == 8
    assert (
        evaluations["phase"] == "grid"
    ).sum() == 9 - 2  # the grid's two one-hot corners were in the design
    assert set(evaluations["phase"]) >= {
        "design",
        "grid",
        "front check",
        "baseline: ties",
        "baseline: dare_ties",
        "baseline: dare_linear",
        "baseline: barycenter",
        "baseline: 0.3 spread by the preference",
        *(f"reference: fine-tuned {n}" for n in names),
    }
    spread = evaluations[evaluations["phase"] == "baseline: 0.3 spread by the preference"].iloc[0]
    assert [spread[f"c_{n}"] for n in names] == pytest.approx([0.15, 0.45])  # 0.3 x 2 tasks x [1, 3] / 4
    design = evaluations[evaluations["phase"] == "design"]
    for index, name in enumerate(names):  # the fine-tuned model is task arithmetic's one-hot vertex
        vertex = design[np.isclose(design[f"c_{name}"], 1.0) & (design.filter(like="c_").sum(axis=1) == 1.0)]
        reference = evaluations[evaluations["phase"] == f"reference: fine-tuned {name}"].iloc[0]
        assert first.finetuned is not None
        assert first.finetuned[index] == pytest.approx(vertex.iloc[0][f"accuracy_{name}"], abs=1e-9)
        assert reference[f"loss_{name}"] == pytest.approx(vertex.iloc[0][f"loss_{name}"], rel=1e-5)
    front = pd.read_csv(folder / "front.csv")
    assert len(front) == len(first.front.coefficients) >= 20
    selected = json.loads((folder / "selected.json").read_text())
    assert set(selected) == {"preference", "rule", "coefficients", "predicted", "measured"}
    assert selected["preference"] == dict(zip(names, [1.0, 3.0], strict=True))
    row = evaluations[evaluations["phase"] == "selected"].iloc[0]
    assert [row[f"accuracy_{n}"] for n in names] == [selected["measured"][n] for n in names]
    for name in names:
        assert (folder / "model" / name / "model.safetensors").is_file()
    assert (folder / "front.png").is_file() and (folder / "landscape.png").is_file()

    said: list[str] = []
    second = run_pareto(config, folder, preference=[1.0, 3.0], grid_points=3, search=QUICK, log=said.append)
    assert second.new_evaluations == 0
    assert not (folder / "model").exists()  # the first run's models are not the second's choice
    assert any(line.startswith(f"removed {folder / 'model'} from an earlier run") for line in said)
    np.testing.assert_array_equal(second.front.coefficients, first.front.coefficients)
    assert len(pd.read_csv(folder / "evaluations.csv")) == len(evaluations)


def test_an_interrupted_run_resumes_to_the_same_front(
    zoo_manifest: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = ParetoConfig.model_validate(_config(zoo_manifest, metric="loss"))
    whole = run_pareto(config, tmp_path / "whole", mode="bayesian", baselines=False, search=QUICK)
    original = MergeEvaluator.score
    calls = {"count": 0}

    def dies_on_the_fifth(self: MergeEvaluator, backbone: Any) -> np.ndarray:
        calls["count"] += 1
        if calls["count"] == 5:
            raise KeyboardInterrupt
        return original(self, backbone)

    monkeypatch.setattr(MergeEvaluator, "score", dies_on_the_fifth)
    with pytest.raises(KeyboardInterrupt):
        run_pareto(config, tmp_path / "cut", mode="bayesian", baselines=False, search=QUICK)
    assert len(pd.read_csv(tmp_path / "cut" / "evaluations.csv")) == 4
    monkeypatch.setattr(MergeEvaluator, "score", original)
    resumed = run_pareto(config, tmp_path / "cut", mode="bayesian", baselines=False, search=QUICK)
    assert resumed.reused_evaluations == 4
    np.testing.assert_array_equal(resumed.front.coefficients, whole.front.coefficients)
    np.testing.assert_array_equal(resumed.front.predicted, whole.front.predicted)


def test_records_round_trip_exactly_and_drop_a_torn_last_line(tmp_path: Path) -> None:
    record = EvaluationRecord(tmp_path / "r", ["a", "b"], "accuracy", {"search": 1})
    record.create()
    point = np.array([1 / 3, 2 / 7])
    table = np.arange(2.0 * len(METRICS)).reshape(len(METRICS), 2) + 0.5
    table[0] = [50.123456789012345, 1e-17]
    record.append("design", point, table)
    record.append("baseline: ties", None, table + 3)
    with open(record.path, "a") as file:
        file.write("design,0.5,0.")  # a write cut short by a crash
    points, labelled = EvaluationRecord(tmp_path / "r", ["a", "b"], "accuracy", {"search": 1}).load()
    assert len(points) == 1 and points[0].phase == "design"
    assert points[0].coefficients.tolist() == point.tolist()
    assert points[0].metrics.tolist() == [50.123456789012345, 1e-17]
    assert labelled["baseline: ties"].tolist() == (table + 3).tolist()
    assert record.path.read_text().endswith(f"{float(table[-1, -1] + 3)!r}\n")
    losses, _ = EvaluationRecord(tmp_path / "r", ["a", "b"], "loss", {"search": 1}).load()
    assert losses[0].metrics.tolist() == table[METRICS.index("loss")].tolist()
    with pytest.raises(ConfigError, match="holds evaluations of a different search"):
        EvaluationRecord(tmp_path / "r", ["a", "b"], "accuracy", {"search": 2}).load()
    with open(record.path, "a") as file:
        file.write("design,x,1,2,3\ndesign,0.1,0.2,3,4\n")
    with pytest.raises(ConfigError, match="line 4 is malformed"):
        record.load()


def test_a_control_column_is_recorded_beside_the_merged_ones(tmp_path: Path) -> None:
    record = EvaluationRecord(tmp_path / "r", ["a", "b", "c"], "loss", {"search": 1}, [False, True, False])
    record.create()
    assert record.columns[:3] == ["phase", "c_a", "c_c"] and "accuracy_b" in record.columns
    table = np.arange(3.0 * len(METRICS)).reshape(len(METRICS), 3)
    record.append("design", np.array([0.2, 0.7]), table)
    (point,), _ = record.load()
    assert point.metrics.tolist() == table[METRICS.index("loss"), [0, 2]].tolist()


def test_evaluations_are_reused_by_a_different_mode(zoo_manifest: Path, tmp_path: Path) -> None:
    config = ParetoConfig.model_validate(_config(zoo_manifest))
    run_pareto(config, tmp_path, baselines=False, search=QUICK)
    again = run_pareto(config, tmp_path, mode="bayesian", baselines=False, search=QUICK)
    assert again.reused_evaluations == 5  # bayesian's design (60% of 8) is the start of map's
    assert isinstance(again.front.evaluated[0], Evaluation)


def test_preference_files(tmp_path: Path) -> None:
    names = ["a", "b", "c"]
    assert load_preference(_write(tmp_path / "p.yaml", {"a": 2, "c": 0.5}), names) == [2.0, 0.0, 0.5]
    cases = {
        "unknown task 'd'": {"d": 1},
        "all weights are zero": {"a": 0, "b": 0},
        "weight of 'a' must be a finite number >= 0": {"a": -1},
        "weight of 'b' must be a finite number": {"b": "lots"},
        "expected a mapping of task name to weight": [1, 2],
    }
    for message, data in cases.items():
        with pytest.raises(ConfigError, match=message):
            load_preference(_write(tmp_path / "bad.yaml", data), names)


BAD_CONFIGS = {
    "two tasks share the name": lambda c: c | {"tasks": [c["tasks"][0], c["tasks"][0]]},
    "metric 'bleu' is not one the evaluator produces": lambda c: c | {"metric": "bleu"},
    "budget 2 is smaller than 3": lambda c: c | {"budget": 2},
    "unknown merge_method 'tie'": lambda c: c | {"merge_method": "tie"},
    "bounds: Value error, expected two numbers in [-1e6, 1e6], low < high": lambda c: c | {"bounds": [1, 0]},
    "tasks: List should have at least 2 items": lambda c: c | {"tasks": c["tasks"][:1]},
    "unknown key 'budgte'": lambda c: c | {"budgte": 3},
    "tasks[0].dataset: splt: Extra inputs are not permitted": lambda c: (
        c | {"tasks": [c["tasks"][0] | {"dataset": {"dataset_name": "x", "splt": "a"}}, c["tasks"][1]]}
    ),
}


@pytest.mark.parametrize("message", list(BAD_CONFIGS))
def test_bad_configs_fail_in_one_line_before_anything_is_written(
    zoo_manifest: Path, tmp_path: Path, message: str
) -> None:
    config = _write(tmp_path / "config.yaml", BAD_CONFIGS[message](_config(zoo_manifest)))
    out = tmp_path / "out"
    result = runner.invoke(app, ["pareto", str(config), "--results-path", str(out)])
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and message in result.output.replace("\n", " "), result.output
    assert "Traceback" not in result.output
    assert not out.exists()


def test_bad_options_fail_in_one_line(zoo_manifest: Path, tmp_path: Path) -> None:
    config = _write(tmp_path / "config.yaml", _config(zoo_manifest))
    preference = _write(tmp_path / "pref.yaml", {"nope": 1})
    cases = {
        "--mode greedy: choose one of map, bayesian, nested": ["--mode", "greedy"],
        "unknown task 'nope'": ["--preference", str(preference)],
        "--grid 1: needs 2 <= N": ["--grid", "1"],
        "--rule best: choose weighted_sum or chebyshev": ["--rule", "best"],
        "--pairing cosine: choose one of similarity, accuracy": ["--pairing", "cosine"],
        "--pairing accuracy: pairs tasks in nested mode only, not --mode map": ["--pairing", "accuracy"],
    }
    for message, options in cases.items():
        result = runner.invoke(app, ["pareto", str(config), "--results-path", str(tmp_path / "o"), *options])
        assert result.exit_code == 1 and message in result.output, result.output
        assert not (tmp_path / "o").exists()
    assert load_pareto_config(config).metric == "accuracy"


def test_a_search_killed_mid_run_resumes_to_the_same_files(zoo_manifest: Path, tmp_path: Path) -> None:
    import signal
    import subprocess
    import sys
    import time

    config = _write(tmp_path / "config.yaml", _config(zoo_manifest, budget=10))
    script = str(Path(sys.executable).with_name("m3sb"))

    def command(out: Path) -> list[str]:
        return [script, "pareto", str(config), "--results-path", str(out), "--no-baselines", "--quiet"]

    subprocess.run(command(tmp_path / "whole"), check=True, capture_output=True)
    process = subprocess.Popen(
        command(tmp_path / "cut"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    evaluations = tmp_path / "cut" / "evaluations.csv"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and (
        not evaluations.exists() or evaluations.read_text().count("\n") < 5
    ):
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    done_before = evaluations.read_text().count("\n") - 1
    assert 4 <= done_before < 10  # killed in the middle of the design
    subprocess.run(command(tmp_path / "cut"), check=True, capture_output=True)
    for name in ("front.csv", "evaluations.csv"):
        whole = pd.read_csv(tmp_path / "whole" / name)
        resumed = pd.read_csv(tmp_path / "cut" / name)
        pd.testing.assert_frame_equal(resumed, whole)


def test_autocast_is_part_of_what_a_resumed_search_must_share(zoo_manifest: Path) -> None:
    from m3sb.pareto.run import fingerprint

    plain = ParetoConfig.model_validate(_config(zoo_manifest))
    assert "autocast" not in fingerprint(plain)  # folders made before autocast existed still resume
    half = ParetoConfig.model_validate(_config(zoo_manifest, autocast="bfloat16"))
    assert fingerprint(half) != fingerprint(plain)


def test_a_search_on_another_metric_reuses_every_evaluation(zoo_manifest: Path, tmp_path: Path) -> None:
    folder = tmp_path / "run"
    accuracy = ParetoConfig.model_validate(_config(zoo_manifest))
    first = run_pareto(accuracy, folder, baselines=False, search=QUICK)
    loss = ParetoConfig.model_validate(_config(zoo_manifest, metric="loss"))
    second = run_pareto(loss, folder, baselines=False, search=QUICK)
    assert second.reused_evaluations >= 8  # the whole design; only the new front's checks are new
    table = pd.read_csv(folder / "evaluations.csv")
    design = table[table["phase"] == "design"]
    assert len(design) == 8 and set(table["phase"][len(first.front.evaluated) :]) <= {"front check"}
    names = first.task_names
    for evaluation in second.front.evaluated[:8]:
        row = design[np.isclose(design[f"c_{names[0]}"], evaluation.coefficients[0])]
        row = row[np.isclose(row[f"c_{names[1]}"], evaluation.coefficients[1])].iloc[0]
        assert [row[f"loss_{n}"] for n in names] == evaluation.metrics.tolist()


def test_a_control_task_is_recorded_but_not_searched(zoo_manifest: Path, tmp_path: Path) -> None:
    settings = _config(zoo_manifest, count=3)
    settings["tasks"][2]["control"] = True
    config = ParetoConfig.model_validate(settings)
    assert [t.name for t in config.merged_tasks] == [t["name"] for t in settings["tasks"][:2]]
    outcome = run_pareto(config, tmp_path / "run", baselines=False, search=QUICK)
    assert outcome.task_names == [t["name"] for t in settings["tasks"][:2]]
    assert outcome.front.coefficients.shape[1] == 2
    table = pd.read_csv(tmp_path / "run" / "evaluations.csv")
    control = settings["tasks"][2]["name"]
    assert f"c_{control}" not in table.columns and f"accuracy_{control}" in table.columns
    assert table[f"accuracy_{control}"].between(0, 100).all() and table[f"accuracy_{control}"].nunique() > 1
    with pytest.raises(ValueError, match="at least two tasks that are merged"):
        settings["tasks"][1]["control"] = True
        ParetoConfig.model_validate(settings)


def test_a_search_over_a_data_dependent_method_scales_its_shares(zoo_manifest: Path, tmp_path: Path) -> None:
    method = "regmean"  # fisher's shares are checked against its merge in tests/methods
    config = ParetoConfig.model_validate(
        _config(zoo_manifest, merge_method=method, budget=6, statistics={"samples": 16})
    )
    outcome = run_pareto(config, tmp_path / "run", baselines=False, search=QUICK)
    assert outcome.front.coefficients.shape[1] == 2
    from m3sb.experiment import Experiment
    from m3sb.pareto.run import load_problem

    problem = load_problem(config, lambda _: None)
    evaluator = MergeEvaluator(problem, torch.device("cpu"))
    at_ones = evaluator.backbone([1.0, 1.0])
    zoo = json.loads(zoo_manifest.read_text())
    tasks = zoo["tasks"][:2]
    experiment = Experiment(
        "zoo",
        [t["checkpoint"] for t in tasks],
        [{**t["dataset"], "max_samples": 90} for t in tasks],
        {method: {}},
        zoo["base_model_checkpoint"],
        device="cpu",
        statistics={"samples": 16},
    )
    whole = experiment._load().merge(method)
    for name, tensor in whole.items():
        if tensor.is_floating_point():
            error = float(
                (at_ones[name].double() - tensor.double()).norm() / tensor.double().norm().clamp_min(1e-12)
            )
            assert error <= 1e-5, name
    base = evaluator.backbone([0.0, 0.0])
    assert all(
        bool((base[n] == problem.base.backbone[n].float()).all()) for n in base if n in problem.base.backbone
    )
