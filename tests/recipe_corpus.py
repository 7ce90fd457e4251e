"""Real mergekit recipes (``tests/recipes/*.yml``, verbatim) run by mergekit and by m3sb on tiny
stand-ins of their models, and compared.

Every model a recipe names is replaced, at run time only, by a tiny random Llama of the
depth its ``layer_range`` entries need: the ``base_model`` by the base of a toy family and
the other models by its fine-tunes; ``model+adapter`` gets a PEFT LoRA adapter made for its
stand-in; when a recipe builds a tokenizer, every model but the base gets two tokens of its
own (and the tokens its ``tokens:`` settings take from it). Both tools then merge the
recipe as written, and their outputs are compared tensor by tensor (embedding rows token by
token). Run ``uv run python tests/recipe_corpus.py`` for the table.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import sys
import tempfile
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from m3sb.stages import map_models

RECIPES = Path(__file__).resolve().parent / "recipes"
WORDS = [f"w{i}" for i in range(62)]
SPECIAL = ("<unk>", "<s>")
STAND_IN_DEPTH = 4  # layers of a stand-in when no layer_range asks for more

# Methods whose m3sb result differs from mergekit's by design, with the reason (README).
BY_DESIGN = {
    "slerp": "m3sb's slerp interpolates the norm linearly (M3SB's definition); mergekit's does not",
    "dare_ties": "random drop masks (m3sb seeds them per tensor; rescales by 1/density)",
    "dare_linear": "random drop masks (m3sb seeds them per tensor; rescales by 1/density)",
    "della": "random drop masks (m3sb seeds them per tensor; rescales each survivor by 1/p)",
    "della_linear": "random drop masks (m3sb seeds them per tensor; rescales each survivor by 1/p)",
    "karcher": "mergekit's karcher stops after 10 steps at tol 1e-5; m3sb's converges",
}
HALF_TOLERANCE = {"float16": 2e-3, "bfloat16": 1.6e-2}  # mergekit computes in the half dtype, m3sb in float32


@dataclass
class Outcome:
    """What happened to one recipe."""

    recipe: str
    method: str
    mergekit_error: str | None = None
    m3sb_error: str | None = None
    max_error: float | None = None
    tolerance: float = 1e-6
    note: str = ""

    @property
    def status(self) -> str:
        """same, differs (by design or not), m3sb refuses, mergekit fails."""
        if self.m3sb_error is not None:
            return "m3sb refuses"
        if self.mergekit_error is not None:
            return "mergekit fails"
        assert self.max_error is not None
        if self.max_error <= self.tolerance:
            return "same"
        if self.note.startswith("same in float32"):
            return "same in float32"
        return "differs by design" if self.method in BY_DESIGN else "differs"


def documents(path: Path) -> list[dict[str, Any]]:
    """The recipe's YAML documents."""
    return [document for document in yaml.safe_load_all(path.read_text(encoding="utf-8")) if document]


def _references(docs: list[dict[str, Any]]) -> list[str]:
    stages = {str(document["name"]) for document in docs if document.get("name")}
    found: list[str] = []

    def note(reference: str) -> str:
        if reference not in stages:
            found.append(reference)
        return reference

    for document in copy.deepcopy(docs):
        map_models(document, note)
    return list(dict.fromkeys(found))


def _depth(docs: list[dict[str, Any]]) -> int:
    ends = [
        int(source["layer_range"][1])
        for document in docs
        for piece in document.get("slices") or []
        for source in piece.get("sources") or []
        if "layer_range" in source
    ]
    return max([STAND_IN_DEPTH, *ends])


def _retokenize(folder: Path, extra: list[str], seed: int) -> None:
    """Give a stand-in its own tokens after the shared ones (new random embedding rows)."""
    from safetensors.torch import load_file, save_file

    from m3sb.toy import save_toy_tokenizer

    state = load_file(folder / "model.safetensors")
    generator = torch.Generator().manual_seed(seed)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        old = state[name]
        fresh = torch.randn((len(extra), old.shape[1]), generator=generator) * float(old.std())
        state[name] = torch.cat([old, fresh])
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(
        json.dumps(config | {"vocab_size": len(SPECIAL) + len(WORDS) + len(extra)})
    )
    save_toy_tokenizer(folder, [*WORDS, *extra], SPECIAL)


def _tokens_from(docs: list[dict[str, Any]]) -> dict[str, list[str]]:
    """The tokens a recipe's settings take from each model (the stand-in must have them)."""
    wanted: dict[str, list[str]] = {}
    for document in docs:
        tokenizer = document.get("tokenizer")
        for token, setting in (
            ((tokenizer or {}).get("tokens") or {}).items() if isinstance(tokenizer, dict) else []
        ):
            source = setting.get("source") if isinstance(setting, dict) else None
            model = (
                source
                if isinstance(source, str)
                else source.get("model")
                if isinstance(source, dict)
                else None
            )
            if isinstance(model, str):
                wanted.setdefault(model, []).append(str(token))
                if isinstance(source, dict) and source.get("token"):
                    wanted[model].append(str(source["token"]))
    return wanted


