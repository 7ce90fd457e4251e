"""Language-model evaluation throughput on the text zoo: tokens per second, one candidate at
a time and several candidates per call (as MAP's ``candidates_per_pass`` asks).

Builds (or reuses) the text zoo under ``benchmarks/.work/text_zoo``, tokenises the four
skills' test splits once (exact match: prompt and answer), then times evaluations of the
``reverse`` fine-tune's architecture over all four splits at several batch sizes. A token
is one position of a prompt or answer the model reads (padding not counted)::

    uv run python benchmarks/bench_text.py
    uv run python benchmarks/bench_text.py --batch-sizes 32 150 --candidates 4 --repeat 5
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

WORK = Path(__file__).resolve().parent / ".work"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 64, 150])
    parser.add_argument("--candidates", type=int, default=4, help="candidates per evaluate_candidates call")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per case (best is reported)")
    args = parser.parse_args()

    import torch

    from m3sb.pareto.merging import Layout
    from m3sb.tasks.causal_lm import PAD, evaluate, evaluate_candidates, load_task_model, prepare
    from m3sb.tasks.data import DatasetSpec
    from m3sb.text_zoo import build_text_zoo

    zoo = json.loads(build_text_zoo(WORK / "text_zoo", log=print).read_text())
    task = load_task_model(zoo["tasks"][1]["checkpoint"])
    base = load_task_model(zoo["base_model_checkpoint"], with_processor=False)
    splits = []
    for entry in zoo["tasks"]:
        spec = DatasetSpec(dataset_name=entry["dataset"]["dataset_name"], split="test", format="exact_match")
        splits.append(prepare(spec, task, WORK / "text_cache"))
    tokens = sum(int((split.values()[:, :, 1] != PAD).sum()) for split in splits)
    layout = Layout.of(base.backbone)
    cpu = torch.device("cpu")
    flat_base = layout.flatten(base.backbone, cpu)
    vector = layout.flatten(task.backbone, cpu) - flat_base
    flats = torch.stack([flat_base + c * vector for c in torch.linspace(0.25, 1.0, args.candidates)])

    print(
        f"machine: {os.cpu_count()} CPUs ({platform.processor() or platform.machine()}), "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    print(
        f"model: {sum(t.numel() for t in base.backbone.values()):,} parameters; "
        f"{sum(s.count for s in splits)} examples, {tokens:,} tokens per evaluation of the four splits"
    )
    print(
        f"| batch size | one candidate: s | tokens/s | {args.candidates} candidates per call: s | tokens/s |"
    )
    print("|---|---|---|---|---|")
    for batch_size in args.batch_sizes:
        single, several = [], []
        for _ in range(args.repeat):
            started = time.perf_counter()
            for split in splits:
                evaluate(task, layout.views(flats[-1]), split, cpu, batch_size)
            single.append(time.perf_counter() - started)
            started = time.perf_counter()
            for split in splits:
                evaluate_candidates(task, flats, layout.views, split, cpu, batch_size)
            several.append(time.perf_counter() - started)
        one, many = min(single), min(several)
        print(
            f"| {batch_size} | {one:.3f} | {tokens / one:,.0f} | {many:.3f} | "
            f"{args.candidates * tokens / many:,.0f} |"
        )


if __name__ == "__main__":
    main()
