"""Multi-stage recipes: stages in dependency order, reuse of unchanged stages, parity with
mergekit-multimerge on the same file."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from m3sb.checkpoints import open_checkpoint
from m3sb.cli import app
from m3sb.config import parse_merge_config
from m3sb.merge import merge_to_folder
from m3sb.stages import STAGE_RECORD
from m3sb.toy import Family

runner = CliRunner()


def _recipe(family: Family) -> str:
    a, b, c = (str(path) for path in family.models)
    return (
        # the final merge comes first in the file: stages run in dependency order
        f"merge_method: task_arithmetic\nbase_model: {family.base}\n"
        "models:\n  - {model: blend, parameters: {weight: 0.7}}\n"
        "  - {model: sharp, parameters: {weight: 0.3}}\n"
        "dtype: float32\n---\n"
        f"name: sharp\nmerge_method: ties\nbase_model: {family.base}\n"
        f"models:\n  - {{model: blend, parameters: {{weight: 1.0, density: 0.5}}}}\n"
        f"  - {{model: {c}, parameters: {{weight: 1.0, density: 0.5}}}}\ndtype: float32\n---\n"
        f"name: blend\nmerge_method: linear\nmodels:\n  - {{model: {a}, parameters: {{weight: 0.4}}}}\n"
        f"  - {{model: {b}, parameters: {{weight: 0.6}}}}\ndtype: float32\n"
    )


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    checkpoint = open_checkpoint(folder)
    return {name: checkpoint.load(name) for name in checkpoint.tensors}


def _by_hand(family: Family, folder: Path) -> dict[str, torch.Tensor]:
    a, b, c = (str(path) for path in family.models)
    base = str(family.base)
    blend = merge_to_folder(
        parse_merge_config(
            {
                "merge_method": "linear",
                "dtype": "float32",
                "models": [
                    {"model": a, "parameters": {"weight": 0.4}},
                    {"model": b, "parameters": {"weight": 0.6}},
                ],
            }
        ),
        folder / "blend",
    ).out_dir
    sharp = merge_to_folder(
        parse_merge_config(
            {
                "merge_method": "ties",
                "base_model": base,
                "dtype": "float32",
                "models": [
                    {"model": str(blend), "parameters": {"weight": 1.0, "density": 0.5}},
                    {"model": c, "parameters": {"weight": 1.0, "density": 0.5}},
                ],
            }
        ),
        folder / "sharp",
    ).out_dir
    final = merge_to_folder(
        parse_merge_config(
            {
                "merge_method": "task_arithmetic",
                "base_model": base,
                "dtype": "float32",
                "models": [
                    {"model": str(blend), "parameters": {"weight": 0.7}},
                    {"model": str(sharp), "parameters": {"weight": 0.3}},
                ],
            }
        ),
        folder / "final",
    ).out_dir
    return _tensors(final)


def test_stages_run_in_dependency_order_and_unchanged_ones_are_reused(family: Family, tmp_path: Path) -> None:
    recipe = tmp_path / "multi.yml"
    recipe.write_text(_recipe(family))
    out = tmp_path / "out"
    result = runner.invoke(app, ["merge", str(recipe), str(out)])
    assert result.exit_code == 0, result.output
    stages = tmp_path / "out.stages"
    assert sorted(p.name for p in stages.iterdir()) == ["blend", "sharp"]
    assert (stages / "blend" / STAGE_RECORD).is_file() and not (out / STAGE_RECORD).exists()
    expected = _by_hand(family, tmp_path / "by_hand")
    merged = _tensors(out)
    assert set(merged) == set(expected)
    for name, tensor in expected.items():
        torch.testing.assert_close(merged[name], tensor, rtol=0, atol=0)

    blend_file = stages / "blend" / "model.safetensors"
    sharp_file = stages / "sharp" / "model.safetensors"
    before = (blend_file.stat().st_mtime_ns, sharp_file.stat().st_mtime_ns)
    again = runner.invoke(app, ["merge", str(recipe), str(out), "--force"])
    assert again.exit_code == 0, again.output
    assert "stage blend: unchanged" in again.output and "stage sharp: unchanged" in again.output
    assert (blend_file.stat().st_mtime_ns, sharp_file.stat().st_mtime_ns) == before

    recipe.write_text(_recipe(family).replace("weight: 1.0, density: 0.5", "weight: 1.0, density: 0.4"))
    changed = runner.invoke(app, ["merge", str(recipe), str(out), "--force", "--clean-stages"])
    assert changed.exit_code == 0, changed.output
    assert "stage blend: unchanged" in changed.output and "stage sharp: merging" in changed.output
    assert not stages.exists()  # --clean-stages


def test_final_folder_is_checked_before_any_stage_runs(family: Family, tmp_path: Path) -> None:
    recipe = tmp_path / "multi.yml"
    recipe.write_text(_recipe(family))
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = runner.invoke(app, ["merge", str(recipe), str(out), "--quiet"])
    assert result.exit_code == 1 and "folder exists and is not empty" in result.stderr
    assert not (tmp_path / "out.stages").exists()


@pytest.mark.slow
def test_the_same_file_gives_mergekit_multimerges_output(family: Family, tmp_path: Path) -> None:
    multimerge = pytest.importorskip("mergekit.scripts.multimerge", reason="mergekit is a dev dependency")
    from click.testing import CliRunner as ClickRunner

    recipe = tmp_path / "multi.yml"
    recipe.write_text(_recipe(family))
    theirs = tmp_path / "mergekit"
    ran = ClickRunner().invoke(
        multimerge.main,
        [str(recipe), "--intermediate-dir", str(tmp_path / "mk-stages"), "--out-path", str(theirs)],
    )
    assert ran.exit_code == 0, ran.output
    ours = tmp_path / "m3sb"
    assert runner.invoke(app, ["merge", str(recipe), str(ours), "--quiet"]).exit_code == 0
    mine, reference = _tensors(ours), _tensors(theirs)
    assert set(mine) == set(reference)
    for name, tensor in reference.items():
        assert (
            float((mine[name].double() - tensor.double()).norm() / tensor.double().norm().clamp_min(1e-30))
            < 1e-6
        )


def test_a_changed_statistics_file_changes_the_stage_fingerprint(tmp_path: Path) -> None:
    from m3sb.stages import plan_stages

    statistics = tmp_path / "a.gram.safetensors"
    recipe = {
        "merge_method": "regmean",
        "models": [{"model": "org/a", "statistics": str(statistics)}, {"model": "org/b"}],
    }

    def fingerprint() -> str:
        config = parse_merge_config(recipe)
        return plan_stages([config], "recipe.yml", tmp_path / "out", tmp_path / "stages")[0].fingerprint

    statistics.write_bytes(b"first")
    before = fingerprint()
    statistics.write_bytes(b"recomputed")
    assert fingerprint() != before
