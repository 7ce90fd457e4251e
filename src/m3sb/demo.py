"""``m3sb demo``: everything offline. First the merge engine: a toy Llama family merged with
every method. Then M3SB experiments on the digits zoo: full-weight and task-vector merges,
each task's classifier rebuilt and scored, a results table, figures and a report. Last,
MAP on the zoo: a two-task Pareto front and a nested search over all five tasks. Then the
CLIP zoo: vision towers fine-tuned against zero-shot heads, merged by MAP over three tasks.
Last, the text zoo: a tiny Llama's four skills merged, an experiment table and a MAP front
over two skills."""

from __future__ import annotations

import csv
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from m3sb.checkpoints import open_checkpoint
from m3sb.config import parse_merge_config
from m3sb.merge import merge_to_folder
from m3sb.toy import Family, make_family


def demo_recipes(family: Family) -> dict[str, dict[str, Any]]:
    """One merge config per method (and per space where it applies), on the toy family."""
    models = [str(path) for path in family.models]
    base = str(family.base)
    plain = [{"model": model} for model in models]
    weighted = [{"model": model, "parameters": {"weight": 1.0}} for model in models]
    sparse = [{"model": model, "parameters": {"weight": 1.0, "density": 0.5}} for model in models]
    return {
        "linear": {"merge_method": "linear", "models": weighted},
        "linear (task vectors)": {
            "merge_method": "linear",
            "models": weighted,
            "base_model": base,
            "parameters": {"space": "task_vectors"},
        },
        "task_arithmetic": {
            "merge_method": "task_arithmetic",
            "models": weighted,
            "base_model": base,
            "parameters": {"lambda": 1.0 / len(models)},
        },
        "ties": {"merge_method": "ties", "models": sparse, "base_model": base},
        "dare_linear": {
            "merge_method": "dare_linear",
            "models": sparse,
            "base_model": base,
            "parameters": {"normalize": True},
        },
        "dare_ties": {
            "merge_method": "dare_ties",
            "models": sparse,
            "base_model": base,
            "parameters": {"normalize": True},
        },
        "breadcrumbs": {
            "merge_method": "breadcrumbs",
            "models": weighted,
            "base_model": base,
            "parameters": {"normalize": True},
        },
        "model_stock": {"merge_method": "model_stock", "models": plain, "base_model": base},
        "slerp (first two)": {"merge_method": "slerp", "models": plain[:2], "parameters": {"t": 0.5}},
        "pairwise_slerp": {"merge_method": "pairwise_slerp", "models": weighted},
        "barycenter": {"merge_method": "barycenter", "models": weighted},
        "barycenter (task vectors)": {
            "merge_method": "barycenter",
            "models": weighted,
            "base_model": base,
            "parameters": {"space": "task_vectors"},
        },
        "karcher (base as a point)": {"merge_method": "karcher", "models": weighted, "base_model": base},
    }


def _flat(path: Path) -> torch.Tensor:
    checkpoint = open_checkpoint(path)
    return torch.cat([checkpoint.load(name).double().reshape(-1) for name in checkpoint.tensors])


DEMO_METHODS: dict[str, dict[str, Any]] = {
    "linear": {},
    "pairwise_slerp": {},
    "barycenter": {},
    "barycenter_seed": {},  # the seed's published loop, beside the exact barycenter
    "task_arithmetic": {"lambda": 0.3},
    "ties": {"density": 0.2},
    "dare_ties": {"density": 0.3, "lambda": 0.5},
    "tsv_m": {},
    "iso_c": {},
    "wudi": {},
    "regmean": {},  # the data-dependent ones: statistics from 64 training examples per model
    "regmean_plusplus": {},
    "fisher": {},
}
DATA_DEPENDENT = ("regmean", "regmean_plusplus", "fisher")  # the same in both spaces: run once


def run_demo(out: Path, console: Console | None = None, device: str = "auto") -> Any:
    """The merge engine on toy Llamas, M3SB experiments on the digits zoo, then MAP on the zoo
    (evaluations on ``device``)."""
    from m3sb.devices import resolve_device

    resolve_device(device)
    out = Path(out)
    merge_engine_demo(out, console)
    results = experiments_demo(out, console, device)
    pareto_demo(out, console, device)
    clip_demo(out, console, device)
    text_demo(out, console, device)
    return results


TEXT_DEMO_METHODS: dict[str, dict[str, Any]] = {
    "linear": {},
    "task_arithmetic": {"lambda": 0.5},
    "ties": {"density": 0.3},
    "barycenter": {},
}
TEXT_DEMO_FRONT = ("reverse", "sort")


