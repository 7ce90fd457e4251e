"""RegMean and Fisher merging: the merge against FusionBench 0.2.33's own functions on the same
weights and statistics (float64), the statistics against a direct computation, and the merge
engine's checks of statistics files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

from m3sb.checkpoints import open_checkpoint
from m3sb.cli import app
from m3sb.config import parse_merge_config
from m3sb.errors import ConfigError
from m3sb.merge import build_plan, merge_to_folder
from m3sb.methods import merge_backbones, merge_group
from m3sb.statistics import compute_statistics, diagonal_fisher, gram_matrices, parse_task
from m3sb.statistics_files import read_statistics, write_statistics

regmean_module = pytest.importorskip(
    "fusion_bench.method.regmean.regmean", reason="fusion-bench is a dev dependency"
)
fisher_module = pytest.importorskip("fusion_bench.method.fisher_merging.fisher_merging")

TOLERANCE = 1e-5
runner = CliRunner()


def _models_and_grams(count: int, seed: int = 0) -> tuple[list[dict[str, torch.Tensor]], list[torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    models = [
        {
            "layer.weight": torch.randn(6, 5, generator=generator, dtype=torch.float64),
            "layer.bias": torch.randn(6, generator=generator, dtype=torch.float64),
        }
        for _ in range(count)
    ]
    inputs = [torch.randn(40, 5, generator=generator, dtype=torch.float64) for _ in range(count)]
    return models, [x.T @ x / len(x) for x in inputs]


@pytest.mark.parametrize("ratio", [1.0, 0.95, 0.5])
def test_regmean_matches_fusionbench(ratio: float) -> None:
    models, grams = _models_and_grams(3)
    theirs = regmean_module.merging_with_regmean_weights(
        {name: [m[name] for m in models] for name in models[0]},
        [{"layer": gram} for gram in grams],
        reduce_non_diagonal_ratio=ratio,
    )
    weight = merge_group(
        "regmean", [m["layer.weight"] for m in models], statistics=grams, reduce_non_diagonal_ratio=ratio
    )
    bias = merge_group("regmean", [m["layer.bias"] for m in models], statistics=[None] * 3)
    assert float((weight - theirs["layer.weight"]).norm() / theirs["layer.weight"].norm()) <= TOLERANCE
    torch.testing.assert_close(bias, theirs["layer.bias"])


def test_regmean_fits_every_models_outputs_best() -> None:
    models, grams = _models_and_grams(3, seed=1)
    weights = [m["layer.weight"] for m in models]
    merged = merge_group("regmean", weights, statistics=grams, reduce_non_diagonal_ratio=1.0)

    def loss(w: torch.Tensor) -> float:  # sum_i || (W - W_i) X_i^T ||^2 / n, through the Gram matrices
        return sum(
            float(torch.trace((w - wi) @ g @ (w - wi).T)) for wi, g in zip(weights, grams, strict=True)
        )

    assert loss(merged) < min(loss(sum(weights) / 3), *(loss(w) for w in weights))
    nudged = merged + 1e-3 * torch.randn(
        merged.shape, generator=torch.Generator().manual_seed(0), dtype=merged.dtype
    )
    assert loss(merged) < loss(nudged)


@pytest.mark.parametrize("normalize", [True, False])
def test_fisher_matches_fusionbench(normalize: bool) -> None:
    generator = torch.Generator().manual_seed(2)
    shapes = {"a.weight": (4, 3), "a.bias": (4,), "b.weight": (2, 4)}
    models = [
        {n: torch.randn(s, generator=generator, dtype=torch.float64) for n, s in shapes.items()}
        for _ in range(3)
    ]
    fishers = [
        {n: torch.rand(s, generator=generator, dtype=torch.float64) * (k + 1) for n, s in shapes.items()}
        for k in range(3)
    ]
    theirs = fisher_module.merging_with_fisher_weights(
        {name: [m[name] for m in models] for name in shapes},
        fishers,
        fisher_scaling_coefficients=torch.ones(3, dtype=torch.float64) / 3,
        normalize_fisher_weight=normalize,
    )
    norms = [float(torch.cat([f.reshape(-1) for f in fisher.values()]).norm()) for fisher in fishers]
    for name in shapes:
        ours = merge_group(
            "fisher",
            [m[name] for m in models],
            statistics=[f[name] for f in fishers],
            statistic_norms=norms,
            normalize=normalize,
        )
        assert float((ours - theirs[name]).norm() / theirs[name].norm()) <= TOLERANCE, name


class _Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.first = torch.nn.Linear(4, 6)
        self.second = torch.nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(torch.tanh(self.first(x)))


def test_gram_matrices_are_the_mean_input_outer_products() -> None:
    model = _Tiny()
    batches = [torch.randn(5, 2, 4, generator=torch.Generator().manual_seed(k)) for k in range(3)]
    grams = gram_matrices(model, model, batches, {"first.weight", "second.weight"})
    rows = torch.cat([b.reshape(-1, 4) for b in batches]).double()
    torch.testing.assert_close(grams["first.weight"], rows.T @ rows / len(rows))
    hidden = torch.tanh(model.first(rows.float())).double().detach()
    torch.testing.assert_close(grams["second.weight"], hidden.T @ hidden / len(hidden), rtol=1e-5, atol=1e-6)


def test_diagonal_fisher_is_the_mean_squared_score_of_sampled_labels() -> None:
    model = _Tiny()
    inputs = torch.randn(6, 4, generator=torch.Generator().manual_seed(3))
    fisher = diagonal_fisher(model, model, [inputs], {"second.bias"}, seed=5)
    generator = torch.Generator().manual_seed(5)
    expected = torch.zeros(3, dtype=torch.float64)
    for x in inputs:
        probabilities = torch.softmax(model(x.unsqueeze(0)).double(), dim=-1)[0]
        label = int(torch.multinomial(probabilities.detach(), 1, generator=generator))
        expected += (
            torch.nn.functional.one_hot(torch.tensor(label), 3).double() - probabilities.detach()
        ) ** 2
    torch.testing.assert_close(fisher["second.bias"], expected / len(inputs))


@pytest.fixture(scope="module")
def zoo_statistics(zoo_manifest: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Gram and Fisher files of the digits zoo's first two fine-tunes (32 training examples)."""
    zoo = json.loads(Path(zoo_manifest).read_text())
    folder = tmp_path_factory.mktemp("statistics")
    files: dict[str, Any] = {"zoo": zoo, "gram": [], "fisher": []}
    for task in zoo["tasks"][:2]:
        entry = json.dumps({**task["dataset"], "split": "train"})
        for kind in ("gram", "fisher"):
            tensors, metadata = compute_statistics(parse_task(entry, task["checkpoint"]), kind, samples=32)
            path = folder / f"{task['name']}.{kind}.safetensors"
            write_statistics(tensors, metadata, path)
            files[kind].append(path)
    return files


