"""The CLIP zero-shot family against transformers' own CLIPModel on tiny random CLIPs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from m3sb.errors import CheckpointError, ConfigError
from m3sb.tasks import clip_zero_shot
from m3sb.tasks.clip_templates import TEMPLATES, class_name_sets, class_names_for, templates_for
from m3sb.tasks.data import DataError, DatasetSpec, parse_dataset_spec
from m3sb.tasks.metrics import METRICS
from m3sb.tasks.registry import load_tasks, parse_task_entry

CLASSES = ["zero", "one", "two"]
TEMPLATES_USED = ["a photo of a {}.", "a blurry {} picture", "{}"]


def word_tokenizer(words: list[str]) -> Any:
    """A word-level tokenizer in Hugging Face format: <bos> words <eos>, padded with <eos>."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<bos>": 1, "<eos>": 2}
    for word in words:
        vocab.setdefault(word, len(vocab))
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<bos> $A <eos>", special_tokens=[("<bos>", 1), ("<eos>", 2)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<bos>", eos_token="<eos>", pad_token="<eos>", unk_token="<unk>"
    )


def tiny_clip(seed: int) -> Any:
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config={
            "vocab_size": 40,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "max_position_embeddings": 16,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "pad_token_id": 2,
        },
        vision_config={
            "image_size": 32,
            "patch_size": 8,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
        },
        projection_dim=16,
    )
    return CLIPModel(config).eval()


@pytest.fixture(scope="module")
def artefacts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A base CLIP (with tokenizer and processor), a whole-CLIP fine-tune, vision-only fine-tunes
    with and without a projection, and a small labelled image split."""
    from datasets import ClassLabel, Dataset, DatasetDict, Features, Image
    from transformers import CLIPImageProcessor, CLIPVisionModel, CLIPVisionModelWithProjection

    root = tmp_path_factory.mktemp("clip")
    words = sorted({w for t in TEMPLATES_USED for w in t.replace("{}", "").replace(".", " . ").split()})
    tokenizer = word_tokenizer([*words, ".", *CLASSES])
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    base = tiny_clip(0)
    for name, model in (("base", base), ("full", tiny_clip(1))):
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
        processor.save_pretrained(root / name)
    tuned = tiny_clip(2)
    vision = CLIPVisionModel(tuned.config.vision_config)
    state = tuned.state_dict()
    prefix = "vision_model."
    vision.load_state_dict({k.removeprefix(prefix): state[k] for k in state if k.startswith(prefix)})
    vision.save_pretrained(root / "vision")
    processor.save_pretrained(root / "vision")
    projected = clip_zero_shot.vision_of(tuned)
    assert isinstance(projected, CLIPVisionModelWithProjection)
    projected.save_pretrained(root / "projected")
    rng = np.random.default_rng(0)
    pictures = [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(12)]
    features = Features({"image": Image(), "label": ClassLabel(names=CLASSES)})
    split = Dataset.from_dict({"image": pictures, "label": [i % 3 for i in range(12)]}, features=features)
    DatasetDict({"test": split}).save_to_disk(str(root / "data"))
    DatasetDict({"test": split.shuffle(seed=1)}).save_to_disk(str(root / "other-data"))
    return {name: root / name for name in ("base", "full", "vision", "projected", "data", "other-data")}


def direct_head(clip: Any, tokenizer: Any, names: list[str], templates: list[str]) -> torch.Tensor:
    """The zero-shot head computed text by text with CLIPModel.get_text_features."""
    rows = []
    with torch.no_grad():
        for name in names:
            embedded = []
            for template in templates:
                tokens = tokenizer(template.replace("{}", name), return_tensors="pt")
                features = clip.get_text_features(**tokens)
                features = features if isinstance(features, torch.Tensor) else features.pooler_output
                embedded.append(features[0] / features[0].norm())
            mean = torch.stack(embedded).mean(0)
            rows.append(mean / mean.norm())
        return torch.stack(rows) * clip.logit_scale.exp()


def direct_logits(clip: Any, pixels: torch.Tensor, head: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        features = clip.get_image_features(pixel_values=pixels)
        features = features if isinstance(features, torch.Tensor) else features.pooler_output
        return features / features.norm(dim=-1, keepdim=True) @ head.T


def spec_of(artefacts: dict[str, Path], **more: Any) -> DatasetSpec:
    fields = {"dataset_name": str(artefacts["data"]), "split": "test", "templates": TEMPLATES_USED, **more}
    return DatasetSpec.model_validate(fields)


def _with_vision_of(base: Any, source: Any) -> Any:
    """A copy of the CLIP ``base`` whose vision tower and projection are ``source``'s."""
    import copy

    clip = copy.deepcopy(base)
    clip.load_state_dict({**clip.state_dict(), **source.state_dict()})
    return clip.eval()


