"""``m3sb evolve``: CMA-ES over a merge's weights (and density) on real models, for one
preference-weighted objective, written to a folder.

The config is ``m3sb pareto``'s (its ``evolve:`` section sets the search). Validates what it
can before loading a model, loads the models and validation splits once (as ``m3sb
pareto`` does), runs :func:`m3sb.pareto.evolve.evolve` with every generation evaluated as
one batch on the executor, and writes ``evaluations.csv`` (as it goes; a rerun resumes from
it), ``best.json`` and, when asked, the best merge.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from m3sb.checkpoints import write_text_atomic
from m3sb.config import DENSITY_CHOICES, LAYER_INDEX, EvolveSettings, ParetoConfig
from m3sb.errors import ConfigError
from m3sb.pareto.evaluations import Evaluation
from m3sb.pareto.evolve import (
    DensityGenes,
    Evolution,
    Generation,
    Genome,
    Sense,
    check_evolution,
    evolve,
)
from m3sb.pareto.records import EvaluationRecord

if TYPE_CHECKING:
    import torch

    from m3sb.pareto.merging import MergeEvaluator, MergeProblem

BEST, BEST_RECIPE = "best.json", "best.yaml"
DENSITY_MARGIN = 0.01  # della's keep probabilities density +- epsilon must stay inside (0, 1)
MAX_LAYER_GROUPS = 64


@dataclass
class EvolveOutcome:
    """What an evolution produced: its result, the best genome's summary and the files."""

    evolution: Evolution
    task_names: list[str]
    metric: str
    folder: Path
    best: dict[str, Any]
    files: dict[str, Path] = field(default_factory=dict)
    new_evaluations: int = 0
    reused_evaluations: int = 0


def evolve_settings(
    settings: EvolveSettings,
    generations: int | None = None,
    population: int | None = None,
    layer_groups: int | None = None,
    density: str | None = None,
) -> EvolveSettings:
    """The config's ``evolve`` settings with the command line's on top; a one-line ConfigError
    naming the option for a value that cannot be used."""
    if density is not None and density not in DENSITY_CHOICES:
        raise ConfigError(f"--density {density}: choose one of {', '.join(DENSITY_CHOICES)}")
    if layer_groups is not None and not 1 <= layer_groups <= MAX_LAYER_GROUPS:
        raise ConfigError(f"--layer-groups {layer_groups}: needs 1 <= G <= {MAX_LAYER_GROUPS}")
    updates = {
        key: value
        for key, value in (
            ("generations", generations),
            ("population", population),
            ("layer_groups", layer_groups),
            ("density", density),
        )
        if value is not None
    }
    merged = settings.model_copy(update=updates)
    check_evolution(merged.generations, merged.population, merged.sigma)
    return merged


def density_genes(config: ParetoConfig, choice: str) -> DensityGenes | None:
    """What of the method's density is evolved: per model, one for all, or nothing (``fixed``;
    ``auto``: per model where the method has a density)."""
    from m3sb.methods import get_method

    has_density = get_method(config.merge_method).param("density") is not None
    if choice == "auto":
        return "per_model" if has_density else None
    if choice == "fixed":
        return None
    if not has_density:
        raise ConfigError(
            f"density {choice}: merge_method '{config.merge_method}' has no density to evolve; "
            "use density: fixed (or auto)"
        )
    return "per_model" if choice == "per_model" else "global"


def density_range(config: ParetoConfig) -> tuple[float, float]:
    """The densities the method accepts with the config's parameters (inside della's
    ``epsilon`` of 0 and 1); (0, 1) for a method without a density."""
    from m3sb.methods import get_method

    method = get_method(config.merge_method)
    density = method.param("density")
    if density is None:
        return 0.0, 1.0
    low = 0.0 if density.minimum is None else float(density.minimum)
    high = 1.0 if density.maximum is None else float(density.maximum)
    epsilon = method.param("epsilon")
    if epsilon is not None:
        spread: Any = config.parameters.get("epsilon", epsilon.default)
        widest = max(map(float, spread)) if isinstance(spread, list) else float(spread)
        if widest > 0:
            low, high = max(low, widest + DENSITY_MARGIN), min(high, 1.0 - widest - DENSITY_MARGIN)
    return low, high


