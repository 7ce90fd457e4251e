"""Reading checkpoints lazily and writing merged ones atomically.

Readers hold no tensor data: they know each tensor's name, shape and dtype and load one
tensor on request, as a view of the memory-mapped file that pages in as it is read and
is unmapped when the tensor is freed, so a merge holds about one tensor per input at a
time. Pickle checkpoints (``.bin``) are read only through
``torch.load(weights_only=True)``, which refuses anything but tensors.

The writer streams safetensors: shard layout and headers are known before any tensor is
merged (names, shapes and dtypes are), so each merged tensor goes to disk as soon as it
is computed instead of being held until its shard is full. Everything is written into a
hidden folder beside the destination and renamed into place only when complete.
"""

from __future__ import annotations

import glob
import json
import math
import os
import pickle
import re
import shutil
import struct
import tempfile
import uuid
import zipfile
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from safetensors import SafetensorError, safe_open

from m3sb.errors import CheckpointError, first_line

try:  # POSIX: locks mark the partial folders of live runs
    import fcntl
except ImportError:  # pragma: no cover (Windows)
    fcntl = None  # type: ignore[assignment]

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
DTYPE_CODES = {dtype: code for code, dtype in SAFETENSORS_DTYPES.items()}
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
    "chat_template.jinja",
    "chat_template.json",
)
SUPPORT_FILES = ("config.json", "generation_config.json", "preprocessor_config.json", *TOKENIZER_FILES)
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class TensorInfo:
    """What is known about a tensor without reading it."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        """Size of the tensor's data in bytes."""
        return math.prod(self.shape) * self.dtype.itemsize


