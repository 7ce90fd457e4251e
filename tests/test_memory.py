"""The allocator setting that keeps long evaluation loops from fragmenting the heap."""

from __future__ import annotations

import ctypes
import subprocess
import sys
from pathlib import Path

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


_PROBE = """
import ctypes, sys
sys.path.insert(0, sys.argv[1])
from test_memory import _libc
from m3sb.memory import MMAP_THRESHOLD, steady_heap
if sys.argv[2] == "fixed":
    assert steady_heap() is True
libc = _libc()
size = MMAP_THRESHOLD + (1 << 20)
libc.free(libc.malloc(size))
before = libc.mallinfo2()
second = libc.malloc(size)
during = libc.mallinfo2()
libc.free(second)
after = libc.mallinfo2()
print(during.hblks - before.hblks, during.hblkhd - before.hblkhd, after.hblkhd - before.hblkhd)
"""


def _probe(mode: str) -> list[int]:
    """Mapped blocks and bytes gained by the second allocation, and bytes left mapped after its
    free, in a fresh interpreter (a long-lived process may serve it from a free chunk it holds)."""
    done = subprocess.run(
        [sys.executable, "-c", _PROBE, str(Path(__file__).parent), mode],
        capture_output=True,
        text=True,
        check=True,
    )
    return [int(n) for n in done.stdout.split()]


@glibc
def test_a_large_block_freed_and_asked_for_again_still_gets_its_own_mapping() -> None:
    """glibc's default raises the threshold to a freed block's size, so the second block of
    17 MiB comes from the heap (and stays resident); with the threshold fixed, it is mapped
    and returned on free."""
    _libc()  # skips where there is no mallinfo2
    blocks, mapped, left = _probe("fixed")
    assert blocks == 1 and mapped >= MMAP_THRESHOLD + (1 << 20) and left == 0
    assert _probe("default")[0] == 0  # the behaviour the setting exists to avoid