def layer_groups_warning(layer_groups: int, tensor_names: Sequence[str]) -> str | None:
    """What to tell a user whose layer groups cannot act (no tensor name holds a layer
    number, so every tensor reads the gradients' first point); None where they can."""
    if layer_groups <= 1 or any(LAYER_INDEX.search(name) for name in tensor_names):
        return None
    return (
        f"--layer-groups {layer_groups}: no tensor name holds a layer number ('layers.N'), "
        "so every tensor reads its gradient's first point"
    )


def evolve_genome(config: ParetoConfig, settings: EvolveSettings) -> Genome:
    """The genome ``settings`` describe for ``config``'s merged models and method."""
    names = tuple(task.name for task in config.merged_tasks)
    genes = density_genes(config, settings.density)
    return Genome(
        names,
        settings.layer_groups,
        genes,
        (float(config.bounds[0]), float(config.bounds[1])),
        density_range(config) if genes is not None else (0.0, 1.0),
    )


def start_genome(config: ParetoConfig, settings: EvolveSettings, genome: Genome) -> np.ndarray:
    """Where the search starts: every weight at ``start_weight`` (task arithmetic's 0.3 by
    default) and the density the config gives (the method's default otherwise), clipped."""
    from m3sb.methods import get_method
    from m3sb.pareto.run import TASK_ARITHMETIC_SCALE

    weight = TASK_ARITHMETIC_SCALE if settings.start_weight is None else settings.start_weight
    density: float | list[float] = 0.0
    if genome.density is not None:
        param = get_method(config.merge_method).param("density")
        assert param is not None and isinstance(param.default, float | int)
        given = config.parameters.get("density", param.default)
        density = [float(v) for v in given] if isinstance(given, list) else float(given)
    return genome.vector(weight, density)


def check_evolve(
    config: ParetoConfig, settings: EvolveSettings, preference: Sequence[float] | None
) -> Genome:
    """Every error that needs no model (metric, method, density, preference, tasks); the genome."""
    from m3sb.pareto.merging import check_search_method
    from m3sb.pareto.preference import check_preference
    from m3sb.pareto.run import check_search_metric, task_specs

    check_search_metric(config)
    count = len(config.merged_tasks)
    check_search_method(config.merge_method, config.parameters, config.bounds, count)
    genome = evolve_genome(config, settings)
    if preference is not None:
        check_preference(preference, count)
    task_specs(config)
    return genome


def evolve_fingerprint(config: ParetoConfig, genome: Genome) -> dict[str, Any]:
    """What decides the value of an evaluated genome: ``m3sb pareto``'s fingerprint and what
    the genes are."""
    from m3sb.pareto.run import fingerprint

    return {**fingerprint(config), "evolve": {"genes": genome.columns}}


@dataclass
class EvolveProblem:
    """What an evolution's workers need: the merge problem and the genome's layout (picklable)."""

    problem: MergeProblem
    genome: Genome

    def build(self, device: str | torch.device) -> GenomeEvaluator:
        """The evaluator of genomes computing on ``device``."""
        return GenomeEvaluator(self.problem.build(device), self.genome)