def _recipe(zoo_statistics: dict[str, Any], method: str, kind: str) -> dict[str, Any]:
    tasks = zoo_statistics["zoo"]["tasks"][:2]
    models = [
        {"model": task["checkpoint"], "statistics": str(path)}
        for task, path in zip(tasks, zoo_statistics[kind], strict=True)
    ]
    return {"merge_method": method, "models": models}


@pytest.mark.slow
def test_regmean_merge_of_the_zoo_uses_each_models_statistics(
    zoo_statistics: dict[str, Any], tmp_path: Path
) -> None:
    recipe = _recipe(zoo_statistics, "regmean", "gram") | {"dtype": "float64"}
    merged = open_checkpoint(merge_to_folder(parse_merge_config(recipe), tmp_path / "out").out_dir)
    models = [open_checkpoint(entry["model"]) for entry in recipe["models"]]
    statistics = [open_checkpoint(entry["statistics"]) for entry in recipe["models"]]
    header = read_statistics(recipe["models"][0]["statistics"])
    linear = next(name for name in header.shapes if name.endswith("query.weight"))
    expected = merge_group(
        "regmean",
        [m.load(linear).double() for m in models],
        statistics=[s.load(linear).double() for s in statistics],
    )
    assert float((merged.load(linear).double() - expected).norm() / expected.norm()) <= 1e-6
    bias = linear.removesuffix("weight") + "bias"
    average = (models[0].load(bias).double() + models[1].load(bias).double()) / 2
    torch.testing.assert_close(merged.load(bias), average)
    assert header.metadata["examples"] == "32" and len(header.shapes) >= 4


