"""``front.html``: the amortized Pareto front as one self-contained interactive page (offline).

The page plots the front's predicted points and the measured evaluations, one panel per
pair of tasks (the lower triangle of a scatter matrix), with plotly.js inlined. Hovering
over a front point shows its coefficients, its predicted metrics and, where that same
point was measured, the measured ones. One weight per task and a rule (weighted sum or
Chebyshev) move a highlighted "preference choice": the page's script picks the row that
:func:`m3sb.pareto.preference.select_index` picks. ``#preference=1,0,2&rule=chebyshev``
in the address sets them; ``&hover=3`` shows front point 3's hover label.

After drawing, ``div#m3sb-front-state`` carries what was drawn, for tests and tools:
``data-front-points`` (front points plotted in every panel, counted in the SVG),
``data-front-points-per-panel``, ``data-selected-index``, ``data-preference``,
``data-rule``, ``data-hover-text``, ``data-error`` and ``data-ready="true"``.
"""

from __future__ import annotations

import html
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from m3sb.checkpoints import write_text_atomic
from m3sb.pareto.evaluations import Evaluation, point_key
from m3sb.report import html_page, plotly_javascript, script_json

if TYPE_CHECKING:
    from m3sb.pareto.run import ParetoOutcome

SHOWN_POINTS = 1500  # the page draws at most this many front points (front.csv has them all)
MEASURED_KINDS = ("grid", "search", "front check", "selected")  # drawn in this order
MEASURED_LABELS = {
    "grid": "grid (measured)",
    "search": "design / search (measured)",
    "front check": "front check (measured)",
    "selected": "selected (measured)",
}
# Measured points are open symbols; the predicted front is small filled dots.
MEASURED_MARKERS: dict[str, dict[str, Any]] = {
    "grid": {"color": "#8c8c8c", "symbol": "x-thin-open", "size": 5, "line": {"width": 1}},
    "search": {"color": "#1f77b4", "symbol": "circle-open", "size": 8, "line": {"width": 1.5}},
    "front check": {"color": "#2ca02c", "symbol": "diamond-open", "size": 10, "line": {"width": 2}},
    "selected": {"color": "#d62728", "symbol": "star-open", "size": 15, "line": {"width": 2}},
}
FRONT_MARKER = {"color": "#ff7f0e", "size": 5, "symbol": "circle"}
CHOICE_MARKER = {"color": "#c2185b", "size": 22, "symbol": "circle-open", "line": {"width": 3}}
BASELINE_SYMBOLS = ("square", "cross", "triangle-up", "triangle-down", "x", "diamond", "hexagon")
FINETUNED_LINE = {"color": "#9467bd", "dash": "dash", "width": 1}

