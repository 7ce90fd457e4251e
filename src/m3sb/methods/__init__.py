"""The merge methods, one module each, and the registry that names them."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from m3sb.errors import ConfigError, MergeError
from m3sb.methods import (
    arcee_fusion,
    barycenter,
    barycenter_seed,
    breadcrumbs,
    dare,
    della,
    fisher,
    iso,
    linear,
    model_stock,
    multislerp,
    nearswap,
    nuslerp,
    passthrough,
    ram,
    regmean,
    sce,
    slerp,
    task_arithmetic,
    ties,
    tsv,
    wudi,
)
from m3sb.methods.registry import (
    MergeMethod,
    Param,
    ParamValue,
    apply_method,
    canonical_params,
    check_weights,
)

HALF_DTYPES = (torch.float16, torch.bfloat16)

METHODS: dict[str, MergeMethod] = {
    method.name: method
    for method in (
        linear.METHOD,
        task_arithmetic.METHOD,
        ties.METHOD,
        dare.DARE_LINEAR,
        dare.DARE_TIES,
        breadcrumbs.METHOD,
        breadcrumbs.TIES,
        della.DELLA,
        della.DELLA_LINEAR,
        sce.METHOD,
        ram.RAM,
        ram.RAMPLUS_TL,
        model_stock.METHOD,
        slerp.METHOD,
        nuslerp.METHOD,
        nearswap.METHOD,
        arcee_fusion.METHOD,
        passthrough.METHOD,
        barycenter.PAIRWISE_SLERP,
        barycenter.BARYCENTER,
        barycenter.KARCHER,
        multislerp.METHOD,
        barycenter_seed.METHOD,
        tsv.METHOD,
        iso.ISO_C,
        iso.ISO_CTS,
        wudi.METHOD,
        regmean.METHOD,
        regmean.PLUSPLUS,
        fisher.METHOD,
    )
}


def get_method(name: str) -> MergeMethod:
    """The method registered as ``name``; a ConfigError listing the known ones otherwise."""
    try:
        return METHODS[name]
    except KeyError:
        raise ConfigError(f"unknown merge_method '{name}'; choose one of: {', '.join(METHODS)}") from None


def merge_group(
    method_name: str,
    tensors: Sequence[torch.Tensor],
    weights: Sequence[float] | None = None,
    base: torch.Tensor | None = None,
    tensor_name: str = "tensor",
    statistics: Sequence[torch.Tensor | None] = (),
    statistic_norms: Sequence[float] = (),
    **params: ParamValue | Sequence[ParamValue],
) -> torch.Tensor:
    """Merge one group of aligned tensors in memory, with the method's defaults and checks.

    The data-dependent methods (``regmean``, ``fisher``) take each model's ``statistics`` for
    this tensor (None where it has none) and, for ``fisher``, ``statistic_norms``.

    Per-model parameters take one value for all models or a sequence of N values;
    ``lambda`` may be written ``lambda_``, and a parameter under any of its aliases
    (``iterations`` for ``max_iter``). For methods where the base is an input
    (``karcher``, ``slerp``) a given ``base`` becomes the first input, with weight 1.
    Half-precision inputs are merged in float32 (and the result is float32); a result
    that is not finite is an error naming ``tensor_name``. The inputs are left unchanged.
    Example: ``merge_group("ties", [a, b], base=c, density=0.5)``.
    """
    method = get_method(method_name)
    tensors = [tensor.float() if tensor.dtype in HALF_DTYPES else tensor for tensor in tensors]
    if base is not None and base.dtype in HALF_DTYPES:
        base = base.float()
    weight_list = [1.0] * len(tensors) if weights is None else [float(w) for w in weights]
    if len(weight_list) != len(tensors):
        raise ConfigError(f"{method_name}: {len(weight_list)} weights for {len(tensors)} tensors")
    if method.base_is_input and base is not None:
        tensors, weight_list, base = [base, *tensors], [1.0, *weight_list], None
    count = len(tensors)
    method.check_input_count(count)
    if "lambda_" in params:
        params["lambda"] = params.pop("lambda_")
    params = canonical_params(method, params, method_name)
    resolved: dict[str, ParamValue | list[ParamValue]] = {}
    for param in method.all_params:
        if param.name == "weight":
            continue
        value = params.pop(param.name, param.default)
        if value is None:
            raise ConfigError(f"merge_method '{method_name}' needs parameter '{param.name}'")
        if param.per_model:
            values = (
                list(value) if isinstance(value, Sequence) and not isinstance(value, str) else [value] * count
            )
            if len(values) != count:
                raise ConfigError(
                    f"{method_name}: {len(values)} values of '{param.name}' for {count} tensors"
                )
            resolved[param.name] = [param.check(v, method_name) for v in values]
        else:
            assert not isinstance(value, Sequence) or isinstance(value, str)
            resolved[param.name] = param.check(value, method_name)
    if params:
        raise ConfigError(f"unknown parameter '{next(iter(params))}' for merge_method '{method_name}'")
    check_weights(method, weight_list, resolved.get("normalize"), f"for tensor '{tensor_name}'")
    if method.validate is not None:
        method.validate(resolved, f"tensor '{tensor_name}'")
    merged = apply_method(
        method, tensors, weight_list, base, resolved, tensor_name, False, statistics, statistic_norms
    )
    if not bool(torch.isfinite(merged).all()):
        raise MergeError(f"tensor '{tensor_name}': the merge produced NaN or Inf")
    return merged


def merge_backbones(
    method_name: str,
    reference: Mapping[str, torch.Tensor],
    models: Sequence[Mapping[str, torch.Tensor]],
    weights: Sequence[float] | None = None,
    base: Mapping[str, torch.Tensor] | None = None,
    statistics: Sequence[Mapping[str, torch.Tensor]] = (),
    statistic_norms: Sequence[float] = (),
    **params: ParamValue | Sequence[ParamValue],
) -> dict[str, torch.Tensor]:
    """Merge whole backbones in memory with :func:`merge_group`, tensor by tensor.

    ``reference`` names the tensors to merge and supplies the non-floating ones (copied
    as they are); ``models`` and ``base`` map at least those names to tensors; for the
    data-dependent methods, ``statistics`` holds each model's (by tensor name).
    """
    merged = {}
    for name, tensor in reference.items():
        if not tensor.is_floating_point():
            merged[name] = tensor
            continue
        group = [model[name] for model in models]
        base_tensor = base[name] if base is not None else None
        own = [model_statistics.get(name) for model_statistics in statistics]
        merged[name] = merge_group(
            method_name, group, weights, base_tensor, name, own, statistic_norms, **params
        )
    return merged


__all__ = [
    "METHODS",
    "MergeMethod",
    "Param",
    "apply_method",
    "canonical_params",
    "get_method",
    "merge_backbones",
    "merge_group",
]
