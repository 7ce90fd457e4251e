"""Tiny random Hugging Face models, built offline in a second, for the demo and the tests.

A *family* is a randomly initialised base model and several "fine-tunes": the base plus
Gaussian noise scaled to each tensor's spread, so they sit near each other on the sphere
as real fine-tunes do.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch


@dataclass(frozen=True)
class Family:
    """Paths of a toy base model and its fine-tunes."""

    base: Path
    models: tuple[Path, ...]


def _tiny_llama(seed: int, hidden: int, layers: int, vocab: int) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging

    logging.disable_progress_bar()  # type: ignore[no-untyped-call]

    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model: Any = LlamaForCausalLM(config)
    return model.eval()


def make_family(
    folder: Path,
    n_models: int = 3,
    seed: int = 0,
    noise: float = 0.05,
    hidden: int = 32,
    layers: int = 2,
    vocab: int = 64,
    dtype: torch.dtype = torch.float32,
) -> Family:
    """Build (or reuse, when already built with the same arguments) a toy family in ``folder``."""
    folder = Path(folder)
    recipe = {
        "n_models": n_models,
        "seed": seed,
        "noise": noise,
        "hidden": hidden,
        "layers": layers,
        "vocab": vocab,
        "dtype": str(dtype),
    }
    family = Family(folder / "base", tuple(folder / f"finetune-{i}" for i in range(n_models)))
    marker = folder / "family.json"
    if marker.is_file() and json.loads(marker.read_text()) == recipe:
        return family
    model = _tiny_llama(seed, hidden, layers, vocab).to(dtype)
    model.save_pretrained(family.base, safe_serialization=True)
    base_state = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    for index, path in enumerate(family.models):
        generator = torch.Generator().manual_seed(seed * 1000 + index + 1)
        with torch.no_grad():
            for name, tensor in model.state_dict().items():
                original = base_state[name].float()
                spread = original.std() if original.numel() > 1 else original.abs()
                step = torch.randn(original.shape, generator=generator) * noise * float(spread)
                tensor.copy_((original + step).to(dtype))
        model.save_pretrained(path, safe_serialization=True)
    marker.write_text(json.dumps(recipe))
    return family


def save_toy_tokenizer(folder: Path, tokens: list[str], special: tuple[str, ...] = ("<unk>",)) -> Path:
    """A word-level Hugging Face tokenizer in ``folder``: ``special`` tokens first (as added
    special tokens), then ``tokens``, ids in that order."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocabulary = {token: index for index, token in enumerate([*special, *tokens])}
    model = Tokenizer(models.WordLevel(vocabulary, unk_token=special[0]))
    model.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=model, unk_token=special[0])  # type: ignore[no-untyped-call]
    tokenizer.add_special_tokens({"additional_special_tokens": list(special[1:])})
    tokenizer.save_pretrained(str(folder))
    return folder


def save_toy_adapter(model_folder: Path, out: Path, seed: int, **settings: Any) -> Path:
    """A PEFT LoRA adapter for the model in ``model_folder`` with random non-zero factors (r 4,
    alpha 8 on q_proj and v_proj unless ``settings`` say otherwise), saved in ``out``."""
    import peft
    from transformers import AutoModelForCausalLM

    chosen: dict[str, Any] = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], **settings}
    config = peft.LoraConfig(**chosen)
    wrapped = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(model_folder), config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in wrapped.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)
    wrapped.save_pretrained(str(out))
    return out
