"""The merge methods, one module each, and the registry that names them."""

from __future__ import annotations

from m3sb.errors import ConfigError
from m3sb.methods import barycenter, breadcrumbs, dare, linear, model_stock, slerp, task_arithmetic, ties
from m3sb.methods.registry import MergeMethod, Param, apply_method

METHODS: dict[str, MergeMethod] = {
    method.name: method
    for method in (
        linear.METHOD,
        task_arithmetic.METHOD,
        ties.METHOD,
        dare.DARE_LINEAR,
        dare.DARE_TIES,
        breadcrumbs.METHOD,
        model_stock.METHOD,
        slerp.METHOD,
        barycenter.PAIRWISE_SLERP,
        barycenter.BARYCENTER,
        barycenter.KARCHER,
    )
}


def get_method(name: str) -> MergeMethod:
    """The method registered as ``name``; a ConfigError listing the known ones otherwise."""
    try:
        return METHODS[name]
    except KeyError:
        raise ConfigError(f"unknown merge_method '{name}'; choose one of: {', '.join(METHODS)}") from None


__all__ = ["METHODS", "MergeMethod", "Param", "apply_method", "get_method"]
