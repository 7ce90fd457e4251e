"""``m3sb merge`` end to end, and the bad-input matrix: one line, non-zero exit, nothing written."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from m3sb.cli import app
from m3sb.toy import Family

runner = CliRunner()


def _write_config(folder: Path, recipe: dict[str, Any] | str) -> Path:
    path = folder / "recipe.yml"
    path.write_text(recipe if isinstance(recipe, str) else yaml.safe_dump(recipe))
    return path


def _variant(family: Family, folder: Path, change: Callable[[dict[str, torch.Tensor]], None]) -> str:
    """A copy of fine-tune 0 whose state dict ``change`` edits."""
    target = folder / "variant"
    shutil.copytree(family.models[0], target)
    state = load_file(target / "model.safetensors")
    change(state)
    save_file(state, target / "model.safetensors")
    return str(target)


def test_merge_writes_a_model_and_reports(family: Family, tmp_path: Path) -> None:
    recipe = {"merge_method": "barycenter", "models": [{"model": str(p)} for p in family.models]}
    result = runner.invoke(app, ["merge", str(_write_config(tmp_path, recipe)), str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert "merged" in result.stdout and "barycenter" in result.stdout
    assert (tmp_path / "out" / "model.safetensors").is_file()
    from m3sb.memory import peak_resident_bytes

    reported = re.search(r"peak RSS ([0-9.]+) GB", result.stdout)
    peak = peak_resident_bytes()
    assert reported is not None and peak is not None  # the test process is the merging process here
    assert 0.01 < float(reported.group(1)) <= peak / 1e9 + 0.005


def _shapes(state: dict[str, torch.Tensor]) -> None:
    state["model.layers.0.mlp.down_proj.weight"] = torch.zeros(2, 2)


def _missing(state: dict[str, torch.Tensor]) -> None:
    del state["model.layers.1.self_attn.q_proj.weight"]


def _nan(state: dict[str, torch.Tensor]) -> None:
    state["model.layers.1.mlp.gate_proj.weight"][0, 0] = float("nan")


def _truncate(family: Family, folder: Path) -> str:
    target = folder / "truncated"
    shutil.copytree(family.models[0], target)
    data = (target / "model.safetensors").read_bytes()
    (target / "model.safetensors").write_bytes(data[: len(data) // 2])
    return str(target)


class _Payload:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, ("touch PWNED",))


def _pickle_with_code(family: Family, folder: Path) -> str:
    target = folder / "evil"
    target.mkdir()
    shutil.copy(family.models[0] / "config.json", target / "config.json")
    state: dict[str, Any] = dict(load_file(family.models[0] / "model.safetensors"))
    state["payload"] = _Payload()
    torch.save(state, target / "pytorch_model.bin")
    return str(target)


def _overflowing_float16(folder: Path) -> dict[str, Any]:
    for name, value in (("a", 60000.0), ("b", 20000.0)):
        save_file({"w": torch.tensor([value, 1.0], dtype=torch.float16)}, folder / f"{name}.safetensors")
    models = [{"model": str(folder / f"{name}.safetensors")} for name in ("a", "b")]
    return {"merge_method": "linear", "models": models, "parameters": {"normalize": False}}


def _int_dtype_mismatch(folder: Path) -> dict[str, Any]:
    for name, dtype in (("a", torch.int64), ("b", torch.int32)):
        save_file({"w": torch.ones(2), "ids": torch.arange(3, dtype=dtype)}, folder / f"{name}.safetensors")
    return {
        "merge_method": "linear",
        "models": [{"model": str(folder / f"{n}.safetensors")} for n in ("a", "b")],
    }


def _empty_index(family: Family, folder: Path) -> str:
    target = folder / "indexed"
    shutil.copytree(family.models[0], target)
    (target / "model.safetensors").rename(target / "model-00001-of-00001.safetensors")
    (target / "model.safetensors.index.json").write_text('{"weight_map": {}}')
    return str(target)


def _foreign_adapter(folder: Path) -> Path:
    """A LoRA adapter whose factors fit a 48-wide model, not the 32-wide toy family."""
    adapter = folder / "foreign-adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 4, "lora_alpha": 8}')
    prefix = "base_model.model.model.layers.0.self_attn.q_proj"
    save_file(
        {f"{prefix}.lora_A.weight": torch.zeros(4, 48), f"{prefix}.lora_B.weight": torch.zeros(48, 4)},
        adapter / "adapter_model.safetensors",
    )
    return adapter


def _with_tokenizer(family: Family, folder: Path) -> list[str]:
    """Copies of two fine-tunes with the toy tokenizer (64 word tokens)."""
    from m3sb.toy import save_toy_tokenizer

    copies = []
    for index in (1, 2):
        target = folder / f"tokenized-{index}"
        shutil.copytree(family.models[index], target)
        save_toy_tokenizer(target, [f"w{i}" for i in range(63)])
        copies.append(str(target))
    return copies


def _with_tokenizer_first(folder: Path) -> str:
    return str(folder / "tokenized-1")


def _models(family: Family, *extra: str, **parameters: Any) -> list[dict[str, Any]]:
    return [{"model": str(p), "parameters": dict(parameters)} for p in family.models[1:]] + [
        {"model": e} for e in extra
    ]


# Each case: (id, recipe builder or raw YAML, extra CLI args, pattern the one-line error must match)
CASES: list[tuple[str, Callable[[Family, Path], dict[str, Any] | str], list[str], str]] = [
    (
        "shape mismatch",
        lambda f, d: {"merge_method": "linear", "models": _models(f, _variant(f, d, _shapes))},
        [],
        r"tensor 'model\.layers\.0\.mlp\.down_proj\.weight' has shape \[32, 64\] in .* "
        r"but \[2, 2\] in .*variant",
    ),
    (
        "missing tensor",
        lambda f, d: {"merge_method": "linear", "models": _models(f, _variant(f, d, _missing))},
        [],
        r"tensor 'model\.layers\.1\.self_attn\.q_proj\.weight' is in .* but missing from .*variant",
    ),
    (
        "NaN in an input",
        lambda f, d: {"merge_method": "linear", "models": _models(f, _variant(f, d, _nan))},
        [],
        r"tensor 'model\.layers\.1\.mlp\.gate_proj\.weight' in .*variant contains NaN or Inf",
    ),
    (
        "negative weight",
        lambda f, d: {"merge_method": "barycenter", "models": _models(f, weight=-1.0)},
        [],
        r"merge_method 'barycenter' needs non-negative weights",
    ),
    (
        "all-zero weights",
        lambda f, d: {"merge_method": "linear", "models": _models(f, weight=0.0)},
        [],
        r"weights sum to zero for tensor '",
    ),
    (
        "task vectors without base",
        lambda f, d: {"merge_method": "ties", "models": _models(f)},
        [],
        r"merge_method 'ties' needs a base_model",
    ),
    (
        "task-vector space without base",
        lambda f, d: {
            "merge_method": "barycenter",
            "models": _models(f),
            "parameters": {"space": "task_vectors"},
        },
        [],
        r"'barycenter' with space: task_vectors needs a base_model",
    ),
    (
        "unknown method",
        lambda f, d: {"merge_method": "soup", "models": _models(f)},
        [],
        r"unknown merge_method 'soup'; choose one of: linear, task_arithmetic",
    ),
    (
        "unknown parameter",
        lambda f, d: {"merge_method": "ties", "base_model": str(f.base), "models": _models(f, densty=0.5)},
        ["--strict"],
        r"unknown parameter 'densty' for merge_method 'ties'; allowed: weight, lambda, density",
    ),
    (
        "whole-merge parameter on a model",
        lambda f, d: {
            "merge_method": "ties",
            "base_model": str(f.base),
            "models": _models(f, normalize=True),
        },
        ["--strict"],
        r"parameter 'normalize' of 'ties' applies to the whole merge",
    ),
    (
        "parameter out of range",
        lambda f, d: {"merge_method": "ties", "base_model": str(f.base), "models": _models(f, density=1.5)},
        [],
        r"parameter 'density' must be <= 1\.0, got 1\.5",
    ),
    (
        "parameter of the wrong type",
        lambda f, d: {"merge_method": "linear", "models": _models(f), "parameters": {"normalize": "yes"}},
        [],
        r"parameter 'normalize' must be true or false, got 'yes'",
    ),
    (
        "required parameter missing",
        lambda f, d: {"merge_method": "slerp", "models": _models(f)},
        [],
        r"merge_method 'slerp' needs parameter 't'",
    ),
    (
        "too many models for slerp",
        lambda f, d: {
            "merge_method": "slerp",
            "models": _models(f, str(f.models[0])),
            "parameters": {"t": 0.5},
        },
        [],
        r"merge_method 'slerp' takes exactly 2 models",
    ),
    (
        "duplicate model",
        lambda f, d: {"merge_method": "linear", "models": _models(f, str(f.models[1]))},
        ["--strict"],
        r"model '.*finetune-1' is listed twice",
    ),
    (
        "stage names itself",
        lambda f, d: (
            f"name: a\nmerge_method: linear\nmodels: [{{model: a}}, {{model: {f.models[0]}}}]\n---\n"
            "merge_method: linear\nmodels: [{model: a}]\n"
        ),
        [],
        r"recipe\.yml: stage 'a' names itself as a model",
    ),
    (
        "stages in a cycle",
        lambda f, d: (
            f"name: a\nmerge_method: linear\nmodels: [{{model: b}}, {{model: {f.models[0]}}}]\n---\n"
            f"name: b\nmerge_method: linear\nmodels: [{{model: a}}, {{model: {f.models[1]}}}]\n---\n"
            "merge_method: linear\nmodels: [{model: a}, {model: b}]\n"
        ),
        [],
        r"recipe\.yml: stages 'a', 'b' name each other in a cycle",
    ),
    (
        "two unnamed stages",
        lambda f, d: (
            f"merge_method: linear\nmodels: [{{model: {f.models[0]}}}]\n---\n"
            f"merge_method: linear\nmodels: [{{model: {f.models[1]}}}]\n"
        ),
        [],
        r"recipe\.yml: documents 1 and 2 have no name",
    ),
    (
        "bad parameter in a later stage",
        lambda f, d: (
            f"name: a\nmerge_method: linear\nmodels: [{{model: {f.models[0]}}}, {{model: {f.models[1]}}}]"
            "\n---\nmerge_method: ties\nbase_model: a\nmodels: [{model: a, parameters: {densty: 0.5}}]\n"
        ),
        ["--strict"],
        r"recipe\.yml \(document 2\): model 'a': unknown parameter 'densty'",
    ),
    (
        "adapter for another base",
        lambda f, d: {
            "merge_method": "linear",
            "models": [{"model": f"{f.models[1]}+{_foreign_adapter(d)}"}],
        },
        [],
        r"foreign-adapter: its change to 'model\.layers\.0\.self_attn\.q_proj\.weight' has shape \[48, 48\] "
        r"but .* tensor is \[32, 32\]; is the adapter for another base model\?",
    ),
    (
        "token that no source has",
        lambda f, d: {
            "merge_method": "linear",
            "models": [{"model": m} for m in _with_tokenizer(f, d)],
            "tokenizer": {"tokens": {"<tool>": {"source": _with_tokenizer_first(d)}}},
        },
        [],
        r"tokenizer\.tokens\['<tool>'\]: its source .*tokenized-1 has no such token",
    ),
    (
        "slice past the depth",
        lambda f, d: {
            "merge_method": "passthrough",
            "slices": [{"sources": [{"model": str(f.models[0]), "layer_range": [0, 5]}]}],
        },
        [],
        r"slices\[0\]\.sources\[0\]: layer_range \[0, 5\] is past the 2 layers of .*finetune-0",
    ),
    (
        "slice base not among its sources",
        lambda f, d: {
            "merge_method": "slerp",
            "base_model": str(f.base),
            "parameters": {"t": 0.5},
            "slices": [
                {
                    "sources": [
                        {"model": str(f.models[0]), "layer_range": [0, 2]},
                        {"model": str(f.models[1]), "layer_range": [0, 2]},
                    ]
                }
            ],
        },
        [],
        r"slices\[0\]: base_model '.*base' is not among the slice's sources",
    ),
    (
        "slice sources of unequal lengths",
        lambda f, d: {
            "merge_method": "linear",
            "slices": [
                {
                    "sources": [
                        {"model": str(f.models[0]), "layer_range": [0, 2]},
                        {"model": str(f.models[1]), "layer_range": [0, 1]},
                    ]
                }
            ],
        },
        [],
        r"slices\[0\]: its sources give 1 and 2 layers",
    ),
    (
        "malformed YAML",
        lambda f, d: "models: [\n  - model: x\nmerge_method: linear: bad\n",
        [],
        r"recipe\.yml: malformed YAML \(line \d+, column \d+\)",
    ),
    (
        "missing model path",
        lambda f, d: {"merge_method": "linear", "models": _models(f, str(d / "nowhere"))},
        [],
        r"nowhere: no such file or directory",
    ),
    (
        "truncated safetensors",
        lambda f, d: {"merge_method": "linear", "models": _models(f, _truncate(f, d))},
        [],
        r"truncated/model\.safetensors: not a valid safetensors file",
    ),
    (
        "pickle carrying code",
        lambda f, d: {"merge_method": "linear", "models": _models(f, _pickle_with_code(f, d))},
        [],
        r"evil/pytorch_model\.bin: refused: the pickle holds more than tensors and was not run",
    ),
    (
        "no GPU",
        lambda f, d: {"merge_method": "linear", "models": _models(f)},
        ["--device", "cuda"] if not torch.cuda.is_available() else ["--device", "cuda:99"],
        r"--device cuda",
    ),
    (
        "lambda without task vectors",
        lambda f, d: {"merge_method": "linear", "models": _models(f), "parameters": {"lambda": 0.5}},
        ["--strict"],
        r"parameter 'lambda' of 'linear' scales task vectors; it needs space: task_vectors",
    ),
    (
        "float16 overflow",
        lambda f, d: _overflowing_float16(d),
        [],
        r"tensor 'w': merged values overflow float16",
    ),
    (
        "integer tensor of another dtype",
        lambda f, d: _int_dtype_mismatch(d),
        [],
        r"tensor 'ids' is int64 in .*a\.safetensors but int32 in .*b\.safetensors",
    ),
    (
        "malformed shard index",
        lambda f, d: {"merge_method": "linear", "models": _models(f, _empty_index(f, d))},
        [],
        r"model\.safetensors\.index\.json: 'weight_map' must map tensor names to shard file names",
    ),
    (
        "tokenizer source without tokenizer files",
        lambda f, d: {"merge_method": "linear", "models": _models(f), "tokenizer_source": str(f.models[1])},
        [],
        r"tokenizer_source .*finetune-1: no tokenizer files in",
    ),
    (
        "tokenizer union without a base tokenizer",
        lambda f, d: {"merge_method": "linear", "models": _models(f), "tokenizer_source": "union"},
        [],
        r"finetune-\d: no tokenizer files; tokenizer_source union builds on the base model's",
    ),
    (
        "bad shard size",
        lambda f, d: {"merge_method": "linear", "models": _models(f)},
        ["--out-shard-size", "lots"],
        r"size 'lots'",
    ),
]


@pytest.mark.parametrize(
    ("builder", "arguments", "pattern"), [case[1:] for case in CASES], ids=[c[0] for c in CASES]
)
def test_bad_input_gives_one_line_and_writes_nothing(
    builder: Callable[[Family, Path], dict[str, Any] | str],
    arguments: list[str],
    pattern: str,
    family: Family,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)
    workdir = tmp_path / "inputs"
    workdir.mkdir()
    config = _write_config(workdir, builder(family, workdir))
    out = tmp_path / "results" / "merged"
    result = runner.invoke(app, ["merge", str(config), str(out), "--quiet", *arguments])
    assert result.exit_code == 1, result.output
    message = result.stderr.strip()
    assert message.count("\n") == 0 and message.startswith("error: "), message
    assert "Traceback" not in result.output
    assert re.search(pattern, message), message
    assert not out.exists()
    assert not (tmp_path / "results").exists() or list((tmp_path / "results").iterdir()) == []
    assert not (tmp_path / "PWNED").exists()


def test_missing_config_file_is_named(tmp_path: Path) -> None:
    result = runner.invoke(app, ["merge", str(tmp_path / "none.yml"), str(tmp_path / "out")])
    assert result.exit_code == 1
    assert result.stderr.strip() == f"error: {tmp_path / 'none.yml'}: no such file"


def test_existing_output_is_kept_without_force(family: Family, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    config = _write_config(tmp_path, {"merge_method": "linear", "models": _models(family)})
    result = runner.invoke(app, ["merge", str(config), str(out), "--quiet"])
    assert result.exit_code == 1 and "pass --force" in result.stderr
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert runner.invoke(app, ["merge", str(config), str(out), "--quiet", "--force"]).exit_code == 0
    assert (out / "model.safetensors").is_file() and not (out / "keep.txt").exists()


@pytest.mark.slow
def test_console_script_error_has_no_traceback_unless_debug(tmp_path: Path) -> None:
    config = _write_config(tmp_path, {"merge_method": "soup", "models": [{"model": "x"}]})
    script = Path(sys.executable).with_name("m3sb")
    plain = subprocess.run(
        [script, "merge", config, tmp_path / "out"], capture_output=True, text=True, check=False
    )
    assert plain.returncode == 1
    assert plain.stderr.strip().startswith("error: unknown merge_method 'soup'")
    assert "Traceback" not in plain.stderr and plain.stderr.strip().count("\n") == 0
    debug = subprocess.run(
        [script, "merge", config, tmp_path / "out", "--debug"], capture_output=True, text=True, check=False
    )
    assert debug.returncode == 1 and "Traceback" in debug.stderr
    usage = subprocess.run([script, "merge", config, "--bogus"], capture_output=True, text=True, check=False)
    assert usage.returncode == 2
    assert usage.stderr.strip() == "error: No such option: --bogus (see m3sb merge --help)"


def test_methods_command_lists_every_method() -> None:
    from m3sb.methods import METHODS

    result = runner.invoke(app, ["methods"])
    assert result.exit_code == 0
    for name in METHODS:
        assert name in result.stdout


@pytest.mark.parametrize("target", ["sibling via ..", "the family folder"])
def test_output_that_would_replace_an_input_is_refused(family: Family, tmp_path: Path, target: str) -> None:
    before = sorted(p.name for p in family.base.parent.iterdir())
    config = _write_config(tmp_path, {"merge_method": "linear", "models": _models(family)})
    out = family.models[0] / ".." / "finetune-1" if target == "sibling via .." else family.base.parent
    result = runner.invoke(app, ["merge", str(config), str(out), "--quiet", "--force"])
    assert result.exit_code == 1
    assert "the output folder holds input" in result.stderr
    assert sorted(p.name for p in family.base.parent.iterdir()) == before
    assert (family.models[1] / "model.safetensors").is_file()


def test_uncreatable_output_folder_is_one_line(family: Family, tmp_path: Path) -> None:
    (tmp_path / "a_file").write_text("x")
    config = _write_config(tmp_path, {"merge_method": "linear", "models": _models(family)})
    result = runner.invoke(app, ["merge", str(config), str(tmp_path / "a_file" / "out"), "--quiet"])
    assert result.exit_code == 1
    assert result.stderr.strip().startswith("error: ") and "cannot create the output folder" in result.stderr


def test_tokenizer_files_come_from_tokenizer_source(family: Family, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    from m3sb.toy import save_toy_tokenizer

    tokenizer = save_toy_tokenizer(tmp_path / "tokenizer", [f"w{i}" for i in range(63)])
    recipe = {"merge_method": "linear", "models": _models(family), "tokenizer_source": str(tokenizer)}
    config = _write_config(tmp_path, recipe)
    result = runner.invoke(app, ["merge", str(config), str(tmp_path / "out"), "--quiet"])
    assert result.exit_code == 0, result.output
    written = AutoTokenizer.from_pretrained(str(tmp_path / "out"))
    assert written.get_vocab() == AutoTokenizer.from_pretrained(str(tokenizer)).get_vocab()
    assert json.loads((tmp_path / "out" / "config.json").read_text())["vocab_size"] == 64


@pytest.mark.parametrize("command", ["experiment", "pareto"])
def test_help_shows_the_executor_and_autocast_defaults(command: str) -> None:
    from typer.testing import CliRunner

    from m3sb.cli import app

    result = CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "200", "TERM": "dumb"})
    assert result.exit_code == 0
    text = " ".join(result.output.split())
    for flag in ("--executor", "--ray-address", "--workers", "--autocast", "--device"):
        assert flag in text
    assert "[default: the config's, else local]" in text and "[default: the config's, else none]" in text


def test_what_mergekit_ignores_is_ignored_with_a_note(family: Family, tmp_path: Path) -> None:
    models = [str(path) for path in family.models]
    clean = {
        "merge_method": "ties",
        "base_model": str(family.base),
        "models": [{"model": models[0], "parameters": {"weight": 0.7, "density": 0.5}}],
    }
    messy = clean | {
        "dype": "float16",  # a misspelt key: mergekit merges in the inputs' dtype
        "models": [
            {"model": models[0], "parameters": {"weight": 0.1}},
            {"model": models[0], "parameters": {"weight": 0.7, "density": 0.5, "densty": 0.2}},
        ],
        "parameters": {"temperature": 1},
    }
    out_clean, out_messy = tmp_path / "clean", tmp_path / "messy"
    assert (
        runner.invoke(
            app, ["merge", str(_write_config(tmp_path, clean)), str(out_clean), "--quiet"]
        ).exit_code
        == 0
    )
    (tmp_path / "messy.yml").write_text(yaml.safe_dump(messy))
    result = runner.invoke(app, ["merge", str(tmp_path / "messy.yml"), str(out_messy), "--quiet"])
    assert result.exit_code == 0, result.output
    notes = [line for line in result.stderr.splitlines() if line.startswith("note: ")]
    assert any(
        "dype: not a key of mergekit's schema here; ignored, as mergekit does (did you mean 'dtype'?)" in n
        for n in notes
    ), notes
    assert any(
        "parameter 'densty' is not one of ties's (did you mean 'density'?); ignored, as mergekit does" in n
        for n in notes
    ), notes
    assert any("parameter 'temperature'" in n for n in notes) and any(
        "is listed twice; merged once" in n for n in notes
    )
    assert (
        load_file(out_clean / "model.safetensors").keys() == load_file(out_messy / "model.safetensors").keys()
    )
    for name, tensor in load_file(out_clean / "model.safetensors").items():
        assert torch.equal(tensor, load_file(out_messy / "model.safetensors")[name]), name
    strict = runner.invoke(app, ["merge", str(tmp_path / "messy.yml"), str(tmp_path / "strict"), "--strict"])
    assert (
        strict.exit_code == 1
        and "unknown key 'dype'" in strict.stderr
        and "did you mean 'dtype'" in strict.stderr
    )
