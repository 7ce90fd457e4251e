"""The bad-input matrix: every kind of wrong input to ``m3sb merge``, ``experiment`` and
``pareto`` ends with a non-zero exit status, exactly one ``error:`` line that names the
culprit, no traceback, and nothing at the output path. Beside it, the odd inputs that are
not errors (empty tensors, mixed dtypes, tied weights, unicode paths, aliased duplicate
paths) must merge, and merge correctly. Last, Hypothesis feeds random documents and
random bytes to the config loaders: only a one-line ConfigError may come out.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from m3sb.cli import app
from m3sb.config import (
    DTYPE_ALIASES,
    ExperimentConfig,
    MergeConfig,
    ModelEntry,
    ParetoConfig,
    ParetoTaskConfig,
    _validated,
    load_experiment_config,
    load_merge_config,
    load_pareto_config,
    parse_merge_config,
)
from m3sb.errors import ConfigError
from m3sb.toy import Family

runner = CliRunner()
UNICODE_NAME = "modèle ü 😀"
Recipe = dict[str, Any] | str
Builder = Callable[[Family, Path], Recipe]


# --------------------------------------------------------------------------- helpers


def _write(path: Path, document: Recipe) -> Path:
    """A YAML file holding ``document`` (a raw string is written as is)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = document if isinstance(document, str) else yaml.safe_dump(document, allow_unicode=True)
    path.write_text(text, encoding="utf-8")
    return path


def _invoke(*arguments: str) -> tuple[int, str, str]:
    """Run the CLI in-process: (exit code, stderr, everything printed)."""
    result = runner.invoke(app, list(arguments))
    return result.exit_code, result.stderr, result.output


def _run_module(*arguments: str, cwd: Path) -> tuple[int, str, str]:
    """Run ``python -m m3sb.cli`` for the true exit status and stderr."""
    process = subprocess.run(
        [sys.executable, "-m", "m3sb.cli", *arguments],
        capture_output=True,
        text=True,
        check=False,
        cwd=cwd,
        env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"},
    )
    return process.returncode, process.stderr, process.stdout + process.stderr


def _assert_refused(code: int, stderr: str, output: str, pattern: str, out: Path) -> None:
    """Non-zero exit, one ``error:`` line matching ``pattern``, no traceback, nothing at ``out``."""
    problems = []
    if code == 0:
        problems.append("exit status 0")
    lines = stderr.strip().splitlines()
    if len(lines) != 1:
        problems.append(f"{len(lines)} lines on stderr")
    elif not lines[0].startswith("error:"):
        problems.append("the line does not start with 'error:'")
    elif not re.search(pattern, lines[0]):
        problems.append(f"the line does not name the culprit ({pattern!r})")
    if "Traceback" in output or "Traceback" in stderr:
        problems.append("a traceback was printed")
    if out.exists():
        problems.append(f"{out} was created (holding {sorted(p.name for p in out.iterdir())})")
    if out.parent.exists():
        beside = [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]
        if beside:
            problems.append(f"left beside {out.name}: {beside}")
    assert not problems, "; ".join(problems) + f"\nstderr: {stderr}"


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    merged: dict[str, torch.Tensor] = {}
    for shard in sorted(folder.glob("*.safetensors")):
        merged |= load_file(shard)
    return merged


def _merge_ok(config: Path, out: Path, *options: str) -> dict[str, torch.Tensor]:
    """Merge in-process, expecting success; the merged tensors."""
    code, stderr, output = _invoke("merge", str(config), str(out), "--quiet", *options)
    assert code == 0, output + stderr
    return _tensors(out)


def _clone(
    source: Path,
    target: Path,
    change: Callable[[dict[str, torch.Tensor]], None] | None = None,
    dtype: torch.dtype | None = None,
) -> Path:
    """A copy of a model folder, its state dict edited by ``change`` and/or cast to ``dtype``."""
    shutil.copytree(source, target)
    if change is not None or dtype is not None:
        state = load_file(target / "model.safetensors")
        if dtype is not None:
            state = {name: tensor.to(dtype) for name, tensor in state.items()}
        if change is not None:
            change(state)
        save_file(state, target / "model.safetensors")
    return target


def _others(family: Family, **parameters: Any) -> list[dict[str, Any]]:
    """Fine-tunes 1 and 2 as recipe entries."""
    return [{"model": str(p), "parameters": dict(parameters)} for p in family.models[1:]]


def _with(family: Family, extra: Path | str, **parameters: Any) -> list[dict[str, Any]]:
    """Fine-tunes 1 and 2, then ``extra``."""
    return [*_others(family, **parameters), {"model": str(extra), "parameters": dict(parameters)}]


def _lone_files(folder: Path, states: dict[str, dict[str, torch.Tensor]]) -> list[dict[str, Any]]:
    """Each state dict saved as ``folder/NAME.safetensors``; recipe entries for them, in order."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, state in states.items():
        save_file(state, folder / f"{name}.safetensors")
    return [{"model": str(folder / f"{name}.safetensors")} for name in states]


# --------------------------------------------------------------------------- checkpoint builders


def _empty_model_folder(family: Family, folder: Path) -> Path:
    target = folder / "empty-model"
    target.mkdir()
    shutil.copy(family.models[0] / "config.json", target / "config.json")
    return target


def _zero_tensor_file(folder: Path) -> Path:
    save_file({}, folder / "zero.safetensors")
    return folder / "zero.safetensors"


def _zero_tensor_folder(family: Family, folder: Path) -> Path:
    target = _empty_model_folder(family, folder).rename(folder / "zero-folder")
    save_file({}, target / "model.safetensors")
    return target


def _add_empty(state: dict[str, torch.Tensor]) -> None:
    state["extra.empty"] = torch.zeros(0)


def _empty_norm(state: dict[str, torch.Tensor]) -> None:
    state["model.norm.weight"] = torch.zeros(0)


class _Payload:
    """Unpickling this calls ``open(marker, 'w')``: it creates the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (open, (self.marker, "w"))


def _evil_pickle(family: Family, folder: Path, legacy: bool) -> Path:
    """A lone ``.pt`` state dict with a code-carrying object; its marker is ``folder/PWNED``."""
    state: dict[str, Any] = dict(load_file(family.models[0] / "model.safetensors"))
    state["payload"] = _Payload(folder / "PWNED")
    target = folder / "evil.pt"
    torch.save(state, target, _use_new_zipfile_serialization=not legacy)
    return target


# --------------------------------------------------------------------------- the merge matrix

