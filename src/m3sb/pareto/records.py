"""The files of a Pareto run: an append-only ``evaluations.csv`` that makes runs resumable,
``run.json`` that says which search the evaluations belong to, and the atomic writes of
``front.csv`` and ``selected.json``.

Each evaluation is appended as one line, flushed and synced as soon as it finishes, so a
crash loses at most the evaluation in flight; a torn last line is ignored on resume.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from m3sb.checkpoints import append_text_durably, write_text_atomic
from m3sb.errors import ConfigError
from m3sb.pareto.evaluations import Evaluation
from m3sb.tasks.metrics import METRICS

EVALUATIONS, RUN, FRONT, SELECTED = "evaluations.csv", "run.json", "front.csv", "selected.json"


class EvaluationRecord:
    """``evaluations.csv`` in a results folder: one row per evaluated candidate.

    Columns: ``phase``, ``c_<task>`` for each merged task (or the given point columns;
    empty for baselines, which are not points of the coefficient space), then
    ``<metric>_<task>`` for every metric of :data:`METRICS` and every task, control tasks
    included. Every metric is recorded, so a search with another ``metric`` in the same
    folder reuses the evaluations.
    """

    def __init__(
        self,
        folder: Path,
        task_names: Sequence[str],
        metric: str,
        fingerprint: Mapping[str, Any],
        controls: Sequence[bool] | None = None,
        point_columns: Sequence[str] | None = None,
    ):
        """``point_columns`` name the columns of a point (``c_<task>`` for each merged task
        by default; an evolution's genes)."""
        self.folder = folder
        self.path = folder / EVALUATIONS
        self.all_names = list(task_names)
        self.controls = list(controls) if controls is not None else [False] * len(self.all_names)
        self.task_names = [n for n, c in zip(self.all_names, self.controls, strict=True) if not c]
        self.metric = metric
        self.point_columns = (
            [f"c_{n}" for n in self.task_names] if point_columns is None else list(point_columns)
        )
        self.columns = ["phase", *self.point_columns, *(f"{m}_{n}" for m in METRICS for n in self.all_names)]
        self.fingerprint = json.loads(json.dumps(dict(fingerprint), sort_keys=True))

    def objective(self, table: np.ndarray) -> np.ndarray:
        """``metric`` on each merged task, from a (metrics, tasks) table."""
        columns = [index for index, control in enumerate(self.controls) if not control]
        return np.asarray(table[METRICS.index(self.metric), columns], dtype=float)

    def load(self) -> tuple[list[Evaluation], dict[str, np.ndarray]]:
        """An earlier run's evaluations in this folder (none when it is new).

        Writes nothing, except to drop a half-written last line that a crash left behind.

        Returns the evaluations at coefficient vectors (their ``metric`` on the merged
        tasks) and the labelled ones (baselines, their whole metrics tables). An error when
        the folder holds evaluations of a different search.
        """
        run_file = self.folder / RUN
        if self.folder.exists() and not self.folder.is_dir():
            raise ConfigError(f"{self.folder}: exists and is not a folder")
        if not (self.path.exists() or run_file.exists()):
            return [], {}
        self._check_same_search(run_file)
        if not self.path.exists() or self.path.stat().st_size == 0:
            return [], {}
        return self._load()

    def create(self) -> None:
        """Create the folder, ``run.json`` and the header of ``evaluations.csv`` if they are missing."""
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise ConfigError(f"{self.folder}: cannot create the results folder ({error.strerror})") from None
        run_file = self.folder / RUN
        if not run_file.exists():
            write_text_atomic(
                run_file, json.dumps({"search": self.fingerprint}, indent=2, sort_keys=True) + "\n"
            )
        if not self.path.exists() or self.path.stat().st_size == 0:
            write_text_atomic(self.path, _csv_line(self.columns))

    def _check_same_search(self, run_file: Path) -> None:
        try:
            recorded = json.loads(run_file.read_text(encoding="utf-8")).get("search")
        except (OSError, ValueError, AttributeError):
            recorded = None
        if recorded != self.fingerprint:
            raise ConfigError(
                f"{self.folder}: holds evaluations of a different search (models, datasets, metric, method "
                "or an evolution's genes differ, or run.json is missing); choose another --results-path"
            )

    def _load(self) -> tuple[list[Evaluation], dict[str, np.ndarray]]:
        lines = self.path.read_text(encoding="utf-8").splitlines(keepends=True)
        header = next(csv.reader([lines[0]])) if lines else []
        if header != self.columns:
            raise ConfigError(
                f"{self.path}: columns are not those of this search; choose another --results-path"
            )
        points: list[Evaluation] = []
        labelled: dict[str, np.ndarray] = {}
        count = len(self.point_columns)
        for number, line in enumerate(lines[1:], start=2):
            row = self._parse(line)
            if row is None:
                if number == len(lines) and not line.endswith("\n"):
                    self._drop_torn_line(lines[:-1])
                    break
                raise ConfigError(f"{self.path}: line {number} is malformed; fix or delete it to resume")
            phase, values = row
            coefficients = values[:count]
            table = values[count:].reshape(len(METRICS), len(self.all_names))
            if np.all(np.isnan(coefficients)):
                labelled[phase] = table
            else:
                points.append(Evaluation(coefficients, self.objective(table), phase))
        return points, labelled

    def _parse(self, line: str) -> tuple[str, np.ndarray] | None:
        if not line.endswith("\n"):
            return None
        try:
            fields = next(csv.reader([line]))
            if len(fields) != len(self.columns):
                return None
            values = np.array([float(v) if v else np.nan for v in fields[1:]])
        except (ValueError, StopIteration, csv.Error):
            return None
        count = len(self.point_columns)
        metrics = values[count:]
        if np.any(np.isinf(metrics)):  # NaN: a metric the task's kind does not measure (lm_eval's loss)
            return None
        table = metrics.reshape(len(METRICS), len(self.all_names))
        if not (np.isnan(values[:count]).all() or np.all(np.isfinite(self.objective(table)))):
            return None
        return fields[0], values

    def _drop_torn_line(self, kept: list[str]) -> None:
        """An interrupted write left half a line: rewrite the file without it."""
        write_text_atomic(self.path, "".join(kept))

    def append(self, phase: str, coefficients: np.ndarray | None, table: np.ndarray) -> None:
        """Append one evaluation (its whole (metrics, tasks) table) and make it durable before returning."""
        values = (
            [""] * len(self.point_columns) if coefficients is None else [repr(float(v)) for v in coefficients]
        )
        line = _csv_line([phase, *values, *(repr(float(v)) for v in np.asarray(table).reshape(-1))])
        append_text_durably(self.path, line)


def _csv_line(fields: Sequence[str]) -> str:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerow(fields)
    return buffer.getvalue()


def front_table(
    task_names: Sequence[str], metric: str, coefficients: np.ndarray, predicted: np.ndarray
) -> str:
    """``front.csv``: one row per front point, ``c_<task>`` then ``predicted_<metric>_<task>``."""
    header = [*(f"c_{n}" for n in task_names), *(f"predicted_{metric}_{n}" for n in task_names)]
    rows = [_csv_line(header)]
    for point, values in zip(coefficients, predicted, strict=True):
        rows.append(_csv_line([f"{v:.6g}" for v in (*point, *values)]))
    return "".join(rows)
