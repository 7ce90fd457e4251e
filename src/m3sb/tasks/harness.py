"""lm-evaluation-harness tasks (kind ``lm_eval``; the optional extra ``m3sb[lm-eval]``).

``dataset_name`` names an lm-eval task (``hellaswag``) or a task YAML file (its folder is
added to lm-eval's task search path, so a local task over local files runs offline).
``metric`` is lm-eval's result key (``acc,none``, as mergekit-evolve writes it; the
default), ``num_fewshot`` its shot count, ``max_samples`` its ``limit`` and
``chat_template`` its ``apply_chat_template``. The merged model is handed to lm-eval's
Python API in memory: the candidate's weights are loaded into the task's model, wrapped
in lm-eval's ``HFLM``, evaluated by ``simple_evaluate``, then the model's own weights are
restored. ``accuracy`` is the metric in percent (lm-eval's fractions times 100); the other
metrics of the table are not measured (NaN). A task lm-eval does not know, or a metric
the task does not compute, is an error before any evaluation.
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import math
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from m3sb.errors import ConfigError, first_line
from m3sb.tasks import causal_lm
from m3sb.tasks.cache import CachedSplit
from m3sb.tasks.data import DataError, DatasetSpec
from m3sb.tasks.model import TaskModel

KIND = "lm_eval"
DEFAULT_METRIC = "acc,none"
load_task_model = causal_lm.load_task_model
logits_function = causal_lm.logits_function


@dataclass(frozen=True)
class HarnessSplit(CachedSplit):
    """An lm-eval task as a split: what ``simple_evaluate`` is asked (``labels`` holds one
    entry per evaluated document, so ``count`` is their number)."""

    task_name: str = ""
    include_path: str | None = None
    metric: str = DEFAULT_METRIC
    limit: int | None = None
    num_fewshot: int | None = None
    chat_template: bool = False


def _import_harness() -> Any:
    try:
        import lm_eval
    except ImportError:
        raise ConfigError("kind lm_eval needs lm-evaluation-harness: pip install 'm3sb[lm-eval]'") from None
    return lm_eval


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """lm-eval's logging and progress bars silenced."""
    names = ("lm_eval", "lm-eval")
    levels = {name: logging.getLogger(name).level for name in names}
    for name in names:
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


_TASK_KEY = re.compile(r"^task:[ \t]*['\"]?([^'\"#\s]+)", re.MULTILINE)


def task_location(dataset_name: str) -> tuple[str, str | None]:
    """(task name, folder to include) for a task name or a task YAML file."""
    path = Path(dataset_name).expanduser()
    if path.suffix.lower() in (".yaml", ".yml"):
        if not path.is_file():
            raise DataError(f"{dataset_name}: no such lm-eval task file")
        found = _TASK_KEY.search(path.read_text(encoding="utf-8"))
        if found is None:
            raise DataError(f"{dataset_name}: the lm-eval task file has no 'task:' name")
        return found.group(1), str(path.resolve().parent)
    return dataset_name, None


@functools.cache
def _task_manager(include_path: str | None) -> Any:
    """lm-eval's task index (seconds to build: built once per folder and process)."""
    from lm_eval.tasks import TaskManager

    with _quiet():
        return TaskManager(include_path=include_path)


def _known_metrics(task: Any) -> list[str]:
    """``metric,filter`` keys the task reports."""
    metrics = list(getattr(task, "_metric_fn_list", {}) or {})
    filters = [getattr(f, "name", "none") for f in getattr(task, "_filters", [])] or ["none"]
    return [f"{metric},{name}" for metric in metrics for name in filters]


