"""Results of experiments: files written and tables printed."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table


def write_results(results: Any, folder: Path) -> Path:
    """Write ``results.csv`` into ``folder`` atomically (a temporary file renamed into place)."""
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / "results.csv"
    handle, temporary = tempfile.mkstemp(prefix=".results-", suffix=".csv", dir=folder)
    os.close(handle)
    try:
        results.to_csv(temporary, index=False, float_format="%.4f")
        Path(temporary).replace(target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return target


def print_results(results: Any, console: Console) -> None:
    """A method x dataset table of accuracy (normalised accuracy in brackets)."""
    table = Table(title=f"accuracy % (normalised to the fine-tuned model) - {results['experiment'].iloc[0]}")
    datasets = list(dict.fromkeys(results["dataset"]))
    table.add_column("method")
    for dataset in datasets:
        table.add_column(dataset, justify="right")
    table.add_column("mean", justify="right")
    for method, rows in results.groupby("merge_method", sort=False):
        by_dataset = rows.set_index("dataset")
        cells = [
            f"{by_dataset.loc[d, 'accuracy']:.1f} ({by_dataset.loc[d, 'normalized_accuracy']:.0f})"
            for d in datasets
        ]
        mean = f"{rows['accuracy'].mean():.1f} ({rows['normalized_accuracy'].mean():.0f})"
        table.add_row(str(method), *cells, mean)
    console.print(table)