# select_index of m3sb.pareto.preference, in JavaScript, with numpy's order of summation
# (pairwise: left to right below 8 terms, then 8 partial sums) so Chebyshev's shortfalls and
# weights round as they do in Python. The weighted sum is summed left to right; NumPy's matrix
# product (BLAS) may round in another order, so rows whose weighted sums agree to the last
# bits may be told apart differently.
SELECT_SCRIPT = """function m3sbSum(values) {
  var n = values.length, i, j, total = 0;
  if (n < 8) { for (i = 0; i < n; i++) total += values[i]; return total; }
  if (n > 128) {
    var half = Math.floor(n / 2); half -= half % 8;
    return m3sbSum(values.slice(0, half)) + m3sbSum(values.slice(half));
  }
  var part = values.slice(0, 8);
  for (i = 8; i < n - (n % 8); i += 8) for (j = 0; j < 8; j++) part[j] += values[i + j];
  total = ((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7]));
  for (; i < n; i++) total += values[i];
  return total;
}
function m3sbCheckPreference(weights, count) {
  if (weights.length !== count)
    return "the preference has " + weights.length + " weights for " + count + " tasks";
  for (var t = 0; t < count; t++) {
    if (typeof weights[t] !== "number" || !isFinite(weights[t]) || weights[t] < 0)
      return "preference weights must be finite and >= 0, got " + weights.join(", ");
  }
  if (!weights.some(function (w) { return w > 0; }))
    return "preference weights are all zero; give at least one task a positive weight";
  return null;
}
function m3sbSelectIndex(scores, weights, rule) {
  var count = weights.length, best = 0, k, t, value;
  if (rule === "weighted_sum") {
    var squares = 0, unit, bestValue = -Infinity;
    for (t = 0; t < count; t++) squares += weights[t] * weights[t];
    unit = weights.map(function (w) { return w / Math.sqrt(squares); });
    for (k = 0; k < scores.length; k++) {
      value = 0;
      for (t = 0; t < count; t++) value += scores[k][t] * unit[t];
      if (value > bestValue) { bestValue = value; best = k; }
    }
    return best;
  }
  if (rule === "chebyshev") {
    var low = [], high = [], spread = [], total = m3sbSum(weights), share, bestWorst = Infinity;
    share = weights.map(function (w) { return w / total; });
    for (t = 0; t < count; t++) {
      low.push(Infinity); high.push(-Infinity);
      for (k = 0; k < scores.length; k++) {
        low[t] = Math.min(low[t], scores[k][t]); high[t] = Math.max(high[t], scores[k][t]);
      }
      spread.push(high[t] > low[t] ? high[t] - low[t] : 1);
    }
    for (k = 0; k < scores.length; k++) {
      var shortfall = [], worst = -Infinity;
      for (t = 0; t < count; t++) {
        shortfall.push((high[t] - scores[k][t]) / spread[t]);
        worst = Math.max(worst, shortfall[t] * share[t]);
      }
      value = worst + 1e-9 * m3sbSum(shortfall);
      if (value < bestWorst) { bestWorst = value; best = k; }
    }
    return best;
  }
  throw new Error("unknown preference rule '" + rule + "'; choose weighted_sum or chebyshev");
}"""

