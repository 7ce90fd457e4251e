"""What a merge method is: a pure function over one aligned tensor group, plus its declaration.

A method function has the signature ``(tensors, weights, **params) -> tensor``:
``tensors`` are the N models' versions of one tensor (same shape, float32 or float64),
or their task vectors (model - base) for a method that merges task vectors; ``weights``
are the N per-model weights and ``params`` the method's declared parameters resolved for
this tensor (per-model ones as lists of N values). It returns a new tensor, leaves its
inputs unchanged, opens no file, loops over no state dict and prints nothing.

The declaration (:class:`MergeMethod`) is the one place a method's parameters are
described: the config validation, the defaults and the README's table all read it.
"""

from __future__ import annotations

import hashlib
import keyword
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

import torch

from m3sb.errors import ConfigError, MergeError

MethodFunction = Callable[..., torch.Tensor]
# Weight sums smaller than this in magnitude are treated as zero (mergekit's threshold).
MIN_WEIGHT_SUM = 1e-8
MAX_NUMBER = 1e30  # parameters and weights beyond this overflow float32 arithmetic


def _short(value: object) -> str:
    """``repr(value)``, cut to 40 characters (a 400-digit number is not worth printing)."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


ParamValue = float | int | bool | str


@dataclass(frozen=True)
class Param:
    """One parameter of a merge method, as a user writes it in the YAML.

    ``aliases`` are other names a user may write it under (the M3SB seed's ``iterations``
    for ``max_iter``, say); :func:`canonical_params` turns them into ``name``.
    """

    name: str
    kind: type
    default: ParamValue | None
    help: str
    per_model: bool = False
    minimum: float | None = None
    maximum: float | None = None
    choices: tuple[str, ...] | None = None
    aliases: tuple[str, ...] = ()
    inert: bool = False  # accepted (mergekit recipes write it) and checked, but not passed on

    @property
    def argument(self) -> str:
        """The keyword the method function receives (``lambda`` becomes ``lambda_``)."""
        return self.name + "_" if keyword.iskeyword(self.name) else self.name

    @property
    def label(self) -> str:
        """The name with its aliases, as the docs and error messages show it."""
        if not self.aliases:
            return self.name
        return f"{self.name} (alias{'es' if len(self.aliases) > 1 else ''}: {', '.join(self.aliases)})"

    def check(self, value: Any, where: str) -> ParamValue:
        """Return ``value`` converted to this parameter's kind, or raise ConfigError."""
        label = f"{where}: parameter '{self.name}'"
        if self.kind is bool:
            if not isinstance(value, bool):
                raise ConfigError(f"{label} must be true or false, got {value!r}")
            return value
        if self.kind in (int, float):
            if isinstance(value, str):  # YAML reads 1e-8 (no dot) as a string
                try:
                    value = float(value)
                except ValueError:
                    raise ConfigError(f"{label} must be a number, got {value!r}") from None
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ConfigError(f"{label} must be a number, got {value!r}")
            try:
                as_float = float(value)
            except OverflowError:
                as_float = float("inf")
            if not math.isfinite(as_float) or abs(as_float) > MAX_NUMBER:
                raise ConfigError(
                    f"{label} must be a finite number of magnitude <= {MAX_NUMBER:g}, got {_short(value)}"
                )
            if self.kind is int and as_float != int(value):
                raise ConfigError(f"{label} must be an integer, got {value!r}")
            number = self.kind(value)
            if self.minimum is not None and number < self.minimum:
                raise ConfigError(f"{label} must be >= {self.minimum}, got {value!r}")
            if self.maximum is not None and number > self.maximum:
                raise ConfigError(f"{label} must be <= {self.maximum}, got {value!r}")
            return number
        if not isinstance(value, str) or (self.choices and value not in self.choices):
            allowed = ", ".join(self.choices or ())
            raise ConfigError(f"{label} must be one of {allowed}, got {value!r}")
        return value


Space = Literal["weights", "task_vectors", "either", "if_base"]
RowBlocks = Literal["never", "elementwise", "magnitude_threshold", "random_mask", "gram"]


