"""Every merge method that takes five models, ranked on the digits zoo and on the CLIP zoo.

Builds (or reuses) both embedded zoos under ``benchmarks/.work/methods``, merges their five
fine-tunes with each method at the settings of ``examples/clip_vit_b32/experiment.yaml``
(FusionBench's, where it has the method), scores every task on its test split, and prints
one table per zoo: mean accuracy, mean normalised accuracy (accuracy over the fine-tune's,
per task) and the gap to task arithmetic, best first::

    uv run python benchmarks/bench_methods.py
    uv run python benchmarks/bench_methods.py --zoo digits --methods tsv_m iso_c task_arithmetic
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

ROOT = Path(__file__).resolve().parents[1]
WORK = Path(__file__).resolve().parent / ".work" / "methods"
SETTINGS = ROOT / "examples" / "clip_vit_b32" / "experiment.yaml"


def method_settings(names: list[str] | None) -> dict[str, dict[str, Any]]:
    """The CLIP example's settings of every method (or of those named)."""
    import yaml

    configs: dict[str, dict[str, Any]] = yaml.safe_load(SETTINGS.read_text())["merge_configs"]
    if names:
        unknown = [name for name in names if name not in configs]
        if unknown:
            raise SystemExit(f"not in {SETTINGS.name}: {', '.join(unknown)}")
        return {name: configs[name] for name in names}
    return configs


def zoo_arguments(kind: str) -> dict[str, Any]:
    """The experiment arguments of a zoo: its fine-tunes, test splits and base."""
    if kind == "digits":
        from m3sb.zoo import build_zoo

        zoo = json.loads(build_zoo(WORK / "digits_zoo").read_text())
        datasets = [task["dataset"] for task in zoo["tasks"]]
    else:
        from m3sb.clip_zoo import build_clip_zoo

        zoo = json.loads(build_clip_zoo(WORK / "clip_zoo").read_text())
        datasets = [{**task["dataset"], "kind": "clip_zero_shot"} for task in zoo["tasks"]]
    return {
        "model_checkpoints": [task["checkpoint"] for task in zoo["tasks"]],
        "datasets_config": datasets,
        "base_model_checkpoint": zoo["base_model_checkpoint"],
        "device": "cpu",
        "cache_dir": str(WORK / "cache"),
    }


def rank(kind: str, methods: dict[str, dict[str, Any]]) -> tuple[list[dict[str, Any]], float]:
    """One row per method (after the fine-tunes and the base), best mean normalised accuracy
    first, and the seconds the experiment took."""
    from m3sb.experiment import Experiment

    started = time.perf_counter()
    table = Experiment(f"{kind} zoo", merge_configs=methods, **zoo_arguments(kind)).run()
    seconds = time.perf_counter() - started
    accuracy = table.pivot_table(index="merge_method", columns="dataset", values="accuracy")
    finetuned = accuracy.loc["finetuned"].to_dict()
    rows = [_row(name, accuracy.loc[name].to_dict(), finetuned) for name in ("finetuned", "base", *methods)]
    task_arithmetic = next((r["normalised"] for r in rows if r["method"] == "task_arithmetic"), None)
    for row in rows[2:]:
        row["versus"] = None if task_arithmetic is None else row["normalised"] - task_arithmetic
    return rows[:2] + sorted(rows[2:], key=lambda row: -row["normalised"]), seconds


def _row(name: str, scores: dict[str, float], finetuned: dict[str, float]) -> dict[str, Any]:
    normalised = [scores[task] / finetuned[task] for task in finetuned]  # both in percent
    return {
        "method": name,
        "accuracy": sum(scores.values()) / len(scores),  # the table's accuracies are percentages
        "normalised": 100 * sum(normalised) / len(normalised),
        "versus": None,
    }


def print_table(kind: str, rows: list[dict[str, Any]], seconds: float) -> None:
    """The ranking as a Markdown table."""
    print(f"\n{kind} zoo (5 tasks, test splits), best first; {seconds:.0f} s for the whole experiment")
    print("| rank | method | mean accuracy | mean normalised accuracy | vs task arithmetic |")
    print("|---|---|---|---|---|")
    for position, row in enumerate(rows):
        place = "-" if position < 2 else str(position - 1)
        versus = "-" if row["versus"] is None else f"{row['versus']:+.1f}"
        print(f"| {place} | {row['method']} | {row['accuracy']:.1f} | {row['normalised']:.1f} | {versus} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoo", choices=("digits", "clip", "both"), default="both")
    parser.add_argument("--methods", nargs="*", help="methods of the CLIP example to run (default: all)")
    arguments = parser.parse_args()
    methods = method_settings(arguments.methods)
    for kind in ("digits", "clip") if arguments.zoo == "both" else (arguments.zoo,):
        print_table(kind, *rank(kind, methods))


if __name__ == "__main__":
    main()
