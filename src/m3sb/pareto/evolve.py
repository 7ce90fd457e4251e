"""CMA-ES over a merge's genome for one objective: the preference-weighted mean of the tasks'
metric (``m3sb evolve``, as mergekit-evolve searches merge parameters).

Model-free: a :class:`Genome` says what each gene is (per-model weights, read as gradients
over the layers, and a method's density), :func:`evolve` runs the ask/tell loop over any
``evaluate_many``. Each generation is asked for as one batch through an
:class:`EvaluationLog`, so an executor may spread it over workers and an interrupted run
resumes from its logged evaluations: CMA-ES draws its samples from its own generator
seeded by ``seed``, and told the same values it asks for the same genomes again.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from m3sb.config import count_layers, resolve_value
from m3sb.errors import ConfigError
from m3sb.pareto.evaluations import EvaluateMany, Evaluation, EvaluationLog, SearchError

Sense = Literal["score", "loss"]  # scores are maximised, losses minimised
DensityGenes = Literal["per_model", "global"]
START_PHASE = "start"
GENERATION_PHASE = "generation "  # + its number, from 1


@dataclass(frozen=True)
class Genome:
    """The layout of a genome: one row of floats, in :attr:`columns` order.

    First each model's weight as ``layer_groups`` evenly spaced values of a gradient (the
    model's ``weight_<task>`` alone when there is one group; else ``weight_<task>_<k>``,
    read at ``k / (groups - 1)`` of the layers), then the density: one per model
    (``density_<task>``), one for all (``density``), or none. Weights lie in
    ``weight_bounds``, densities in ``density_bounds``.
    """

    task_names: tuple[str, ...]
    layer_groups: int = 1
    density: DensityGenes | None = None
    weight_bounds: tuple[float, float] = (0.0, 1.0)
    density_bounds: tuple[float, float] = (0.0, 1.0)

    def __post_init__(self) -> None:
        if self.layer_groups < 1:
            raise ConfigError(f"layer groups {self.layer_groups}: needs at least 1")
        for what, (low, high) in (("weight", self.weight_bounds), ("density", self.density_bounds)):
            if not (np.isfinite(low) and np.isfinite(high) and low < high):
                raise ConfigError(f"{what} range [{low:g}, {high:g}] is empty; nothing to evolve there")

    @property
    def count(self) -> int:
        """How many models the weights are for."""
        return len(self.task_names)

    @property
    def density_count(self) -> int:
        """How many density genes there are (0, 1 or one per model)."""
        return {None: 0, "global": 1, "per_model": self.count}[self.density]

    @property
    def size(self) -> int:
        """How many genes there are."""
        return self.count * self.layer_groups + self.density_count

    @property
    def plain(self) -> bool:
        """Whether a genome is just one weight per model (the coefficients of ``m3sb pareto``)."""
        return self.layer_groups == 1 and self.density is None

    @property
    def columns(self) -> list[str]:
        """Each gene's name, in order."""
        if self.layer_groups == 1:
            weights = [f"weight_{name}" for name in self.task_names]
        else:
            weights = [f"weight_{n}_{k}" for n in self.task_names for k in range(self.layer_groups)]
        densities = {None: [], "global": ["density"], "per_model": [f"density_{n}" for n in self.task_names]}
        return [*weights, *densities[self.density]]

    @property
    def lower(self) -> np.ndarray:
        """Each gene's lowest value."""
        return self._per_gene(0)

    @property
    def upper(self) -> np.ndarray:
        """Each gene's highest value."""
        return self._per_gene(1)

    def _per_gene(self, side: int) -> np.ndarray:
        weights = np.full(self.count * self.layer_groups, self.weight_bounds[side], dtype=float)
        return np.concatenate([weights, np.full(self.density_count, self.density_bounds[side], dtype=float)])

    def vector(self, weights: float | Sequence[float], density: float | Sequence[float] = 0.0) -> np.ndarray:
        """A genome from one weight (or one per model, constant over the layers) and one
        density (or one per model, averaged for a global gene), clipped to the ranges."""
        per_model = np.broadcast_to(np.asarray(weights, dtype=float), (self.count,))
        genes = np.repeat(per_model, self.layer_groups)
        densities = np.broadcast_to(np.asarray(density, dtype=float), (self.count,))
        extra = {None: [], "global": [float(densities.mean())], "per_model": list(densities)}[self.density]
        vector: np.ndarray = np.clip(
            np.concatenate([genes, np.asarray(extra, dtype=float)]), self.lower, self.upper
        )
        return vector

    def check(self, genome: np.ndarray) -> np.ndarray:
        """``genome`` as a float vector of the right size."""
        values = np.asarray(genome, dtype=float).reshape(-1)
        if values.size != self.size:
            raise ConfigError(f"a genome of {values.size} genes for a layout of {self.size}")
        return values

    def weights(self, genome: np.ndarray) -> np.ndarray:
        """Each model's weight gradient: shape (models, layer groups)."""
        return self.check(genome)[: self.count * self.layer_groups].reshape(self.count, self.layer_groups)

    def densities(self, genome: np.ndarray) -> np.ndarray | None:
        """The density genes (one, or one per model); None when the density is not evolved."""
        if self.density is None:
            return None
        return self.check(genome)[self.count * self.layer_groups :]

    def tensor_weights(self, genome: np.ndarray, tensor_name: str, num_layers: int) -> list[float]:
        """Each model's weight for one tensor of a model with ``num_layers`` layers: its
        gradient read as mergekit reads gradient parameters (layer i at i / (N - 1), every
        tensor outside the numbered layers at the first value)."""
        rows = self.weights(genome)
        values = [resolve_value([float(v) for v in row], tensor_name, num_layers) for row in rows]
        return [float(value) for value in values if isinstance(value, float)]

    def weights_of(self, genome: np.ndarray, tensor_names: Iterable[str]) -> Callable[[str], list[float]]:
        """:meth:`tensor_weights` for the tensors of a backbone whose tensors are ``tensor_names``."""
        num_layers = count_layers(tensor_names)
        row = self.check(genome)
        return lambda name: self.tensor_weights(row, name, num_layers)

    def density_parameter(self, genome: np.ndarray) -> float | list[float] | None:
        """The method's ``density`` parameter the genome sets (None when it sets none)."""
        values = self.densities(genome)
        if values is None:
            return None
        return float(values[0]) if self.density == "global" else [float(v) for v in values]

    def describe(self, genome: np.ndarray) -> dict[str, float]:
        """Each gene by name."""
        return dict(zip(self.columns, map(float, self.check(genome)), strict=True))


