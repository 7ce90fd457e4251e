"""Reading the next block's inputs while one merges (the GPU pipeline's read-ahead, run here on
the CPU): the same tensors in the same order, each block read once, the same errors where an
input is bad, and no reader thread left behind."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import m3sb.merge as merge_module
from m3sb.config import parse_merge_config
from m3sb.errors import MergeError
from m3sb.merge import MergePlan, ReadAhead, build_plan, merge_tensors, row_blocks
from m3sb.toy import Family

CPU = torch.device("cpu")


def _plan(family: Family, method: str, models: list[Path] | None = None) -> MergePlan:
    densities = [0.3, 1.0, 0.6]
    entries = [
        {"model": str(m), "parameters": {"weight": w, "density": d}}
        for m, w, d in zip(models or family.models, [1.0, 0.5, 0.8], densities, strict=True)
    ]
    recipe = {"merge_method": method, "models": entries, "base_model": str(family.base)}
    return build_plan(parse_merge_config(recipe | {"parameters": {"random_seed": 3}}))


def _merged(plan: MergePlan, memory: int | None, read_ahead: bool) -> list[tuple[str, torch.Tensor]]:
    return list(merge_tensors(plan, CPU, memory=memory, read_ahead=read_ahead))


@pytest.mark.parametrize("method", ["linear", "task_arithmetic", "ties", "dare_ties", "barycenter", "della"])
@pytest.mark.parametrize("memory", [None, 3_000])
def test_reading_ahead_yields_the_same_tensors_bit_for_bit(
    family: Family, method: str, memory: int | None
) -> None:
    plan = _plan(family, method)
    if memory is not None and method != "della":  # della merges whole tensors
        assert any(row_blocks(plan, job, memory) for job in plan.jobs)
    ahead = _merged(plan, memory, read_ahead=True)
    plain = _merged(plan, memory, read_ahead=False)
    assert [name for name, _ in ahead] == [name for name, _ in plain]
    for (name, tensor), (_, expected) in zip(ahead, plain, strict=True):
        assert tensor.dtype == expected.dtype and torch.equal(tensor, expected), name


@pytest.mark.parametrize("memory", [None, 3_000])
def test_each_block_is_read_once_when_read_ahead(
    family: Family, memory: int | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    plan = _plan(family, "linear")
    reads: list[tuple[str, object]] = []
    load_rows = merge_module._load_rows

    def counted(checkpoint: object, name: str, rows: object, *args: object, **kwargs: object) -> torch.Tensor:
        reads.append((name, rows))
        return load_rows(checkpoint, name, rows, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(merge_module, "_load_rows", counted)
    _merged(plan, memory, read_ahead=False)
    plain, reads[:] = sorted(reads, key=repr), []
    _merged(plan, memory, read_ahead=True)
    assert sorted(reads, key=repr) == plain
    units = sum(len(row_blocks(plan, job, memory) or [None]) for job in plan.jobs if job.mergeable)
    sources = {len(job.sources) + (job.base is not None) for job in plan.jobs if job.mergeable}
    assert len(plain) == sources.pop() * units  # each source and the base, once a block


def _with_nan(family: Family, folder: Path, name: str) -> list[Path]:
    broken = folder / "broken"
    shutil.copytree(family.models[1], broken)
    state = load_file(broken / "model.safetensors")
    state[name][-1, -1] = float("nan")
    save_file(state, broken / "model.safetensors")
    return [family.models[0], broken, family.models[2]]


@pytest.mark.parametrize("memory", [None, 3_000])
def test_a_nan_in_a_block_read_ahead_is_refused_as_when_read(
    family: Family, tmp_path: Path, memory: int | None
) -> None:
    name = "model.layers.1.mlp.down_proj.weight"
    plan = _plan(family, "linear", _with_nan(family, tmp_path, name))
    messages = []
    for read_ahead in (False, True):
        with pytest.raises(MergeError) as error:
            _merged(plan, memory, read_ahead)
        messages.append(str(error.value))
    assert messages[0] == messages[1]
    assert name in messages[0] and "broken" in messages[0] and "NaN or Inf" in messages[0]


def test_a_read_that_fails_ahead_fails_where_the_block_is_merged(family: Family, tmp_path: Path) -> None:
    plan = _plan(family, "linear")
    names = [job.name for job in plan.jobs if job.mergeable]
    failing = names[3]
    reading = merge_module.read_block

    def read_block(plan: MergePlan, job: object, *args: object) -> object:
        if getattr(job, "name", None) == failing:
            raise MergeError(f"cannot read '{failing}'")
        return reading(plan, job, *args)  # type: ignore[arg-type]

    merged: list[str] = []
    original = merge_module.read_block
    merge_module.read_block = read_block  # type: ignore[assignment]
    try:
        with pytest.raises(MergeError, match=f"cannot read '{failing}'"):
            for name, _ in merge_tensors(plan, CPU, memory=None, read_ahead=True):
                merged.append(name)
    finally:
        merge_module.read_block = original
    assert merged == names[:3]  # every tensor before it was merged and yielded


def test_a_block_read_for_another_turn_is_dropped(family: Family) -> None:
    plan = _plan(family, "ties")
    first, second = [job for job in plan.jobs if job.mergeable and len(job.shape) == 2][:2]
    reader = ReadAhead(plan, CPU)
    try:
        reader.start(first, None)
        assert reader.take(second, None) is None  # read for 'first': not given as 'second'
        assert reader.take(first, None) is None  # and not kept
        reader.start(first, slice(0, 2))
        held = reader.take(first, slice(0, 2))
        assert held is not None and held.rows == slice(0, 2)
        assert [tuple(t.shape) for t in held.tensors] == [(2, *first.shape[1:])] * len(first.sources)
        assert held.base is not None and held.base.dtype == plan.compute_dtype
    finally:
        reader.close()


def test_stopping_early_leaves_no_reader_thread(family: Family) -> None:
    plan = _plan(family, "linear")
    tensors = merge_tensors(plan, CPU, memory=None, read_ahead=True)
    next(tensors)
    assert any(thread.name.startswith("m3sb-reader") for thread in threading.enumerate())
    tensors.close()
    assert not any(thread.name.startswith("m3sb-reader") for thread in threading.enumerate())