@pytest.mark.slow
def test_fisher_merge_of_the_zoo_weighs_each_entry_by_its_fisher(
    zoo_statistics: dict[str, Any], tmp_path: Path
) -> None:
    recipe = _recipe(zoo_statistics, "fisher", "fisher") | {"dtype": "float64"}
    merged = open_checkpoint(merge_to_folder(parse_merge_config(recipe), tmp_path / "out").out_dir)
    models = [open_checkpoint(entry["model"]) for entry in recipe["models"]]
    files = [open_checkpoint(entry["statistics"]) for entry in recipe["models"]]
    norms = [read_statistics(entry["statistics"]).norm() for entry in recipe["models"]]
    assert all(norm > 0 for norm in norms) and norms[0] != norms[1]
    plain = 0
    for name in files[0].tensors:
        expected = merge_group(
            "fisher",
            [m.load(name).double() for m in models],
            statistics=[f.load(name).double() for f in files],
            statistic_norms=norms,
        )
        ours = merged.load(name).double()
        assert float((ours - expected).norm() / expected.norm().clamp_min(1e-12)) <= 1e-6, name
        average = (models[0].load(name).double() + models[1].load(name).double()) / 2
        plain += int(torch.allclose(ours, average, rtol=1e-4, atol=1e-7))
    assert plain < len(files[0].tensors) / 2  # the Fisher weighting moves most tensors off the plain mean