@pytest.mark.parametrize("checkpoint", ["full", "vision", "projected"])
def test_head_and_logits_match_transformers_clip(
    artefacts: dict[str, Path], tmp_path: Path, checkpoint: str
) -> None:
    from transformers import AutoTokenizer, CLIPModel

    base = CLIPModel.from_pretrained(artefacts["base"]).eval()
    tokenizer = AutoTokenizer.from_pretrained(artefacts["base"])
    task = clip_zero_shot.load_task_model(str(artefacts[checkpoint]), base_checkpoint=str(artefacts["base"]))
    split = clip_zero_shot.prepare(spec_of(artefacts), task, tmp_path)
    head = task.extra[clip_zero_shot.HEAD]
    expected_head = direct_head(base, tokenizer, CLASSES, TEMPLATES_USED)
    torch.testing.assert_close(head, expected_head, atol=1e-5, rtol=1e-5)

    pixels = split.values()
    if checkpoint == "full":
        clip = _with_vision_of(base, clip_zero_shot.vision_of(CLIPModel.from_pretrained(artefacts["full"])))
    else:
        clip = _with_vision_of(base, task.model)
    if checkpoint == "vision":  # no projection of its own: the base's
        torch.testing.assert_close(task.model.visual_projection.weight, base.visual_projection.weight)
    expected = direct_logits(clip, pixels, expected_head)
    with torch.no_grad():
        got = clip_zero_shot._logits(clip_zero_shot._image_embeds(task.model, None, pixels), head)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)

    metrics = clip_zero_shot.evaluate(task, None, split, torch.device("cpu"), batch_size=5)
    labels = split.labels
    assert metrics["accuracy"] == pytest.approx(100 * float((expected.argmax(-1) == labels).float().mean()))
    loss = torch.nn.functional.cross_entropy(expected, labels).item()
    assert metrics["loss"] == pytest.approx(loss, rel=1e-5)


def test_a_whole_clip_without_a_base_uses_its_own_text_tower(
    artefacts: dict[str, Path], tmp_path: Path
) -> None:
    from transformers import AutoTokenizer, CLIPModel

    task = clip_zero_shot.load_task_model(str(artefacts["full"]))
    clip_zero_shot.prepare(spec_of(artefacts), task, tmp_path)
    own = CLIPModel.from_pretrained(artefacts["full"]).eval()
    expected = direct_head(own, AutoTokenizer.from_pretrained(artefacts["full"]), CLASSES, TEMPLATES_USED)
    torch.testing.assert_close(task.extra[clip_zero_shot.HEAD], expected, atol=1e-5, rtol=1e-5)


def test_the_head_is_cached_and_keyed_by_templates(artefacts: dict[str, Path], tmp_path: Path) -> None:
    task = clip_zero_shot.load_task_model(str(artefacts["full"]), base_checkpoint=str(artefacts["base"]))
    clip_zero_shot.prepare(spec_of(artefacts), task, tmp_path)
    heads = sorted((tmp_path / "heads").glob("*.npy"))
    assert len(heads) == 1
    first = task.extra[clip_zero_shot.HEAD].clone()
    np.save(heads[0], (first * 2).numpy())  # a planted value: a cached head is read, not recomputed
    clip_zero_shot.prepare(spec_of(artefacts), task, tmp_path)
    torch.testing.assert_close(task.extra[clip_zero_shot.HEAD], first * 2)
    clip_zero_shot.prepare(spec_of(artefacts, templates=["{}"]), task, tmp_path)
    assert len(list((tmp_path / "heads").glob("*.npy"))) == 2
    heads[0].write_bytes(b"torn")  # unreadable: recomputed
    clip_zero_shot.prepare(spec_of(artefacts), task, tmp_path)
    torch.testing.assert_close(task.extra[clip_zero_shot.HEAD], first)


