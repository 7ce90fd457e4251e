"""What ``m3sb pareto`` prints when it finishes."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from m3sb.pareto.run import ParetoOutcome


def print_outcome(outcome: ParetoOutcome, console: Console) -> None:
    """Evaluations spent, the surrogates' R^2, the selected point and the baselines, then the files."""
    front, names = outcome.front, outcome.task_names
    console.print(
        f"{front.mode}: {outcome.new_evaluations} new evaluations, {outcome.reused_evaluations} reused; "
        f"front of {len(front.coefficients)} points",
        highlight=False,
    )
    table = Table(title=f"{outcome.metric} per task")
    table.add_column("", no_wrap=True)
    for name in names:
        table.add_column(name, justify="right")
    table.add_row("surrogate R^2 (cross-validated)", *(f"{value:.3f}" for value in front.r2))
    if outcome.selected is not None:
        for key in ("coefficients", "predicted", "measured"):
            values = outcome.selected[key]
            table.add_row(f"selected: {key}", *(f"{values[n]:.3f}" for n in names))
    for label, values in outcome.baselines.items():
        table.add_row(f"baseline: {label}", *(f"{v:.3f}" for v in values))
    if outcome.finetuned is not None:
        table.add_row("reference: fine-tuned", *(f"{v:.3f}" for v in outcome.finetuned))
    console.print(table)
    for label, path in outcome.files.items():
        console.print(f"{label}: {path}", highlight=False)
