"""Comparisons of experiments: the rows of several ``results.csv`` files side by side, as one CSV,
grouped bar charts (PNG), a table of means and a self-contained interactive HTML page."""

from __future__ import annotations

import html
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from m3sb import plots
from m3sb.checkpoints import write_text_atomic
from m3sb.errors import ConfigError, first_line

RESULTS_FILE = "results.csv"
REQUIRED_COLUMNS = ("experiment", "merge_method", "dataset", "accuracy", "precision", "recall", "f1_score")
METRICS = ("accuracy", "precision", "recall", "f1_score", "normalized_accuracy")
NAME_COLUMNS = ("experiment", "merge_method", "dataset")
RESULTS = "results"  # the column that names each row's folder
SERIES = "run / method"  # one bar of the charts, one row of the table of means
MEAN = "mean"


def load_results(folders: Sequence[Path]) -> pd.DataFrame:
    """Every row of each folder's ``results.csv`` (a folder given twice counts once), with a first
    column ``results`` naming its folder; columns some files lack are empty for their rows."""
    if not folders:
        raise ConfigError("no results folder given: name one or more folders that hold results.csv")
    unique: dict[Path, Path] = {}
    for folder in folders:
        unique.setdefault(folder.resolve(), folder)
    frames = [read_results(folder) for folder in unique.values()]
    return pd.concat(frames, ignore_index=True, sort=False)


def read_results(folder: Path) -> pd.DataFrame:
    """One folder's ``results.csv``, checked: the seed's seven columns, named rows, numeric metrics."""
    file = folder / RESULTS_FILE
    if not folder.is_dir():
        raise ConfigError(f"{folder}: no such folder")
    if not file.is_file():
        raise ConfigError(f"{file}: no such file (m3sb experiment --out {folder} writes it)")
    try:
        frame = pd.read_csv(file, dtype=str, keep_default_na=False, na_values=[""])
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, OSError) as error:
        raise ConfigError(f"{file}: not a readable CSV file ({first_line(error)})") from None
    frame = frame.loc[:, [not str(column).startswith("Unnamed: ") for column in frame.columns]]
    missing = [column for column in REQUIRED_COLUMNS if column not in frame.columns]
    if missing:
        raise ConfigError(
            f"{file}: no column {', '.join(map(repr, missing))} (results.csv needs "
            f"{', '.join(REQUIRED_COLUMNS)})"
        )
    if frame.empty:
        raise ConfigError(f"{file}: no rows")
    for column in NAME_COLUMNS:
        if frame[column].isna().any():
            raise ConfigError(f"{file}: row {_line(frame[column].isna())} has no {column}")
    for column in (column for column in METRICS if column in frame.columns):
        numbers = pd.to_numeric(frame[column], errors="coerce")
        wrong = numbers.isna() & frame[column].notna() & (frame[column].str.strip().str.lower() != "nan")
        if wrong.any():
            value = frame.loc[wrong, column].iloc[0]
            raise ConfigError(f"{file}: row {_line(wrong)}: {column} {value!r} is not a number")
        frame[column] = numbers
    frame.insert(0, RESULTS, str(folder))
    return frame


def _line(rows: pd.Series) -> int:
    """The file's line number of the first row where ``rows`` is true (line 1 is the header)."""
    return int(rows.to_numpy().argmax()) + 2


def run_labels(frame: pd.DataFrame) -> pd.Series:
    """Each row's run: its experiment, followed by its folder's name (or, if those are equal too,
    the folder as given) where several folders hold that experiment."""
    labels = frame["experiment"].astype(str)
    for _, rows in frame.groupby("experiment", sort=False):
        folders = list(dict.fromkeys(rows[RESULTS]))
        if len(folders) < 2:
            continue
        names = [Path(folder).name or folder for folder in folders]
        suffixes = dict(zip(folders, names if len(set(names)) == len(names) else folders, strict=True))
        labels.loc[rows.index] = rows["experiment"] + " (" + rows[RESULTS].map(suffixes) + ")"
    return labels


