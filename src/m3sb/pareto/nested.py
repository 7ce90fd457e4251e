"""Nested MAP for many tasks: merge pairs along their 2-task fronts, then merge the merged.

Each node of the tree is a coefficient vector over the original tasks (a leaf is the
top of the box times a one-hot vector). A pair (A, B) is searched in the 2-D space
``a * c_A + b * c_B`` with a, b in [0, 1] (bounds must start at 0), with
one objective per side: the preference-weighted mean of that side's task metrics. The
pair is merged at the point the preference picks (a side weighs the sum of its tasks'
weights) and becomes a node of the next level, until one node is left. Pairs are formed
greedily (``SearchSettings.pairing``): with ``similarity``, most similar task vectors first
when their Gram matrix is given, otherwise the nodes whose predicted metrics across all
tasks are closest; with ``accuracy`` (MAP's published procedure), the nodes whose own
metrics (a fine-tuned model's on its task; a merged node's preference-weighted mean over
its tasks) are closest, and each side's surrogate is fitted on its preference-weighted
metric rather than combined from per-task surrogates.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from m3sb.pareto.design import Bounds, initial_design
from m3sb.pareto.evaluations import EvaluationLog, SearchError
from m3sb.pareto.preference import check_preference, select_index
from m3sb.pareto.search import SearchSettings, search_front
from m3sb.pareto.surrogate import Warp, fit_surrogates

if TYPE_CHECKING:
    from m3sb.pareto.front import ParetoFront


# A pair is searched over mixing fractions in [0, 1]^2 of its two nodes, so every
# coefficient of the merged node stays in [0, high]: a product of fractions times high.
PAIR_BOUNDS = (0.0, 1.0)


@dataclass(frozen=True)
class Node:
    """A group of tasks merged into one coefficient vector, and its predicted metrics."""

    tasks: tuple[int, ...]
    coefficients: np.ndarray
    profile: np.ndarray  # predicted (or measured) metric of every task at ``coefficients``


@dataclass(frozen=True)
class PairFront:
    """The searched front of one pair, in task coefficients."""

    coefficients: np.ndarray  # (K, T)
    predicted: np.ndarray  # (K, T) per-task metrics
    r2: np.ndarray  # (T,)


def side_weights(preference: np.ndarray, tasks: Sequence[int]) -> np.ndarray:
    """The preference inside one side, normalised to sum 1 (uniform when it is all zero)."""
    inside = preference[list(tasks)]
    return inside / inside.sum() if inside.sum() > 0 else np.full(len(tasks), 1.0 / len(tasks))


def own_metric(node: Node, weights: np.ndarray) -> float:
    """A node's metric on its own tasks: the preference-weighted mean of its profile there."""
    return float(node.profile[list(node.tasks)] @ side_weights(weights, node.tasks))


def pair_greedily(
    nodes: list[Node], similarity: np.ndarray | None, weights: np.ndarray | None = None
) -> tuple[list[tuple[Node, Node]], list[Node]]:
    """Disjoint pairs, most similar first; an odd node out waits for the next level.

    With ``weights`` (a preference), the closest own metrics (:func:`own_metric`) pair first.
    """
    count = len(nodes)
    closeness = np.full((count, count), -np.inf)
    for i in range(count):
        for j in range(i + 1, count):
            closeness[i, j] = (
                -abs(own_metric(nodes[i], weights) - own_metric(nodes[j], weights))
                if weights is not None
                else _closeness(nodes[i], nodes[j], similarity)
            )
    pairs: list[tuple[Node, Node]] = []
    used: set[int] = set()
    for flat in np.argsort(-closeness, axis=None, kind="stable"):
        i, j = divmod(int(flat), count)
        if i < j and i not in used and j not in used and np.isfinite(closeness[i, j]):
            pairs.append((nodes[i], nodes[j]))
            used.update((i, j))
    rest = [node for index, node in enumerate(nodes) if index not in used]
    return pairs, rest


def _closeness(a: Node, b: Node, gram: np.ndarray | None) -> float:
    if gram is not None:
        cross = a.coefficients @ gram @ b.coefficients
        norms = np.sqrt(
            max(a.coefficients @ gram @ a.coefficients, 1e-30)
            * max(b.coefficients @ gram @ b.coefficients, 1e-30)
        )
        return float(cross / norms)
    return -float(np.linalg.norm(a.profile - b.profile))


