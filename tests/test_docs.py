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
