"""The README's methods table is generated from the method declarations and must match them."""

from __future__ import annotations

from pathlib import Path

from m3sb.docs import methods_markdown

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_methods_table_matches_the_declarations() -> None:
    text = README.read_text(encoding="utf-8")
    start = text.index("<!-- methods-table:start -->\n") + len("<!-- methods-table:start -->\n")
    end = text.index("<!-- methods-table:end -->")
    assert text[start:end].strip() == methods_markdown(), (
        "README methods table is stale; paste the output of m3sb.docs.methods_markdown()"
    )


def test_methods_table_shows_aliases_and_the_seed_barycenter() -> None:
    from typer.testing import CliRunner

    from m3sb.cli import app

    table = methods_markdown()
    assert "max_iter (alias: iterations)=100" in table and "tol (alias: threshold)=1e-07" in table
    seed_row = next(line for line in table.splitlines() if line.startswith("| `barycenter_seed` |"))
    assert "iterations=20, threshold=1e-05, dot_threshold=0.9995" in seed_row
    listed = CliRunner().invoke(app, ["methods"], env={"COLUMNS": "400"})
    assert (
        listed.exit_code == 0 and "barycenter_seed" in listed.stdout and "alias: iterations" in listed.stdout
    )
