"""M3SB experiments on the digits zoo: references, merges, the results table, bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from m3sb.cli import app
from m3sb.config import ExperimentConfig
from m3sb.errors import ConfigError, MergeError
from m3sb.experiment import RESULT_COLUMNS, Experiment, TaskVectorExperiment
from m3sb.tasks.data import DataError

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def zoo(zoo_manifest: Path) -> dict[str, Any]:
    return dict(json.loads(zoo_manifest.read_text()))


def _arguments(zoo: dict[str, Any], merges: dict[str, dict[str, Any]], tasks: int = 3) -> dict[str, Any]:
    chosen = zoo["tasks"][:tasks]
    return {
        "name": "zoo",
        "model_checkpoints": [task["checkpoint"] for task in chosen],
        "datasets_config": [task["dataset"] | {"max_samples": 120} for task in chosen],
        "merge_configs": merges,
        "base_model_checkpoint": zoo["base_model_checkpoint"],
    }


@pytest.mark.parametrize("kind", [Experiment, TaskVectorExperiment])
def test_one_hot_weights_reproduce_the_finetuned_model(zoo: dict[str, Any], kind: type[Experiment]) -> None:
    merges = {"linear": {"weights": [0, 1, 0]}, "barycenter": {"weights": [0, 1, 0]}}
    results = kind(**_arguments(zoo, merges)).run()
    assert tuple(results.columns) == RESULT_COLUMNS
    second = _arguments(zoo, {})["datasets_config"][1]["dataset_name"].split("/")[-1]
    rows = results[results["dataset"] == second].set_index("merge_method")
    for method in ("linear", "barycenter"):
        for metric in ("accuracy", "precision", "recall", "f1_score"):
            assert rows.loc[method, metric] == rows.loc["finetuned", metric]
        assert rows.loc[method, "normalized_accuracy"] == pytest.approx(100.0)


def test_reference_rows_and_merges_are_scored_on_every_dataset(zoo: dict[str, Any]) -> None:
    merges = {"linear": {}, "ties": {"density": 0.2}, "my-dare": {"method": "dare_ties", "density": 0.3}}
    results = Experiment(**_arguments(zoo, merges)).run()
    assert list(dict.fromkeys(results["merge_method"])) == ["finetuned", "base", "linear", "ties", "my-dare"]
    assert (results.groupby("merge_method").size() == 3).all()
    assert (results["samples"] == 120).all() and (results["skipped_images"] == 0).all()
    finetuned = results[results["merge_method"] == "finetuned"]
    assert (finetuned["accuracy"] >= 85).all()
    base = results[results["merge_method"] == "base"]
    assert base["accuracy"].mean() < finetuned["accuracy"].mean() - 10


def test_linear_merge_is_the_same_in_both_spaces(zoo: dict[str, Any]) -> None:
    """base + mean(model - base) = mean(model): the two experiment classes must agree."""
    merges = {"linear": {"weights": [1, 2, 3]}}
    full = Experiment(**_arguments(zoo, merges)).run()
    task_vectors = TaskVectorExperiment(**_arguments(zoo, merges)).run()
    pd.testing.assert_frame_equal(full, task_vectors, atol=1e-9)


def test_bad_input_is_named_before_heavy_work(zoo: dict[str, Any], tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"merge_configs\['linear'\]: 2 weights for 3 models"):
        Experiment(**_arguments(zoo, {"linear": {"weights": [1, 1]}}))
    with pytest.raises(ConfigError, match=r"merge_configs\['ties'\]: unknown parameter 'densty' for 'ties'"):
        Experiment(**_arguments(zoo, {"ties": {"densty": 0.5}}))
    with pytest.raises(ConfigError, match="unknown merge_method 'soup'"):
        Experiment(**_arguments(zoo, {"soup": {}}))
    with pytest.raises(ConfigError, match="3 model_checkpoints but 2 datasets_config"):
        Experiment(**(_arguments(zoo, {"linear": {}}) | {"datasets_config": zoo["tasks"][0:2]}))
    arguments = _arguments(zoo, {"linear": {}})
    arguments["datasets_config"][0] = arguments["datasets_config"][0] | {"label_col": "digit"}
    with pytest.raises(DataError, match="no column 'digit'; columns are image, label"):
        Experiment(**arguments).run()
    arguments = _arguments(zoo, {"linear": {}}, tasks=5)
    arguments["model_checkpoints"][0] = zoo["tasks"][4]["checkpoint"]  # a 2-class head on a 10-class dataset
    with pytest.raises(DataError, match=r"label [2-9] is outside the classifier's range 0\.\.1"):
        Experiment(**arguments).run()


def test_backbones_that_differ_are_refused(zoo: dict[str, Any], tmp_path: Path) -> None:
    from transformers import ViTConfig, ViTForImageClassification

    other = ViTConfig(
        image_size=8,
        patch_size=2,
        num_channels=1,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
    )
    other.num_labels = 10
    ViTForImageClassification(other).save_pretrained(tmp_path / "other")
    shutil.copy(Path(zoo["tasks"][0]["checkpoint"]) / "preprocessor_config.json", tmp_path / "other")
    arguments = _arguments(zoo, {"linear": {}})
    arguments["model_checkpoints"][2] = str(tmp_path / "other")
    missing_layer = r"backbones differ: tensor 'vit\.layers\.[23]\..*' is in .*rotated but not in .*other"
    with pytest.raises(MergeError, match=missing_layer):
        Experiment(**arguments).run()


def test_experiment_command_writes_results_csv(zoo: dict[str, Any], tmp_path: Path) -> None:
    document = _arguments(zoo, {"linear": {}, "barycenter": {}}) | {"task_vectors": True}
    config = tmp_path / "experiment.yml"
    config.write_text(yaml.safe_dump(document))
    result = CliRunner().invoke(app, ["experiment", str(config), "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    table = pd.read_csv(tmp_path / "out" / "results.csv")
    assert tuple(table.columns) == RESULT_COLUMNS
    assert set(table["merge_method"]) == {"finetuned", "base", "linear", "barycenter"}
    report = (tmp_path / "out" / "report.html").read_text()
    assert report.count('src="data:image/png;base64,') == 4
    for title in ("radar", "per task and method", "relative to the fine-tuned", "hypersphere"):
        assert title in report
    for figure in ("radar.png", "bars.png", "heatmap.png", "sphere.png"):
        assert (tmp_path / "out" / figure).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


MERGES = {"linear": {}, "ties": {"density": 0.3}, "barycenter": {}, "task_arithmetic": {"weights": [0.3] * 3}}


def test_an_interrupted_experiment_resumes_without_scoring_finished_merges_again(
    zoo: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from m3sb.experiment import ExperimentWorker

    whole = TaskVectorExperiment(**_arguments(zoo, MERGES)).run()
    scored: list[str] = []
    original = ExperimentWorker.run

    def counting(self: ExperimentWorker, label: str) -> Any:
        if label == "barycenter" and "stop" not in scored:
            scored.append("stop")
            raise KeyboardInterrupt
        scored.append(label)
        return original(self, label)

    monkeypatch.setattr(ExperimentWorker, "run", counting)
    record = tmp_path / "scores.jsonl"
    with pytest.raises(KeyboardInterrupt):
        TaskVectorExperiment(**_arguments(zoo, MERGES)).run(record=record)
    assert scored == ["finetuned", "base", "linear", "ties", "stop"]
    with record.open("a") as file:
        file.write('{"label": "barycenter", "metr')  # a line torn by the crash
    resumed = TaskVectorExperiment(**_arguments(zoo, MERGES)).run(record=record)
    assert scored[5:] == ["barycenter", "task_arithmetic"]
    pd.testing.assert_frame_equal(resumed, whole)
    again = TaskVectorExperiment(**_arguments(zoo, MERGES)).run(record=record)
    assert scored[7:] == []  # everything was on record
    pd.testing.assert_frame_equal(again, whole)
    changed = _arguments(zoo, MERGES | {"ties": {"density": 0.5}})
    TaskVectorExperiment(**changed).run(record=record)
    assert scored[7:] == ["ties"]  # only the merge whose config changed is scored again
    del scored[7:]
    other = _arguments(zoo, MERGES)
    other["datasets_config"] = [spec | {"max_samples": 60} for spec in other["datasets_config"]]
    before = record.read_bytes()
    with pytest.raises(ConfigError, match=r"scores\.jsonl: holds the scores of another experiment"):
        TaskVectorExperiment(**other).run(record=record)
    assert record.read_bytes() == before and len(scored) == 7  # refused, nothing overwritten or scored


def test_an_experiment_killed_with_sigkill_resumes_to_the_same_results(
    zoo: dict[str, Any], tmp_path: Path
) -> None:
    import os
    import signal
    import subprocess
    import sys
    import time

    document = _arguments(zoo, MERGES) | {"task_vectors": True}
    config = tmp_path / "experiment.yml"
    config.write_text(yaml.safe_dump(document))
    command = [sys.executable, "-m", "m3sb.cli", "experiment", str(config), "--out"]
    whole = subprocess.run([*command, str(tmp_path / "whole")], capture_output=True, text=True)
    assert whole.returncode == 0, whole.stderr
    killed = subprocess.Popen([*command, str(tmp_path / "killed")], stdout=subprocess.DEVNULL)
    scores = tmp_path / "killed" / "scores.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and killed.poll() is None:
        if scores.is_file() and len(scores.read_text().splitlines()) >= 4:  # header + 3 labels
            break
        time.sleep(0.05)
    os.kill(killed.pid, signal.SIGKILL)
    killed.wait()
    kept = len(scores.read_text().splitlines()) - 1
    assert 3 <= kept < 6, "the kill came too late to test anything"
    resumed = subprocess.run([*command, str(tmp_path / "killed")], capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming: {kept} of 6 scored" in resumed.stdout
    assert (tmp_path / "killed" / "results.csv").read_text() == (
        tmp_path / "whole" / "results.csv"
    ).read_text()


def test_sphere_coordinates_of_the_models() -> None:
    """PCA of unit vectors: scale does not matter, and symmetric points land symmetrically."""
    import torch

    from m3sb.plots import sphere_coordinates

    points = {
        "a": torch.tensor([1.0, 0.0, 0.0]),
        "b": torch.tensor([0.0, 5.0, 0.0]),
        "c": torch.tensor([-2.0, 0.0, 0.0]),
    }
    coordinates = sphere_coordinates(points)
    assert abs(coordinates["a"][0] + coordinates["c"][0]) < 1e-9  # a and c are antipodal directions
    assert abs(abs(coordinates["a"][0]) - 1.0) < 1e-9


@pytest.mark.parametrize(
    ("merges", "message"),
    [
        ({"finetuned": {}}, r"merge_configs\['finetuned'\]: 'finetuned' names the reference rows"),
        ({"ties": {"density": [0.5] * 4}}, r"merge_configs\['ties'\]: 4 values of 'density' for 3 models"),
        ({"linear": {"weights": [1, -1, 0]}}, r"weights sum to zero in merge_configs\['linear'\]"),
        ({"linear": {"weights": 5}}, r"merge_configs\['linear'\]: weights must be a list of 3 numbers"),
    ],
)
def test_merge_configs_are_checked_before_anything_loads(
    zoo: dict[str, Any], merges: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        Experiment(**_arguments(zoo, merges))


def test_remote_code_is_never_run_unless_the_config_asks(zoo: dict[str, Any], tmp_path: Path) -> None:
    from m3sb.errors import CheckpointError
    from m3sb.tasks.image_classification import load_task_model

    folder = tmp_path / "custom"
    shutil.copytree(zoo["tasks"][0]["checkpoint"], folder)
    marker = tmp_path / "code-ran"
    (folder / "evil_config.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).touch()\n"
        "from transformers import ViTConfig\nclass EvilConfig(ViTConfig):\n    model_type = 'evil'\n"
    )
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil_config.EvilConfig"}
    config["model_type"] = "evil"  # only the folder's own code could load it
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"custom: cannot load an image classifier"):
        load_task_model(str(folder))
    assert not marker.exists()
    document = _arguments(zoo, {"linear": {}})
    document["model_checkpoints"][0] = str(folder)
    path = tmp_path / "experiment.yml"
    path.write_text(yaml.safe_dump(document))
    result = CliRunner().invoke(app, ["experiment", str(path), "--out", str(tmp_path / "out")])
    assert result.exit_code == 1 and "cannot load an image classifier" in result.output
    assert not marker.exists()
    assert ExperimentConfig.model_fields["trust_remote_code"].default is False


def test_a_control_task_is_scored_with_every_merge_but_not_merged(zoo: dict[str, Any]) -> None:
    arguments = _arguments(zoo, {"linear": {"weights": [1, 1]}, "barycenter": {"weights": [1, 1]}})
    arguments["datasets_config"][2] = arguments["datasets_config"][2] | {"control": True}
    with_control = Experiment(**arguments).run()
    plain = _arguments(zoo, {"linear": {"weights": [1, 1]}, "barycenter": {"weights": [1, 1]}}, tasks=2)
    without = Experiment(**plain).run()
    control = arguments["datasets_config"][2]["dataset_name"].split("/")[-1]
    merged_rows = with_control[with_control["dataset"] != control].reset_index(drop=True)
    columns = [c for c in RESULT_COLUMNS if c != "control"]
    pd.testing.assert_frame_equal(merged_rows[columns], without[columns])  # the control changed no merge
    rows = with_control[with_control["dataset"] == control]
    assert list(rows["merge_method"]) == ["finetuned", "base", "linear", "barycenter"]
    assert rows["control"].all() and not merged_rows["control"].any()
    assert (rows["samples"] == 120).all() and rows["accuracy"].between(0, 100).all()
    with pytest.raises(ConfigError, match=r"3 weights for 2 merged models; give one per merged model"):
        Experiment(**(arguments | {"merge_configs": {"linear": {"weights": [1, 1, 1]}}}))
    every = [entry | {"control": True} for entry in arguments["datasets_config"]]
    with pytest.raises(ConfigError, match="every task is a control"):
        Experiment(**(arguments | {"datasets_config": every}))
    with pytest.raises(ConfigError, match=r"datasets_config\[0\]: unknown kind 'clip'; choose one of"):
        Experiment(
            **(
                arguments
                | {"datasets_config": [{**arguments["datasets_config"][0], "kind": "clip"}, *every[1:]]}
            )
        )


def test_the_default_device_is_auto() -> None:
    import inspect

    assert inspect.signature(Experiment).parameters["device"].default == "auto"