def test_merged_vision_towers_are_scored_through_the_backbone(
    artefacts: dict[str, Path], tmp_path: Path
) -> None:
    base = str(artefacts["base"])
    task = clip_zero_shot.load_task_model(str(artefacts["full"]), base_checkpoint=base)
    other = clip_zero_shot.load_task_model(str(artefacts["projected"]), base_checkpoint=base)
    split = clip_zero_shot.prepare(spec_of(artefacts), task, tmp_path)
    other.extra[clip_zero_shot.HEAD] = task.extra[clip_zero_shot.HEAD]
    device = torch.device("cpu")
    # the other tower through ``backbone`` scores as the other model does on its own
    swapped = clip_zero_shot.evaluate(task, other.backbone, split, device)
    assert swapped == clip_zero_shot.evaluate(other, None, split, device)
    names = list(task.backbone)
    flats = torch.stack([torch.cat([m.backbone[n].reshape(-1) for n in names]) for m in (task, other)])
    shapes = [task.backbone[n].shape for n in names]

    def views(flat: torch.Tensor) -> dict[str, torch.Tensor]:
        pieces = torch.split(flat, [int(np.prod(s)) for s in shapes])
        return {n: p.reshape(s) for n, p, s in zip(names, pieces, shapes, strict=True)}

    batched = clip_zero_shot.evaluate_candidates(task, flats, views, split, device)
    own = clip_zero_shot.evaluate(task, None, split, device)
    for got, want in zip(batched, [own, swapped], strict=True):
        assert got["accuracy"] == want["accuracy"]
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-5)


def test_load_tasks_shares_the_vision_backbone_and_loads_the_base(
    artefacts: dict[str, Path], tmp_path: Path
) -> None:
    from m3sb.tasks.registry import LoadSettings, TaskSpec

    spec = spec_of(artefacts)
    specs = [
        TaskSpec(name, str(artefacts[name]), spec, kind="clip_zero_shot")
        for name in ("full", "vision", "projected")
    ]
    tasks, base = load_tasks(specs, str(artefacts["base"]), LoadSettings(cache_dir=str(tmp_path)))
    assert base is not None and not base.own
    assert set(base.backbone) == set(tasks[0].model.backbone)
    assert any(name.startswith("vision_model.") for name in base.backbone)
    assert "visual_projection.weight" in base.backbone
    zero_shot = tasks[0].evaluate(base.backbone, torch.device("cpu"), 4)
    assert set(zero_shot) == set(METRICS)
    base.extra[clip_zero_shot.HEAD] = tasks[0].model.extra[clip_zero_shot.HEAD]
    own = clip_zero_shot.evaluate(base, None, tasks[0].data, torch.device("cpu"))
    assert own == pytest.approx(zero_shot, rel=1e-6)  # two modules, one set of weights


def test_class_names_come_from_the_config_when_given(artefacts: dict[str, Path], tmp_path: Path) -> None:
    task = clip_zero_shot.load_task_model(str(artefacts["full"]), base_checkpoint=str(artefacts["base"]))
    clip_zero_shot.prepare(spec_of(artefacts, class_names=["two", "one", "zero"]), task, tmp_path)
    swapped = task.extra[clip_zero_shot.HEAD].clone()
    clip_zero_shot.prepare(spec_of(artefacts), task, tmp_path)
    torch.testing.assert_close(swapped, task.extra[clip_zero_shot.HEAD].flip(0))
    with pytest.raises(DataError, match=r"class_names \(list\) has 2 names but label column 'label' has 3"):
        clip_zero_shot.prepare(spec_of(artefacts, class_names=["zero", "one"]), task, tmp_path)
    with pytest.raises(DataError, match=r"class_names \(built-in set 'mnist'\) has 10 names but label"):
        clip_zero_shot.prepare(spec_of(artefacts, class_names="mnist"), task, tmp_path)


def test_builtin_class_names_are_the_standard_tasks_in_label_order() -> None:
    sizes = {name: len(class_names_for(name)) for name in class_name_sets()}
    assert sizes == {
        "sun397": 397,
        "cars": 196,
        "resisc45": 45,
        "eurosat": 10,
        "svhn": 10,
        "gtsrb": 43,
        "mnist": 10,
        "dtd": 47,
    }
    assert set(sizes) == set(TEMPLATES) - {"generic"}
    for name in sizes:
        assert len(set(class_names_for(name))) == sizes[name]
    assert class_names_for("mnist") == tuple(str(digit) for digit in range(10))
    assert class_names_for("stanford_cars") == class_names_for("cars")
    assert class_names_for("eurosat")[:2] == ("annual crop land", "forest")
    assert class_names_for("dtd")[0] == "banded" and class_names_for("sun397")[0] == "abbey"
    assert parse_dataset_spec({"dataset_name": "d", "class_names": "EuroSAT"}, "d").class_names == "EuroSAT"
    with pytest.raises(ConfigError, match=r"d: class_names: no built-in class names .cifar.; choose one of"):
        parse_dataset_spec({"dataset_name": "d", "class_names": "cifar"}, "d")


