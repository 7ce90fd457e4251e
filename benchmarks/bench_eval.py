"""Evaluation at real scale: peak memory and seconds per evaluation, in-memory path vs streamed cache.

Builds image-classification splits of 224x224 RGB JPEG images (1k, 6k and 25k by default)
and a small ViT, then, each case in a fresh process:

- ``in-memory``: what m3sb did before the task layer: decode every image, run the
  processor over the whole split into one float32 tensor, predict in batches;
- ``streamed``: ``m3sb.tasks.image_classification.prepare`` (DataLoader workers, the
  on-disk cache; the first run builds it) then ``evaluate`` streaming from the cache.

It then runs the M3SB seed's shape, three tasks of 6,000 images each (``--seed-split``),
streamed, and times evaluations on the digits zoo (5 tiny splits), old path vs new. Prints a
table; ``--sizes`` and ``--skip-memory-over`` choose the cases (the in-memory path is not
run where its projected memory exceeds the limit)::

    uv run python benchmarks/bench_eval.py
    uv run python benchmarks/bench_eval.py --sizes 1000 6000
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

WORK = Path(__file__).resolve().parent / ".work" / "eval"
IMAGE_BYTES = 224 * 224 * 3 * 4  # one decoded, preprocessed float32 image


def _jpeg(seed: int) -> bytes:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    small = Image.fromarray(rng.integers(0, 256, (14, 14, 3), dtype=np.uint8), mode="RGB")
    picture = small.resize((224, 224), Image.Resampling.BILINEAR)
    buffer = io.BytesIO()
    picture.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def build_split(rows: int, variant: int = 0) -> Path:
    """A saved ``datasets`` split of ``rows`` 224x224 JPEG images (500 distinct ones, cycled;
    each ``variant`` draws other images)."""
    from datasets import ClassLabel, Dataset, DatasetDict, Features, Image

    folder = WORK / f"data-{rows}-{variant}"
    if (folder / "dataset_dict.json").is_file():
        return folder
    pool = [_jpeg(1000 * variant + seed) for seed in range(500)]

    def rows_of() -> Any:
        for index in range(rows):
            yield {"image": {"bytes": pool[index % len(pool)], "path": None}, "label": index % 10}

    features = Features({"image": Image(), "label": ClassLabel(num_classes=10)})
    split = Dataset.from_generator(rows_of, features=features)
    DatasetDict({"test": split}).save_to_disk(str(folder))
    return folder


def build_model() -> Path:
    """A small ViT for 224x224 RGB images (patch 16, hidden 64, 2 layers) and its processor."""
    import torch
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    folder = WORK / "vit-small"
    if (folder / "config.json").is_file():
        return folder
    torch.manual_seed(0)
    config = ViTConfig(
        image_size=224,
        patch_size=16,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        num_labels=10,
    )
    ViTForImageClassification(config).save_pretrained(folder)
    ViTImageProcessor(size={"height": 224, "width": 224}).save_pretrained(folder)
    return folder


def _peak_mb() -> tuple[float, float]:
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return own, children


def run_in_memory(data: str, model: str, evaluations: int) -> dict[str, Any]:
    """The old path: every image decoded and preprocessed into one tensor, then predicted in batches."""
    import datasets
    import torch

    from m3sb.tasks.image_classification import load_task_model
    from m3sb.tasks.metrics import classification_metrics

    task = load_task_model(model)
    started = time.perf_counter()
    split = datasets.load_from_disk(data)["test"]
    labels = torch.tensor(split["label"])
    pictures = [row["image"].convert("RGB") for row in split.with_format(None)]
    pixels = task.processor(images=pictures, return_tensors="pt")["pixel_values"]
    del pictures
    prepared = time.perf_counter() - started
    seconds = []
    for _ in range(evaluations):
        started = time.perf_counter()
        with torch.inference_mode():
            predictions = torch.cat(
                [
                    task.model(pixel_values=pixels[i : i + 256]).logits.argmax(-1)
                    for i in range(0, len(pixels), 256)
                ]
            )
        accuracy = classification_metrics(predictions, labels)["accuracy"]
        seconds.append(time.perf_counter() - started)
    return _result(prepared, seconds, accuracy)


def run_streamed(datas: list[str], model: str, evaluations: int, cache_dir: str) -> dict[str, Any]:
    """The task layer: each split preprocessed once into the cache (in workers), then all of
    them evaluated in turn streaming from it (three splits: the M3SB seed's shape)."""
    import torch

    from m3sb.tasks.data import DatasetSpec
    from m3sb.tasks.image_classification import evaluate, load_task_model, prepare

    task = load_task_model(model)
    specs = [DatasetSpec(dataset_name=data, split="test") for data in datas]
    started = time.perf_counter()
    splits = [prepare(spec, task, cache_dir) for spec in specs]
    prepared = time.perf_counter() - started
    started = time.perf_counter()
    for spec in specs:
        prepare(spec, task, cache_dir)
    reopened = time.perf_counter() - started
    os.sync()  # time evaluations of a cache already on disk, not against its write-back
    seconds = []
    for _ in range(evaluations):
        started = time.perf_counter()
        for split in splits:
            accuracy = evaluate(task, None, split, torch.device("cpu"), 256)["accuracy"]
        seconds.append(time.perf_counter() - started)
    return _result(prepared, seconds, accuracy, reopen_s=reopened)


def _result(prepared: float, seconds: list[float], accuracy: float, **more: float) -> dict[str, Any]:
    """One case's figures: preprocessing, the best evaluation, peak memory of the process and its workers."""
    own, children = _peak_mb()
    return {
        "prepare_s": prepared,
        "eval_s": min(seconds),
        "rss_mb": own,
        "workers_mb": children,
        "acc": accuracy,
        **more,
    }


def run_zoo(path: str, evaluations: int, cache_dir: str) -> dict[str, Any]:
    """Seconds per evaluation of the 5 zoo tasks (validation splits): old in-memory path vs streamed."""
    import datasets
    import torch

    from m3sb.tasks.data import DatasetSpec
    from m3sb.tasks.image_classification import evaluate, load_task_model, prepare
    from m3sb.tasks.metrics import classification_metrics

    zoo = json.loads(Path(path).read_text())
    old, new = [], []
    for entry in zoo["tasks"]:
        task = load_task_model(entry["checkpoint"])
        spec = DatasetSpec.model_validate(entry["dataset"] | {"split": "validation"})
        split = datasets.load_from_disk(spec.dataset_name)["validation"]
        pixels = task.processor(
            images=[row["image"].convert("L") for row in split.with_format(None)], return_tensors="pt"
        )["pixel_values"]
        labels = torch.tensor(split["label"])
        cached = prepare(spec, task, cache_dir)
        for _ in range(evaluations):
            started = time.perf_counter()
            with torch.inference_mode():
                predictions = torch.cat(
                    [
                        task.model(pixel_values=pixels[i : i + 256]).logits.argmax(-1)
                        for i in range(0, len(pixels), 256)
                    ]
                )
            classification_metrics(predictions, labels)
            old.append(time.perf_counter() - started)
            started = time.perf_counter()
            evaluate(task, None, cached, torch.device("cpu"), 256)
            new.append(time.perf_counter() - started)
    count = len(zoo["tasks"])
    return {"old_ms": 1000 * sum(old) / len(old) * count, "new_ms": 1000 * sum(new) / len(new) * count}


def _child(arguments: list[str]) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, __file__, "--child", *arguments], capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        return {"error": (done.stderr.strip().splitlines() or ["failed"])[-1][:120]}
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 6000, 25000])
    parser.add_argument("--evaluations", type=int, default=2)
    parser.add_argument(
        "--seed-split", type=int, default=6000, help="images in each of the three seed-sized splits (0: skip)"
    )
    parser.add_argument(
        "--skip-memory-over", type=float, default=16.0, help="GB; in-memory runs projected over it"
    )
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    arguments = parser.parse_args()
    if arguments.child:
        case, *rest = arguments.child
        if case == "in-memory":
            result = run_in_memory(rest[0], rest[1], int(rest[2]))
        elif case == "streamed":
            result = run_streamed(rest[3:], rest[0], int(rest[1]), rest[2])
        else:
            result = run_zoo(rest[0], int(rest[1]), rest[2])
        print(json.dumps(result))
        return

    WORK.mkdir(parents=True, exist_ok=True)
    model = build_model()
    rows = []
    for size in arguments.sizes:
        data = build_split(size)
        cache_dir = WORK / f"cache-{size}"
        shutil.rmtree(cache_dir, ignore_errors=True)
        projected = 2.2 * size * IMAGE_BYTES / 1e9  # the pixel tensor, the processor's copies, the images
        if projected > arguments.skip_memory_over:
            old: dict[str, Any] = {"error": f"not run: projected {projected:.0f} GB"}
        else:
            old = _child(["in-memory", str(data), str(model), str(arguments.evaluations)])
        new = _child(["streamed", str(model), str(arguments.evaluations), str(cache_dir), str(data)])
        rows.append((size, old, new))
        shutil.rmtree(cache_dir, ignore_errors=True)
    seed_sized: dict[str, Any] = {}
    if arguments.seed_split:
        datas = [str(build_split(arguments.seed_split, variant)) for variant in (1, 2, 3)]
        cache_dir = WORK / "cache-seed-sized"
        shutil.rmtree(cache_dir, ignore_errors=True)
        seed_sized = _child(["streamed", str(model), str(arguments.evaluations), str(cache_dir), *datas])
        shutil.rmtree(cache_dir, ignore_errors=True)
    from m3sb.zoo import build_zoo

    zoo = build_zoo(WORK / "zoo")
    zoo_times = _child(["zoo", str(zoo), "20", str(WORK / "cache-zoo")])

    print(f"\nmachine: {os.cpu_count()} CPUs; small ViT (224x224, patch 16, hidden 64, 2 layers); batch 256")
    print(
        "| images | path | peak RSS (GB) | workers' peak (GB) | preprocess (s) | reopen cache (s) "
        "| s / evaluation | accuracy |"
    )
    print("|---|---|---|---|---|---|---|---|")

    def cell(result: dict[str, Any], key: str, scale: float = 1.0, digits: int = 2) -> str:
        return f"{result[key] * scale:.{digits}f}" if key in result else "-"

    for size, old, new in rows:
        for label, result in (("in-memory (before)", old), ("streamed from the cache", new)):
            if "error" in result:
                print(f"| {size} | {label} | {result['error']} | | | | | |")
                continue
            print(
                f"| {size} | {label} | {cell(result, 'rss_mb', 1e-3)} | {cell(result, 'workers_mb', 1e-3)} "
                f"| {cell(result, 'prepare_s', digits=1)} | {cell(result, 'reopen_s', digits=3)} "
                f"| {cell(result, 'eval_s')} | {cell(result, 'acc', digits=1)} |"
            )
    if seed_sized:
        size = arguments.seed_split
        if "error" in seed_sized:
            print(f"| 3 x {size} | streamed, three tasks | {seed_sized['error']} | | | | | |")
        else:
            print(
                f"| 3 x {size} | streamed, three tasks (the seed's shape) "
                f"| {cell(seed_sized, 'rss_mb', 1e-3)} | {cell(seed_sized, 'workers_mb', 1e-3)} "
                f"| {cell(seed_sized, 'prepare_s', digits=1)} | {cell(seed_sized, 'reopen_s', digits=3)} "
                f"| {cell(seed_sized, 'eval_s')} "
                f"| {cell(seed_sized, 'acc', digits=1)} |"
            )
    if "error" in zoo_times:
        print(f"zoo: {zoo_times['error']}")
    else:
        print(
            f"\ndigits zoo, 5 validation splits (360 images each), one evaluation of all five: "
            f"in-memory {zoo_times['old_ms']:.1f} ms, streamed {zoo_times['new_ms']:.1f} ms"
        )


if __name__ == "__main__":
    main()
