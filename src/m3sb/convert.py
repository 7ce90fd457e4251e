"""``m3sb convert``: open_clip checkpoints (state dicts, or whole pickled modules as the
task_vectors project saved them) to Hugging Face CLIP vision checkpoints, without running
any code from the file.

Pickles are read by torch's ``weights_only`` unpickler. Every class the pickle names is
first listed (``get_unsafe_globals_in_checkpoint``, which only scans opcodes); classes of
the model-building packages (open_clip, torch.nn, torchvision transforms, the task_vectors
project) are stood in for by inert records that keep their state as plain data, and a
file that names anything else (``os.system``, ``builtins.eval``, ...) is refused before
it is loaded. Nothing from open_clip or the file is ever imported or called.
"""

from __future__ import annotations

import math
import pickle
import re
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from m3sb.errors import CheckpointError, ConfigError

RECORDABLE_MODULES = (
    "open_clip.",
    "open_clip_train.",
    "torch.nn.modules.",
    "torchvision.transforms.",
    "PIL.Image.",
    "src.",  # the task_vectors project: src.modeling.ImageEncoder, src.heads...
    "modeling.",
    "heads.",
)
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
ACTIVATIONS = {"quick_gelu", "gelu"}


class Recorded:
    """An object the pickle described, kept as plain data: its class name, arguments, state."""

    qualified_name = "?"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args = args
        self.kwargs = kwargs
        self.state: Any = None

    def __new__(cls, *args: Any, **kwargs: Any) -> Recorded:
        instance = object.__new__(cls)
        instance.args, instance.kwargs, instance.state = args, kwargs, None
        return instance

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __repr__(self) -> str:
        return f"<recorded {self.qualified_name}>"


def _record_class(qualified_name: str) -> type[Recorded]:
    return type(qualified_name.rsplit(".", 1)[-1], (Recorded,), {"qualified_name": qualified_name})


def _recordable(qualified_name: str) -> bool:
    return qualified_name.startswith(RECORDABLE_MODULES)


def load_pickle_as_data(path: Path) -> Any:
    """Unpickle a ``torch.save`` file with tensors rebuilt and every named class recorded as data.

    Raises CheckpointError, before anything is loaded, when the pickle names a global that
    is neither torch's tensor machinery nor a class of the model-building packages.
    """
    if not zipfile.is_zipfile(path):
        raise CheckpointError(
            f"{path}: not a zip-format torch.save file (legacy pre-1.6 pickles are not read; "
            "re-save it with torch>=1.6 in a trusted environment)"
        )
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except (RuntimeError, OSError, ValueError, pickle.UnpicklingError, zipfile.BadZipFile) as error:
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({error})") from None
    refused = sorted(name for name in names if not _recordable(name))
    if refused:
        shown = ", ".join(refused[:3]) + (f" and {len(refused) - 3} more" if len(refused) > 3 else "")
        raise CheckpointError(
            f"{path}: refused: the pickle calls or builds {shown}, which could run code; nothing was "
            "loaded (m3sb convert reads tensors and classes of open_clip, torch.nn, torchvision "
            "transforms and the task_vectors project only)"
        )
    stand_ins: list[Callable[..., Any] | tuple[Callable[..., Any], str]] = [
        (_record_class(name), name) for name in names
    ]
    try:
        with torch.serialization.safe_globals(stand_ins):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as error:
        reason = str(error).strip().splitlines()[-1][:200] if str(error).strip() else "unsupported pickle"
        raise CheckpointError(f"{path}: refused: {reason}") from None
    except (RuntimeError, OSError, EOFError, ValueError) as error:
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({error})") from None


@dataclass
class ModuleTree:
    """Tensors of a recorded module tree by dotted name, with each submodule's class and state."""

    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    classes: dict[str, str] = field(default_factory=dict)
    states: dict[str, dict[str, Any]] = field(default_factory=dict)
    loaded: Any = None