class Checkpoint(ABC):
    """A model's tensors, readable one at a time, and the folder its config lives in."""

    def __init__(self, label: str, folder: Path | None, files: Sequence[Path]) -> None:
        self.label = label
        self.folder = folder
        self.files = tuple(files)

    @property
    @abstractmethod
    def tensors(self) -> dict[str, TensorInfo]:
        """Every tensor's name, shape and dtype, in the checkpoint's order."""

    @abstractmethod
    def load(self, name: str) -> torch.Tensor:
        """Read one tensor (on the CPU)."""

    def load_head(self, name: str, count: int) -> torch.Tensor:
        """The first ``count`` entries along the first axis of one tensor (of a 0-D tensor: it)."""
        tensor = self.load(name)
        return tensor if tensor.dim() == 0 else tensor[:count]

    def load_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` (along the first axis) of one tensor."""
        return self.load(name)[start:stop]

    def prefetch(self, name: str) -> None:
        """Ask the operating system to start reading one tensor into its page cache, without
        waiting for it (safetensors on Linux; elsewhere nothing)."""
        return None

    def read_config(self) -> dict[str, object]:
        """The model's config.json as a dict, or an empty dict when there is none."""
        if self.folder is None or not (self.folder / "config.json").is_file():
            return {}
        try:
            data = json.loads((self.folder / "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            raise CheckpointError(f"{self.folder / 'config.json'}: unreadable: {error}") from None
        return data if isinstance(data, dict) else {}


FINGERPRINT_TENSOR_LIMIT = 1 << 16  # tensors this small (norms, biases) are hashed whole


def content_fingerprint(checkpoint: Checkpoint) -> str:
    """A short hash that tells fine-tunes of one architecture apart: every tensor's name,
    shape and dtype, the bytes of the small ones and the first row of the others (a
    fine-tune, LoRA's included, changes every row of the matrices it touches)."""
    import hashlib

    digest = hashlib.blake2b(digest_size=12)
    for name, info in sorted(checkpoint.tensors.items()):
        digest.update(f"{name}:{list(info.shape)}:{info.dtype}".encode())
        if math.prod(info.shape) <= FINGERPRINT_TENSOR_LIMIT:
            part = checkpoint.load(name)
        else:
            part = checkpoint.load_head(name, 1 if len(info.shape) > 1 else FINGERPRINT_TENSOR_LIMIT)
        digest.update(part.reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class SafetensorsCheckpoint(Checkpoint):
    """One or more safetensors files (a sharded checkpoint keeps one file per shard)."""

    def __init__(self, label: str, folder: Path | None, files: Sequence[Path]) -> None:
        super().__init__(label, folder, files)
        self._file_of: dict[str, Path] = {}
        self._infos: dict[str, TensorInfo] = {}
        self._byte_ranges: dict[Path, dict[str, tuple[int, int]]] = {}
        for file in files:
            for name, info in _read_safetensors_header(file).items():
                self._file_of[name] = file
                self._infos[name] = info

    @property
    def tensors(self) -> dict[str, TensorInfo]:
        return self._infos

    def load(self, name: str) -> torch.Tensor:
        file = self._file_of[name]
        try:
            with safe_open(str(file), framework="pt", device="cpu") as handle:
                tensor: torch.Tensor = handle.get_tensor(name)
                return tensor
        except (SafetensorError, OSError, RuntimeError) as error:
            raise CheckpointError(f"{file}: cannot read tensor '{name}': {error}") from None

    def prefetch(self, name: str) -> None:
        if not hasattr(os, "posix_fadvise"):
            return
        file = self._file_of[name]
        if file not in self._byte_ranges:
            self._byte_ranges[file] = safetensors_byte_ranges(file)
        start, stop = self._byte_ranges[file][name]
        try:
            descriptor = os.open(file, os.O_RDONLY)
            try:
                os.posix_fadvise(descriptor, start, stop - start, os.POSIX_FADV_WILLNEED)
            finally:
                os.close(descriptor)
        except OSError:
            pass  # advice only: the read that follows reports what is wrong with the file

    def load_head(self, name: str, count: int) -> torch.Tensor:
        if not self._infos[name].shape:
            return self.load(name)
        return self.load_rows(name, 0, count)

    def load_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        file = self._file_of[name]
        try:
            with safe_open(str(file), framework="pt", device="cpu") as handle:
                rows: torch.Tensor = handle.get_slice(name)[start:stop]  # reads those rows only
                return rows
        except (SafetensorError, OSError, RuntimeError) as error:
            raise CheckpointError(f"{file}: cannot read tensor '{name}': {error}") from None


class PickleCheckpoint(Checkpoint):
    """A PyTorch ``.bin`` state dict, loaded with ``weights_only=True`` (never runs code)."""

    def __init__(self, label: str, folder: Path | None, files: Sequence[Path]) -> None:
        super().__init__(label, folder, files)
        self._state: dict[str, torch.Tensor] = {}
        for file in files:
            self._state.update(_load_pickle_state_dict(file))
        self._infos = {
            name: TensorInfo(tuple(tensor.shape), tensor.dtype) for name, tensor in self._state.items()
        }

    @property
    def tensors(self) -> dict[str, TensorInfo]:
        return self._infos

    def load(self, name: str) -> torch.Tensor:
        return self._state[name]


def safetensors_byte_ranges(file: Path) -> dict[str, tuple[int, int]]:
    """Where each tensor's bytes lie in a safetensors file: ``(start, stop)`` from the file's
    beginning (after the 8-byte header length and the JSON header)."""
    with open(file, "rb") as handle:
        header_length = int.from_bytes(handle.read(8), "little")
        header = json.loads(handle.read(header_length))
    data_start = 8 + header_length
    return {
        name: (data_start + entry["data_offsets"][0], data_start + entry["data_offsets"][1])
        for name, entry in header.items()
        if name != "__metadata__"
    }


def _read_safetensors_header(file: Path) -> dict[str, TensorInfo]:
    """Names, shapes and dtypes of a safetensors file; checks the file is complete."""
    try:
        with safe_open(str(file), framework="pt", device="cpu") as handle:
            infos = {}
            for name in handle.keys():  # noqa: SIM118 (safe_open is not a mapping)
                view = handle.get_slice(name)
                dtype = SAFETENSORS_DTYPES.get(view.get_dtype())
                if dtype is None:
                    raise CheckpointError(f"{file}: tensor '{name}' has unsupported dtype {view.get_dtype()}")
                infos[name] = TensorInfo(tuple(view.get_shape()), dtype)
            return infos
    except SafetensorError as error:
        raise CheckpointError(f"{file}: not a valid safetensors file ({error})") from None
    except OSError as error:
        raise CheckpointError(f"{file}: cannot read: {error.strerror or error}") from None


def _load_pickle_state_dict(file: Path) -> dict[str, torch.Tensor]:
    """Load a pickle checkpoint that holds tensors only; anything else is refused, not run."""
    try:
        mmap = zipfile.is_zipfile(file)
        state = torch.load(file, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as error:
        reason = str(error).splitlines()[-1].strip() if str(error) else "not a tensor checkpoint"
        raise CheckpointError(
            f"{file}: refused: the pickle holds more than tensors and was not run ({reason[:160]}); "
            "convert it to safetensors from a trusted environment"
        ) from None
    except (RuntimeError, OSError, EOFError, ValueError) as error:
        raise CheckpointError(f"{file}: not a readable PyTorch checkpoint ({error})") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{file}: expected a dict of tensors (a state dict)")
    return state


def _shards_from_index(index_file: Path) -> list[Path]:
    """The shard files listed by a ``*.index.json`` weight map, each checked to exist."""
    try:
        weight_map = json.loads(index_file.read_text(encoding="utf-8"))["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise CheckpointError(f"{index_file}: not a valid shard index ({error})") from None
    if (
        not isinstance(weight_map, dict)
        or not weight_map
        or not all(isinstance(v, str) and v and "/" not in v for v in weight_map.values())
    ):
        raise CheckpointError(f"{index_file}: 'weight_map' must map tensor names to shard file names")
    shards = sorted({index_file.parent / name for name in weight_map.values()})
    for shard in shards:
        if not shard.is_file():
            raise CheckpointError(f"{index_file}: lists shard {shard.name}, which does not exist")
    return shards


def _open_file(label: str, file: Path) -> Checkpoint:
    """A checkpoint from one file: safetensors, a shard index, or a pickle."""
    if file.name.endswith(".index.json"):
        shards = _shards_from_index(file)
        kind = SafetensorsCheckpoint if shards[0].suffix == ".safetensors" else PickleCheckpoint
        return kind(label, file.parent, shards)
    if file.suffix == ".safetensors":
        return SafetensorsCheckpoint(
            label, file.parent if (file.parent / "config.json").is_file() else None, [file]
        )
    if file.suffix in (".bin", ".pt", ".pth"):
        return PickleCheckpoint(
            label, file.parent if (file.parent / "config.json").is_file() else None, [file]
        )
    raise CheckpointError(f"{file}: unknown checkpoint format (expected .safetensors, .bin or an index.json)")


def _open_folder(label: str, folder: Path) -> Checkpoint:
    """A checkpoint from a Hugging Face model folder, preferring safetensors."""
    for name in ("model.safetensors.index.json", "model.safetensors"):
        if (folder / name).is_file():
            return _open_file(label, folder / name)
    safetensors_files = sorted(folder.glob("*.safetensors"))
    if safetensors_files:
        return SafetensorsCheckpoint(label, folder, safetensors_files)
    for name in ("pytorch_model.bin.index.json", "pytorch_model.bin"):
        if (folder / name).is_file():
            return _open_file(label, folder / name)
    raise CheckpointError(
        f"{folder}: no model weights found "
        "(looked for model.safetensors, sharded safetensors, pytorch_model.bin)"
    )


CONFIG_PATTERNS = ("*.json", "*.txt", "*.model", "*.jinja")
WEIGHT_PATTERNS = ("*.safetensors", "*.safetensors.index.json", *CONFIG_PATTERNS)


def download_from_hub(repo_id: str, patterns: Sequence[str]) -> Path:
    """Fetch the files of a hub repository that match ``patterns`` into the local cache."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, allow_patterns=list(patterns)))
    except Exception as error:  # noqa: BLE001 (any hub failure becomes one line)
        raise CheckpointError(
            f"'{repo_id}' is not a local path and could not be fetched from the Hugging Face Hub "
            f"({first_line(error)[:200]})"
        ) from None


def model_folder(location: str) -> Path:
    """The local folder of a model given as a folder, a file in one, or a hub id (config files only);
    for ``MODEL+ADAPTER``, the model's."""
    path = Path(location).expanduser()
    if not path.exists() and "+" in location:
        location = location.rpartition("+")[0]
        path = Path(location).expanduser()
    if path.is_dir():
        return path
    if path.is_file():
        return path.parent
    if HUB_ID.match(location):
        return download_from_hub(location, CONFIG_PATTERNS)
    raise CheckpointError(f"{location}: no such file or directory")


def open_checkpoint(location: str | Path) -> Checkpoint:
    """Open a model folder, a weights file, or a Hugging Face Hub id, without reading tensors;
    ``MODEL+ADAPTER`` opens the model with a LoRA adapter applied as tensors are read."""
    path = Path(location).expanduser()
    label = str(location)
    if isinstance(location, str) and not path.exists() and "+" in location:
        from m3sb.lora import open_with_adapter, split_reference

        parts = split_reference(location)
        if parts is not None:
            return open_with_adapter(location, *parts)
    if path.is_dir():
        return _open_folder(label, path)
    if path.is_file():
        return _open_file(label, path)
    if isinstance(location, str) and HUB_ID.match(location) and not location.startswith((".", "/")):
        return _open_folder(label, download_from_hub(location, WEIGHT_PATTERNS))
    raise CheckpointError(f"{location}: no such file or directory")


def copy_support_files(
    source: Path | None,
    destination: Path,
    overrides: dict[str, object],
    names: Sequence[str] = SUPPORT_FILES,
) -> None:
    """Copy config.json (with ``overrides`` applied) and tokenizer files from a model folder."""
    if source is None:
        return
    for name in names:
        file = source / name
        if not file.is_file():
            continue
        if name == "config.json" and overrides:
            config = json.loads(file.read_text(encoding="utf-8"))
            config.update(overrides)
            (destination / name).write_text(
                json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8"
            )
        else:
            shutil.copyfile(file, destination / name)


@dataclass(frozen=True)
class _Slot:
    """Where one tensor goes: its shard and its byte range within that shard's data."""

    shard: int
    begin: int
    end: int


STAGING_LIMIT = 64 << 20  # tensors up to this size are copied into the writer's own buffer


class SafetensorsWriter:
    """Writes tensors, in a fixed order, straight into pre-planned safetensors shards.

    The bytes of one tensor are written on a background thread while the caller merges
    the next one; at most one tensor waits to be written. A tensor of up to
    ``STAGING_LIMIT`` bytes is first copied into a buffer the writer keeps, so that the
    caller's tensor is freed when ``write`` returns, not whenever the thread is done with
    it: where the thread freed it, the reused heap of a merge grew by 0.1-0.3 GB more on
    some runs than on others (the 1.1B linear merge of benchmarks/bench_merge.py peaked at
    0.77-0.99 GB, against 0.72-0.74 GB when written without a thread).
    """

    def __init__(self, folder: Path, layout: dict[str, TensorInfo], max_shard_bytes: int) -> None:
        self.folder = folder
        self.layout = layout
        self._slots, self._shard_infos = _plan_shards(layout, max_shard_bytes)
        count = len(self._shard_infos)
        self.shard_names = (
            ["model.safetensors"]
            if count == 1
            else [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
        )
        self._order = iter(layout)
        self._handle: BinaryIO | None = None
        self._open_shard = -1
        self._written = 0
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="m3sb-writer")
        self._pending: Future[None] | None = None
        self._current: str | None = None  # the tensor whose rows are being written, block by block
        self._current_bytes = 0
        self._staging = np.empty(0, dtype=np.uint8)  # free whenever no write is pending

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Append the next tensor of the layout, whole or as consecutive blocks of its leading
        rows (the next block of the same name until all its bytes are written); names must
        arrive in layout order."""
        if self._current is None:
            expected = next(self._order, None)
            if name != expected:
                raise RuntimeError(f"writer expected tensor '{expected}', got '{name}'")
            self._current, self._current_bytes = name, 0
        elif name != self._current:
            raise RuntimeError(f"writer expected the rest of tensor '{self._current}', got '{name}'")
        info = self.layout[name]
        shape = tuple(tensor.shape)
        rows = len(shape) >= 1 and len(shape) == len(info.shape) and shape[1:] == info.shape[1:]
        if tensor.dtype != info.dtype or not (shape == info.shape or rows):
            raise RuntimeError(f"tensor '{name}': expected {info}, got {shape} {tensor.dtype}")
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
        first = self._current_bytes == 0
        self._current_bytes += data.nbytes
        if self._current_bytes > info.nbytes:
            raise RuntimeError(f"tensor '{name}': expected {info.shape[0]} rows in all, got more")
        if self._current_bytes == info.nbytes:
            self._current = None
        self._wait()
        if data.nbytes <= STAGING_LIMIT:
            if self._staging.nbytes < data.nbytes:
                self._staging = np.empty(data.nbytes, dtype=np.uint8)
            staged = self._staging[: data.nbytes]
            np.copyto(staged, data)
            data = staged
        self._pending = self._worker.submit(self._write_bytes, name, data, first)

    def close(self) -> None:
        """Finish the last shard and write the index (when there are several shards)."""
        try:
            self._wait()
        finally:
            self._worker.shutdown(wait=True)
        if self._current is not None or next(self._order, None) is not None:
            raise RuntimeError("writer closed before every tensor was written")
        while self._open_shard < len(self._shard_infos) - 1:  # shards with no tensors left to write
            self._shard(self._open_shard + 1)
        if self._handle is not None:
            self._handle.close()
            self._handle = None
        if len(self.shard_names) > 1:
            weight_map = {name: self.shard_names[slot.shard] for name, slot in self._slots.items()}
            total = sum(info.nbytes for info in self.layout.values())
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (self.folder / "model.safetensors.index.json").write_text(
                json.dumps(index, indent=2) + "\n", encoding="utf-8"
            )

    def abort(self) -> None:
        """Stop writing (after an error elsewhere): wait for the thread and close the file."""
        self._worker.shutdown(wait=True, cancel_futures=True)
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def _wait(self) -> None:
        """Wait for the tensor being written; re-raise its error (a full disk, say)."""
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()

    def _write_bytes(self, name: str, data: np.ndarray, first: bool) -> None:
        slot = self._slots[name]
        handle = self._shard(slot.shard)
        if first and self._written != slot.begin:
            raise RuntimeError(f"tensor '{name}': shard offset {self._written}, planned {slot.begin}")
        handle.write(data.data)
        self._written += data.nbytes

    def _shard(self, shard: int) -> BinaryIO:
        """The open file of ``shard``, opening it (header written) and closing the previous one."""
        if shard != self._open_shard:
            if self._handle is not None:
                self._handle.close()
            self._handle = open(self.folder / self.shard_names[shard], "wb")  # noqa: SIM115
            self._handle.write(_safetensors_header(self._shard_infos[shard], self._slots, self.layout))
            self._open_shard = shard
            self._written = 0
        assert self._handle is not None
        return self._handle


def _plan_shards(
    layout: dict[str, TensorInfo], max_shard_bytes: int
) -> tuple[dict[str, _Slot], list[list[str]]]:
    """Assign tensors, in order, to shards of at most ``max_shard_bytes`` (a bigger tensor gets its own)."""
    slots: dict[str, _Slot] = {}
    shards: list[list[str]] = [[]]
    used = 0
    for name, info in layout.items():
        size = info.nbytes
        if shards[-1] and used + size > max_shard_bytes:
            shards.append([])
            used = 0
        slots[name] = _Slot(len(shards) - 1, used, used + size)
        shards[-1].append(name)
        used += size
    return slots, shards


def _safetensors_header(names: list[str], slots: dict[str, _Slot], layout: dict[str, TensorInfo]) -> bytes:
    """The length-prefixed, 8-byte-aligned JSON header of a safetensors file."""
    entries: dict[str, object] = {"__metadata__": {"format": "pt"}}
    for name in names:
        info, slot = layout[name], slots[name]
        entries[name] = {
            "dtype": DTYPE_CODES[info.dtype],
            "shape": list(info.shape),
            "data_offsets": [slot.begin, slot.end],
        }
    header = json.dumps(entries, separators=(",", ":")).encode("utf-8")
    header += b" " * (-len(header) % 8)
    return struct.pack("<Q", len(header)) + header


def _remove_stale_partials(destination: Path) -> None:
    """Remove the hidden partial folders that killed runs left beside ``destination``.

    A run holds an exclusive lock on ``<partial folder>.lock`` while it writes; a folder
    whose lock can be taken has no live owner (on this machine or any other that shares
    the file system and its locks). Without ``fcntl`` nothing is removed.
    """
    if fcntl is None or not destination.parent.is_dir():
        return
    for folder in destination.parent.glob(f"{glob.escape(f'.{destination.name}.m3sb-partial-')}*"):
        if not folder.is_dir():
            continue
        owner = _lock(folder.with_name(folder.name + ".lock"), wait=False)
        if owner is None:
            continue  # a live run is writing it
        shutil.rmtree(folder, ignore_errors=True)
        _unlock(owner)


def _lock(path: Path, wait: bool) -> Any:
    """An open file holding an exclusive lock on ``path`` (None if another process holds it)."""
    assert fcntl is not None
    handle = open(path, "a+b")  # noqa: SIM115 (held until _unlock)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
    except OSError:
        handle.close()
        return None
    return handle


def _unlock(handle: Any) -> None:
    """Release and remove a lock taken by :func:`_lock`."""
    Path(handle.name).unlink(missing_ok=True)
    handle.close()


def check_output_folder(destination: Path, force: bool = False) -> None:
    """Refuse an output path that is a file, or a non-empty folder unless ``force``."""
    destination = destination.expanduser().absolute()
    if destination.exists() and not destination.is_dir():
        raise CheckpointError(f"{destination}: exists and is not a folder")
    if destination.is_dir() and any(destination.iterdir()) and not force:
        raise CheckpointError(f"{destination}: folder exists and is not empty (pass --force to replace it)")


@contextmanager
def atomic_output_folder(destination: Path, force: bool = False) -> Iterator[Path]:
    """Yield a hidden folder beside ``destination``; move it there only if the block succeeds.

    An existing non-empty ``destination`` is an error unless ``force``, in which case it
    is replaced only after the new folder is complete. Partial folders left beside it by
    killed runs are removed first.
    """
    destination = destination.expanduser().absolute()
    check_output_folder(destination, force)
    created = next((p for p in reversed(destination.parents) if not p.exists()), None)
    token = uuid.uuid4().hex[:8]
    staging = destination.parent / f".{destination.name}.m3sb-partial-{token}"
    _remove_stale_partials(destination)
    try:
        destination.parent.mkdir(parents=True, exist_ok=True)
        owner = _lock(staging.with_name(staging.name + ".lock"), wait=True) if fcntl is not None else None
    except OSError as error:
        raise CheckpointError(f"{destination}: cannot create the output folder ({error.strerror})") from None
    try:
        staging.mkdir()
    except OSError as error:
        if owner is not None:
            _unlock(owner)
        raise CheckpointError(f"{destination}: cannot create the output folder ({error.strerror})") from None
    try:
        try:
            yield staging
        except BaseException:
            shutil.rmtree(created or staging, ignore_errors=True)
            raise
        retired = destination.parent / f".{destination.name}.m3sb-old-{token}"
        if destination.exists():
            destination.replace(retired)
        staging.replace(destination)
        shutil.rmtree(retired, ignore_errors=True)
    finally:
        if owner is not None:
            _unlock(owner)


def _umask() -> int:
    """The process's umask (read by setting it and setting it back)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def append_text_durably(path: Path, text: str) -> None:
    """Append ``text`` to ``path`` and make it durable (fsync) before returning."""
    with open(path, "a", encoding="utf-8", newline="") as file:
        file.write(text)
        file.flush()
        os.fsync(file.fileno())


def write_text_atomic(path: Path, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file renamed into place."""
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8", newline="") as file:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        Path(temporary).chmod(0o666 & ~_umask())
        Path(temporary).replace(path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path
