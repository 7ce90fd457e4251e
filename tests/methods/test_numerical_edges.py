"""Numerical edge cases of every merge method, checked against numbers worked out here.

What m3sb does at each edge, as read from src/m3sb (and asserted below):

* identical inputs: every averaging merge returns the input, to float32 rounding;
* antipodal inputs (x and -x): SLERP and the Karcher mean have no defined direction, so
  ``slerp``, ``pairwise_slerp``, ``barycenter`` and ``karcher`` raise a one-line
  MergeError that says "antipodal" (the engine prefixes the tensor's name); at t = 0 or
  t = 1, or with one weight zero, the direction is not needed and the endpoint is returned
  exactly. ``geometry._ANTIPODAL_GAP`` (1 + cos < 1e-12, about 1.41e-6 rad from pi)
  makes SLERP refuse pairs at pi - 1e-6 too, while the Karcher iteration, which only
  refuses an input antipodal to its current mean, still answers there. Model Stock takes
  the ratio 0 where it is undefined (the base), TIES elects + on a tie;
* zero tensors: a zero tensor has no direction, so SLERP with one interpolates linearly
  and the Karcher mean counts its norm but not its direction;
* merges computed in float32 whatever the input dtype (the engine's rule), with an error
  naming the tensor when the float16 output would overflow;
* weights summing to zero: a one-line MergeError or ConfigError, never a NaN.

Closed-form references are computed in float64; near pi the tolerances grow with the
conditioning of SLERP there: ``eps(dtype) / (pi - angle)`` for the final combination in
the inputs' dtype and ``eps(float64) / (pi - angle) ** 2`` for the angle that m3sb
derives from a float64 Gram matrix.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from m3sb.cli import app
from m3sb.errors import ConfigError, M3SBError, MergeError
from m3sb.methods import merge_group
from m3sb.toy import Family

runner = CliRunner()
EPS64 = torch.finfo(torch.float64).eps
TENSOR = "model.layers.0.mlp.up_proj.weight"

# (method, space): every spherical method in every space it supports.
SPHERICAL = [
    ("slerp", "weights"),
    ("pairwise_slerp", "weights"),
    ("pairwise_slerp", "task_vectors"),
    ("barycenter", "weights"),
    ("barycenter", "task_vectors"),
    ("karcher", "weights"),
]
SPHERICAL_IDS = [f"{method}-{space}" for method, space in SPHERICAL]
TWO_POINT_SLERP = {"slerp", "pairwise_slerp"}  # these call geometry.slerp_coefficients


# ----------------------------------------------------------------------------- helpers


def _eps(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps


def _pair(angle: float, size: int = 64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Float64 vectors of norms 2 and 3 that meet at ``angle`` (before any rounding)."""
    generator = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(size, 2, generator=generator, dtype=torch.float64))
    u, v = basis[:, 0], basis[:, 1]
    return 2.0 * u, 3.0 * (math.cos(angle) * u + math.sin(angle) * v)


def _reference_slerp(x0: torch.Tensor, x1: torch.Tensor, t: float) -> torch.Tensor:
    """Closed-form SLERP in float64 (Kahan's angle formula, stable at 0 and pi); norm linear."""
    a, b = x0.double().reshape(-1), x1.double().reshape(-1)
    norm0, norm1 = float(a.norm()), float(b.norm())
    if norm0 == 0.0 or norm1 == 0.0:
        return ((1 - t) * a + t * b).reshape(x0.shape)
    u0, u1 = a / norm0, b / norm1
    theta = 2.0 * math.atan2(float((u0 - u1).norm()), float((u0 + u1).norm()))
    if theta == 0.0:
        direction = (1 - t) * u0 + t * u1
    else:
        direction = (math.sin((1 - t) * theta) * u0 + math.sin(t * theta) * u1) / math.sin(theta)
    return (direction * ((1 - t) * norm0 + t * norm1)).reshape(x0.shape)


def _merge_two(
    method: str, space: str, x0: torch.Tensor, x1: torch.Tensor, t: float, base: torch.Tensor
) -> torch.Tensor:
    """The two-point merge that is SLERP(x0, x1, t) (of task vectors in task-vector space)."""
    params: dict[str, Any] = {"t": t} if method == "slerp" else {}
    weights = None if method == "slerp" else [1.0 - t, t]
    if space == "task_vectors":
        params["space"] = "task_vectors"
        merged: torch.Tensor = merge_group(method, [x0, x1], weights, base, tensor_name=TENSOR, **params)
    else:
        merged = merge_group(method, [x0, x1], weights, tensor_name=TENSOR, **params)
    return merged