def _walk(node: Any, prefix: str, tree: ModuleTree) -> None:
    if isinstance(node, torch.Tensor):
        tree.tensors[prefix.rstrip(".")] = node.detach()
        return
    if isinstance(node, Recorded):
        name = prefix.rstrip(".")
        tree.classes[name] = node.qualified_name
        state = node.state if isinstance(node.state, dict) else {}
        tree.states[name] = state
        for group in ("_parameters", "_buffers", "_modules"):
            children = state.get(group)
            if isinstance(children, dict):
                for key, child in children.items():
                    if child is not None:
                        _walk(child, f"{prefix}{key}.", tree)
        return
    if isinstance(node, dict):
        for key, child in node.items():
            if isinstance(key, str):
                _walk(child, f"{prefix}{key}.", tree)


def read_open_clip_file(path: Path) -> ModuleTree:
    """The tensors (and, for pickled modules, the classes) of an open_clip checkpoint file."""
    tree = ModuleTree()
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            tree.tensors = load_file(str(path))
        except (OSError, RuntimeError, ValueError) as error:
            raise CheckpointError(f"{path}: not a readable safetensors file ({error})") from None
        return tree
    loaded = load_pickle_as_data(path)
    if isinstance(loaded, dict) and isinstance(loaded.get("state_dict"), dict):
        loaded = loaded["state_dict"]  # open_clip training checkpoints
    tree.loaded = loaded
    _walk(loaded, "", tree)
    if not tree.tensors:
        raise CheckpointError(f"{path}: holds no tensors (expected an open_clip model or state dict)")
    return tree


@dataclass(frozen=True)
class VisionTower:
    """An open_clip vision transformer found in a checkpoint, with the shape of its config."""

    prefix: str
    hidden_size: int
    intermediate_size: int
    layers: int
    heads: int
    patch_size: int
    image_size: int
    channels: int
    projection_dim: int
    activation: str
    mean: tuple[float, ...]
    std: tuple[float, ...]


def _find_prefix(tree: ModuleTree, source: Path) -> str:
    found = sorted(name[: -len("conv1.weight")] for name in tree.tensors if name.endswith("conv1.weight"))
    found = [prefix for prefix in found if prefix == "" or prefix.endswith(".")]
    if not found:
        if any(".trunk." in name or name.startswith("trunk.") for name in tree.tensors):
            raise CheckpointError(f"{source}: a timm vision tower; only open_clip ViTs are converted")
        raise CheckpointError(f"{source}: no open_clip vision transformer in it (no tensor '*conv1.weight')")
    if len(found) > 1:
        raise CheckpointError(f"{source}: more than one vision tower ({', '.join(found)})")
    return found[0]


def _class_below(tree: ModuleTree, prefix: str, suffix: str) -> str | None:
    for name, qualified in tree.classes.items():
        if name.startswith(prefix.rstrip(".")) and qualified.endswith(suffix):
            return name
    return None


def _activation(tree: ModuleTree, prefix: str, asked: str | None) -> str:
    classes = {q for name, q in tree.classes.items() if name.startswith(prefix) and ".mlp." in f"{name}."}
    recorded = None
    if any(q.endswith(".QuickGELU") for q in classes):
        recorded = "quick_gelu"
    elif any(q.endswith(".GELU") for q in classes):
        recorded = "gelu"
    if asked is not None and recorded is not None and asked != recorded:
        raise ConfigError(f"--activation {asked}: the checkpoint's MLPs use {recorded}")
    return asked or recorded or "quick_gelu"


def _records(node: Any, path: str, seen: set[int]) -> Iterator[tuple[str, Recorded]]:
    """Every recorded object reachable from ``node`` (through states, dicts, lists), with its path."""
    if id(node) in seen:
        return
    seen.add(id(node))
    if isinstance(node, Recorded):
        yield path, node
        yield from _records(node.state, path, seen)
    elif isinstance(node, dict):
        for key, child in node.items():
            yield from _records(child, f"{path}.{key}", seen)
    elif isinstance(node, (list, tuple)):
        for child in node:
            yield from _records(child, path, seen)


