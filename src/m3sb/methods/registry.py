"""What a merge method is: a pure function over one aligned tensor group, plus its declaration.

A method function has the signature ``(tensors, weights, base, **params) -> tensor``:
``tensors`` are the N models' versions of one tensor (same shape, float32 or float64),
``weights`` their N per-model weights, ``base`` the base model's version or None, and
``params`` the method's declared parameters resolved for this tensor (per-model ones as
lists of N values). It opens no file, loops over no state dict and prints nothing.

The declaration (:class:`MergeMethod`) is the one place a method's parameters are
described: the config validation, the defaults and the README's table all read it.
"""

from __future__ import annotations

import hashlib
import keyword
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from m3sb.errors import ConfigError, MergeError

MethodFunction = Callable[..., torch.Tensor]
ParamValue = float | int | bool | str


@dataclass(frozen=True)
class Param:
    """One parameter of a merge method, as a user writes it in the YAML."""

    name: str
    kind: type
    default: ParamValue | None
    help: str
    per_model: bool = False
    minimum: float | None = None
    maximum: float | None = None
    choices: tuple[str, ...] | None = None

    @property
    def argument(self) -> str:
        """The keyword the method function receives (``lambda`` becomes ``lambda_``)."""
        return self.name + "_" if keyword.iskeyword(self.name) else self.name

    def check(self, value: Any, where: str) -> ParamValue:
        """Return ``value`` converted to this parameter's kind, or raise ConfigError."""
        label = f"{where}: parameter '{self.name}'"
        if self.kind is bool:
            if not isinstance(value, bool):
                raise ConfigError(f"{label} must be true or false, got {value!r}")
            return value
        if self.kind in (int, float):
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ConfigError(f"{label} must be a number, got {value!r}")
            if self.kind is int and float(value) != int(value):
                raise ConfigError(f"{label} must be an integer, got {value!r}")
            number = self.kind(value)
            if number != number or number in (float("inf"), float("-inf")):
                raise ConfigError(f"{label} must be finite, got {value!r}")
            if self.minimum is not None and number < self.minimum:
                raise ConfigError(f"{label} must be >= {self.minimum}, got {value!r}")
            if self.maximum is not None and number > self.maximum:
                raise ConfigError(f"{label} must be <= {self.maximum}, got {value!r}")
            return number
        if not isinstance(value, str) or (self.choices and value not in self.choices):
            allowed = ", ".join(self.choices or ())
            raise ConfigError(f"{label} must be one of {allowed}, got {value!r}")
        return value


@dataclass(frozen=True)
class MergeMethod:
    """A registered merge method: its function and everything the engine must know about it."""

    name: str
    function: MethodFunction
    summary: str
    params: tuple[Param, ...] = ()
    base: Literal["required", "optional", "unused"] = "unused"
    base_is_input: bool = False
    min_models: int = 1
    max_models: int | None = None
    nonnegative_weights: bool = False
    uses_weights: bool = True
    task_space: bool = False
    reference: str = ""
    all_params: tuple[Param, ...] = field(init=False)

    def __post_init__(self) -> None:
        extra: list[Param] = [WEIGHT] if self.uses_weights else []
        if self.task_space:
            extra += [SPACE, LAMBDA]
        object.__setattr__(self, "all_params", tuple(extra) + self.params)

    def param(self, name: str) -> Param | None:
        """The declared parameter called ``name``, if any."""
        return next((p for p in self.all_params if p.name == name), None)


WEIGHT = Param("weight", float, 1.0, "relative weight of this model", per_model=True)
SPACE = Param(
    "space",
    str,
    "weights",
    "merge full weights, or task vectors (model - base) added back to the base",
    choices=("weights", "task_vectors"),
)
LAMBDA = Param("lambda", float, 1.0, "scale of the merged task vector added to the base")


def tensor_seed(random_seed: int, tensor_name: str) -> int:
    """A seed for one tensor, stable across runs, devices and the order tensors are merged in."""
    digest = hashlib.blake2b(f"{random_seed}:{tensor_name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def apply_method(
    method: MergeMethod,
    tensors: Sequence[torch.Tensor],
    weights: Sequence[float],
    base: torch.Tensor | None,
    params: dict[str, ParamValue],
    tensor_name: str,
) -> torch.Tensor:
    """Merge one tensor group with ``method``, handling task-vector space and per-tensor seeds."""
    kwargs = {p.argument: params[p.name] for p in method.params}
    if "random_seed" in kwargs:
        kwargs["random_seed"] = tensor_seed(int(kwargs["random_seed"]), tensor_name)
    if method.task_space and params.get("space") == "task_vectors":
        if base is None:
            raise MergeError(f"method '{method.name}' with space: task_vectors needs a base_model")
        task_vectors = [tensor - base for tensor in tensors]
        merged = method.function(task_vectors, list(weights), None, **kwargs)
        return merged.mul_(float(params["lambda"])).add_(base)
    return method.function(list(tensors), list(weights), base, **kwargs)