def stand_ins(docs: list[dict[str, Any]], folder: Path) -> dict[str, str]:
    """Tiny stand-in locations for every model the recipe names."""
    from m3sb.toy import make_family, save_toy_adapter, save_toy_tokenizer

    references = _references(docs)
    bases = {str(document["base_model"]) for document in docs if document.get("base_model")}
    models = sorted({reference.split("+")[0] for reference in references})
    base_name = next((name for name in models if name in bases), None)
    others = [name for name in models if name != base_name]
    family = make_family(
        folder / "family", n_models=max(1, len(others)), seed=11, hidden=16, layers=_depth(docs)
    )
    paths = {name: family.models[i] for i, name in enumerate(others)}
    if base_name is not None:
        paths[base_name] = family.base
    retokenized = any(d.get("tokenizer") or d.get("tokenizer_source") for d in docs)
    wanted = _tokens_from(docs)
    for folder_path in [family.base, *family.models]:
        save_toy_tokenizer(folder_path, WORDS, SPECIAL)
    for index, name in enumerate(others):
        extra = [f"<own_{index}_a>", f"<own_{index}_b>"] if retokenized else []
        extra += [token for token in wanted.get(name, []) if token not in [*WORDS, *SPECIAL, *extra]]
        if extra:
            _retokenize(paths[name], extra, seed=index)
    located = {name: str(path) for name, path in paths.items()}
    for index, reference in enumerate(references):
        if "+" in reference:
            model = reference.split("+", 1)[0]
            adapter = save_toy_adapter(Path(located[model]), folder / f"adapter{index}", index)
            located[reference] = f"{located[model]}+{adapter}"
    return located


def substituted(docs: list[dict[str, Any]], located: dict[str, str]) -> list[dict[str, Any]]:
    """The recipe with every model replaced by its stand-in."""
    result = copy.deepcopy(docs)
    for document in result:
        map_models(document, lambda reference: located.get(reference, reference))
    return result


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:200] if text else ''}"


def _run_mergekit(docs: list[dict[str, Any]], out: Path, work: Path) -> None:
    import mergekit.config
    import mergekit.merge

    options = mergekit.merge.MergeOptions(
        quiet=True, write_model_card=False, lora_merge_cache=str(work / "lora-cache"), copy_tokenizer=True
    )
    if len(docs) == 1:
        mergekit.merge.run_merge(
            mergekit.config.MergeConfiguration.model_validate(docs[0]), str(out), options=options
        )
        return
    from click.testing import CliRunner
    from mergekit.scripts import multimerge

    recipe = work / "mergekit.yml"
    recipe.write_text(yaml.safe_dump_all(docs))
    result = CliRunner().invoke(
        multimerge.main, [str(recipe), "-I", str(work / "mk-stages"), "--out-path", str(out)]
    )
    if result.exit_code != 0:
        raise RuntimeError(str(result.exception) if result.exception else result.output)
    if not (out / "config.json").exists():  # every stage named: the last one is the result
        last = str(docs[-1]["name"])
        shutil.copytree(work / "mk-stages" / last, out, dirs_exist_ok=True)


def _run_m3sb(docs: list[dict[str, Any]], out: Path, work: Path) -> None:
    from m3sb.config import parse_merge_config
    from m3sb.merge import merge_to_folder

    if len(docs) == 1:
        merge_to_folder(parse_merge_config(docs[0]), out)
        return
    from typer.testing import CliRunner

    from m3sb.cli import app

    recipe = work / "m3sb.yml"
    recipe.write_text(yaml.safe_dump_all(docs))
    result = CliRunner().invoke(
        app, ["merge", str(recipe), str(out), "--quiet", "--stages", str(work / "stages")]
    )
    if result.exit_code != 0:
        raise RuntimeError(result.stderr.strip() or result.output.strip())


def _vocabulary(folder: Path) -> dict[str, int] | None:
    from transformers import AutoTokenizer

    if not (folder / "tokenizer.json").is_file() and not (folder / "tokenizer_config.json").is_file():
        return None
    vocabulary: dict[str, int] = AutoTokenizer.from_pretrained(str(folder)).get_vocab()
    return vocabulary