# Draws the front, wires the preference controls and the address's #preference=..&rule=..&hover=k,
# then writes what plotly drew into div#m3sb-front-state.
FRONT_SCRIPT = """(function () {
  var facts = JSON.parse(document.getElementById("m3sb-front-facts").textContent);
  var figure = JSON.parse(document.getElementById("m3sb-front-figure-json").textContent);
  var div = document.getElementById("m3sb-front-figure");
  var state = document.getElementById("m3sb-front-state");
  var message = document.getElementById("m3sb-front-error");
  var rule = document.getElementById("m3sb-rule");
  var count = facts.names.length, selected = null;
  var scores = facts.predicted.map(function (row) {
    return row.map(function (value) { return facts.sign * value; });
  });
  var numbers = facts.names.map(function (_, t) { return document.getElementById("m3sb-weight-" + t); });
  var ranges = facts.names.map(function (_, t) { return document.getElementById("m3sb-range-" + t); });
  Object.keys(facts.hover_traces).forEach(function (group) {
    facts.hover_traces[group].forEach(function (index) {
      figure.data[index].hovertext = facts.hover[group];
    });
  });
  function fail(text) {
    message.textContent = text;
    state.setAttribute("data-error", text);
  }
  function plottedPoints(traceIndex) {
    var groups = div.querySelectorAll(".scatterlayer g.trace");
    for (var g = 0; g < groups.length; g++) {
      var bound = groups[g].__data__;
      if (bound && bound[0] && bound[0].trace && bound[0].trace.index === traceIndex)
        return groups[g].querySelectorAll("path.point").length;
    }
    return 0;
  }
  function showWeights(weights) {
    weights.forEach(function (w, t) {
      numbers[t].value = String(w);
      ranges[t].max = String(Math.max(1, Number(ranges[t].max), w));
      ranges[t].value = String(w);
    });
  }
  function fill(cellId, value, digits) {
    var cell = document.getElementById(cellId);
    cell.textContent = value === null || value === undefined ? "" : value.toFixed(digits);
  }
  function problemWith(weights, ruleName) {
    var problem = m3sbCheckPreference(weights, count);
    if (problem === null && ruleName !== "weighted_sum" && ruleName !== "chebyshev")
      problem = "unknown preference rule '" + ruleName + "'; choose weighted_sum or chebyshev";
    return problem;
  }
  function choose(weights, ruleName, keepMessage) {
    var problem = problemWith(weights, ruleName);
    if (problem !== null) { fail(problem); return Promise.resolve(); }
    if (!keepMessage) fail("");
    var index = m3sbSelectIndex(scores, weights, ruleName);
    selected = index;
    showWeights(weights);
    rule.value = ruleName;
    var measured = facts.measured[index];
    document.getElementById("m3sb-choice-title").textContent =
      "front point " + index + " of " + scores.length + " (" + ruleName.replace("_", " ") + ")" +
      (measured ? "; measured (" + facts.measured_phase[index] + ")" : "; not measured");
    facts.names.forEach(function (_, t) {
      fill("m3sb-choice-weight-" + t, weights[t], 3);
      fill("m3sb-choice-coefficient-" + t, facts.coefficients[index][t], 4);
      fill("m3sb-choice-predicted-" + t, facts.predicted[index][t], 3);
      fill("m3sb-choice-measured-" + t, measured ? measured[t] : null, 3);
    });
    var update = {x: [], y: []};
    facts.pairs.forEach(function (pair) {
      update.x.push([facts.predicted[index][pair[0]]]);
      update.y.push([facts.predicted[index][pair[1]]]);
    });
    return Plotly.restyle(div, update, facts.choice_traces).then(function () {
      if (selected !== index) return;
      state.setAttribute("data-selected-index", String(index));
      state.setAttribute("data-preference", weights.join(","));
      state.setAttribute("data-rule", ruleName);
    });
  }
  function fromInputs() {
    return numbers.map(function (input) { return input.value === "" ? NaN : Number(input.value); });
  }
  function fromAddress() {
    var asked = {};
    location.hash.replace(/^#/, "").split("&").forEach(function (part) {
      var cut = part.indexOf("=");
      if (cut > 0) asked[decodeURIComponent(part.slice(0, cut))] = decodeURIComponent(part.slice(cut + 1));
    });
    return asked;
  }
  function applyAddress() {
    var asked = fromAddress();
    var weights = "preference" in asked ? asked.preference.split(",").map(function (text) {
      return text.trim() === "" ? NaN : Number(text);
    }) : facts.preference;
    var ruleName = asked.rule || facts.rule, problem = problemWith(weights, ruleName), shown;
    if (problem === null) shown = choose(weights, ruleName, false);
    else {  // the run's choice stays (or is made, on load), under the message
      fail("in the address: " + problem);
      shown = selected === null ? choose(facts.preference, facts.rule, true) : Promise.resolve();
    }
    return shown.then(function () {
      if (!("hover" in asked)) return null;
      var point = Number(asked.hover);
      if (!(point >= 0 && point < scores.length && Math.floor(point) === point)) {
        fail("hover=" + asked.hover + ": no such front point"); return null;
      }
      Plotly.Fx.hover(div, [{curveNumber: facts.front_traces[0], pointNumber: point}], facts.first_subplot);
      return new Promise(function (resolve) { setTimeout(resolve, 300); }).then(function () {
        var label = div.querySelector(".hoverlayer .hovertext");
        state.setAttribute("data-hover-text", label ? label.textContent : "");
      });
    });
  }
  Plotly.newPlot(div, figure.data, figure.layout, {responsive: true, displaylogo: false}).then(function () {
    var counts = facts.front_traces.map(plottedPoints);
    state.setAttribute("data-front-points", String(Math.min.apply(null, counts)));
    state.setAttribute("data-front-points-per-panel", counts.join(","));
    numbers.forEach(function (input, t) {
      input.addEventListener("input", function () { choose(fromInputs(), rule.value); });
      ranges[t].addEventListener("input", function () {
        numbers[t].value = ranges[t].value; choose(fromInputs(), rule.value);
      });
    });
    rule.addEventListener("change", function () { choose(fromInputs(), rule.value); });
    window.addEventListener("hashchange", applyAddress);
    return applyAddress();
  }).then(function () {
    state.setAttribute("data-ready", "true");
  }, function (error) {
    fail("drawing the front failed: " + error);
    state.setAttribute("data-ready", "true");
  });
})();"""

