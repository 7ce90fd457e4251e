"""``m3sb pareto``: a MAP search over the task vectors of real models, written to a folder.

Validates everything it can before loading a model, then loads the base, the task
models and their validation splits once, runs :func:`amortized_pareto_front` with a
:class:`MergeEvaluator`, and writes ``evaluations.csv`` (as it goes), ``front.csv``,
``selected.json`` and ``selected.yaml`` (the chosen merge as a recipe), the plots,
``front.html`` and, when asked, the selected model.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from m3sb.checkpoints import write_text_atomic
from m3sb.config import ParetoConfig
from m3sb.errors import ConfigError
from m3sb.pareto.design import grid
from m3sb.pareto.evaluations import Evaluation, EvaluationLog, point_key
from m3sb.pareto.front import (
    MetricSense,
    Mode,
    ParetoFront,
    amortized_pareto_front,
    check_search_inputs,
    default_budget,
)
from m3sb.pareto.preference import Rule, check_preference
from m3sb.pareto.recipe import SELECTED_RECIPE
from m3sb.pareto.records import FRONT, SELECTED, EvaluationRecord, front_table
from m3sb.pareto.search import SearchSettings
from m3sb.pareto.surrogate import Warp, fit_surrogates

if TYPE_CHECKING:
    import torch

    from m3sb.pareto.merging import MergeProblem

MAX_GRID_POINTS = 10_000
TASK_ARITHMETIC_SCALE = 0.3  # the task-arithmetic baseline: every coefficient at 0.3 (Ilharco et al.)
# Baselines that are not points of the coefficient space: label -> (method, parameters).
OTHER_BASELINES: dict[str, tuple[str, dict[str, Any]]] = {
    "ties": ("ties", {"density": 0.2}),
    "dare_ties": ("dare_ties", {"density": 0.3}),
    "dare_linear": ("dare_linear", {"density": 0.3, "lambda": TASK_ARITHMETIC_SCALE}),
    "barycenter": ("barycenter", {"space": "weights"}),
}
FINETUNED_PHASE = "reference: fine-tuned "  # + the task's name


@dataclass
class ParetoOutcome:
    """What a run produced: the front, the chosen point, and where the files are."""

    front: ParetoFront
    task_names: list[str]
    metric: str
    folder: Path
    files: dict[str, Path] = field(default_factory=dict)
    selected: dict[str, Any] | None = None
    new_evaluations: int = 0
    reused_evaluations: int = 0
    baselines: dict[str, np.ndarray] = field(default_factory=dict)
    finetuned: np.ndarray | None = None  # each task's own fine-tuned model on it (reference lines)


def warp_for(metric: str) -> Warp:
    """Scores in percent are fitted under a sigmoid over [0, 100]; losses under a softplus."""
    return Warp("softplus") if metric == "loss" else Warp("sigmoid", 0.0, 100.0)


def check_run(
    config: ParetoConfig, mode: str, preference: Sequence[float] | None, grid_points: int | None
) -> None:
    """Every error that needs no model: metric, method, budget, preference, grid size."""
    from m3sb.pareto.merging import check_search_method

    check_search_metric(config)
    count = len(config.merged_tasks)
    check_search_method(config.merge_method, config.parameters, config.bounds, count)
    budget = config.budget if config.budget is not None else default_budget(count, cast(Mode, mode))
    check_search_inputs(count, budget, config.bounds, mode, "loss" if config.metric == "loss" else "score")
    if preference is not None:
        check_preference(preference, count)
    if grid_points is not None and (grid_points < 2 or grid_points**count > MAX_GRID_POINTS):
        raise ConfigError(
            f"--grid {grid_points}: needs 2 <= N and N^T <= {MAX_GRID_POINTS} points (T = {count} tasks)"
        )
    task_specs(config)


def check_search_metric(config: ParetoConfig) -> None:
    """The metric must be known, and accuracy where a task is an lm_eval one."""
    from m3sb.tasks.metrics import check_metric

    check_metric(config.metric)
    harness = [task.name for task in config.tasks if task.kind == "lm_eval"]
    if harness and config.metric != "accuracy":
        raise ConfigError(
            f"metric '{config.metric}': lm_eval tasks ({', '.join(harness)}) measure accuracy only "
            "(their lm-eval metric)"
        )


def task_specs(config: ParetoConfig) -> list[Any]:
    """The search's tasks as the task layer describes them (kinds and datasets checked)."""
    from m3sb.tasks.data import parse_dataset_spec
    from m3sb.tasks.registry import TaskSpec, check_kind, check_kind_keys

    specs = []
    for index, task in enumerate(config.tasks):
        where = f"tasks[{index}]"
        dataset = parse_dataset_spec(_with_default_split(task.dataset), f"{where}.dataset")
        kind = check_kind_keys(check_kind(task.kind, where), dataset, f"{where}.dataset")
        specs.append(TaskSpec(task.name, task.model, dataset, kind, task.control))
    return specs


