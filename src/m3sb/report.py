"""Results of experiments: files written and tables printed, and the self-contained HTML pages
(sortable, filterable tables; embedded PNG figures; interactive plotly figures, offline)."""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table
from rich.text import Text

from m3sb import plots
from m3sb.checkpoints import write_text_atomic

FILTER_COLUMNS = ("results", "experiment", "merge_method", "dataset")

# Sorts a table.m3sb-table by the clicked header (numbers as numbers, again: reversed) and hides
# the rows whose data-filter misses a word typed in the input.m3sb-filter that names the table.
TABLE_SCRIPT = """(function () {
  function value(row, column) {
    var text = row.cells[column].textContent.trim(), number = Number(text);
    return text !== "" && !isNaN(number) ? number : text.toLowerCase();
  }
  function compare(x, y) {
    if (typeof x !== typeof y) return typeof x === "number" ? -1 : 1;
    return x < y ? -1 : x > y ? 1 : 0;
  }
  document.querySelectorAll("table.m3sb-table").forEach(function (table) {
    var headers = Array.prototype.slice.call(table.tHead.rows[0].cells), body = table.tBodies[0];
    headers.forEach(function (header, column) {
      header.addEventListener("click", function () {
        var ascending = header.getAttribute("aria-sort") !== "ascending";
        headers.forEach(function (other) { other.removeAttribute("aria-sort"); });
        header.setAttribute("aria-sort", ascending ? "ascending" : "descending");
        Array.prototype.slice.call(body.rows).sort(function (a, b) {
          var order = compare(value(a, column), value(b, column));
          return ascending ? order : -order;
        }).forEach(function (row) { body.appendChild(row); });
      });
    });
  });
  document.querySelectorAll("input.m3sb-filter").forEach(function (input) {
    var table = document.getElementById(input.getAttribute("data-table"));
    input.addEventListener("input", function () {
      var words = input.value.toLowerCase().split(/\\s+/).filter(Boolean);
      Array.prototype.forEach.call(table.tBodies[0].rows, function (row) {
        var key = row.getAttribute("data-filter");
        row.hidden = !words.every(function (word) { return key.indexOf(word) >= 0; });
      });
    });
  });
})();"""

# Draws every div.m3sb-plot from the JSON figure in the script whose id is the div's plus "-json".
PLOT_SCRIPT = """document.querySelectorAll("div.m3sb-plot").forEach(function (div) {
  var figure = JSON.parse(document.getElementById(div.id + "-json").textContent);
  Plotly.newPlot(div, figure.data, figure.layout, {responsive: true, displaylogo: false});
});"""

STYLE = """body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;}
table{border-collapse:collapse;font-size:13px;}td,th{padding:3px 8px;border-bottom:1px solid #ddd;}
td.number{text-align:right;font-variant-numeric:tabular-nums;}
table.m3sb-table th{cursor:pointer;user-select:none;background:#f3f3f3;position:sticky;top:0;}
th[aria-sort=ascending]::after{content:" \\25B2";}th[aria-sort=descending]::after{content:" \\25BC";}
input.m3sb-filter{margin:0 0 .6em;padding:4px 6px;width:22em;}
img{max-width:100%;}pre{background:#f6f6f6;padding:1em;overflow:auto;}"""


def write_results(results: Any, folder: Path) -> Path:
    """Write ``results.csv`` into ``folder`` atomically (a temporary file renamed into place)."""
    folder.mkdir(parents=True, exist_ok=True)
    return write_text_atomic(folder / "results.csv", results.to_csv(index=False, float_format="%.4f"))


