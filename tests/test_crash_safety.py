"""Crash safety of ``m3sb merge``: killed at any moment or out of disk, it leaves at OUT_DIR
either nothing or the complete model, never a partial one."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from m3sb.toy import Family, make_family

pytestmark = pytest.mark.slow
SCRIPT = str(Path(sys.executable).with_name("m3sb"))


@pytest.fixture(scope="module")
def larger_family(tmp_path_factory: pytest.TempPathFactory) -> Family:
    """Three ~20 MB fine-tunes: writing the merge takes a visible share of the run."""
    return make_family(tmp_path_factory.mktemp("larger"), n_models=3, hidden=256, layers=4, vocab=4096)


def _config(family: Family, folder: Path) -> Path:
    recipe = {
        "merge_method": "ties",
        "base_model": str(family.base),
        "models": [{"model": str(m), "parameters": {"weight": 1.0, "density": 0.5}} for m in family.models],
    }
    path = folder / "recipe.yml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def _merge(config: Path, out: Path) -> list[str]:
    return [SCRIPT, "merge", str(config), str(out), "--out-shard-size", "4MB", "--quiet"]


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    merged: dict[str, torch.Tensor] = {}
    for shard in sorted(folder.glob("*.safetensors")):
        merged |= load_file(shard)
    return merged


def _assert_nothing_or_complete(out: Path, reference: dict[str, torch.Tensor], files: set[str]) -> str:
    if not out.exists():
        return "nothing"
    assert {p.name for p in out.iterdir()} == files
    merged = _tensors(out)
    assert merged.keys() == reference.keys()
    for name, tensor in reference.items():
        assert torch.equal(merged[name], tensor), name
    return "complete"


def test_a_merge_killed_at_random_moments_leaves_nothing_or_everything(
    larger_family: Family, tmp_path: Path
) -> None:
    config = _config(larger_family, tmp_path)
    started = time.perf_counter()
    subprocess.run(_merge(config, tmp_path / "reference"), check=True, capture_output=True)
    duration = time.perf_counter() - started
    reference = _tensors(tmp_path / "reference")
    files = {p.name for p in (tmp_path / "reference").iterdir()}
    assert (
        len([f for f in files if f.endswith(".safetensors")]) >= 3
    )  # several shards: a real multi-file write
    outcomes = []
    for trial, delay in enumerate(np.random.default_rng(0).uniform(0.3 * duration, 1.1 * duration, size=6)):
        out = tmp_path / f"killed-{trial}"
        process = subprocess.Popen(_merge(config, out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(float(delay))
        process.send_signal(signal.SIGKILL)
        process.wait()
        outcomes.append(_assert_nothing_or_complete(out, reference, files))
    assert "nothing" in outcomes  # at least one kill landed mid-merge


def test_a_full_disk_is_one_line_and_leaves_no_output(larger_family: Family, tmp_path: Path) -> None:
    """``ulimit -f`` caps every file at 4 MiB; the ~20 MB output shard cannot be written."""
    config = _config(larger_family, tmp_path)
    out = tmp_path / "out"
    result = subprocess.run(
        ["bash", "-c", f"ulimit -f 4096; exec {SCRIPT} merge {config} {out} --quiet"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in result.stderr, (
        result.stderr
    )
    assert f"{out}: cannot write the merged model (File too large)" in lines[0], lines[0]
    assert not out.exists()
    assert not list(tmp_path.glob(".out.m3sb-partial-*"))


def test_a_killed_merges_leftover_is_removed_by_the_next_merge(tmp_path: Path) -> None:
    import fcntl

    from m3sb.checkpoints import atomic_output_folder

    stale = tmp_path / ".out.m3sb-partial-deadbeef"  # its run was killed: nobody holds its lock
    live = tmp_path / ".out.m3sb-partial-cafecafe"  # a run still writing: it holds the lock
    other = tmp_path / ".other.m3sb-partial-0badf00d"  # beside another output folder
    for folder in (stale, live, other):
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"half written")
    (tmp_path / ".out.m3sb-partial-deadbeef.lock").touch()
    with open(tmp_path / ".out.m3sb-partial-cafecafe.lock", "a+b") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        with atomic_output_folder(tmp_path / "out") as staging:
            (staging / "done").touch()
            assert (staging.parent / f"{staging.name}.lock").exists()
    assert (tmp_path / "out" / "done").is_file()
    assert not stale.exists() and not (tmp_path / ".out.m3sb-partial-deadbeef.lock").exists()
    assert live.exists() and other.exists()
    assert sorted(p.name for p in tmp_path.glob("*.lock")) == [".out.m3sb-partial-cafecafe.lock"]