MERGE_CASES: list[tuple[str, Builder, list[str], str]] = [
    # -- checkpoints without weights, or with nothing in them
    (
        "model folder with config.json only",
        lambda f, d: {"merge_method": "linear", "models": _with(f, _empty_model_folder(f, d))},
        [],
        r"empty-model: no model weights found",
    ),
    (
        "safetensors file with zero tensors, listed last",
        lambda f, d: {"merge_method": "linear", "models": _with(f, _zero_tensor_file(d))},
        [],
        r"zero\.safetensors",
    ),
    (
        "safetensors file with zero tensors, listed first",
        lambda f, d: {
            "merge_method": "linear",
            "models": [{"model": str(_zero_tensor_file(d))}, *_others(f)],
        },
        [],
        r"zero\.safetensors: the checkpoint holds no tensors",
    ),
    (
        "model folder whose model.safetensors has zero tensors",
        lambda f, d: {"merge_method": "linear", "models": _with(f, _zero_tensor_folder(f, d))},
        [],
        r"zero-folder",
    ),
    (
        "base model with zero tensors",
        lambda f, d: {"merge_method": "ties", "base_model": str(_zero_tensor_file(d)), "models": _others(f)},
        [],
        r"zero\.safetensors",
    ),
    # -- zero-element tensors that do not match across models
    (
        "shape [0] tensor in one model only",
        lambda f, d: {
            "merge_method": "linear",
            "models": _with(f, _clone(f.models[0], d / "variant", _add_empty)),
        },
        [],
        r"tensor 'extra\.empty' is in .*variant but missing from",
    ),
    (
        "tensor of shape [0] in one model, [32] in the others",
        lambda f, d: {
            "merge_method": "linear",
            "models": _with(f, _clone(f.models[0], d / "variant", _empty_norm)),
        },
        [],
        r"tensor 'model\.norm\.weight' has shape \[32\] in .* but \[0\] in .*variant",
    ),
    (
        "tensor of shape [4, 0] against [0, 4]",
        lambda f, d: {
            "merge_method": "linear",
            "models": _lone_files(
                d,
                {
                    "a": {"w": torch.ones(3), "e": torch.zeros(4, 0)},
                    "b": {"w": torch.ones(3), "e": torch.zeros(0, 4)},
                },
            ),
        },
        [],
        r"tensor 'e' has shape \[4, 0\] in .*a\.safetensors but \[0, 4\] in .*b\.safetensors",
    ),
    (
        "tensor of shape [4, 0] against [4, 1]",
        lambda f, d: {
            "merge_method": "linear",
            "models": _lone_files(
                d,
                {
                    "a": {"w": torch.ones(3), "e": torch.zeros(4, 0)},
                    "b": {"w": torch.ones(3), "e": torch.zeros(4, 1)},
                },
            ),
        },
        [],
        r"tensor 'e' has shape \[4, 0\] in .*a\.safetensors but \[4, 1\] in .*b\.safetensors",
    ),
    (
        "a float tensor that is an integer tensor in another model",
        lambda f, d: {
            "merge_method": "linear",
            "models": _lone_files(
                d, {"a": {"w": torch.ones(3)}, "b": {"w": torch.ones(3, dtype=torch.int64)}}
            ),
        },
        [],
        r"tensor 'w' is float32 in .*a\.safetensors but int64 in .*b\.safetensors",
    ),
    # -- pickles that would run code (the zip case with a folder is in test_cli.py)
    (
        "lone .pt pickle carrying code",
        lambda f, d: {"merge_method": "linear", "models": _with(f, _evil_pickle(f, d, legacy=False))},
        [],
        r"evil\.pt: refused: the pickle holds more than tensors and was not run",
    ),
    (
        "legacy (non-zip) .pt pickle carrying code",
        lambda f, d: {"merge_method": "linear", "models": _with(f, _evil_pickle(f, d, legacy=True))},
        [],
        r"evil\.pt: refused: the pickle holds more than tensors and was not run",
    ),
    # -- paths
    (
        "duplicate model path with different weights",
        lambda f, d: {
            "merge_method": "linear",
            "models": [
                {"model": str(f.models[1]), "parameters": {"weight": 0.3}},
                {"model": str(f.models[1]), "parameters": {"weight": 0.7}},
            ],
        },
        ["--strict"],
        r"model '.*finetune-1' is listed twice",
    ),
    (
        "missing model under a unicode name",
        lambda f, d: {"merge_method": "linear", "models": _with(f, d / UNICODE_NAME / "absent")},
        [],
        re.escape(f"{UNICODE_NAME}/absent: no such file or directory"),
    ),
    (
        "missing base model",
        lambda f, d: {"merge_method": "ties", "base_model": str(d / "no-base"), "models": _others(f)},
        [],
        r"no-base: no such file or directory",
    ),
    # -- huge, negative and non-finite numbers
    (
        "weight -1e308 with a spherical method",
        lambda f, d: {"merge_method": "barycenter", "models": _others(f, weight=-1e308)},
        [],
        r"parameter 'weight' must be a finite number of magnitude <= 1e\+30, got -1e\+308",
    ),
    (
        "weight -1e308 overflows the merge",
        lambda f, d: {
            "merge_method": "task_arithmetic",
            "base_model": str(f.base),
            "models": _others(f, weight=-1e308),
        },
        [],
        r"parameter 'weight' must be a finite number of magnitude <= 1e\+30, got -1e\+308",
    ),
    (
        "weight as an integer beyond float range",
        lambda f, d: {"merge_method": "linear", "models": _others(f, weight=10**400)},
        [],
        r"parameter 'weight'",
    ),
    (
        "density as an integer beyond float range",
        lambda f, d: {
            "merge_method": "ties",
            "base_model": str(f.base),
            "models": _others(f, density=10**400),
        },
        [],
        r"parameter 'density'",
    ),
    (
        "density 2",
        lambda f, d: {"merge_method": "ties", "base_model": str(f.base), "models": _others(f, density=2)},
        [],
        r"parameter 'density' must be <= 1\.0, got 2",
    ),
    (
        "density -0.5",
        lambda f, d: {"merge_method": "ties", "base_model": str(f.base), "models": _others(f, density=-0.5)},
        [],
        r"parameter 'density' must be >= 0\.0, got -0\.5",
    ),
    (
        "t: 1e400 (YAML reads a string)",
        lambda f, d: (
            "merge_method: slerp\nparameters: {t: 1e400}\nmodels:\n"
            + "".join(f"  - model: {json.dumps(str(p))}\n" for p in f.models[1:])
        ),
        [],
        r"parameter 't' must be a finite number",
    ),
    (
        "t: 1.0e+400 (YAML reads inf)",
        lambda f, d: (
            "merge_method: slerp\nparameters: {t: 1.0e+400}\nmodels:\n"
            + "".join(f"  - model: {json.dumps(str(p))}\n" for p in f.models[1:])
        ),
        [],
        r"parameter 't' must be a finite number",
    ),
    (
        "lambda: .nan",
        lambda f, d: {
            "merge_method": "ties",
            "base_model": str(f.base),
            "models": _others(f),
            "parameters": {"lambda": float("nan")},
        },
        [],
        r"parameter 'lambda' must be a finite number",
    ),
    (
        "weight gradient holding NaN",
        lambda f, d: {"merge_method": "linear", "models": _others(f, weight=[0.5, float("nan")])},
        [],
        r"parameter 'weight' must be a finite number",
    ),
    (
        "random_seed: .nan",
        lambda f, d: {
            "merge_method": "dare_ties",
            "base_model": str(f.base),
            "models": _others(f, density=0.5),
            "parameters": {"random_seed": float("nan")},
        },
        [],
        r"parameter 'random_seed'",
    ),
    (
        "random_seed: .inf",
        lambda f, d: {
            "merge_method": "dare_ties",
            "base_model": str(f.base),
            "models": _others(f, density=0.5),
            "parameters": {"random_seed": float("inf")},
        },
        [],
        r"parameter 'random_seed'",
    ),
    (
        "max_iter: .inf",
        lambda f, d: {
            "merge_method": "barycenter",
            "models": _others(f),
            "parameters": {"max_iter": float("inf")},
        },
        [],
        r"parameter 'max_iter'",
    ),
    (
        "max_iter: 2.5",
        lambda f, d: {"merge_method": "barycenter", "models": _others(f), "parameters": {"max_iter": 2.5}},
        [],
        r"parameter 'max_iter' must be an integer, got 2\.5",
    ),
    # -- wrong types
    (
        "weight: abc",
        lambda f, d: {"merge_method": "linear", "models": _others(f, weight="abc")},
        [],
        r"parameter 'weight' must be a number, got 'abc'",
    ),
    (
        "weight: true",
        lambda f, d: {"merge_method": "linear", "models": _others(f, weight=True)},
        [],
        r"parameter 'weight' must be a number, got True",
    ),
    (
        "weight: []",
        lambda f, d: {"merge_method": "linear", "models": _others(f, weight=[])},
        [],
        r"parameter 'weight' is an empty list",
    ),
    (
        "weight: a mapping",
        lambda f, d: {"merge_method": "linear", "models": _others(f, weight={"a": 1})},
        [],
        r"models\.0\.parameters\.weight",
    ),
    (
        "models: 5",
        lambda f, d: {"merge_method": "linear", "models": 5},
        [],
        r"recipe\.yml: models: Input should be a valid list",
    ),
    (
        "models: []",
        lambda f, d: {"merge_method": "linear", "models": []},
        [],
        r"recipe\.yml: models: List should have at least 1 item",
    ),
    (
        "models: [5]",
        lambda f, d: {"merge_method": "linear", "models": [5]},
        [],
        r"recipe\.yml: models\.0: ",
    ),
    (
        "model: ''",
        lambda f, d: {"merge_method": "linear", "models": [{"model": ""}]},
        [],
        r"recipe\.yml: models\.0\.model: ",
    ),
    (
        "merge_method: 3",
        lambda f, d: {"merge_method": 3, "models": _others(f)},
        [],
        r"recipe\.yml: merge_method: Input should be a valid string",
    ),
    (
        "merge_method: null",
        lambda f, d: {"merge_method": None, "models": _others(f)},
        [],
        r"recipe\.yml: merge_method: ",
    ),
    (
        "parameters: 5",
        lambda f, d: {"merge_method": "linear", "models": _others(f), "parameters": 5},
        [],
        r"recipe\.yml: parameters: ",
    ),
    (
        "dtype: float8",
        lambda f, d: {"merge_method": "linear", "models": _others(f), "dtype": "float8"},
        [],
        r"recipe\.yml: dtype: .*unknown dtype 'float8'",
    ),
    (
        "out_dtype: int8",
        lambda f, d: {"merge_method": "linear", "models": _others(f), "out_dtype": "int8"},
        [],
        r"recipe\.yml: out_dtype: .*unknown dtype 'int8'",
    ),
    (
        "base_model: a list",
        lambda f, d: {"merge_method": "ties", "models": _others(f), "base_model": [str(f.base)]},
        [],
        r"recipe\.yml: base_model: ",
    ),
    # -- missing and unknown keys
    (
        "no merge_method",
        lambda f, d: {"models": _others(f)},
        [],
        r"recipe\.yml: missing required key 'merge_method'",
    ),
    (
        "no models",
        lambda f, d: {"merge_method": "linear"},
        [],
        r"recipe\.yml: \(top level\): give exactly one of 'models', 'slices' and 'modules'",
    ),
    (
        "no model in an entry",
        lambda f, d: {"merge_method": "linear", "models": [{"parameters": {"weight": 1}}]},
        [],
        r"recipe\.yml: missing required key 'models\.0\.model'",
    ),
    (
        "unknown top-level key",
        lambda f, d: {"merge_method": "linear", "models": _others(f), "colour": "blue"},
        ["--strict"],
        r"recipe\.yml: unknown key 'colour' at colour",
    ),
    (
        "unknown key in a model entry",
        lambda f, d: {"merge_method": "linear", "models": [{"model": str(f.models[1]), "wieght": 1}]},
        ["--strict"],
        r"recipe\.yml: unknown key 'wieght' at models\.0\.wieght",
    ),
    (
        "unknown key holding a line break",
        lambda f, d: (
            "merge_method: linear\nmodels:\n"
            + "".join(f"  - model: {json.dumps(str(p))}\n" for p in f.models[1:])
            + '"colour\\nred": 1\n'
        ),
        ["--strict"],
        r"unknown key 'colour",
    ),
    (
        "unknown top-level parameter",
        lambda f, d: {"merge_method": "linear", "models": _others(f), "parameters": {"temperature": 1}},
        ["--strict"],
        r"unknown parameter 'temperature' for merge_method 'linear'",
    ),
    # -- command-line values
    (
        "--out-shard-size 0",
        lambda f, d: {"merge_method": "linear", "models": _others(f)},
        ["--out-shard-size", "0"],
        r"size '0' must be positive",
    ),
    (
        "--out-shard-size -5GB",
        lambda f, d: {"merge_method": "linear", "models": _others(f)},
        ["--out-shard-size", "-5GB"],
        r"size '-5GB'",
    ),
    (
        "--out-shard-size 1e400",
        lambda f, d: {"merge_method": "linear", "models": _others(f)},
        ["--out-shard-size", "1e400"],
        r"size '1e400'",
    ),
    (
        "--device tpu",
        lambda f, d: {"merge_method": "linear", "models": _others(f)},
        ["--device", "tpu"],
        r"--device tpu: expected auto, cpu, cuda, cuda:N or mps",
    ),
]


