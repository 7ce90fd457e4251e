"""On the same YAML, m3sb's output equals mergekit 0.1.5's for the methods both tools have."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from m3sb.checkpoints import open_checkpoint
from m3sb.config import parse_merge_config
from m3sb.merge import merge_to_folder
from m3sb.toy import Family

mergekit_config = pytest.importorskip("mergekit.config", reason="mergekit is in the dev dependency group")
mergekit_merge = pytest.importorskip("mergekit.merge")


def _recipes(family: Family) -> dict[str, dict[str, Any]]:
    models = [str(path) for path in family.models]
    base = str(family.base)
    return {
        "linear": {
            "merge_method": "linear",
            "models": [
                {"model": m, "parameters": {"weight": w}}
                for m, w in zip(models, [0.2, 0.3, 0.5], strict=True)
            ],
        },
        "task_arithmetic": {
            "merge_method": "task_arithmetic",
            "base_model": base,
            "models": [
                {"model": m, "parameters": {"weight": w}}
                for m, w in zip(models, [0.5, 0.3, 0.7], strict=True)
            ],
            "parameters": {"lambda": 0.8},
        },
        "ties": {
            "merge_method": "ties",
            "base_model": base,
            "models": [
                {"model": m, "parameters": {"weight": w, "density": d}}
                for m, w, d in zip(models, [1.0, 0.5, 0.8], [0.3, 0.5, 0.7], strict=True)
            ],
        },
        "karcher": {"merge_method": "karcher", "base_model": base, "models": [{"model": m} for m in models]},
        "karcher_without_base": {"merge_method": "karcher", "models": [{"model": m} for m in models]},
    }


def _max_relative_error(ours: Path, theirs: Path) -> float:
    a, b = open_checkpoint(ours), open_checkpoint(theirs)
    assert set(a.tensors) == set(b.tensors)
    worst = 0.0
    for name in a.tensors:
        x, y = a.load(name).double(), b.load(name).double()
        worst = max(worst, float((x - y).norm() / y.norm().clamp_min(1e-30)))
    return worst


# mergekit's karcher stops at tol 1e-5 after at most 10 steps; ours converges further.
TOLERANCE = {
    "linear": 1e-6,
    "task_arithmetic": 1e-6,
    "ties": 1e-6,
    "karcher": 1e-4,
    "karcher_without_base": 1e-4,
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(TOLERANCE))
def test_output_matches_mergekit(name: str, family: Family, tmp_path: Path) -> None:
    recipe = _recipes(family)[name] | {"dtype": "float32"}
    theirs = tmp_path / "mergekit"
    mergekit_merge.run_merge(
        mergekit_config.MergeConfiguration.model_validate(recipe),
        str(theirs),
        options=mergekit_merge.MergeOptions(quiet=True, copy_tokenizer=False, write_model_card=False),
    )
    ours = merge_to_folder(parse_merge_config(recipe), tmp_path / "m3sb").out_dir
    assert _max_relative_error(ours, theirs) <= TOLERANCE[name]