def test_the_fingerprint_tells_apart_models_that_differ_in_a_large_matrix_only(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from m3sb.checkpoints import content_fingerprint

    generator = torch.Generator().manual_seed(0)
    shared = {"norm.weight": torch.ones(8), "big.weight": torch.randn(300, 300, generator=generator)}
    changed = dict(shared, **{"big.weight": shared["big.weight"] + 1e-3})
    for name, state in (("a", shared), ("b", changed), ("c", shared)):
        save_file(state, tmp_path / f"{name}.safetensors")
    a, b, c = (content_fingerprint(open_checkpoint(tmp_path / f"{n}.safetensors")) for n in "abc")
    assert a == c and a != b


def test_statistics_default_to_the_train_split() -> None:
    assert parse_task("{dataset_name: ./data}", "./model").dataset.split == "train"
    assert parse_task("{dataset_name: ./data, split: validation}", "./model").dataset.split == "validation"


@pytest.mark.slow
def test_bad_statistics_are_refused_in_one_line_before_anything_is_written(
    zoo_statistics: dict[str, Any], tmp_path: Path
) -> None:
    recipe = _recipe(zoo_statistics, "regmean", "gram")
    swapped = json.loads(json.dumps(recipe))
    swapped["models"][0]["statistics"], swapped["models"][1]["statistics"] = (
        recipe["models"][1]["statistics"],
        recipe["models"][0]["statistics"],
    )
    with pytest.raises(ConfigError, match="was computed for another model"):
        build_plan(parse_merge_config(swapped))
    wrong_kind = _recipe(zoo_statistics, "regmean", "fisher")
    with pytest.raises(ConfigError, match="holds fisher statistics; this method needs gram"):
        build_plan(parse_merge_config(wrong_kind))
    missing = json.loads(json.dumps(recipe))
    del missing["models"][1]["statistics"]
    path = tmp_path / "recipe.yml"
    path.write_text(json.dumps(missing))
    result = runner.invoke(app, ["merge", str(path), str(tmp_path / "out")])
    assert result.exit_code == 1 and not (tmp_path / "out").exists()
    assert len(result.output.strip().splitlines()) == 1
    assert "needs its gram statistics; add 'statistics: FILE'" in result.output
    # a misshaped tensor: the first Gram matrix cut to one row fewer
    from safetensors.torch import load_file, save_file

    first = recipe["models"][0]["statistics"]
    tensors = load_file(first)
    name = next(iter(tensors))
    tensors[name] = tensors[name][:-1]
    cut = tmp_path / "cut.safetensors"
    save_file(tensors, cut, metadata=read_statistics(first).metadata)
    misshaped = json.loads(json.dumps(recipe))
    misshaped["models"][0]["statistics"] = str(cut)
    with pytest.raises(ConfigError, match=f"tensor '{name}' has shape"):
        build_plan(parse_merge_config(misshaped))
    # a repeated entry keeps the statistics its first entry gave (lenient reading: merged once)
    repeated = json.loads(json.dumps(recipe))
    repeated["models"].append({"model": repeated["models"][0]["model"]})
    assert build_plan(parse_merge_config(repeated)).notes
    # --force never deletes a statistics file kept inside the output folder
    inside = tmp_path / "out2"
    inside.mkdir()
    kept = inside / "a.gram.safetensors"
    kept.write_bytes(Path(recipe["models"][0]["statistics"]).read_bytes())
    guarded = json.loads(json.dumps(recipe))
    guarded["models"][0]["statistics"] = str(kept)
    with pytest.raises(ConfigError, match="the output folder holds input statistics"):
        merge_to_folder(parse_merge_config(guarded), inside, force=True)
    assert kept.is_file()


@pytest.mark.slow
@pytest.mark.parametrize(("method", "kind"), [("regmean", "gram"), ("fisher", "fisher")])
def test_an_experiment_merges_as_m3sb_merge_does_with_statistics_files(
    zoo_statistics: dict[str, Any], method: str, kind: str, tmp_path: Path
) -> None:
    from m3sb.experiment import Experiment
    from m3sb.statistics import checkpoint_names

    zoo = zoo_statistics["zoo"]
    tasks = zoo["tasks"][:2]
    experiment = Experiment(
        "zoo",
        [task["checkpoint"] for task in tasks],
        [task["dataset"] for task in tasks],
        {method: {}},
        zoo["base_model_checkpoint"],
        device="cpu",
        statistics={"samples": 32},
    )
    problem = experiment._load()
    in_memory = problem.merge(method)
    merged = open_checkpoint(
        merge_to_folder(parse_merge_config(_recipe(zoo_statistics, method, kind)), tmp_path / "out").out_dir
    )
    names = checkpoint_names(problem.merged[0].model.model, in_memory, merged.tensors)
    assert len(names) == len(in_memory)  # the backbone: every tensor but the heads
    for name, saved in names.items():
        theirs = merged.load(saved).double()
        error = float((in_memory[name].double() - theirs).norm() / theirs.norm().clamp_min(1e-12))
        assert error <= 1e-5, name


@pytest.mark.parametrize("method", ["regmean", "fisher"])
def test_the_shares_a_search_scales_add_up_to_the_methods_merge(method: str) -> None:
    from m3sb.pareto.merging import check_search_method, method_shares
    from m3sb.statistics import whole_norm

    models, grams = _models_and_grams(3, seed=4)
    base = {
        name: tensor.mean(dim=0, keepdim=True).expand_as(tensor).clone() for name, tensor in models[0].items()
    }
    generator = torch.Generator().manual_seed(5)
    if method == "regmean":
        statistics = [{"layer.weight": gram} for gram in grams]
    else:
        statistics = [
            {n: torch.rand(t.shape, generator=generator, dtype=torch.float64) for n, t in base.items()}
        ]
        statistics += [
            {n: 3 * torch.rand(t.shape, generator=generator, dtype=torch.float64) for n, t in base.items()}
        ]
        statistics += [
            {n: torch.rand(t.shape, generator=generator, dtype=torch.float64) for n, t in base.items()}
        ]
    shares = method_shares(method, {}, base, models, statistics)
    norms = [whole_norm(own) for own in statistics] if method == "fisher" else []
    whole = merge_backbones(method, base, models, None, None, statistics, norms)
    for name, tensor in base.items():
        total = tensor + sum(share[name] - tensor for share in shares)
        torch.testing.assert_close(total, whole[name], rtol=1e-10, atol=1e-12)
    check_search_method(method, {}, (-1.0, 1.0))  # shares may be subtracted too


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--kind", "hessian"], "kind: expected one of gram, gram_plusplus, fisher, got 'hessian'"),
        (["--task", "[not, a, mapping]"], "--task: expected a mapping"),
        (["--task", "{split: train}"], "dataset_name"),
        (["--out-inside"], "where it would be read as weights"),
    ],
)
def test_statistics_command_refuses_bad_input_in_one_line(
    arguments: list[str], message: str, tmp_path: Path
) -> None:
    out = tmp_path / "out.safetensors"
    if arguments == ["--out-inside"]:  # a statistics file in the model's folder would be read as weights
        (tmp_path / "model").mkdir()
        out, arguments = tmp_path / "model" / "gram.safetensors", []
    command = ["statistics", str(tmp_path / "model"), str(out)]
    task = [] if "--task" in arguments else ["--task", "{dataset_name: ./data}"]
    result = runner.invoke(app, [*command, *task, *arguments])
    assert result.exit_code == 1
    assert len(result.output.strip().splitlines()) == 1 and message in result.output, result.output
    assert not out.exists()


@pytest.mark.slow
def test_statistics_command_writes_a_file_the_merge_accepts(zoo_manifest: Path, tmp_path: Path) -> None:
    task = json.loads(Path(zoo_manifest).read_text())["tasks"][0]
    out = tmp_path / "gram.safetensors"
    entry = json.dumps({**task["dataset"], "split": "train"})
    arguments = [
        "statistics",
        task["checkpoint"],
        str(out),
        "--task",
        entry,
        "--samples",
        "8",
        "--device",
        "cpu",
    ]
    result = runner.invoke(app, arguments)
    assert result.exit_code == 0, result.output
    header = read_statistics(out)
    assert header.kind == "gram" and header.metadata["examples"] == "8"
    again = runner.invoke(app, arguments)
    assert again.exit_code == 1 and "exists; pass --force" in again.output
