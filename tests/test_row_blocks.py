"""Merging large tensors in blocks of rows: the writer takes a tensor as consecutive blocks,
an elementwise method's blocks are exactly the rows of the whole merge, and the memory a
merge holds follows the budget rather than the tensor's size."""

from __future__ import annotations

import itertools
import math
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import save_file

import m3sb.checkpoints as checkpoints_module
import m3sb.merge as merge_module
from m3sb.checkpoints import SafetensorsWriter, TensorInfo, open_checkpoint
from m3sb.config import parse_merge_config
from m3sb.errors import MergeError
from m3sb.merge import build_plan, bytes_per_row, merge_to_folder, row_blocks
from m3sb.methods import merge_group
from m3sb.methods.sparsify import (
    gathered_kth_largest_magnitude,
    kth_largest_magnitude,
    streaming_kth_largest_magnitude,
)
from m3sb.toy import Family

LAUNCHER = "import subprocess, sys; sys.exit(subprocess.run(sys.argv[1:], check=False).returncode)"


def _read_all(folder: Path) -> dict[str, torch.Tensor]:
    checkpoint = open_checkpoint(folder)
    return {name: checkpoint.load(name) for name in checkpoint.tensors}


def test_the_writer_takes_a_tensor_as_consecutive_blocks_of_rows(tmp_path: Path) -> None:
    whole = torch.arange(24, dtype=torch.float32).reshape(6, 4)
    scalar = torch.tensor(3.0)
    layout = {"a": TensorInfo((6, 4), torch.float32), "b": TensorInfo((), torch.float32)}
    writer = SafetensorsWriter(tmp_path, layout, 10**9)
    for block in (whole[:1], whole[1:4], whole[4:]):
        writer.write("a", block)
    writer.write("b", scalar)
    writer.close()
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as handle:
        assert torch.equal(handle.get_tensor("a"), whole) and torch.equal(handle.get_tensor("b"), scalar)


