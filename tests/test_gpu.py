"""On a CUDA device: evaluations match the CPU's, batching and autocast behave, merges repeat
bit for bit. Skipped where there is no GPU (CI); run on a lent GPU machine."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from m3sb.toy import Family

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.fixture(scope="module")
def problem(zoo_manifest: Path) -> Any:
    from m3sb.config import ParetoConfig
    from m3sb.pareto.run import load_problem

    zoo = json.loads(zoo_manifest.read_text())
    tasks = [
        {"name": t["name"], "model": t["checkpoint"], "dataset": {**t["dataset"], "max_samples": 200}}
        for t in zoo["tasks"]
    ]
    config = ParetoConfig.model_validate({"base_model": zoo["base_model_checkpoint"], "tasks": tasks})
    return load_problem(config, lambda _: None)


def _points(count: int = 6) -> np.ndarray:
    return np.random.default_rng(0).uniform(0.0, 1.0, size=(count, 5))


def test_auto_picks_the_gpu() -> None:
    from m3sb.devices import resolve_device

    assert resolve_device("auto").type == "cuda"


def test_gpu_scores_match_the_cpu(problem: Any) -> None:
    on_cpu = np.stack(problem.build("cpu").run(_points()))
    on_gpu = np.stack(problem.build("cuda").run(_points()))
    np.testing.assert_allclose(on_gpu, on_cpu, atol=1.0)  # accuracy in %: one image of 200 may flip
    assert np.mean(np.abs(on_gpu - on_cpu)) < 0.2


def test_batched_candidates_on_the_gpu_score_like_one_at_a_time(problem: Any) -> None:
    import dataclasses

    one = problem.build("cuda").run(_points())
    batched = dataclasses.replace(problem, candidates_per_pass=4).build("cuda").run(_points())
    np.testing.assert_allclose(np.stack(batched), np.stack(one), atol=1.0)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_autocast_scores_stay_close(problem: Any, dtype: str) -> None:
    import dataclasses

    exact = np.stack(problem.build("cuda").run(_points()))
    half = np.stack(dataclasses.replace(problem, autocast=dtype).build("cuda").run(_points()))
    assert np.max(np.abs(half - exact)) <= 3.0


def test_gpu_evaluations_repeat_exactly(problem: Any) -> None:
    evaluator = problem.build("cuda")
    first = np.stack(evaluator.run(_points()))
    again = np.stack(problem.build("cuda").run(_points()))
    np.testing.assert_array_equal(first, again)


@pytest.mark.parametrize("method", ["barycenter", "ties", "task_arithmetic", "dare_ties"])
def test_gpu_merges_repeat_bit_for_bit(method: str, family: Family, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from m3sb.config import parse_merge_config
    from m3sb.merge import merge_to_folder

    per_model = {"weight": 0.5, **({"density": 0.5} if method in ("ties", "dare_ties") else {})}
    top = {"parameters": {"space": "task_vectors"}} if method == "barycenter" else {}
    models = [{"model": str(p), "parameters": per_model} for p in family.models]
    recipe = parse_merge_config(
        {"merge_method": method, "base_model": str(family.base), "models": models, **top}
    )
    outputs = []
    for run in range(2):
        merge_to_folder(recipe, tmp_path / f"run{run}", device="cuda")
        outputs.append(load_file(tmp_path / f"run{run}" / "model.safetensors"))
    for name, tensor in outputs[0].items():
        assert torch.equal(outputs[1][name], tensor), name