def text_demo(out: Path, console: Console | None = None, device: str = "auto") -> Any:
    """Language models: the text zoo's four skills merged every demo way and scored by exact
    match, then MAP over two skills."""
    import json

    from m3sb.experiment import TaskVectorExperiment
    from m3sb.report import print_results
    from m3sb.text_zoo import build_text_zoo

    def say(line: str) -> None:
        if console is not None:
            console.print(line, highlight=False, markup=False)

    say("building (or reusing) the text zoo: a tiny Llama and four skills ...")
    zoo = json.loads(build_text_zoo(out / "text_zoo", log=say).read_text())
    experiment = TaskVectorExperiment(
        "text zoo",
        [task["checkpoint"] for task in zoo["tasks"]],
        [task["dataset"] for task in zoo["tasks"]],
        TEXT_DEMO_METHODS,
        zoo["base_model_checkpoint"],
        device=device,
        cache_dir=str(out / "cache"),
    )
    results = experiment.run()
    if console is not None:
        print_results(results, console)
    tasks = [
        {
            "name": task["name"],
            "model": task["checkpoint"],
            "kind": "causal_lm",
            "dataset": {**task["dataset"], "split": "validation"},
        }
        for task in zoo["tasks"]
        if task["name"] in TEXT_DEMO_FRONT
    ]
    say(f"MAP on the text zoo over {', '.join(TEXT_DEMO_FRONT)} (exact match), every skill weighing the same")
    equal_preference_search(zoo, tasks, out, "text", console, device)
    return results


def equal_preference_search(
    zoo: dict[str, Any],
    tasks: list[dict[str, Any]],
    out: Path,
    name: str,
    console: Console | None,
    device: str,
) -> Any:
    """MAP over ``tasks`` of a zoo, every task weighing the same, into ``out/pareto/name``; printed."""
    from m3sb.config import ParetoConfig
    from m3sb.pareto.report import print_outcome
    from m3sb.pareto.run import run_pareto

    config = ParetoConfig.model_validate(
        {"base_model": zoo["base_model_checkpoint"], "tasks": tasks, "cache_dir": str(out / "cache")}
    )
    outcome = run_pareto(config, out / "pareto" / name, preference=[1.0] * len(tasks), device=device)
    if console is not None:
        print_outcome(outcome, console)
    return outcome


CLIP_DEMO_TASKS = ("rotated", "mirrored", "parity")


def clip_demo(out: Path, console: Console | None = None, device: str = "auto") -> Any:
    """MAP over three tasks of the CLIP zoo (zero-shot heads from the base's text tower)."""
    import json

    from m3sb.clip_zoo import build_clip_zoo

    def say(line: str) -> None:
        if console is not None:
            console.print(line, highlight=False, markup=False)

    say("building (or reusing) the CLIP zoo: a tiny CLIP and vision-only fine-tunes ...")
    zoo = json.loads(build_clip_zoo(out / "clip_zoo", log=say).read_text())
    tasks = [
        {
            "name": task["name"],
            "model": task["checkpoint"],
            "kind": "clip_zero_shot",
            "dataset": {**task["dataset"], "split": "validation", "max_samples": PARETO_SAMPLES},
        }
        for task in zoo["tasks"]
        if task["name"] in CLIP_DEMO_TASKS
    ]
    say(f"MAP on the CLIP zoo over {', '.join(CLIP_DEMO_TASKS)}, every task weighing the same")
    return equal_preference_search(zoo, tasks, out, "clip", console, device)


PARETO_SAMPLES = 200  # validation images per task and evaluation in the demo's searches


def pareto_demo(out: Path, console: Console | None = None, device: str = "auto") -> list[Any]:
    """A two-task front (with a 5 x 5 ground-truth grid) and nested MAP over every zoo task.

    Both runs are resumable: a second demo reuses their ``evaluations.csv``.
    """
    import json

    from m3sb.config import ParetoConfig
    from m3sb.pareto.report import print_outcome
    from m3sb.pareto.run import run_pareto
    from m3sb.zoo import build_zoo

    def say(line: str) -> None:
        if console is not None:
            console.print(line, highlight=False, markup=False)

    zoo = json.loads(build_zoo(out / "zoo", log=say).read_text())
    tasks = [
        {
            "name": task["name"],
            "model": task["checkpoint"],
            "dataset": {**task["dataset"], "split": "validation", "max_samples": PARETO_SAMPLES},
        }
        for task in zoo["tasks"]
    ]
    base = zoo["base_model_checkpoint"]
    outcomes = []
    say("MAP: the front between rotated and mirrored digits (12 evaluations, plus a 5 x 5 grid to compare)")
    cache = str(out / "cache")
    pair = ParetoConfig.model_validate({"base_model": base, "tasks": tasks[:2], "cache_dir": cache})
    outcomes.append(
        run_pareto(pair, out / "pareto" / "two_tasks", preference=[1.0, 1.0], grid_points=5, device=device)
    )
    say(f"MAP nested over all {len(tasks)} tasks, every task weighing the same")
    every = ParetoConfig.model_validate({"base_model": base, "tasks": tasks, "cache_dir": cache})
    outcomes.append(
        run_pareto(
            every, out / "pareto" / "nested", mode="nested", preference=[1.0] * len(tasks), device=device
        )
    )
    if console is not None:
        for outcome in outcomes:
            print_outcome(outcome, console)
    return outcomes