def prepare(
    spec: DatasetSpec,
    task: TaskModel,
    cache_dir: str | Path | None = None,
    workers: int | None = None,
    log: Callable[[str], None] | None = None,
) -> CachedSplit:
    """The lm-eval task checked (it exists, computes the metric) and counted, before any evaluation."""
    del cache_dir, workers
    _import_harness()
    causal_lm.check_chat_template(task.processor, bool(spec.chat_template), task.checkpoint)
    name, include = task_location(spec.dataset_name)
    manager = _task_manager(include)
    if name not in manager.all_tasks:
        raise DataError(f"{spec.dataset_name}: lm-eval has no task '{name}'")
    say = log or (lambda _: None)
    say(f"loading lm-eval task {name}")
    try:
        with _quiet():
            found = manager.load([name])
    except Exception as error:  # noqa: BLE001 (any loading failure becomes one line)
        raise DataError(
            f"{spec.dataset_name}: cannot load lm-eval task '{name}' ({first_line(error)[:200]})"
        ) from None
    if found["groups"] or list(found["tasks"]) != [name]:
        raise DataError(f"{spec.dataset_name}: '{name}' is a group of lm-eval tasks; name one task")
    loaded = found["tasks"][name]
    metric = spec.metric or DEFAULT_METRIC
    known = _known_metrics(loaded)
    if known and metric not in known:
        raise DataError(f"{spec.dataset_name}: task '{name}' reports {', '.join(known)}, not '{metric}'")
    documents = len(loaded.eval_docs)
    count = documents if spec.max_samples is None else min(documents, spec.max_samples)
    return HarnessSplit(
        Path(include or "."),
        (),
        "",
        torch.zeros(count, dtype=torch.int64),
        0,
        task_name=name,
        include_path=include,
        metric=metric,
        limit=spec.max_samples,
        num_fewshot=spec.num_fewshot,
        chat_template=bool(spec.chat_template),
    )


def dataset_label(spec: DatasetSpec) -> str:
    """The lm-eval task's name."""
    return task_location(spec.dataset_name)[0]


def evaluate(
    task: TaskModel,
    backbone: Mapping[str, torch.Tensor] | None,
    data: CachedSplit,
    device: torch.device,
    batch_size: int = 256,
    autocast_dtype: str = "none",
) -> dict[str, float]:
    """The lm-eval metric of the model with ``backbone`` (its own weights when None), in memory."""
    del autocast_dtype
    assert isinstance(data, HarnessSplit)
    _import_harness()
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    try:
        model = task.use_backbone(backbone).to(device)
        with _quiet():
            wrapped = HFLM(pretrained=model, tokenizer=task.processor, batch_size=batch_size)
            results = simple_evaluate(
                model=wrapped,
                tasks=[data.task_name],
                task_manager=_task_manager(data.include_path),
                num_fewshot=data.num_fewshot,
                limit=data.limit,
                log_samples=False,
                bootstrap_iters=0,
                apply_chat_template=data.chat_template,
                random_seed=None,  # lm-eval would reseed Python's, NumPy's and torch's generators
                numpy_random_seed=None,
                torch_random_seed=None,
            )
    finally:
        task.use_backbone(None)
    scores = (results or {}).get("results", {}).get(data.task_name, {})
    if data.metric not in scores:
        reported = ", ".join(key for key in scores if "," in key and "stderr" not in key)
        raise DataError(
            f"lm-eval task '{data.task_name}' reported {reported or 'nothing'}, not '{data.metric}'"
        )
    value = float(scores[data.metric])
    return {
        "accuracy": 100.0 * value,
        "precision": math.nan,
        "recall": math.nan,
        "f1_score": math.nan,
        "loss": math.nan,
    }


def evaluate_candidates(
    task: TaskModel,
    flats: torch.Tensor,
    views: Callable[[torch.Tensor], dict[str, torch.Tensor]],
    data: CachedSplit,
    device: torch.device,
    batch_size: int = 256,
    autocast_dtype: str = "none",
) -> list[dict[str, float]]:
    """The lm-eval metric for each of B candidates (rows of ``flats``), one after another."""
    return [evaluate(task, views(flat), data, device, batch_size, autocast_dtype) for flat in flats]