PAGE_STYLE = """<style>
.m3sb-weights{display:grid;grid-template-columns:max-content 16em 7em;gap:4px 10px;align-items:center;}
.m3sb-weights input[type=number]{width:6.5em;}#m3sb-front-error{color:#b00020;min-height:1.2em;}
#m3sb-choice td.number{min-width:5em;}
</style>"""


@dataclass
class FrontPanels:
    """The figure's traces by role: each pair of tasks is one panel."""

    pairs: list[tuple[int, int]]
    front: list[int] = field(default_factory=list)
    choice: list[int] = field(default_factory=list)
    hover: dict[str, list[int]] = field(default_factory=dict)

    def add(
        self,
        figure: Any,
        place: dict[str, int],
        trace: Any,
        role: str | None = None,
        hover: str | None = None,
    ) -> None:
        """Add ``trace`` to ``figure`` at ``place`` (row, col), noting its index under ``role``
        (front, choice) and under the ``hover`` list of texts the script gives it."""
        index = len(figure.data)
        figure.add_trace(trace, **place)
        if role == "front":
            self.front.append(index)
        elif role == "choice":
            self.choice.append(index)
        if hover is not None:
            self.hover.setdefault(hover, []).append(index)


def front_html(outcome: ParetoOutcome, evaluations: Sequence[Evaluation], path: Path) -> Path:
    """Write ``front.html`` at ``path`` (atomically): the interactive front of ``outcome`` with the
    measured ``evaluations``, self-contained (plotly.js inline, no network). Returns ``path``;
    a ValueError for a front without points."""
    if len(outcome.front.coefficients) == 0:
        raise ValueError("the front has no points to show")
    whole = len(outcome.front.coefficients)
    outcome = shown_front(outcome)
    front, names = outcome.front, list(outcome.task_names)
    measured = _measured_by_point(evaluations)
    at_front = [measured.get(point_key(row)) for row in front.coefficients]
    figure, panels = front_figure(outcome, evaluations)
    preference, rule = _initial_choice(outcome)
    facts = {
        "names": names,
        "metric": outcome.metric,
        "sign": front.sign,
        "coefficients": front.coefficients.tolist(),
        "predicted": front.predicted.tolist(),
        "measured": [None if found is None else found.metrics.tolist() for found in at_front],
        "measured_phase": [None if found is None else found.phase for found in at_front],
        "preference": preference,
        "rule": rule,
        "pairs": panels.pairs,
        "front_traces": panels.front,
        "choice_traces": panels.choice,
        "first_subplot": "xy",
        "hover_traces": panels.hover,
        "hover": {
            "front": front_hover_texts(outcome, at_front),
            **{
                kind: [_measured_hover(names, outcome.metric, e) for e in group]
                for kind, group in _measured_groups(evaluations).items()
            },
        },
    }
    import plotly.io

    figure_json = plotly.io.to_json(figure, validate=False, remove_uids=True)
    body = "\n".join(
        [
            PAGE_STYLE,
            f"<h1>m3sb pareto: amortized front ({html.escape(front.mode)})</h1>",
            _summary(outcome, evaluations, whole),
            "<h2>Preference</h2>",
            _controls(names),
            '<p id="m3sb-front-error" role="alert"></p>',
            "<h2>Preference choice</h2>",
            _choice_table(names, outcome.metric),
            "<h2>Front (predicted) and measured points</h2>",
            '<div id="m3sb-front-figure"></div>',
            '<div id="m3sb-front-state" hidden></div>',
            f"<script>{plotly_javascript()}</script>",
            '<script type="application/json" id="m3sb-front-facts">'
            f"{script_json(json.dumps(facts, allow_nan=False))}</script>",
            '<script type="application/json" id="m3sb-front-figure-json">'
            f"{script_json(figure_json)}</script>",
            f"<script>{SELECT_SCRIPT}\n{FRONT_SCRIPT}</script>",
        ]
    )
    title = f"m3sb pareto front: {', '.join(names)}"
    return write_text_atomic(path, html_page(title, body))