class GenomeEvaluator:
    """Merges a genome's candidate on one device and scores every task: an executor's worker."""

    def __init__(self, evaluator: MergeEvaluator, genome: Genome) -> None:
        self.evaluator = evaluator
        self.genome = genome
        self.tensor_names = evaluator.space.layout.names

    def backbone(self, genes: np.ndarray) -> dict[str, torch.Tensor]:
        """The candidate backbone of ``genes``: each tensor merged with the weights its layer
        reads from the gradients, and the genome's density, by the problem's method."""
        evaluator, genome = self.evaluator, self.genome
        if genome.plain:  # one weight per model: the coefficients of m3sb pareto
            return evaluator.backbone(genome.check(genes))
        problem = evaluator.problem
        weights_of = genome.weights_of(genes, self.tensor_names)
        if problem.fast:
            scale = problem.scale
            return evaluator.space.candidate_per_tensor(lambda name: [scale * w for w in weights_of(name)])
        return {name: tensor.to(evaluator.device) for name, tensor in self.method_backbone(genes).items()}

    def method_backbone(self, genes: np.ndarray) -> dict[str, torch.Tensor]:
        """The genome's merge by the problem's method itself, tensor by tensor, on the CPU (what
        ``m3sb merge best.yaml`` computes; not for data-dependent methods' shares)."""
        from m3sb.pareto.merging import merged_backbone_per_tensor

        problem, genome = self.evaluator.problem, self.genome
        params = dict(problem.params)
        density = genome.density_parameter(genes)
        if density is not None:
            params["density"] = density
        return merged_backbone_per_tensor(
            problem.method_name,
            params,
            genome.weights_of(genes, self.tensor_names),
            [task.model.weights for task in problem.merged],
            problem.base.backbone,
        )

    def run(self, item: np.ndarray) -> list[np.ndarray]:
        """The metrics table of each genome (row) of ``item``, in order."""
        rows = np.atleast_2d(np.asarray(item, dtype=float))
        if self.genome.plain:
            return list(self.evaluator.tables(rows))
        return [self.evaluator.score(self.backbone(row)) for row in rows]


def run_evolve(
    config: ParetoConfig,
    results_path: Path,
    preference: Sequence[float] | None = None,
    seed: int = 0,
    generations: int | None = None,
    population: int | None = None,
    layer_groups: int | None = None,
    density: str | None = None,
    save_model: bool = False,
    device: str = "auto",
    log: Callable[[str], None] | None = None,
    executor: str | None = None,
    ray_address: str | None = None,
    workers: int | None = None,
) -> EvolveOutcome:
    """Evolve the merge ``config`` describes for the ``preference``-weighted mean of its metric
    (every task alike by default) and write the files into ``results_path``.

    ``generations``, ``population``, ``layer_groups`` and ``density`` override the config's
    ``evolve`` section. Evaluations run on ``executor`` (``local`` or ``ray``; the config's by
    default), a generation at a time.
    """
    from m3sb.executors import check_executor, open_executor
    from m3sb.pareto.run import MODELS, PoolEvaluator, load_problem, remove_stale_models

    say = log or (lambda _: None)
    address = ray_address or config.ray_address
    kind = check_executor(executor or config.executor, address)
    settings = evolve_settings(config.evolve, generations, population, layer_groups, density)
    genome = check_evolve(config, settings, preference)
    start = start_genome(config, settings, genome)
    names = [task.name for task in config.merged_tasks]
    record = EvaluationRecord(  # one column per gene, then every metric of every task
        Path(results_path),
        [task.name for task in config.tasks],
        config.metric,
        evolve_fingerprint(config, genome),
        [task.control for task in config.tasks],
        genome.columns,
    )
    known, _ = record.load()
    if known:
        say(f"resuming: {len(known)} evaluations found in {record.path}")
    sense: Sense = "loss" if config.metric == "loss" else "score"
    with open_executor(kind, device, address, workers) as pool:  # device and cluster checked first
        problem = load_problem(config, say, device)
        warning = layer_groups_warning(genome.layer_groups, problem.flat.layout.names)
        if warning is not None:
            say(warning)
        pool.start(EvolveProblem(problem.for_workers() if kind == "ray" else problem, genome))
        if kind == "ray":
            say(f"evaluating on {pool.workers} Ray workers")
        evaluator = PoolEvaluator(pool, problem)
        record.create()
        new = 0

        def keep(evaluation: Evaluation) -> None:
            nonlocal new
            new += 1
            table = evaluator.table_of(evaluation.coefficients)
            record.append(evaluation.phase, evaluation.coefficients, table)

        def shown(generation: Generation) -> None:
            if generation.number == 0:
                say(f"  start: {generation.best:.4f}")
                return
            say(
                f"  generation {generation.number}/{settings.generations}: best {generation.best:.4f}, "
                f"best so far {generation.best_so_far:.4f} (step {generation.sigma:.3f})"
            )

        say(
            f"evolving {genome.size} genes ({', '.join(genome.columns)}) for "
            f"{settings.generations} generations ..."
        )
        evolution = evolve(
            evaluator.evaluate_many,
            genome,
            start,
            len(names),
            settings.generations,
            settings.population,
            settings.sigma,
            seed,
            sense,
            preference,
            known,
            keep,
            shown,
        )
        best = best_summary(evolution, names, config.metric, sense, preference, seed)
        outcome = EvolveOutcome(evolution, names, config.metric, record.folder, best)
        outcome.files["evaluations"] = record.path
        outcome.files["best"] = write_text_atomic(record.folder / BEST, json.dumps(best, indent=2) + "\n")
        (record.folder / BEST_RECIPE).unlink(missing_ok=True)  # an earlier run's best is not this one's
        if not save_model:
            remove_stale_models(record.folder, say)
        recipe = best_recipe(config, problem, evolution, say)
        if recipe is not None:
            outcome.files["best_recipe"] = write_text_atomic(record.folder / BEST_RECIPE, recipe)
        if save_model:
            outcome.files["model"] = save_best_models(
                EvolveProblem(problem, genome), evolution.best.coefficients, record.folder / MODELS
            )
    outcome.new_evaluations = new
    outcome.reused_evaluations = evolution.reused
    return outcome


