"""RegMean++: the layer-by-layer walk against FusionBench 0.2.33's own algorithm on tiny CLIP
vision towers (float64), identities of the walk, and the statistics files through the CLI
and the merge engine."""

from __future__ import annotations

import copy
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
from m3sb.layerwise_statistics import layer_stack, regmean_plusplus_statistics
from m3sb.merge import build_plan, merge_to_folder
from m3sb.methods import merge_backbones
from m3sb.statistics_files import read_statistics
from m3sb.tasks.model import TaskModel

plusplus_module = pytest.importorskip(
    "fusion_bench.method.regmean_plusplus.clip_regmean_plusplus", reason="fusion-bench is a dev dependency"
)
runner = CliRunner()


def _clip_towers(count: int) -> tuple[Any, list[Any]]:
    from transformers import CLIPVisionConfig, CLIPVisionModel

    config = CLIPVisionConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=3,
        num_attention_heads=2,
        image_size=8,
        patch_size=4,
    )
    torch.manual_seed(0)
    base = CLIPVisionModel(config).double().eval()
    towers = []
    for _ in range(count):
        tower = copy.deepcopy(base)
        with torch.no_grad():
            for parameter in tower.parameters():
                parameter.add_(0.1 * torch.randn_like(parameter))
        towers.append(tower)
    return base, towers


def _fusionbench_regmean_plusplus(
    base: Any, towers: list[Any], data: list[list[torch.Tensor]], ratio: float
) -> dict[str, torch.Tensor]:
    """FusionBench's RegMeanAlgorithmForCLIPPlusPlus.run on the towers. What is adapted, and
    only that: its data loading (the batches are given), its zero-shot head (unused by the
    merge), its config mapping (a plain dict in 0.2.33, which its own decorator cannot read),
    and transformers 5's layout (towers without the ``vision_model`` wrapper, layers that
    return a tensor rather than a tuple)."""
    from bidict import bidict
    from fusion_bench.method.regmean_plusplus.regmean_plusplus import RegMeanAlgorithmPlusPlus
    from fusion_bench.modelpool import BaseModelPool

    class Wrapped(torch.nn.Module):
        def __init__(self, tower: Any) -> None:
            super().__init__()
            self.vision_model = tower

    names = [f"task{index}" for index in range(len(towers))]
    batches = dict(zip(names, data, strict=True))

    class Pool(BaseModelPool):  # type: ignore[misc]
        def load_train_dataset(self, name: str, *args: Any, **kwargs: Any) -> str:
            return name

    class Reference(plusplus_module.RegMeanAlgorithmForCLIPPlusPlus):  # type: ignore[misc]
        _config_mapping = bidict(
            {**RegMeanAlgorithmPlusPlus._config_mapping, "dataloader_kwargs": "dataloader_kwargs"}
        )

        def on_regmean_start(self) -> None:
            pass

        def get_input_for_first_layer(self, model: Any, name: str) -> list[torch.Tensor]:
            vision = model.vision_model
            return [vision.pre_layrnorm(vision.embeddings(batch)) for batch in batches[name]]

        def layer_batches_forward(self, layer: Any, batches_input: list[torch.Tensor]) -> list[torch.Tensor]:
            outputs = [
                layer(batch, attention_mask=None, causal_attention_mask=None) for batch in batches_input
            ]
            return [(out[0] if isinstance(out, tuple) else out).detach() for out in outputs]

    pool = Pool(
        {
            "_pretrained_": Wrapped(copy.deepcopy(base)),
            **{name: Wrapped(copy.deepcopy(t)) for name, t in zip(names, towers, strict=True)},
        }
    )
    algorithm = Reference(
        dataloader_kwargs={},
        num_regmean_examples=1,
        exclude_param_names_regex=[],
        reduce_non_diagonal_ratio=ratio,
        weight_transpose=True,
    )
    merged = algorithm.run(pool)
    return {name.removeprefix("vision_model."): t for name, t in merged.state_dict().items()}


