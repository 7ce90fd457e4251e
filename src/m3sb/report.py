"""Results of experiments: files written and tables printed."""

from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from m3sb import plots
from m3sb.checkpoints import write_text_atomic


def write_results(results: Any, folder: Path) -> Path:
    """Write ``results.csv`` into ``folder`` atomically (a temporary file renamed into place)."""
    folder.mkdir(parents=True, exist_ok=True)
    return write_text_atomic(folder / "results.csv", results.to_csv(index=False, float_format="%.4f"))


def print_results(results: Any, console: Console) -> None:
    """A method x dataset table of accuracy, with the mean and the mean normalised accuracy."""
    table = Table(title=f"accuracy % on each task - {results['experiment'].iloc[0]}")
    datasets = list(dict.fromkeys(results["dataset"]))
    table.add_column("method", no_wrap=True)
    for dataset in datasets:
        table.add_column(str(dataset), justify="right")
    table.add_column("mean", justify="right")
    table.add_column("norm %", justify="right")
    for method, rows in results.groupby("merge_method", sort=False):
        by_dataset = rows.set_index("dataset")
        cells = [f"{by_dataset.loc[d, 'accuracy']:.1f}" for d in datasets]
        table.add_row(
            str(method),
            *cells,
            f"{rows['accuracy'].mean():.1f}",
            f"{rows['normalized_accuracy'].mean():.0f}",
        )
    console.print(table)


def write_figures(
    results: Any, points: dict[str, torch.Tensor], kinds: dict[str, str], folder: Path
) -> dict[str, Path]:
    """The experiment's PNG figures in ``folder``, by title."""
    folder.mkdir(parents=True, exist_ok=True)
    figures = {
        "Accuracy per task (radar)": plots.radar_chart(results, folder / "radar.png"),
        "Accuracy per task and method": plots.bar_chart(results, folder / "bars.png"),
        "Accuracy relative to the fine-tuned models": plots.heatmap(results, folder / "heatmap.png"),
    }
    if len(points) >= 3:
        figures["Models on the hypersphere"] = plots.sphere_plot(points, kinds, folder / "sphere.png")
    return figures


def write_report(results: Any, figures: dict[str, Path], configuration: str, folder: Path) -> Path:
    """One self-contained ``report.html``: the table, the figures (embedded) and the configuration."""
    name = html.escape(str(results["experiment"].iloc[0]))
    images = "\n".join(
        f'<h2>{html.escape(title)}</h2>\n<img alt="{html.escape(title)}" '
        f'src="data:image/png;base64,{base64.b64encode(path.read_bytes()).decode()}">'
        for title, path in figures.items()
    )
    table = results.to_html(index=False, float_format=lambda v: f"{v:.2f}", border=0)
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>m3sb report: {name}</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto;}}
table{{border-collapse:collapse;font-size:13px;}}td,th{{padding:3px 8px;border-bottom:1px solid #ddd;}}
img{{max-width:100%;}}pre{{background:#f6f6f6;padding:1em;overflow:auto;}}</style></head>
<body><h1>m3sb experiment: {name}</h1>
<h2>Results</h2>
{table}
{images}
<h2>Configuration</h2>
<pre>{html.escape(configuration)}</pre>
</body></html>
"""
    target = folder / "report.html"
    target.write_text(page, encoding="utf-8")
    return target
