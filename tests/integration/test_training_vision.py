"""Vision-language fine-tuning through the real training service: in-process registry and training servers,
a real S3 server, the tiny random Qwen2-VL (``tests/support/vlm_model.py``) imported into the registry, the
colour-of-the-shape dataset uploaded as an archive (data.jsonl + images), job children running the real VLM
recipe (``services/training/recipes/vision.py``) on CPU."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cli.demo_models import build_tiny_model
from modelyard.client import InvalidArgument
from modelyard.common.v1 import common_pb2 as cpb
from modelyard.registry.v1 import registry_pb2 as rpb
from modelyard.training.v1 import training_pb2 as tpb
from services.core.artifacts import S3ArtifactStore
from services.core.vision import load_processor, part_of
from services.training.recipes.vision import VisionCollator, VisionEncoder, load_vision_rows
from tests.support.training_stack import fails, import_model, lora_job, training_stack, upload_dataset, wait_state
from tests.support.vlm_model import shape_dataset, shape_eval_dataset, tiny_vlm  # noqa: F401 - the fixtures

TERMINAL = {cpb.JOB_STATE_SUCCEEDED, cpb.JOB_STATE_FAILED, cpb.JOB_STATE_CANCELLED}
VISION_HP = {"freeze_vision_tower": True, "freeze_aligner": True}


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _download(s3_settings, prefix: str, dest: Path) -> Path:
    S3ArtifactStore.connect(s3_settings).download_dir(prefix, dest)
    return dest / "files" if (dest / "files").is_dir() else dest


def _eval_loss(model_dir: Path, processor_dir: Path, eval_archive: Path, workdir: Path) -> float:
    """Mean loss on the assistant tokens of the eval rows (batches of 4, as the job's evaluation)."""
    from transformers import AutoModelForImageTextToText

    from services.core.image_datasets import load_image

    local = workdir / eval_archive.name
    local.write_bytes(eval_archive.read_bytes())
    rows = load_vision_rows(local, "eval", "messages", 8, lambda *a, **k: None)
    encoder = VisionEncoder(load_processor(processor_dir), 256)
    collate = VisionCollator(encoder.tokenizer.pad_token_id)
    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32).eval()
    losses = []
    with torch.no_grad():
        for i in range(0, len(rows), 4):
            batch = collate([encoder.encode(r.messages, [load_image(ref, r.policy) for ref in r.images])[0]
                             for r in rows[i:i + 4]])
            losses.append(model(**batch).loss.item())
    return sum(losses) / len(losses)


async def _run(stack, job: tpb.TrainingJob, job_id: str) -> tpb.TrainingJob:
    created = await stack.training.create_training_job(job, training_job_id=job_id)
    done = await wait_state(stack.training, created.name, TERMINAL, timeout=240)
    assert done.state == cpb.JOB_STATE_SUCCEEDED, done.error
    return done


async def test_lora_on_a_vlm_trains_the_language_model_only_and_lowers_eval_loss(
        tmp_path, s3_settings, tiny_vlm, shape_dataset, shape_eval_dataset):
    async with training_stack(tmp_path, s3_settings) as stack:
        base = await import_model(stack.registry, tiny_vlm, parent="models/tiny-vlm")
        train = await upload_dataset(stack.registry, "datasets/shapes", shape_dataset)
        evalset = await upload_dataset(stack.registry, "datasets/shapes-eval", shape_eval_dataset)
        job = lora_job(base, [train], validation_dataset_version=evalset, merge_adapter=True,
                       output_model="models/tiny-vlm-shapes", hyperparameters={
                           "max_steps": 40, "batch_size": 4, "max_length": 256, "lora_rank": 8, "warmup_ratio": 0.0,
                           **VISION_HP})
        created = await stack.training.create_training_job(job, training_job_id="vlm-lora")
        hp = created.spec.hyperparameters  # the resolved spec shows the vision settings
        assert (hp.freeze_vision_tower, hp.freeze_aligner, hp.max_images_per_sample) == (True, True, 8)
        assert hp.vision_learning_rate == hp.aligner_learning_rate == hp.learning_rate == 1e-3
        assert 0 < created.preflight.trainable_parameter_count < created.preflight.parameter_count
        done = await wait_state(stack.training, created.name, TERMINAL, timeout=240)
        assert done.state == cpb.JOB_STATE_SUCCEEDED, done.error

        adapter = await stack.registry.get_model_version(done.outputs.model_version)
        merged = await stack.registry.get_model_version(done.outputs.merged_model_version)
        assert adapter.kind == rpb.MODEL_KIND_ADAPTER and merged.kind == rpb.MODEL_KIND_MERGED
        assert adapter.lineage.base_model_version == base and list(adapter.lineage.dataset_versions) == [train]
        assert merged.lineage.base_model_version == adapter.name
        assert {"preprocessor_config.json", "chat_template.jinja"} <= {f.path for f in merged.files}
        assert (await stack.training.list_checkpoints(parent=done.name)).checkpoints

        base_w = _weights(tiny_vlm)
        adapter_dir = _download(s3_settings, adapter.artifact_prefix, tmp_path / "adapter")
        lora = _weights(adapter_dir)
        # (a) the adapter holds language-model LoRA weights only: nothing of the vision tower or the merger
        assert lora and all(part_of(k) == "language" and ".lora_" in k for k in lora), sorted(lora)[:5]
        assert (adapter_dir / "preprocessor_config.json").is_file()
        # (b) the LoRA weights moved from their initialisation (lora_B starts at zero)
        assert any(v.abs().max().item() > 0 for k, v in lora.items() if "lora_B" in k)
        # (a) the merged model's vision tower and merger are bit-identical to the base's; the language model moved
        merged_dir = _download(s3_settings, merged.artifact_prefix, tmp_path / "merged")
        merged_w = _weights(merged_dir)
        vision_keys = [k for k in base_w if part_of(k) != "language"]
        assert vision_keys and any("merger" in k for k in vision_keys)
        assert all(torch.equal(base_w[k], merged_w[k]) for k in vision_keys)
        assert any(not torch.equal(base_w[k], merged_w[k]) for k in base_w if k.endswith("q_proj.weight"))

        # (c) eval loss on the held-out rows: lower after training (and the job's own figure agrees)
        before = _eval_loss(tiny_vlm, tiny_vlm, shape_eval_dataset, tmp_path)
        after = _eval_loss(merged_dir, merged_dir, shape_eval_dataset, tmp_path)
        reported = done.outputs.final_metrics["eval_loss"]
        print(f"eval loss before {before:.4f} after {after:.4f} (job: {reported:.4f})")
        assert math.isclose(after, reported, rel_tol=1e-3) and after < before - 0.5