def test_bad_clip_inputs_are_named(artefacts: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"without visual_projection\.weight needs base_model"):
        clip_zero_shot.load_task_model(str(artefacts["vision"]))
    task = clip_zero_shot.load_task_model(
        str(artefacts["projected"]), processor_checkpoint=str(artefacts["base"])
    )
    with pytest.raises(CheckpointError, match="no text tower for the zero-shot head; give base_model"):
        clip_zero_shot.prepare(spec_of(artefacts), task, tmp_path)
    with pytest.raises(CheckpointError, match="cannot read its config"):
        clip_zero_shot.load_task_model(str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="exactly one"):
        parse_dataset_spec({"dataset_name": "d", "templates": ["no placeholder"]}, "datasets_config[0]")
    with pytest.raises(ConfigError, match="no built-in set 'sun'"):
        parse_dataset_spec({"dataset_name": "d", "templates": "sun"}, "datasets_config[0]")
    with pytest.raises(ConfigError, match="templates: only kind clip_zero_shot uses templates"):
        parse_task_entry({"dataset_name": "d", "templates": "generic"}, "datasets_config[0]")


def test_an_image_classifier_is_not_a_clip(tmp_path: Path) -> None:
    from transformers import ViTConfig, ViTForImageClassification

    ViTForImageClassification(
        ViTConfig(
            image_size=8,
            patch_size=4,
            hidden_size=8,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=8,
        )
    ).save_pretrained(tmp_path / "vit")
    with pytest.raises(CheckpointError, match="a 'vit' model is not a CLIP"):
        clip_zero_shot.load_task_model(str(tmp_path / "vit"))


def test_built_in_templates_follow_the_dataset_name() -> None:
    assert templates_for("tanganke/sun397") == TEMPLATES["sun397"]
    assert templates_for("/data/stanford_cars/") == TEMPLATES["cars"]
    assert templates_for("tanganke/resisc45") == TEMPLATES["resisc45"]
    assert templates_for("fashion_mnist") == TEMPLATES["generic"]
    assert len(TEMPLATES["resisc45"]) == 18 and len(TEMPLATES["dtd"]) == 8
    assert TEMPLATES["eurosat"][0] == "a centered satellite photo of {}."


def test_an_experiment_merges_vision_towers_and_scores_zero_shot(
    artefacts: dict[str, Path], tmp_path: Path
) -> None:
    from m3sb.experiment import Experiment

    entries = [
        {"dataset_name": str(artefacts[data]), "kind": "clip_zero_shot", "templates": TEMPLATES_USED}
        for data in ("data", "other-data")
    ]
    results = Experiment(
        name="clip",
        model_checkpoints=[str(artefacts["full"]), str(artefacts["vision"])],
        datasets_config=entries,
        merge_configs={"linear": {"weights": [0, 1]}, "ties": {"density": 0.5}},
        base_model_checkpoint=str(artefacts["base"]),
        device="cpu",
        cache_dir=tmp_path,
    ).run()
    assert list(dict.fromkeys(results["merge_method"])) == ["finetuned", "base", "linear", "ties"]
    rows = results[results["dataset"] == "other-data"].set_index("merge_method")
    for metric in ("accuracy", "f1_score", "loss"):  # one-hot linear is the second fine-tune itself
        assert rows.loc["linear", metric] == pytest.approx(rows.loc["finetuned", metric], abs=1e-9)
    base = clip_zero_shot.load_task_model(str(artefacts["base"]))
    split = clip_zero_shot.prepare(spec_of(artefacts), base, tmp_path)
    zero_shot = clip_zero_shot.evaluate(base, None, split, torch.device("cpu"))
    first = results[(results["dataset"] == "data") & (results["merge_method"] == "base")].iloc[0]
    assert first["accuracy"] == pytest.approx(zero_shot["accuracy"])
    assert first["loss"] == pytest.approx(zero_shot["loss"], rel=1e-6)
