"""Readers, the streaming safetensors writer and the atomic output folder."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from m3sb.checkpoints import (
    SafetensorsWriter,
    TensorInfo,
    atomic_output_folder,
    open_checkpoint,
    safetensors_byte_ranges,
)
from m3sb.errors import CheckpointError

TENSORS = {
    "a.weight": torch.randn(3, 5),
    "b.bias": torch.arange(4, dtype=torch.float16),
    "c.scalar": torch.tensor(2.5, dtype=torch.bfloat16),
    "d.ids": torch.arange(6, dtype=torch.int64).reshape(2, 3),
    "e.empty": torch.zeros(0, 7),
    "f.flags": torch.tensor([True, False, True]),
}


def _write(folder: Path, max_shard_bytes: int) -> SafetensorsWriter:
    layout = {name: TensorInfo(tuple(t.shape), t.dtype) for name, t in TENSORS.items()}
    writer = SafetensorsWriter(folder, layout, max_shard_bytes)
    for name, tensor in TENSORS.items():
        writer.write(name, tensor)
    writer.close()
    return writer


def test_single_shard_round_trips_through_the_safetensors_library(tmp_path: Path) -> None:
    _write(tmp_path, 10**9)
    loaded = load_file(tmp_path / "model.safetensors")
    assert loaded.keys() == TENSORS.keys()
    for name, tensor in TENSORS.items():
        assert loaded[name].dtype == tensor.dtype and torch.equal(loaded[name], tensor)


def test_shards_respect_the_size_limit_and_the_index_names_every_tensor(tmp_path: Path) -> None:
    writer = _write(tmp_path, 40)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(TENSORS)
    assert len(writer.shard_names) > 2
    checkpoint = open_checkpoint(tmp_path)
    for name, tensor in TENSORS.items():
        assert torch.equal(checkpoint.load(name), tensor)
    for shard in writer.shard_names:
        tensors_in_shard = load_file(tmp_path / shard)
        size = sum(t.numel() * t.element_size() for t in tensors_in_shard.values())
        assert size <= 40 or len(tensors_in_shard) == 1


def test_writer_refuses_tensors_out_of_order_or_of_the_wrong_shape(tmp_path: Path) -> None:
    layout = {"x": TensorInfo((2,), torch.float32), "y": TensorInfo((2,), torch.float32)}
    writer = SafetensorsWriter(tmp_path, layout, 10**6)
    with pytest.raises(RuntimeError, match="expected tensor 'x'"):
        writer.write("y", torch.zeros(2))
    writer = SafetensorsWriter(tmp_path, layout, 10**6)
    with pytest.raises(RuntimeError, match="expected"):
        writer.write("x", torch.zeros(3))


def test_reads_folders_lone_files_and_weights_only_pickles(tmp_path: Path) -> None:
    state = {"w": torch.randn(2, 2), "b": torch.randn(2)}
    save_file(state, tmp_path / "lone.safetensors")
    torch.save(state, tmp_path / "pytorch_model.bin")
    for location in (tmp_path / "lone.safetensors", tmp_path / "pytorch_model.bin"):
        checkpoint = open_checkpoint(location)
        assert set(checkpoint.tensors) == {"w", "b"}
        assert torch.equal(checkpoint.load("w"), state["w"])
    (tmp_path / "lone.safetensors").unlink()
    assert open_checkpoint(tmp_path).tensors["w"].shape == (2, 2)  # the folder falls back to the .bin


class _Payload:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, ("touch PWNED",))


def test_a_pickle_carrying_code_is_refused_and_never_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    torch.save({"w": torch.zeros(1), "evil": _Payload()}, tmp_path / "model.bin")
    with pytest.raises(CheckpointError, match=r"model\.bin: refused"):
        open_checkpoint(tmp_path / "model.bin")
    assert not (tmp_path / "PWNED").exists()


def test_truncated_safetensors_names_the_file(tmp_path: Path) -> None:
    save_file({"w": torch.randn(100)}, tmp_path / "model.safetensors")
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) - 50])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: not a valid safetensors file"):
        open_checkpoint(tmp_path)


def test_missing_paths_and_unreachable_hub_ids_are_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(CheckpointError, match="no such file or directory"):
        open_checkpoint(tmp_path / "nope")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match="'someone/some-model' is not a local path"):
        open_checkpoint("someone/some-model")
    with pytest.raises(CheckpointError, match="no model weights found"):
        open_checkpoint(tmp_path)


def test_atomic_folder_appears_only_when_complete(tmp_path: Path) -> None:
    destination = tmp_path / "out"
    with pytest.raises(ValueError), atomic_output_folder(destination) as staging:
        (staging / "half.txt").write_text("x")
        raise ValueError("boom")
    assert not destination.exists()
    assert list(tmp_path.iterdir()) == []
    with atomic_output_folder(destination) as staging:
        (staging / "done.txt").write_text("x")
    assert (destination / "done.txt").read_text() == "x"


def test_atomic_folder_replaces_only_with_force(tmp_path: Path) -> None:
    destination = tmp_path / "out"
    destination.mkdir()
    (destination / "old.txt").write_text("old")
    with pytest.raises(CheckpointError, match="pass --force"), atomic_output_folder(destination):
        pass
    with atomic_output_folder(destination, force=True) as staging:
        (staging / "new.txt").write_text("new")
    assert sorted(p.name for p in destination.iterdir()) == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_the_byte_range_of_each_tensor_holds_its_bytes(tmp_path: Path) -> None:
    file = tmp_path / "model.safetensors"
    save_file(TENSORS, str(file), metadata={"format": "pt"})
    data = file.read_bytes()
    ranges = safetensors_byte_ranges(file)
    assert ranges.keys() == TENSORS.keys()
    for name, (start, stop) in ranges.items():
        expected = TENSORS[name].contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        assert data[start:stop] == expected, name


@pytest.mark.skipif(not hasattr(os, "posix_fadvise"), reason="posix_fadvise")
def test_prefetch_advises_the_kernel_to_read_exactly_that_tensor(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    save_file(TENSORS, str(tmp_path / "model.safetensors"))
    advised: list[tuple[int, int, int]] = []
    monkeypatch.setattr(
        os, "posix_fadvise", lambda fd, offset, length, advice: advised.append((offset, length, advice))
    )
    checkpoint = open_checkpoint(tmp_path)
    checkpoint.prefetch("a.weight")
    start, stop = safetensors_byte_ranges(tmp_path / "model.safetensors")["a.weight"]
    assert advised == [(start, stop - start, os.POSIX_FADV_WILLNEED)] and stop - start == 15 * 4