def experiments_demo(out: Path, console: Console | None = None, device: str = "auto") -> Any:
    """Full-weight and task-vector experiments with every demo method on the digits zoo."""
    import json

    import pandas as pd
    import yaml

    from m3sb.experiment import BASE, FINETUNED, Experiment, TaskVectorExperiment
    from m3sb.report import print_results, write_figures, write_report, write_results
    from m3sb.zoo import build_zoo

    def say(line: str) -> None:
        if console is not None:
            console.print(line, highlight=False)

    say("building (or reusing) the digits zoo ...")
    zoo = json.loads(build_zoo(out / "zoo", log=say).read_text())
    arguments = {
        "model_checkpoints": [task["checkpoint"] for task in zoo["tasks"]],
        "datasets_config": [task["dataset"] for task in zoo["tasks"]],
        "merge_configs": DEMO_METHODS,
        "base_model_checkpoint": zoo["base_model_checkpoint"],
        "device": device,
        "cache_dir": str(out / "cache"),
    }
    full = Experiment("digits zoo", **arguments, statistics={"samples": 64})
    in_task_vectors = {k: v for k, v in DEMO_METHODS.items() if k not in DATA_DEPENDENT}
    task_vectors = TaskVectorExperiment("digits zoo", **(arguments | {"merge_configs": in_task_vectors}))
    tables = [full.run(), task_vectors.run()]
    merged_in_both = tables[1]["merge_method"].isin([FINETUNED, BASE])
    tables[1] = tables[1][~merged_in_both].assign(merge_method=lambda t: t["merge_method"] + " (tv)")
    results = pd.concat(tables, ignore_index=True)
    points = dict(full.points) | {
        f"{k} (tv)": v for k, v in task_vectors.points.items() if k in in_task_vectors
    }
    kinds = dict(full.point_kinds) | {f"{k} (tv)": "merge" for k in in_task_vectors}
    write_results(results, out)
    figures = write_figures(results, points, kinds, out)
    configuration = yaml.safe_dump(arguments | {"task_vectors": "both (tv rows)"}, sort_keys=False)
    report = write_report(results, figures, configuration, out, points=points, kinds=kinds)
    if console is not None:
        print_results(results, console)
        console.print(f"results.csv, figures and {report} are in {out}", highlight=False)
    return results


def merge_engine_demo(out: Path, console: Console | None = None) -> list[dict[str, Any]]:
    """Build the toy family under ``out``, merge it every way, and return (and print) a summary."""
    out = Path(out)
    family = make_family(out / "models")
    references = {"base": _flat(family.base)} | {
        f"finetune-{i}": _flat(path) for i, path in enumerate(family.models)
    }
    rows = []
    for label, recipe in demo_recipes(family).items():
        config = parse_merge_config(recipe, source=label)
        folder = (
            out / "merges" / label.split(" ")[0]
            if "(" not in label
            else out / "merges" / label.replace(" ", "_").replace("(", "").replace(")", "")
        )
        started = time.perf_counter()
        merge_to_folder(config, folder, force=True)
        seconds = time.perf_counter() - started
        merged = _flat(folder)
        row: dict[str, Any] = {"method": label, "seconds": round(seconds, 3)}
        for name, reference in references.items():
            row[name] = round(float((merged - reference).norm() / reference.norm()), 5)
        rows.append(row)
    with open(out / "merges.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    if console is not None:
        table = Table(title="m3sb demo: three toy fine-tunes of a tiny Llama, merged every way")
        table.caption = "columns after 'seconds': relative distance ||merged - model|| / ||model||"
        for column in rows[0]:
            table.add_column(column, justify="left" if column == "method" else "right")
        for row in rows:
            table.add_row(*(str(value) for value in row.values()))
        console.print(table)
        console.print(f"toy models, merges and merges.csv are in {out}")
    return rows