def preference_objective(metrics: np.ndarray, preference: Sequence[float] | None = None) -> float:
    """The preference-weighted mean of the tasks' metrics (every task alike by default)."""
    values = np.asarray(metrics, dtype=float)
    weights = np.ones_like(values) if preference is None else np.asarray(preference, dtype=float)
    return float(weights @ values / weights.sum())


@dataclass(frozen=True)
class Generation:
    """What one generation found: its best objective, the best so far, CMA-ES's step size."""

    number: int
    best: float
    best_so_far: float
    sigma: float


@dataclass
class Evolution:
    """An evolution's result: every genome it evaluated (the start first), the best one, its
    objective and the start's, each generation's summary and why CMA-ES stopped early, if it did."""

    genome: Genome
    evaluated: list[Evaluation]
    objectives: np.ndarray
    best_index: int
    generations: list[Generation] = field(default_factory=list)
    stopped: str | None = None
    reused: int = 0
    population: int = 0

    @property
    def best(self) -> Evaluation:
        """The best evaluated genome (the first of equals)."""
        return self.evaluated[self.best_index]

    @property
    def best_objective(self) -> float:
        """The best genome's objective."""
        return float(self.objectives[self.best_index])

    @property
    def start_objective(self) -> float:
        """The starting genome's objective."""
        return float(self.objectives[0])


