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
        "linear_with_a_base_model_outside_the_models": {  # mergekit merges it as one more model
            "merge_method": "linear",
            "base_model": base,
            "models": [{"model": m} for m in models[:2]],
            "parameters": {"weight": 0.5},
        },
        "ties_with_gradients_and_int8_mask": {
            "merge_method": "ties",
            "base_model": base,
            "models": [
                {"model": models[0], "parameters": {"weight": [0.2, 1.0], "density": [0.2, 0.9]}},
                {"model": models[1], "parameters": {"weight": 0.5, "density": 0.5}},
            ],
            "parameters": {"int8_mask": True, "normalize": False},
        },
        "task_arithmetic_with_filtered_gradient": {
            "merge_method": "task_arithmetic",
            "base_model": base,
            "models": [
                {
                    "model": m,
                    "parameters": {
                        "weight": [{"filter": "self_attn", "value": [0.1, 0.9]}, {"value": [1.0, 0.3, 0.5]}]
                    },
                }
                for m in models[:2]
            ],
        },
        "breadcrumbs_ties": {
            "merge_method": "breadcrumbs_ties",
            "base_model": base,
            "models": [
                {"model": m, "parameters": {"weight": w, "density": 0.6, "gamma": 0.05}}
                for m, w in zip(models, [1.0, 0.6, 0.3], strict=True)
            ],
        },
        "breadcrumbs": {
            "merge_method": "breadcrumbs",
            "base_model": base,
            "models": [
                {"model": m, "parameters": {"weight": 0.4, "density": 0.7, "gamma": 0.02}} for m in models
            ],
        },
        "sce": {"merge_method": "sce", "base_model": base, "models": [{"model": m} for m in models]},
        "sce_select_topk": {
            "merge_method": "sce",
            "base_model": base,
            "models": [{"model": m} for m in models],
            "parameters": {"select_topk": 0.3},
        },
        "nuslerp": {
            "merge_method": "nuslerp",
            "models": [
                {"model": models[0], "parameters": {"weight": 0.3}},
                {"model": models[1], "parameters": {"weight": 0.7}},
            ],
        },
        "nuslerp_task_vectors_row_wise": {
            "merge_method": "nuslerp",
            "base_model": base,
            "models": [
                {"model": models[0], "parameters": {"weight": 1.0}},
                {"model": models[2], "parameters": {"weight": 2.0}},
            ],
            "parameters": {"nuslerp_flatten": False, "nuslerp_row_wise": True},
        },
        "nuslerp_task_vectors_per_row": {
            "merge_method": "nuslerp",
            "base_model": base,
            "models": [
                {"model": models[0], "parameters": {"weight": 1.0}},
                {"model": models[1], "parameters": {"weight": 1.0}},
            ],
            "parameters": {"nuslerp_flatten": False},
        },
        "multislerp": {
            "merge_method": "multislerp",
            "models": [
                {"model": m, "parameters": {"weight": w}}
                for m, w in zip(models, [0.2, 0.3, 0.5], strict=True)
            ],
        },
        "multislerp_task_vectors": {
            "merge_method": "multislerp",
            "base_model": base,
            "models": [
                {"model": m, "parameters": {"weight": w}} for m, w in zip(models[:2], [1.0, 3.0], strict=True)
            ],
        },
        "nearswap": {
            "merge_method": "nearswap",
            "base_model": base,
            "models": [{"model": models[0]}],
            "parameters": {"t": 0.01},
        },
        "arcee_fusion": {
            "merge_method": "arcee_fusion",
            "base_model": base,
            "models": [{"model": models[1]}],
        },
        "ram": {"merge_method": "ram", "base_model": base, "models": [{"model": m} for m in models]},
        "ramplus_tl": {
            "merge_method": "ramplus_tl",
            "base_model": base,
            "models": [{"model": m} for m in models],
            "parameters": {"r": 0.5, "alpha": 0.4, "epsilon": 0.002},
        },
        "passthrough": {
            "merge_method": "passthrough",
            "models": [
                {
                    "model": models[2],
                    "parameters": {"scale": [{"filter": "o_proj", "value": 0.5}, {"value": 1.0}]},
                }
            ],
        },
        "model_stock": {
            "merge_method": "model_stock",
            "base_model": base,
            "models": [{"model": m, "parameters": {"weight": 1.0}} for m in models],
        },
        "model_stock_filter_wise": {
            "merge_method": "model_stock",
            "base_model": base,
            "models": [{"model": m} for m in models],
            "parameters": {"filter_wise": True},
        },
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
    "linear_with_a_base_model_outside_the_models": 1e-6,
    "ties_with_gradients_and_int8_mask": 1e-6,
    "task_arithmetic_with_filtered_gradient": 1e-6,
    "breadcrumbs_ties": 1e-6,
    "breadcrumbs": 1e-6,
    "sce": 1e-6,
    "sce_select_topk": 1e-6,
    "nuslerp": 1e-6,
    "nuslerp_task_vectors_row_wise": 1e-6,
    "nuslerp_task_vectors_per_row": 1e-6,
    "multislerp": 1e-6,
    "multislerp_task_vectors": 1e-6,
    "nearswap": 1e-6,
    "arcee_fusion": 1e-6,
    "ram": 1e-6,
    "ramplus_tl": 1e-6,
    "passthrough": 1e-6,
    "model_stock": 1e-6,
    "model_stock_filter_wise": 1e-6,
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


