"""The process's memory: keeping it from growing with the number of batches it has seen,
reusing it across a merge's tensors, and what it holds."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import sys
from collections.abc import Iterator

# glibc's mallopt parameter numbers and defaults
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_MMAP_MAX = -4
_DEFAULT_TRIM_THRESHOLD = 128 * 1024
_DEFAULT_MMAP_MAX = 65536
_NEVER_TRIM = 2**31 - 1  # mallopt takes a C int (ctypes masks a larger number to 32 bits: 1 << 62 became 0)
MMAP_THRESHOLD = 16 << 20
MIN_TENSOR_BUDGET = 64 << 20  # the least one tensor's merge is given, whatever the process holds


@functools.cache
def steady_heap() -> bool:
    """Serve allocations of 16 MiB and more from their own mappings, returned on free (glibc only).

    By default glibc raises its mmap threshold to the size of each large block freed (up
    to 32 MiB), so a loop of forward passes serves its activations from the heap, which
    fragments: three evaluations of 25,000 224x224 images on the small ViT of
    benchmarks/bench_eval.py peaked at 2.5 GB resident (1.2 to 2.4 GB between them)
    against 1.3 GB between them and 1.5 GB at peak with the threshold fixed at 16 MiB. A lower threshold holds
    memory as flat but page-faults every activation afresh: at 1 MiB the same
    evaluations took 60% longer; at 16 MiB they take as long as glibc's default.
    Returns whether it was set.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD))
    except (OSError, AttributeError):
        return False


def _glibc() -> ctypes.CDLL | None:
    """The C library, where it is glibc (it has mallopt and malloc_trim); None elsewhere."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


@contextlib.contextmanager
def reused_heap() -> Iterator[None]:
    """Within the block, serve every allocation from the heap and keep freed memory there
    (glibc only), then give the free memory back.

    glibc maps each block above 32 MiB afresh and unmaps it on free, so a merge, which
    allocates the same large tensors over and over, page-faults every one of them on first
    touch: on the 1.1B case of benchmarks/bench_merge.py that was about half of a linear
    merge's time (9.3 s against 5.3 s with the heap reused, 2 cores), for 0.2 GB more peak
    resident memory (freed blocks of other sizes wait in the heap).
    """
    libc = _glibc()
    if libc is None:
        yield
        return
    libc.mallopt(_M_MMAP_MAX, 0)
    libc.mallopt(_M_TRIM_THRESHOLD, _NEVER_TRIM)
    try:
        yield
    finally:
        libc.mallopt(_M_MMAP_MAX, _DEFAULT_MMAP_MAX)
        libc.mallopt(_M_TRIM_THRESHOLD, _DEFAULT_TRIM_THRESHOLD)
        libc.malloc_trim(0)


def resident_bytes() -> int | None:
    """The memory this process holds resident now, where psutil can tell; None elsewhere."""
    try:
        import psutil

        return int(psutil.Process().memory_info().rss)
    except (ImportError, OSError):
        return None


def available_bytes() -> int | None:
    """The memory the system can give this process now, where psutil can tell; None elsewhere."""
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except (ImportError, OSError):
        return None


HEAP_SLACK = 2.0  # a reused heap holds up to this much more than its live blocks (1.4-1.8x measured)


def tensor_budget(ceiling: int, resident: int | None) -> int:
    """What one tensor's merge may hold so that a process holding ``resident`` bytes stays
    within ``ceiling``: the difference, less what the reused heap keeps between differently
    sized blocks (the 1.1B merges of benchmarks/bench_merge.py held 1.4-1.8x their largest
    block, varying from run to run), but at least ``MIN_TENSOR_BUDGET``."""
    return max(MIN_TENSOR_BUDGET, int((ceiling - (resident or 0)) / HEAP_SLACK))


def peak_resident_bytes() -> int | None:
    """The most memory this process has held resident so far (its peak RSS), where the
    platform reports it (Linux: kilobytes; macOS: bytes); None elsewhere."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024