def check_evolution(generations: int, population: int | None, sigma: float) -> None:
    """Settings CMA-ES can run with; a one-line ConfigError otherwise."""
    if generations < 1:
        raise ConfigError(f"--generations {generations}: needs at least 1")
    if population is not None and population < 2:
        raise ConfigError(f"--population {population}: needs at least 2")
    if not 0.0 < sigma <= 1.0:
        raise ConfigError(f"sigma {sigma:g}: needs 0 < sigma <= 1 (a fraction of each gene's range)")


def evolve(
    evaluate_many: EvaluateMany,
    genome: Genome,
    start: np.ndarray,
    n_tasks: int,
    generations: int = 10,
    population: int | None = None,
    sigma: float = 0.2,
    seed: int = 0,
    sense: Sense = "score",
    preference: Sequence[float] | None = None,
    known: Iterable[Evaluation] = (),
    on_evaluation: Callable[[Evaluation], None] | None = None,
    on_generation: Callable[[Generation], None] | None = None,
) -> Evolution:
    """CMA-ES from ``start`` for ``generations`` generations (fewer when CMA-ES stops itself),
    over genomes laid out as ``genome`` says, maximising (``score``) or minimising (``loss``)
    the ``preference``-weighted mean of the ``n_tasks`` metrics that ``evaluate_many`` gives
    each genome.

    CMA-ES works on every gene scaled to [0, 1] (its own bound handling keeps samples inside),
    with a step of ``sigma`` of each range. The start is evaluated first, then each
    generation as one batch. ``known`` evaluations (an interrupted run's) are reused, not
    evaluated again; ``on_evaluation`` sees each new one as soon as it is known and
    ``on_generation`` each generation's summary (the start's as generation 0).
    """
    import cma

    check_evolution(generations, population, sigma)
    start = np.clip(genome.check(start), genome.lower, genome.upper)
    lower, span = genome.lower, genome.upper - genome.lower
    sign = -1.0 if sense == "score" else 1.0  # CMA-ES minimises

    def evaluate(point: np.ndarray) -> np.ndarray:
        return np.asarray(next(iter(evaluate_many(np.atleast_2d(point)))), dtype=float)

    log = EvaluationLog(evaluate, n_tasks, None, known, on_evaluation, evaluate_many)
    objectives = [preference_objective(log(start, START_PHASE)[0], preference)]
    generator = np.random.default_rng(seed)
    options = {
        "bounds": [0.0, 1.0],
        "seed": np.nan,  # leave numpy's global generator alone: samples come from ``generator``
        "randn": lambda *shape: generator.standard_normal(shape),
        "verbose": -9,
        "verb_log": 0,
        "verb_disp": 0,
        "tolflatfitness": generations + 1,  # equal scores (accuracy on few examples) are no reason to stop
        "maxiter": generations,
        **({"popsize": population} if population is not None else {}),
    }
    strategy = cma.CMAEvolutionStrategy(((start - lower) / span).tolist(), sigma, options)
    if on_generation is not None:  # the start as generation 0
        on_generation(Generation(0, objectives[0], objectives[0], sigma))
    history: list[Generation] = []
    stopped: str | None = None
    for number in range(1, generations + 1):
        samples = strategy.ask()
        points = np.array([lower + np.asarray(sample, dtype=float) * span for sample in samples])
        metrics = log(points, f"{GENERATION_PHASE}{number}")
        values = [preference_objective(row, preference) for row in metrics]
        objectives.extend(values)
        strategy.tell(samples, [sign * value for value in values])
        best_so_far = max(objectives) if sense == "score" else min(objectives)
        history.append(
            Generation(number, max(values) if sense == "score" else min(values), best_so_far, strategy.sigma)
        )
        if on_generation is not None:
            on_generation(history[-1])
        reasons = {k: v for k, v in strategy.stop().items() if k != "maxiter"}
        if reasons and number < generations:
            stopped = ", ".join(sorted(reasons))
            break
    scores = np.asarray(objectives)
    if not np.all(np.isfinite(scores)):
        raise SearchError("an objective is not finite")
    best = int(np.argmax(scores) if sense == "score" else np.argmin(scores))
    return Evolution(
        genome, log.evaluations, scores, best, history, stopped, log.reused, int(strategy.popsize)
    )
