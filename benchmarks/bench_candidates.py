"""How fast MAP's evaluations go: candidates per second, and the cost of building one.

Part 1 (``--part throughput``): on the digits zoo (built once in ``--workdir``), the same
random coefficient vectors are evaluated over every task's validation images

* one at a time (``candidates_per_pass: 1``),
* batched: k candidates share each forward pass (``vmap`` over stacked backbones),
* on Ray with two CPU workers (when ray is installed and the device is the CPU),

and the table gives candidates per second, with the largest difference of any metric
from the one-at-a-time results (0 means bit-identical).

Part 2 (``--part build``): the time to build a candidate ``base + sum_i c_i tau_i``
(everything but the forward passes) for T task vectors of P float32 parameters,
against the memory-bandwidth floor of reading the T + 1 flat buffers once and writing
the candidate, with the bandwidth measured by a large copy on the same device.

Usage (from the repository root)::

    uv run python benchmarks/bench_candidates.py
    uv run python benchmarks/bench_candidates.py --device cuda --part build
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

WORKDIR = Path(__file__).parent / ".work" / "candidates"


def _time(action: Callable[[], Any], device: torch.device, repeat: int) -> float:
    """Median seconds of ``action`` over ``repeat`` runs, after one warm-up."""
    action()
    times = []
    for _ in range(repeat):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        action()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def load_zoo_problem(workdir: Path, samples: int, tasks: int) -> Any:
    """The zoo's MergeProblem (accuracy) over its first ``tasks`` tasks."""
    from m3sb.config import ParetoConfig
    from m3sb.pareto.run import load_problem
    from m3sb.zoo import build_zoo

    zoo = json.loads(build_zoo(workdir / "zoo").read_text())
    config = ParetoConfig.model_validate(
        {
            "base_model": zoo["base_model_checkpoint"],
            "tasks": [
                {
                    "name": t["name"],
                    "model": t["checkpoint"],
                    "dataset": {**t["dataset"], "max_samples": samples},
                }
                for t in zoo["tasks"][:tasks]
            ],
        }
    )
    return load_problem(config, lambda _: None)