def front_figure(outcome: ParetoOutcome, evaluations: Sequence[Evaluation]) -> tuple[Any, FrontPanels]:
    """The plotly figure: for each pair of tasks (x before y) one panel of the lower triangle of a
    (T-1) x (T-1) grid with the predicted front, the measured points by phase, the baselines, each
    task's fine-tuned model (dashed lines) and the preference choice (a ring, placed by the page's
    script); hover texts are left to the script too (one list per role, not one per panel)."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    names, metric, predicted = outcome.task_names, outcome.metric, outcome.front.predicted
    size = len(names) - 1
    cells = [(row, column) for row in range(size) for column in range(row + 1)]
    panels = FrontPanels([(column, row + 1) for row, column in cells])
    figure = make_subplots(
        rows=size,
        cols=size,
        specs=[[{} if column <= row else None for column in range(size)] for row in range(size)],
        shared_xaxes="columns",
        shared_yaxes="rows",
        horizontal_spacing=0.06 / size,
        vertical_spacing=0.08 / size,
    )
    groups = _measured_groups(evaluations)
    finetuned = outcome.finetuned
    for panel, ((row, column), (x, y)) in enumerate(zip(cells, panels.pairs, strict=True)):
        first = panel == 0
        place = {"row": row + 1, "col": column + 1}

        add = partial(panels.add, figure, place)

        for kind, group in groups.items():
            values = np.array([e.metrics for e in group])
            add(
                go.Scatter(
                    x=values[:, x],
                    y=values[:, y],
                    mode="markers",
                    name=MEASURED_LABELS[kind],
                    legendgroup=kind,
                    showlegend=first,
                    marker=MEASURED_MARKERS[kind],
                    hoverinfo="text",
                ),
                hover=kind,
            )
        add(
            go.Scatter(
                x=predicted[:, x],
                y=predicted[:, y],
                mode="markers",
                name="front (predicted)",
                legendgroup="front",
                showlegend=first,
                marker=FRONT_MARKER,
                hoverinfo="text",
            ),
            "front",
            "front",
        )
        for number, (label, values) in enumerate(outcome.baselines.items()):
            add(
                go.Scatter(
                    x=[float(values[x])],
                    y=[float(values[y])],
                    mode="markers",
                    name=html.escape(f"baseline: {label}"),
                    legendgroup=f"baseline {number}",
                    showlegend=first,
                    marker={
                        "color": "black",
                        "size": 9,
                        "symbol": BASELINE_SYMBOLS[number % len(BASELINE_SYMBOLS)],
                    },
                    hovertext=[_baseline_hover(outcome.task_names, metric, label, values)],
                    hoverinfo="text",
                )
            )
        add(
            go.Scatter(
                x=[float(predicted[0, x])],
                y=[float(predicted[0, y])],
                mode="markers",
                name="preference choice (predicted)",
                legendgroup="choice",
                showlegend=first,
                marker=CHOICE_MARKER,
                hoverinfo="skip",
            ),
            "choice",
        )
        if finetuned is not None:
            axes = figure.get_subplot(row + 1, column + 1)
            x_ref = axes.xaxis.plotly_name.replace("axis", "")
            y_ref = axes.yaxis.plotly_name.replace("axis", "")
            across, along = float(finetuned[x]), float(finetuned[y])
            style = {"type": "line", "line": FINETUNED_LINE, "legendgroup": "fine-tuned"}
            figure.add_shape(
                xref=x_ref,
                yref=f"{y_ref} domain",
                x0=across,
                x1=across,
                y0=0,
                y1=1,
                **style,
                name="fine-tuned model (each task)",
                showlegend=first,
            )
            figure.add_shape(
                xref=f"{x_ref} domain",
                yref=y_ref,
                x0=0,
                x1=1,
                y0=along,
                y1=along,
                **style,
                showlegend=False,
            )
    for column in range(size):
        figure.update_xaxes(title_text=html.escape(names[column]), row=size, col=column + 1)
    for row in range(size):
        figure.update_yaxes(title_text=html.escape(names[row + 1]), row=row + 1, col=1)
    panel_height = max(150, min(440, 700 // size))
    better = "lower" if metric == "loss" else "higher"
    figure.update_layout(
        title=html.escape(f"{metric} per task ({better} is better), one panel per pair of tasks"),
        height=140 + panel_height * size,
        hovermode="closest",
        margin={"l": 60, "r": 20, "t": 60, "b": 50},
        # From 3 tasks on, the legend sits in the grid's empty upper-right triangle.
        legend={"font": {"size": 11}}
        | ({"x": 0.55, "y": 1.0, "xanchor": "left", "yanchor": "top"} if size > 1 else {}),
    )
    return figure, panels


def front_hover_texts(outcome: ParetoOutcome, measured: Sequence[Evaluation | None]) -> list[str]:
    """One hover text per front row: its number, then per task its coefficient, the predicted
    metric and (where that point was measured) the measured one. Names are escaped."""
    front, names = outcome.front, outcome.task_names
    texts = []
    for index, (coefficients, predicted) in enumerate(zip(front.coefficients, front.predicted, strict=True)):
        found = measured[index]
        head = f"front point {index} of {len(front.coefficients)} ({html.escape(outcome.metric)}"
        head += f"; measured: {html.escape(found.phase)})" if found is not None else "; not measured)"
        lines = [f"<b>{head}</b>"]
        for task, name in enumerate(names):
            line = f"{html.escape(name)}: c = {coefficients[task]:.4f}, predicted {predicted[task]:.4g}"
            if found is not None:
                line += f", measured {found.metrics[task]:.4g}"
            lines.append(line)
        texts.append("<br>".join(lines))
    return texts


def _measured_hover(names: Sequence[str], metric: str, evaluation: Evaluation) -> str:
    """A measured point's hover text: its phase, then per task its coefficient and measured metric."""
    lines = [f"<b>measured ({html.escape(evaluation.phase)}), {html.escape(metric)}</b>"]
    for task, name in enumerate(names):
        lines.append(
            f"{html.escape(name)}: c = {evaluation.coefficients[task]:.4f}, "
            f"measured {evaluation.metrics[task]:.4g}"
        )
    return "<br>".join(lines)