@pytest.mark.parametrize(
    ("builder", "options", "pattern"), [case[1:] for case in MERGE_CASES], ids=[c[0] for c in MERGE_CASES]
)
def test_merge_refuses_bad_input_in_one_line(
    builder: Builder, options: list[str], pattern: str, family: Family, tmp_path: Path
) -> None:
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    config = _write(inputs / "recipe.yml", builder(family, inputs))
    out = tmp_path / "results" / "merged"
    code, stderr, output = _invoke("merge", str(config), str(out), "--quiet", *options)
    _assert_refused(code, stderr, output, pattern, out)
    assert not (tmp_path / "results").exists()
    assert not (inputs / "PWNED").exists(), "unpickling ran code"


# --------------------------------------------------------------------------- bad config files, every command


def _deep_nesting(depth: int = 5000) -> str:
    return "models: " + "[" * depth + "]" * depth + "\nmerge_method: linear\n"


def _folder(directory: Path) -> Path:
    (directory / "folder.yml").mkdir()
    return directory / "folder.yml"


def _raw(name: str, data: bytes) -> Callable[[Path], Path]:
    def make(directory: Path) -> Path:
        (directory / name).write_bytes(data)
        return directory / name

    return make


CONFIG_FILE_CASES: list[tuple[str, Callable[[Path], Path], str]] = [
    ("missing file", lambda d: d / "absent.yml", r"absent\.yml: no such file"),
    ("a folder", _folder, r"folder\.yml: cannot read"),
    (
        "malformed YAML",
        lambda d: _write(d / "bad.yml", "models: [\n  - model: x\nmerge_method: linear: bad\n"),
        r"bad\.yml: malformed YAML \(line \d+, column \d+\)",
    ),
    (
        "tab indentation",
        lambda d: _write(d / "tabs.yml", "models:\n\t- model: x\n"),
        r"tabs\.yml: malformed YAML",
    ),
    (
        "invalid UTF-8",
        _raw("latin1.yml", b"name: mod\xe8le\n"),
        r"latin1\.yml: cannot read",
    ),
    ("NUL byte", _raw("nul.yml", b"name: a\x00b\n"), r"nul\.yml"),
    ("empty file", lambda d: _write(d / "empty.yml", ""), r"empty\.yml: expected a mapping .*NoneType"),
    ("a list", lambda d: _write(d / "list.yml", "- 1\n- 2\n"), r"list\.yml: expected a mapping .*list"),
    ("a scalar", lambda d: _write(d / "scalar.yml", "42\n"), r"scalar\.yml: expected a mapping .*int"),
    (
        "python object tag",
        lambda d: _write(d / "tag.yml", "models: !!python/object/apply:os.system ['touch PWNED']\n"),
        r"tag\.yml: malformed YAML .*constructor",
    ),
    (
        "unhashable mapping key",
        lambda d: _write(d / "key.yml", "? [a, b]\n: 1\n"),
        r"key\.yml: malformed YAML",
    ),
    ("deeply nested lists", lambda d: _write(d / "deep.yml", _deep_nesting()), r"deep\.yml"),
]