def _normalisation(loaded: Any) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The mean and std of the pickled evaluation transform (``val_preprocess``), else OpenAI's."""
    found = [
        (path, record)
        for path, record in _records(loaded, "", set())
        if record.qualified_name.endswith("transforms.Normalize") and isinstance(record.state, dict)
    ]
    found.sort(key=lambda item: "val_preprocess" not in item[0])
    for _, record in found:
        mean, std = record.state.get("mean"), record.state.get("std")
        if isinstance(mean, (list, tuple)) and isinstance(std, (list, tuple)):
            return tuple(float(v) for v in mean), tuple(float(v) for v in std)
    return OPENAI_MEAN, OPENAI_STD


def describe_vision_tower(
    tree: ModuleTree, source: Path, heads: int | None = None, activation: str | None = None
) -> VisionTower:
    """Read the vision tower's shape from its tensors (and recorded classes where there are any)."""
    prefix = _find_prefix(tree, source)
    tensors = tree.tensors

    def need(name: str) -> torch.Tensor:
        if prefix + name not in tensors:
            raise CheckpointError(f"{source}: missing tensor '{prefix}{name}'")
        return tensors[prefix + name]

    conv = need("conv1.weight")
    width, channels, patch = conv.shape[0], conv.shape[1], conv.shape[-1]
    positions = need("positional_embedding").shape[0]
    grid = math.isqrt(positions - 1)
    if grid * grid != positions - 1:
        raise CheckpointError(
            f"{source}: '{prefix}positional_embedding' has {positions} rows, not 1 + a square"
        )
    block = re.compile(re.escape(prefix) + r"transformer\.resblocks\.(\d+)\.")
    layers = 1 + max((int(m.group(1)) for n in tensors if (m := block.match(n))), default=-1)
    if layers == 0:
        raise CheckpointError(f"{source}: no transformer blocks under '{prefix}transformer.resblocks'")
    recorded_heads = None
    attention = _class_below(tree, prefix + "transformer.resblocks.0.attn", "MultiheadAttention")
    if attention is not None:
        recorded_heads = tree.states[attention].get("num_heads")
    if heads is not None and recorded_heads is not None and heads != recorded_heads:
        raise ConfigError(f"--heads {heads}: the checkpoint's attention has {recorded_heads} heads")
    heads = heads or (int(recorded_heads) if recorded_heads else max(1, width // 64))
    if width % heads:
        raise ConfigError(f"--heads {heads}: does not divide the width {width}")
    mean, std = _normalisation(tree.loaded)
    return VisionTower(
        prefix=prefix,
        hidden_size=width,
        intermediate_size=need("transformer.resblocks.0.mlp.c_fc.weight").shape[0],
        layers=layers,
        heads=heads,
        patch_size=patch,
        image_size=grid * patch,
        channels=channels,
        projection_dim=need("proj").shape[1],
        activation=_activation(tree, prefix, activation),
        mean=mean,
        std=std,
    )


def _block_names(i: int) -> Iterator[tuple[str, str]]:
    hf, oc = f"vision_model.encoder.layers.{i}.", f"transformer.resblocks.{i}."
    for a, b in (("layer_norm1", "ln_1"), ("layer_norm2", "ln_2")):
        for kind in ("weight", "bias"):
            yield f"{hf}{a}.{kind}", f"{oc}{b}.{kind}"
    for a, b in (("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj"), ("self_attn.out_proj", "attn.out_proj")):
        for kind in ("weight", "bias"):
            yield f"{hf}{a}.{kind}", f"{oc}{b}.{kind}"


def hf_vision_state(tree: ModuleTree, tower: VisionTower, source: Path) -> dict[str, torch.Tensor]:
    """The vision tower's tensors under ``CLIPVisionModelWithProjection``'s names.

    Every tensor under the tower's prefix must be used; one that is not is named in the
    error (attention pooling, a different block layout...).
    """
    p, tensors = tower.prefix, tree.tensors
    state: dict[str, torch.Tensor] = {
        "vision_model.embeddings.class_embedding": tensors[p + "class_embedding"],
        "vision_model.embeddings.patch_embedding.weight": tensors[p + "conv1.weight"],
        "vision_model.embeddings.position_embedding.weight": tensors[p + "positional_embedding"],
        "visual_projection.weight": tensors[p + "proj"].t(),
    }
    used = {p + n for n in ("class_embedding", "conv1.weight", "positional_embedding", "proj")}
    pairs = [
        (f"vision_model.{hf}.{kind}", f"{oc}.{kind}")
        for hf, oc in (("pre_layrnorm", "ln_pre"), ("post_layernorm", "ln_post"))
        for kind in ("weight", "bias")
    ]
    for i in range(tower.layers):
        pairs.extend(_block_names(i))
        block = f"{p}transformer.resblocks.{i}.attn."
        for kind in ("weight", "bias"):
            packed = tensors.get(f"{block}in_proj_{kind}")
            if packed is None:
                raise CheckpointError(f"{source}: missing tensor '{block}in_proj_{kind}'")
            used.add(f"{block}in_proj_{kind}")
            for part, chunk in zip(("q", "k", "v"), packed.chunk(3, dim=0), strict=True):
                state[f"vision_model.encoder.layers.{i}.self_attn.{part}_proj.{kind}"] = chunk
    for hf, oc in pairs:
        if p + oc not in tensors:
            raise CheckpointError(f"{source}: missing tensor '{p}{oc}'")
        state[hf] = tensors[p + oc]
        used.add(p + oc)
    unused = sorted(n for n in tensors if n.startswith(p) and n not in used)
    if unused:
        raise CheckpointError(
            f"{source}: tensor '{unused[0]}' has no place in a Hugging Face CLIP vision tower"
            + (f" ({len(unused) - 1} more)" if len(unused) > 1 else "")
        )
    return {name: tensor.contiguous().clone() for name, tensor in state.items()}


def hf_vision_config(tower: VisionTower) -> Any:
    """The ``CLIPVisionConfig`` of a converted tower."""
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(
        hidden_size=tower.hidden_size,
        intermediate_size=tower.intermediate_size,
        num_hidden_layers=tower.layers,
        num_attention_heads=tower.heads,
        num_channels=tower.channels,
        image_size=tower.image_size,
        patch_size=tower.patch_size,
        projection_dim=tower.projection_dim,
        hidden_act=tower.activation,
        layer_norm_eps=1e-5,
    )


def convert_open_clip(
    source: str | Path,
    destination: str | Path,
    *,
    heads: int | None = None,
    activation: str | None = None,
    force: bool = False,
) -> VisionTower:
    """Write the vision tower of an open_clip checkpoint file as a Hugging Face
    ``CLIPVisionModelWithProjection`` folder (safetensors, config, image processor)."""
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    from m3sb.checkpoints import atomic_output_folder
    from m3sb.tasks.model import quiet_transformers

    if activation is not None and activation not in ACTIVATIONS:
        raise ConfigError(f"--activation {activation}: expected one of {', '.join(sorted(ACTIVATIONS))}")
    if heads is not None and heads < 1:
        raise ConfigError(f"--heads {heads}: must be at least 1")
    source = Path(source).expanduser()
    if not source.is_file():
        raise CheckpointError(f"{source}: no such file")
    tree = read_open_clip_file(source)
    tower = describe_vision_tower(tree, source, heads=heads, activation=activation)
    state = hf_vision_state(tree, tower, source)
    quiet_transformers()
    model: Any = CLIPVisionModelWithProjection(hf_vision_config(tower))
    dtype = state["vision_model.embeddings.patch_embedding.weight"].dtype
    model = model.to(dtype)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [name for name in missing if not name.endswith("position_ids")]
    if missing or unexpected:
        raise CheckpointError(f"{source}: converted tensors do not fit ({(missing + unexpected)[0]})")
    processor = CLIPImageProcessor(
        size={"shortest_edge": tower.image_size},
        crop_size={"height": tower.image_size, "width": tower.image_size},
        image_mean=list(tower.mean),
        image_std=list(tower.std),
    )
    with atomic_output_folder(Path(destination), force=force) as staging:
        model.save_pretrained(staging, safe_serialization=True)
        processor.save_pretrained(staging)
    return tower