def throughput(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Candidates per second on the zoo, one at a time, batched, and on Ray."""
    import dataclasses

    from m3sb.executors import LocalExecutor, RayExecutor
    from m3sb.pareto.run import PoolEvaluator

    problem = load_zoo_problem(args.workdir, args.samples, args.tasks)
    points = np.random.default_rng(0).uniform(0.0, 1.0, size=(args.candidates, args.tasks))
    setups: list[tuple[str, Any, Callable[[], Any]]] = []
    for per_pass in [1, *args.batch]:
        variant = dataclasses.replace(problem, candidates_per_pass=per_pass)
        variant.flat = problem.flat
        label = "one at a time" if per_pass == 1 else f"batched, {per_pass} per pass"
        setups.append((label, variant, lambda v=variant: LocalExecutor(v, args.device)))
        if args.device.startswith("cuda") and per_pass == max(args.batch):
            half = dataclasses.replace(variant, autocast="bfloat16")
            half.flat = problem.flat
            setups.append((f"{label}, bf16 autocast", half, lambda v=half: LocalExecutor(v, args.device)))
    if args.ray and args.device == "cpu":
        try:
            import ray  # noqa: F401

            shipped = problem.for_workers()
            setups.append(("Ray, 2 CPU workers", problem, lambda: RayExecutor(shipped, "cpu", num_cpus=2)))
        except ImportError:
            print("ray is not installed: skipping the Ray row", file=sys.stderr)
    rows, reference = [], None
    for label, variant, open_pool in setups:
        started = time.perf_counter()
        with open_pool() as pool:
            ready = time.perf_counter() - started
            evaluator = PoolEvaluator(pool, variant.candidates_per_pass)
            list(evaluator.evaluate_many(points[:2]))  # warm-up (and actors' first calls)
            start = time.perf_counter()
            results = np.stack(list(evaluator.evaluate_many(points)))
            seconds = time.perf_counter() - start
        reference = results if reference is None else reference
        rows.append(
            {
                "setup": label,
                "candidates/s": len(points) / seconds,
                "ms/candidate": 1e3 * seconds / len(points),
                "start (s)": ready,
                "max |diff| vs one at a time": float(np.abs(results - reference).max()),
            }
        )
        print(f"  {label}: {len(points) / seconds:.1f} candidates/s", file=sys.stderr)
    return rows


def copy_bandwidth(device: torch.device, size: int = 512 * 2**20) -> float:
    """Bytes per second read and written by a large device-to-device copy."""
    source = torch.empty(size // 4, device=device)
    target = torch.empty_like(source)
    return 2 * size / _time(lambda: target.copy_(source), device, 10)


def build_overhead(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Time to build one candidate against the bandwidth floor, for several sizes."""
    from m3sb.pareto.merging import FlatTaskVectors, Layout, TaskVectorSpace

    device = torch.device(args.device)
    bandwidth = copy_bandwidth(device)
    rows = []
    for tasks in args.build_tasks:
        for params in args.build_params:
            names = ("w",)
            layout = Layout(names, (torch.Size([params]),), (0, params))
            rng = np.random.default_rng(0)
            flat = FlatTaskVectors(
                layout,
                rng.standard_normal(params, dtype=np.float32),
                rng.standard_normal((tasks, params), dtype=np.float32),
                {},
            )
            space = TaskVectorSpace(flat, device)
            coefficients = rng.uniform(0, 1, tasks)
            seconds = _time(lambda s=space, c=coefficients: s.candidate(c), device, args.repeat)
            moved = (tasks + 2) * params * 4  # read the base and T vectors, write the candidate
            floor = moved / bandwidth
            rows.append(
                {
                    "T": tasks,
                    "P (params)": f"{params / 1e6:g}M",
                    "bytes moved": f"{moved / 2**30:.2f} GiB",
                    "build (ms)": 1e3 * seconds,
                    "floor (ms)": 1e3 * floor,
                    "build / floor": seconds / floor,
                }
            )
            del space, flat
            if device.type == "cuda":
                torch.cuda.empty_cache()
    print(f"  measured copy bandwidth: {bandwidth / 1e9:.1f} GB/s (read + write)", file=sys.stderr)
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    """The rows as a markdown table (floats with 3 significant digits)."""
    header = list(rows[0])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [f"{value:.3g}" if isinstance(value, float) else str(value) for value in row.values()]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--part", choices=["throughput", "build", "both"], default="both")
    parser.add_argument("--workdir", type=Path, default=WORKDIR)
    parser.add_argument("--tasks", type=int, default=5, help="zoo tasks (T)")
    parser.add_argument("--samples", type=int, default=200, help="validation images per task")
    parser.add_argument("--candidates", type=int, default=32)
    parser.add_argument("--batch", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--no-ray", dest="ray", action="store_false")
    parser.add_argument("--build-tasks", type=int, nargs="+", default=[2, 8])
    parser.add_argument("--build-params", type=int, nargs="+", default=[200_000, 22_000_000, 86_000_000])
    parser.add_argument("--repeat", type=int, default=10)
    args = parser.parse_args()
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    device = torch.device(args.device)
    machine = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"
    )
    print(f"device: {args.device} ({machine}); torch {torch.__version__}; {torch.get_num_threads()} threads")
    if args.part in ("throughput", "both"):
        print(f"\n### Candidates per second on the zoo (T={args.tasks}, {args.samples} images per task)\n")
        print(markdown(throughput(args)))
    if args.part in ("build", "both"):
        print("\n### Building a candidate vs the memory-bandwidth floor\n")
        print(markdown(build_overhead(args)))


if __name__ == "__main__":
    main()