@pytest.mark.parametrize("limit", [0, 1 << 20])  # every tensor handed over; every one copied
def test_the_writer_lets_go_of_a_small_tensor_when_write_returns(
    tmp_path: Path, limit: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(checkpoints_module, "STAGING_LIMIT", limit)
    written: list[int] = []  # the address of the bytes the thread writes
    writing = checkpoints_module.SafetensorsWriter._write_bytes

    def recording(self: SafetensorsWriter, name: str, data: Any, first: bool) -> None:
        written.append(data.ctypes.data)
        writing(self, name, data, first)

    monkeypatch.setattr(checkpoints_module.SafetensorsWriter, "_write_bytes", recording)
    tensors = [torch.full((64, 4), float(index)) for index in range(3)]
    layout = {f"t{index}": TensorInfo((64, 4), torch.float32) for index in range(3)}
    writer = SafetensorsWriter(tmp_path, layout, 10**9)
    given = [tensor.clone() for tensor in tensors]
    for index, tensor in enumerate(given):
        writer.write(f"t{index}", tensor)
    writer.close()
    for tensor, address in zip(given, written, strict=True):
        assert (address != tensor.data_ptr()) == (limit > 0)  # copied: the caller's may be freed
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as handle:
        for index, tensor in enumerate(tensors):
            assert torch.equal(handle.get_tensor(f"t{index}"), tensor)


@pytest.mark.parametrize(
    ("blocks", "message"),
    [
        ([("a", slice(0, 2)), ("b", None)], "expected the rest of tensor 'a', got 'b'"),
        ([("a", slice(0, 6)), ("a", slice(0, 1))], "expected tensor 'b', got 'a'"),
        ([("a", slice(0, 2)), ("a", slice(0, 6))], "expected 6 rows in all, got more"),
    ],
)
def test_the_writer_refuses_blocks_out_of_order(
    blocks: list[tuple[str, slice | None]], message: str, tmp_path: Path
) -> None:
    whole = torch.zeros(6, 4)
    layout = {"a": TensorInfo((6, 4), torch.float32), "b": TensorInfo((), torch.float32)}
    writer = SafetensorsWriter(tmp_path, layout, 10**9)
    with pytest.raises(RuntimeError, match=re.escape(message)):
        for name, rows in blocks:
            writer.write(name, whole[rows] if rows is not None else torch.tensor(0.0))
    writer.abort()


def test_closing_in_the_middle_of_a_tensor_is_an_error(tmp_path: Path) -> None:
    writer = SafetensorsWriter(tmp_path, {"a": TensorInfo((6, 4), torch.float32)}, 10**9)
    writer.write("a", torch.zeros(2, 4))
    with pytest.raises(RuntimeError, match="closed before every tensor was written"):
        writer.close()


@pytest.mark.parametrize(
    ("method", "extra"),
    [("linear", {}), ("task_arithmetic", {"lambda": 0.7}), ("linear", {"dtype": "bfloat16"})],
)
def test_an_elementwise_merge_in_blocks_of_rows_is_the_whole_merge(
    family: Family, method: str, extra: dict[str, object], tmp_path: Path
) -> None:
    models = [
        {"model": str(m), "parameters": {"weight": w}}
        for m, w in zip(family.models, [0.5, 0.3, 0.2], strict=True)
    ]
    recipe = {"merge_method": method, "models": models, "base_model": str(family.base)}
    recipe |= {"parameters": {"lambda": extra["lambda"]}} if "lambda" in extra else {}
    recipe |= {"dtype": extra["dtype"]} if "dtype" in extra else {}
    config = parse_merge_config(recipe)
    plan = build_plan(config)
    blocked = [job.name for job in plan.jobs if (row_blocks(plan, job, 1) or [None])[0] is not None]
    assert len(blocked) >= len(plan.jobs) // 2  # every matrix, one row per block
    whole = _read_all(merge_to_folder(config, tmp_path / "whole", memory=None).out_dir)
    rows = _read_all(merge_to_folder(config, tmp_path / "rows", memory=1).out_dir)
    assert whole.keys() == rows.keys()
    for name, tensor in whole.items():
        assert torch.equal(rows[name], tensor), name


def test_methods_that_need_the_whole_tensor_merge_it_whole(family: Family) -> None:
    for method in ("breadcrumbs", "della", "slerp", "model_stock", "tsv_m"):
        models = [{"model": str(m), "parameters": {"density": 0.5, "weight": 0.5}} for m in family.models[:2]]
        recipe: dict[str, object] = {"merge_method": method, "models": models, "base_model": str(family.base)}
        if method == "slerp":
            recipe |= {"models": [{"model": str(family.models[0])}], "parameters": {"t": 0.5}}
        plan = build_plan(parse_merge_config(recipe))
        assert all(row_blocks(plan, job, 1) is None for job in plan.jobs), method


@pytest.mark.parametrize("seed", range(4))
def test_streaming_selection_is_the_kth_largest_magnitude(seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    values = torch.randn(97, 13, generator=generator) * 10 ** float(seed - 2)
    values[5, :4] = 0.0
    values[6, :4] = -0.0
    values[9] = values[10]  # ties
    cuts = sorted({0, 97, *torch.randint(1, 97, (5,), generator=generator).tolist()})
    blocks = [values[a:b] for a, b in itertools.pairwise(cuts)]
    for k in (1, 2, 13, 500, 97 * 13 - 9, 97 * 13):
        expected = kth_largest_magnitude(values, k)
        assert streaming_kth_largest_magnitude(lambda: iter(blocks), k) == expected, k
        assert gathered_kth_largest_magnitude(iter(blocks), k, values.numel()) == expected, k
    with pytest.raises(ValueError, match="not 1262"):
        gathered_kth_largest_magnitude(iter(blocks[1:]), 1, values.numel() + 1)


@pytest.mark.parametrize(
    ("method", "densities", "parameters"),
    [
        ("barycenter", None, {}),
        ("barycenter", None, {"space": "task_vectors", "lambda": 0.9}),
        ("karcher", None, {}),
        ("ties", [0.3, 0.5, 0.2], {"lambda": 0.9}),
        ("ties", [1.0, 0.0, 0.7], {}),
        ("dare_ties", [0.3, 1.0, 0.6], {"random_seed": 7}),
        ("dare_linear", [0.5, 0.2, 0.9], {"lambda": 0.9, "random_seed": 7}),
    ],
)
def test_merges_in_blocks_of_rows_are_the_whole_merge(
    family: Family,
    method: str,
    densities: list[float] | None,
    parameters: dict[str, object],
    tmp_path: Path,
) -> None:
    models = [
        {"model": str(m), "parameters": {"weight": w} | ({"density": densities[i]} if densities else {})}
        for i, (m, w) in enumerate(zip(family.models, [1.0, 0.5, 0.8], strict=True))
    ]
    recipe = {"merge_method": method, "models": models, "base_model": str(family.base)}
    config = parse_merge_config(recipe | {"parameters": parameters})
    plan = build_plan(config)
    assert sum(row_blocks(plan, job, 1) is not None for job in plan.jobs) >= len(plan.jobs) // 2
    whole = _read_all(merge_to_folder(config, tmp_path / "whole", memory=None).out_dir)
    rows = _read_all(merge_to_folder(config, tmp_path / "rows", memory=1).out_dir)
    for name, tensor in whole.items():
        assert torch.equal(rows[name], tensor), name


def test_ties_in_blocks_finds_a_threshold_that_fits_in_one_pass(
    family: Family, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    densities = [0.3, 0.5, 0.2]
    models = [
        {"model": str(m), "parameters": {"weight": 1.0, "density": d}}
        for m, d in zip(family.models, densities, strict=True)
    ]
    config = parse_merge_config({"merge_method": "ties", "models": models, "base_model": str(family.base)})
    plan = build_plan(config)
    largest = max(math.prod(job.shape) for job in plan.jobs)
    memory = 12 * largest  # the largest merge (6 float32 copies) is blocked; its magnitudes fit in half
    assert [job for job in plan.jobs if row_blocks(plan, job, memory) is not None]

    def refuse(*args: object) -> float:
        raise AssertionError("the streaming selection ran where the magnitudes fit")

    monkeypatch.setattr(merge_module, "streaming_kth_largest_magnitude", refuse)
    whole = _read_all(merge_to_folder(config, tmp_path / "whole", memory=None).out_dir)
    rows = _read_all(merge_to_folder(config, tmp_path / "rows", memory=memory).out_dir)
    for name, tensor in whole.items():
        assert torch.equal(rows[name], tensor), name


@pytest.mark.slow
def test_a_blocked_merge_holds_the_budget_not_the_tensor(tmp_path: Path) -> None:
    rows, columns = 8192, 8192  # 256 MiB of float32 per model
    generator = torch.Generator().manual_seed(0)
    for index in range(3):
        folder = tmp_path / f"model{index}"
        folder.mkdir()
        save_file(
            {"big.weight": torch.randn(rows, columns, generator=generator)}, str(folder / "model.safetensors")
        )
    recipe = tmp_path / "recipe.yml"
    recipe.write_text(
        yaml.safe_dump(
            {"merge_method": "linear", "models": [{"model": str(tmp_path / f"model{i}")} for i in range(3)]}
        )
    )

    def peak(memory: str) -> float:
        command = [sys.executable, "-m", "m3sb.cli", "merge", str(recipe), str(tmp_path / f"out{memory}")]
        # through a fresh interpreter: a child forked from this large test process would inherit
        # its peak RSS, which ru_maxrss then reports as the child's
        launcher = [sys.executable, "-I", "-c", LAUNCHER, *command, "--memory", memory]
        result = subprocess.run(launcher, capture_output=True, text=True, check=True)
        found = re.search(r"peak RSS ([0-9.]+) GB", result.stdout)
        assert found is not None, result.stdout
        return float(found.group(1))

    whole, blocked = peak("100GB"), peak("16MB")
    assert whole - blocked > 0.3, (
        whole,
        blocked,
    )  # three 128 MiB inputs, a temporary and a result held whole
    assert torch.equal(
        _read_all(tmp_path / "out100GB")["big.weight"], _read_all(tmp_path / "out16MB")["big.weight"]
    )


def test_each_tensor_is_prefetched_while_the_one_before_merges(
    family: Family, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    models = [{"model": str(m), "parameters": {"weight": 1.0, "density": 0.5}} for m in family.models]
    config = parse_merge_config({"merge_method": "ties", "models": models, "base_model": str(family.base)})
    events: list[tuple[str, str]] = []
    checkpoint_type = type(open_checkpoint(family.base))
    real_prefetch, real_load = checkpoint_type.prefetch, checkpoint_type.load

    def prefetch(self: object, name: str) -> None:
        events.append(("prefetch", name))
        real_prefetch(self, name)

    def load(self: object, name: str) -> torch.Tensor:
        events.append(("load", name))
        return real_load(self, name)

    monkeypatch.setattr(checkpoint_type, "prefetch", prefetch)
    monkeypatch.setattr(checkpoint_type, "load", load)
    merge_to_folder(config, tmp_path / "out", memory=None)
    names = [job.name for job in build_plan(config).jobs]
    prefetched = [name for kind, name in events if kind == "prefetch"]
    assert prefetched == [name for name in names[1:] for _ in range(4)]  # three fine-tunes and the base
    for earlier, later in itertools.pairwise(names):
        first_load_of_later = events.index(("load", later))
        assert events.index(("prefetch", later)) < events.index(("load", earlier)) < first_load_of_later


@pytest.mark.parametrize("method", ["linear", "ties", "barycenter"])
@pytest.mark.parametrize("memory", [1, 3_000, 20_000])
def test_the_blocks_cover_every_row_once_and_hold_the_budget(
    family: Family, method: str, memory: int
) -> None:
    models = [{"model": str(m), "parameters": {"weight": 1.0, "density": 0.5}} for m in family.models]
    if method == "barycenter":
        models = [{"model": str(m)} for m in family.models]
    plan = build_plan(
        parse_merge_config({"merge_method": method, "models": models, "base_model": str(family.base)})
    )
    blocked = 0
    for job in plan.jobs:
        blocks = row_blocks(plan, job, memory)
        if blocks is None:
            assert (
                not job.mergeable or len(job.shape) < 2 or bytes_per_row(plan, job) * job.shape[0] <= memory
            )
            continue
        blocked += 1
        assert blocks[0].start == 0 and blocks[-1].stop == job.shape[0]
        assert all(a.stop == b.start for a, b in itertools.pairwise(blocks))
        for rows in blocks:  # within the budget, unless one row alone exceeds it
            assert (rows.stop - rows.start) * bytes_per_row(
                plan, job
            ) <= memory or rows.stop - rows.start == 1
        # as few blocks as the budget allows, of balanced sizes (fewer holes in the reused heap)
        fitting = max(1, memory // bytes_per_row(plan, job))
        sizes = [rows.stop - rows.start for rows in blocks]
        assert len(blocks) == -(-job.shape[0] // fitting)
        assert len(set(sizes[:-1])) <= 1 and 0 <= sizes[0] - sizes[-1] < len(blocks)
    assert blocked >= (1 if memory > 1 else len(plan.jobs) // 2)
    inputs = 3 + (0 if method == "barycenter" else 1)
    job = next(job for job in plan.jobs if len(job.shape) == 2)
    # float32 models and merge: inputs, two temporaries (three for TIES), the result waiting
    # and the inputs' mapped bytes
    temporaries = 3 if method == "ties" else 2
    assert bytes_per_row(plan, job) == job.shape[1] * 4 * (inputs + temporaries + 1 + inputs)


@pytest.mark.parametrize(
    ("method", "parameters"),
    [
        ("ties", {"density": [0.3, 0.5, 0.8], "lambda": 0.9}),
        ("task_arithmetic", {"lambda": 0.7}),
        ("dare_ties", {"density": [0.5, 0.6, 0.7], "random_seed": 3}),
    ],
)
@pytest.mark.parametrize("memory", [None, 1])
def test_bfloat16_inputs_are_subtracted_as_stored_and_merge_as_in_float32(
    family: Family, tmp_path: Path, method: str, parameters: dict[str, object], memory: int | None
) -> None:
    folders = []
    for source in (family.base, *family.models):
        folder = tmp_path / source.name
        folder.mkdir()
        state = {name: tensor.bfloat16() for name, tensor in _read_all(source).items()}
        save_file(state, str(folder / "model.safetensors"))
        (folder / "config.json").write_text((source / "config.json").read_text())
        folders.append(folder)
    base, *models = folders
    weights = [1.0, 0.5, 0.8]
    per_model = {key: value for key, value in parameters.items() if isinstance(value, list)}
    recipe = {
        "merge_method": method,
        "base_model": str(base),
        "models": [
            {"model": str(m), "parameters": {"weight": w} | {k: v[i] for k, v in per_model.items()}}
            for i, (m, w) in enumerate(zip(models, weights, strict=True))
        ],
        "parameters": {k: v for k, v in parameters.items() if k not in per_model},
        "dtype": "float32",
        "out_dtype": "float32",
    }
    config = parse_merge_config(recipe)
    plan = build_plan(config)
    matrix = next(job for job in plan.jobs if len(job.shape) == 2)
    assert merge_module._input_dtype(plan, matrix, matrix.sources[0]) == torch.bfloat16
    merged = _read_all(merge_to_folder(config, tmp_path / "out", memory=memory).out_dir)
    stored = {folder: _read_all(folder) for folder in folders}
    for name, tensor in merged.items():
        expected = merge_group(
            method,
            [stored[m][name].float() for m in models],
            weights,
            stored[base][name].float(),
            tensor_name=name,
            **parameters,
        )
        assert torch.equal(tensor, expected), name


def _bfloat16_family(
    folder: Path, nan_in: int | None = None, few_values: bool = False
) -> tuple[Path, list[Path]]:
    """A base and three fine-tunes of one 1024 x 1024 bfloat16 matrix (and a small vector),
    large enough for the one-pass selection to sample its first block; ``nan_in``: the
    fine-tune with a NaN in its first row; ``few_values``: task vectors of 17 values (so a
    sample brackets each threshold at a single value)."""
    generator = torch.Generator().manual_seed(5)
    if few_values:
        base = torch.zeros(1024, 1024)
        steps = (torch.randint(-8, 9, (1024, 1024), generator=generator) / 256 for _ in range(3))
        tensors = [base, *steps]
    else:
        base = torch.randn(1024, 1024, generator=generator) * 0.02
        tensors = [base, *(base + torch.randn(1024, 1024, generator=generator) * 2e-3 for _ in range(3))]
    folders = []
    for index, tensor in enumerate(tensors):
        matrix = tensor.bfloat16()
        if nan_in is not None and index == nan_in + 1:
            matrix[0, 5] = math.nan
        model = folder / f"model{index}"
        model.mkdir()
        save_file({"big.weight": matrix, "norm.weight": matrix[0].clone()}, str(model / "model.safetensors"))
        folders.append(model)
    return folders[0], folders[1:]


def _bfloat16_ties(folder: Path, nan_in: int | None = None, few_values: bool = False) -> dict[str, object]:
    base, models = _bfloat16_family(folder, nan_in, few_values)
    return {
        "merge_method": "ties",
        "models": [
            {"model": str(m), "parameters": {"weight": w, "density": d}}
            for m, w, d in zip(models, [1.0, 0.6, -0.3], [0.5, 0.2, 0.9], strict=True)
        ],
        "base_model": str(base),
        "dtype": "float32",
        "out_dtype": "bfloat16",
    }


def _ties_in_two_blocks(folder: Path) -> tuple[Any, int, dict[str, torch.Tensor]]:
    """The bfloat16 TIES recipe, a memory budget that merges 'big.weight' in two blocks of
    rows, and the whole (unblocked) merge's tensors."""
    config = parse_merge_config(_bfloat16_ties(folder))
    plan = build_plan(config)
    job = next(job for job in plan.jobs if job.name == "big.weight")
    memory = 512 * bytes_per_row(plan, job)
    assert row_blocks(plan, job, memory) == [slice(0, 512), slice(512, 1024)]
    return config, memory, _read_all(merge_to_folder(config, folder / "whole", memory=None).out_dir)


def _merged_counting_reads(
    config: Any, memory: int, whole: dict[str, torch.Tensor], folder: Path, monkeypatch: pytest.MonkeyPatch
) -> list[tuple[str, int]]:
    """Merge ``config`` within ``memory`` into ``folder``/blocked, check it is the ``whole``
    merge bit for bit, and return each block read, as (tensor name, first row)."""
    checkpoint_type = type(open_checkpoint(folder / "model0"))
    real_load_rows = checkpoint_type.load_rows
    reads: list[tuple[str, int]] = []

    def load_rows(self: Any, name: str, start: int, stop: int) -> torch.Tensor:
        reads.append((name, start))
        tensor: torch.Tensor = real_load_rows(self, name, start, stop)
        return tensor

    monkeypatch.setattr(checkpoint_type, "load_rows", load_rows)
    blocked = _read_all(merge_to_folder(config, folder / "blocked", memory=memory).out_dir)
    for name, tensor in whole.items():
        assert torch.equal(blocked[name].view(torch.int16), tensor.view(torch.int16)), name
    return reads


def test_ties_in_two_blocks_selects_in_one_pass_and_reads_the_first_block_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config, memory, whole = _ties_in_two_blocks(tmp_path)

    def refuse(*args: object) -> float:
        raise AssertionError("another selection ran where the one-pass selection finds the thresholds")

    monkeypatch.setattr(merge_module, "gathered_kth_largest_magnitude", refuse)
    monkeypatch.setattr(merge_module, "streaming_kth_largest_magnitude", refuse)
    reads = _merged_counting_reads(config, memory, whole, tmp_path, monkeypatch)
    # the base and three fine-tunes: the last block read for the thresholds and again to merge,
    # the first block read once, for the thresholds, and merged as it was read
    assert sorted(reads) == sorted([("big.weight", 512)] * 8 + [("big.weight", 0)] * 4)


def test_ties_in_blocks_selects_another_way_where_the_bracket_misses(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config, memory, whole = _ties_in_two_blocks(tmp_path)
    monkeypatch.setattr(merge_module.BracketedSelection, "result", lambda self: None)
    blocked = _read_all(merge_to_folder(config, tmp_path / "blocked", memory=memory).out_dir)
    for name, tensor in whole.items():
        assert torch.equal(blocked[name].view(torch.int16), tensor.view(torch.int16)), name


@pytest.mark.parametrize("few_values", [False, True])
def test_a_nan_in_a_block_held_from_the_selection_is_refused_as_when_read(
    tmp_path: Path, few_values: bool
) -> None:
    config = parse_merge_config(_bfloat16_ties(tmp_path, nan_in=1, few_values=few_values))
    plan = build_plan(config)
    job = next(job for job in plan.jobs if job.name == "big.weight")
    messages = []
    # whole; two blocks, the first held from the selection; two blocks merged in one pass
    for memory in (None, 512 * bytes_per_row(plan, job), _one_pass_budget(plan, job)):
        with pytest.raises(MergeError) as error:
            merge_to_folder(config, tmp_path / f"out{memory}", memory=memory)
        messages.append(str(error.value))
    assert messages[0] == messages[1] == messages[2]
    assert "contains NaN or Inf" in messages[0] and "model2" in messages[0]


def _one_pass_budget(plan: Any, job: Any) -> int:
    """A budget that merges 'big.weight' in two blocks of 512 rows in one pass: the blocks
    and the whole merged tensor in its output dtype, held until its thresholds are proven."""
    memory = 512 * bytes_per_row(plan, job) + math.prod(job.shape) * job.out_dtype.itemsize
    assert row_blocks(plan, job, memory) == [slice(0, 512), slice(512, 1024)]
    return memory


def test_ties_in_blocks_of_bfloat16_merges_in_one_pass(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = parse_merge_config(_bfloat16_ties(tmp_path, few_values=True))
    whole = _read_all(merge_to_folder(config, tmp_path / "whole", memory=None).out_dir)
    plan = build_plan(config)
    memory = _one_pass_budget(plan, next(job for job in plan.jobs if job.name == "big.weight"))

    def refuse(*args: object) -> object:
        raise AssertionError("a threshold pass ran where one pass merges the blocks")

    monkeypatch.setattr(merge_module, "_block_pass", refuse)
    reads = _merged_counting_reads(config, memory, whole, tmp_path, monkeypatch)
    # the base and three fine-tunes, each block read once
    assert sorted(reads) == sorted([("big.weight", 512)] * 4 + [("big.weight", 0)] * 4)


def test_a_one_pass_merge_whose_values_the_counts_disprove_merges_again(tmp_path: Path) -> None:
    # the first block's task vectors are all +-1, the second's +-2: a sample of the first
    # brackets the median magnitude at 1, but it is 2 (the larger half)
    generator = torch.Generator().manual_seed(3)
    signs = torch.randint(0, 2, (2, 1024, 1024), generator=generator).float() * 2 - 1
    scale = torch.cat([torch.ones(512, 1), torch.full((512, 1), 2.0)])
    folders = []
    for index, tensor in enumerate([torch.zeros(1024, 1024), signs[0] * scale, signs[1] * scale]):
        folders.append(tmp_path / f"model{index}")
        folders[-1].mkdir()
        save_file({"big.weight": tensor.bfloat16()}, str(folders[-1] / "model.safetensors"))
    recipe = {
        "merge_method": "ties",
        "models": [{"model": str(m), "parameters": {"weight": 1.0, "density": 0.5}} for m in folders[1:]],
        "base_model": str(folders[0]),
        "dtype": "float32",
        "out_dtype": "bfloat16",
    }
    config = parse_merge_config(recipe)
    plan = build_plan(config)
    job = plan.jobs[0]
    memory = _one_pass_budget(plan, job)
    assert merge_module.merged_in_one_pass(plan, job, torch.device("cpu"), memory) is None
    whole = _read_all(merge_to_folder(config, tmp_path / "whole", memory=None).out_dir)["big.weight"]
    blocked = _read_all(merge_to_folder(config, tmp_path / "blocked", memory=memory).out_dir)["big.weight"]
    assert torch.equal(blocked.view(torch.int16), whole.view(torch.int16))
    assert torch.count_nonzero(whole[:512]) == 0 and torch.count_nonzero(whole[512:]) > 0  # trimmed at 2
