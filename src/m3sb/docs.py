"""Tables of the merge methods and their parameters, read from the method declarations."""

from __future__ import annotations

from rich.table import Table

from m3sb.methods import METHODS


def _format_default(value: object) -> str:
    if value is None:
        return "required"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def reference_text(reference: str) -> str:
    """A method's reference as the README shows it: an arXiv id or a link, else as written."""
    if reference.startswith("https://arxiv.org/abs/"):
        return f"[arXiv {reference.rsplit('/', 1)[1]}]({reference})"
    if reference.startswith("https://"):
        return f"[{reference.removeprefix('https://').split('/')[0]}]({reference})"
    return reference or "-"


def method_rows() -> list[tuple[str, str, str, str, str]]:
    """(method, base model, parameters, summary, reference) for every registered method."""
    rows = []
    for method in METHODS.values():
        params = ", ".join(
            f"{p.label}{' (per model)' if p.per_model else ''}={_format_default(p.default)}"
            for p in method.all_params
            if not p.inert
        )
        inert = [p.name for p in method.all_params if p.inert]
        params = (params or "-") + (f"; accepted, no effect: {', '.join(inert)}" if inert else "")
        base = {
            "weights": "-",
            "task_vectors": "required",
            "either": "with space: task_vectors",
            "if_base": "optional (task vectors when given)",
        }[method.space]
        if method.base_is_input:
            base = "optional (one more input)"
        rows.append((method.name, base, params, method.summary, method.reference or "-"))
    return rows


def methods_table() -> Table:
    """The methods as a rich table (``m3sb methods``)."""
    table = Table(title="merge methods")
    table.add_column("method", no_wrap=True)  # the name users copy: never cut
    for column in ("base_model", "parameters (default)", "what it computes", "reference"):
        table.add_column(column)
    for row in method_rows():
        table.add_row(*row)
    return table


def methods_markdown() -> str:
    """The methods as a Markdown table (the README's)."""
    lines = [
        "| method | base_model | parameters (default) | what it computes | reference |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| `{name}` | {base} | {params} | {summary} | {reference_text(reference)} |"
        for name, base, params, summary, reference in method_rows()
    ]
    return "\n".join(lines)
