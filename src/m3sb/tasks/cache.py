"""The preprocessing cache: each split is decoded and preprocessed once, stored on disk,
and streamed from there in batches.

An entry is a folder named by a key: the dataset's fingerprint (``datasets``' own, the
rows selected, the files behind it), the columns, and the preprocessor's class and
configuration. A change to any of them makes another key. The folder holds
``values.bin`` (the preprocessed examples, raw, row after row), ``labels.npy`` and
``meta.json``; it is built in a staging folder and renamed into place, so an entry is
complete or absent. An entry that does not read back as it should is rebuilt, never
trusted.

Batches are read with ``readinto`` into one reused buffer: the split lives in the page
cache (shared by every run and worker on the machine), not in the process, so memory
does not grow with the split. Decoding and preprocessing run in DataLoader workers.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from m3sb.errors import first_line

CACHE_VERSION = 1
CACHE_ENV = "M3SB_CACHE_DIR"
VALUES, LABELS, META = "values.bin", "labels.npy", "meta.json"
WORKER_THRESHOLD = 1024  # smaller splits are preprocessed in the process (workers cost more to start)


def cache_root(explicit: str | Path | None = None) -> Path:
    """Where cache entries live: ``explicit``, else ``$M3SB_CACHE_DIR``, else ``~/.cache/m3sb/eval``."""
    if explicit is not None:
        return Path(explicit).expanduser()
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "m3sb" / "eval"


def dataset_identity(dataset: Any) -> dict[str, Any]:
    """What identifies a ``datasets.Dataset``'s rows: its fingerprint, length and backing files."""
    files = []
    for entry in getattr(dataset, "cache_files", None) or []:
        name = entry.get("filename") if isinstance(entry, dict) else None
        if name:
            with contextlib.suppress(OSError):
                stat = Path(name).stat()
                files.append([str(name), stat.st_size, stat.st_mtime_ns])
    return {"fingerprint": getattr(dataset, "_fingerprint", None), "rows": len(dataset), "files": files}


