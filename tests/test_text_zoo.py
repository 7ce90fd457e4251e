"""The text zoo builds offline and makes a language-model merging benchmark: each fine-tune
beats the base on its skill, exact match is what greedy generation gives, one-hot merges
score as the fine-tunes do, and MAP finds merges that task arithmetic at 0.3 misses."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch

from m3sb.config import ParetoConfig
from m3sb.experiment import Experiment
from m3sb.pareto import SearchSettings
from m3sb.pareto.run import run_pareto
from m3sb.tasks.causal_lm import evaluate, load_task_model, prepare
from m3sb.tasks.data import DatasetSpec
from m3sb.text_zoo import SKILLS, SPLIT_SIZES

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def zoo(text_zoo_manifest: Path) -> dict[str, Any]:
    return dict(json.loads(text_zoo_manifest.read_text()))


def test_each_fine_tune_beats_the_base_on_its_skill(zoo: dict[str, Any]) -> None:
    assert [task["name"] for task in zoo["tasks"]] == list(SKILLS)
    for task in zoo["tasks"]:
        assert task["finetuned_exact_match"] >= task["base_exact_match"] + 30.0, task["name"]
    from datasets import load_from_disk

    for task in zoo["tasks"]:
        splits = load_from_disk(task["dataset"]["dataset_name"])
        assert {name: len(splits[name]) for name in splits} == SPLIT_SIZES
        assert not set(splits["test"]["prompt"]) & set(splits["train"]["prompt"])


def _generated_exact_match(checkpoint: str, rows: Any, cap: int) -> float:
    """Exact match by transformers' own greedy generation, one prompt at a time."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(checkpoint).eval()
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    hits = 0
    for row in rows:
        ids = torch.tensor([tokenizer(row["prompt"])["input_ids"]])
        with torch.no_grad():
            out = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=cap + 1,
                do_sample=False,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        new = out[0, ids.shape[1] :].tolist()
        ended = tokenizer.eos_token_id in new
        text = tokenizer.decode(new[: new.index(tokenizer.eos_token_id)] if ended else new)
        hits += int(ended and text == row["answer"])
    return 100.0 * hits / len(rows)


@pytest.mark.parametrize("skill", ["add", "count"])
def test_exact_match_equals_greedy_generation(zoo: dict[str, Any], skill: str, tmp_path: Path) -> None:
    from datasets import load_from_disk

    task = next(t for t in zoo["tasks"] if t["name"] == skill)
    rows = load_from_disk(task["dataset"]["dataset_name"])["test"]
    model = load_task_model(task["checkpoint"])
    spec = DatasetSpec(dataset_name=task["dataset"]["dataset_name"], format="exact_match", max_new_tokens=4)
    metrics = evaluate(model, None, prepare(spec, model, tmp_path), CPU, batch_size=64)
    generated = _generated_exact_match(task["checkpoint"], rows, 4)
    assert metrics["accuracy"] == pytest.approx(generated)
    assert 10.0 < generated < 100.0  # some right, some wrong: the comparison means something


def test_one_hot_merges_score_exactly_as_the_fine_tunes(zoo: dict[str, Any]) -> None:
    tasks = zoo["tasks"][:3]
    merges = {
        f"one_hot_{i}": {"method": "linear", "weights": [float(i == j) for j in range(3)]} for i in range(3)
    }
    experiment = Experiment(
        "one-hot",
        [t["checkpoint"] for t in tasks],
        [{**t["dataset"], "max_samples": 60} for t in tasks],
        merges,
        zoo["base_model_checkpoint"],
        device="cpu",
    )
    experiment.run()
    results = experiment.get_results_df().set_index(["merge_method", "dataset"])
    metrics = ["accuracy", "precision", "recall", "f1_score", "loss"]
    for index, task in enumerate(tasks):
        own = results.loc[("finetuned", task["name"]), metrics]
        merged = results.loc[(f"one_hot_{index}", task["name"]), metrics]
        assert own.tolist() == merged.tolist(), task["name"]
    assert results.loc[("finetuned", "reverse"), "accuracy"] > results.loc[("base", "reverse"), "accuracy"]


@pytest.mark.slow
def test_map_on_two_skills_beats_task_arithmetic_at_0_3(zoo: dict[str, Any], tmp_path: Path) -> None:
    chosen = [t for t in zoo["tasks"] if t["name"] in ("reverse", "sort")]
    config = ParetoConfig.model_validate(
        {
            "base_model": zoo["base_model_checkpoint"],
            "tasks": [
                {
                    "name": t["name"],
                    "model": t["checkpoint"],
                    "kind": "causal_lm",
                    "dataset": {
                        "dataset_name": t["dataset"]["dataset_name"],
                        "split": "validation",
                        "format": "exact_match",
                    },
                }
                for t in chosen
            ],
        }
    )
    outcome = run_pareto(config, tmp_path / "map", device="cpu", search=SearchSettings(generations=30))
    evaluations = pd.read_csv(tmp_path / "map" / "evaluations.csv")
    columns = [f"accuracy_{t['name']}" for t in chosen]
    searched = evaluations[evaluations["phase"] == "front check"][columns].to_numpy().mean(1)
    baseline = float(np.mean(outcome.baselines["task arithmetic (0.3)"]))
    assert searched.max() > baseline + 10.0


def _bfloat16_copy(checkpoint: str, folder: Path) -> str:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    AutoModelForCausalLM.from_pretrained(checkpoint).to(torch.bfloat16).save_pretrained(folder)
    AutoTokenizer.from_pretrained(checkpoint).save_pretrained(folder)
    return str(folder)


def test_candidates_in_the_models_bfloat16_take_half_the_memory_and_score_alike(
    zoo: dict[str, Any], tmp_path: Path
) -> None:
    from m3sb.pareto.merging import MergeEvaluator
    from m3sb.pareto.run import load_problem

    chosen = [t for t in zoo["tasks"] if t["name"] in ("reverse", "sort")]
    base = _bfloat16_copy(zoo["base_model_checkpoint"], tmp_path / "base")
    tasks = [
        {
            "name": t["name"],
            "model": _bfloat16_copy(t["checkpoint"], tmp_path / t["name"]),
            "kind": "causal_lm",
            "dataset": {"dataset_name": t["dataset"]["dataset_name"], "format": "exact_match"},
        }
        for t in chosen
    ]
    problems = {
        dtype: load_problem(
            ParetoConfig.model_validate({"base_model": base, "tasks": tasks, "candidate_dtype": dtype}),
            lambda _: None,
        )
        for dtype in ("float32", "model")
    }
    wide, narrow = problems["float32"].flat, problems["model"].flat
    assert narrow.dtype == torch.bfloat16 and wide.dtype == torch.float32
    assert narrow.vectors.nbytes * 2 == wide.vectors.nbytes and narrow.base.nbytes * 2 == wide.base.nbytes
    coefficients = np.array([0.6, 0.3])
    evaluators = {dtype: MergeEvaluator(problem, CPU) for dtype, problem in problems.items()}
    candidates = {dtype: evaluator.backbone(coefficients) for dtype, evaluator in evaluators.items()}
    for name, tensor in candidates["float32"].items():
        other = candidates["model"][name]
        assert other.dtype == torch.bfloat16
        assert torch.allclose(other.float(), tensor, rtol=2e-2, atol=2e-3), name
    scores = {dtype: evaluator(coefficients) for dtype, evaluator in evaluators.items()}
    assert np.abs(scores["model"] - scores["float32"]).max() <= 5.0
