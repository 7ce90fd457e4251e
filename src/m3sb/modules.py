"""mergekit's ``modules``: the towers of a multi-tower model, each merged by its own recipe.

A vision-language model (Gemma 3, Mistral 3, Llama 4, Qwen2-VL...) or an encoder-decoder
(T5, Whisper) is several models in one checkpoint. A ``modules`` recipe gives each of them
its own ``models`` or ``slices`` and ``parameters``, under mergekit's module names. Here a
module is the set of tensors whose names start with one of its prefixes (the longest prefix
wins, so ``visual.merger.`` is the projector and ``visual.`` the vision tower), with the
config.json key that holds its layer count; each architecture lists the prefixes of both the
layout transformers writes and the older one.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class ModuleLayout:
    """One module of an architecture: the name prefixes of its tensors, and the config.json
    keys (dotted, most likely first) that may hold its layer count (none: it has no layers)."""

    prefixes: tuple[str, ...]
    layer_keys: tuple[str, ...] = ()


_TEXT = ModuleLayout(
    ("language_model.", "model.language_model.", "lm_head."), ("text_config.num_hidden_layers",)
)
_PROJECTOR = ModuleLayout(("multi_modal_projector.", "model.multi_modal_projector."))
_QWEN_VL = {
    "text_decoder": ModuleLayout(
        ("model.", "lm_head.", "model.language_model."),
        ("text_config.num_hidden_layers", "num_hidden_layers"),
    ),
    "multi_modal_projector": ModuleLayout(
        ("visual.merger.", "model.visual.merger.", "model.visual.deepstack_merger_list.")
    ),
    "vision_tower": ModuleLayout(("visual.", "model.visual."), ("vision_config.depth",)),
}

ARCHITECTURE_MODULES: dict[str, dict[str, ModuleLayout]] = {
    "Gemma3ForConditionalGeneration": {
        "text_decoder": _TEXT,
        "multi_modal_projector": _PROJECTOR,
        "vision_tower": ModuleLayout(
            ("vision_tower.", "model.vision_tower."), ("vision_config.num_hidden_layers",)
        ),
    },
    "Mistral3ForConditionalGeneration": {
        "text_decoder": _TEXT,
        "multi_modal_projector": _PROJECTOR,
        "vision_tower": ModuleLayout(
            ("vision_tower.", "model.vision_tower."), ("vision_config.num_hidden_layers",)
        ),
    },
    "Llama4ForConditionalGeneration": {
        "text_decoder": _TEXT,
        "multi_modal_projector": _PROJECTOR,
        "vision_model": ModuleLayout(
            ("vision_model.", "model.vision_model."), ("vision_config.num_hidden_layers",)
        ),
    },
    "Qwen2VLForConditionalGeneration": _QWEN_VL,
    "Qwen2_5_VLForConditionalGeneration": _QWEN_VL,
    "Qwen3VLForConditionalGeneration": _QWEN_VL,
    "Qwen3VLMoeForConditionalGeneration": _QWEN_VL,
    "T5ForConditionalGeneration": {
        "encoder": ModuleLayout(("encoder.",), ("num_layers",)),
        "decoder": ModuleLayout(("decoder.",), ("num_decoder_layers", "num_layers")),
        "shared": ModuleLayout(("shared.", "lm_head.")),
    },
    "WhisperForConditionalGeneration": {
        "encoder": ModuleLayout(("model.encoder.",), ("encoder_layers",)),
        "decoder": ModuleLayout(("model.decoder.", "proj_out."), ("decoder_layers",)),
    },
}


def architecture_modules(config: Mapping[str, object]) -> tuple[str, dict[str, ModuleLayout]] | None:
    """The architecture a config.json names and its modules, or None when m3sb knows none."""
    names = config.get("architectures")
    for name in names if isinstance(names, list) else []:
        if str(name) in ARCHITECTURE_MODULES:
            return str(name), ARCHITECTURE_MODULES[str(name)]
    return None


def module_of(tensor_name: str, modules: Mapping[str, ModuleLayout]) -> str | None:
    """The module a tensor belongs to: the one with the longest prefix of its name."""
    best, length = None, -1
    for module, layout in modules.items():
        for prefix in layout.prefixes:
            if tensor_name.startswith(prefix) and len(prefix) > length:
                best, length = module, len(prefix)
    return best


def unclaimed(tensor_names: Iterable[str], modules: Mapping[str, ModuleLayout]) -> list[str]:
    """The tensors that belong to no module."""
    return [name for name in tensor_names if module_of(name, modules) is None]


def config_value(config: Mapping[str, object], dotted: str) -> object:
    """A config.json value by dotted key (``text_config.num_hidden_layers``), or None."""
    value: object = config
    for part in dotted.split("."):
        if not isinstance(value, Mapping):
            return None
        value = value.get(part)
    return value


def layer_count_key(config: Mapping[str, object], layout: ModuleLayout) -> str | None:
    """The first of the module's layer-count keys that the config holds as an integer."""
    return next((key for key in layout.layer_keys if isinstance(config_value(config, key), int)), None)


def with_value(config: Mapping[str, object], dotted: str, value: object) -> dict[str, object]:
    """The top-level entry of ``config`` that setting ``dotted`` to ``value`` changes, as
    ``{top_key: new_top_value}`` (nested mappings copied, never changed in place)."""
    head, _, rest = dotted.partition(".")
    if not rest:
        return {head: value}
    inner = config.get(head)
    inner = dict(inner) if isinstance(inner, Mapping) else {}
    inner.update(with_value(inner, rest, value))
    return {head: inner}