def with_series(frame: pd.DataFrame) -> pd.DataFrame:
    """``frame`` with a ``run / method`` column: the run (see :func:`run_labels`) and the method."""
    return frame.assign(**{SERIES: run_labels(frame) + " / " + frame["merge_method"]})


def check_metric(frame: pd.DataFrame, metric: str) -> None:
    """Fail unless ``metric`` is one of :data:`METRICS` and every folder in ``frame`` has values of it."""
    if metric not in METRICS:
        raise ConfigError(f"unknown metric {metric!r}: choose one of {', '.join(METRICS)}")
    values = frame[metric] if metric in frame.columns else pd.Series(float("nan"), index=frame.index)
    for folder, rows in values.groupby(frame[RESULTS], sort=False):
        if rows.isna().all():
            raise ConfigError(f"{Path(folder) / RESULTS_FILE}: no {metric} values (pick another --metric)")


def summary_table(frame: pd.DataFrame, metric: str) -> pd.DataFrame:
    """A ``run / method`` x dataset table of ``metric`` (rows in the order they came), with the
    mean over each row's datasets in a last column ``mean``."""
    check_metric(frame, metric)
    table = plots.metric_table(with_series(frame), metric, index=SERIES)
    table.columns = [str(column) for column in table.columns]
    return table.assign(**{MEAN: table.mean(axis=1)})


def write_comparison(
    frame: pd.DataFrame, out: Path, metric: str | Sequence[str] = "accuracy"
) -> dict[str, Path]:
    """Write into ``out``: ``comparison.csv`` (every row), ``comparison.png`` (grouped bars of the
    first metric: a group per dataset, a bar per run and method), ``comparison_METRIC.png`` for
    each further metric, and ``comparison.html`` (tables and interactive bars, self-contained).

    Returns the paths: ``csv``, ``html`` and one per metric, by its name."""
    from m3sb.report import embedded_images, html_page, interactive_figures, interactive_table

    metrics = list(dict.fromkeys([metric] if isinstance(metric, str) else metric))
    if not metrics:
        raise ConfigError(f"no metric given: choose one or more of {', '.join(METRICS)}")
    for name in metrics:
        check_metric(frame, name)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"csv": write_text_atomic(out / "comparison.csv", frame.to_csv(index=False, float_format="%.4f"))}
    labelled = with_series(frame)
    for number, name in enumerate(metrics):
        target = out / ("comparison.png" if number == 0 else f"comparison_{name}.png")
        paths[name] = plots.comparison_chart(labelled, name, SERIES, target)
    summary = summary_table(frame, metrics[0])
    folders = "".join(f"<li>{html.escape(folder)}</li>" for folder in dict.fromkeys(frame[RESULTS]))
    figures = {
        f"{name} per task (interactive)": plots.interactive_bars(
            labelled, name, SERIES, f"{name} per task and run / method"
        )
        for name in metrics
    }
    body = "\n".join(
        [
            "<h1>m3sb comparison</h1>",
            f"<p>Results folders:</p><ul>{folders}</ul>",
            f"<h2>Mean {html.escape(metrics[0])} over the tasks</h2>",
            interactive_table(summary, "summary", filter_columns=(SERIES,), index=True),
            interactive_figures(figures),
            "<h2>All rows</h2>",
            interactive_table(frame, "rows"),
            embedded_images({f"{name} per task (PNG)": paths[name] for name in metrics}),
        ]
    )
    paths["html"] = write_text_atomic(out / "comparison.html", html_page("m3sb comparison", body))
    return paths


def print_summary(summary: pd.DataFrame, metric: str, console: Any) -> None:
    """The table of :func:`summary_table` on ``console``: a row per run and method, a column per
    dataset and the mean."""
    from rich.table import Table
    from rich.text import Text

    table = Table(title=Text(f"{metric} % on each task"))
    table.add_column(SERIES, no_wrap=True)
    for column in summary.columns:
        table.add_column(Text(str(column)), justify="right")
    for label, row in summary.iterrows():
        table.add_row(Text(str(label)), *("" if pd.isna(v) else f"{v:.2f}" for v in row.tolist()))
    console.print(table)