@dataclass(frozen=True)
class MergeMethod:
    """A registered merge method: its function and everything the engine must know about it.

    ``space`` says what the function merges: the models' weights, their task vectors
    (model - base; the engine adds ``lambda`` times the result to the base), either, as
    the user's ``space`` parameter chooses, or (``if_base``) task vectors exactly when a
    ``base_model`` is given, as mergekit's nuslerp and multislerp do. With
    ``base_is_input``, a ``base_model`` is one more input rather than the origin of task
    vectors. A method with ``statistics`` also receives each model's statistics for the
    tensor (``statistics``, None where a model has none) and, for ``fisher``, the norm of
    each model's whole statistics (``statistic_norms``). ``validate`` checks one tensor's
    resolved parameters together (a ConfigError naming ``where``), before any tensor is read.
    ``row_blocks`` says whether the engine may merge a tensor larger than its memory budget
    in blocks of rows, and what the function needs of the whole tensor then:
    ``elementwise`` (each output entry a function of the same entry of the inputs: nothing),
    ``magnitude_threshold`` (TIES: ``thresholds``, each whole task vector's trimming
    magnitude at its ``density``, found in passes over the blocks), ``random_mask`` (DARE:
    ``generators``, each model's random generator where its mask starts, drawn on block by
    block), ``gram`` (the barycenter: ``gram``, the Gram matrix of the whole inputs, summed
    over the blocks exactly as over the whole) or ``never``.
    """

    name: str
    function: MethodFunction
    summary: str
    params: tuple[Param, ...] = ()
    space: Space = "weights"
    base_is_input: bool = False
    min_models: int = 1
    max_models: int | None = None
    nonnegative_weights: bool = False
    uses_weights: bool = True
    reference: str = ""
    scales: bool = True  # lambda scales the merged task vector (False: accepted, no effect, as mergekit's)
    validate: Callable[[Mapping[str, Any], str], None] | None = None
    statistics: Literal["gram", "gram_plusplus", "fisher"] | None = None  # per-model statistics taken
    row_blocks: RowBlocks = "never"  # how the engine may merge a large tensor in blocks of rows
    all_params: tuple[Param, ...] = field(init=False)
    aliases: dict[str, str] = field(init=False, compare=False)  # alias -> name, from the params

    def __post_init__(self) -> None:
        extra: list[Param] = [WEIGHT] if self.uses_weights else []
        if self.space == "either":
            extra.append(SPACE)
        if self.space != "weights":
            extra.append(LAMBDA if self.scales else INERT_LAMBDA)
        object.__setattr__(self, "all_params", tuple(extra) + self.params)
        names = {p.name for p in self.all_params}
        aliases = {alias: p.name for p in self.all_params for alias in p.aliases}
        clash = sorted(names & aliases.keys())
        assert not clash, f"{self.name}: aliases {clash} are also parameter names"
        object.__setattr__(self, "aliases", aliases)

    def param(self, name: str) -> Param | None:
        """The declared parameter called ``name`` (not an alias: see :func:`canonical_params`)."""
        return next((p for p in self.all_params if p.name == name), None)

    def check_input_count(self, count: int) -> None:
        """Raise ConfigError unless the method takes ``count`` inputs."""
        if count >= self.min_models and (self.max_models is None or count <= self.max_models):
            return
        wanted = (
            f"exactly {self.min_models}"
            if self.min_models == self.max_models
            else f"at least {self.min_models}"
        )
        raise ConfigError(
            f"merge_method '{self.name}' takes {wanted} models (base_model included where it is an input), "
            f"got {count}"
        )

    def merges_task_vectors(self, space: object, has_base: bool = False) -> bool:
        """Whether the function receives task vectors, given the user's ``space`` parameter
        and whether a base model is given."""
        if self.space == "if_base":
            return has_base
        return self.space == "task_vectors" or (self.space == "either" and space == "task_vectors")


WEIGHT = Param("weight", float, 1.0, "relative weight of this model", per_model=True)
SPACE = Param(
    "space",
    str,
    "weights",
    "merge full weights, or task vectors (model - base) added back to the base",
    choices=("weights", "task_vectors"),
)
LAMBDA = Param("lambda", float, 1.0, "scale of the merged task vector added to the base")
IGNORED_WEIGHT = Param(
    "weight",
    float,
    1.0,
    "accepted for mergekit recipes, which may give it; this method has no per-model weights",
    per_model=True,
    inert=True,
)
INERT_LAMBDA = Param(
    "lambda", float, 1.0, "accepted for mergekit recipes; this method's result is not scaled", inert=True
)
INT8_MASK = Param(
    "int8_mask",
    bool,
    False,
    "accepted for mergekit recipes (a memory option there); m3sb's masks are boolean already",
    inert=True,
)


