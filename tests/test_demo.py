"""``m3sb demo`` runs end to end offline and writes what the README says."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from m3sb.demo import DATA_DEPENDENT, DEMO_METHODS, run_demo


@pytest.mark.slow
def test_demo_writes_merges_results_figures_and_report(
    zoo_manifest: Path, clip_zoo_manifest: Path, tmp_path: Path
) -> None:
    (tmp_path / "zoo").symlink_to(zoo_manifest.parent)  # reuse the session's zoos: cache hits
    (tmp_path / "clip_zoo").symlink_to(clip_zoo_manifest.parent)
    results = run_demo(tmp_path)
    merges = pd.read_csv(tmp_path / "merges.csv")
    assert len(merges) == 13 and (merges["seconds"] > 0).all()
    table = pd.read_csv(tmp_path / "results.csv")
    in_both = [m for m in DEMO_METHODS if m not in DATA_DEPENDENT]  # those the same in both spaces run once
    expected = ["finetuned", "base", *DEMO_METHODS, *(f"{m} (tv)" for m in in_both)]
    assert set(DATA_DEPENDENT) <= set(DEMO_METHODS)
    assert list(dict.fromkeys(table["merge_method"])) == expected
    assert len(table) == len(results) == 5 * len(expected)
    assert (tmp_path / "report.html").read_text().count("data:image/png;base64,") == 4
    for run, files in {"two_tasks": ("landscape.png",), "nested": (), "clip": ()}.items():
        folder = tmp_path / "pareto" / run
        for name in ("evaluations.csv", "front.csv", "selected.json", "front.png", *files):
            assert (folder / name).is_file(), folder / name
    nested = pd.read_csv(tmp_path / "pareto" / "nested" / "evaluations.csv")
    assert nested["phase"].str.startswith("nested").sum() == 4 * 12  # five tasks: four pairs of 12
    clip = pd.read_csv(tmp_path / "pareto" / "clip" / "evaluations.csv")
    assert {"accuracy_rotated", "accuracy_mirrored", "accuracy_parity"} <= set(clip.columns)
    assert (clip["phase"] == "design").sum() == 4 * 5  # (T + 1)(T + 2) at T = 3