def cache_key(parts: dict[str, Any]) -> str:
    """A short stable hash of ``parts`` (JSON, keys sorted)."""
    text = json.dumps({"version": CACHE_VERSION, **parts}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


@dataclass(frozen=True)
class CachedSplit:
    """A preprocessed split on disk: ``count`` examples of ``shape`` and ``dtype``, and their labels.

    Picklable and small (a path, the labels): what executors ship to workers.
    """

    folder: Path
    shape: tuple[int, ...]
    dtype: str
    labels: torch.Tensor
    skipped: int

    @property
    def count(self) -> int:
        """How many examples the split holds."""
        return len(self.labels)

    def batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """``(values, labels)`` batches in order; ``values`` views a reused buffer, valid until the next.

        The next batch is read in a thread while the caller works on this one (two buffers
        in turn), so reading overlaps the forward pass.
        """
        dtype = np.dtype(self.dtype)
        rows = min(batch_size, max(1, self.count))
        buffers = [np.empty((rows, *self.shape), dtype=dtype) for _ in range(2 if self.count > rows else 1)]
        starts = list(range(0, self.count, batch_size))
        path = self.folder / VALUES

        def read(handle: Any, index: int) -> np.ndarray:
            size = min(batch_size, self.count - starts[index])
            view = buffers[index % len(buffers)][:size]
            _read_exactly(handle, view.data.cast("B"), path)
            return view

        with open(path, "rb", buffering=0) as handle, ThreadPoolExecutor(1) as reader:
            pending = reader.submit(read, handle, 0) if starts else None
            for index, start in enumerate(starts):
                assert pending is not None
                view = pending.result()
                pending = reader.submit(read, handle, index + 1) if index + 1 < len(starts) else None
                yield torch.from_numpy(view), self.labels[start : start + len(view)]

    def values(self) -> torch.Tensor:
        """Every example at once (for small splits and tests)."""
        return (
            torch.cat([values.clone() for values, _ in self.batches(4096)]) if self.count else torch.empty(0)
        )


def _read_exactly(handle: Any, target: memoryview, path: Path) -> None:
    """Fill ``target`` from ``handle``: a raw read may return less (at most 2 GiB per call on
    Linux, or fewer bytes when interrupted), so read until it is full or the file ends."""
    done = 0
    while done < len(target):
        count = handle.readinto(target[done:])
        if not count:
            raise OSError(f"{path}: shorter than its meta.json says")
        done += count


def open_entry(folder: Path, key: str) -> CachedSplit | None:
    """The entry in ``folder`` if it is complete and consistent; None otherwise."""
    try:
        meta = json.loads((folder / META).read_text(encoding="utf-8"))
        if meta.get("key") != key or meta.get("version") != CACHE_VERSION:
            return None
        shape = tuple(int(n) for n in meta["shape"])
        dtype = np.dtype(str(meta["dtype"]))
        labels = np.load(folder / LABELS, allow_pickle=False)
        count = int(meta["count"])
        if labels.shape != (count,) or labels.dtype != np.int64:
            return None
        if (folder / VALUES).stat().st_size != count * int(np.prod(shape, dtype=np.int64)) * dtype.itemsize:
            return None
        return CachedSplit(folder, shape, dtype.str, torch.from_numpy(labels), int(meta["skipped"]))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


@dataclass(frozen=True)
class Preprocessed:
    """One preprocessed batch: which rows survived, their values and their labels."""

    values: np.ndarray
    labels: np.ndarray
    skipped: int


def build_entry(
    root: Path,
    key: str,
    count: int,
    batches: Callable[[], Iterator[Preprocessed]],
    describe: dict[str, Any],
) -> CachedSplit:
    """Write the batches that ``batches()`` yields as the entry ``key`` under ``root`` and open it."""
    root.mkdir(parents=True, exist_ok=True)
    target = root / key
    staging = root / f".{key}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        labels, skipped, shape, dtype = [], 0, None, None
        with open(staging / VALUES, "wb") as handle:
            for batch in batches():
                skipped += batch.skipped
                if not len(batch.labels):
                    continue
                values = np.ascontiguousarray(batch.values)
                if shape is None:
                    shape, dtype = values.shape[1:], values.dtype
                elif values.shape[1:] != shape or values.dtype != dtype:
                    raise ValueError(
                        f"preprocessed examples differ in shape or dtype ({list(shape)} {dtype} then "
                        f"{list(values.shape[1:])} {values.dtype})"
                    )
                handle.write(values.data.cast("B"))
                labels.append(np.asarray(batch.labels, dtype=np.int64))
        kept = np.concatenate(labels) if labels else np.empty(0, dtype=np.int64)
        np.save(staging / LABELS, kept, allow_pickle=False)
        meta = {
            "version": CACHE_VERSION,
            "key": key,
            "count": len(kept),
            "skipped": skipped,
            "shape": list(shape or ()),
            "dtype": (dtype or np.dtype(np.float32)).str,
            "source_rows": count,
            **describe,
        }
        (staging / META).write_text(json.dumps(meta, indent=1, default=str) + "\n", encoding="utf-8")
        if target.exists():
            shutil.rmtree(target, ignore_errors=True)  # an unreadable entry of the same key
        try:
            staging.replace(target)
        except OSError:  # another process finished the same entry first: use theirs
            shutil.rmtree(staging, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    opened = open_entry(target, key)
    if opened is None:
        raise OSError(f"{target}: the cache entry just written does not read back")
    return opened


def loader_workers(count: int, requested: int | None = None) -> int:
    """DataLoader workers for preprocessing ``count`` examples: none for small splits."""
    if requested is not None:
        return max(0, requested)
    if count < WORKER_THRESHOLD:
        return 0
    return max(1, min(4, (os.cpu_count() or 1)))


def describe_error(error: BaseException) -> str:
    """An exception as a short phrase for one-line messages."""
    return first_line(error)[:200]
