"""``selected.yaml`` (the point a Pareto search selected) and ``best.yaml`` (an evolution's best
genome) as merge recipes that ``m3sb merge`` runs as they are: mergekit's schema, the chosen
coefficients as the models' weights."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any

import yaml

from m3sb.config import ParetoConfig

SELECTED_RECIPE = "selected.yaml"


def method_parameters(method_name: str, params: dict[str, Any]) -> dict[str, Any]:
    """The parameters a search merges with: the config's, and for a method that merges
    either weights or task vectors, task vectors unless the config says otherwise."""
    from m3sb.methods import get_method

    merged = dict(params)
    if get_method(method_name).space == "either":
        merged.setdefault("space", "task_vectors")
    return merged


def _per_model_lists(method_name: str, parameters: dict[str, Any]) -> list[str]:
    """The parameters given one value per model (a list): the search reads them per model,
    while a recipe reads a top-level list as a gradient over the layers."""
    from m3sb.methods import get_method

    method = get_method(method_name)
    return [
        name
        for name, value in parameters.items()
        if isinstance(value, list) and (param := method.param(name)) is not None and param.per_model
    ]


def _located(location: str) -> str:
    """A local checkpoint as an absolute path (the recipe is run from anywhere); a hub id as it is."""
    path = Path(location).expanduser()
    return str(path.resolve()) if path.exists() else location


def unrecipeable_reason(config: ParetoConfig, held_names: Collection[str] = ()) -> str | None:
    """Why no recipe reproduces the search's candidates (None when one does): a
    data-dependent method's coefficients scale shares of its merge, which no recipe states;
    a random-mask method (DARE, DELLA) seeds its masks by tensor name, so where the loaded
    backbone holds tensors (``held_names``) under names the checkpoint files do not, the
    recipe would drop other entries than the search did."""
    from m3sb.methods import get_method

    method = get_method(config.merge_method)
    if method.statistics is not None:
        return (
            f"merge_method '{config.merge_method}' is data-dependent: the coefficients scale each "
            "model's share of its merge, which a merge recipe cannot state"
        )
    differing = _differing_tensor(config.base_model, [task.model for task in config.merged_tasks])
    if differing is not None or "random_seed" not in {param.name for param in method.params}:
        return differing
    return _renamed_tensor(config.merge_method, config.base_model, held_names)


def _renamed_tensor(method: str, base: str, held_names: Collection[str]) -> str | None:
    """A held tensor name that the base checkpoint's files lack, said in a line; None when
    every name is the file's (or the base is not local)."""
    from m3sb.checkpoints import open_checkpoint

    path = Path(base).expanduser()
    if not held_names or not path.exists():
        return None
    stored = set(open_checkpoint(base).tensors)
    renamed = sorted(name for name in held_names if name not in stored)
    if not renamed:
        return None
    return (
        f"merge_method '{method}' seeds its random masks by tensor name, and the loaded model "
        f"holds '{renamed[0]}' (and {len(renamed) - 1} more) under names its files do not, so "
        "a recipe would drop other entries than the scored model; --save-model writes that model"
    )


def _differing_tensor(base: str, models: Sequence[str]) -> str | None:
    """A tensor whose shape differs between the checkpoints (task-specific heads: ``m3sb merge``
    would refuse it), said in a line; None when they line up or a checkpoint is not local."""
    from m3sb.checkpoints import open_checkpoint

    local = [Path(location).expanduser() for location in (base, *models)]
    if not all(path.exists() for path in local):
        return None  # a hub id: merging it says what is wrong, if anything
    seen = {name: (tuple(info.shape), base) for name, info in open_checkpoint(base).tensors.items()}
    for location in models:
        for name, info in open_checkpoint(location).tensors.items():
            shape, where = seen.setdefault(name, (tuple(info.shape), location))
            if tuple(info.shape) != shape:
                return (
                    f"tensor '{name}' has shape {list(info.shape)} in {location} but "
                    f"{list(shape)} in {where} (a task-specific head), so one merged "
                    "checkpoint cannot hold it; --save-model writes one model per task"
                )
    return None


def selected_recipe(
    config: ParetoConfig, coefficients: Sequence[float], out_dtype: str | None = None, comment: str = ""
) -> str:
    """The YAML recipe merging the search's task models with ``coefficients`` as their
    weights (one per merged task, in order), computed in float32 and written in
    ``out_dtype`` (float32 when None); ``comment`` lines head the file."""
    return merge_recipe(config, list(coefficients), None, out_dtype, comment)


def merge_recipe(
    config: ParetoConfig,
    weights: Sequence[float | Sequence[float]],
    density: float | Sequence[float] | None = None,
    out_dtype: str | None = None,
    comment: str = "",
) -> str:
    """The YAML recipe merging the config's task models by its method: each model at its
    ``weights`` entry (a number, or a gradient over the layers), with ``density`` (one for
    all, or one per model) where given, computed in float32 and written in ``out_dtype``
    (float32 when None); ``comment`` lines head the file."""
    tasks = config.merged_tasks
    if len(weights) != len(tasks):
        raise ValueError(f"{len(weights)} coefficients for {len(tasks)} merged tasks")
    per_model = isinstance(density, Sequence)
    models: list[dict[str, Any]] = []
    for index, (task, weight) in enumerate(zip(tasks, weights, strict=True)):
        own: dict[str, Any] = {
            "weight": [float(v) for v in weight] if isinstance(weight, Sequence) else float(weight)
        }
        if per_model:
            assert isinstance(density, Sequence)
            own["density"] = float(density[index])
        models.append({"model": _located(task.model), "parameters": own})
    recipe: dict[str, Any] = {
        "merge_method": config.merge_method,
        "base_model": _located(config.base_model),
        "models": models,
    }
    parameters = method_parameters(config.merge_method, config.parameters)
    if density is not None:
        parameters.pop("density", None)
        if not per_model:
            assert not isinstance(density, Sequence)
            parameters["density"] = float(density)
    for name in _per_model_lists(config.merge_method, parameters):  # a top-level list is a gradient
        for entry, value in zip(models, parameters.pop(name), strict=True):
            entry["parameters"][name] = value
    if parameters:
        recipe["parameters"] = parameters
    recipe["dtype"] = "float32"
    if out_dtype is not None and out_dtype != "float32":
        recipe["out_dtype"] = out_dtype
    header = "".join(f"# {line}\n" for line in comment.splitlines())
    return header + yaml.safe_dump(recipe, sort_keys=False)