def _inputs(
    method: str, space: str, tau0: torch.Tensor, tau1: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x0, x1, base) in ``dtype`` whose points (task vectors in task space) are tau0, tau1."""
    if space == "weights":
        return tau0.to(dtype), tau1.to(dtype), torch.zeros_like(tau0, dtype=dtype)
    base = (0.25 * torch.linspace(-1.0, 1.0, tau0.numel(), dtype=torch.float64)).to(dtype)
    return (base.double() + tau0).to(dtype), (base.double() + tau1).to(dtype), base


def _expected_two(
    space: str, x0: torch.Tensor, x1: torch.Tensor, t: float, base: torch.Tensor
) -> tuple[torch.Tensor, float]:
    """Float64 reference of _merge_two, and the norm of the base it was shifted by."""
    if space == "weights":
        return _reference_slerp(x0, x1, t), 0.0
    # the task vectors m3sb sees are the differences in the inputs' dtype
    return base.double() + _reference_slerp(x0 - base, x1 - base, t), float(base.double().norm())


def _assert_close(
    result: torch.Tensor, expected: torch.Tensor, tolerance: float, offset: float = 0.0
) -> None:
    """||result - expected|| <= tolerance * ||expected - offset part|| (+ offset rounding)."""
    assert torch.isfinite(result).all(), f"non-finite merge: {result}"
    error = float((result.double() - expected).norm())
    scale = float(expected.norm())
    allowed = tolerance * (scale + offset) + 4 * _eps(result.dtype) * offset
    assert error <= allowed, f"error {error:.3g} > allowed {allowed:.3g} (relative {error / scale:.3g})"


def _slerp_tolerance(dtype: torch.dtype, angle: float) -> float:
    """Relative error allowed for a merge of two points at ``angle``, computed in ``dtype``."""
    gap = math.pi - angle
    return 4.0 * (_eps(dtype) * (1.0 + 1.0 / gap) + EPS64 / gap**2)


# ------------------------------------------------------------- 1. identical input tensors

GENERATOR = torch.Generator().manual_seed(11)
X = torch.randn(24, 16, generator=GENERATOR)
BASE = 0.5 * torch.randn(24, 16, generator=GENERATOR)

# (method, params, takes a base) for merges that average their inputs, so equal inputs give
# the input back: task-vector methods with normalize (and lambda 1), no trimming.
AVERAGING: list[tuple[str, dict[str, Any], bool]] = [
    ("linear", {}, False),
    ("linear", {"space": "task_vectors"}, True),
    ("task_arithmetic", {"normalize": True}, True),
    ("ties", {}, True),
    ("dare_linear", {"normalize": True}, True),
    ("dare_ties", {"normalize": True}, True),
    ("breadcrumbs", {"density": 1.0, "gamma": 0.0, "normalize": True}, True),
    ("model_stock", {}, True),
    ("slerp", {"t": 0.3}, False),
    ("pairwise_slerp", {}, False),
    ("pairwise_slerp", {"space": "task_vectors"}, True),
    ("barycenter", {}, False),
    ("barycenter", {"space": "task_vectors"}, True),
    ("karcher", {}, False),
]
WEIGHT_SETS = [[0.2, 3.0, 0.7], [0.0, 1.0, 0.0], [1e-6, 1e-6, 1e-6], [2.0, -0.5, 1.0]]
NO_WEIGHTS = {"slerp", "model_stock"}
NONNEGATIVE = {"pairwise_slerp", "barycenter", "karcher"}
# TIES and DARE-TIES drop the entries of a negative weight (their sign disagrees): no average.
SIGN_ELECTING = {"ties", "dare_ties"}


def _identical_cases() -> list[Any]:
    cases = []
    for method, params, with_base in AVERAGING:
        label = f"{method}-{params.get('space', 'weights')}"
        if method in NO_WEIGHTS:
            cases.append(pytest.param(method, params, with_base, None, id=label))
            continue
        for weights in WEIGHT_SETS:
            if min(weights) < 0 and (method in NONNEGATIVE or method in SIGN_ELECTING):
                continue
            cases.append(pytest.param(method, params, with_base, weights, id=f"{label}-{weights}"))
    return cases


@pytest.mark.parametrize(("method", "params", "with_base", "weights"), _identical_cases())
def test_identical_inputs_give_that_tensor_back(
    method: str, params: dict[str, Any], with_base: bool, weights: list[float] | None
) -> None:
    count = 2 if method == "slerp" else 3
    tensors = [X.clone() for _ in range(count)]
    base = BASE if with_base else None
    merged = merge_group(method, tensors, weights, base, tensor_name=TENSOR, **params)
    assert merged.shape == X.shape and torch.isfinite(merged).all()
    scale = float(X.abs().max()) + (float(BASE.abs().max()) if with_base else 0.0)
    assert float((merged - X).abs().max()) <= 4 * _eps(torch.float32) * scale
    assert all(torch.equal(tensor, X) for tensor in tensors)  # inputs left unchanged


# ------------------------------------------------------------------ 2. antipodal tensors

# dyadic values: base + tau and base - tau are exact, so the task vectors are exactly +-tau
TAU = torch.arange(1.0, 13.0).reshape(3, 4) * 0.25 * torch.tensor([1.0, -1.0, 1.0, -1.0])
DYADIC_BASE = torch.arange(12.0).reshape(3, 4) - 5.0


def _antipodal(space: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if space == "weights":
        return TAU, -TAU, torch.zeros_like(TAU)
    return DYADIC_BASE + TAU, DYADIC_BASE - TAU, DYADIC_BASE


@pytest.mark.parametrize("t", [0.5, 0.3], ids=["equal-weights", "unequal-weights"])
@pytest.mark.parametrize(("method", "space"), SPHERICAL, ids=SPHERICAL_IDS)
def test_antipodal_inputs_are_a_one_line_merge_error(method: str, space: str, t: float) -> None:
    x0, x1, base = _antipodal(space)
    assert torch.equal(x0 - base, -(x1 - base))
    with pytest.raises(MergeError, match="antipodal") as caught:
        _merge_two(method, space, x0, x1, t, base)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("t", [0.0, 1.0])
@pytest.mark.parametrize(("method", "space"), SPHERICAL, ids=SPHERICAL_IDS)
def test_antipodal_inputs_at_an_endpoint_give_that_endpoint_exactly(
    method: str, space: str, t: float
) -> None:
    x0, x1, base = _antipodal(space)
    merged = _merge_two(method, space, x0, x1, t, base)
    assert torch.equal(merged, x0 if t == 0.0 else x1)


# The linear methods are defined at antipodal task vectors: their closed forms, with
# tau1 = TAU, tau2 = -TAU and weights (w, 1 - w).
LINEAR_ANTIPODAL = [
    ("linear", {}, lambda w: (2 * w - 1) * TAU),
    ("task_arithmetic", {}, lambda w: (2 * w - 1) * TAU),
    ("breadcrumbs", {"density": 1.0, "gamma": 0.0}, lambda w: (2 * w - 1) * TAU),
    ("dare_linear", {"density": 1.0}, lambda w: (2 * w - 1) * TAU),
    # TIES: the elected sign is that of (2w - 1) * TAU, + on a tie (w = 1/2): at w = 1/2
    # each element keeps the positive one of +-TAU, so the merge is |TAU|
    ("ties", {}, lambda w: TAU.abs() if w == 0.5 else TAU * (1 if w > 0.5 else -1)),
    ("dare_ties", {"density": 1.0, "normalize": True}, lambda w: TAU.abs() if w == 0.5 else TAU),
    # Model Stock: cosine -1 makes 1 + (N - 1) cos = 0, where its ratio is defined as 0
    ("model_stock", {}, lambda w: torch.zeros_like(TAU)),
]


@pytest.mark.parametrize("w", [0.5, 0.7], ids=["equal-weights", "unequal-weights"])
@pytest.mark.parametrize(
    ("method", "params", "expected"), LINEAR_ANTIPODAL, ids=[case[0] for case in LINEAR_ANTIPODAL]
)
def test_linear_methods_at_antipodal_inputs_follow_their_closed_form(
    method: str, params: dict[str, Any], expected: Any, w: float
) -> None:
    x0, x1, base = _antipodal("weights" if method == "linear" else "task_vectors")
    weights = None if method == "model_stock" else [w, 1.0 - w]
    merged = merge_group(method, [x0, x1], weights, base, tensor_name=TENSOR, **params)
    assert torch.isfinite(merged).all()
    torch.testing.assert_close(merged, base + expected(w), rtol=0, atol=1e-6)


NEAR_ANGLES = [
    pytest.param(0.0, id="identical"),
    pytest.param(1e-12, id="1e-12"),
    pytest.param(1e-8, id="1e-8"),
    pytest.param(1e-4 * (1 - 1e-9), id="below-taylor-switch"),
    pytest.param(1e-4 * (1 + 1e-9), id="above-taylor-switch"),
    pytest.param(1.0, id="1-rad"),
    pytest.param(math.pi / 2, id="right-angle"),
    pytest.param(math.pi - 1e-2, id="pi-1e-2"),
    pytest.param(math.pi - 1e-4, id="pi-1e-4"),
    pytest.param(math.pi - 1e-5, id="pi-1e-5"),
    pytest.param(math.pi - 3e-6, id="pi-3e-6"),
    pytest.param(math.pi - 1e-6, id="pi-1e-6"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("t", [0.5, 0.3], ids=["equal-weights", "unequal-weights"])
@pytest.mark.parametrize("angle", NEAR_ANGLES)
@pytest.mark.parametrize(("method", "space"), SPHERICAL, ids=SPHERICAL_IDS)
def test_near_identical_and_near_antipodal_pairs_follow_closed_form_slerp(
    method: str, space: str, angle: float, t: float, dtype: torch.dtype
) -> None:
    """Finite and continuous up to the documented antipodal gap, where SLERP refuses.

    Every angle is checked against the float64 closed form of the very inputs m3sb sees,
    so a jump between neighbouring angles (at the Taylor switch at 1e-4 rad, or near pi)
    shows up as an error against the reference.
    """
    x0, x1, base = _inputs(method, space, *_pair(angle), dtype)
    # SLERP refuses when 1 + cos < 1e-12 (pi - angle < ~1.41e-6); the Karcher mean does not
    if method in TWO_POINT_SLERP and math.pi - angle < 1.4e-6:
        with pytest.raises(MergeError, match="antipodal"):
            _merge_two(method, space, x0, x1, t, base)
        return
    merged = _merge_two(method, space, x0, x1, t, base)
    expected, offset = _expected_two(space, x0, x1, t, base)
    _assert_close(merged, expected, _slerp_tolerance(dtype, angle), offset)


# ------------------------------------------------------------------------ 3. zero tensors


@pytest.mark.parametrize(("method", "space"), SPHERICAL, ids=SPHERICAL_IDS)
def test_zero_tensors_have_no_direction(method: str, space: str) -> None:
    """Two zero points merge to zero; a zero point and x interpolate linearly."""
    x = _pair(1.0)[0].float()
    zero = torch.zeros_like(x)
    base = (0.25 * torch.linspace(-1.0, 1.0, x.numel())) if space == "task_vectors" else zero
    both_zero = _merge_two(method, space, base + zero, base + zero, 0.3, base)
    assert torch.equal(both_zero, base)
    first = _merge_two(method, space, base + x, base + zero, 0.3, base)
    second = _merge_two(method, space, base + zero, base + x, 0.3, base)
    torch.testing.assert_close(first, base + 0.7 * x, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(second, base + 0.3 * x, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("method", ["pairwise_slerp", "barycenter", "karcher"])
def test_a_zero_tensor_among_three_adds_its_norm_but_no_direction(method: str) -> None:
    x, y = _pair(1.2)
    x, y = x.float(), y.float()
    weights = [1.0, 2.0, 3.0]
    merged = merge_group(method, [x, torch.zeros_like(x), y], weights, tensor_name=TENSOR)
    norm = (1.0 * float(x.norm()) + 3.0 * float(y.norm())) / 6.0
    ux, uy = x.double() / x.double().norm(), y.double() / y.double().norm()
    # Karcher: directions x, y with weights 1 and 3; pairwise: acc = x, then x / 3, then the
    # SLERP at 3 / 6 of x / 3 and y
    t = 0.5 if method == "pairwise_slerp" else 0.75
    expected = _reference_slerp(ux, uy, t) * norm
    _assert_close(merged, expected, 1e-6)


# ------------------------------------------------------- 4. float16 beyond float16's range

F16_MAX = torch.finfo(torch.float16).max


def _f16(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float16)


# (id, method, inputs, weights, base, params): merges of float16 inputs whose value, or an
# intermediate of a float16 computation, is beyond float16's largest value (65504).
BIG_BASE = _f16(60000.0, 1.0, -2.0, 0.5)
BIG_A, BIG_B = _f16(62000.0, 2.0, -1.0, 0.25), _f16(61000.0, 0.0, -3.0, 1.0)
DIAGONAL = _f16(60000.0, 60000.0, 0.0, 0.0)
OTHER_DIAGONAL = _f16(60000.0, -60000.0, 0.0, 0.0)
FLOAT16_CASES = [
    ("task_arithmetic-lambda-2", "task_arithmetic", [BIG_A, BIG_B], [1.0, 1.0], BIG_BASE, {"lambda": 2.0}),
    ("dare_linear-lambda-2", "dare_linear", [BIG_A, BIG_B], [1.0, 1.0], BIG_BASE, {"lambda": 2.0}),
    ("breadcrumbs-lambda-2", "breadcrumbs", [BIG_A, BIG_B], [1.0, 1.0], BIG_BASE, {"lambda": 2.0}),
    ("ties-sum", "ties", [BIG_A, BIG_B], [1.0, 1.0], BIG_BASE, {"lambda": 2.0, "normalize": False}),
    ("dare_ties-sum", "dare_ties", [BIG_A, BIG_B], [1.0, 1.0], BIG_BASE, {"lambda": 2.0}),
    ("model_stock-lambda-4", "model_stock", [BIG_A, BIG_B], None, BIG_BASE, {"lambda": 4.0}),
    ("linear-sum", "linear", [BIG_A, BIG_B], [1.0, 1.0], None, {"normalize": False}),
    # 2 * 40000 overflows float16 on the way, the result 40000 does not
    (
        "linear-intermediate",
        "linear",
        [_f16(40000.0), _f16(40000.0)],
        [2.0, -1.0],
        None,
        {"normalize": False},
    ),
    # the midpoint of two large orthogonal vectors has an element of 84853
    ("slerp-midpoint", "slerp", [DIAGONAL, OTHER_DIAGONAL], None, None, {"t": 0.5}),
    ("pairwise_slerp-midpoint", "pairwise_slerp", [DIAGONAL, OTHER_DIAGONAL], [1.0, 1.0], None, {}),
    ("barycenter-midpoint", "barycenter", [DIAGONAL, OTHER_DIAGONAL], [1.0, 1.0], None, {}),
    ("karcher-midpoint", "karcher", [DIAGONAL, OTHER_DIAGONAL], [1.0, 1.0], None, {}),
    (
        "barycenter-task-midpoint",
        "barycenter",
        [DIAGONAL, OTHER_DIAGONAL],
        [1.0, 1.0],
        torch.zeros(4, dtype=torch.float16),
        {"space": "task_vectors"},
    ),
]


@pytest.mark.parametrize(
    ("method", "tensors", "weights", "base", "params"),
    [case[1:] for case in FLOAT16_CASES],
    ids=[case[0] for case in FLOAT16_CASES],
)
def test_float16_inputs_are_merged_in_float32_or_refused_by_name(
    method: str,
    tensors: list[torch.Tensor],
    weights: list[float] | None,
    base: torch.Tensor | None,
    params: dict[str, Any],
) -> None:
    """The float32 merge of the same values, finite; or a MergeError naming the tensor."""
    wide = [tensor.float() for tensor in tensors]
    expected = merge_group(method, wide, weights, None if base is None else base.float(), **params)
    assert torch.isfinite(expected).all()
    try:
        merged = merge_group(method, tensors, weights, base, tensor_name=TENSOR, **params)
    except MergeError as error:
        assert TENSOR in str(error) and "\n" not in str(error)
        return
    assert torch.isfinite(merged).all(), f"{method} returned {merged.tolist()} for float16 inputs"
    torch.testing.assert_close(merged.float(), expected, rtol=1e-3, atol=1e-3)


def _write_recipe(folder: Path, recipe: dict[str, Any]) -> Path:
    path = folder / "recipe.yml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def _merge_cli(folder: Path, recipe: dict[str, Any], name: str = "out") -> tuple[Any, Path]:
    out = folder / name
    result = runner.invoke(app, ["merge", str(_write_recipe(folder, recipe)), str(out), "--quiet"])
    return result, out


def _one_line_error(result: Any) -> str:
    assert result.exit_code == 1, result.output
    message = str(result.stderr).strip()
    assert message.startswith("error: ") and "\n" not in message and "Traceback" not in result.output
    return message


def _save(folder: Path, **tensors: torch.Tensor) -> dict[str, str]:
    paths = {}
    for name, tensor in tensors.items():
        save_file({"w": tensor}, folder / f"{name}.safetensors")
        paths[name] = str(folder / f"{name}.safetensors")
    return paths


def test_cli_float16_merge_of_a_family_is_the_float32_merge_rounded(family: Family, tmp_path: Path) -> None:
    recipe: dict[str, Any] = {
        "merge_method": "task_arithmetic",
        "base_model": str(family.base),
        "models": [{"model": str(path), "parameters": {"weight": 0.6}} for path in family.models],
        "parameters": {"lambda": 2.0},
    }
    wide, wide_out = _merge_cli(tmp_path, recipe, "wide")
    narrow, narrow_out = _merge_cli(tmp_path, {**recipe, "dtype": "float16"}, "narrow")
    assert wide.exit_code == 0 and narrow.exit_code == 0, wide.output + narrow.output
    wide_state, narrow_state = (
        load_file(wide_out / "model.safetensors"),
        load_file(narrow_out / "model.safetensors"),
    )
    assert wide_state.keys() == narrow_state.keys()
    for name, tensor in wide_state.items():
        assert narrow_state[name].dtype == torch.float16
        assert torch.equal(narrow_state[name], tensor.to(torch.float16)), name


def test_cli_float16_overflow_of_a_family_names_the_tensor(family: Family, tmp_path: Path) -> None:
    recipe = {
        "merge_method": "task_arithmetic",
        "base_model": str(family.base),
        "models": [{"model": str(path)} for path in family.models],
        "parameters": {"lambda": 1e9},
        "dtype": "float16",
    }
    result, out = _merge_cli(tmp_path, recipe)
    message = _one_line_error(result)
    assert re.fullmatch(
        r"error: tensor '[\w.]+': merged values overflow float16; choose a wider out_dtype", message
    )
    assert not out.exists()


CLI_FLOAT16_CASES = [
    # (id, method, model a, model b, weights, parameters, expected float16 output or None for an error)
    ("task_arithmetic-lambda-2", "task_arithmetic", BIG_A, BIG_B, [1.0, 1.0], {"lambda": 2.0}, None),
    ("linear-sum", "linear", _f16(60000.0, 1.0), _f16(20000.0, 1.0), [1.0, 1.0], {"normalize": False}, None),
    (
        "linear-intermediate",
        "linear",
        _f16(40000.0, 1.0),
        _f16(40000.0, -2.0),
        [2.0, -1.0],
        {"normalize": False},
        [40000.0, 4.0],
    ),
]


@pytest.mark.parametrize(
    ("method", "a", "b", "weights", "parameters", "expected"),
    [case[1:] for case in CLI_FLOAT16_CASES],
    ids=[case[0] for case in CLI_FLOAT16_CASES],
)
def test_cli_float16_merges_compute_in_float32_and_refuse_overflowing_output(
    method: str,
    a: torch.Tensor,
    b: torch.Tensor,
    weights: list[float],
    parameters: dict[str, Any],
    expected: list[float] | None,
    tmp_path: Path,
) -> None:
    paths = _save(tmp_path, a=a, b=b, base=BIG_BASE)
    recipe: dict[str, Any] = {
        "merge_method": method,
        "models": [
            {"model": paths[n], "parameters": {"weight": w}} for n, w in zip("ab", weights, strict=True)
        ],
        "parameters": parameters,
        "dtype": "float16",
    }
    if method != "linear":
        recipe["base_model"] = paths["base"]
    result, out = _merge_cli(tmp_path, recipe)
    if expected is None:
        message = _one_line_error(result)
        assert message == "error: tensor 'w': merged values overflow float16; choose a wider out_dtype"
        assert not out.exists()
        return
    assert result.exit_code == 0, result.output
    merged = load_file(out / "model.safetensors")["w"]
    assert merged.dtype == torch.float16 and merged.tolist() == expected


@pytest.mark.parametrize(("method", "space"), SPHERICAL, ids=SPHERICAL_IDS)
def test_cli_antipodal_inputs_give_one_line_naming_the_tensor(
    method: str, space: str, tmp_path: Path
) -> None:
    x0, x1, base = _antipodal(space)
    paths = _save(tmp_path, a=x0, b=x1, base=base)
    recipe: dict[str, Any] = {"merge_method": method, "parameters": {}}
    if method == "slerp":
        recipe |= {"base_model": paths["a"], "models": [{"model": paths["b"]}], "parameters": {"t": 0.5}}
    else:
        recipe["models"] = [{"model": paths["a"]}, {"model": paths["b"]}]
    if space == "task_vectors":
        recipe |= {"base_model": paths["base"], "parameters": {"space": "task_vectors"}}
    result, out = _merge_cli(tmp_path, recipe)
    message = _one_line_error(result)
    assert message.startswith("error: tensor 'w': ") and "antipodal" in message, message
    assert not out.exists()


# ------------------------------------------------------------- 5. weights that sum to zero

# (method, params, takes a base) for every method that takes weights
WEIGHTED: list[tuple[str, dict[str, Any], bool]] = [
    ("linear", {"normalize": True}, False),
    ("linear", {"normalize": False}, False),
    ("linear", {"space": "task_vectors", "normalize": True}, True),
    ("task_arithmetic", {"normalize": True}, True),
    ("task_arithmetic", {"normalize": False}, True),
    ("ties", {"normalize": True}, True),
    ("ties", {"normalize": False}, True),
    ("dare_linear", {"normalize": True}, True),
    ("dare_linear", {"normalize": False}, True),
    ("dare_ties", {"normalize": True}, True),
    ("dare_ties", {"normalize": False}, True),
    ("breadcrumbs", {"normalize": True}, True),
    ("breadcrumbs", {"normalize": False}, True),
    ("pairwise_slerp", {}, False),
    ("pairwise_slerp", {"space": "task_vectors"}, True),
    ("barycenter", {}, False),
    ("barycenter", {"space": "task_vectors"}, True),
    ("karcher", {}, False),
]


def _weighted_id(method: str, params: dict[str, Any]) -> str:
    return "-".join([method, *(f"{k}={v}" for k, v in params.items())])


def _zero_sum_cases() -> list[Any]:
    cases = []
    for method, params, with_base in WEIGHTED:
        for weights in ([0.0, 0.0], [1.0, -1.0]):
            # Without normalize nothing divides by the sum: [1, -1] is a plain difference of
            # models (task negation) and [0, 0] is the base (zero for linear), both defined
            # and checked below; spherical methods refuse them as negative or zero weights
            if params.get("normalize") is False:
                continue
            cases.append(
                pytest.param(
                    method, params, with_base, weights, id=f"{_weighted_id(method, params)}-{weights}"
                )
            )
    return cases


@pytest.mark.parametrize(("method", "params", "with_base", "weights"), _zero_sum_cases())
def test_weights_summing_to_zero_are_a_one_line_m3sb_error(
    method: str, params: dict[str, Any], with_base: bool, weights: list[float]
) -> None:
    tensors = [X, 2.0 * X + 1.0]
    base = BASE if with_base else None
    try:
        merged = merge_group(method, tensors, weights, base, tensor_name=TENSOR, **params)
    except (MergeError, ConfigError) as error:
        message = str(error)
        assert "\n" not in message
        assert re.search(r"sum to zero|non-negative", message), message
        return
    pytest.fail(
        f"{method} {params} with weights {weights} returned a tensor "
        f"(finite: {bool(torch.isfinite(merged).all())}, equal to the base: "
        f"{base is not None and torch.equal(merged, base)}) instead of an error"
    )


@pytest.mark.parametrize(
    ("method", "params"),
    [
        ("linear", {"normalize": False}),
        ("task_arithmetic", {}),
        ("dare_linear", {"density": 1.0}),
        ("breadcrumbs", {"density": 1.0, "gamma": 0.0}),
    ],
    ids=["linear", "task_arithmetic", "dare_linear", "breadcrumbs"],
)
def test_opposite_weights_without_normalize_are_the_difference_of_models(
    method: str, params: dict[str, Any]
) -> None:
    second = 2.0 * X + 1.0
    base = None if method == "linear" else BASE
    merged = merge_group(method, [X, second], [1.0, -1.0], base, tensor_name=TENSOR, **params)
    torch.testing.assert_close(merged, X - second if base is None else base + X - second)


@pytest.mark.parametrize(
    "method", ["linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "breadcrumbs"]
)
def test_all_zero_weights_without_normalize_give_the_base_or_zero(method: str) -> None:
    base = None if method == "linear" else BASE
    merged = merge_group(method, [X, 2.0 * X + 1.0], [0.0, 0.0], base, tensor_name=TENSOR, normalize=False)
    assert torch.equal(merged, torch.zeros_like(X) if base is None else BASE)


def test_karcher_with_a_base_and_zero_weights_returns_the_base() -> None:
    """The base is one more point of weight 1: the only point that takes part."""
    assert torch.equal(merge_group("karcher", [X, 2.0 * X], [0.0, 0.0], BASE), BASE)


def test_cli_zero_sum_weights_name_the_tensor(tmp_path: Path) -> None:
    paths = _save(tmp_path, a=torch.ones(3), b=2.0 * torch.ones(3), base=torch.zeros(3))
    recipe = {
        "merge_method": "ties",
        "base_model": paths["base"],
        "models": [{"model": paths[n], "parameters": {"weight": w}} for n, w in (("a", 1.0), ("b", -1.0))],
    }
    result, out = _merge_cli(tmp_path, recipe)
    assert _one_line_error(result) == "error: weights sum to zero for tensor 'w': [1.0, -1.0]"
    assert not out.exists()


# --------------------------------------------------- 6. bfloat16 and float64 against float32


def _sterbenz_inputs(dtype: torch.dtype) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Three models and a base in [1, 2), representable in ``dtype`` and in float32.

    Differences of numbers in [1, 2) are exact in every float format (Sterbenz), so every
    dtype sees the very same task vectors and the sparsifying masks cannot differ.
    """
    generator = torch.Generator().manual_seed(5)
    base = 1.25 + 0.5 * torch.rand(40, 30, generator=generator)
    models = [(base + 0.2 * (2 * torch.rand(40, 30, generator=generator) - 1)) for _ in range(3)]
    round_trip = torch.float32 if dtype == torch.float64 else dtype
    return [model.to(round_trip).to(dtype) for model in models], base.to(round_trip).to(dtype)


