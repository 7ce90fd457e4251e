"""The figures: PNG files for experiments (radar, grouped bars, heatmap, models on the sphere),
comparisons of experiments and Pareto searches (the front with measured points and baselines,
2-task landscapes), and interactive plotly figures for the HTML pages (grouped bars, the models
on the 3-D unit sphere)."""

from __future__ import annotations

import html
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def metric_table(results: Any, value: str, index: str = "merge_method") -> Any:
    """An ``index`` x dataset table of ``value`` (mean of repeated rows, NaN where none), in the
    order the rows came."""
    table = results.pivot_table(index=index, columns="dataset", values=value, sort=False, dropna=False)
    return table.reindex(
        index=list(dict.fromkeys(results[index])), columns=list(dict.fromkeys(results["dataset"]))
    )


def radar_chart(results: Any, path: Path) -> Path:
    """Accuracy per dataset, one polygon per method."""
    plt = _pyplot()
    table = metric_table(results, "accuracy")
    angles = [2 * math.pi * i / len(table.columns) for i in range(len(table.columns))]
    figure, axes = plt.subplots(figsize=(6.5, 6.5), subplot_kw={"projection": "polar"})
    for method, row in table.iterrows():
        values = [*row.tolist(), row.iloc[0]]
        axes.plot([*angles, angles[0]], values, label=str(method), linewidth=1.5)
        axes.fill([*angles, angles[0]], values, alpha=0.05)
    axes.set_xticks(angles, [str(c) for c in table.columns])
    axes.set_ylim(0, 100)
    axes.set_title("accuracy (%) per task")
    axes.legend(loc="upper right", bbox_to_anchor=(1.35, 1.1), fontsize=8)
    return _save(figure, path)


def bar_chart(results: Any, path: Path) -> Path:
    """Accuracy per dataset, one bar per method."""
    return _grouped_bars(
        metric_table(results, "accuracy"), "accuracy (%)", "accuracy per task and method", path
    )


def comparison_chart(results: Any, metric: str, series: str, path: Path) -> Path:
    """``metric`` per dataset, one bar per value of the ``series`` column (e.g. experiment and method)."""
    return _grouped_bars(
        metric_table(results, metric, index=series), f"{metric} (%)", f"{metric} per task: comparison", path
    )


def _grouped_bars(table: Any, ylabel: str, title: str, path: Path) -> Path:
    """One group of bars per column of ``table``, one bar (and legend entry) per row."""
    plt = _pyplot()
    columns, rows = len(table.columns), len(table.index)
    height = 4.5 + 0.25 * math.ceil(rows / 3)  # room for the legend under the axes
    figure, axes = plt.subplots(figsize=(max(6.0, columns * max(1.6, 0.3 * rows)), height))
    width = 0.8 / rows
    for i, (label, row) in enumerate(table.iterrows()):
        positions = [j + i * width - 0.4 + width / 2 for j in range(columns)]
        axes.bar(positions, row.tolist(), width=width, label=str(label))
    axes.set_xticks(range(columns), [str(c) for c in table.columns])
    axes.set_ylabel(ylabel)
    highest = float(np.nanmax(table.to_numpy(dtype=float), initial=0.0))
    axes.set_ylim(0, max(100.0, 1.05 * highest))
    axes.legend(fontsize=8, ncols=min(3, rows), loc="upper center", bbox_to_anchor=(0.5, -0.08))
    axes.set_title(title)
    return _save(figure, path)


def heatmap(results: Any, path: Path) -> Path:
    """Normalised accuracy (merged / fine-tuned, %) per method and dataset."""
    plt = _pyplot()
    table = metric_table(results, "normalized_accuracy")
    figure, axes = plt.subplots(figsize=(1.3 * len(table.columns) + 3, 0.5 * len(table.index) + 1.5))
    image = axes.imshow(table.to_numpy(), cmap="viridis", vmin=0, vmax=100, aspect="auto")
    axes.set_xticks(range(len(table.columns)), [str(c) for c in table.columns])
    axes.set_yticks(range(len(table.index)), [str(i) for i in table.index])
    values = table.to_numpy()
    for row in range(values.shape[0]):
        for column in range(values.shape[1]):
            value = values[row, column]
            colour = "white" if value < 60 else "black"
            axes.text(column, row, f"{value:.0f}", ha="center", va="center", color=colour)
    figure.colorbar(image, ax=axes, label="normalised accuracy (%)")
    axes.set_title("accuracy relative to the fine-tuned model")
    return _save(figure, path)


