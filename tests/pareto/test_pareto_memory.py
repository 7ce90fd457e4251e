"""A search that cannot fit in memory is refused in one line, before any model is loaded."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

import m3sb.memory
from m3sb.checkpoints import open_checkpoint
from m3sb.config import ParetoConfig
from m3sb.errors import ConfigError
from m3sb.pareto.merging import search_memory_bytes
from m3sb.pareto.run import run_pareto
from m3sb.toy import Family


def test_the_memory_rule_counts_loaded_models_and_flat_copies() -> None:
    # 7B bfloat16, 4 tasks: 5 models twice in 2 bytes + 6 float32 vectors = 44 bytes a parameter
    assert search_memory_bytes(7_000_000_000, 2, 4) == 7_000_000_000 * 44
    # candidates in the models' bfloat16: 6 vectors of 2 bytes
    assert search_memory_bytes(7_000_000_000, 2, 4, 2) == 7_000_000_000 * 32


def test_a_search_too_large_for_the_memory_is_refused_before_loading(
    family: Family, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tasks = [
        {
            "name": f"t{i}",
            "model": str(m),
            "kind": "causal_lm",
            "dataset": {"dataset_name": str(tmp_path / "none")},
        }
        for i, m in enumerate(family.models[:2])
    ]
    config = ParetoConfig.model_validate({"base_model": str(family.base), "tasks": tasks})
    infos = [i for i in open_checkpoint(str(family.base)).tensors.values() if i.dtype.is_floating_point]
    needed = search_memory_bytes(sum(math.prod(i.shape) for i in infos), 4, 2)
    monkeypatch.setattr(m3sb.memory, "available_bytes", lambda: needed - 1)
    with pytest.raises(
        ConfigError,
        match=r"^2 tasks of a 0\.00B-parameter model need about .* GB \(each model "
        r"loaded, and 4 float32 flat copies\), but .* GB is available",
    ):
        run_pareto(config, tmp_path / "out", device="cpu")
    assert not (tmp_path / "out" / "evaluations.csv").exists()


def test_an_unmeasured_metric_is_recorded_as_nan_and_the_record_resumes(tmp_path: Path) -> None:
    import numpy as np

    from m3sb.pareto.records import EvaluationRecord
    from m3sb.tasks.metrics import METRICS

    record = EvaluationRecord(tmp_path / "r", ["lm", "img"], "accuracy", {"search": 1})
    record.create()
    table = np.full((len(METRICS), 2), 1.5)
    table[1:, 0] = np.nan  # an lm_eval task: accuracy only
    record.append("design", np.array([0.2, 0.8]), table)
    points, _ = EvaluationRecord(tmp_path / "r", ["lm", "img"], "accuracy", {"search": 1}).load()
    assert points[0].metrics.tolist() == [1.5, 1.5]
    with pytest.raises(ConfigError, match="line 2 is malformed"):  # the objective itself must be measured
        EvaluationRecord(tmp_path / "r", ["lm", "img"], "loss", {"search": 1}).load()


def test_lm_eval_tasks_are_searched_on_accuracy_only(family: Family, tmp_path: Path) -> None:
    from m3sb.pareto.run import check_run

    tasks = [
        {"name": f"t{i}", "model": str(m), "kind": "lm_eval", "dataset": {"dataset_name": "arc_easy"}}
        for i, m in enumerate(family.models[:2])
    ]
    config = ParetoConfig.model_validate({"base_model": str(family.base), "tasks": tasks, "metric": "loss"})
    with pytest.raises(ConfigError, match=r"^metric 'loss': lm_eval tasks \(t0, t1\) measure accuracy only"):
        check_run(config, "map", None, None)