DTYPE_CASES: list[tuple[str, dict[str, Any]]] = [
    ("linear", {}),
    ("linear", {"space": "task_vectors", "lambda": 0.8}),
    ("task_arithmetic", {"lambda": 0.8}),
    ("ties", {"density": 0.5}),
    ("dare_linear", {"density": 0.5}),
    ("dare_ties", {"density": 0.5}),
    ("breadcrumbs", {"density": 0.8, "gamma": 0.05}),
    ("model_stock", {}),
    ("slerp", {"t": 0.3}),
    ("pairwise_slerp", {}),
    ("pairwise_slerp", {"space": "task_vectors"}),
    ("barycenter", {}),
    ("barycenter", {"space": "task_vectors"}),
    ("karcher", {}),
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64], ids=["bfloat16", "float64"])
@pytest.mark.parametrize(("method", "params"), DTYPE_CASES, ids=[_weighted_id(m, p) for m, p in DTYPE_CASES])
def test_bfloat16_and_float64_inputs_merge_like_float32(
    method: str, params: dict[str, Any], dtype: torch.dtype
) -> None:
    models, base = _sterbenz_inputs(dtype)
    if method == "slerp":
        models = models[:1]  # the base is the other input
    weights = None if method in NO_WEIGHTS else [1.0, 2.0, 3.0][: len(models)]
    merged = merge_group(method, models, weights, base, tensor_name=TENSOR, **params)
    expected = merge_group(
        method, [m.float() for m in models], weights, base.float(), tensor_name=TENSOR, **params
    )
    assert merged.is_floating_point() and torch.isfinite(merged).all()
    # float64 must agree to float32 rounding, bfloat16 to a few of its own roundings
    eps = _eps(torch.bfloat16 if dtype == torch.bfloat16 else torch.float32)
    error = float((merged.double() - expected.double()).abs().max())
    assert error <= 4 * eps * float(expected.abs().max()), error


def test_merging_never_raises_a_non_m3sb_exception_at_these_edges() -> None:
    """A cheap sweep over the degenerate inputs above: only M3SBError subclasses escape."""
    zero = torch.zeros(4)
    one = torch.ones(4)
    for method, params, with_base in WEIGHTED:
        for tensors in ([zero, zero], [one, -one], [one, one]):
            for weights in ([0.0, 0.0], [1.0, 0.0], [0.5, 0.5]):
                try:
                    merged = merge_group(method, tensors, weights, zero if with_base else None, **params)
                except M3SBError:
                    continue
                assert torch.isfinite(merged).all(), (method, params, tensors, weights)