def _principal_coordinates(
    points: Mapping[str, torch.Tensor], dimensions: int, centred: bool
) -> tuple[list[str], np.ndarray]:
    """The points' directions (each flattened, scaled to unit norm) on their ``dimensions`` leading
    principal axes: ``(names, count x dimensions)``, zero columns where the points span fewer.

    ``centred`` takes the axes through the directions' mean (PCA); otherwise through the origin,
    the sphere's centre, which keeps every angle when the points span at most ``dimensions``."""
    import torch

    from m3sb import geometry

    names = list(points)
    gram = geometry.gram_matrix([points[name] for name in names])
    norms = gram.diagonal().clamp_min(1e-30).sqrt()
    cosines = gram / torch.outer(norms, norms)
    count = len(names)
    if centred:
        centring = torch.eye(count, dtype=torch.float64) - 1.0 / count
        cosines = centring @ cosines @ centring
    values, vectors = torch.linalg.eigh(cosines)
    kept = min(dimensions, count)
    coordinates = np.zeros((count, dimensions))
    coordinates[:, :kept] = (vectors.flip(1)[:, :kept] * values.flip(0)[:kept].clamp_min(0).sqrt()).numpy()
    return names, coordinates


def sphere_coordinates(points: Mapping[str, torch.Tensor]) -> dict[str, tuple[float, float]]:
    """2-D principal coordinates of the points' directions (each flattened, scaled to unit norm)."""
    names, coordinates = _principal_coordinates(points, 2, centred=True)
    return {name: (float(x), float(y)) for name, (x, y) in zip(names, coordinates.tolist(), strict=True)}


def sphere_coordinates_3d(points: Mapping[str, torch.Tensor]) -> dict[str, tuple[float, float, float]]:
    """The points' directions on the unit sphere of their three principal axes through the origin.

    A direction orthogonal to all three axes has no place on that sphere and stays at the origin."""
    names, coordinates = _principal_coordinates(points, 3, centred=False)
    lengths = np.linalg.norm(coordinates, axis=1, keepdims=True)
    on_sphere = np.divide(coordinates, lengths, out=np.zeros_like(coordinates), where=lengths > 1e-12)
    return {
        name: (float(x), float(y), float(z))
        for name, (x, y, z) in zip(names, on_sphere.tolist(), strict=True)
    }


# Colour, matplotlib marker and plotly 3-D symbol of each kind of model.
_KIND_STYLES = {
    "base": ("#000000", "s", "square"),
    "finetuned": ("#1f77b4", "o", "circle"),
    "merge": ("#d62728", "^", "diamond"),
}
_OTHER_KIND_STYLE = ("#7f7f7f", "x", "cross")


def sphere_plot(points: Mapping[str, torch.Tensor], kinds: Mapping[str, str], path: Path) -> Path:
    """The models' directions on the unit sphere, projected on their two principal axes."""
    plt = _pyplot()
    coordinates = sphere_coordinates(points)
    figure, axes = plt.subplots(figsize=(6.5, 5.5))
    for kind, (colour, marker, _) in _KIND_STYLES.items():
        chosen = [name for name in coordinates if kinds[name] == kind]
        if chosen:
            axes.scatter(
                [coordinates[n][0] for n in chosen],
                [coordinates[n][1] for n in chosen],
                c=colour,
                marker=marker,
                label=kind,
                s=50,
            )
        for name in chosen:
            axes.annotate(name, coordinates[name], fontsize=8, xytext=(4, 4), textcoords="offset points")
    axes.set_xlabel("first principal axis")
    axes.set_ylabel("second principal axis")
    axes.set_title("models on the hypersphere (PCA of unit-norm backbones)")
    axes.legend(fontsize=8)
    return _save(figure, path)


def interactive_bars(results: Any, value: str, series: str, title: str) -> Any:
    """A plotly figure: ``value`` per dataset, one bar per value of the ``series`` column."""
    import plotly.graph_objects as go

    table = metric_table(results, value, index=series)
    datasets = [html.escape(str(column)) for column in table.columns]
    figure = go.Figure(
        [
            go.Bar(
                x=datasets,
                y=[None if math.isnan(v) else float(v) for v in row.tolist()],
                name=html.escape(str(label)),
                hovertemplate="%{x}: %{y:.2f}",
            )
            for label, row in table.iterrows()
        ]
    )
    figure.update_layout(
        title=html.escape(title), barmode="group", yaxis_title=f"{html.escape(value)} (%)", height=480
    )
    return figure