def _with_default_split(dataset: dict[str, Any]) -> dict[str, Any]:
    """A search chooses on validation data: the split defaults to ``validation``."""
    return {"split": "validation", **dataset}


def fingerprint(config: ParetoConfig) -> dict[str, Any]:
    """What decides the value of an evaluation: reused evaluations must share it (every metric
    is recorded, so the search's metric is not part of it)."""
    from m3sb.methods import get_method

    return {
        "base_model": config.base_model,
        "merge_method": config.merge_method,
        "parameters": config.parameters,
        **(
            {"statistics": config.statistics.model_dump()}
            if get_method(config.merge_method).statistics
            else {}
        ),
        **({"autocast": config.autocast} if config.autocast != "none" else {}),
        **({"processor_checkpoint": config.processor_checkpoint} if config.processor_checkpoint else {}),
        "tasks": [
            task.model_dump() | {"dataset": _with_default_split(task.dataset)} for task in config.tasks
        ],
    }


def run_pareto(
    config: ParetoConfig,
    results_path: Path,
    mode: str = "map",
    preference: Sequence[float] | None = None,
    seed: int = 0,
    grid_points: int | None = None,
    save_model: bool = False,
    device: str = "auto",
    rule: Rule = "weighted_sum",
    baselines: bool = True,
    search: SearchSettings | None = None,
    log: Callable[[str], None] | None = None,
    executor: str | None = None,
    ray_address: str | None = None,
    workers: int | None = None,
) -> ParetoOutcome:
    """Run the search that ``config`` describes and write its files into ``results_path``.

    Evaluations run on ``executor`` (``local`` or ``ray``; the config's by default).
    """
    from m3sb.executors import check_executor, open_executor

    say = log or (lambda _: None)
    address = ray_address or config.ray_address
    kind = check_executor(executor or config.executor, address)
    check_run(config, mode, preference, grid_points)
    every = [task.name for task in config.tasks]
    controls = [task.control for task in config.tasks]
    record = EvaluationRecord(Path(results_path), every, config.metric, fingerprint(config), controls)
    known, labelled = record.load()
    if known or labelled:
        say(f"resuming: {len(known) + len(labelled)} evaluations found in {record.path}")
    with open_executor(kind, device, address, workers) as pool:  # device and cluster checked first
        problem = load_problem(config, say, device)
        pool.start(problem.for_workers() if kind == "ray" else problem)
        if kind == "ray":
            say(f"evaluating on {pool.workers} Ray workers")
        return _search_and_write(
            config,
            problem,
            PoolEvaluator(pool, problem),
            record,
            known,
            labelled,
            mode,
            preference,
            seed,
            grid_points,
            save_model,
            rule,
            baselines,
            search,
            say,
        )


class PoolEvaluator:
    """MAP's ``evaluate``/``evaluate_many`` over an executor: rows go out in chunks of
    ``candidates_per_pass`` and come back in order. The search sees the problem's
    objective; the whole metrics table of each point is kept for the record."""

    def __init__(self, pool: Any, problem: MergeProblem) -> None:
        self.pool = pool
        self.problem = problem
        self.per_item = problem.candidates_per_pass
        self.tables: dict[tuple[float, ...], np.ndarray] = {}

    def evaluate_many(self, points: np.ndarray) -> Iterator[np.ndarray]:
        """The search's metrics of each row of ``points``, in order, each as soon as it is known."""
        chunks = [points[start : start + self.per_item] for start in range(0, len(points), self.per_item)]
        rows = iter(points)
        for results in self.pool.map(chunks):
            for table in results:
                self.tables[point_key(next(rows))] = table
                yield self.problem.objective(table)

    def __call__(self, point: np.ndarray) -> np.ndarray:
        """The search's metrics of one point."""
        return next(iter(self.evaluate_many(np.atleast_2d(point))))

    def table_of(self, point: np.ndarray) -> np.ndarray:
        """The whole metrics table of a point this evaluator has evaluated."""
        return self.tables.pop(point_key(point))

    def merge_of(
        self, method: str, params: dict[str, Any], weights: Sequence[float] | None = None
    ) -> np.ndarray:
        """The metrics table of the merge of every task model by ``method`` (a baseline), each
        model at its ``weights`` entry (every one at 1 by default)."""
        from m3sb.pareto.merging import MethodMerge

        item = MethodMerge(method, params, None if weights is None else tuple(map(float, weights)))
        return np.asarray(next(iter(self.pool.map([item]))))