def tensor_seed(random_seed: int, tensor_name: str) -> int:
    """A seed for one tensor, stable across runs, devices and the order tensors are merged in."""
    digest = hashlib.blake2b(f"{random_seed}:{tensor_name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


V = TypeVar("V")


def canonical_params(method: MergeMethod, params: Mapping[str, V], where: str) -> dict[str, V]:
    """``params`` with every alias written as the parameter it names (``iterations`` becomes
    ``max_iter``), in the same order. The one place aliases are resolved: the merge engine,
    :func:`check_param_values` and ``merge_group`` all call it first. A parameter given
    twice (by its name and an alias, or two aliases) is a one-line ConfigError."""
    resolved: dict[str, V] = {}
    written: dict[str, str] = {}
    for key, value in params.items():
        name = method.aliases.get(key, key)
        if name in written:
            raise ConfigError(
                f"{where}: '{written[name]}' and '{key}' are the same parameter '{name}' of "
                f"'{method.name}'; give one of them"
            )
        written[name] = key
        resolved[name] = value
    return resolved


def check_param_values(
    method: MergeMethod, params: Mapping[str, Any], where: str, count: int | None = None
) -> None:
    """Every parameter in ``params`` is the method's (by name or alias), with a valid value
    (one value, or, for per-model parameters, a list of one per model when ``count`` models
    are known); a one-line ConfigError naming ``where`` otherwise."""
    for key, value in canonical_params(method, params, where).items():
        param = method.param(key)
        if param is None or key == "weight":
            allowed = ", ".join(p.label for p in method.all_params if p.name != "weight")
            raise ConfigError(
                f"{where}: unknown parameter '{key}' for '{method.name}'; allowed: {allowed or 'none'}"
            )
        values = value if param.per_model and isinstance(value, list) else [value]
        if param.per_model and isinstance(value, list) and count is not None and len(value) != count:
            raise ConfigError(
                f"{where}: {len(value)} values of '{key}' for {count} models; give one per model"
            )
        for single in values:
            param.check(single, where)


def check_weights(method: MergeMethod, weights: Sequence[float], normalize: object, what: str) -> None:
    """Weights the method can use: finite, non-negative where it needs that, and not summing
    to zero where it divides by their sum (spherical methods, ``normalize: true``).
    ``what`` ends the messages: ``for tensor 'x'``, say."""
    for weight in weights:
        if not math.isfinite(weight) or abs(weight) > MAX_NUMBER:
            raise ConfigError(
                f"weights must be finite numbers of magnitude <= {MAX_NUMBER:g}, got {_short(weight)} {what}"
            )
    if method.nonnegative_weights and any(w < 0 for w in weights):
        raise ConfigError(
            f"merge_method '{method.name}' needs non-negative weights, got {list(weights)} {what}"
        )
    if (method.nonnegative_weights or normalize is True) and abs(sum(weights)) < MIN_WEIGHT_SUM:
        raise ConfigError(f"weights sum to zero {what}: {list(weights)}")


def task_vector(tensor: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """``tensor - base`` in the base's dtype (a narrower ``tensor``, such as bfloat16 against a
    float32 base, is widened first: exact, and several times faster on the CPU than letting the
    subtraction promote it element by element)."""
    if tensor.dtype == base.dtype:
        return torch.sub(tensor, base)
    return tensor.to(base.dtype).sub_(base)


def apply_method(
    method: MergeMethod,
    tensors: Sequence[torch.Tensor],
    weights: Sequence[float],
    base: torch.Tensor | None,
    params: Mapping[str, ParamValue | list[ParamValue]],
    tensor_name: str,
    consume_inputs: bool = False,
    statistics: Sequence[torch.Tensor | None] = (),
    statistic_norms: Sequence[float] = (),
    block_arguments: Mapping[str, Any] | None = None,
    formed: bool = False,
) -> torch.Tensor:
    """Merge one tensor group with ``method``: task vectors, ``lambda`` and per-tensor seeds
    (``block_arguments``: what the function needs of the whole tensor when these are blocks).

    With ``consume_inputs`` (a list the engine filled for this call alone) each input is
    dropped from the list as soon as its task vector exists, so that at most one extra
    tensor is alive while task vectors are formed. With ``formed``, where the method merges
    task vectors, ``tensors`` are already the task vectors against ``base``.
    """
    kwargs: dict[str, Any] = {p.argument: params[p.name] for p in method.params if not p.inert}
    kwargs.update(block_arguments or {})
    if method.statistics is not None:
        if len(statistics) != len(tensors):
            raise MergeError(f"method '{method.name}' needs {method.statistics} statistics for every model")
        kwargs["statistics"] = list(statistics)
        if method.statistics == "fisher":
            kwargs["statistic_norms"] = list(statistic_norms) or [1.0] * len(tensors)
    if "random_seed" in kwargs:
        seed = kwargs["random_seed"]
        assert isinstance(seed, int)
        kwargs["random_seed"] = tensor_seed(seed, tensor_name)
    if not method.merges_task_vectors(params.get("space"), base is not None):
        return method.function(list(tensors), list(weights), **kwargs)
    if base is None:
        raise MergeError(f"method '{method.name}' merges task vectors and needs a base_model")
    if formed:
        task_vectors = list(tensors)
        if consume_inputs and isinstance(tensors, list):
            tensors.clear()
    elif consume_inputs and isinstance(tensors, list):
        task_vectors = []
        while tensors:
            task_vectors.append(task_vector(tensors.pop(0), base))
    else:
        task_vectors = [task_vector(tensor, base) for tensor in tensors]
    merged = method.function(task_vectors, list(weights), **kwargs)
    scale = params["lambda"] if method.scales else 1.0
    assert isinstance(scale, float)
    return merged.mul_(scale).add_(base) if scale != 1.0 else merged.add_(base)
