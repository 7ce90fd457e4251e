"""m3sb convert: open_clip checkpoints to Hugging Face CLIP vision towers, no code run from the file."""

from __future__ import annotations

import json
import os
import sys
import types
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from m3sb.cli import app
from m3sb.convert import convert_open_clip, load_pickle_as_data
from m3sb.errors import CheckpointError, ConfigError

open_clip = pytest.importorskip("open_clip")
from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg  # noqa: E402
from transformers import CLIPVisionModelWithProjection  # noqa: E402

MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


def tiny_open_clip(quick_gelu: bool = True, seed: int = 0) -> CLIP:
    torch.manual_seed(seed)
    model = CLIP(
        embed_dim=16,
        vision_cfg=CLIPVisionCfg(layers=2, width=32, head_width=16, patch_size=8, image_size=32),
        text_cfg=CLIPTextCfg(context_length=16, vocab_size=100, width=32, heads=2, layers=1),
        quick_gelu=quick_gelu,
    )
    with torch.no_grad():  # open_clip initialises some tensors to constants; make every one count
        for tensor in model.visual.parameters():
            tensor.add_(0.05 * torch.randn_like(tensor))
    return model.eval()


def save_like_task_vectors(model: CLIP, path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """torch.save of a whole module, as task_vectors' ``src.modeling.ImageEncoder`` is saved."""
    package, module = types.ModuleType("src"), types.ModuleType("src.modeling")

    class ImageEncoder(torch.nn.Module):
        def __init__(self, clip: CLIP) -> None:
            super().__init__()
            self.model = clip
            self.train_preprocess = open_clip.image_transform(32, is_train=True, mean=MEAN, std=STD)
            self.val_preprocess = open_clip.image_transform(32, is_train=False, mean=MEAN, std=STD)
            self.cache_dir = None

    ImageEncoder.__module__, ImageEncoder.__qualname__ = "src.modeling", "ImageEncoder"
    module.ImageEncoder = ImageEncoder  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "src", package)
    monkeypatch.setitem(sys.modules, "src.modeling", module)
    torch.save(ImageEncoder(model), path)


@torch.inference_mode()
def assert_same_features(model: CLIP, folder: Path) -> None:
    converted = CLIPVisionModelWithProjection.from_pretrained(folder).eval()
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    expected = model.encode_image(images)
    got = converted(pixel_values=images).image_embeds
    assert expected.abs().max() > 0.1
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_whole_pickled_module_converts_with_its_heads_activation_and_normalisation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = tiny_open_clip(quick_gelu=True)
    save_like_task_vectors(model, tmp_path / "finetuned.pt", monkeypatch)
    monkeypatch.delitem(sys.modules, "src.modeling")  # loading must not need the project's code
    tower = convert_open_clip(tmp_path / "finetuned.pt", tmp_path / "hf")
    # 32 wide with 16-wide heads: 2 heads, read from the recorded attention (the width/64 guess is 1)
    assert (tower.heads, tower.layers, tower.image_size, tower.projection_dim) == (2, 2, 32, 16)
    assert tower.activation == "quick_gelu"
    assert_same_features(model, tmp_path / "hf")
    processor = json.loads((tmp_path / "hf" / "preprocessor_config.json").read_text())
    assert processor["image_mean"] == pytest.approx(MEAN) and processor["image_std"] == pytest.approx(STD)


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_state_dicts_convert_with_the_shape_options(tmp_path: Path, suffix: str) -> None:
    model = tiny_open_clip(quick_gelu=False, seed=3)
    state = {name: tensor.contiguous() for name, tensor in model.state_dict().items()}
    file = tmp_path / f"open_clip_model{suffix}"
    if suffix == ".pt":
        torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in state.items()}}, file)
    else:
        from safetensors.torch import save_file

        save_file(state, str(file))
    tower = convert_open_clip(file, tmp_path / "hf", heads=2, activation="gelu")
    assert tower.prefix == ("module.visual." if suffix == ".pt" else "visual.")
    assert_same_features(model, tmp_path / "hf")


def test_the_defaults_are_openais_and_a_wrong_guess_shows(tmp_path: Path) -> None:
    model = tiny_open_clip(quick_gelu=False)
    torch.save(model.state_dict(), tmp_path / "sd.pt")
    tower = convert_open_clip(tmp_path / "sd.pt", tmp_path / "hf")
    assert (tower.heads, tower.activation) == (1, "quick_gelu")
    converted = CLIPVisionModelWithProjection.from_pretrained(tmp_path / "hf").eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        assert not torch.allclose(converted(pixel_values=images).image_embeds, model.encode_image(images))


