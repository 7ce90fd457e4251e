"""Prompts for CLIP zero-shot heads: the templates and class names of the eight standard
tasks of MAP and FusionBench (the sets the task-vectors project published, from CLIP's
prompt engineering), and a generic template.

A template is a string with one ``{}`` where the class name goes. The class names of a
built-in set are in label order of the tasks' hub datasets (``tanganke/<task>``,
``ufldl-stanford/svhn``, ``ylecun/mnist``); they live in ``clip_class_names.json``.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path, PurePosixPath

GENERIC = ("a photo of a {}.",)

_THE_AND_A = ("{}", "a {}", "the {}")

TEMPLATES: dict[str, tuple[str, ...]] = {
    "generic": GENERIC,
    "cars": (
        "a photo of a {}.",
        "a photo of the {}.",
        "a photo of my {}.",
        "i love my {}!",
        "a photo of my dirty {}.",
        "a photo of my clean {}.",
        "a photo of my new {}.",
        "a photo of my old {}.",
    ),
    "dtd": tuple(
        f"a photo of {article} {{}} {thing}."
        for article in ("a", "the")
        for thing in ("texture", "pattern", "thing", "object")
    ),
    "eurosat": tuple(f"a centered satellite photo of {form}." for form in _THE_AND_A),
    "gtsrb": (
        'a zoomed in photo of a "{}" traffic sign.',
        'a centered photo of a "{}" traffic sign.',
        'a close up photo of a "{}" traffic sign.',
    ),
    "mnist": ('a photo of the number: "{}".',),
    "resisc45": tuple(
        f"{source} {kind} of {form}."
        for form in _THE_AND_A
        for source, kind in (
            ("satellite", "imagery"),
            ("aerial", "imagery"),
            ("satellite", "photo"),
            ("aerial", "photo"),
            ("satellite", "view"),
            ("aerial", "view"),
        )
    ),
    "sun397": ("a photo of a {}.", "a photo of the {}."),
    "svhn": ('a photo of the number: "{}".',),
}

ALIASES = {"stanford_cars": "cars", "stanford-cars": "cars", "resisc": "resisc45", "sun": "sun397"}


def templates_for(dataset_name: str) -> tuple[str, ...]:
    """The built-in templates for a dataset named like one of the standard tasks (its last path
    component, e.g. ``tanganke/sun397``); the generic template otherwise."""
    name = PurePosixPath(dataset_name.rstrip("/")).name.lower()
    name = ALIASES.get(name, name)
    return TEMPLATES.get(name, GENERIC)


def check_template(template: str) -> str:
    """``template`` if it has exactly one ``{}``; a ValueError that quotes it otherwise."""
    if template.count("{}") != 1:
        raise ValueError(f"template {template!r} must have exactly one {{}} for the class name")
    return template


CLASS_NAMES_FILE = Path(__file__).with_name("clip_class_names.json")


@cache
def _class_name_sets() -> dict[str, tuple[str, ...]]:
    """Every built-in set of class names, read once."""
    data = json.loads(CLASS_NAMES_FILE.read_text(encoding="utf-8"))
    return {name: tuple(names) for name, names in data.items()}


def class_name_sets() -> tuple[str, ...]:
    """The names of the built-in class-name sets (the eight standard tasks)."""
    return tuple(_class_name_sets())


def class_names_for(set_name: str) -> tuple[str, ...]:
    """The class names of a built-in set (``eurosat``, ``cars``, ...; aliases such as
    ``stanford_cars`` work); a ValueError naming the sets otherwise."""
    sets = _class_name_sets()
    name = ALIASES.get(set_name.lower(), set_name.lower())
    if name not in sets:
        raise ValueError(f"no built-in class names '{set_name}'; choose one of: {', '.join(sets)}")
    return sets[name]
