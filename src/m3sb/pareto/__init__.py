"""MAP: amortized Pareto fronts over task-vector coefficients (search side, model-free).

``amortized_pareto_front(evaluate, n_tasks, ...)`` works on any black-box evaluator;
:mod:`m3sb.pareto.merging` is the client that evaluates merged models.
"""

from m3sb.pareto.design import grid, initial_design
from m3sb.pareto.evaluations import Evaluation, SearchError
from m3sb.pareto.front import MODES, ParetoFront, amortized_pareto_front, default_budget
from m3sb.pareto.preference import select_index
from m3sb.pareto.search import SearchSettings
from m3sb.pareto.surrogate import Warp

__all__ = [
    "MODES",
    "Evaluation",
    "ParetoFront",
    "SearchError",
    "SearchSettings",
    "Warp",
    "amortized_pareto_front",
    "default_budget",
    "grid",
    "initial_design",
    "select_index",
]