def _baseline_hover(names: Sequence[str], metric: str, label: str, values: np.ndarray) -> str:
    """A baseline's hover text: its label, then its measured metric per task."""
    lines = [f"<b>baseline: {html.escape(label)}, {html.escape(metric)}</b>"]
    lines += [f"{html.escape(name)}: {value:.4g}" for name, value in zip(names, values, strict=True)]
    return "<br>".join(lines)


def _measured_groups(evaluations: Sequence[Evaluation]) -> dict[str, list[Evaluation]]:
    """The evaluations of points of the coefficient space by kind, as ``pareto_front_plot`` groups
    them (grid, front check, selected; every other phase but the baselines is the search)."""
    groups: dict[str, list[Evaluation]] = {}
    for evaluation in evaluations:
        if evaluation.phase.startswith("baseline"):
            continue
        kind = evaluation.phase if evaluation.phase in MEASURED_KINDS else "search"
        groups.setdefault(kind, []).append(evaluation)
    return {kind: groups[kind] for kind in MEASURED_KINDS if kind in groups}


def _measured_by_point(evaluations: Sequence[Evaluation]) -> dict[tuple[float, ...], Evaluation]:
    """Each measured coefficient vector's evaluation (the first one of a point measured twice)."""
    found: dict[tuple[float, ...], Evaluation] = {}
    for evaluation in evaluations:
        found.setdefault(point_key(evaluation.coefficients), evaluation)
    return found


