"""``m3sb compare``: the union of several results.csv files, the means per run and method, the
files written, and the bad-input lines."""

from __future__ import annotations

import html
import re
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from m3sb.cli import app
from m3sb.compare import load_results, run_labels, summary_table, write_comparison
from m3sb.errors import ConfigError

runner = CliRunner()
HOSTILE = "<script>alert(1)</script>"

# A results.csv as m3sb experiment writes it (full weights), with a loss column ...
HEADER = "experiment,merge_method,dataset,accuracy,precision,recall,f1_score,loss,normalized_accuracy"
FULL = f"""{HEADER},samples,skipped_images,control
ex1a,finetuned,mnist,99.0,98.0,97.0,96.0,0.1,100.0,100,0,False
ex1a,finetuned,svhn,90.0,89.0,88.0,87.0,0.2,100.0,100,0,False
ex1a,linear,mnist,80.0,79.0,78.0,77.0,0.5,80.8081,100,0,False
ex1a,linear,svhn,70.0,69.0,68.0,67.0,0.6,77.7778,100,0,False
ex1a,barycenter,mnist,85.5,84.0,83.0,82.0,0.4,86.3636,100,0,False
ex1a,barycenter,svhn,75.25,74.0,73.0,72.0,0.5,83.6111,100,0,False
"""
# ... and one as the seed's notebook wrote them (task vectors): an index column, the seven columns.
SEED = f""",experiment,merge_method,dataset,accuracy,precision,recall,f1_score
0,ex5a,linear,mnist,82.0,81.0,80.0,79.5
1,ex5a,linear,svhn,73.0,72.0,71.0,70.5
2,ex5a,{HOSTILE},mnist,60.0,59.0,58.0,57.0
3,ex5a,{HOSTILE},svhn,50.0,49.0,48.0,47.0
"""


def _folder(root: Path, name: str, text: str) -> Path:
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "results.csv").write_text(text)
    return folder


@pytest.fixture
def folders(tmp_path: Path) -> list[Path]:
    return [_folder(tmp_path, "full", FULL), _folder(tmp_path, "tv", SEED)]


def test_the_comparison_holds_every_row_and_names_its_folder(folders: list[Path], tmp_path: Path) -> None:
    paths = write_comparison(load_results(folders), tmp_path / "out")
    assert set(paths) == {"csv", "accuracy", "html"}
    table = pd.read_csv(paths["csv"], keep_default_na=False, na_values=[""])
    assert list(table.columns[:8]) == [
        "results",
        "experiment",
        "merge_method",
        "dataset",
        "accuracy",
        "precision",
        "recall",
        "f1_score",
    ]
    assert "Unnamed: 0" not in table.columns and "loss" in table.columns
    assert len(table) == 6 + 4
    assert list(table["results"]) == [str(folders[0])] * 6 + [str(folders[1])] * 4
    full, seed = pd.read_csv(folders[0] / "results.csv"), pd.read_csv(folders[1] / "results.csv")
    for part, source in ((table[:6], full), (table[6:], seed)):
        for column in ("experiment", "merge_method", "dataset", "accuracy", "f1_score"):
            assert list(part[column]) == list(source[column])
    assert table["loss"][:6].tolist() == [0.1, 0.2, 0.5, 0.6, 0.4, 0.5]
    assert table["loss"][6:].isna().all()  # a column one file lacks is empty for its rows


def test_the_means_per_run_and_method(folders: list[Path]) -> None:
    summary = summary_table(load_results(folders), "accuracy")
    assert list(summary.columns) == ["mnist", "svhn", "mean"]
    means = summary["mean"].to_dict()
    assert means == {
        "ex1a / finetuned": pytest.approx((99.0 + 90.0) / 2),
        "ex1a / linear": pytest.approx((80.0 + 70.0) / 2),
        "ex1a / barycenter": pytest.approx((85.5 + 75.25) / 2),
        "ex5a / linear": pytest.approx((82.0 + 73.0) / 2),
        f"ex5a / {HOSTILE}": pytest.approx((60.0 + 50.0) / 2),
    }
    assert summary.loc["ex5a / linear", "svhn"] == 73.0
    f1 = summary_table(load_results(folders), "f1_score")["mean"]
    assert f1["ex5a / linear"] == pytest.approx((79.5 + 70.5) / 2)


