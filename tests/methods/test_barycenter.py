from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file

from m3sb import geometry
from m3sb.config import load_merge_config, parse_merge_config
from m3sb.errors import ConfigError
from m3sb.merge import build_plan, merge_to_folder, model_card
from m3sb.methods import get_method, merge_backbones, merge_group
from m3sb.methods.barycenter import barycenter, pairwise_slerp
from m3sb.methods.registry import check_param_values
from m3sb.toy import Family

GENERATOR = torch.Generator().manual_seed(3)
CENTER = torch.randn(30, 20, generator=GENERATOR, dtype=torch.float64)
MODELS = [CENTER + 0.3 * torch.randn(30, 20, generator=GENERATOR, dtype=torch.float64) for _ in range(4)]


def _close(a: torch.Tensor, b: torch.Tensor, tolerance: float = 1e-10) -> bool:
    return float((a - b).norm() / b.norm()) < tolerance


def test_pairwise_slerp_folds_in_order_with_cumulative_shares() -> None:
    weights = [1.0, 2.0, 3.0, 4.0]
    expected = MODELS[0]
    seen = weights[0]
    for model, weight in zip(MODELS[1:], weights[1:], strict=True):
        seen += weight
        expected = geometry.slerp(expected, model, weight / seen)
    assert _close(pairwise_slerp(MODELS, weights), expected)


def test_pairwise_slerp_and_barycenter_agree_for_two_models_and_differ_for_more() -> None:
    assert _close(pairwise_slerp(MODELS[:2], [1.0, 3.0]), barycenter(MODELS[:2], [1.0, 3.0]))
    assert not _close(pairwise_slerp(MODELS, [1.0] * 4), barycenter(MODELS, [1.0] * 4), 1e-6)


def test_pairwise_slerp_skips_zero_weight_models() -> None:
    assert torch.equal(pairwise_slerp(MODELS, [0.0, 0.0, 5.0, 0.0]), MODELS[2])
    assert _close(pairwise_slerp(MODELS, [0.0, 1.0, 0.0, 1.0]), geometry.slerp(MODELS[1], MODELS[3], 0.5))


def test_task_vector_barycenter_is_base_plus_scaled_spherical_mean_of_task_vectors() -> None:
    base = CENTER
    merged = merge_group(
        "barycenter", MODELS, [1.0, 2.0, 3.0, 4.0], base, space="task_vectors", **{"lambda": 0.7}
    )
    task_vectors = [model - base for model in MODELS]
    expected = base + 0.7 * geometry.karcher_mean(task_vectors, [1.0, 2.0, 3.0, 4.0])
    assert _close(merged, expected)


def test_karcher_is_the_barycenter_under_mergekits_name() -> None:
    assert torch.equal(merge_group("karcher", MODELS), barycenter(MODELS, [1.0] * 4))


def test_karcher_in_memory_takes_the_base_as_one_more_point() -> None:
    with_base = merge_group("karcher", MODELS[1:], base=MODELS[0])
    assert torch.equal(with_base, merge_group("karcher", MODELS))


# The M3SB seed's names: ``iterations`` and ``threshold`` are aliases of max_iter and tol.


def test_seed_names_iterations_and_threshold_are_max_iter_and_tol_bit_for_bit() -> None:
    for method in ("barycenter", "karcher"):
        seed_names = merge_group(method, MODELS, [1.0, 2.0, 3.0, 4.0], iterations=1, threshold=1e-3)
        names = merge_group(method, MODELS, [1.0, 2.0, 3.0, 4.0], max_iter=1, tol=1e-3)
        assert torch.equal(seed_names, names)
    # one step from the weighted mean is not yet the mean: the alias really reaches max_iter
    assert not torch.equal(merge_group("barycenter", MODELS, iterations=1), merge_group("barycenter", MODELS))


def test_an_alias_and_its_name_together_are_a_one_line_error() -> None:
    with pytest.raises(ConfigError, match="'iterations' and 'max_iter'") as caught:
        merge_group("barycenter", MODELS, iterations=5, max_iter=5)
    assert "\n" not in str(caught.value)
    with pytest.raises(ConfigError, match="'tol' and 'threshold'"):
        check_param_values(get_method("karcher"), {"tol": 1e-6, "threshold": 1e-5}, "merge_configs['k']")


def test_check_param_values_and_merge_backbones_take_the_aliases() -> None:
    check_param_values(get_method("barycenter"), {"iterations": 20, "threshold": 1e-5}, "merge_configs['b']")
    with pytest.raises(ConfigError, match=r"unknown parameter 'iterations' for 'pairwise_slerp'"):
        check_param_values(get_method("pairwise_slerp"), {"iterations": 20}, "merge_configs['p']")
    states = [{"w": model, "step": torch.tensor(3)} for model in MODELS]
    merged = merge_backbones("barycenter", states[0], states, [1.0] * 4, iterations=2, threshold=1e-9)
    assert torch.equal(merged["w"], merge_group("barycenter", MODELS, max_iter=2, tol=1e-9))


def _recipe(family: Family, **parameters: object) -> dict[str, Any]:
    return {
        "merge_method": "barycenter",
        "models": [{"model": str(path)} for path in family.models],
        "parameters": parameters,
    }


def test_a_yaml_recipe_with_the_seed_names_merges_as_max_iter_and_tol(family: Family, tmp_path: Path) -> None:
    recipe = tmp_path / "seed.yaml"
    recipe.write_text(yaml.safe_dump(_recipe(family, iterations=2, threshold="1e-5")), encoding="utf-8")
    plan = build_plan(load_merge_config(recipe))
    assert all(
        job.params["max_iter"] == 2 and job.params["tol"] == 1e-5 for job in plan.jobs if job.mergeable
    )
    assert "iterations" in model_card(plan)  # the card shows the recipe as written
    merge_to_folder(load_merge_config(recipe), tmp_path / "aliases")
    merge_to_folder(parse_merge_config(_recipe(family, max_iter=2, tol=1e-5)), tmp_path / "names")
    aliases = load_file(tmp_path / "aliases" / "model.safetensors")
    names = load_file(tmp_path / "names" / "model.safetensors")
    assert aliases.keys() == names.keys() and all(torch.equal(aliases[k], names[k]) for k in names)


def test_a_yaml_recipe_giving_both_names_or_a_whole_merge_alias_per_model_is_refused(family: Family) -> None:
    with pytest.raises(ConfigError, match="parameters: 'iterations' and 'max_iter'"):
        build_plan(parse_merge_config(_recipe(family, iterations=20, max_iter=20)))
    per_model = _recipe(family)
    per_model["models"][0]["parameters"] = {"threshold": 1e-5}
    with pytest.raises(ConfigError, match="applies to the whole merge"):
        build_plan(parse_merge_config(per_model), strict=True)
    assert any(
        "applies to the whole merge" in note for note in build_plan(parse_merge_config(per_model)).notes
    )