def _initial_choice(outcome: ParetoOutcome) -> tuple[list[float], str]:
    """The run's preference and rule, or equal weights and the weighted sum."""
    selected: Mapping[str, Any] | None = outcome.selected
    if selected is None or "preference" not in selected:
        return [1.0] * len(outcome.task_names), "weighted_sum"
    weights = selected["preference"]
    return [float(weights[name]) for name in outcome.task_names], str(selected.get("rule", "weighted_sum"))


def shown_front(outcome: ParetoOutcome, limit: int | None = None) -> ParetoOutcome:
    """``outcome`` with at most ``limit`` (default :data:`SHOWN_POINTS`) front points, spread
    evenly over the front's metrics; the selected point and each task's best and worst are
    among them (so the page's Chebyshev rule scales as Python's does)."""
    from m3sb.pareto.search import spread_subset

    front = outcome.front
    limit = SHOWN_POINTS if limit is None else limit
    if len(front.coefficients) <= limit:
        return outcome
    first = []
    if outcome.selected is not None and "coefficients" in outcome.selected:
        chosen = np.array([outcome.selected["coefficients"][name] for name in outcome.task_names])
        first = [int(np.argmin(np.abs(front.coefficients - chosen).sum(axis=1)))]
    # each task's best and worst rows too: Chebyshev's rule scales by the range of what is drawn
    scores = front.sign * front.predicted
    first += [*np.argmax(scores, axis=0).tolist(), *np.argmin(scores, axis=0).tolist()]
    rows = spread_subset(scores, limit, first)
    thinned = replace(front, coefficients=front.coefficients[rows], predicted=front.predicted[rows])
    return replace(outcome, front=thinned)


def _summary(outcome: ParetoOutcome, evaluations: Sequence[Evaluation], whole: int | None = None) -> str:
    """One paragraph: the front's size, the tasks, the metric, the evaluations, the surrogates' R^2."""
    front = outcome.front
    count = len(front.coefficients)
    size = f"{count}" if whole is None or whole == count else f"{count} of the {whole} (spread evenly)"
    better = "lower" if outcome.metric == "loss" else "higher"
    fitted = ", ".join(
        f"{html.escape(name)} {value:.3f}" for name, value in zip(outcome.task_names, front.r2, strict=False)
    )
    return (
        f"<p>{size} front points over {len(outcome.task_names)} tasks; "
        f"{html.escape(outcome.metric)} ({better} is better); {len(evaluations)} measured points "
        f"shown. Surrogate R<sup>2</sup> (cross-validated): {fitted}. Hover over a point for its "
        "coefficients and metrics.</p>"
    )


def _controls(names: Sequence[str]) -> str:
    """One slider and one number per task, and the rule; the script fills in their values."""
    rows = []
    for task, name in enumerate(names):
        label = html.escape(name)
        rows.append(
            f'<label for="m3sb-weight-{task}">{label}</label>'
            f'<input type="range" id="m3sb-range-{task}" min="0" max="1" step="0.01" '
            f'aria-label="weight of {label} (slider)">'
            f'<input type="number" id="m3sb-weight-{task}" min="0" step="0.01">'
        )
    return (
        '<div class="m3sb-weights">' + "".join(rows) + "</div>\n"
        '<p><label for="m3sb-rule">rule</label> <select id="m3sb-rule">'
        '<option value="weighted_sum">weighted sum (L2-normalised preference)</option>'
        '<option value="chebyshev">Chebyshev (largest weighted shortfall)</option></select></p>'
    )


def _choice_table(names: Sequence[str], metric: str) -> str:
    """The chosen front point, one row per task; the script fills in the cells."""
    head = "".join(
        f"<th>{html.escape(text)}</th>"
        for text in ("task", "weight", "coefficient", f"predicted {metric}", f"measured {metric}")
    )
    rows = "".join(
        f"<tr><td>{html.escape(name)}</td>"
        + "".join(
            f'<td class="number" id="m3sb-choice-{part}-{task}"></td>'
            for part in ("weight", "coefficient", "predicted", "measured")
        )
        + "</tr>"
        for task, name in enumerate(names)
    )
    return (
        '<p id="m3sb-choice-title"></p>\n'
        f'<table id="m3sb-choice"><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>'
    )