def best_recipe(
    config: ParetoConfig, problem: MergeProblem, evolution: Evolution, say: Callable[[str], None]
) -> str | None:
    """``best.yaml``: the best genome as a recipe ``m3sb merge`` runs (its weights, gradients
    over the layers where there are several groups, and its density), or None (said why)
    where no recipe states the search's merge."""
    from m3sb.pareto.recipe import merge_recipe, unrecipeable_reason

    reason = unrecipeable_reason(config, problem.flat.layout.names)
    if reason is not None:
        say(f"no {BEST_RECIPE}: {reason}")
        return None
    genome, genes = evolution.genome, evolution.best.coefficients
    rows = genome.weights(genes)
    weights = [float(row[0]) if genome.layer_groups == 1 else [float(v) for v in row] for row in rows]
    comment = (
        f"The best merge m3sb evolve found ({evolution.best.phase}): {config.metric} objective "
        f"{evolution.best_objective:.4g} (start {evolution.start_objective:.4g}).\n"
        f"Run it with: m3sb merge {BEST_RECIPE} OUT_DIR"
    )
    dtype = str(problem.flat.dtype).removeprefix("torch.")
    return merge_recipe(config, weights, genome.density_parameter(genes), dtype, comment)


def best_summary(
    evolution: Evolution,
    names: Sequence[str],
    metric: str,
    sense: Sense,
    preference: Sequence[float] | None,
    seed: int,
) -> dict[str, Any]:
    """``best.json``: the best genome (each gene, and each model's weights and density), its
    objective and the start's, and the metric it measured on each task."""
    genome, best = evolution.genome, evolution.best
    weights = genome.weights(best.coefficients)
    summary: dict[str, Any] = {
        "objective": {
            "metric": metric,
            "goal": "maximise" if sense == "score" else "minimise",
            "preference": dict(zip(names, map(float, preference or [1.0] * len(names)), strict=True)),
            "best": evolution.best_objective,
            "start": evolution.start_objective,
        },
        "genome": genome.describe(best.coefficients),
        "weights": {
            name: (float(row[0]) if genome.layer_groups == 1 else [float(v) for v in row])
            for name, row in zip(names, weights, strict=True)
        },
        "measured": dict(zip(names, map(float, best.metrics), strict=True)),
        "phase": best.phase,
        "generations": len(evolution.generations),
        "population": evolution.population,
        "evaluations": len(evolution.evaluated),
        "seed": seed,
        "stopped_early": evolution.stopped,
    }
    density = genome.density_parameter(best.coefficients)
    if density is not None:
        summary["density"] = density if isinstance(density, float) else dict(zip(names, density, strict=True))
    return summary


def save_best_models(problem: EvolveProblem, genes: np.ndarray, folder: Path) -> Path:
    """One model per task (the best genome's merged backbone, the task's own head) in ``folder/<task>``."""
    from m3sb.pareto.run import save_task_models

    evaluator = problem.build("cpu")
    if problem.problem.shares:  # a data-dependent method's candidate: the base plus the scaled shares
        return save_task_models(problem.problem, evaluator.backbone(genes), folder)
    return save_task_models(problem.problem, evaluator.method_backbone(genes), folder)
