"""Shared fixtures: tiny real Hugging Face models built once per test session."""

from __future__ import annotations

import os
import tempfile

# Idle OpenMP threads spin by default, which stalls small tensor ops on 2-vCPU machines.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# The preprocessing cache of the whole session (CLI subprocesses too) lives in a fresh folder.
os.environ["M3SB_CACHE_DIR"] = tempfile.mkdtemp(prefix="m3sb-test-cache-")
# Ray reads this when it is imported (tests import it at collection, before m3sb's executor
# could set it): without it, a driver started by `uv run` starts every Ray worker through
# `uv run` as well, several seconds each.
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")

from pathlib import Path

import pytest

from m3sb.toy import Family, make_family


@pytest.fixture(scope="session")
def family(tmp_path_factory: pytest.TempPathFactory) -> Family:
    """A tiny random Llama base and three fine-tunes of it (float32 safetensors folders)."""
    return make_family(tmp_path_factory.mktemp("family"), n_models=3, seed=0)


@pytest.fixture(scope="session")
def family_dir(family: Family) -> Path:
    """The folder holding the toy family."""
    return family.base.parent


@pytest.fixture(scope="session")
def zoo_manifest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The digits zoo, built once per test session (about a minute on two cores)."""
    from m3sb.zoo import build_zoo

    return build_zoo(tmp_path_factory.mktemp("zoo"))


@pytest.fixture(scope="session")
def clip_zoo_manifest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The CLIP zoo, built once per test session (about 40 s on two cores)."""
    from m3sb.clip_zoo import build_clip_zoo

    return build_clip_zoo(tmp_path_factory.mktemp("clip_zoo"))


@pytest.fixture(scope="session")
def text_zoo_manifest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The text zoo, built once per test session (about 25 s on two cores)."""
    from m3sb.text_zoo import build_text_zoo

    return build_text_zoo(tmp_path_factory.mktemp("text_zoo"))