def _search_and_write(
    config: ParetoConfig,
    problem: MergeProblem,
    evaluator: PoolEvaluator,
    record: EvaluationRecord,
    known: list[Evaluation],
    labelled: dict[str, np.ndarray],
    mode: str,
    preference: Sequence[float] | None,
    seed: int,
    grid_points: int | None,
    save_model: bool,
    rule: Rule,
    baselines: bool,
    search: SearchSettings | None,
    say: Callable[[str], None],
) -> ParetoOutcome:
    names = [task.name for task in config.merged_tasks]
    record.create()
    search_mode = cast(Mode, mode)  # check_run has checked it
    sense: MetricSense = "loss" if config.metric == "loss" else "score"
    new = 0

    def keep(evaluation: Evaluation) -> None:
        nonlocal new
        new += 1
        record.append(evaluation.phase, evaluation.coefficients, evaluator.table_of(evaluation.coefficients))
        shown = ", ".join(f"{n}={m:.2f}" for n, m in zip(names, evaluation.metrics, strict=True))
        say(f"  [{evaluation.phase}] c=[{', '.join(f'{c:.3f}' for c in evaluation.coefficients)}] {shown}")

    say(f"searching ({mode}, budget {config.budget or default_budget(len(names), search_mode)}) ...")
    front = amortized_pareto_front(
        evaluator,
        len(names),
        config.budget,
        config.bounds,
        search_mode,
        seed,
        sense,
        warp_for(config.metric),
        preference if preference is not None else [1.0] * len(names),
        problem.flat.gram() if mode == "nested" else None,
        known,
        keep,
        search,
        evaluator.evaluate_many,
    )
    outcome = ParetoOutcome(front, names, config.metric, record.folder, reused_evaluations=front.reused)
    outcome.files["evaluations"] = record.path
    outcome.files["front"] = write_text_atomic(
        record.folder / FRONT, front_table(names, config.metric, front.coefficients, front.predicted)
    )
    for stale in (SELECTED, SELECTED_RECIPE):  # an earlier run's choice is not this front's
        (record.folder / stale).unlink(missing_ok=True)
    if not save_model:
        remove_stale_models(record.folder, say)
    extra = EvaluationLog(
        evaluator, len(names), None, [*known, *front.evaluated], keep, evaluator.evaluate_many
    )
    if grid_points is not None:
        say(f"evaluating the {grid_points}^{len(names)} grid ...")
        extra(grid(grid_points, len(names), config.bounds), "grid")
    extra(front.coefficients[check_indices(front)], "front check")
    if baselines:
        outcome.baselines = _baselines(
            problem, evaluator, extra, labelled, record, config.bounds, preference, say
        )
        outcome.finetuned = _finetuned(problem, evaluator, labelled, record, names, say)
    chosen = preference if preference is not None else ([1.0] * len(names) if save_model else None)
    if chosen is not None:
        outcome.selected = _select(front, chosen, rule, extra, names)
        outcome.files["selected"] = write_text_atomic(
            record.folder / SELECTED, json.dumps(outcome.selected, indent=2) + "\n"
        )
        recipe = _selected_recipe(config, problem, outcome.selected, say)
        if recipe is not None:
            outcome.files["selected_recipe"] = write_text_atomic(record.folder / SELECTED_RECIPE, recipe)
    outcome.files.update(_plots(outcome, [*front.evaluated, *extra.evaluations], config))
    if save_model:
        assert outcome.selected is not None
        coefficients = [outcome.selected["coefficients"][n] for n in names]
        outcome.files["model"] = save_selected_models(problem, coefficients, record.folder / MODELS)
    outcome.new_evaluations = new
    return outcome


