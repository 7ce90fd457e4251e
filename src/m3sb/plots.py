"""The figures, as PNG files: experiments (radar, grouped bars, heatmap, models on the sphere)
and Pareto searches (the front with measured points and baselines, 2-task landscapes)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from m3sb import geometry


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _pivot(results: Any, value: str) -> Any:
    """A method x dataset table of ``value``, in the order the rows came."""
    table = results.pivot_table(index="merge_method", columns="dataset", values=value, sort=False)
    return table.loc[list(dict.fromkeys(results["merge_method"])), list(dict.fromkeys(results["dataset"]))]


def radar_chart(results: Any, path: Path) -> Path:
    """Accuracy per dataset, one polygon per method."""
    plt = _pyplot()
    table = _pivot(results, "accuracy")
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
    plt = _pyplot()
    table = _pivot(results, "accuracy")
    figure, axes = plt.subplots(figsize=(max(6.0, 1.6 * len(table.columns)), 4.5))
    width = 0.8 / len(table.index)
    for i, (method, row) in enumerate(table.iterrows()):
        positions = [j + i * width - 0.4 + width / 2 for j in range(len(table.columns))]
        axes.bar(positions, row.tolist(), width=width, label=str(method))
    axes.set_xticks(range(len(table.columns)), [str(c) for c in table.columns])
    axes.set_ylabel("accuracy (%)")
    axes.set_ylim(0, 100)
    axes.legend(fontsize=8, ncols=2)
    axes.set_title("accuracy per task and method")
    return _save(figure, path)


def heatmap(results: Any, path: Path) -> Path:
    """Normalised accuracy (merged / fine-tuned, %) per method and dataset."""
    plt = _pyplot()
    table = _pivot(results, "normalized_accuracy")
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


def sphere_coordinates(points: Mapping[str, torch.Tensor]) -> dict[str, tuple[float, float]]:
    """2-D principal coordinates of the points' directions (each flattened, scaled to unit norm)."""
    names = list(points)
    gram = geometry.gram_matrix([points[name] for name in names])
    norms = gram.diagonal().clamp_min(1e-30).sqrt()
    unit = gram / torch.outer(norms, norms)
    count = len(names)
    centering = torch.eye(count, dtype=torch.float64) - 1.0 / count
    values, vectors = torch.linalg.eigh(centering @ unit @ centering)
    top = values.flip(0)[:2].clamp_min(0).sqrt()
    coordinates = vectors.flip(1)[:, :2] * top
    return {name: (float(coordinates[i, 0]), float(coordinates[i, 1])) for i, name in enumerate(names)}


def sphere_plot(points: Mapping[str, torch.Tensor], kinds: Mapping[str, str], path: Path) -> Path:
    """The models' directions on the unit sphere, projected on their two principal axes."""
    plt = _pyplot()
    coordinates = sphere_coordinates(points)
    figure, axes = plt.subplots(figsize=(6.5, 5.5))
    styles = {"base": ("black", "s"), "finetuned": ("tab:blue", "o"), "merge": ("tab:red", "^")}
    for kind, (colour, marker) in styles.items():
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


def _save(figure: Any, path: Path) -> Path:
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    _pyplot().close(figure)
    return path


def pareto_front_plot(outcome: Any, evaluations: Sequence[Any], path: Path) -> Path:
    """The amortized front (predicted), the measured points (design, grid, re-evaluated front
    points, selected) and the baselines; one panel per pair of tasks."""
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
        for marker, (label, values) in zip("sP^vX", outcome.baselines.items(), strict=False):
            axes.scatter(values[i], values[j], marker=marker, s=70, color="black", label=label, zorder=4)
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
