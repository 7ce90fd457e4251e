"""Benchmark ``m3sb merge`` against mergekit's ``mergekit-yaml`` side by side.

The script builds (once, cached in ``--workdir``) a randomly initialised
~160M-parameter float32 Llama "base" model and three "fine-tunes" of it
(base + small gaussian noise), writes one mergekit-style YAML config per
method and tool, then runs each tool as a child process and records the
whole-process wall time and peak resident set size (``os.wait4``'s
``ru_maxrss``). Finally it compares the two tools' outputs tensor by tensor
and prints a markdown table.

Methods (``--methods``):

* ``linear``     -- weights 1,1,1, ``normalize: true``.
* ``ties``       -- base model set, density 0.5 and weight 1 per model.
* ``barycenter`` -- equal weights, no base model; run as ``barycenter`` by
  m3sb and as ``karcher`` by mergekit.
* ``tsv_m``, ``iso_c`` -- base model set, weight 1 per model (m3sb only: mergekit 0.1.5 has
  neither); an SVD per matrix, where ``--device cuda`` should pay.

Usage (from the repository root)::

    uv run python benchmarks/bench_merge.py
    uv run python benchmarks/bench_merge.py --tools mergekit --methods linear,ties
    uv run python benchmarks/bench_merge.py --repeat 3 --stat median
    uv run python benchmarks/bench_merge.py --size 1.1b   # 3 x 2.2 GB bfloat16, ~9 GB of disk
    uv run python benchmarks/bench_merge.py --size 8b-2layers --tools m3sb  # 3 x 3.0 GB, ~12 GB
    uv run python benchmarks/bench_merge.py --size 1.1b --tools m3sb --methods tsv_m,iso_c --device cuda

The floor (reading the fine-tunes from the page cache, writing one model with fsync, one
fused float32 pass over the tensors) and the start-up costs (``import torch``, ``--help``,
a merge of two tiny Llamas) are measured on the same machine before the merges. The
bfloat16 cases merge in float32 and write bfloat16 (``out_dtype``), as LLM merges do.

The benchmark needs no network access and does not import m3sb.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import torch
import yaml
from safetensors import safe_open

METHODS = ("linear", "ties", "barycenter", "tsv_m", "iso_c")
M3SB_ONLY = ("tsv_m", "iso_c")  # methods mergekit 0.1.5 does not have
TOOLS = ("m3sb", "mergekit")
N_FINETUNES = 3
NOISE_REL_STD = 0.01
MODEL_CONFIG: dict[str, object] = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "num_key_value_heads": 12,
    "vocab_size": 32000,
    "max_position_embeddings": 2048,
    "tie_word_embeddings": False,
}
# The 1.1B case: TinyLlama-1.1B's shape in bfloat16 (2.2 GB per model, two shards), its
# tensors drawn straight from a seed into safetensors (no model is built in memory).
TINYLLAMA_CONFIG: dict[str, object] = {
    "hidden_size": 2048,
    "intermediate_size": 5632,
    "num_hidden_layers": 22,
    "num_attention_heads": 32,
    "num_key_value_heads": 4,
    "vocab_size": 32000,
    "max_position_embeddings": 2048,
    "tie_word_embeddings": False,
}
# A 7B-class shape for the memory ceiling: Llama-3-8B's tensors (a 128,256 x 4,096 embedding
# and head, 14,336-wide MLPs) with 2 of its 32 layers, bfloat16 (3.0 GB per model).
LLAMA3_8B_2_LAYERS_CONFIG: dict[str, object] = {
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 2,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "max_position_embeddings": 8192,
    "tie_word_embeddings": False,
}
TINY_CONFIG: dict[str, object] = {
    "hidden_size": 16,
    "intermediate_size": 32,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "vocab_size": 64,
    "tie_word_embeddings": False,
}
LARGE_CONFIGS = {"1.1b": TINYLLAMA_CONFIG, "8b-2layers": LLAMA3_8B_2_LAYERS_CONFIG}
SIZES = ("168m", *LARGE_CONFIGS)
BIN_DIR = Path(sys.prefix) / "bin"
EXECUTABLES = {"m3sb": BIN_DIR / "m3sb", "mergekit": BIN_DIR / "mergekit-yaml"}


@dataclass
class Checkpoints:
    """Paths of the locally built input models."""

    base: Path
    finetunes: list[Path]

    def all(self) -> list[Path]:
        """Return every checkpoint directory, base first."""
        return [self.base, *self.finetunes]


@dataclass
class Measurement:
    """Outcome of one measured child process."""

    seconds: float
    peak_rss_bytes: int
    returncode: int
    log: Path


def build_checkpoints(workdir: Path) -> Checkpoints:
    """Build (or reuse) the base model and the fine-tunes under ``workdir/models``.

    The base model is ``LlamaForCausalLM(config)`` in float32 with seed 0;
    fine-tune ``i`` is ``base + N(0, (NOISE_REL_STD * s)^2)`` with seed ``i + 1``,
    where ``s`` is the tensor's std (its mean absolute value for constant
    tensors such as the RMSNorm weights, so those differ between models too).
    A marker file records the recipe so that a changed recipe rebuilds.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    models_dir = workdir / "models"
    ckpts = Checkpoints(
        base=models_dir / "base",
        finetunes=[models_dir / f"ft{i}" for i in range(N_FINETUNES)],
    )
    recipe = {
        "config": MODEL_CONFIG,
        "noise": NOISE_REL_STD,
        "n": N_FINETUNES,
        "version": 2,
    }
    marker = models_dir / "COMPLETE.json"
    if marker.exists() and json.loads(marker.read_text()) == recipe:
        print(f"Reusing checkpoints in {models_dir}")
        return ckpts

    shutil.rmtree(models_dir, ignore_errors=True)
    models_dir.mkdir(parents=True)
    print(f"Building checkpoints in {models_dir} ...", flush=True)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**MODEL_CONFIG)).float()
    save = {"safe_serialization": True, "max_shard_size": "100GB"}
    model.save_pretrained(ckpts.base, **save)
    base_state = {k: v.detach().clone() for k, v in model.state_dict().items()}

    for i, path in enumerate(ckpts.finetunes):
        gen = torch.Generator().manual_seed(i + 1)
        with torch.no_grad():
            for name, tensor in model.state_dict().items():
                ref = base_state[name]
                std = ref.std() if ref.numel() > 1 else ref.new_zeros(())
                if std == 0:
                    std = ref.abs().mean()
                noise = torch.randn(ref.shape, generator=gen, dtype=ref.dtype)
                tensor.copy_(ref + noise * (NOISE_REL_STD * std))
        model.save_pretrained(path, **save)
        print(f"  wrote {path}", flush=True)

    marker.write_text(json.dumps(recipe))
    return ckpts