def _selected_recipe(
    config: ParetoConfig, problem: MergeProblem, selected: dict[str, Any], say: Callable[[str], None]
) -> str | None:
    """``selected.yaml``'s text for the selected point, or None (said why) where no recipe
    reproduces the search's candidates."""
    from m3sb.pareto.recipe import selected_recipe, unrecipeable_reason

    reason = unrecipeable_reason(config, problem.flat.layout.names)
    if reason is not None:
        say(f"no {SELECTED_RECIPE}: {reason}")
        return None
    names = [task.name for task in config.merged_tasks]
    dtype = str(problem.flat.dtype).removeprefix("torch.")

    def shown(values: dict[str, float]) -> str:
        return ", ".join(f"{name} {value:.4g}" for name, value in values.items())

    comment = (
        f"The point m3sb pareto selected for the preference {shown(selected['preference'])} "
        f"({selected['rule']}).\nRun it with: m3sb merge {SELECTED_RECIPE} OUT_DIR (tensors outside the "
        "backbone, such as heads, are merged too; --save-model keeps each task's own)\n"
        f"Predicted {config.metric}: {shown(selected['predicted'])}\n"
        f"Measured {config.metric}: {shown(selected['measured'])}"
    )
    return selected_recipe(config, [selected["coefficients"][n] for n in names], dtype, comment)


def load_problem(config: ParetoConfig, say: Callable[[str], None], device_name: str = "cpu") -> MergeProblem:
    """The search's models, validation splits and statistics, loaded once (after the memory check)."""
    from m3sb.memory import available_bytes
    from m3sb.pareto.merging import MergeProblem, check_search_fits
    from m3sb.tasks.registry import LoadSettings, load_tasks

    check_search_fits(config.base_model, len(config.tasks), available_bytes(), config.candidate_dtype)
    say("loading models and validation data ...")
    settings = LoadSettings(config.trust_remote_code, config.processor_checkpoint, config.cache_dir)
    tasks, base = load_tasks(task_specs(config), config.base_model, settings, say)
    assert base is not None
    from m3sb.methods import get_method

    kind = get_method(config.merge_method).statistics
    statistics = []
    if kind is not None:
        from m3sb.devices import resolve_device
        from m3sb.statistics import tasks_statistics

        say(f"computing {kind} statistics on the {config.statistics.split} splits ...")
        merged = [task for task in tasks if not task.control]
        device = resolve_device(device_name)
        statistics = tasks_statistics(
            merged, kind, config.statistics, config.cache_dir, device, config.parameters
        )
    return MergeProblem(
        tasks,
        base,
        config.metric,
        config.merge_method,
        config.parameters,
        config.batch_size,
        config.candidates_per_pass,
        config.autocast,
        statistics,
        config.candidate_dtype,
    )


def check_indices(front: ParetoFront, spaced: int = 5) -> np.ndarray:
    """Front points worth measuring: each task's best, the balanced point, and a few spaced along it."""
    count = front.coefficients.shape[1]
    picks = [front.select_index(row) for row in np.eye(count)]
    picks.append(front.select_index(np.ones(count)))
    picks.extend(np.linspace(0, len(front.coefficients) - 1, spaced).round().astype(int).tolist())
    return np.array(sorted(set(picks)))


def _select(
    front: ParetoFront, preference: Sequence[float], rule: Rule, extra: EvaluationLog, names: list[str]
) -> dict[str, Any]:
    index = front.select_index(preference, rule)
    measured = extra(front.coefficients[index], "selected")[0]
    return {
        "preference": dict(zip(names, map(float, preference), strict=True)),
        "rule": rule,
        "coefficients": dict(zip(names, map(float, front.coefficients[index]), strict=True)),
        "predicted": dict(zip(names, map(float, front.predicted[index]), strict=True)),
        "measured": dict(zip(names, map(float, measured), strict=True)),
    }


