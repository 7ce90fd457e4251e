"""The allocator setting that keeps long evaluation loops from fragmenting the heap."""

from __future__ import annotations

import ctypes
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from m3sb.cli import app
from m3sb.memory import HEAP_SLACK, MIN_TENSOR_BUDGET, MMAP_THRESHOLD, steady_heap, tensor_budget
from m3sb.toy import Family

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


def test_the_tensor_budget_is_the_ceiling_less_what_the_process_holds() -> None:
    assert tensor_budget(10**9, 6 * 10**8) == int(4 * 10**8 / HEAP_SLACK)
    assert tensor_budget(10**9, None) == int(10**9 / HEAP_SLACK)
    assert tensor_budget(5 * 10**8, 6 * 10**8) == MIN_TENSOR_BUDGET


@pytest.mark.parametrize(
    ("option", "budget", "noted"),
    [
        ([], int(4 * 10**8 / HEAP_SLACK), False),
        (["--memory", "2GB"], int(14 * 10**8 / HEAP_SLACK), False),
        (["--memory", "500MB"], 64 << 20, True),
    ],
)
def test_merge_gives_each_tensor_what_the_memory_ceiling_leaves(
    family: Family,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    option: list[str],
    budget: int,
    noted: bool,
) -> None:
    import m3sb.memory
    import m3sb.merge

    received: list[object] = []
    real_merge = m3sb.merge.merge_to_folder

    def recording(*args: Any, **kwargs: Any) -> Any:
        received.append(kwargs["memory"])
        return real_merge(*args, **kwargs)

    monkeypatch.setattr(m3sb.memory, "resident_bytes", lambda: 6 * 10**8)
    monkeypatch.setattr(m3sb.merge, "merge_to_folder", recording)
    recipe = tmp_path / "recipe.yml"
    recipe.write_text(
        yaml.safe_dump({"merge_method": "linear", "models": [{"model": str(m)} for m in family.models]})
    )
    result = CliRunner().invoke(app, ["merge", str(recipe), str(tmp_path / "out"), "--quiet", *option])
    assert result.exit_code == 0, result.output
    assert received == [budget]
    assert ("note: --memory 500MB is less than the 0.60 GB" in result.stderr) is noted


_REUSE_PROBE = """
import sys
sys.path.insert(0, sys.argv[1])
from test_memory import _libc
from m3sb.memory import reused_heap
libc = _libc()
size = 40 << 20  # above glibc's largest mmap threshold: always mapped by default
def mapped_blocks():
    block = libc.malloc(size)
    blocks = libc.mallinfo2().hblks
    libc.free(block)
    return blocks
def heap_kept():  # whether a freed block at the top of the heap stays in the heap
    block = libc.malloc(size)
    grown = libc.mallinfo2().arena
    libc.free(block)
    return int(libc.mallinfo2().arena >= grown)
before = mapped_blocks()
with reused_heap():
    inside = mapped_blocks()
    kept = heap_kept()
after = mapped_blocks()
print(before, inside, after, kept)
"""


@glibc
def test_a_merge_serves_large_blocks_from_the_heap_and_restores_the_default_after() -> None:
    _libc()  # skips where there is no mallinfo2
    done = subprocess.run(
        [sys.executable, "-c", _REUSE_PROBE, str(Path(__file__).parent)],
        capture_output=True,
        text=True,
        check=True,
    )
    before, inside, after, kept = (int(n) for n in done.stdout.split())
    assert (inside, after) == (before - 1, before)  # the block mapped, then from the heap, then mapped
    assert kept == 1  # not given back to the system on free (no page faults when it is reused)