def print_results(results: Any, console: Console) -> None:
    """A method x dataset table of accuracy, with the mean and the mean normalised accuracy."""
    table = Table(title=Text(f"accuracy % on each task - {results['experiment'].iloc[0]}"))
    datasets = list(dict.fromkeys(results["dataset"]))
    table.add_column("method", no_wrap=True)
    for dataset in datasets:
        table.add_column(Text(str(dataset)), justify="right")
    table.add_column("mean", justify="right")
    table.add_column("norm %", justify="right")
    for method, rows in results.groupby("merge_method", sort=False):
        by_dataset = rows.set_index("dataset")
        cells = [f"{by_dataset.loc[d, 'accuracy']:.1f}" for d in datasets]
        table.add_row(
            Text(str(method)),
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


def write_report(
    results: Any,
    figures: dict[str, Path],
    configuration: str,
    folder: Path,
    *,
    points: Mapping[str, torch.Tensor] | None = None,
    kinds: Mapping[str, str] | None = None,
) -> Path:
    """One self-contained ``report.html`` (written atomically): the results as a sortable,
    filterable table, interactive accuracy bars, the models on the 3-D unit sphere (given three
    ``points`` or more, coloured by their ``kinds``), the PNG ``figures`` and the configuration."""
    name = str(results["experiment"].iloc[0])
    interactive = {
        "Accuracy per task and method (interactive)": plots.interactive_bars(
            results, "accuracy", "merge_method", "accuracy per task and method"
        )
    }
    if points is not None and len(points) >= 3:
        interactive["Models on the unit sphere (interactive, 3-D)"] = plots.interactive_sphere(
            points, kinds or {}
        )
    body = "\n".join(
        [
            f"<h1>m3sb experiment: {html.escape(name)}</h1>",
            "<h2>Results</h2>",
            interactive_table(results, "results"),
            interactive_figures(interactive),
            embedded_images(figures),
            "<h2>Configuration</h2>",
            f"<pre>{html.escape(configuration)}</pre>",
        ]
    )
    folder.mkdir(parents=True, exist_ok=True)
    return write_text_atomic(folder / "report.html", html_page(f"m3sb report: {name}", body))


def html_page(title: str, body: str) -> str:
    """A complete page: ``title`` (escaped here), the shared style, ``body`` (HTML) and the table script."""
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>{STYLE}</style></head>
<body>
{body}
<script>{TABLE_SCRIPT}</script>
</body></html>
"""


def interactive_table(
    frame: Any, table_id: str, filter_columns: Sequence[str] = FILTER_COLUMNS, index: bool = False
) -> str:
    """``frame`` as an HTML table whose headers sort it, under a box that filters its rows by the
    words in their ``filter_columns`` (those ``frame`` has); ``index`` adds the index as the first
    column. Every name and value is escaped."""
    shown = frame.reset_index() if index else frame
    keys = [column for column in filter_columns if column in shown.columns]
    head = "".join(f"<th>{html.escape(str(column))}</th>" for column in shown.columns)
    rows = []
    for record in shown.itertuples(index=False):
        values = dict(zip(shown.columns, record, strict=True))
        key = " ".join(str(values[column]) for column in keys).lower()
        cells = "".join(_cell(value) for value in record)
        rows.append(f'<tr data-filter="{html.escape(key)}">{cells}</tr>')
    placeholder = "filter rows by " + ", ".join(keys) if keys else "filter rows"
    return (
        f'<input class="m3sb-filter" type="search" data-table="{html.escape(table_id)}" '
        f'placeholder="{html.escape(placeholder)}" aria-label="filter the table">\n'
        f'<table class="m3sb-table" id="{html.escape(table_id)}"><thead><tr>{head}</tr></thead>\n'
        f"<tbody>\n" + "\n".join(rows) + "\n</tbody></table>"
    )


def _cell(value: Any) -> str:
    """One table cell: numbers right-aligned (floats with two decimals, NaN empty), text escaped."""
    if isinstance(value, bool) or value is None:
        return f"<td>{'' if value is None else value}</td>"
    if isinstance(value, int) or (hasattr(value, "dtype") and value.dtype.kind in "iu"):
        return f'<td class="number">{int(value)}</td>'
    if isinstance(value, float):
        return f'<td class="number">{"" if math.isnan(value) else f"{value:.2f}"}</td>'
    return f"<td>{html.escape(str(value))}</td>"


def interactive_figures(figures: Mapping[str, Any]) -> str:
    """Plotly ``figures`` by title, each a heading and a div drawn from its JSON, with plotly.js
    inline once before them (no network needed); empty when there are none."""
    if not figures:
        return ""
    import plotly.io

    parts = [f"<script>{plotly_javascript()}</script>"]
    for number, (title, figure) in enumerate(figures.items()):
        figure_id = f"m3sb-figure-{number}"
        text = plotly.io.to_json(figure, validate=False, remove_uids=True)
        parts += [
            f"<h2>{html.escape(title)}</h2>",
            f'<div class="m3sb-plot" id="{figure_id}"></div>',
            f'<script type="application/json" id="{figure_id}-json">{script_json(text)}</script>',
        ]
    parts.append(f"<script>{PLOT_SCRIPT}</script>")
    return "\n".join(parts)


def plotly_javascript() -> str:
    """The plotly.js bundle that plotly ships, safe to inline in a ``<script>`` element.

    ``</script`` would end the element: it becomes ``<\\/script``. The bundle's one literal
    ``data:image/png;base64,`` (a string) gets its comma as ``\\x2c``, so that the phrase on the
    page means an embedded figure. In a string literal both escapes read as the same characters."""
    from plotly.offline import get_plotlyjs

    bundle: str = get_plotlyjs()
    return bundle.replace("</script", "<\\/script").replace(
        "data:image/png;base64,", "data:image/png;base64\\x2c"
    )


def script_json(text: str) -> str:
    """JSON ``text`` that cannot end its ``<script>`` element: every ``<`` (only ever inside a
    string) as ``\\u003c``."""
    return text.replace("<", "\\u003c")


def embedded_images(figures: Mapping[str, Path]) -> str:
    """PNG files by title, each a heading and the image embedded as base64."""
    return "\n".join(
        f'<h2>{html.escape(title)}</h2>\n<img alt="{html.escape(title)}" '
        f'src="data:image/png;base64,{base64.b64encode(path.read_bytes()).decode()}">'
        for title, path in figures.items()
    )