def _baselines(
    problem: MergeProblem,
    evaluator: PoolEvaluator,
    extra: EvaluationLog,
    labelled: dict[str, np.ndarray],
    record: EvaluationRecord,
    bounds: tuple[float, float],
    preference: Sequence[float] | None,
    say: Callable[[str], None],
) -> dict[str, np.ndarray]:
    """Every coefficient at 0.3 (task arithmetic with the default method), the same total spread
    by the preference when it is not uniform, then TIES, DARE (TIES and linear) and the barycenter."""
    results = {}
    count = len(problem.merged)
    scale = float(np.clip(TASK_ARITHMETIC_SCALE, *bounds))
    plain = problem.fast and not problem.shares and problem.scale == 1.0
    label = "task arithmetic" if plain else problem.method_name
    results[f"{label} ({scale:g})"] = extra(np.full(count, scale), "baseline: every coefficient at 0.3")[0]
    if preference is not None and len(set(preference)) > 1:
        weights = np.asarray(preference, dtype=float)
        spread = np.clip(TASK_ARITHMETIC_SCALE * count * weights / weights.sum(), *bounds)
        results[f"{label} (0.3 x preference)"] = extra(spread, "baseline: 0.3 spread by the preference")[0]
    for label, (method, params) in OTHER_BASELINES.items():
        phase = f"baseline: {label}"
        if phase not in labelled:
            say(f"  [{phase}]")
            labelled[phase] = evaluator.merge_of(method, params)
            record.append(phase, None, labelled[phase])
        results[label] = problem.objective(labelled[phase])
    return results


def _finetuned(
    problem: MergeProblem,
    evaluator: PoolEvaluator,
    labelled: dict[str, np.ndarray],
    record: EvaluationRecord,
    names: list[str],
    say: Callable[[str], None],
) -> np.ndarray:
    """Each merged task's metric with its own fine-tuned model (a one-hot linear merge)."""
    values = []
    for index, name in enumerate(names):
        phase = FINETUNED_PHASE + name
        if phase not in labelled:
            say(f"  [{phase}]")
            labelled[phase] = evaluator.merge_of("linear", {}, np.eye(len(names))[index])
            record.append(phase, None, labelled[phase])
        values.append(problem.objective(labelled[phase])[index])
    return np.asarray(values)


def _plots(outcome: ParetoOutcome, evaluations: list[Evaluation], config: ParetoConfig) -> dict[str, Path]:
    from m3sb.pareto.html import front_html
    from m3sb.plots import landscape_plot, pareto_front_plot

    files = {
        "front_plot": pareto_front_plot(outcome, evaluations, outcome.folder / "front.png"),
        "front_page": front_html(outcome, evaluations, outcome.folder / "front.html"),
    }
    if len(outcome.task_names) == 2:
        points = np.array([e.coefficients for e in evaluations])
        metrics = np.array([e.metrics for e in evaluations])
        surrogates = outcome.front.surrogates or fit_surrogates(points, metrics, warp_for(config.metric))
        files["landscape_plot"] = landscape_plot(
            outcome, points, metrics, surrogates.predict, config.bounds, outcome.folder / "landscape.png"
        )
    return files


def save_selected_models(problem: MergeProblem, coefficients: Sequence[float], folder: Path) -> Path:
    """One classifier per task (the selected merged backbone, that task's head) under ``folder/<task>``."""
    evaluator = problem.build("cpu")
    if problem.shares:  # a data-dependent method's candidate: the base plus the scaled shares
        return save_task_models(problem, evaluator.backbone(coefficients), folder)
    # the method itself, as `m3sb merge selected.yaml` runs it (bit for bit)
    return save_task_models(problem, evaluator.method_backbone(coefficients), folder)


MODELS = "model"  # the folder of the chosen point's models, one per task


def remove_stale_models(folder: Path, say: Callable[[str], None]) -> None:
    """Remove ``folder/model`` left by an earlier run: it holds that run's choice, not this one's."""
    import shutil

    models = folder / MODELS
    if models.is_dir():
        shutil.rmtree(models)
        say(f"removed {models} from an earlier run: it was not this run's choice (--save-model writes it)")


def save_task_models(problem: MergeProblem, merged: Mapping[str, torch.Tensor], folder: Path) -> Path:
    """One model per task (``merged`` as the backbone, the task's own head) under ``folder/<task>``,
    written atomically."""
    from m3sb.checkpoints import atomic_output_folder

    backbone = {name: tensor.detach().clone() for name, tensor in merged.items()}
    with atomic_output_folder(folder, force=True) as staging:
        for task in problem.tasks:  # control tasks too: the merged backbone with their own head
            model = task.model.use_backbone(backbone)
            model.save_pretrained(staging / task.name, safe_serialization=True)
            if task.model.processor is not None:
                task.model.processor.save_pretrained(staging / task.name)
            task.model.use_backbone(None)
    return folder
