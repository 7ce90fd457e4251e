"""The corpus of real mergekit recipes: each runs in m3sb, and where mergekit also runs it, the
two agree (exactly, or in float32 when the recipe asks for half-precision arithmetic, or they
differ for a documented reason: random masks, the SLERP definition)."""

from __future__ import annotations

from pathlib import Path

import pytest

from recipe_corpus import BY_DESIGN, documents, recipe_paths, run_recipe

# Recipes m3sb refuses, each with the reason (listed in the README too).
EXPECTED_REFUSALS: dict[str, str] = {}


def test_the_corpus_is_real_and_large_enough() -> None:
    paths = recipe_paths()
    assert len(paths) >= 40
    for path in paths:
        first = path.read_text(encoding="utf-8").splitlines()[0]
        assert first.startswith("# source: "), path.name
        assert documents(path), path.name


@pytest.mark.slow
@pytest.mark.parametrize("path", recipe_paths(), ids=lambda path: path.name)
def test_recipe_runs_and_agrees_with_mergekit(path: Path, tmp_path: Path) -> None:
    pytest.importorskip("mergekit.merge", reason="mergekit is in the dev dependency group")
    outcome = run_recipe(path, tmp_path)
    if path.name in EXPECTED_REFUSALS:
        assert outcome.m3sb_error is not None and EXPECTED_REFUSALS[path.name] in outcome.m3sb_error
        return
    assert outcome.m3sb_error is None, outcome.m3sb_error
    if outcome.mergekit_error is None:
        assert outcome.status in ("same", "same in float32", "differs by design"), (
            f"{outcome.status}: error {outcome.max_error}, {outcome.note}"
        )
        if outcome.status == "differs by design":
            assert outcome.method in BY_DESIGN