def interactive_sphere(points: Mapping[str, torch.Tensor], kinds: Mapping[str, str]) -> Any:
    """A plotly figure: the unit sphere (translucent, wireframe) and one labelled marker per model at
    its :func:`sphere_coordinates_3d`, coloured by its kind (base, finetuned, merge)."""
    import plotly.graph_objects as go

    figure = go.Figure(_unit_sphere_traces())
    titled: set[str] = set()
    for name, (x, y, z) in sphere_coordinates_3d(points).items():
        kind = kinds.get(name, "other")
        colour, _, symbol = _KIND_STYLES.get(kind, _OTHER_KIND_STYLE)
        label = html.escape(name)
        figure.add_trace(
            go.Scatter3d(
                x=[x],
                y=[y],
                z=[z],
                mode="markers+text",
                name=label,
                text=[label],
                hovertext=[f"{label} ({html.escape(kind)})"],
                hoverinfo="text",
                textposition="top center",
                marker={"size": 5, "color": colour, "symbol": symbol},
                legendgroup=kind,
                legendgrouptitle_text=None if kind in titled else html.escape(kind),
            )
        )
        titled.add(kind)
    axis = {"range": [-1.15, 1.15], "zeroline": False}
    figure.update_layout(
        title="models on the unit sphere (three principal axes of the unit-norm backbones)",
        height=640,
        margin={"l": 0, "r": 0, "t": 50, "b": 0},
        scene={
            "aspectmode": "cube",
            "xaxis": axis | {"title": "axis 1"},
            "yaxis": axis | {"title": "axis 2"},
            "zaxis": axis | {"title": "axis 3"},
        },
    )
    return figure


def _unit_sphere_traces(steps: int = 25) -> list[Any]:
    """The unit sphere as a translucent surface and a wireframe of parallels and meridians."""
    import plotly.graph_objects as go

    polar, azimuth = np.meshgrid(np.linspace(0, np.pi, steps), np.linspace(0, 2 * np.pi, steps))
    surface = go.Surface(
        x=np.sin(polar) * np.cos(azimuth),
        y=np.sin(polar) * np.sin(azimuth),
        z=np.cos(polar),
        opacity=0.12,
        colorscale=[[0, "#9ecae1"], [1, "#9ecae1"]],
        showscale=False,
        hoverinfo="skip",
    )
    circle = np.linspace(0, 2 * np.pi, 61)
    lines: list[np.ndarray] = []
    for latitude in np.radians([-60, -30, 0, 30, 60]):
        lines.append(
            np.stack(
                [
                    np.cos(latitude) * np.cos(circle),
                    np.cos(latitude) * np.sin(circle),
                    np.full_like(circle, np.sin(latitude)),
                ],
                axis=1,
            )
        )
    for longitude in np.radians(range(0, 180, 30)):
        lines.append(
            np.stack(
                [np.cos(circle) * np.cos(longitude), np.cos(circle) * np.sin(longitude), np.sin(circle)],
                axis=1,
            )
        )
    gap = np.full((1, 3), np.nan)
    wire = np.concatenate([part for line in lines for part in (line, gap)])
    wireframe = go.Scatter3d(
        x=wire[:, 0],
        y=wire[:, 1],
        z=wire[:, 2],
        mode="lines",
        line={"color": "#bbbbbb", "width": 1},
        hoverinfo="skip",
        showlegend=False,
    )
    return [surface, wireframe]


def _save(figure: Any, path: Path) -> Path:
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    _pyplot().close(figure)
    return path


def non_dominated_2d(points: np.ndarray, maximise: bool = True) -> np.ndarray:
    """The rows of a (n, 2) array that no other row beats on both columns, sorted by the first."""
    values = points if maximise else -points
    order = np.lexsort((-values[:, 1], -values[:, 0]))  # by the first column, best first
    kept, best_second = [], -np.inf
    for index in order:
        if values[index, 1] > best_second:
            kept.append(index)
            best_second = values[index, 1]
    return points[np.array(kept, dtype=int)][::-1] if kept else points[:0]