def nested_front(
    log: EvaluationLog,
    n_tasks: int,
    preference: Sequence[float] | np.ndarray | None,
    similarity: np.ndarray | None,
    bounds: Bounds,
    seed: int,
    warp: Warp,
    sign: float,
    settings: SearchSettings,
) -> ParetoFront:
    """Run nested MAP within ``log``'s budget; the last pair's front over all T tasks."""
    from m3sb.pareto.front import ParetoFront

    weights = np.ones(n_tasks) if preference is None else check_preference(preference, n_tasks)
    if similarity is not None and np.shape(similarity) != (n_tasks, n_tasks):
        raise SearchError(
            f"similarity must be a {n_tasks} x {n_tasks} matrix, got shape {np.shape(similarity)}"
        )
    by_accuracy = settings.pairing == "accuracy"
    if by_accuracy:
        similarity = None  # the fine-tuned accuracies pair the tasks: each is measured alone
    budget = log.remaining
    pair_budget = (budget - (0 if similarity is not None else n_tasks)) // (n_tasks - 1)
    if pair_budget < 3:
        raise SearchError(
            f"budget {budget} leaves {pair_budget} evaluations per pair of tasks; nested needs 3"
        )
    leaves = bounds[1] * np.eye(n_tasks)  # each task at the top of the box
    profiles = leaves if similarity is not None else log(leaves, "nested: each task alone")
    nodes = [Node((i,), leaves[i], profiles[i]) for i in range(n_tasks)]
    level, last = 0, None
    while len(nodes) > 1:
        level += 1
        pairs, rest = pair_greedily(nodes, similarity, weights if by_accuracy else None)
        merged = []
        for number, (a, b) in enumerate(pairs):
            phase = f"nested {level}.{number + 1}: {_name(a)} + {_name(b)}"
            last = _pair_front(
                log,
                a,
                b,
                weights,
                pair_budget,
                seed + 97 * level + number,
                warp,
                sign,
                settings,
                phase,
            )
            sides = [weights[list(a.tasks)].sum(), weights[list(b.tasks)].sum()]
            scores = sign * np.stack(
                [last.predicted[:, list(n.tasks)] @ side_weights(weights, n.tasks) for n in (a, b)], axis=1
            )
            pick = select_index(scores, sides if sum(sides) > 0 else [1.0, 1.0])
            merged.append(Node(a.tasks + b.tasks, last.coefficients[pick], last.predicted[pick]))
        nodes = merged + rest
    assert last is not None
    return ParetoFront(last.coefficients, last.predicted, [], last.r2, "score", "nested")


def _name(node: Node) -> str:
    return "{" + ",".join(str(t) for t in node.tasks) + "}"


def _pair_front(
    log: EvaluationLog,
    a: Node,
    b: Node,
    weights: np.ndarray,
    budget: int,
    seed: int,
    warp: Warp,
    sign: float,
    settings: SearchSettings,
    phase: str,
) -> PairFront:
    """Evaluate a design in the pair's 2-D space, fit per-task surrogates, search the sides' front."""
    basis = np.stack([a.coefficients, b.coefficients])
    already = sum(
        log.asked(node) for node in basis
    )  # the corners (1, 0), (0, 1) are the nodes: free if asked
    points = initial_design(2, budget + already, PAIR_BOUNDS, seed)
    metrics = log(points @ basis, phase)
    surrogates = fit_surrogates(points, metrics, warp, "quadratic", seed=seed)
    mixes = [side_weights(weights, node.tasks) for node in (a, b)]
    tasks = [list(node.tasks) for node in (a, b)]

    def sides(per_task: np.ndarray) -> np.ndarray:
        return np.stack([per_task[:, t] @ m for t, m in zip(tasks, mixes, strict=True)], axis=1)

    if settings.pairing == "accuracy":  # one surrogate per side, on its weighted metric
        side_surrogates = fit_surrogates(points, sides(metrics), warp, "quadratic", seed=seed, with_r2=False)

        def objectives(x: np.ndarray) -> np.ndarray:
            return -sign * side_surrogates.predict(x)

    else:

        def objectives(x: np.ndarray) -> np.ndarray:
            return -sign * sides(surrogates.predict(x))

    found = search_front(objectives, 2, PAIR_BOUNDS, seed, settings, seeds=points)  # non-dominated already
    found = found[np.argsort(found[:, 0], kind="stable")]
    return PairFront(found @ basis, surrogates.predict(found), surrogates.r2)
