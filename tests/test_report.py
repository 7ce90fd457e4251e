"""report.html: the results table (sortable, filterable), one inline plotly.js, interactive bars and
the models on the 3-D unit sphere, escaping of user text; the 3-D projection's geometry."""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch

from m3sb.experiment import RESULT_COLUMNS
from m3sb.plots import sphere_coordinates, sphere_coordinates_3d
from m3sb.report import TABLE_SCRIPT, write_figures, write_report

HOSTILE = "<script>alert(1)</script>"
DATASETS = ("mnist", "svhn")
ACCURACY = {
    ("finetuned", "mnist"): 99.25,
    ("finetuned", "svhn"): 91.5,
    ("base", "mnist"): 12.75,
    ("base", "svhn"): 10.0,
    ("linear", "mnist"): 87.25,
    ("linear", "svhn"): 64.5,
    (HOSTILE, "mnist"): 55.0,
    (HOSTILE, "svhn"): 44.75,
}
KINDS = {"base": "base", "mnist": "finetuned", "svhn": "finetuned", "linear": "merge", HOSTILE: "merge"}


def _results() -> pd.DataFrame:
    rows = []
    for (method, dataset), accuracy in ACCURACY.items():
        finetuned = ACCURACY[("finetuned", dataset)]
        values = {
            "experiment": "digits <b>zoo</b>",
            "merge_method": method,
            "dataset": dataset,
            "accuracy": accuracy,
            "precision": accuracy - 1.0,
            "recall": accuracy - 2.0,
            "f1_score": accuracy - 3.0,
            "loss": 0.5,
            "normalized_accuracy": 100.0 * accuracy / finetuned,
            "samples": 400,
            "skipped_images": 0,
            "control": False,
        }
        rows.append([values[column] for column in RESULT_COLUMNS])
    return pd.DataFrame(rows, columns=list(RESULT_COLUMNS))


def _points(count: int = len(KINDS)) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    names = list(KINDS)[:count]
    return {name: torch.randn(64, generator=generator) * (i + 1) for i, name in enumerate(names)}


@pytest.fixture(scope="module")
def page(tmp_path_factory: pytest.TempPathFactory) -> str:
    folder = tmp_path_factory.mktemp("report")
    results, points = _results(), _points()
    figures = write_figures(results, points, KINDS, folder)
    configuration = f"name: digits\nmerge_configs:\n  '{HOSTILE}': {{}}\n"
    target = write_report(results, figures, configuration, folder, points=points, kinds=KINDS)
    assert target == folder / "report.html"
    written = {path.name for path in folder.iterdir()}
    assert written == {"report.html", "radar.png", "bars.png", "heatmap.png", "sphere.png"}  # no temp file
    return target.read_text(encoding="utf-8")


def _figures(page: str) -> list[dict[str, Any]]:
    """The JSON of every interactive figure on the page, in order."""
    blocks = re.findall(
        r'<script type="application/json" id="m3sb-figure-\d+-json">(.*?)</script>', page, re.S
    )
    return [json.loads(block) for block in blocks]


def _table_rows(page: str, table_id: str) -> list[list[str]]:
    table = re.search(rf'<table class="m3sb-table" id="{table_id}">(.*?)</table>', page, re.S)
    assert table is not None
    body = table.group(1).split("<tbody>")[1]
    return [
        [html.unescape(cell) for cell in re.findall(r"<td[^>]*>(.*?)</td>", row)]
        for row in re.findall(r"<tr[^>]*>(.*?)</tr>", body)
    ]


def test_the_table_holds_every_row_and_value(page: str) -> None:
    header = re.search(r'<table class="m3sb-table" id="results"><thead><tr>(.*?)</tr>', page)
    assert header is not None
    assert re.findall(r"<th>(.*?)</th>", header.group(1)) == list(RESULT_COLUMNS)
    rows = _table_rows(page, "results")
    assert len(rows) == len(ACCURACY)
    for row, ((method, dataset), accuracy) in zip(rows, ACCURACY.items(), strict=True):
        assert row[:3] == ["digits <b>zoo</b>", method, dataset]
        assert row[3:7] == [f"{accuracy - offset:.2f}" for offset in (0.0, 1.0, 2.0, 3.0)]
        assert row[RESULT_COLUMNS.index("samples")] == "400"
    assert 'data-filter="digits &lt;b&gt;zoo&lt;/b&gt; linear mnist"' in page


def test_the_page_sorts_and_filters_its_tables(page: str) -> None:
    assert f"<script>{TABLE_SCRIPT}</script>" in page
    assert '<input class="m3sb-filter" type="search" data-table="results"' in page
    assert "table.m3sb-table" in TABLE_SCRIPT and "input.m3sb-filter" in TABLE_SCRIPT


