"""front.html: the amortized front in a headless chromium (points plotted, the preference's choice
as Python's select_index makes it, hover texts), the selection script against select_index, a
page that needs no network, and an atomic write."""

from __future__ import annotations

import base64
import html
import json
import os
import re
import shutil
import subprocess
from fractions import Fraction
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from m3sb.pareto.evaluations import Evaluation
from m3sb.pareto.front import MetricSense, ParetoFront
from m3sb.pareto.html import SELECT_SCRIPT, SHOWN_POINTS, front_html, shown_front
from m3sb.pareto.preference import Rule, select_index
from m3sb.pareto.run import ParetoOutcome
from m3sb.report import plotly_javascript

CHROMIUM = "/usr/bin/chromium"
HOSTILE = "<b>svhn</b>"
STATE = "m3sb-front-state"


def _outcome(
    tasks: int,
    rows: int,
    seed: int,
    metric: MetricSense = "score",
    chosen: tuple[list[float], Rule] | None = None,
) -> tuple[ParetoOutcome, list[Evaluation]]:
    """A synthetic front (points on a sphere's positive orthant, no models) and its measured points:
    a design, a few front points checked, the selected one, a grid and a baseline."""
    rng = np.random.default_rng(seed)
    directions = np.abs(rng.normal(size=(rows, tasks)))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    sign = -1.0 if metric == "loss" else 1.0
    predicted = 50.0 + sign * 40.0 * directions if metric == "score" else 2.0 - 1.5 * directions
    coefficients = rng.uniform(0.0, 1.0, size=(rows, tasks))
    order = np.argsort(-sign * predicted[:, 0], kind="stable")
    coefficients, predicted = coefficients[order], predicted[order]
    names = [f"task{number}" for number in range(tasks)]
    names[1] = HOSTILE
    design = [Evaluation(rng.uniform(0, 1, tasks), predicted[0] - sign * rng.uniform(1, 9, tasks), "design")]
    design += [Evaluation(rng.uniform(0, 1, tasks), predicted[-1] - sign * 3.0, "adaptive 1")]
    checked = [
        Evaluation(coefficients[row].copy(), predicted[row] - sign * 0.5, "front check") for row in (0, 2)
    ]
    grid = [
        Evaluation(np.full(tasks, value), predicted[1] - sign * 10 * value, "grid") for value in (0.0, 1.0)
    ]
    baseline = [
        Evaluation(np.full(tasks, 0.3), predicted[3] - sign * 2.0, "baseline: every coefficient at 0.3")
    ]
    evaluations = [*design, *checked, *grid, *baseline]
    front = ParetoFront(coefficients, predicted, design, np.full(tasks, 0.93), metric, "map")
    outcome = ParetoOutcome(
        front,
        names,
        "loss" if metric == "loss" else "accuracy",
        Path("unused"),
        baselines={"ties": predicted[4] - sign * 4.0, "dare <ties>": predicted[5] - sign * 5.0},
        finetuned=predicted.max(axis=0) if metric == "score" else predicted.min(axis=0),
    )
    if chosen is not None:
        preference, rule = chosen
        index = front.select_index(preference, rule)
        evaluations.append(Evaluation(coefficients[index].copy(), predicted[index] - sign, "selected"))
        outcome.selected = {
            "preference": dict(zip(names, preference, strict=True)),
            "rule": rule,
            "coefficients": dict(zip(names, coefficients[index].tolist(), strict=True)),
            "predicted": dict(zip(names, predicted[index].tolist(), strict=True)),
            "measured": dict(zip(names, (predicted[index] - sign).tolist(), strict=True)),
        }
    return outcome, evaluations


