"""The VLM recipe's pieces on the tiny random Qwen2-VL: label masking, rows with images, LoRA targets, frozen
parts and the optimizer's parameter groups (``services/training/recipes/vision.py``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForImageTextToText

from cli.demo_vlm import shape_image
from services.core.errors import InvalidArgument
from services.core.image_datasets import ImagePolicy
from services.core.vision import load_processor, part_of
from services.training.recipes import data as D
from services.training.recipes.spec import Hyperparameters, TrainingSpec
from services.training.recipes.vision import (
    VisionCollator,
    VisionEncoder,
    freeze,
    load_model,
    load_vision_rows,
    lora_targets,
    param_groups,
    part_learning_rates,
    part_modules,
)
from tests.support.vlm_model import shape_dataset, tiny_vlm  # noqa: F401 - the fixtures


def _spec(method: str = "lora", **hp) -> TrainingSpec:
    use_lora = method != "full"
    resolved = Hyperparameters.resolve(hp, method=method, use_lora=use_lora, precision="fp32")
    return TrainingSpec.model_validate({
        "method": method, "use_lora": use_lora, "base_model": {"name": "m", "artifact_prefix": "p"},
        "datasets": [{"name": "d", "key": "k/d.zip", "sha256": "0" * 64, "format": "messages"}],
        "hyperparameters": resolved, "output": {"model": "models/x"}, "s3": {"endpoint": "e", "bucket": "b"}})


def _conversation() -> list[dict]:
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is the shape?"}]},
            {"role": "assistant", "content": "red"},
            {"role": "user", "content": [{"type": "text", "text": "And this one?"}, {"type": "image"}]},
            {"role": "assistant", "content": "blue"}]


def test_labels_are_the_assistant_answers_only_and_never_image_tokens(tiny_vlm):
    encoder = VisionEncoder(load_processor(tiny_vlm), 512)
    big = shape_image("red", "circle", size=112)  # 16 image tokens
    small = shape_image("blue", "square", size=56)  # 4 image tokens
    example, status = encoder.encode(_conversation(), [big, small])
    assert status == "ok" and example is not None
    ids, labels = example["input_ids"], example["labels"]
    image = ids == encoder.image_token_id
    assert int(image.sum()) == 16 + 4 and example["image_grid_thw"].shape[0] == 2
    assert bool((labels[image] == D.IGNORE_INDEX).all())
    trained = encoder.tokenizer.decode(ids[labels != D.IGNORE_INDEX])
    assert trained == "red<|im_end|>blue<|im_end|>"  # both answers with their end of turn, nothing else
    assert int((labels != D.IGNORE_INDEX).sum()) == len(encoder.tokenizer("red<|im_end|>blue<|im_end|>")["input_ids"])


def test_rows_are_truncated_after_their_images_or_skipped(tiny_vlm):
    processor = load_processor(tiny_vlm)
    conv = _conversation()[:2]
    full, _ = VisionEncoder(processor, 512).encode(conv, [shape_image("red", "circle", size=112)])
    n = len(full["input_ids"])
    cut, status = VisionEncoder(processor, n - 1).encode(conv, [shape_image("red", "circle", size=112)])
    assert status == "truncated" and len(cut["input_ids"]) == len(cut["labels"]) == n - 1
    assert torch.equal(cut["pixel_values"], full["pixel_values"])
    gone, status = VisionEncoder(processor, 8).encode(conv, [shape_image("red", "circle", size=112)])
    assert gone is None and status == "images_cut"


def test_collator_pads_tokens_and_concatenates_images(tiny_vlm):
    encoder = VisionEncoder(load_processor(tiny_vlm), 512)
    a, _ = encoder.encode(_conversation()[:2], [shape_image("red", "circle", size=112)])
    b, _ = encoder.encode([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}], [])
    batch = VisionCollator(encoder.tokenizer.pad_token_id)([b, a])
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (2, len(a["input_ids"]))
    assert int(batch["attention_mask"][0].sum()) == len(b["input_ids"])
    assert bool((batch["labels"][0, len(b["input_ids"]):] == D.IGNORE_INDEX).all())
    assert torch.equal(batch["pixel_values"], a["pixel_values"]) and batch["image_grid_thw"].shape == (1, 3)


def test_rows_with_too_many_images_refuse_the_job_naming_them(tmp_path, shape_dataset):
    rows = load_vision_rows(shape_dataset, "shapes", "messages", 8, lambda *a, **k: None)
    assert len(rows) == 48 and all(len(r.images) == 1 for r in rows)
    assert rows[0].messages[0]["content"][0] == {"type": "image"}
    row = json.loads((shape_dataset.parent / "train" / "data.jsonl").read_text().splitlines()[0])
    row["messages"][0]["content"] *= 3  # three images
    folder = tmp_path / "many"
    (folder / "images").mkdir(parents=True)
    for p in (shape_dataset.parent / "train" / "images").iterdir():
        (folder / "images" / p.name).write_bytes(p.read_bytes())
    (folder / "data.jsonl").write_text(json.dumps(row) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(InvalidArgument) as info:
        load_vision_rows(folder / "data.jsonl", "many", "messages", 2, lambda *a, **k: None)
    assert info.value.violations[0].field == "spec.hyperparameters.max_images_per_sample"
    assert "row 1 (3 images), row 2 (3 images)" in info.value.message
    assert isinstance(rows[0].policy, ImagePolicy) and rows[0].policy.base_dir is not None


def test_lora_targets_the_language_model_and_trains_unfrozen_parts_fully(tiny_vlm):
    base = AutoModelForImageTextToText.from_pretrained(tiny_vlm, dtype=torch.float32)
    targets = lora_targets(base, "all-linear")
    assert targets and all(part_of(t + ".weight") == "language" for t in targets)
    assert not any("visual" in t or t.endswith("lm_head") for t in targets)
    assert lora_targets(base, ["q_proj"]) == [t for t in targets if t.endswith(".q_proj")]
    with pytest.raises(InvalidArgument, match="lora_target_modules"):
        lora_targets(base, ["qkv"])  # a vision-tower layer name: no adapter on the vision tower
    assert part_modules(base, "aligner") == ["model.visual.merger"]
    assert "model.visual.blocks.0" in part_modules(base, "vision")

    spec = _spec("lora", learning_rate=1e-3, freeze_aligner=False, aligner_learning_rate=5e-4)
    assert spec.hyperparameters.vision_learning_rate == 1e-3  # default: learning_rate
    model = load_model(spec, str(tiny_vlm))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {part_of(n) for n in trainable} == {"language", "aligner"}
    assert all(".lora_" in n for n in trainable if part_of(n) == "language")
    groups = param_groups(model, part_learning_rates(spec.hyperparameters), 0.1, {n for n in trainable
                                                                                  if not n.endswith(".bias")})
    assert [(g["part"], g["lr"], g["weight_decay"]) for g in groups] == [
        ("language", 1e-3, 0.1), ("aligner", 5e-4, 0.1), ("aligner", 5e-4, 0.0)]
    assert sum(len(g["params"]) for g in groups) == len(trainable)


def test_full_training_freezes_parts_and_groups_learning_rates(tiny_vlm):
    spec = _spec("full", learning_rate=1e-5, freeze_vision_tower=False, vision_learning_rate=2e-6)
    model = load_model(spec, str(tiny_vlm))
    parts = {part_of(n): p.requires_grad for n, p in model.named_parameters()}
    assert parts == {"language": True, "vision": True, "aligner": False}
    groups = param_groups(model, part_learning_rates(spec.hyperparameters), 0.0, set())
    assert [(g["part"], g["lr"]) for g in groups] == [("language", 1e-5), ("vision", 2e-6)]
    frozen = freeze(model, _spec("full").hyperparameters)
    assert frozen == sum(p.numel() for n, p in model.named_parameters() if part_of(n) != "language")
    assert Path(tiny_vlm, "preprocessor_config.json").is_file()


def test_a_resumed_vlm_run_continues_from_its_checkpoint_and_ends_where_an_uninterrupted_one_does(
        tmp_path, tiny_vlm, shape_dataset):
    """The per-part optimizer groups survive a checkpoint: the Trainer restores them on resume."""
    from services.training.recipes.callbacks import TokenCounter
    from services.training.recipes.train import DatasetFile, Plan, _common_args
    from services.training.recipes.vision import vision_sft_trainer

    class Sink:
        def log(self, message: str, **fields) -> None:
            pass

    spec = _spec("lora", max_steps=4, batch_size=4, gradient_accumulation_steps=1, learning_rate=1e-3,
                 max_length=256, lora_dropout=0.0, freeze_aligner=False, aligner_learning_rate=2e-4)
    spec = spec.model_copy(update={"checkpoint_every_steps": 2})

    def run(name: str, resume: str | None) -> tuple[dict[str, torch.Tensor], object]:
        plan = Plan(job_name=f"trainingJobs/{name}", spec=spec.model_dump(mode="json"), base_dir=str(tiny_vlm),
                    datasets=[DatasetFile("d", str(shape_dataset), "0", "messages", None)], validation=None,
                    workdir=str(tmp_path / name), output_dir=str(tmp_path / name / "out"))
        trainer, _, _ = vision_sft_trainer(plan, spec, Sink(), _common_args(spec, plan, False, False), TokenCounter())
        trainer.train(resume_from_checkpoint=resume)
        state = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
        return state, trainer

    whole, first = run("whole", None)
    checkpoint = tmp_path / "whole" / "trainer" / "checkpoint-2"
    assert checkpoint.is_dir()
    resumed, second = run("resumed", str(checkpoint))
    assert second.state.global_step == 4 and [g["part"] for g in second.optimizer.param_groups] == [
        g["part"] for g in first.optimizer.param_groups]
    assert all(torch.allclose(whole[n], resumed[n], atol=1e-6) for n in whole)


def test_memory_estimate_counts_the_vision_side(tiny_vlm):
    from services.training.memory import MemoryRequest, ModelShape, estimate_memory

    config = json.loads((tiny_vlm / "config.json").read_text())
    model = AutoModelForImageTextToText.from_pretrained(tiny_vlm, dtype=torch.float32)
    actual = {part: 0 for part in ("language", "vision", "aligner")}
    for n, p in model.named_parameters():
        actual[part_of(n)] += p.numel()
    shape = ModelShape.from_config(config, sum(actual.values()))
    assert shape.vision_parameters == pytest.approx(actual["vision"], rel=0.05)
    assert shape.aligner_parameters == pytest.approx(actual["aligner"], rel=0.05)
    frozen = estimate_memory(shape, MemoryRequest(method="full", use_lora=False, precision="fp32", batch_size=2,
                                                  max_length=128, image_patches_per_sample=64))
    unfrozen = estimate_memory(shape, MemoryRequest(method="full", use_lora=False, precision="fp32", batch_size=2,
                                                    max_length=128, train_vision=True, train_aligner=True,
                                                    image_patches_per_sample=64))
    no_images = estimate_memory(shape, MemoryRequest(method="full", use_lora=False, precision="fp32", batch_size=2,
                                                     max_length=128))
    assert frozen.trainable_parameters == shape.parameter_count - shape.vision_parameters - shape.aligner_parameters
    assert unfrozen.trainable_parameters == shape.parameter_count and unfrozen.total > frozen.total
    assert frozen.activations > no_images.activations