async def test_full_fine_tune_of_a_vlm_keeps_the_frozen_vision_tower_bit_identical(
        tmp_path, s3_settings, tiny_vlm, shape_dataset):
    async with training_stack(tmp_path, s3_settings) as stack:
        base = await import_model(stack.registry, tiny_vlm, parent="models/tiny-vlm")
        train = await upload_dataset(stack.registry, "datasets/shapes", shape_dataset)
        job = lora_job(base, [train], method=tpb.TRAINING_METHOD_FULL, output_model="models/tiny-vlm-full",
                       hyperparameters={"max_steps": 3, "batch_size": 4, "max_length": 256, "learning_rate": 1e-4,
                                        "freeze_vision_tower": True, "freeze_aligner": False,
                                        "aligner_learning_rate": 5e-4})
        done = await _run(stack, job, "vlm-full")
        assert done.spec.hyperparameters.aligner_learning_rate == 5e-4
        model = await stack.registry.get_model_version(done.outputs.model_version)  # full weights
        assert model.kind == rpb.MODEL_KIND_MERGED and {"preprocessor_config.json"} <= {f.path for f in model.files}
        base_w, trained = _weights(tiny_vlm), _weights(_download(s3_settings, model.artifact_prefix, tmp_path / "m"))
        assert set(base_w) == set(trained)
        tower = [k for k in base_w if part_of(k) == "vision"]
        merger = [k for k in base_w if part_of(k) == "aligner"]
        language = [k for k in base_w if part_of(k) == "language"]
        assert tower and merger and language
        assert all(torch.equal(base_w[k], trained[k]) for k in tower)  # frozen: bit-identical
        assert any(not torch.equal(base_w[k], trained[k]) for k in merger)  # unfrozen aligner trained
        assert any(not torch.equal(base_w[k], trained[k]) for k in language)


async def test_text_only_model_refuses_vision_hyperparameters_and_a_vlm_refuses_preference_methods(
        tmp_path, s3_settings, tiny_vlm):
    data = Path(__file__).resolve().parents[1] / "data" / "training"
    async with training_stack(tmp_path, s3_settings, worker=False) as stack:
        text_base = await import_model(stack.registry, build_tiny_model(tmp_path / "text-model"))
        chat = await upload_dataset(stack.registry, "datasets/shout", data / "shout_train.jsonl")
        create = stack.training.create_training_job
        err = await fails(create(lora_job(text_base, [chat], hyperparameters={"freeze_vision_tower": False})),
                          InvalidArgument)
        assert err.reason == "VISION_HYPERPARAMETERS_ON_TEXT_MODEL"
        assert [v.field for v in err.violations] == ["spec.hyperparameters.freeze_vision_tower"]
        assert "spec.hyperparameters.freeze_vision_tower" in err.message and "text-only" in err.message
        err = await fails(create(lora_job(text_base, [chat], hyperparameters={
            "vision_learning_rate": 1e-5, "max_images_per_sample": 2})), InvalidArgument)
        assert {v.field for v in err.violations} == {"spec.hyperparameters.vision_learning_rate",
                                                     "spec.hyperparameters.max_images_per_sample"}
        # the defaults, said out loud, are fine on a text model
        ok = await create(lora_job(text_base, [chat], hyperparameters=dict(VISION_HP)), training_job_id="text-ok")
        assert ok.state == cpb.JOB_STATE_QUEUED

        vlm = await import_model(stack.registry, tiny_vlm, parent="models/tiny-vlm")
        pairs = await upload_dataset(stack.registry, "datasets/pairs", data / "shout_preference.jsonl")
        err = await fails(create(lora_job(vlm, [pairs], method=tpb.TRAINING_METHOD_DPO)), InvalidArgument)
        assert err.reason == "METHOD_UNSUPPORTED_FOR_VLM" and err.violations[0].field == "spec.method"
        assert "vision-language" in err.message


pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")