def compare(ours: Path, theirs: Path) -> tuple[float, str]:
    """The largest relative error over tensors (embedding rows by token), and what else differs."""
    from m3sb.checkpoints import open_checkpoint

    mine, reference = open_checkpoint(ours), open_checkpoint(theirs)
    notes = []
    if set(mine.tensors) != set(reference.tensors):
        missing = sorted(set(reference.tensors) ^ set(mine.tensors))[:3]
        return float("inf"), f"tensor names differ ({', '.join(missing)})"
    our_vocab, their_vocab = _vocabulary(ours), _vocabulary(theirs)
    by_token = our_vocab is not None and their_vocab is not None and our_vocab != their_vocab
    if our_vocab is not None and their_vocab is not None and set(our_vocab) != set(their_vocab):
        notes.append("vocabularies differ")
    worst = 0.0
    for name in reference.tensors:
        x, y = mine.load(name).double(), reference.load(name).double()
        if by_token and x.shape[0] == len(our_vocab or {}) and y.shape[0] == len(their_vocab or {}):
            assert our_vocab is not None and their_vocab is not None
            shared = [t for t in their_vocab if t in our_vocab]
            x = x[[our_vocab[t] for t in shared]]
            y = y[[their_vocab[t] for t in shared]]
        if x.shape != y.shape:
            return float("inf"), f"'{name}' has shape {list(x.shape)} in m3sb, {list(y.shape)} in mergekit"
        worst = max(worst, float((x - y).norm() / y.norm().clamp_min(1e-30)))
    layers = [
        json.loads((folder / "config.json").read_text()).get("num_hidden_layers") for folder in (ours, theirs)
    ]
    if layers[0] != layers[1]:
        notes.append(f"layer counts {layers[0]} and {layers[1]}")
        worst = float("inf")
    return worst, "; ".join(notes)


def run_recipe(path: Path, work: Path) -> Outcome:
    """Both tools on one recipe, with stand-ins built under ``work``."""
    docs = documents(path)
    final = next((d for d in docs if not d.get("name")), docs[-1])
    outcome = Outcome(path.name, str(final.get("merge_method")))
    dtype = str(final.get("out_dtype") or final.get("dtype") or "float32")
    outcome.tolerance = HALF_TOLERANCE.get(dtype, 1e-6)
    located = stand_ins(docs, work / "models")
    recipe = substituted(docs, located)
    theirs, ours = work / "mergekit", work / "m3sb"
    try:
        _run_mergekit(recipe, theirs, work)
    except Exception as error:  # noqa: BLE001 (recorded, not raised)
        outcome.mergekit_error = _first_line(error)
    try:
        _run_m3sb(recipe, ours, work)
    except Exception as error:  # noqa: BLE001 (recorded, not raised)
        outcome.m3sb_error = _first_line(error)
    if outcome.mergekit_error is None and outcome.m3sb_error is None:
        outcome.max_error, outcome.note = compare(ours, theirs)
        if outcome.status == "differs" and dtype in HALF_TOLERANCE:
            outcome.note = _float32_control(recipe, work, dtype)
    return outcome


def _float32_control(recipe: list[dict[str, Any]], work: Path, dtype: str) -> str:
    """Whether the tools agree when both compute in float32 (mergekit computes in the recipe's
    half dtype, so thresholds and masks can fall differently)."""
    control = copy.deepcopy(recipe)
    for document in control:
        document["dtype"] = "float32"
        document.pop("out_dtype", None)
    theirs, ours = work / "mergekit-float32", work / "m3sb-float32"
    _run_mergekit(control, theirs, work / "control-mk")
    _run_m3sb(control, ours, work / "control-m3sb")
    error, _ = compare(ours, theirs)
    if error <= 1e-6:
        return f"same in float32 ({error:.0e}); mergekit computes in {dtype}, m3sb in float32"
    return f"also differs in float32 ({error:.1e})"


def recipe_paths() -> list[Path]:
    """Every recipe of the corpus."""
    return sorted(RECIPES.glob("*.yml"))


def run_all() -> Iterator[Outcome]:
    """Every recipe, each in a fresh temporary folder."""
    for path in recipe_paths():
        with tempfile.TemporaryDirectory() as folder:
            try:
                yield run_recipe(path, Path(folder))
            except Exception:  # noqa: BLE001 (the harness itself failed on this recipe)
                outcome = Outcome(
                    path.name, "?", m3sb_error="harness: " + traceback.format_exc(limit=1).splitlines()[-1]
                )
                yield outcome


def main() -> None:
    """Print the corpus table (markdown) and the counts."""
    import logging

    logging.disable(logging.WARNING)
    outcomes = list(run_all())
    print("| recipe | method | result | max rel. error | note |")
    print("|---|---|---|---|---|")
    for outcome in outcomes:
        error = "" if outcome.max_error is None else f"{outcome.max_error:.1e}"
        detail = (
            outcome.note or outcome.m3sb_error or outcome.mergekit_error or BY_DESIGN.get(outcome.method, "")
        )
        if outcome.status == "same":
            detail = outcome.note
        cleaned = re.sub(r"[|]", "/", detail)
        print(f"| {outcome.recipe} | {outcome.method} | {outcome.status} | {error} | {cleaned} |")
    counts: dict[str, int] = {}
    for outcome in outcomes:
        counts[outcome.status] = counts.get(outcome.status, 0) + 1
    print(
        f"\n{len(outcomes)} recipes: "
        + ", ".join(f"{count} {status}" for status, count in sorted(counts.items()))
    )


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    main()
