"""The model-merging client of MAP: candidates built from flat task vectors, scored per task.

A :class:`MergeProblem` holds what evaluations need, device-free (what an executor ships
to its workers); its :class:`MergeEvaluator` computes on one device. The base backbone
and the T task vectors live there as one flat buffer each; a candidate
``base + sum_i c_i tau_i`` is one fused ``addmv`` into a preallocated buffer, and every
task's classifier runs on views of that buffer through ``torch.func.functional_call``
(no copy into the model). Methods other than task arithmetic build the candidate tensor
by tensor with :func:`m3sb.methods.merge_group`, with the coefficients as their
per-model weights.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from m3sb.errors import ConfigError
from m3sb.methods import get_method, merge_backbones, merge_group
from m3sb.methods.registry import check_param_values
from m3sb.tasks.metrics import METRICS, check_autocast, check_metric
from m3sb.tasks.model import TaskModel
from m3sb.tasks.registry import Task


def check_search_method(
    method_name: str, params: Mapping[str, Any], bounds: tuple[float, float], count: int | None = None
) -> None:
    """The method must take per-model weights (the coefficients) and accept ``params``; a
    data-dependent method's coefficients scale each model's share of its merge, so any
    bounds suit it."""
    method = get_method(method_name)
    if not method.uses_weights:
        raise ConfigError(
            f"merge_method '{method_name}' has no per-model weights for the coefficients to set"
        )
    if method.nonnegative_weights and method.statistics is None and bounds[0] < 0:
        raise ConfigError(f"merge_method '{method_name}' needs weights >= 0, but bounds start at {bounds[0]}")
    check_param_values(method, params, "parameters", count)


@dataclass(frozen=True)
class Layout:
    """Where each floating-point backbone tensor sits in the flat buffers."""

    names: tuple[str, ...]
    shapes: tuple[torch.Size, ...]
    offsets: tuple[int, ...]

    @property
    def size(self) -> int:
        """Number of elements of a flat buffer."""
        return self.offsets[-1]

    @classmethod
    def of(cls, backbone: Mapping[str, torch.Tensor]) -> Layout:
        """The layout of ``backbone``'s floating-point tensors, in its order."""
        names = tuple(name for name, tensor in backbone.items() if tensor.is_floating_point())
        shapes = tuple(backbone[name].shape for name in names)
        offsets = [0]
        for shape in shapes:
            offsets.append(offsets[-1] + shape.numel())
        return cls(names, shapes, tuple(offsets))

    def flatten(
        self, backbone: Mapping[str, torch.Tensor], device: torch.device, dtype: torch.dtype = torch.float32
    ) -> torch.Tensor:
        """One vector of ``backbone``'s tensors in ``dtype``, in layout order."""
        return torch.cat([backbone[name].reshape(-1).to(dtype) for name in self.names]).to(device)

    def views(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Tensors viewing ``flat`` (no copy), by name."""
        return {
            name: flat[start:end].view(shape)
            for name, shape, start, end in zip(
                self.names, self.shapes, self.offsets[:-1], self.offsets[1:], strict=True
            )
        }


def search_memory_bytes(
    parameters: int, stored_itemsize: int, tasks: int, candidate_itemsize: int = 4
) -> int:
    """What a search over ``tasks`` task vectors of a ``parameters``-parameter model holds at
    least: every task model and the base loaded (the module and a copy of its weights, in
    the stored dtype) and T + 2 flat vectors in the candidates' dtype (the base, the task
    vectors, a candidate)."""
    return parameters * ((tasks + 1) * 2 * stored_itemsize + (tasks + 2) * candidate_itemsize)


def check_search_fits(
    base_checkpoint: str, tasks: int, available: int | None, candidates: str = "float32"
) -> None:
    """Refuse, in one line and before any model is loaded, a search that cannot fit in
    ``available`` bytes (nothing is checked where the base's header or the memory is unknown)."""
    from m3sb.checkpoints import open_checkpoint
    from m3sb.errors import CheckpointError

    if available is None:
        return
    try:
        infos = [i for i in open_checkpoint(base_checkpoint).tensors.values() if i.dtype.is_floating_point]
    except (CheckpointError, OSError):
        return  # not a local checkpoint: loading it says what is wrong
    parameters = sum(math.prod(info.shape) for info in infos)
    itemsize = max((info.dtype.itemsize for info in infos), default=4)
    candidate = itemsize if candidates == "model" and itemsize == 2 else 4
    needed = search_memory_bytes(parameters, itemsize, tasks, candidate)
    if needed > available:
        smaller = search_memory_bytes(parameters, itemsize, tasks, 2)
        hint = (
            f" (candidate_dtype: model would need about {smaller / 1e9:.1f} GB)"
            if (itemsize == 2 and candidate == 4)
            else ""
        )
        raise ConfigError(
            f"{tasks} tasks of a {parameters / 1e9:.2f}B-parameter model need about {needed / 1e9:.1f} GB "
            f"(each model loaded, and {tasks + 2} {'float32' if candidate == 4 else '16-bit'} flat copies), "
            f"but {available / 1e9:.1f} GB is available{hint}; search fewer tasks, or on a machine with "
            "more memory"
        )


CANDIDATE_DTYPES = ("float32", "model")
_STORED_AS = {torch.bfloat16: torch.int16}  # numpy has no bfloat16: its bits are kept as int16


@dataclass(frozen=True)
class FlatTaskVectors:
    """The base backbone and the T task vectors as flat numpy arrays (device-free), in
    float32 or in the models' 16-bit dtype (``dtype``; bfloat16's bits kept as int16).

    Numpy so that Ray's object store shares them zero-copy between the workers of a node.
    """

    layout: Layout
    base: np.ndarray  # (P,)
    vectors: np.ndarray  # (T, P)
    fixed: dict[str, torch.Tensor]  # integer tensors of the base backbone (position ids, ...)
    dtype: torch.dtype = torch.float32

    @classmethod
    def of(
        cls,
        base: Mapping[str, torch.Tensor],
        models: Sequence[Mapping[str, torch.Tensor]],
        dtype: torch.dtype = torch.float32,
    ) -> FlatTaskVectors:
        """Flatten ``base`` and every ``model - base`` (each difference taken in float32, then
        stored in ``dtype``)."""
        layout = Layout.of(base)
        cpu = torch.device("cpu")
        flat_base = layout.flatten(base, cpu, dtype)
        vectors = torch.empty((len(models), len(flat_base)), dtype=dtype)
        for index, model in enumerate(models):
            for name, start, end in zip(layout.names, layout.offsets[:-1], layout.offsets[1:], strict=True):
                difference = model[name].reshape(-1).float() - base[name].reshape(-1).float()
                vectors[index, start:end] = difference.to(dtype)
        fixed = {name: tensor for name, tensor in base.items() if not tensor.is_floating_point()}
        return cls(layout, _as_numpy(flat_base), _as_numpy(vectors), fixed, dtype)

    def tensor(self, array: np.ndarray, device: torch.device) -> torch.Tensor:
        """One of the arrays as a tensor of ``dtype`` on ``device`` (no copy on the CPU)."""
        return _on_device(array, device).view(self.dtype)

    def gram(self) -> np.ndarray:
        """The T x T Gram matrix of the task vectors (float64), used to pair tasks in nested MAP."""
        vectors = self.tensor(self.vectors, torch.device("cpu")).double()
        return np.asarray((vectors @ vectors.T).numpy())


def _as_numpy(tensor: torch.Tensor) -> np.ndarray:
    stored = _STORED_AS.get(tensor.dtype)
    return (tensor.view(stored) if stored is not None else tensor).numpy()


def candidate_dtype(choice: str, backbone: Mapping[str, torch.Tensor]) -> torch.dtype:
    """The dtype candidates are built in: float32, or (``model``) the backbone's own floating
    dtype where it is 16-bit (float32 otherwise)."""
    if choice not in CANDIDATE_DTYPES:
        raise ConfigError(f"candidate_dtype '{choice}': choose one of {', '.join(CANDIDATE_DTYPES)}")
    floats = {tensor.dtype for tensor in backbone.values() if tensor.is_floating_point()}
    if choice == "model" and len(floats) == 1 and next(iter(floats)) in (torch.bfloat16, torch.float16):
        return next(iter(floats))
    return torch.float32


def _on_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """``array`` as a tensor on ``device``; on the CPU it shares the array's memory (read-only there)."""
    with warnings.catch_warnings():  # arrays from Ray's object store are read-only; nothing writes to them
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(array).to(device)


class TaskVectorSpace:
    """The flat base and task vectors on the device; candidates on demand.

    On the CPU the buffers are the arrays of :class:`FlatTaskVectors` themselves (no copy);
    each candidate is one fused ``addmv`` into a reused buffer.
    """

    def __init__(self, flat: FlatTaskVectors, device: torch.device) -> None:
        self.layout = flat.layout
        self.device = device
        self.base = flat.tensor(flat.base, device)
        self.vectors = flat.tensor(flat.vectors, device)
        self.buffer = torch.empty_like(self.base)
        self.fixed = {name: t.to(device) for name, t in flat.fixed.items()}

    @property
    def n_tasks(self) -> int:
        """How many task vectors there are."""
        return int(self.vectors.shape[0])

    def candidates(self, coefficients: np.ndarray) -> torch.Tensor:
        """``base + C @ tau`` for every row of ``coefficients`` (shape (B, T)): a (B, P) tensor."""
        weights = torch.as_tensor(np.asarray(coefficients, dtype=np.float32), device=self.device)
        return torch.addmm(self.base, weights.to(self.vectors.dtype), self.vectors)

    def candidate(self, coefficients: np.ndarray | Sequence[float]) -> dict[str, torch.Tensor]:
        """``base + sum_i c_i tau_i`` as views of one reused buffer (valid until the next call)."""
        weights = torch.as_tensor(np.asarray(coefficients, dtype=np.float32), device=self.device)
        torch.addmv(self.base, self.vectors.T, weights.to(self.vectors.dtype), out=self.buffer)
        return {**self.layout.views(self.buffer), **self.fixed}

    def candidate_per_tensor(
        self, coefficients_of: Callable[[str], Sequence[float]]
    ) -> dict[str, torch.Tensor]:
        """``base + sum_i c_i tau_i`` with each tensor's own coefficients (``coefficients_of(name)``,
        as a gradient gives them), as views of one reused buffer (valid until the next call)."""
        layout = self.layout
        for name, start, end in zip(layout.names, layout.offsets[:-1], layout.offsets[1:], strict=True):
            weights = torch.as_tensor(np.asarray(coefficients_of(name), dtype=np.float32), device=self.device)
            torch.addmv(
                self.base[start:end],
                self.vectors[:, start:end].T,
                weights.to(self.vectors.dtype),
                out=self.buffer[start:end],
            )
        return {**layout.views(self.buffer), **self.fixed}

    def backbones(self) -> tuple[dict[str, torch.Tensor], list[_TaskBackbone]]:
        """The base backbone (views) and each task model's backbone (``base + tau_i``, made
        tensor by tensor on access): what whole-model baselines merge, workers included."""
        base = {**self.layout.views(self.base), **self.fixed}
        return base, [_TaskBackbone(self, index) for index in range(self.n_tasks)]


class _TaskBackbone(Mapping[str, torch.Tensor]):
    """Task model ``index``'s backbone rebuilt from the flat buffers, one tensor per lookup."""

    def __init__(self, space: TaskVectorSpace, index: int) -> None:
        self.space, self.index = space, index
        self.slots = dict(zip(space.layout.names, range(len(space.layout.names)), strict=True))

    def __getitem__(self, name: str) -> torch.Tensor:
        if name in self.space.fixed:
            return self.space.fixed[name]
        layout, slot = self.space.layout, self.slots[name]
        start, end = layout.offsets[slot], layout.offsets[slot + 1]
        return (self.space.base[start:end] + self.space.vectors[self.index, start:end]).view(
            layout.shapes[slot]
        )

    def __iter__(self) -> Iterator[str]:
        return iter([*self.space.layout.names, *self.space.fixed])

    def __len__(self) -> int:
        return len(self.space.layout.names) + len(self.space.fixed)


def merged_backbone(
    method_name: str,
    params: Mapping[str, Any],
    coefficients: Sequence[float],
    models: Sequence[Mapping[str, torch.Tensor]],
    base: Mapping[str, torch.Tensor],
) -> dict[str, torch.Tensor]:
    """Any weighted method's merged backbone, tensor by tensor, with the coefficients as weights
    (in the task-vector space where the method offers both).

    ``base`` is the base backbone; ``models`` map at least its names to tensors.
    """
    from m3sb.pareto.recipe import method_parameters

    extra = method_parameters(method_name, dict(params))
    return merge_backbones(method_name, base, models, list(coefficients), base, **extra)


def merged_backbone_per_tensor(
    method_name: str,
    params: Mapping[str, Any],
    weights_of: Callable[[str], Sequence[float]],
    models: Sequence[Mapping[str, torch.Tensor]],
    base: Mapping[str, torch.Tensor],
) -> dict[str, torch.Tensor]:
    """:func:`merged_backbone` with each tensor's own weights (``weights_of(name)``, as a
    gradient gives them): any weighted method, tensor by tensor through ``merge_group``."""
    from m3sb.pareto.recipe import method_parameters

    extra = method_parameters(method_name, dict(params))
    merged = {}
    for name, tensor in base.items():
        if not tensor.is_floating_point():
            merged[name] = tensor
            continue
        group = [model[name] for model in models]
        merged[name] = merge_group(method_name, group, list(weights_of(name)), tensor, name, **extra)
    return merged


def method_shares(
    method_name: str,
    params: Mapping[str, Any],
    base: Mapping[str, torch.Tensor],
    models: Sequence[Mapping[str, torch.Tensor]],
    statistics: Sequence[Mapping[str, torch.Tensor]],
) -> list[dict[str, torch.Tensor]]:
    """Each model's share of a data-dependent method's merge, as a backbone: the merge with
    the base standing in for every other model. RegMean and Fisher merging are affine in the
    models at fixed statistics, so the shares' task vectors add up to the merge's own; a
    search's coefficient scales one share (0: the base, all 1: the method's merge)."""
    from m3sb.statistics import whole_norm

    norms = [whole_norm(own) for own in statistics] if get_method(method_name).statistics == "fisher" else []
    shares = []
    for index, model in enumerate(models):
        stand_ins = [model if other == index else base for other in range(len(models))]
        shares.append(merge_backbones(method_name, base, stand_ins, None, base, statistics, norms, **params))
    return shares


def metrics_table(per_task: Sequence[Mapping[str, float]]) -> np.ndarray:
    """Every metric of every task as one (metrics, tasks) array, rows in the order of ``METRICS``."""
    return np.array([[float(metrics[name]) for metrics in per_task] for name in METRICS])


@dataclass(frozen=True)
class MethodMerge:
    """An item for a worker: score the merge of every task model with ``method`` (a baseline),
    each model at its ``weights`` entry (1 when there are none)."""

    method: str
    params: dict[str, Any]
    weights: tuple[float, ...] | None = None


@dataclass
class MergeProblem:
    """Everything MAP's evaluations need, device-free and picklable (what executors ship).

    ``build(device)`` gives the :class:`MergeEvaluator` that computes on ``device``. Each
    evaluation scores every task (control tasks too) on every metric; the search sees
    ``metric`` on the merged tasks only (:meth:`objective`).
    """

    tasks: list[Task]
    base: TaskModel
    metric: str
    method_name: str = "task_arithmetic"
    params: dict[str, Any] = field(default_factory=dict)
    batch_size: int = 256
    candidates_per_pass: int = 1
    autocast: str = "none"
    statistics: list[dict[str, torch.Tensor]] = field(default_factory=list)  # data-dependent methods'
    candidate_dtype: str = "float32"
    flat: FlatTaskVectors = field(init=False)

    def __post_init__(self) -> None:
        """Checks the settings, casts the task models to the candidates' dtype (in place:
        float32, or the models' own 16-bit dtype with ``candidate_dtype: model``) and
        flattens them (a data-dependent method's shares in place of the task vectors)."""
        check_metric(self.metric)
        check_autocast(self.autocast)
        dtype = candidate_dtype(self.candidate_dtype, self.base.backbone)
        for task in self.tasks:  # heads meet the candidate backbones in their dtype
            task.model.model.to(dtype)
        models = [task.model.backbone for task in self.merged]
        if self.shares:
            if len(self.statistics) != len(models):
                raise ConfigError(
                    f"merge_method '{self.method_name}' needs the statistics of every merged model"
                )
            models = method_shares(self.method_name, self.params, self.base.backbone, models, self.statistics)
            self.statistics = []  # used up: workers need the shares only
        self.flat = FlatTaskVectors.of(self.base.backbone, models, dtype)

    @property
    def shares(self) -> bool:
        """Whether the coefficients scale each model's share of a data-dependent method's merge."""
        return get_method(self.method_name).statistics is not None

    @property
    def merged(self) -> list[Task]:
        """The tasks whose task vectors the coefficients weigh (every task but the controls)."""
        return [task for task in self.tasks if not task.control]

    def objective(self, table: np.ndarray) -> np.ndarray:
        """What the search sees of a metrics table: ``metric`` on each merged task."""
        columns = [index for index, task in enumerate(self.tasks) if not task.control]
        return np.asarray(table[METRICS.index(self.metric), columns], dtype=float)

    @property
    def fast(self) -> bool:
        """Whether candidates are ``base + lambda * C @ tau``: task arithmetic without normalising,
        or a data-dependent method over its shares."""
        plain = self.method_name == "task_arithmetic" and not self.params.get("normalize", False)
        return plain or self.shares

    @property
    def scale(self) -> float:
        """The method's ``lambda``."""
        return float(self.params.get("lambda", 1.0))

    def build(self, device: str | torch.device) -> MergeEvaluator:
        """The evaluator computing on ``device`` (``auto``, ``cpu``, ``cuda[:N]``)."""
        from m3sb.devices import resolve_device

        return MergeEvaluator(self, device if isinstance(device, torch.device) else resolve_device(device))

    def for_workers(self) -> MergeProblem:
        """A copy to ship to workers: on the task-arithmetic path they need the task models'
        heads only (backbones come from the flat vectors), so the backbones are left out."""
        if not self.fast:
            return self
        shipped = copy.copy(self)
        shipped.tasks = [dataclasses.replace(task, model=without_backbone(task.model)) for task in self.tasks]
        shipped.base = without_backbone(self.base)
        return shipped


def without_backbone(task: TaskModel) -> TaskModel:
    """A copy of ``task`` whose backbone tensors are one-element stand-ins of the right shape
    (``functional_call`` supplies the real ones); its own weights keep only the head."""
    backbone = task.backbone
    state = task.model.state_dict()  # the model's own dtypes (float32 after MergeProblem)
    heads = {name: tensor for name, tensor in state.items() if name not in backbone}
    stand_ins = {
        name: torch.zeros((), dtype=state[name].dtype).expand(t.shape) for name, t in backbone.items()
    }
    model = copy.deepcopy(task.model)
    model.load_state_dict({**heads, **stand_ins}, strict=True, assign=True)
    return dataclasses.replace(task, model=model, weights=heads)


class MergeEvaluator:
    """``evaluate(c) -> T metrics`` for MAP: merge with coefficients ``c``, score every task."""

    def __init__(self, problem: MergeProblem, device: torch.device) -> None:
        self.problem = problem
        self.device = device
        self.space = TaskVectorSpace(problem.flat, device)

    def backbone(self, coefficients: Sequence[float] | np.ndarray) -> dict[str, torch.Tensor]:
        """The candidate backbone for ``coefficients`` (views of a reused buffer on the fast path)."""
        problem = self.problem
        if problem.fast:
            return self.space.candidate(problem.scale * np.asarray(coefficients, dtype=float))
        return {name: tensor.to(self.device) for name, tensor in self.method_backbone(coefficients).items()}

    def method_backbone(self, coefficients: Sequence[float] | np.ndarray) -> dict[str, torch.Tensor]:
        """The merge by the problem's method itself, tensor by tensor on the CPU (what ``m3sb
        merge`` computes from the same recipe; not for data-dependent methods' shares)."""
        problem = self.problem
        return merged_backbone(
            problem.method_name,
            problem.params,
            list(coefficients),
            [task.model.weights for task in problem.merged],
            problem.base.backbone,
        )

    def score(self, backbone: Mapping[str, torch.Tensor]) -> np.ndarray:
        """Every metric of every task with ``backbone`` and each task's own head: a (metrics, tasks) table."""
        problem = self.problem
        return metrics_table(
            [
                task.evaluate(backbone, self.device, problem.batch_size, problem.autocast)
                for task in problem.tasks
            ]
        )

    def __call__(self, coefficients: np.ndarray) -> np.ndarray:
        """The search's metric on each merged task for the candidate merged with ``coefficients``."""
        return self.problem.objective(self.score(self.backbone(coefficients)))

    def run(self, item: np.ndarray | MethodMerge) -> list[np.ndarray] | np.ndarray:
        """An executor's item: the metrics tables of each row of a (k, T) array of coefficients,
        or of the merge a :class:`MethodMerge` names (every model at weight 1)."""
        if isinstance(item, MethodMerge):
            base, models = self.space.backbones()
            weights = list(item.weights) if item.weights is not None else [1.0] * len(models)
            merged = merged_backbone(item.method, item.params, weights, models, base)
            return self.score({name: tensor.to(self.device) for name, tensor in merged.items()})
        return list(self.tables(item))

    def evaluate_many(self, points: np.ndarray) -> Iterator[np.ndarray]:
        """The search's metrics of each row of ``points``, in order."""
        return (self.problem.objective(table) for table in self.tables(points))

    def tables(self, points: np.ndarray) -> Iterator[np.ndarray]:
        """The metrics table of each row of ``points``, in order.

        On the task-arithmetic path with ``candidates_per_pass`` > 1, that many candidates
        share each forward pass (vmap over their stacked backbones): worth it on a GPU;
        on a small CPU one candidate at a time is as fast.
        """
        problem = self.problem
        per_pass = problem.candidates_per_pass
        if not problem.fast or per_pass <= 1:
            yield from (self.score(self.backbone(point)) for point in points)
            return
        space = self.space

        def views(flat: torch.Tensor) -> dict[str, torch.Tensor]:
            return {**space.layout.views(flat), **space.fixed}

        for start in range(0, len(points), per_pass):
            chunk = problem.scale * np.asarray(points[start : start + per_pass], dtype=float)
            flats = space.candidates(chunk)
            per_task = [
                task.evaluate_candidates(flats, views, self.device, problem.batch_size, problem.autocast)
                for task in problem.tasks
            ]
            for row in range(len(chunk)):
                yield metrics_table([candidates[row] for candidates in per_task])