def _command(name: str, config: Path, out: Path) -> list[str]:
    if name == "merge":
        return ["merge", str(config), str(out), "--quiet"]
    if name == "experiment":
        return ["experiment", str(config), "--out", str(out)]
    return ["pareto", str(config), "--results-path", str(out), "--quiet"]


@pytest.mark.parametrize("command", ["merge", "experiment", "pareto"])
@pytest.mark.parametrize(
    ("make", "pattern"), [c[1:] for c in CONFIG_FILE_CASES], ids=[c[0] for c in CONFIG_FILE_CASES]
)
def test_bad_config_files_are_one_line_and_write_nothing(
    command: str, make: Callable[[Path], Path], pattern: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    config = make(inputs)
    out = tmp_path / "results" / "out"
    code, stderr, output = _invoke(*_command(command, config, out))
    _assert_refused(code, stderr, output, pattern, out)
    assert not (tmp_path / "results").exists() and not (tmp_path / "PWNED").exists()


# --------------------------------------------------------------------------- experiment and pareto schemas


_DROP = object()  # a key to leave out


def _experiment(**changes: Any) -> dict[str, Any]:
    document: dict[str, Any] = {
        "model_checkpoints": ["./a", "./b"],
        "datasets_config": [{"dataset_name": "./da"}, {"dataset_name": "./db"}],
        "merge_configs": {"linear": {}},
        "base_model_checkpoint": "./base",
    }
    document.update(changes)
    return {k: v for k, v in document.items() if v is not _DROP}


def _pareto(**changes: Any) -> dict[str, Any]:
    document: dict[str, Any] = {
        "base_model": "./base",
        "tasks": [
            {"name": "a", "model": "./a", "dataset": {"dataset_name": "./da"}},
            {"name": "b", "model": "./b", "dataset": {"dataset_name": "./db"}},
        ],
        "budget": 8,
    }
    document.update(changes)
    return {k: v for k, v in document.items() if v is not _DROP}


SCHEMA_CASES: list[tuple[str, str, dict[str, Any], str]] = [
    # experiment
    ("experiment", "unknown key", _experiment(modle_checkpoints=["x"]), r"unknown key 'modle_checkpoints'"),
    ("experiment", "missing model_checkpoints", _experiment(model_checkpoints=_DROP), r"model_checkpoints"),
    ("experiment", "model_checkpoints: 5", _experiment(model_checkpoints=5), r"model_checkpoints: "),
    ("experiment", "model_checkpoints: []", _experiment(model_checkpoints=[]), r"model_checkpoints: "),
    ("experiment", "datasets_config: text", _experiment(datasets_config="x"), r"datasets_config: "),
    ("experiment", "merge_configs: a list", _experiment(merge_configs=["linear"]), r"merge_configs: "),
    ("experiment", "batch_size: 0", _experiment(batch_size=0), r"batch_size: .*greater than 0"),
    ("experiment", "batch_size: .nan", _experiment(batch_size=float("nan")), r"batch_size: "),
    ("experiment", "batch_size: 1e400", _experiment(batch_size=float("inf")), r"batch_size: "),
    ("experiment", "task_vectors: maybe", _experiment(task_vectors="maybe"), r"task_vectors: "),
    ("experiment", "autocast: fp8", _experiment(autocast="fp8"), r"autocast: "),
    ("experiment", "name: a mapping", _experiment(name={"a": 1}), r"name: "),
    (
        "experiment",
        "datasets_config entry with an unknown key",
        _experiment(datasets_config=[{"dataset_name": "./da", "splt": "x"}, {"dataset_name": "./db"}]),
        r"datasets_config\[0\]: splt: ",
    ),
    (
        "experiment",
        "datasets_config entry with max_samples -1",
        _experiment(datasets_config=[{"dataset_name": "./da", "max_samples": -1}, {"dataset_name": "./db"}]),
        r"datasets_config\[0\]: max_samples: ",
    ),
    (
        "experiment",
        "one dataset for two models",
        _experiment(datasets_config=[{"dataset_name": "./da"}]),
        r"2 model_checkpoints but 1 datasets_config",
    ),
    (
        "experiment",
        "unknown merge method",
        _experiment(merge_configs={"soup": {}}),
        r"unknown merge_method 'soup'",
    ),
    (
        "experiment",
        "merge_configs weights: 5",
        _experiment(merge_configs={"linear": {"weights": 5}}),
        r"merge_configs\['linear'\].*weights",
    ),
    (
        "experiment",
        "merge_configs entry: 5",
        _experiment(merge_configs={"linear": 5}),
        r"merge_configs\.linear: ",
    ),
    (
        "experiment",
        "model that does not exist",
        _experiment(model_checkpoints=["./nowhere-a", "./nowhere-b"]),
        r"nowhere-a: cannot load an image classifier",
    ),
    # pareto
    ("pareto", "unknown key", _pareto(budgte=3), r"unknown key 'budgte'"),
    ("pareto", "missing base_model", _pareto(base_model=_DROP), r"base_model"),
    ("pareto", "missing tasks", _pareto(tasks=_DROP), r"tasks"),
    ("pareto", "base_model: 5", _pareto(base_model=5), r"base_model: "),
    ("pareto", "tasks: 5", _pareto(tasks=5), r"tasks: "),
    ("pareto", "budget: abc", _pareto(budget="abc"), r"budget: "),
    ("pareto", "budget: 0", _pareto(budget=0), r"budget: "),
    ("pareto", "bounds: [0, .inf]", _pareto(bounds=[0, float("inf")]), r"bounds: "),
    ("pareto", "bounds: [.nan, 1]", _pareto(bounds=[float("nan"), 1]), r"bounds: "),
    ("pareto", "bounds: text", _pareto(bounds="x"), r"bounds: "),
    ("pareto", "candidates_per_pass: -1", _pareto(candidates_per_pass=-1), r"candidates_per_pass: "),
    ("pareto", "merge_method: 3", _pareto(merge_method=3), r"merge_method: "),
    ("pareto", "merge_method: slerp", _pareto(merge_method="slerp"), r"slerp"),
    ("pareto", "metric: bleu", _pareto(metric="bleu"), r"metric 'bleu'"),
    ("pareto", "parameters: densty", _pareto(merge_method="ties", parameters={"densty": 1}), r"'densty'"),
    (
        "pareto",
        "task without a model",
        _pareto(
            tasks=[
                {"name": "a", "dataset": {"dataset_name": "x"}},
                {"name": "b", "model": "m", "dataset": {}},
            ]
        ),
        r"tasks\.0\.model",
    ),
    (
        "pareto",
        "model that does not exist",
        _pareto(tasks=[{**t, "model": f"./nowhere-{t['name']}"} for t in _pareto()["tasks"]]),
        r"\./nowhere-a: cannot load an image classifier",
    ),
]


@pytest.mark.parametrize(
    ("command", "document", "pattern"),
    [(c[0], c[2], c[3]) for c in SCHEMA_CASES],
    ids=[f"{c[0]}: {c[1]}" for c in SCHEMA_CASES],
)
def test_experiment_and_pareto_configs_are_checked_before_writing(
    command: str, document: dict[str, Any], pattern: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    config = _write(tmp_path / "inputs" / "config.yml", document)
    out = tmp_path / "results" / "out"
    code, stderr, output = _invoke(*_command(command, config, out))
    _assert_refused(code, stderr, output, pattern, out)
    assert not (tmp_path / "results").exists()


# --------------------------------------------------------------------------- a tiny image-classifier zoo


@pytest.fixture(scope="module")
def mini_zoo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Two random 1-layer ViTs sharing a base, with 8-image validation and test splits (a second)."""
    import datasets
    import numpy as np
    from datasets import ClassLabel, Dataset, DatasetDict, Features, Image
    from PIL import Image as PILImage
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor
    from transformers.utils import logging

    logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    logging.set_verbosity_error()  # type: ignore[no-untyped-call]
    datasets.disable_progress_bars()
    folder = tmp_path_factory.mktemp("mini-zoo")
    config = ViTConfig(
        image_size=8,
        patch_size=4,
        num_channels=1,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
    )
    config.num_labels = 2
    processor = ViTImageProcessor(
        do_resize=False, do_rescale=True, rescale_factor=1 / 255, image_mean=[0.5], image_std=[0.5]
    )
    paths = {}
    for index, name in enumerate(("base", "a", "b")):
        torch.manual_seed(index)
        ViTForImageClassification(config).save_pretrained(folder / name)
        processor.save_pretrained(folder / name)
        paths[name] = str(folder / name)
    rng = np.random.default_rng(0)
    features = Features({"image": Image(), "label": ClassLabel(num_classes=2)})
    for name in ("da", "db"):
        images = [
            PILImage.fromarray(rng.integers(0, 255, (8, 8), dtype=np.uint8), mode="L") for _ in range(8)
        ]
        split = Dataset.from_dict({"image": images, "label": [i % 2 for i in range(8)]}, features=features)
        DatasetDict({"validation": split, "test": split}).save_to_disk(str(folder / name))
        paths[name] = str(folder / name)
    return paths


def _zoo_experiment(zoo: dict[str, Any], merges: dict[str, Any]) -> dict[str, Any]:
    return {
        "model_checkpoints": [zoo["a"], zoo["b"]],
        "datasets_config": [{"dataset_name": zoo["da"]}, {"dataset_name": zoo["db"]}],
        "merge_configs": merges,
        "base_model_checkpoint": zoo["base"],
    }


def _zoo_pareto(zoo: dict[str, Any], **changes: Any) -> dict[str, Any]:
    tasks = [
        {"name": name, "model": zoo[name], "dataset": {"dataset_name": zoo[data]}}
        for name, data in (("a", "da"), ("b", "db"))
    ]
    return {"base_model": zoo["base"], "tasks": tasks, "budget": 6, **changes}


ZOO_CASES: list[tuple[str, str, Callable[[dict[str, Any]], dict[str, Any]], str]] = [
    (
        "experiment",
        "merge weights: a string",
        lambda z: _zoo_experiment(z, {"linear": {"weights": "ab"}}),
        r"weights",
    ),
    (
        "experiment",
        "merge weights: [1, x]",
        lambda z: _zoo_experiment(z, {"linear": {"weights": [1, "x"]}}),
        r"weight",
    ),
    (
        "pareto",
        "bounds: [-1e308, 1e308]",
        lambda z: _zoo_pareto(z, bounds=[-1e308, 1e308]),
        r"bounds",
    ),
    (
        "experiment",
        "ties density 2",
        lambda z: _zoo_experiment(z, {"ties": {"density": 2}}),
        r"density",
    ),
    (
        "experiment",
        "dare_ties random_seed .nan",
        lambda z: _zoo_experiment(z, {"dare_ties": {"random_seed": float("nan")}}),
        r"random_seed",
    ),
    (
        "experiment",
        "linear normalize: yes",
        lambda z: _zoo_experiment(z, {"linear": {"normalize": "yes"}}),
        r"normalize",
    ),
    (
        "experiment",
        "dataset without the label column",
        lambda z: (
            _zoo_experiment(z, {"linear": {}})
            | {
                "datasets_config": [
                    {"dataset_name": z["da"], "label_col": "digit"},
                    {"dataset_name": z["db"]},
                ]
            }
        ),
        r"no column 'digit'",
    ),
    (
        "pareto",
        "ties density 2",
        lambda z: _zoo_pareto(z, merge_method="ties", parameters={"density": 2}),
        "density",
    ),
    (
        "pareto",
        "normalize: yes",
        lambda z: _zoo_pareto(z, merge_method="ties", parameters={"normalize": "yes"}),
        r"normalize",
    ),
    (
        "pareto",
        "dataset without the validation split",
        lambda z: (
            _zoo_pareto(z)
            | {
                "tasks": [
                    {"name": "a", "model": z["a"], "dataset": {"dataset_name": z["da"], "split": "train"}},
                    {"name": "b", "model": z["b"], "dataset": {"dataset_name": z["db"]}},
                ]
            }
        ),
        r"no split 'train'",
    ),
]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("command", "build", "pattern"),
    [(c[0], c[2], c[3]) for c in ZOO_CASES],
    ids=[f"{c[0]}: {c[1]}" for c in ZOO_CASES],
)
def test_config_errors_found_after_loading_models_leave_no_output(
    command: str,
    build: Callable[[dict[str, Any]], dict[str, Any]],
    pattern: str,
    mini_zoo: dict[str, Any],
    tmp_path: Path,
) -> None:
    config = _write(tmp_path / "config.yml", build(mini_zoo))
    out = tmp_path / "results" / "out"
    code, stderr, output = _invoke(*_command(command, config, out))
    _assert_refused(code, stderr, output, pattern, out)


# --------------------------------------------------------------------------- true exit codes, in a subprocess


@pytest.mark.slow
@pytest.mark.parametrize(
    "case", ["pickle with code", "weight beyond float range", "experiment: missing config"]
)
def test_the_console_command_exits_non_zero_with_one_line(case: str, family: Family, tmp_path: Path) -> None:
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    out = tmp_path / "results" / "out"
    if case == "pickle with code":
        recipe: Recipe = {
            "merge_method": "linear",
            "models": _with(family, _evil_pickle(family, inputs, False)),
        }
        pattern = r"evil\.pt: refused"
    elif case == "weight beyond float range":
        recipe = {"merge_method": "linear", "models": _others(family, weight=10**400)}
        pattern = r"parameter 'weight'"
    else:
        code, stderr, output = _run_module(
            "experiment", str(inputs / "none.yml"), "--out", str(out), cwd=tmp_path
        )
        assert code == 1
        _assert_refused(code, stderr, output, r"none\.yml: no such file", out)
        return
    config = _write(inputs / "recipe.yml", recipe)
    code, stderr, output = _run_module("merge", str(config), str(out), cwd=tmp_path)
    assert code == 1, output
    _assert_refused(code, stderr, output, pattern, out)
    assert not (inputs / "PWNED").exists() and not (tmp_path / "results").exists()


# --------------------------------------------------------------------------- odd inputs that must merge

ALL_METHODS: list[tuple[str, dict[str, Any], dict[str, Any], bool]] = [
    # (method, top-level parameters, per-model parameters, uses base_model)
    ("linear", {}, {}, False),
    ("linear", {"space": "task_vectors"}, {}, True),
    ("task_arithmetic", {}, {}, True),
    ("ties", {}, {"density": 0.5}, True),
    ("dare_linear", {}, {"density": 0.5}, True),
    ("dare_ties", {}, {"density": 0.5}, True),
    ("breadcrumbs", {}, {}, True),
    ("model_stock", {}, {}, True),
    ("slerp", {"t": 0.3}, {}, False),
    ("pairwise_slerp", {}, {}, False),
    ("barycenter", {}, {}, False),
    ("barycenter", {"space": "task_vectors"}, {}, True),
    ("karcher", {}, {}, False),
    ("tsv_m", {}, {}, True),
    ("iso_c", {}, {}, True),
    ("iso_cts", {}, {}, True),
    ("wudi", {}, {}, True),
]


@pytest.mark.parametrize(
    ("method", "top", "per_model", "uses_base"),
    ALL_METHODS,
    ids=[f"{m[0]}{' (tv)' if m[1].get('space') else ''}" for m in ALL_METHODS],
)
def test_zero_element_tensors_present_in_every_model_merge(
    method: str, top: dict[str, Any], per_model: dict[str, Any], uses_base: bool, tmp_path: Path
) -> None:
    generator = torch.Generator().manual_seed(0)
    states = {
        name: {
            "w": torch.randn(6, 4, generator=generator),
            "empty": torch.zeros(0),
            "empty_2d": torch.zeros(4, 0),
        }
        for name in ("base", "a", "b")
    }
    entries = _lone_files(tmp_path / "in", states)
    models = [dict(e, parameters=dict(per_model)) for e in entries[1:]]
    recipe: dict[str, Any] = {"merge_method": method, "models": models, "parameters": top}
    if uses_base:
        recipe["base_model"] = entries[0]["model"]
    merged = _merge_ok(_write(tmp_path / "recipe.yml", recipe), tmp_path / "out")
    assert merged["empty"].shape == (0,) and merged["empty"].dtype == torch.float32
    assert merged["empty_2d"].shape == (4, 0)
    assert merged["w"].shape == (6, 4) and torch.isfinite(merged["w"]).all()


def test_mixed_dtypes_compute_in_float32(family: Family, tmp_path: Path) -> None:
    """float16, bfloat16 and float32 fine-tunes of one family merge together. m3sb upcasts
    every input to float32, merges, and writes ``out_dtype`` (else ``dtype``, else the
    dtype that holds every input's: float32 here, whatever the order of the models)."""
    dtypes = (torch.float16, torch.bfloat16, torch.float32)
    mixed = [
        _clone(p, tmp_path / f"ft-{i}", dtype=dt)
        for i, (p, dt) in enumerate(zip(family.models, dtypes, strict=True))
    ]
    reference = _merge_ok(
        _write(
            tmp_path / "ref.yml",
            {"merge_method": "linear", "models": [{"model": str(p)} for p in family.models]},
        ),
        tmp_path / "ref",
    )
    recipe: dict[str, Any] = {"merge_method": "linear", "models": [{"model": str(p)} for p in mixed]}
    as_float32 = _merge_ok(_write(tmp_path / "f32.yml", recipe | {"out_dtype": "float32"}), tmp_path / "f32")
    default = _merge_ok(_write(tmp_path / "default.yml", recipe), tmp_path / "default")
    as_bf16 = _merge_ok(_write(tmp_path / "bf16.yml", recipe | {"dtype": "bfloat16"}), tmp_path / "bf16")
    originals = [load_file(p / "model.safetensors") for p in family.models]
    assert as_float32.keys() == reference.keys() == default.keys() == as_bf16.keys()
    for name, expected in reference.items():
        largest = torch.stack([state[name].abs() for state in originals]).amax(0)
        # each input is rounded to at most 2^-8 relative (bfloat16), the mean of three
        # such errors is within 2^-8 of the largest magnitude
        assert as_float32[name].dtype == torch.float32
        assert ((as_float32[name] - expected).abs() <= largest * 2**-8 + 1e-7).all(), name
        assert default[name].dtype == torch.float32, name  # float16 + bfloat16 + float32 -> float32
        assert torch.equal(default[name], as_float32[name]), name
        assert as_bf16[name].dtype == torch.bfloat16 and torch.equal(
            as_bf16[name], as_float32[name].bfloat16()
        )
    for folder, dtype in (("f32", "float32"), ("default", "float32"), ("bf16", "bfloat16")):
        config = json.loads((tmp_path / folder / "config.json").read_text())
        assert config.get("dtype", config.get("torch_dtype")) == dtype, folder
    reordered = {**recipe, "models": recipe["models"][::-1]}
    backwards = _merge_ok(_write(tmp_path / "backwards.yml", reordered), tmp_path / "backwards")
    for name in default:
        assert backwards[name].dtype == torch.float32, name  # the order of the models does not matter


def _tied_family(folder: Path) -> list[Path]:
    """A base and two fine-tunes of a Llama with tie_word_embeddings=True, via save_pretrained."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
        tie_word_embeddings=True,
    )
    paths = []
    for index in range(3):
        torch.manual_seed(index)
        model = LlamaForCausalLM(config)
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
        model.save_pretrained(folder / f"tied-{index}")
        paths.append(folder / f"tied-{index}")
    return paths


def test_tied_weights_stay_tied(tmp_path: Path) -> None:
    """transformers saves a tied head once (under the embedding's name); the merge keeps that
    layout and config.json, so the merged model loads with its head tied to the merged
    embedding. A ``.bin`` state dict that stores both names (one storage) merges both names
    to equal tensors."""
    from transformers import LlamaForCausalLM

    base, *models = _tied_family(tmp_path)
    recipe = {
        "merge_method": "ties",
        "base_model": str(base),
        "models": [{"model": str(p), "parameters": {"density": 0.5}} for p in models],
    }
    merged = _merge_ok(_write(tmp_path / "tied.yml", recipe), tmp_path / "out")
    assert "model.embed_tokens.weight" in merged and "lm_head.weight" not in merged
    loaded = LlamaForCausalLM.from_pretrained(tmp_path / "out")
    assert torch.equal(loaded.lm_head.weight, merged["model.embed_tokens.weight"])
    assert torch.equal(loaded.model.embed_tokens.weight, merged["model.embed_tokens.weight"])

    pickles = []
    for index, path in enumerate((base, *models)):
        model = LlamaForCausalLM.from_pretrained(path)
        state = model.state_dict()
        assert state["lm_head.weight"].data_ptr() == state["model.embed_tokens.weight"].data_ptr()
        target = tmp_path / f"bin-{index}"
        target.mkdir()
        shutil.copy(path / "config.json", target / "config.json")
        torch.save(state, target / "pytorch_model.bin")
        pickles.append(target)
    recipe = {
        "merge_method": "ties",
        "base_model": str(pickles[0]),
        "models": [{"model": str(p), "parameters": {"density": 0.5}} for p in pickles[1:]],
    }
    from_bin = _merge_ok(_write(tmp_path / "bin.yml", recipe), tmp_path / "out-bin")
    assert torch.equal(from_bin["lm_head.weight"], from_bin["model.embed_tokens.weight"])
    assert torch.equal(from_bin["model.embed_tokens.weight"], merged["model.embed_tokens.weight"])


def test_tied_and_untied_checkpoints_do_not_merge_silently(family: Family, tmp_path: Path) -> None:
    """An untied model (lm_head stored) against one saved tied (lm_head absent): a clear error."""

    def drop_head(state: dict[str, torch.Tensor]) -> None:
        del state["lm_head.weight"]

    tied = _clone(family.models[0], tmp_path / "tied", drop_head)
    config = _write(tmp_path / "recipe.yml", {"merge_method": "linear", "models": _with(family, tied)})
    out = tmp_path / "out"
    code, stderr, output = _invoke("merge", str(config), str(out), "--quiet")
    _assert_refused(code, stderr, output, r"tensor 'lm_head\.weight' is in .* but missing from .*tied", out)


def test_unicode_and_spaces_in_paths(family: Family, tmp_path: Path) -> None:
    folder = tmp_path / UNICODE_NAME
    folder.mkdir()
    models = [shutil.copytree(p, folder / f"fine tune {i} ü") for i, p in enumerate(family.models)]
    base = shutil.copytree(family.base, folder / "bâse 😀")
    recipe = {
        "merge_method": "ties",
        "base_model": str(base),
        "models": [{"model": str(p), "parameters": {"density": 0.5}} for p in models],
        "name": "fusion ü 😀",
    }
    out = folder / "sortie é 😀"
    config = _write(folder / "recette ü.yml", recipe)
    code, stderr, output = _invoke("merge", str(config), str(out))
    assert code == 0, output + stderr
    assert UNICODE_NAME in output.replace("\n", "")  # the summary names the output folder (rich wraps it)
    plain = {**recipe, "base_model": str(family.base)}
    plain["models"] = [{"model": str(p), "parameters": {"density": 0.5}} for p in family.models]
    reference = _merge_ok(_write(tmp_path / "plain.yml", plain), tmp_path / "plain")
    merged = _tensors(out)
    assert merged.keys() == reference.keys()
    assert all(torch.equal(merged[n], reference[n]) for n in reference)
    card = (out / "README.md").read_text(encoding="utf-8")
    assert "fusion ü 😀" in card and "bâse 😀" in card


@pytest.mark.parametrize("alias", ["trailing slash", "dot-dot", "symlink"])
def test_aliased_duplicate_model_is_refused(alias: str, family: Family, tmp_path: Path) -> None:
    """The same model under two spellings gets the one-line 'listed twice' error that a
    literal duplicate gets (naming both spellings)."""
    first = str(family.models[1])
    if alias == "trailing slash":
        second = first + "/"
    elif alias == "dot-dot":
        second = str(family.models[0] / ".." / family.models[1].name)
    else:
        (tmp_path / "link").symlink_to(family.models[1], target_is_directory=True)
        second = str(tmp_path / "link")
    recipe = {
        "merge_method": "linear",
        "models": [{"model": first}, {"model": second}, {"model": str(family.models[2])}],
    }
    out = tmp_path / "out"
    code, stderr, output = _invoke(
        "merge", str(_write(tmp_path / "dup.yml", recipe)), str(out), "--quiet", "--strict"
    )
    _assert_refused(code, stderr, output, r"listed twice \(as '", out)


@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "linear"])
def test_base_model_listed_among_models_under_another_spelling(
    method: str, family: Family, tmp_path: Path
) -> None:
    """m3sb drops a ``models`` entry equal to ``base_model``; spelled differently (a trailing
    slash), the same folder must give the same merge."""
    top = {"space": "task_vectors"} if method == "linear" else {}
    results: list[dict[str, torch.Tensor]] = []
    for spelling in (str(family.base), str(family.base) + "/"):
        recipe = {
            "merge_method": method,
            "base_model": str(family.base),
            "parameters": top,
            "models": [{"model": spelling}, *_others(family)],
        }
        folder = tmp_path / f"out-{len(results)}"
        results.append(_merge_ok(_write(tmp_path / f"r{len(results)}.yml", recipe), folder))
    literal, aliased = results
    differ = [
        name for name, tensor in literal.items() if not torch.allclose(aliased[name], tensor, 1e-6, 1e-7)
    ]
    assert not differ, f"the spelling of the base path changes {len(differ)} of {len(literal)} tensors"


# --------------------------------------------------------------------------- fuzzing the config loaders

SCHEMA_KEYS = sorted(
    {*MergeConfig.model_fields, *ModelEntry.model_fields, *ExperimentConfig.model_fields}
    | {*ParetoConfig.model_fields, *ParetoTaskConfig.model_fields, "filter", "value"}
)
PARAM_KEYS = ["weight", "density", "gamma", "t", "lambda", "normalize", "space", "random_seed", "max_iter"]
# Any characters, or a few letters mixed with those that break lines, quote or escape.
TEXT = st.one_of(st.text(max_size=10), st.text(alphabet="ab \n\r\t'\"\\:#*é😀", max_size=8))
HUGE = st.sampled_from([10**400, -(10**400), 2**63, -(2**64), 1e308, -1e308, 5e-324])
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    HUGE,
    st.floats(allow_nan=True, allow_infinity=True),
    TEXT,
    st.sampled_from(["linear", "ties", "slerp", "float16", "fp8", "task_vectors", "*", ""]),
)
KEYS = st.one_of(st.sampled_from(SCHEMA_KEYS + PARAM_KEYS), TEXT, st.integers(), st.none())
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(KEYS, inner, max_size=4),
    max_leaves=12,
)
PARAM_VALUES = st.one_of(
    SCALARS,
    st.lists(st.one_of(st.floats(), st.integers(), HUGE), max_size=4),
    st.lists(
        st.fixed_dictionaries({"value": SCALARS}, optional={"filter": st.one_of(TEXT, VALUES)}), max_size=3
    ),
    VALUES,
)
PARAMS = st.dictionaries(st.one_of(st.sampled_from(PARAM_KEYS), TEXT), PARAM_VALUES, max_size=4)
MODEL_ENTRY = st.fixed_dictionaries({"model": TEXT.filter(bool)}, optional={"parameters": PARAMS})
VALID_MERGE = st.fixed_dictionaries(
    {"models": st.lists(MODEL_ENTRY, min_size=1, max_size=3), "merge_method": TEXT},
    optional={
        "base_model": TEXT,
        "parameters": PARAMS,
        "dtype": st.sampled_from(sorted(DTYPE_ALIASES)),
        "out_dtype": st.sampled_from(sorted(DTYPE_ALIASES)),
        "tokenizer_source": TEXT,
        "name": TEXT,
    },
)
TASK = st.fixed_dictionaries(
    {
        "name": TEXT.filter(bool),
        "model": TEXT.filter(bool),
        "dataset": st.dictionaries(KEYS, VALUES, max_size=3),
    }
)
VALID_PARETO = st.fixed_dictionaries(
    {"base_model": TEXT.filter(bool), "tasks": st.lists(TASK, min_size=2, max_size=3)},
    optional={
        "merge_method": TEXT,
        "parameters": st.dictionaries(TEXT, VALUES, max_size=3),
        "metric": TEXT,
        "budget": st.integers(min_value=1),
        "bounds": st.tuples(st.floats(), st.floats()).map(list),
        "batch_size": st.integers(min_value=1),
        "candidates_per_pass": st.integers(min_value=1),
        "autocast": st.sampled_from(["none", "float16", "bfloat16"]),
        "executor": st.sampled_from(["local", "ray"]),
    },
)
VALID_EXPERIMENT = st.fixed_dictionaries(
    {
        "model_checkpoints": st.lists(TEXT, min_size=1, max_size=3),
        "datasets_config": st.lists(st.dictionaries(KEYS, VALUES, max_size=3), min_size=1, max_size=3),
        "merge_configs": st.dictionaries(
            TEXT, st.dictionaries(TEXT, VALUES, max_size=2), min_size=1, max_size=3
        ),
    },
    optional={"name": TEXT, "task_vectors": st.booleans(), "batch_size": st.integers(min_value=1)},
)


def _documents(valid: st.SearchStrategy[dict[str, Any]]) -> st.SearchStrategy[Any]:
    """Valid documents; valid ones with one key replaced or added (any key, any value);
    random mappings; and documents that are not mappings."""
    mutated = st.tuples(valid, KEYS, VALUES).map(lambda t: {**t[0], t[1]: t[2]})
    return st.one_of(mutated, valid, mutated, st.dictionaries(KEYS, VALUES, max_size=5), mutated, VALUES)


def _assert_config_error(action: Callable[[], Any], source: str) -> None:
    """``action`` succeeds or raises a ConfigError whose message is one line naming ``source``;
    any other exception propagates and fails the test."""
    try:
        action()
    except ConfigError as error:
        message = str(error)
        assert message.startswith(f"{source}: "), message
        assert "\n" not in message and "\r" not in message, f"multi-line message: {message!r}"


FUZZ = settings(
    max_examples=200, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)


@FUZZ
@example(document={"models": [{"model": "a"}], "merge_method": "linear", "colour\nred": 1})
@example(document={"models": [{"model": "a"}], "merge_method": "linear", "dtype": "fp\n8"})
@given(document=_documents(VALID_MERGE))
def test_fuzz_merge_config_documents(document: Any) -> None:
    _assert_config_error(lambda: parse_merge_config(document, "m.yaml"), "m.yaml")


@FUZZ
@example(
    document={"base_model": "b", "tasks": [{"name": n, "model": "m", "dataset": {}} for n in "tu"], "x\ry": 1}
)
@example(document={"base_model": "b", "tasks": [{"name": "a\nb", "model": "m", "dataset": {}}] * 2})
@given(document=_documents(VALID_PARETO))
def test_fuzz_pareto_config_documents(document: Any) -> None:
    _assert_config_error(lambda: _validated(ParetoConfig, document, "p.yaml"), "p.yaml")


@FUZZ
@example(
    document={"model_checkpoints": ["m"], "datasets_config": [{}], "merge_configs": {"l": {}}, "a\nb": 1}
)
@given(document=_documents(VALID_EXPERIMENT))
def test_fuzz_experiment_config_documents(document: Any) -> None:
    _assert_config_error(lambda: _validated(ExperimentConfig, document, "e.yaml"), "e.yaml")


YAML_LINES = [
    "models:",
    "  - model: x",
    "    parameters: {weight: .nan}",
    "merge_method: linear",
    "merge_method: [",
    "? [a]",
    ": 1",
    "\t- y",
    "&a [*a]",
    "!!python/name:os.system",
    "name: !!binary aGVsbG8=",
    "dtype: 2001-12-14",
    "'",
    '"\\x"',
    '"a\\nb": 1',
    "%YAML 9.9",
    "---",
    "...",
    "\x00",
    "\ufeff",
    "é😀: ü",
]
YAML_FILES = st.one_of(
    st.binary(max_size=200),
    st.text(max_size=200).map(lambda t: t.encode("utf-8", "surrogatepass")),
    st.lists(st.one_of(st.sampled_from(YAML_LINES), TEXT), max_size=8).map(
        lambda lines: "\n".join(lines).encode("utf-8", "surrogatepass")
    ),
)


@pytest.fixture(scope="module")
def fuzz_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


@FUZZ
@given(data=YAML_FILES)
def test_fuzz_config_files(data: bytes, fuzz_folder: Path) -> None:
    path = fuzz_folder / "fuzz.yml"
    path.write_bytes(data)
    for load in (load_merge_config, load_experiment_config, load_pareto_config):
        _assert_config_error(partial(load, path), str(path))