def test_a_planted_payload_is_refused_in_one_line_and_nothing_runs_or_is_written(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self) -> tuple[object, tuple[str]]:
            return (os.system, (f"touch {marker}",))

    torch.save({"state_dict": tiny_open_clip().state_dict(), "extra": Payload()}, tmp_path / "evil.pt")
    result = CliRunner().invoke(app, ["convert", str(tmp_path / "evil.pt"), str(tmp_path / "out")])
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "refused" in lines[0] and "system" in lines[0] and "evil.pt" in lines[0]
    assert not marker.exists()
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["evil.pt"]


def test_functions_under_a_recordable_name_are_recorded_never_called(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    marker = tmp_path / "pwned"
    disguised = types.ModuleType("open_clip.helpers_of_an_attacker")

    def run(command: str) -> int:
        return os.system(command)

    run.__module__, run.__qualname__ = disguised.__name__, "run"
    disguised.run = run  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, disguised.__name__, disguised)

    class Payload:
        def __reduce__(self) -> tuple[object, tuple[str]]:
            return (run, (f"touch {marker}",))

    model = tiny_open_clip()
    torch.save({"state_dict": model.state_dict(), "extra": Payload()}, tmp_path / "sneaky.pt")
    monkeypatch.delitem(sys.modules, disguised.__name__)
    loaded = load_pickle_as_data(tmp_path / "sneaky.pt")
    assert not marker.exists()
    assert loaded["extra"].qualified_name == "open_clip.helpers_of_an_attacker.run"
    assert loaded["extra"].args == (f"touch {marker}",)
    convert_open_clip(tmp_path / "sneaky.pt", tmp_path / "hf", heads=2)
    assert not marker.exists()
    assert_same_features(model, tmp_path / "hf")


def test_bad_inputs_name_the_file_or_tensor(tmp_path: Path) -> None:
    model = tiny_open_clip()
    with pytest.raises(CheckpointError, match="no such file"):
        convert_open_clip(tmp_path / "missing.pt", tmp_path / "a")
    torch.save({"linear.weight": torch.zeros(2, 2)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match=r"other\.pt: no open_clip vision transformer"):
        convert_open_clip(tmp_path / "other.pt", tmp_path / "a")
    torch.save(model.state_dict(), tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    with pytest.raises(CheckpointError, match=r"legacy\.pt: not a zip-format"):
        convert_open_clip(tmp_path / "legacy.pt", tmp_path / "a")
    state = model.state_dict() | {"visual.attn_pool.query": torch.zeros(1, 32)}
    torch.save(state, tmp_path / "pooled.pt")
    with pytest.raises(CheckpointError, match=r"'visual\.attn_pool\.query' has no place"):
        convert_open_clip(tmp_path / "pooled.pt", tmp_path / "a", heads=2)
    del state["visual.attn_pool.query"], state["visual.ln_post.bias"]
    torch.save(state, tmp_path / "cut.pt")
    with pytest.raises(CheckpointError, match=r"missing tensor 'visual\.ln_post\.bias'"):
        convert_open_clip(tmp_path / "cut.pt", tmp_path / "a", heads=2)
    torch.save(model.state_dict(), tmp_path / "sd.pt")
    with pytest.raises(ConfigError, match="--heads 5: does not divide the width 32"):
        convert_open_clip(tmp_path / "sd.pt", tmp_path / "a", heads=5)
    with pytest.raises(ConfigError, match="--activation relu"):
        convert_open_clip(tmp_path / "sd.pt", tmp_path / "a", activation="relu")
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match=r"garbage\.pt"):
        convert_open_clip(tmp_path / "garbage.pt", tmp_path / "a")
    assert not (tmp_path / "a").exists()


def test_recorded_settings_win_over_contradicting_options(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    save_like_task_vectors(tiny_open_clip(quick_gelu=True), tmp_path / "ft.pt", monkeypatch)
    with pytest.raises(ConfigError, match="--heads 4: the checkpoint's attention has 2 heads"):
        convert_open_clip(tmp_path / "ft.pt", tmp_path / "a", heads=4)
    with pytest.raises(ConfigError, match="--activation gelu: the checkpoint's MLPs use quick_gelu"):
        convert_open_clip(tmp_path / "ft.pt", tmp_path / "a", activation="gelu")


def test_the_converted_tower_is_a_clip_zero_shot_task_model(tmp_path: Path) -> None:
    from m3sb.tasks.clip_zero_shot import load_task_model

    model = tiny_open_clip()
    torch.save(model.state_dict(), tmp_path / "sd.pt")
    convert_open_clip(tmp_path / "sd.pt", tmp_path / "hf", heads=2)
    task = load_task_model(str(tmp_path / "hf"))
    assert task.processor is not None
    images = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        got = task.model(pixel_values=images).image_embeds
        torch.testing.assert_close(got, model.encode_image(images), atol=1e-5, rtol=1e-5)
