"""lm-evaluation-harness tasks: a local task YAML over generated data scores the same through
m3sb (the model's weights swapped in memory) as through lm-eval's own ``simple_evaluate``;
unknown tasks and metrics are refused before any evaluation."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from m3sb.errors import ConfigError
from m3sb.tasks.data import DataError, DatasetSpec
from m3sb.tasks.harness import evaluate, load_task_model, prepare
from m3sb.tasks.registry import check_kind_keys

CPU = torch.device("cpu")
TASK = """task: m3sb_{name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{prompt}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
target_delimiter: ""
metric_list:
  - metric: acc
"""


def _local_task(zoo: dict[str, Any], skill: str, folder: Path) -> Path:
    from datasets import load_from_disk

    entry = next(t for t in zoo["tasks"] if t["name"] == skill)
    rows = load_from_disk(entry["dataset"]["dataset_name"])["test"]
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / f"{skill}.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    path = folder / f"{skill}.yaml"
    path.write_text(TASK.format(name=skill, data=data), encoding="utf-8")
    return path


def _simple_evaluate(checkpoint: str, task_file: Path, limit: int | None = None) -> float:
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(checkpoint).eval()
    wrapped = HFLM(pretrained=model, tokenizer=AutoTokenizer.from_pretrained(checkpoint), batch_size=32)
    name = "m3sb_" + task_file.stem
    results = simple_evaluate(
        model=wrapped,
        tasks=[name],
        task_manager=TaskManager(include_path=str(task_file.parent)),
        limit=limit,
        log_samples=False,
        bootstrap_iters=0,
    )
    return 100.0 * float(results["results"][name]["acc,none"])


@pytest.fixture(scope="module")
def zoo(text_zoo_manifest: Path) -> dict[str, Any]:
    return dict(json.loads(text_zoo_manifest.read_text()))


def test_a_local_task_scores_as_lm_evals_own_run_with_weights_swapped_in_memory(
    zoo: dict[str, Any], tmp_path: Path
) -> None:
    task_file = _local_task(zoo, "count", tmp_path / "tasks")
    count = next(t for t in zoo["tasks"] if t["name"] == "count")["checkpoint"]
    model = load_task_model(count)
    spec = DatasetSpec(dataset_name=str(task_file), max_samples=120)
    data = prepare(spec, model, None)
    assert data.count == 120
    own = evaluate(model, None, data, CPU, batch_size=32)
    assert own["accuracy"] == pytest.approx(_simple_evaluate(count, task_file, limit=120))
    base = load_task_model(zoo["base_model_checkpoint"], with_processor=False)
    swapped = evaluate(model, base.backbone, data, CPU, batch_size=32)
    assert swapped["accuracy"] == pytest.approx(
        _simple_evaluate(zoo["base_model_checkpoint"], task_file, 120)
    )
    assert swapped["accuracy"] != own["accuracy"]
    assert evaluate(model, None, data, CPU, batch_size=32)["accuracy"] == own["accuracy"]  # weights restored


def test_unknown_tasks_and_metrics_are_refused_before_any_evaluation(
    zoo: dict[str, Any], tmp_path: Path
) -> None:
    task_file = _local_task(zoo, "sort", tmp_path / "tasks")
    model = load_task_model(zoo["tasks"][0]["checkpoint"])
    with pytest.raises(DataError, match=r"^no_such_task_m3sb: lm-eval has no task 'no_such_task_m3sb'$"):
        prepare(DatasetSpec(dataset_name="no_such_task_m3sb"), model)
    with pytest.raises(DataError, match=r"task 'm3sb_sort' reports acc,none, not 'exact_match,none'"):
        prepare(DatasetSpec(dataset_name=str(task_file), metric="exact_match,none"), model)
    nameless = tmp_path / "nameless.yaml"
    nameless.write_text("dataset_path: json\n")
    with pytest.raises(DataError, match=r"has no 'task:' name"):
        prepare(DatasetSpec(dataset_name=str(nameless)), model)
    with pytest.raises(ConfigError, match=r"num_fewshot: only kind lm_eval uses num_fewshot"):
        check_kind_keys("causal_lm", DatasetSpec(dataset_name="x", num_fewshot=2), "datasets_config[0]")