@pytest.fixture(scope="module")
def deep_family(tmp_path_factory: pytest.TempPathFactory) -> Family:
    """A four-layer toy family, deep enough for slices that start and end inside the model."""
    from m3sb.toy import make_family

    return make_family(tmp_path_factory.mktemp("deep"), n_models=3, seed=1, layers=4)


def _sliced_recipes(family: Family) -> dict[str, dict[str, Any]]:
    a, b, c = (str(path) for path in family.models)
    base = str(family.base)
    return {
        "passthrough_frankenmerge": {
            "merge_method": "passthrough",
            "slices": [
                {"sources": [{"model": a, "layer_range": [0, 3]}]},
                {"sources": [{"model": b, "layer_range": [1, 4]}]},
                {"sources": [{"model": a, "layer_range": [3, 4]}]},
            ],
        },
        "linear_slices_with_gradients": {
            "merge_method": "linear",
            "slices": [
                {
                    "sources": [
                        {"model": a, "layer_range": [0, 2], "parameters": {"weight": [1.0, 0.2]}},
                        {"model": b, "layer_range": [2, 4], "parameters": {"weight": 0.5}},
                    ]
                },
                {
                    "sources": [
                        {"model": a, "layer_range": [2, 4]},
                        {"model": c, "layer_range": [0, 2]},
                    ],
                    "parameters": {"weight": [{"filter": "mlp", "value": [0.1, 0.9]}, {"value": 0.5}]},
                },
            ],
        },
        "ties_slices_with_a_base": {
            "merge_method": "ties",
            "base_model": base,
            "parameters": {"density": 0.5},
            "slices": [
                {
                    "sources": [
                        {"model": base, "layer_range": [0, 4]},
                        {"model": a, "layer_range": [0, 4], "parameters": {"weight": 0.7}},
                        {
                            "model": c,
                            "layer_range": [0, 4],
                            "parameters": {"weight": 1.0, "density": [0.2, 0.8]},
                        },
                    ]
                }
            ],
        },
        "task_arithmetic_slice_bases": {
            "merge_method": "task_arithmetic",
            "base_model": base,
            "parameters": {"weight": 0.8},
            "slices": [
                {"sources": [{"model": base, "layer_range": [0, 2]}, {"model": b, "layer_range": [0, 2]}]},
                {
                    "sources": [{"model": a, "layer_range": [1, 3]}, {"model": c, "layer_range": [1, 3]}],
                    "base_model": a,
                    "parameters": {"weight": 0.5},
                },
            ],
        },
    }


@pytest.mark.slow
@pytest.mark.parametrize(
    "name",
    [
        "passthrough_frankenmerge",
        "linear_slices_with_gradients",
        "ties_slices_with_a_base",
        "task_arithmetic_slice_bases",
    ],
)
def test_sliced_output_matches_mergekit(name: str, deep_family: Family, tmp_path: Path) -> None:
    import json

    recipe = _sliced_recipes(deep_family)[name] | {"dtype": "float32"}
    theirs = tmp_path / "mergekit"
    mergekit_merge.run_merge(
        mergekit_config.MergeConfiguration.model_validate(recipe),
        str(theirs),
        options=mergekit_merge.MergeOptions(quiet=True, copy_tokenizer=False, write_model_card=False),
    )
    ours = merge_to_folder(parse_merge_config(recipe), tmp_path / "m3sb").out_dir
    assert _max_relative_error(ours, theirs) <= 1e-6
    layers = [
        json.loads((folder / "config.json").read_text())["num_hidden_layers"] for folder in (ours, theirs)
    ]
    assert layers[0] == layers[1]
