"""TSV-M, ISO-C, ISO-CTS and WUDI against FusionBench 0.2.33's own functions, on the same task
vectors in float64: per tensor through ``merge_group``, and whole models through ``m3sb merge``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from m3sb.checkpoints import open_checkpoint
from m3sb.config import parse_merge_config
from m3sb.merge import merge_to_folder
from m3sb.methods import merge_group
from m3sb.methods.wudi import interference_loss
from m3sb.toy import Family

iso_utils = pytest.importorskip(
    "fusion_bench.method.isotropic_merging.iso_utils", reason="fusion-bench is a dev dependency"
)
tsvm_utils = pytest.importorskip("fusion_bench.method.task_singular_vector.utils.TSVM_utils")
wudi_module = pytest.importorskip("fusion_bench.method.wudi.wudi")

TOLERANCE = 1e-5  # relative, float64
# shapes where FusionBench's kept count int(rank * (1 / T)) equals rank // T for T = 3 and 4
SHAPES = [(24, 40), (40, 24), (16, 16), (36, 12), (40,), (4, 3, 2)]


def _task_vectors(count: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [
        {
            f"t{k}": 0.01 * torch.randn(shape, generator=generator, dtype=torch.float64)
            for k, shape in enumerate(SHAPES)
        }
        for _ in range(count)
    ]


def _relative(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return float((ours - theirs).norm() / theirs.norm())


def _ours(
    method: str,
    vectors: list[dict[str, torch.Tensor]],
    key: str,
    weights: list[float] | None = None,
    **params: Any,
) -> torch.Tensor:
    base = torch.zeros_like(vectors[0][key])
    return merge_group(method, [v[key] for v in vectors], weights, base=base, tensor_name=key, **params)


def _scaled(vectors: list[dict[str, torch.Tensor]], alphas: list[float]) -> list[dict[str, torch.Tensor]]:
    return [{k: alpha * t for k, t in v.items()} for v, alpha in zip(vectors, alphas, strict=True)]


@pytest.mark.parametrize("count", [3, 4])
def test_tsv_m_matches_fusionbench(count: int) -> None:
    vectors = _task_vectors(count)
    theirs = tsvm_utils.compute_and_sum_svd_mem_reduction(vectors, accelerator="cpu")
    for key in vectors[0]:
        assert _relative(_ours("tsv_m", vectors, key), theirs[key]) <= TOLERANCE, key
    # FusionBench's alpha as a list scales each task vector first, as a number scales the result
    alphas = [0.5, 1.5, 1.0, 2.0][:count]
    weighted = tsvm_utils.compute_and_sum_svd_mem_reduction(_scaled(vectors, alphas), accelerator="cpu")
    for key in vectors[0]:
        ours = _ours("tsv_m", vectors, key, weights=alphas, **{"lambda": 0.7})
        assert _relative(ours, 0.7 * weighted[key]) <= TOLERANCE, key


def test_tsv_m_keeps_orthonormal_blocks_and_each_tasks_top_values() -> None:
    vectors = _task_vectors(4)
    merged = _ours("tsv_m", vectors, "t0")
    values = torch.linalg.svdvals(merged)
    kept = torch.cat([torch.linalg.svdvals(v["t0"])[: 24 // 4] for v in vectors])
    # U and V are orthonormal, so the singular values are exactly the kept ones
    torch.testing.assert_close(values.sort().values, kept.sort().values)


@pytest.mark.parametrize("count", [3, 4])
def test_iso_c_matches_fusionbench(count: int) -> None:
    vectors = _task_vectors(count, seed=1)
    theirs = iso_utils.iso_c(vectors, accelerator="cpu")
    for key in vectors[0]:
        assert _relative(_ours("iso_c", vectors, key), theirs[key]) <= TOLERANCE, key
    values = torch.linalg.svdvals(_ours("iso_c", vectors, "t0"))
    torch.testing.assert_close(values, values.mean().expand_as(values))  # a flat spectrum


@pytest.mark.parametrize(("count", "fraction"), [(3, 0.8), (4, 0.8), (4, 0.5), (3, 0.0)])
def test_iso_cts_matches_fusionbench(count: int, fraction: float) -> None:
    vectors = _task_vectors(count, seed=2)
    theirs = iso_utils.iso_cts(vectors, common_space_fraction=fraction, accelerator="cpu")
    for key in vectors[0]:
        ours = _ours("iso_cts", vectors, key, common_space_fraction=fraction)
        assert _relative(ours, theirs[key]) <= TOLERANCE, key


def test_wudi_adam_matches_fusionbench_and_exact_reaches_a_lower_loss() -> None:
    vectors = _task_vectors(4, seed=3)
    iterations = 300  # FusionBench's setting (learning rate 1e-5 is fixed there)
    theirs = wudi_module.wudi_merging(vectors, accelerator="cpu", iter_num=iterations)
    for key in vectors[0]:
        ours = _ours("wudi", vectors, key, solver="adam", iterations=iterations, step_size=1e-5)
        assert _relative(ours, theirs[key].detach()) <= TOLERANCE, key
    for key in ("t0", "t1", "t2", "t3"):
        tensors = [v[key] for v in vectors]
        exact = _ours("wudi", vectors, key)
        reference = float(interference_loss(theirs[key].detach(), tensors))
        assert float(interference_loss(exact, tensors)) < 0.8 * reference, key
        # the exact solution is a stationary point: the loss's gradient vanishes there
        point = exact.clone().requires_grad_(True)
        interference_loss(point, tensors).backward()  # type: ignore[no-untyped-call]
        assert point.grad is not None
        start = torch.stack(tensors).sum(dim=0).requires_grad_(True)
        interference_loss(start, tensors).backward()  # type: ignore[no-untyped-call]
        assert start.grad is not None
        assert float(point.grad.norm()) <= 1e-9 * float(start.grad.norm())


def test_wudi_leaves_zero_task_vectors_out_of_the_loss() -> None:
    vectors = _task_vectors(3, seed=4)
    with_zero = [*vectors, {k: torch.zeros_like(t) for k, t in vectors[0].items()}]
    for solver in ("exact", "adam"):
        ours = _ours("wudi", with_zero, "t0", solver=solver, iterations=20)
        assert torch.isfinite(ours).all()
        torch.testing.assert_close(ours, _ours("wudi", vectors, "t0", solver=solver, iterations=20))
    assert not bool(_ours("wudi", [with_zero[-1]] * 2, "t0").any())


@pytest.mark.slow
@pytest.mark.parametrize(
    ("method", "params", "reference"),
    [
        ("tsv_m", {}, lambda tvs: tsvm_utils.compute_and_sum_svd_mem_reduction(tvs, accelerator="cpu")),
        ("iso_c", {"lambda": 1.3}, lambda tvs: iso_utils.iso_c(tvs, accelerator="cpu")),
        (
            "iso_cts",
            {"lambda": 1.5, "common_space_fraction": 0.8},
            lambda tvs: iso_utils.iso_cts(tvs, common_space_fraction=0.8, accelerator="cpu"),
        ),
        ("wudi", {"solver": "adam", "iterations": 30}, lambda tvs: wudi_module.wudi_merging(tvs, "cpu", 30)),
    ],
)
def test_whole_model_merge_matches_fusionbench(
    method: str, params: dict[str, float], reference: Any, family: Family, tmp_path: Path
) -> None:
    recipe = {
        "merge_method": method,
        "base_model": str(family.base),
        "models": [{"model": str(path)} for path in family.models],
        "parameters": params,
        "dtype": "float64",
    }
    ours = open_checkpoint(merge_to_folder(parse_merge_config(recipe), tmp_path / "out").out_dir)
    base = open_checkpoint(family.base)
    models = [open_checkpoint(path) for path in family.models]
    task_vectors = [
        {name: m.load(name).double() - base.load(name).double() for name in base.tensors} for m in models
    ]
    merged = reference(task_vectors)
    scale = params.get("lambda", 1.0)
    for name in base.tensors:
        expected = base.load(name).double() + scale * merged[name].detach()
        assert _relative(ours.load(name).double(), expected) <= TOLERANCE, name
