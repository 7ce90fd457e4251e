"""Keeping the process's memory from growing with the number of batches it has seen."""

from __future__ import annotations

import ctypes
import functools
import sys

_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number
MMAP_THRESHOLD = 16 << 20


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


def peak_resident_bytes() -> int | None:
    """The most memory this process has held resident so far (its peak RSS), where the
    platform reports it (Linux: kilobytes; macOS: bytes); None elsewhere."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024