class _State(HTMLParser):
    """The attributes of the element with id m3sb-front-state."""

    def __init__(self) -> None:
        super().__init__()
        self.found: dict[str, str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = {name: value or "" for name, value in attrs}
        if values.get("id") == STATE:
            self.found = values


def _chromium() -> str:
    found = shutil.which("chromium") or (CHROMIUM if Path(CHROMIUM).exists() else None)
    if found is None:
        why = (
            "chromium is not installed: front.html's tests load the page in a headless chromium "
            "(Debian/Ubuntu: apt-get install chromium)"
        )
        if os.environ.get("M3SB_REQUIRE_BROWSER") == "1":  # CI installs it: a missing one is a failure
            pytest.fail(why)
        pytest.skip(why)
    return found


def _load(page: Path, fragment: str, profile: Path) -> dict[str, str]:
    """The state element's attributes once the page has drawn itself in a headless chromium."""
    command = [
        _chromium(),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        f"--user-data-dir={profile}",
        "--virtual-time-budget=10000",
        "--dump-dom",
        page.resolve().as_uri() + fragment,
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=180, check=False)
    parser = _State()
    parser.feed(done.stdout)
    assert parser.found is not None, (
        f"no #{STATE} in chromium's DOM (exit {done.returncode}): {done.stderr[-2000:]}"
    )
    assert parser.found.get("data-ready") == "true", f"the page did not finish drawing: {parser.found}"
    return parser.found


# (tasks, metric, the run's preference and rule or None, address fragments: preference, rule, hover)
CASES = {
    "2 tasks": (
        2,
        "score",
        ([1.0, 3.0], "chebyshev"),
        [(None, None, 0), ([1.0, 0.0], "weighted_sum", None), ([0.2, 1.0], "chebyshev", 7)],
    ),
    "4 tasks": (
        4,
        "score",
        None,
        [(None, None, 5), ([1.0, 0.0, 2.0, 0.5], "chebyshev", None), ([0.0, 0.0, 0.0, 1.0], None, 3)],
    ),
    "3 tasks, loss": (
        3,
        "loss",
        ([2.0, 1.0, 1.0], "weighted_sum"),
        [([1.0, 2.0, 3.0], "chebyshev", 1), ([3.0, 1.0, 1.0], "weighted_sum", None)],
    ),
    "8 tasks": (8, "score", None, [(None, None, 2), ([1, 2, 3, 4, 5, 6, 7, 8], "chebyshev", None)]),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_the_browser_plots_every_front_point_and_picks_as_python_does(case: str, tmp_path: Path) -> None:
    tasks, metric, chosen, fragments = CASES[case]
    rows = 23 + 4 * tasks
    outcome, evaluations = _outcome(tasks, rows, seed=tasks, metric=metric, chosen=chosen)  # type: ignore[arg-type]
    page = front_html(outcome, evaluations, tmp_path / "front.html")
    front = outcome.front
    names = outcome.task_names
    pairs = tasks * (tasks - 1) // 2
    initial, initial_rule = chosen if chosen is not None else ([1.0] * tasks, "weighted_sum")
    for preference, rule, hover in fragments:
        parts = []
        if preference is not None:
            parts.append("preference=" + ",".join(f"{w:g}" for w in preference))
        if rule is not None:
            parts.append(f"rule={rule}")
        if hover is not None:
            parts.append(f"hover={hover}")
        state = _load(page, "#" + "&".join(parts) if parts else "", tmp_path / "profile")
        assert state["data-error"] == ""
        assert int(state["data-front-points"]) == rows
        assert state["data-front-points-per-panel"] == ",".join([str(rows)] * pairs)
        weights = preference if preference is not None else initial
        used: Rule = rule or initial_rule  # type: ignore[assignment]
        expected = select_index(front.sign * front.predicted, weights, used)
        assert int(state["data-selected-index"]) == expected == front.select_index(weights, used)
        assert state["data-rule"] == used
        assert [float(w) for w in state["data-preference"].split(",")] == [float(w) for w in weights]
        if hover is not None:
            text = state["data-hover-text"]  # what the rendered hover label reads
            assert text.startswith(f"front point {hover} of {rows}")
            for task, name in enumerate(names):
                assert f"{name}: c = {front.coefficients[hover, task]:.4f}" in text
                assert f"predicted {front.predicted[hover, task]:.4g}" in text


def test_a_large_front_is_shown_as_a_spread_subset_that_keeps_the_selected_point() -> None:
    outcome, _ = _outcome(3, 400, seed=5, chosen=([1.0, 4.0, 2.0], "chebyshev"))
    shown = shown_front(outcome, limit=60)
    front, thinned = outcome.front, shown.front
    assert thinned.coefficients.shape == (60, 3) and thinned.predicted.shape == (60, 3)
    rows = [int(np.flatnonzero((front.coefficients == row).all(axis=1))[0]) for row in thinned.coefficients]
    assert len(set(rows)) == 60  # distinct rows of the front, each with its own predictions
    assert np.array_equal(front.predicted[rows], thinned.predicted)
    assert outcome.selected is not None
    chosen = [outcome.selected["coefficients"][name] for name in outcome.task_names]
    assert rows[0] == int(np.flatnonzero((front.coefficients == chosen).all(axis=1))[0])
    # spread: the subset reaches every task's best within 2% of the front's range of that task
    span = np.ptp(front.predicted, axis=0)
    assert np.all(front.predicted.max(axis=0) - thinned.predicted.max(axis=0) <= 0.02 * span)
    assert shown_front(outcome, limit=400) is outcome  # small enough: the front itself
    scores = front.sign * front.predicted  # each task's best and worst: Chebyshev scales by them
    assert set(np.argmax(scores, axis=0)) | set(np.argmin(scores, axis=0)) <= set(rows)
    low, high = scores[rows].min(axis=0), scores[rows].max(axis=0)
    assert np.array_equal(low, scores.min(axis=0)) and np.array_equal(high, scores.max(axis=0))


@pytest.mark.slow
def test_the_page_of_a_large_front_draws_its_subset(tmp_path: Path) -> None:
    outcome, evaluations = _outcome(2, SHOWN_POINTS + 500, seed=3, chosen=([1.0, 2.0], "weighted_sum"))
    page = front_html(outcome, evaluations, tmp_path / "front.html")
    state = _load(page, "", tmp_path / "profile")
    assert int(state["data-front-points"]) == SHOWN_POINTS
    assert f"{SHOWN_POINTS} of the {SHOWN_POINTS + 500} (spread evenly) front points" in page.read_text()
    shown = shown_front(outcome).front
    assert int(state["data-selected-index"]) == 0 == shown.select_index([1.0, 2.0])  # the run's choice


@pytest.mark.slow
def test_a_bad_preference_in_the_address_is_reported_and_keeps_the_run_s_choice(tmp_path: Path) -> None:
    outcome, evaluations = _outcome(2, 20, seed=1, chosen=([3.0, 1.0], "weighted_sum"))
    page = front_html(outcome, evaluations, tmp_path / "front.html")
    for fragment, problem in (
        ("#preference=1,-1", "finite and >= 0"),
        ("#preference=1,2,3", "3 weights for 2 tasks"),
        ("#preference=1,1&rule=median", "unknown preference rule 'median'"),
    ):
        state = _load(page, fragment, tmp_path / "profile")
        assert problem in state["data-error"] and state["data-error"].startswith("in the address: ")
        assert int(state["data-front-points"]) == 20
        assert int(state["data-selected-index"]) == outcome.front.select_index([3.0, 1.0])
        assert state["data-preference"] == "3,1" and state["data-rule"] == "weighted_sum"


# A user: sets the first weight to 0 in its box, the second's slider to 1 and the rule to Chebyshev,
# notes the choice, then types a new preference into the address.
_USER = """<script>
setTimeout(function () {
  var box = document.getElementById("m3sb-weight-0"), slider = document.getElementById("m3sb-range-1");
  var rule = document.getElementById("m3sb-rule"), state = document.getElementById("m3sb-front-state");
  box.value = "0"; box.dispatchEvent(new Event("input"));
  slider.value = "1"; slider.dispatchEvent(new Event("input"));
  rule.value = "chebyshev"; rule.dispatchEvent(new Event("change"));
  setTimeout(function () {
    state.setAttribute("data-after-controls", state.getAttribute("data-selected-index") + " " +
      state.getAttribute("data-preference") + " " + state.getAttribute("data-rule"));
    location.hash = "#preference=5,0,1&rule=weighted_sum";
  }, 1000);
}, 2000);
</script>
</body>"""


@pytest.mark.slow
def test_the_controls_and_the_address_move_the_choice(tmp_path: Path) -> None:
    outcome, evaluations = _outcome(3, 30, seed=6, chosen=([1.0, 2.0, 3.0], "weighted_sum"))
    page = front_html(outcome, evaluations, tmp_path / "front.html")
    driven = tmp_path / "driven.html"
    driven.write_text(page.read_text(encoding="utf-8").replace("</body>", _USER), encoding="utf-8")
    state = _load(driven, "", tmp_path / "profile")
    front = outcome.front
    by_controls = front.select_index([0.0, 1.0, 3.0], "chebyshev")
    assert state["data-after-controls"] == f"{by_controls} 0,1,3 chebyshev"
    assert int(state["data-selected-index"]) == front.select_index([5.0, 0.0, 1.0], "weighted_sum")
    assert state["data-preference"] == "5,0,1" and state["data-rule"] == "weighted_sum"
    assert front.select_index([1.0, 2.0, 3.0]) != by_controls  # the controls did move it


def _page_parts(page: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The page's facts and figure JSON."""
    facts = re.search(r'<script type="application/json" id="m3sb-front-facts">(.*?)</script>', page, re.S)
    figure = re.search(
        r'<script type="application/json" id="m3sb-front-figure-json">(.*?)</script>', page, re.S
    )
    assert facts is not None and figure is not None
    return json.loads(facts.group(1)), json.loads(figure.group(1))


def _array(values: Any) -> np.ndarray:
    """A plotly JSON array: a list, or a typed array in base64."""
    if isinstance(values, dict):
        return np.frombuffer(base64.b64decode(values["bdata"]), dtype=values["dtype"])
    return np.asarray(values)


def test_hover_texts_show_coefficients_predictions_and_measurements(tmp_path: Path) -> None:
    outcome, evaluations = _outcome(3, 12, seed=3, chosen=([1.0, 1.0, 1.0], "weighted_sum"))
    text = front_html(outcome, evaluations, tmp_path / "front.html").read_text(encoding="utf-8")
    facts, figure = _page_parts(text)
    front, names = outcome.front, outcome.task_names
    hover = facts["hover"]["front"]
    assert len(hover) == 12
    measured_rows = {0: "front check", 2: "front check", front.select_index([1.0, 1.0, 1.0]): "selected"}
    for row, label in enumerate(hover):
        for task, name in enumerate(names):
            shown = html.escape(name)
            coefficient, predicted = front.coefficients[row, task], front.predicted[row, task]
            assert f"{shown}: c = {coefficient:.4f}, predicted {predicted:.4g}" in label
        if row in measured_rows:
            assert f"measured: {measured_rows[row]}" in label
            assert (
                facts["measured"][row] is not None and facts["measured_phase"][row] in measured_rows.values()
            )
        else:
            assert "not measured" in label and facts["measured"][row] is None
    assert HOSTILE not in text  # names are escaped: plotly reads the label as typed
    # One panel per pair of tasks, each with the whole front; hover texts are shared, not repeated.
    assert len(facts["front_traces"]) == len(facts["choice_traces"]) == 3
    for trace_index, (x, y) in zip(facts["front_traces"], facts["pairs"], strict=True):
        trace = figure["data"][trace_index]
        assert _array(trace["x"]).tolist() == front.predicted[:, x].tolist()
        assert _array(trace["y"]).tolist() == front.predicted[:, y].tolist()
        assert "hovertext" not in trace and trace_index in facts["hover_traces"]["front"]
    kinds = {trace["name"] for trace in figure["data"]}
    assert {
        "grid (measured)",
        "design / search (measured)",
        "front check (measured)",
        "selected (measured)",
    } <= kinds
    assert "baseline: dare &lt;ties&gt;" in kinds
    assert facts["preference"] == [1.0, 1.0, 1.0] and facts["rule"] == "weighted_sum"


def test_the_page_needs_no_network(tmp_path: Path) -> None:
    outcome, evaluations = _outcome(4, 15, seed=4)
    text = front_html(outcome, evaluations, tmp_path / "front.html").read_text(encoding="utf-8")
    bundle = plotly_javascript()
    assert text.count(bundle) == 1
    own = text.replace(bundle, "")  # plotly's bundle holds links (shown on click), never loads
    assert re.search(r"<script[^>]*\bsrc\s*=", text) is None
    assert re.search(r"""\bsrc\s*=\s*["']?(https?:)?//""", text) is None
    assert re.search(r"""\bhref\s*=\s*["']?(https?:)?//""", own) is None
    assert "<link" not in text and "@import" not in text and "<iframe" not in text
    assert re.search(r"https?://", own) is None


def test_the_page_is_written_atomically(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    outcome, evaluations = _outcome(2, 10, seed=5)
    target = tmp_path / "front.html"
    target.write_text("an earlier run's page", encoding="utf-8")
    import m3sb.checkpoints

    def crash(_: int) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(m3sb.checkpoints.os, "fsync", crash)
    with pytest.raises(OSError, match="disk full"):
        front_html(outcome, evaluations, target)
    assert target.read_text(encoding="utf-8") == "an earlier run's page"  # never half written
    assert [path.name for path in tmp_path.iterdir()] == ["front.html"]  # no temporary file left
    monkeypatch.undo()
    assert front_html(outcome, evaluations, target) == target
    assert target.read_text(encoding="utf-8").startswith("<!DOCTYPE html>")
    assert [path.name for path in tmp_path.iterdir()] == ["front.html"]


# Runs SELECT_SCRIPT's m3sbSelectIndex on every case read from stdin.
_NODE_SELECT = """
const cases = JSON.parse(require("fs").readFileSync(0, "utf8"));
eval(process.argv[1]);
console.log(JSON.stringify(cases.map((c) => m3sbSelectIndex(c.scores, c.weights, c.rule))));
"""


def _exact_weighted_sums(scores: np.ndarray, weights: np.ndarray) -> list[Fraction]:
    """Each row's weighted sum with the preference over its squared norm (the same order as over
    the norm), in exact arithmetic."""
    unit = [Fraction(w) for w in weights.tolist()]
    scale = sum(w * w for w in unit)
    return [sum(Fraction(v) * w for v, w in zip(row, unit, strict=True)) / scale for row in scores.tolist()]


@pytest.mark.skipif(shutil.which("node") is None, reason="needs node to run the page's script")
def test_the_selection_script_picks_what_select_index_picks() -> None:
    """Chebyshev: always the same row (the page sums as NumPy does). Weighted sum: the same row
    unless two rows' sums agree to 1e-12 (NumPy's matrix product rounds in BLAS's order, which
    depends on the CPU); then a row as good to that precision."""
    rng = np.random.default_rng(0)
    cases: list[tuple[np.ndarray, np.ndarray, str]] = []
    expected = []
    for number in range(400):
        tasks, rows = int(rng.integers(2, 9)), int(rng.integers(1, 40))
        if number % 4 == 0:  # ties and near ties: eighths, duplicated rows, zero weights
            scores = rng.integers(-80, 80, size=(rows, tasks)) / 8.0
            scores = np.vstack([scores, scores[: rows // 2]])
            weights = rng.integers(0, 4, size=tasks).astype(float)
        else:
            scores = rng.normal(size=(rows, tasks)) * 10.0 ** rng.uniform(-3, 3)
            weights = rng.uniform(0, 5, size=tasks) * (rng.random(tasks) > 0.2)
        weights[int(rng.integers(tasks))] += 0.5
        if number % 7 == 0:
            scores[:, int(rng.integers(tasks))] = 1.0  # a task the front does not tell apart
        for rule in ("weighted_sum", "chebyshev"):
            cases.append((scores, weights, rule))
            expected.append(select_index(scores, weights, rule))  # type: ignore[arg-type]
    node = str(shutil.which("node"))
    shown = [{"scores": s.tolist(), "weights": w.tolist(), "rule": rule} for s, w, rule in cases]
    done = subprocess.run(
        [node, "-e", _NODE_SELECT, SELECT_SCRIPT],
        input=json.dumps(shown),
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    picked = json.loads(done.stdout)
    near_ties = 0
    for (scores, weights, rule), python, page in zip(cases, expected, picked, strict=True):
        if rule == "chebyshev" or python == page:
            assert page == python
            continue
        sums = _exact_weighted_sums(scores, weights)
        assert abs(sums[page] - sums[python]) <= Fraction(1, 10**12) * max(abs(value) for value in sums)
        near_ties += 1
    assert near_ties <= len(cases) // 50  # only the made-up exact ties