def llama_shapes(config: dict[str, object]) -> dict[str, tuple[int, ...]]:
    """Every tensor name and shape of a ``LlamaForCausalLM`` with ``config`` (built on the
    meta device: no memory)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**config))
    return {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}


def _write_shards(folder: Path, tensors: dict[str, torch.Tensor], shards: int) -> None:
    """``tensors`` as ``shards`` safetensors files with an index, as transformers writes them."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    names = list(tensors)
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    weight_map, start = {}, 0
    for shard in range(shards):
        file = f"model-{shard + 1:05d}-of-{shards:05d}.safetensors"
        stop = start
        size = 0
        while stop < len(names) and (size < total / shards or shard == shards - 1):
            size += tensors[names[stop]].numel() * tensors[names[stop]].element_size()
            stop += 1
        save_file({n: tensors[n] for n in names[start:stop]}, str(folder / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(names[start:stop], file))
        start = stop
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def build_large_checkpoints(workdir: Path, size: str) -> Checkpoints:
    """Build (or reuse) a bfloat16 case (``LARGE_CONFIGS[size]``) under ``workdir/models-SIZE``:
    a base with N(0, 0.02^2) matrices and unit norms (seed 0), and fine-tunes ``base + noise``
    at ``NOISE_REL_STD`` of each tensor's scale (seed ``i + 1``), two shards each."""
    models_dir = workdir / f"models-{size}"
    ckpts = Checkpoints(models_dir / "base", [models_dir / f"ft{i}" for i in range(N_FINETUNES)])
    model_config = LARGE_CONFIGS[size]
    recipe = {"config": model_config, "noise": NOISE_REL_STD, "n": N_FINETUNES, "version": 1}
    marker = models_dir / "COMPLETE.json"
    if marker.exists() and json.loads(marker.read_text()) == recipe:
        print(f"Reusing checkpoints in {models_dir}")
        return ckpts
    shutil.rmtree(models_dir, ignore_errors=True)
    print(f"Building {size} bfloat16 checkpoints in {models_dir} ...", flush=True)
    shapes = llama_shapes(model_config)
    config = {**model_config, "architectures": ["LlamaForCausalLM"], "model_type": "llama"}
    config["torch_dtype"] = "bfloat16"
    for index, folder in enumerate(ckpts.all()):
        generator = torch.Generator().manual_seed(0)
        tensors = {}
        for name, shape in shapes.items():
            base = torch.ones(shape) if len(shape) == 1 else torch.randn(shape, generator=generator) * 0.02
            if index > 0:
                noise = torch.randn(
                    shape, generator=torch.Generator().manual_seed(index * 7919 + len(tensors))
                )
                base += noise * NOISE_REL_STD * (0.02 if len(shape) > 1 else 1.0)
            tensors[name] = base.to(torch.bfloat16)
        _write_shards(folder, tensors, shards=2)
        (folder / "config.json").write_text(json.dumps(config, indent=2))
        print(f"  wrote {folder}", flush=True)
        del tensors
    marker.write_text(json.dumps(recipe))
    return ckpts


def _reuse_heap() -> None:
    """Serve every allocation of this process from glibc's heap and keep freed memory there."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None)
        libc.mallopt(-4, 0)  # M_MMAP_MAX: no block gets its own mapping
        libc.mallopt(-1, 1 << 62)  # M_TRIM_THRESHOLD: the heap is never trimmed


def measure_floor(ckpts: Checkpoints, workdir: Path) -> list[str]:
    """What no merge of the fine-tunes can beat on this machine: reading them from the page
    cache, writing one model's bytes with fsync, and one fused float32 multiply-add pass
    over every tensor (the arithmetic of a linear merge), each timed once."""
    files = [f for p in ckpts.finetunes for f in sorted(p.glob("*.safetensors"))]
    warm_page_cache(ckpts.finetunes)
    start = time.perf_counter()
    read = warm_page_cache(ckpts.finetunes)
    read_s = time.perf_counter() - start
    one_model = sum(f.stat().st_size for f in sorted(ckpts.finetunes[0].glob("*.safetensors")))
    target = workdir / "floor-write.bin"
    block = bytes(1 << 24)
    start = time.perf_counter()
    with open(target, "wb") as handle:
        for _ in range(0, one_model, len(block)):
            handle.write(block)
        handle.flush()
        os.fsync(handle.fileno())
    write_s = time.perf_counter() - start
    target.unlink()
    handles = [safe_open(str(f), framework="pt") for f in files[: len(files) // N_FINETUNES]]
    _reuse_heap()  # as m3sb merges: freed blocks serve the next tensor, no fresh page faults
    start = time.perf_counter()
    for handle in handles:  # the first fine-tune's tensors stand for all three (same shapes)
        for name in handle.keys():  # noqa: SIM118
            tensor = handle.get_tensor(name)
            total = tensor.float()
            total.add_(tensor.float()).add_(tensor.float()).mul_(1 / 3)
            total.to(tensor.dtype)
    fused_s = time.perf_counter() - start
    return [
        f"floor: read {read / 1e9:.2f} GB from the page cache {read_s:.2f} s; "
        f"write {one_model / 1e9:.2f} GB with fsync {write_s:.2f} s; "
        f"one fused float32 pass (3 inputs) {fused_s:.2f} s; sum {read_s + write_s + fused_s:.2f} s",
    ]


def measure_startup(workdir: Path, tools: list[str]) -> list[str]:
    """Start-up costs: ``--help``, a linear merge of two tiny Llamas (one layer, width 16),
    and ``import torch`` alone (the floor of any command that touches a tensor), each the
    best of 3 runs."""
    tiny = workdir / "tiny"
    models = [tiny / f"m{i}" for i in range(2)]
    shapes = llama_shapes(TINY_CONFIG)
    config = {**TINY_CONFIG, "architectures": ["LlamaForCausalLM"], "model_type": "llama"}
    for index, folder in enumerate(models):
        _write_shards(folder, {name: torch.full(shape, float(index)) for name, shape in shapes.items()}, 1)
        (folder / "config.json").write_text(json.dumps(config))
    recipe = {
        "merge_method": "linear",
        "models": [{"model": str(m), "parameters": {"weight": 1.0}} for m in models],
    }
    (tiny / "recipe.yaml").write_text(yaml.safe_dump(recipe))

    def best(command: list[str]) -> tuple[float, int, int]:
        runs = []
        for _ in range(3):
            shutil.rmtree(tiny / "out", ignore_errors=True)
            runs.append(run_measured(command))
        return min(runs)

    lines = []
    secs, rss, rc = best([sys.executable, "-c", "import torch"])
    lines.append(f"python -c 'import torch': {secs:.2f} s, {rss / 1e9:.2f} GB, rc={rc}")
    for tool in tools:
        secs, rss, rc = best([*executable(tool), "--help"])
        lines.append(f"{tool} --help: {secs:.2f} s, {rss / 1e9:.2f} GB, rc={rc}")
        secs, rss, rc = best(tool_command(tool, tiny / "recipe.yaml", tiny / "out"))
        lines.append(f"{tool} merge of two tiny Llamas: {secs:.2f} s, {rss / 1e9:.2f} GB, rc={rc}")
    return lines


def count_parameters(checkpoint: Path) -> int:
    """Return the number of scalars stored in ``checkpoint``'s safetensors files."""
    total = 0
    for file in checkpoint.glob("*.safetensors"):
        with safe_open(str(file), framework="pt") as fh:
            for key in fh.keys():  # noqa: SIM118
                total += math.prod(fh.get_slice(key).get_shape())
    return total


def _method_config(method: str, tool: str, ckpts: Checkpoints) -> dict[str, object]:
    """Return the mergekit-schema config dict for one method and tool."""
    if method == "linear":
        models = [{"model": str(p), "parameters": {"weight": 1.0}} for p in ckpts.finetunes]
        return {
            "models": models,
            "merge_method": "linear",
            "parameters": {"normalize": True},
            "dtype": "float32",
        }
    if method == "ties":
        params = {"weight": 1.0, "density": 0.5}
        models = [{"model": str(p), "parameters": dict(params)} for p in ckpts.finetunes]
        return {
            "models": models,
            "merge_method": "ties",
            "base_model": str(ckpts.base),
            "parameters": {"normalize": True},
            "dtype": "float32",
        }
    if method == "barycenter":
        models = [{"model": str(p), "parameters": {"weight": 1.0}} for p in ckpts.finetunes]
        return {
            "models": models,
            "merge_method": "barycenter" if tool == "m3sb" else "karcher",
            "dtype": "float32",
        }
    if method in M3SB_ONLY:
        models = [{"model": str(p), "parameters": {"weight": 1.0}} for p in ckpts.finetunes]
        return {"models": models, "merge_method": method, "base_model": str(ckpts.base), "dtype": "float32"}
    raise ValueError(f"unknown method {method!r}")


def write_configs(
    workdir: Path, ckpts: Checkpoints, methods: list[str], tools: list[str], out_dtype: str | None = None
) -> dict[tuple[str, str], Path]:
    """Write one YAML config per (method, tool) under ``workdir/configs`` (merging in float32;
    written in ``out_dtype`` where given, else in float32)."""
    config_dir = workdir / "configs"
    config_dir.mkdir(parents=True, exist_ok=True)
    paths: dict[tuple[str, str], Path] = {}
    for method in methods:
        for tool in tools:
            if tool != "m3sb" and method in M3SB_ONLY:
                continue
            path = config_dir / f"{method}-{tool}.yaml"
            config = _method_config(method, tool, ckpts)
            if out_dtype is not None:
                config["out_dtype"] = out_dtype
            path.write_text(yaml.safe_dump(config, sort_keys=False))
            paths[method, tool] = path
    return paths


M3SB_DEVICE = ["cpu"]  # set from --device
M3SB_MEMORY = [""]  # set from --memory (empty: m3sb's default)


def executable(tool: str) -> list[str]:
    """The tool's console script, or ``python -m m3sb.cli`` where m3sb's is not installed."""
    exe = EXECUTABLES[tool]
    if tool == "m3sb" and not exe.exists():
        return [sys.executable, "-m", "m3sb.cli"]
    return [str(exe)]


def tool_command(tool: str, config: Path, out: Path) -> list[str]:
    """Return the command line that merges ``config`` into ``out`` with ``tool``."""
    if tool == "m3sb":
        return [
            *executable(tool),
            "merge",
            str(config),
            str(out),
            "--quiet",
            "--force",
            "--device",
            M3SB_DEVICE[0],
            *(["--memory", M3SB_MEMORY[0]] if M3SB_MEMORY[0] else []),
        ]
    return [*executable(tool), str(config), str(out)]


# Runs in a fresh, small interpreter that starts the measured command. A child
# forked directly from this (torch-importing, model-building) process would
# inherit our RSS high-water mark in its ``ru_maxrss``; a grandchild forked
# from a freshly exec'd launcher only inherits the launcher's few megabytes.
_LAUNCHER = """
import json, os, subprocess, sys, time
log, cmd = sys.argv[1], sys.argv[2:]
with open(log, "wb") as sink:
    start = time.perf_counter()
    proc = subprocess.Popen(
        cmd, stdin=subprocess.DEVNULL, stdout=sink, stderr=subprocess.STDOUT
    )
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
rc = os.waitstatus_to_exitcode(status)
print(json.dumps({"seconds": seconds, "maxrss_kib": usage.ru_maxrss, "rc": rc}))
"""


def run_measured(cmd: list[str], log: Path | None = None) -> tuple[float, int, int]:
    """Run ``cmd`` to completion; return (wall seconds, peak RSS bytes, exit code).

    The command's stdout and stderr go to ``log`` (or are discarded). Timing
    and ``os.wait4``'s ``ru_maxrss`` (KiB on Linux) are taken by a small
    launcher interpreter, see ``_LAUNCHER``.
    """
    sink = str(log) if log is not None else os.devnull
    launcher = [sys.executable, "-I", "-c", _LAUNCHER, sink, *cmd]
    done = subprocess.run(launcher, capture_output=True, text=True, check=True)
    result = json.loads(done.stdout)
    return result["seconds"], result["maxrss_kib"] * 1024, result["rc"]


def warm_page_cache(paths: list[Path]) -> int:
    """Read every file under ``paths`` once so that it sits in the page cache."""
    total = 0
    for root in paths:
        for file in sorted(p for p in root.rglob("*") if p.is_file()):
            with open(file, "rb") as fh:
                while chunk := fh.read(1 << 24):
                    total += len(chunk)
    return total


def _tensor_files(directory: Path) -> dict[str, Path]:
    """Map every tensor name in ``directory``'s safetensors files to its file."""
    index: dict[str, Path] = {}
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as fh:
            for key in fh.keys():  # noqa: SIM118
                index[key] = file
    return index


def compare_outputs(dir_a: Path, dir_b: Path) -> float:
    """Return max over tensors of ``||a - b|| / ||b||`` between two merged models.

    Raises ``ValueError`` if the two outputs do not hold the same tensor names
    and shapes.
    """
    index_a, index_b = _tensor_files(dir_a), _tensor_files(dir_b)
    if not index_a or set(index_a) != set(index_b):
        only_a = sorted(set(index_a) - set(index_b))[:5]
        only_b = sorted(set(index_b) - set(index_a))[:5]
        raise ValueError(f"tensor names differ: only in a {only_a}, only in b {only_b}")
    worst = 0.0
    for key in sorted(index_a):
        with safe_open(str(index_a[key]), framework="pt") as fa:
            a = fa.get_tensor(key).double()
        with safe_open(str(index_b[key]), framework="pt") as fb:
            b = fb.get_tensor(key).double()
        if a.shape != b.shape:
            raise ValueError(f"{key}: shape {tuple(a.shape)} vs {tuple(b.shape)}")
        denom = torch.linalg.vector_norm(b).item()
        diff = torch.linalg.vector_norm(a - b).item()
        rel = diff / denom if denom > 0 else diff
        worst = max(worst, rel)
    return worst


def machine_facts() -> list[str]:
    """Describe the machine and the tool versions."""
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    cpu_model = platform.processor() or "?"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break

    def version(dist: str) -> str:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return "not installed"

    return [
        f"CPUs: {os.cpu_count()} ({cpu_model})",
        f"RAM: {ram / 1e9:.1f} GB",
        f"Python: {platform.python_version()}  torch: {torch.__version__}",
        f"torch threads: {torch.get_num_threads()}",
        f"mergekit: {version('mergekit')}  m3sb: {version('m3sb')}",
    ]


def _aggregate(values: list[float], stat: str) -> float:
    return min(values) if stat == "best" else statistics.median(values)


def _ratio(a: Measurement | None, b: Measurement | None, field: str) -> str:
    """Format ``a.field / b.field``, or ``-`` when either run is missing."""
    if a is None or b is None or not getattr(b, field):
        return "-"
    return f"{getattr(a, field) / getattr(b, field):.2f}"


def measure_tool(
    tool: str, config: Path, out: Path, inputs: list[Path], repeat: int, stat: str
) -> Measurement:
    """Run one tool ``repeat`` times on ``config`` and combine the runs with ``stat``.

    ``out`` is removed, the inputs are re-read into the page cache and dirty pages
    are flushed (``os.sync``) before every run; the last run's output is left in
    place for comparison.
    """
    log = out.parent.parent / "logs" / f"{out.name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    times: list[float] = []
    rsss: list[float] = []
    for _ in range(repeat):
        shutil.rmtree(out, ignore_errors=True)
        warm_page_cache(inputs)
        os.sync()  # no run pays for flushing the previous run's output to disk
        secs, rss, rc = run_measured(tool_command(tool, config, out), log)
        print(f"  {out.name:>20}: {secs:7.2f} s {rss / 1e9:6.2f} GB  rc={rc}", flush=True)
        if rc != 0:
            tail = log.read_text(errors="replace").splitlines()[-20:]
            print(f"--- tail of {log} ---", *tail, "---", sep="\n")
            return Measurement(float("nan"), 0, rc, log)
        times.append(secs)
        rsss.append(rss)
    return Measurement(_aggregate(times, stat), int(_aggregate(rsss, stat)), 0, log)


def format_table(results: dict[tuple[str, str], Measurement], out_root: Path) -> list[str]:
    """Return the markdown result table, one row per (method, tool)."""
    columns = ["method", "tool", "wall s", "peak RSS GB"]
    columns += ["time m3sb/mk", "mem m3sb/mk", "max rel err"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    methods = list(dict.fromkeys(m for m, _ in results))
    for method in methods:
        ok = {t: r for (m, t), r in results.items() if m == method and not r.returncode}
        m3, mk = ok.get("m3sb"), ok.get("mergekit")
        rel_err = "-"
        if m3 is not None and mk is not None:
            dirs = [out_root / f"{method}-{tool}" for tool in TOOLS]
            try:
                rel_err = f"{compare_outputs(*dirs):.2e}"
            except ValueError as exc:
                rel_err = f"mismatch: {exc}"
        for (m, tool), res in results.items():
            if m != method:
                continue
            if res.returncode:
                cells = [f"FAILED rc={res.returncode}", "-", "-", "-", "-"]
            else:
                cells = [f"{res.seconds:.2f}", f"{res.peak_rss_bytes / 1e9:.2f}"]
                if tool == "m3sb":
                    cells += [
                        _ratio(m3, mk, "seconds"),
                        _ratio(m3, mk, "peak_rss_bytes"),
                    ]
                    cells.append(rel_err)
                else:
                    cells += ["", "", ""]
            lines.append(f"| {method} | {tool} | " + " | ".join(cells) + " |")
    return lines


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Parse and validate the command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("benchmarks/.work"))
    parser.add_argument("--methods", default=",".join(METHODS), help="comma list")
    parser.add_argument("--tools", default=",".join(TOOLS), help="comma list")
    parser.add_argument("--repeat", type=int, default=1, help="runs per method/tool")
    parser.add_argument("--stat", choices=("best", "median"), default="best", help="combine repeats")
    parser.add_argument("--device", default="cpu", help="m3sb's --device (cpu, cuda, ...)")
    parser.add_argument("--memory", default="", help="m3sb's --memory (default: m3sb's own)")
    parser.add_argument(
        "--size",
        choices=SIZES,
        default="168m",
        help="the models: 168M float32, 1.1B bf16, or Llama-3-8B's shapes with 2 layers (bf16)",
    )
    args = parser.parse_args(argv)
    args.methods = [m for m in args.methods.split(",") if m]
    args.tools = [t for t in args.tools.split(",") if t]
    for chosen, allowed in ((args.methods, METHODS), (args.tools, TOOLS)):
        bad = sorted(set(chosen) - set(allowed))
        if bad:
            parser.error(f"unknown choice(s) {bad}; allowed: {', '.join(allowed)}")
    if args.repeat < 1:
        parser.error("--repeat must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print the table; exit code 1 if any run failed."""
    args = parse_args(argv)
    M3SB_DEVICE[0] = args.device
    M3SB_MEMORY[0] = args.memory
    t_start = time.perf_counter()
    workdir: Path = args.workdir.resolve()
    print("\n".join(machine_facts()))
    ckpts = build_checkpoints(workdir) if args.size == "168m" else build_large_checkpoints(workdir, args.size)
    print("\n".join(measure_floor(ckpts, workdir)))
    sizes = [f.stat().st_size for p in ckpts.all() for f in p.glob("*.safetensors")]
    print(f"Parameters per model: {count_parameters(ckpts.base):,}")
    print(f"Inputs: {len(sizes)} safetensors files, {sum(sizes) / 1e9:.2f} GB total")
    configs = write_configs(
        workdir / ("" if args.size == "168m" else args.size),
        ckpts,
        args.methods,
        args.tools,
        out_dtype=None if args.size == "168m" else "bfloat16",  # the large cases are bfloat16 models
    )
    print("\n".join(measure_startup(workdir, args.tools)))

    out_root = workdir / ("out" if args.size == "168m" else f"out-{args.size}")
    results: dict[tuple[str, str], Measurement] = {}
    for method in args.methods:
        for tool in args.tools:
            if tool != "m3sb" and method in M3SB_ONLY:
                print(f"{method}: {tool} has no such method; m3sb only")
                continue
            results[method, tool] = measure_tool(
                tool,
                configs[method, tool],
                out_root / f"{method}-{tool}",
                ckpts.all(),
                args.repeat,
                args.stat,
            )

    print(f"\n{args.stat} of {args.repeat} run(s) per row")
    print("\n".join(format_table(results, out_root)))
    print(f"\nTotal benchmark time: {time.perf_counter() - t_start:.1f} s")
    return 0 if all(r.returncode == 0 for r in results.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
