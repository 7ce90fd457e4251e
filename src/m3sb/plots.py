"""The experiment's figures, as PNG files: radar, grouped bars, heatmap, models on the sphere."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

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
