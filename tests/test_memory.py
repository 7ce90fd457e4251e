"""The allocator setting that keeps long evaluation loops from fragmenting the heap."""

from __future__ import annotations

import ctypes
import sys

import pytest

from m3sb.memory import MMAP_THRESHOLD, steady_heap

glibc = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(None)
    if not hasattr(libc, "mallinfo2"):
        pytest.skip("this libc has no mallinfo2 (glibc < 2.33)")
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    libc.mallinfo2.restype = _MallInfo2
    return libc


@glibc
def test_steady_heap_is_set_once_per_process() -> None:
    assert steady_heap() is True
    assert steady_heap() is True


@glibc
def test_a_large_block_freed_and_asked_for_again_still_gets_its_own_mapping() -> None:
    """glibc's default raises the threshold to a freed block's size, so the second block of
    17 MiB would come from the heap (and stay resident); with the threshold fixed, it is mapped."""
    libc = _libc()
    assert steady_heap() is True
    size = MMAP_THRESHOLD + (1 << 20)
    first = libc.malloc(size)
    libc.free(first)
    before = libc.mallinfo2()
    second = libc.malloc(size)
    try:
        during = libc.mallinfo2()
        assert during.hblks == before.hblks + 1
        assert during.hblkhd - before.hblkhd >= size
    finally:
        libc.free(second)
    assert libc.mallinfo2().hblkhd == before.hblkhd  # returned to the system on free