# A stand-in for the few DOM calls TABLE_SCRIPT makes: one table, one filter box.
_FAKE_DOM = """
const spec = JSON.parse(require("fs").readFileSync(0, "utf8"));
function element(attributes) {
  return {attributes: attributes, handlers: {},
    getAttribute(name) { return name in this.attributes ? this.attributes[name] : null; },
    setAttribute(name, value) { this.attributes[name] = String(value); },
    removeAttribute(name) { delete this.attributes[name]; },
    addEventListener(type, handler) { this.handlers[type] = handler; }};
}
const headers = spec.headers.map(() => element({}));
const rows = spec.rows.map((row) => Object.assign(element({"data-filter": row.filter}),
  {cells: row.cells.map((text) => ({textContent: text})), hidden: false}));
const body = {rows: rows.slice(),
  appendChild(row) { this.rows.splice(this.rows.indexOf(row), 1); this.rows.push(row); }};
const table = {tHead: {rows: [{cells: headers}]}, tBodies: [body]};
const input = Object.assign(element({"data-table": "t"}), {value: ""});
global.document = {
  querySelectorAll: (s) => s === "table.m3sb-table" ? [table] : s === "input.m3sb-filter" ? [input] : [],
  getElementById: (id) => id === "t" ? table : null};
eval(spec.script);
const names = () => body.rows.map((row) => row.cells[0].textContent);
const out = {};
headers[1].handlers.click(); out.ascending = names(); out.arrow = headers[1].getAttribute("aria-sort");
headers[1].handlers.click(); out.descending = names();
headers[0].handlers.click(); out.byName = names(); out.cleared = headers[1].getAttribute("aria-sort");
input.value = " LINEAR  svhn"; input.handlers.input();
out.shown = body.rows.filter((row) => !row.hidden).map((row) => row.cells[0].textContent);
console.log(JSON.stringify(out));
"""


@pytest.mark.skipif(shutil.which("node") is None, reason="needs node to run the page's script")
def test_the_table_script_sorts_numbers_as_numbers_and_filters_by_every_word() -> None:
    rows = [
        {"cells": ["c", "9.5"], "filter": "linear mnist"},
        {"cells": ["a", "100"], "filter": "linear svhn"},
        {"cells": ["b", "10.25"], "filter": "ties svhn"},
        {"cells": ["d", ""], "filter": "base svhn"},
    ]
    spec = {"script": TABLE_SCRIPT, "headers": ["name", "accuracy"], "rows": rows}
    node = str(shutil.which("node"))
    done = subprocess.run(
        [node, "-e", _FAKE_DOM], input=json.dumps(spec), capture_output=True, text=True, check=True
    )
    out = json.loads(done.stdout)
    assert out["ascending"] == ["c", "b", "a", "d"]  # 9.5 < 10.25 < 100, then the empty cell
    assert out["arrow"] == "ascending"
    assert out["descending"] == ["d", "a", "b", "c"]
    assert out["byName"] == ["a", "b", "c", "d"] and out["cleared"] is None
    assert out["shown"] == ["a"]


def test_one_inline_plotly_bundle_and_no_network(page: str) -> None:
    from plotly.offline import get_plotlyjs

    assert page.count(get_plotlyjs()[:300]) == 1
    assert page.count("Plotly.newPlot(") == 1  # one loader draws every figure
    assert re.search(r"<script[^>]*\bsrc\s*=", page) is None
    assert re.search(r"""src\s*=\s*["']?https?://""", page) is None
    assert "<link" not in page
    # The four PNG figures are the page's only embedded images.
    assert page.count('src="data:image/png;base64,') == 4
    assert page.count("data:image/png;base64,") == 4


def test_the_accuracy_bars_hold_the_table_values(page: str) -> None:
    bars = _figures(page)[0]
    assert bars["layout"]["barmode"] == "group"
    traces = {html.unescape(trace["name"]): trace for trace in bars["data"]}
    assert list(traces) == list(dict.fromkeys(method for method, _ in ACCURACY))
    for method, trace in traces.items():
        assert trace["type"] == "bar" and trace["x"] == list(DATASETS)
        assert trace["y"] == [ACCURACY[(method, dataset)] for dataset in DATASETS]


def test_the_models_on_the_unit_sphere(page: str) -> None:
    figures = _figures(page)
    assert len(figures) == 2
    sphere = figures[1]
    surfaces = [trace for trace in sphere["data"] if trace["type"] == "surface"]
    assert len(surfaces) == 1 and surfaces[0]["opacity"] <= 0.2
    markers = [trace for trace in sphere["data"] if trace.get("mode") == "markers+text"]
    expected = sphere_coordinates_3d(_points())
    assert [html.unescape(trace["name"]) for trace in markers] == list(expected)
    colours: dict[str, set[str]] = {}
    for trace in markers:
        name = html.unescape(trace["name"])
        point = [trace["x"][0], trace["y"][0], trace["z"][0]]
        assert sum(v * v for v in point) == pytest.approx(1.0, abs=1e-9)
        assert point == pytest.approx(list(expected[name]), abs=1e-9)
        assert html.unescape(trace["text"][0]) == name
        assert html.unescape(trace["hovertext"][0]) == f"{name} ({KINDS[name]})"
        colours.setdefault(KINDS[name], set()).add(trace["marker"]["color"])
    assert all(len(found) == 1 for found in colours.values())  # one colour per kind ...
    assert len(set.union(*colours.values())) == 3  # ... and three kinds, three colours