def _task_models(towers: list[Any]) -> list[TaskModel]:
    return [
        TaskModel(f"task{index}", tower, None, {k: v.clone() for k, v in tower.state_dict().items()})
        for index, tower in enumerate(towers)
    ]


def _forward(tower: Any) -> Any:
    return lambda values: tower(pixel_values=values)


def _images(count: int, seed: int) -> list[list[torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [
        [torch.randn(4, 3, 8, 8, generator=generator, dtype=torch.float64) for _ in range(2)]
        for _ in range(count)
    ]


@pytest.mark.parametrize("ratio", [1.0, 0.95])
def test_regmean_plusplus_matches_fusionbench(ratio: float) -> None:
    base, towers = _clip_towers(3)
    data = _images(3, seed=1)
    theirs = _fusionbench_regmean_plusplus(base, towers, data, ratio)
    models = _task_models(towers)
    statistics = regmean_plusplus_statistics(models, [_forward(t) for t in towers], data, None, ratio)
    ours = merge_backbones(
        "regmean_plusplus", models[0].weights, [m.weights for m in models], statistics=statistics,
        reduce_non_diagonal_ratio=ratio,
    )  # fmt: skip
    assert len(statistics[0]) == 3 * 6  # q, k, v, out, fc1, fc2 in each of the 3 layers
    for name, expected in theirs.items():
        if name.startswith("post_layernorm."):  # FusionBench leaves it at the base's; m3sb averages it
            mean = sum(m.weights[name] for m in models) / 3
            torch.testing.assert_close(ours[name], mean)
            continue
        error = float((ours[name] - expected).norm() / expected.norm())
        assert error <= 1e-5, (name, error)
    for tower, model in zip(towers, models, strict=True):  # the walk leaves each model its own weights
        for name, tensor in tower.state_dict().items():
            assert torch.equal(tensor, model.weights[name]), name


def test_the_first_layer_sees_the_merged_embeddings_and_later_layers_the_merged_layers() -> None:
    _, towers = _clip_towers(2)
    shared = {name: t for name, t in towers[0].state_dict().items() if not name.startswith("encoder.")}
    towers[1].load_state_dict(shared, strict=False)  # same embeddings: layer 0's inputs are each model's own
    data = _images(2, seed=2)
    models = _task_models(towers)
    plusplus = regmean_plusplus_statistics(models, [_forward(t) for t in towers], data, None, 0.95)
    from m3sb.statistics import gram_matrices

    weight_names = {name for name in models[0].weights if name.endswith(".weight")}
    for tower, own, batches in zip(towers, plusplus, data, strict=True):
        plain = gram_matrices(tower, _forward(tower), batches, weight_names)
        first = "encoder.layers.0.self_attn.q_proj.weight"
        later = "encoder.layers.2.mlp.fc1.weight"
        torch.testing.assert_close(own[first], plain[first], rtol=1e-10, atol=1e-12)
        assert float((own[later] - plain[later]).norm() / plain[later].norm()) > 1e-3


def test_identical_models_merge_to_themselves() -> None:
    _, towers = _clip_towers(1)
    towers.append(copy.deepcopy(towers[0]))
    models = _task_models(towers)
    data = _images(2, seed=3)
    statistics = regmean_plusplus_statistics(models, [_forward(t) for t in towers], data, [2.0, 1.0], 1.0)
    merged = merge_backbones(
        "regmean_plusplus", models[0].weights, [m.weights for m in models], [2.0, 1.0], statistics=statistics,
        reduce_non_diagonal_ratio=1.0,
    )  # fmt: skip
    for name, tensor in models[0].weights.items():
        torch.testing.assert_close(merged[name], tensor, rtol=1e-9, atol=1e-9)


def test_a_model_without_a_stack_of_layers_is_refused() -> None:
    with pytest.raises(ConfigError, match="tiny: no stack of layers found"):
        layer_stack(torch.nn.Sequential(torch.nn.Linear(2, 2)), "tiny")


@pytest.mark.slow
def test_statistics_command_and_merge_reproduce_the_walk(zoo_manifest: Path, tmp_path: Path) -> None:
    tasks = json.loads(Path(zoo_manifest).read_text())["tasks"][:2]
    out = tmp_path / "plusplus"
    command = ["statistics", *(task["checkpoint"] for task in tasks), str(out), "--kind", "gram_plusplus"]
    for task in tasks:
        command += ["--task", json.dumps({**task["dataset"], "split": "train"})]
    result = runner.invoke(app, [*command, "--samples", "16", "--weights", "2,1", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    files = sorted(out.glob("*.safetensors"))
    assert [f.stem for f in files] == sorted(Path(task["checkpoint"]).name for task in tasks)
    by_name = {f.stem: f for f in files}
    models = [
        {"model": task["checkpoint"], "statistics": str(by_name[Path(task["checkpoint"]).name])}
        for task in tasks
    ]
    header = read_statistics(models[0]["statistics"])
    assert header.kind == "gram_plusplus" and header.metadata["examples"] == "16"

    name = next(n for n in sorted(header.shapes) if ".1." in n)  # a linear layer after the first

    weighted = [{**m, "parameters": {"weight": w}} for m, w in zip(models, [2.0, 1.0], strict=True)]
    recipe = {"merge_method": "regmean_plusplus", "models": weighted, "dtype": "float64"}
    merged = open_checkpoint(merge_to_folder(parse_merge_config(recipe), tmp_path / "merged").out_dir)
    sources = [open_checkpoint(m["model"]) for m in models]
    statistics = [open_checkpoint(m["statistics"]) for m in models]
    from m3sb.methods import merge_group

    expected = merge_group(
        "regmean", [s.load(name).double() for s in sources], [2.0, 1.0],
        statistics=[s.load(name) for s in statistics],
    )  # fmt: skip
    torch.testing.assert_close(merged.load(name).double(), expected)

    from m3sb.experiment import Experiment
    from m3sb.statistics import checkpoint_names

    zoo = json.loads(Path(zoo_manifest).read_text())
    experiment = Experiment(
        "zoo",
        [task["checkpoint"] for task in tasks],
        [task["dataset"] for task in tasks],
        {"plusplus": {"method": "regmean_plusplus", "weights": [2.0, 1.0]}},
        zoo["base_model_checkpoint"],
        device="cpu",
        statistics={"samples": 16},
    )
    problem = experiment._load()
    in_memory = problem.merge("plusplus")
    names = checkpoint_names(problem.merged[0].model.model, in_memory, merged.tensors)
    assert len(names) == len(in_memory)
    for own, saved in names.items():
        theirs = merged.load(saved).double()
        error = float((in_memory[own].double() - theirs).norm() / theirs.norm().clamp_min(1e-12))
        assert error <= 1e-5, own

    equal = {"merge_method": "regmean_plusplus", "models": models}
    with pytest.raises(ConfigError, match=r"measured through a merge with weights \[0\.66"):
        build_plan(parse_merge_config(equal))
    plain = {"merge_method": "regmean", "models": weighted}
    with pytest.raises(ConfigError, match="holds gram_plusplus statistics; this method needs gram"):
        build_plan(parse_merge_config(plain))


def test_plusplus_statistics_command_refuses_bad_input_in_one_line(tmp_path: Path) -> None:
    base = ["statistics", str(tmp_path / "a"), str(tmp_path / "b"), str(tmp_path / "out")]
    for arguments, message in [
        (["--task", "{dataset_name: x}"] * 3, "--task: given 3 times for 2 models"),
        (
            ["--task", "{dataset_name: x}", "--weights", "1,x", "--kind", "gram_plusplus"],
            "--weights: expected",
        ),
        (["--task", "{dataset_name: x}", "--weights", "1,2"], "only gram_plusplus statistics depend"),
    ]:
        result = runner.invoke(app, [*base, *arguments])
        assert result.exit_code == 1, result.output
        assert len(result.output.strip().splitlines()) == 1 and message in result.output, result.output