def pareto_front_plot(outcome: Any, evaluations: Sequence[Any], path: Path) -> Path:
    """The amortized front (predicted), the measured points (design, grid, re-evaluated front
    points, selected), the grid's own front, the baselines and each task's fine-tuned model
    (dashed lines); one panel per pair of tasks."""
    plt = _pyplot()
    names, metric = outcome.task_names, outcome.metric
    pairs = [(i, j) for i in range(len(names)) for j in range(i + 1, len(names))]
    columns = min(3, len(pairs))
    rows = math.ceil(len(pairs) / columns)
    figure, axes_grid = plt.subplots(rows, columns, figsize=(5.2 * columns, 4.6 * rows), squeeze=False)
    by_phase: dict[str, list[Any]] = {}
    for evaluation in evaluations:
        kind = "search" if evaluation.phase not in ("grid", "front check", "selected") else evaluation.phase
        if evaluation.phase.startswith("baseline"):
            continue
        by_phase.setdefault(kind, []).append(evaluation.metrics)
    styles = {
        "grid": {"color": "0.75", "marker": ".", "s": 14},
        "search": {"color": "tab:blue", "marker": "o", "s": 22},
        "front check": {"color": "tab:green", "marker": "D", "s": 34},
        "selected": {"color": "tab:red", "marker": "*", "s": 220},
    }
    finetuned = getattr(outcome, "finetuned", None)
    for axes, (i, j) in zip(axes_grid.flat, pairs, strict=False):
        predicted = outcome.front.predicted
        order = np.argsort(predicted[:, i])
        axes.plot(
            predicted[order, i], predicted[order, j], ".", color="tab:orange", ms=3, label="front (predicted)"
        )
        for kind in ("grid", "search", "front check", "selected"):
            if kind in by_phase:
                values = np.asarray(by_phase[kind])
                axes.scatter(values[:, i], values[:, j], label=f"{kind} (measured)", zorder=3, **styles[kind])
        if "grid" in by_phase:
            grid_front = non_dominated_2d(np.asarray(by_phase["grid"])[:, [i, j]], metric != "loss")
            axes.plot(grid_front[:, 0], grid_front[:, 1], "-", color="0.45", lw=1, label="grid front")
        for marker, (label, values) in zip("sP^vXdh", outcome.baselines.items(), strict=False):
            axes.scatter(values[i], values[j], marker=marker, s=70, color="black", label=label, zorder=4)
        if finetuned is not None:
            axes.axvline(finetuned[i], color="tab:purple", ls="--", lw=1, label="fine-tuned")
            axes.axhline(finetuned[j], color="tab:purple", ls="--", lw=1)
        axes.set_xlabel(f"{metric}: {names[i]}")
        axes.set_ylabel(f"{metric}: {names[j]}")
        axes.grid(alpha=0.3)
    for axes in list(axes_grid.flat)[len(pairs) :]:
        axes.axis("off")
    axes_grid.flat[0].legend(fontsize=7)
    figure.suptitle(
        f"amortized Pareto front ({outcome.front.mode}, {len(outcome.front.coefficients)} points)"
    )
    return _save(figure, path)


def landscape_plot(
    outcome: Any,
    points: np.ndarray,
    metrics: np.ndarray,
    predict: Any,
    bounds: tuple[float, float],
    path: Path,
) -> Path:
    """Two tasks: contours of each task's measured metric (top) and of its fitted surrogate (bottom)."""
    plt = _pyplot()
    names = outcome.task_names
    axis = np.linspace(bounds[0], bounds[1], 60)
    mesh_a, mesh_b = np.meshgrid(axis, axis, indexing="ij")
    fitted = predict(np.stack([mesh_a.ravel(), mesh_b.ravel()], axis=1))
    figure, axes_grid = plt.subplots(2, 2, figsize=(10, 8.4), squeeze=False)
    low, high = float(min(metrics.min(), fitted.min())), float(max(metrics.max(), fitted.max()))
    high = max(high, low + 1e-9)  # a flat landscape still needs increasing contour levels
    levels = np.linspace(low, high, 15)
    for task in range(2):
        measured_axes, fitted_axes = axes_grid[0, task], axes_grid[1, task]
        if len(points) >= 3:
            contour = measured_axes.tricontourf(points[:, 0], points[:, 1], metrics[:, task], levels=levels)
            figure.colorbar(contour, ax=measured_axes)
        measured_axes.scatter(points[:, 0], points[:, 1], s=10, color="white", edgecolors="black")
        measured_axes.set_title(f"{names[task]}: measured {outcome.metric}")
        contour = fitted_axes.contourf(mesh_a, mesh_b, fitted[:, task].reshape(mesh_a.shape), levels=levels)
        figure.colorbar(contour, ax=fitted_axes)
        fitted_axes.plot(
            outcome.front.coefficients[:, 0], outcome.front.coefficients[:, 1], ".", color="tab:red", ms=2
        )
        fitted_axes.set_title(f"{names[task]}: fitted surrogate (red: front)")
        for axes in (measured_axes, fitted_axes):
            axes.set_xlabel(f"c_{names[0]}")
            axes.set_ylabel(f"c_{names[1]}")
    return _save(figure, path)