def test_the_command_prints_the_means_and_writes_the_files(folders: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    arguments = [
        "compare",
        *map(str, folders),
        "--out",
        str(out),
        "--metric",
        "accuracy",
        "--metric",
        "f1_score",
    ]
    result = runner.invoke(app, arguments, env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    rows = {
        line.split("│")[1].strip(): line.split("│")[2:-1]
        for line in result.stdout.splitlines()
        if "│" in line
    }
    assert [cell.strip() for cell in rows["ex1a / barycenter"]] == ["85.50", "75.25", "80.38"]
    assert [cell.strip() for cell in rows["ex5a / linear"]] == ["82.00", "73.00", "77.50"]
    assert [cell.strip() for cell in rows[f"ex5a / {HOSTILE}"]] == ["60.00", "50.00", "55.00"]
    for name in ("comparison.csv", "comparison.png", "comparison_f1_score.png", "comparison.html"):
        assert str(out / name) in result.stdout
    for name in ("comparison.png", "comparison_f1_score.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(path.name for path in out.iterdir()) == [
        "comparison.csv",
        "comparison.html",
        "comparison.png",
        "comparison_f1_score.png",
    ]


def test_the_page_is_self_contained_and_escaped(folders: list[Path], tmp_path: Path) -> None:
    import json

    from plotly.offline import get_plotlyjs

    page = write_comparison(load_results(folders), tmp_path / "out", ["accuracy", "recall"])[
        "html"
    ].read_text()
    assert page.count(get_plotlyjs()[:300]) == 1
    assert re.search(r"<script[^>]*\bsrc\s*=", page) is None
    assert HOSTILE not in page and f"<td>{html.escape(HOSTILE)}</td>" in page
    assert page.count('class="m3sb-table"') == 2 and page.count('class="m3sb-filter"') == 2
    assert '<tr data-filter="ex5a / linear"><td>ex5a / linear</td><td class="number">82.00</td>' in page
    assert page.count('src="data:image/png;base64,') == 2
    blocks = re.findall(
        r'<script type="application/json" id="m3sb-figure-\d+-json">(.*?)</script>', page, re.S
    )
    accuracy, recall = (json.loads(block) for block in blocks)
    bars = {html.unescape(trace["name"]): trace["y"] for trace in accuracy["data"]}
    assert bars["ex1a / linear"] == [80.0, 70.0] and bars[f"ex5a / {HOSTILE}"] == [60.0, 50.0]
    assert {html.unescape(t["name"]): t["y"] for t in recall["data"]}["ex5a / linear"] == [80.0, 71.0]


def test_equal_experiment_names_are_told_apart_by_folder(tmp_path: Path) -> None:
    same = [_folder(tmp_path, "run1", FULL), _folder(tmp_path, "run2", FULL.replace("80.0", "81.0"))]
    frame = load_results(same)
    labels = run_labels(frame)
    assert list(labels) == ["ex1a (run1)"] * 6 + ["ex1a (run2)"] * 6
    means = summary_table(frame, "accuracy")["mean"]
    assert means["ex1a (run1) / linear"] == pytest.approx(75.0)
    assert means["ex1a (run2) / linear"] == pytest.approx(75.5)
    twins = [_folder(tmp_path / "x", "run", FULL), _folder(tmp_path / "y", "run", FULL)]
    assert set(run_labels(load_results(twins))) == {f"ex1a ({twins[0]})", f"ex1a ({twins[1]})"}
    assert len(load_results([same[0], same[0]])) == 6  # a folder given twice counts once


def _fails(arguments: list[str]) -> str:
    result = runner.invoke(app, ["compare", *arguments])
    assert result.exit_code == 1, result.output
    message = result.stderr.strip()
    assert message.startswith("error: ") and message.count("\n") == 0, message
    assert "Traceback" not in result.output
    return message


@pytest.mark.parametrize(
    ("name", "content", "pattern"),
    [
        ("missing", None, r"missing: no such folder$"),
        ("empty", "", None),
        (
            "no-f1",
            FULL.replace(",f1_score", ""),
            r"no-f1/results\.csv: no column 'f1_score' \(results\.csv needs",
        ),
        ("binary", b"\x89PNG\r\n\x1a\n\x00\xff", r"binary/results\.csv: not a readable CSV file"),
        (
            "quotes",
            'experiment,merge_method\n"ex1a,linear\n',
            r"quotes/results\.csv: not a readable CSV file",
        ),
        ("header", FULL.splitlines()[0] + "\n", r"header/results\.csv: no rows$"),
        (
            "text",
            FULL.replace("80.0", "eighty"),
            r"text/results\.csv: row 4: accuracy 'eighty' is not a number",
        ),
    ],
)
def test_bad_results_folders_are_named(
    folders: list[Path], tmp_path: Path, name: str, content: str | bytes | None, pattern: str | None
) -> None:
    bad = tmp_path / name
    if content is not None or name == "empty":
        bad.mkdir()
    if isinstance(content, bytes):
        (bad / "results.csv").write_bytes(content)
    elif content:
        (bad / "results.csv").write_text(content)
    out = tmp_path / "out"
    message = _fails([str(folders[0]), str(bad), "--out", str(out)])
    expected = pattern or re.escape(f"{bad / 'results.csv'}: no such file")
    assert re.search(expected, message), message
    assert not out.exists()


def test_no_folder_and_unknown_or_absent_metrics_fail_in_one_line(
    folders: list[Path], tmp_path: Path
) -> None:
    out = tmp_path / "out"
    assert "no results folder given" in _fails(["--out", str(out)])
    message = _fails([str(folders[0]), "--metric", "loss", "--out", str(out)])
    assert message == (
        "error: unknown metric 'loss': choose one of "
        "accuracy, precision, recall, f1_score, normalized_accuracy"
    )
    message = _fails([*map(str, folders), "--metric", "normalized_accuracy", "--out", str(out)])
    assert (
        message
        == f"error: {folders[1] / 'results.csv'}: no normalized_accuracy values (pick another --metric)"
    )
    assert not out.exists()
    with pytest.raises(ConfigError, match="no results folder given"):
        load_results([])