def test_user_text_is_escaped_everywhere(page: str) -> None:
    assert HOSTILE not in page
    assert "<b>zoo</b>" not in page
    assert "<title>m3sb report: digits &lt;b&gt;zoo&lt;/b&gt;</title>" in page
    assert f"<td>{html.escape(HOSTILE)}</td>" in page
    assert html.escape(f"  '{HOSTILE}': {{}}") in page  # the configuration
    for figure in _figures(page):  # plotly shows entities as text: the label reads as typed
        names = [html.unescape(trace.get("name", "")) for trace in figure["data"]]
        assert HOSTILE in names


def test_fewer_than_three_points_skip_the_sphere(tmp_path: Path) -> None:
    results = _results()
    target = write_report(results, {}, "name: digits", tmp_path, points=_points(2), kinds=KINDS)
    page = target.read_text(encoding="utf-8")
    figures = _figures(page)
    assert len(figures) == 1 and all(trace["type"] == "bar" for trace in figures[0]["data"])
    assert "unit sphere" not in page
    assert write_report(results, {}, "", tmp_path).read_text(encoding="utf-8").count("m3sb-figure-") == 2


def test_orthogonal_directions_stay_orthogonal_on_the_sphere() -> None:
    rotation, _ = torch.linalg.qr(torch.randn(10, 10, generator=torch.Generator().manual_seed(1)))
    points = {
        name: scale * rotation[:, i] for i, (name, scale) in enumerate([("a", 2.0), ("b", 0.5), ("c", 3.0)])
    }
    coordinates = {
        name: torch.tensor(value, dtype=torch.float64)
        for name, value in sphere_coordinates_3d(points).items()
    }
    for value in coordinates.values():
        assert float(value.norm()) == pytest.approx(1.0, abs=1e-9)
    for first, second in [("a", "b"), ("a", "c"), ("b", "c")]:
        assert abs(float(coordinates[first] @ coordinates[second])) < 1e-6


def test_the_sphere_keeps_the_angles_of_three_directions() -> None:
    generator = torch.Generator().manual_seed(2)
    points = {name: torch.randn(50, generator=generator) for name in "abc"}
    coordinates = sphere_coordinates_3d(points)
    for first, second in [("a", "b"), ("a", "c"), ("b", "c")]:
        x, y = points[first].double(), points[second].double()
        cosine = float(x @ y / (x.norm() * y.norm()))
        projected = sum(u * v for u, v in zip(coordinates[first], coordinates[second], strict=True))
        assert projected == pytest.approx(cosine, abs=1e-9)


def test_the_two_dimensional_view_is_the_centred_one() -> None:
    """The 2-D plot keeps its centred PCA: symmetric points land symmetrically about the mean."""
    points = {
        "a": torch.tensor([1.0, 0.0, 0.0]),
        "b": torch.tensor([0.0, 5.0, 0.0]),
        "c": torch.tensor([-2.0, 0, 0]),
    }
    coordinates = sphere_coordinates(points)
    assert sum(value[1] for value in coordinates.values()) == pytest.approx(0.0, abs=1e-9)
    assert coordinates["a"][0] == pytest.approx(-coordinates["c"][0], abs=1e-9)
    assert abs(coordinates["b"][1]) == pytest.approx(2 * abs(coordinates["a"][1]), abs=1e-9)
    assert sphere_coordinates({"a": torch.ones(3)}) == {"a": (0.0, 0.0)}


def test_the_grid_front_keeps_exactly_the_non_dominated_points() -> None:
    import numpy as np

    from m3sb.plots import non_dominated_2d

    points = np.array([[1.0, 5.0], [2.0, 4.0], [2.0, 3.0], [0.5, 4.5], [3.0, 1.0], [1.0, 5.0], [0.0, 0.0]])
    np.testing.assert_array_equal(non_dominated_2d(points), [[1.0, 5.0], [2.0, 4.0], [3.0, 1.0]])
    np.testing.assert_array_equal(non_dominated_2d(points, maximise=False), [[0.0, 0.0]])
    rng = np.random.default_rng(0)
    cloud = rng.random((200, 2))
    front = non_dominated_2d(cloud)
    for point in cloud:  # every point is matched or beaten by one on the front, and none beats another
        assert ((front >= point).all(axis=1)).any()
    for a in front:
        assert not (((front >= a).all(axis=1)) & ((front > a).any(axis=1))).any()
