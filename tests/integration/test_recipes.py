"""Training recipes run as real jobs: JobStore + Worker child processes, a real nanio S3 server, the real
registry over gRPC, tiny models on CPU."""

from __future__ import annotations

import asyncio
import json
import math
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from cli.demo_models import build_tiny_model
from modelyard.client import RegistryClient
from modelyard.registry.v1 import registry_pb2 as pb
from services.core.artifacts import S3ArtifactStore
from services.core.db import Database
from services.core.jobs import JobRecord, JobState, JobStore, Worker
from services.core.settings import GrpcServerSettings, S3Settings
from services.registry.app import build_app
from services.registry.settings import RegistrySettings
from services.training.recipes.checkpoints import complete_checkpoints
from services.training.recipes.spec import Hyperparameters

DATA = Path(__file__).resolve().parents[1] / "data" / "training"
KINDS = {"train": "services.training.recipes.run:run_training"}
# Preference runs: enough steps at a learning rate high enough that the margin moves clearly on the tiny model.
PREFERENCE_HP = {"max_steps": 8, "batch_size": 4, "learning_rate": 5e-3, "warmup_ratio": 0.0, "lr_scheduler": "constant"}
FAST = dict(poll_interval_s=0.05, heartbeat_s=0.2, heartbeat_timeout_s=1.5, cancel_grace_s=20.0)


# ----------------------------------------------------------------------------- helpers (also used by the
# SmolLM2 test and the benchmark)


def upload_model(store: S3ArtifactStore, folder: Path, name: str = "models/tiny/versions/base") -> dict[str, Any]:
    prefix = f"uploads/{name}"
    manifest = store.upload_dir(prefix, folder)
    return {"name": name, "artifact_prefix": prefix,
            "files": [{"path": f.path, "size": f.size, "sha256": f.sha256} for f in manifest.files]}


def upload_dataset(store: S3ArtifactStore, path: Path, fmt: str, name: str | None = None) -> dict[str, Any]:
    name = name or f"datasets/{path.stem.replace('_', '-')}/versions/v1"
    key = f"uploads/{name}/{path.name}"
    entry = store.put_file(key, path)
    return {"name": name, "key": key, "sha256": entry.sha256, "format": fmt, "file_type": "jsonl"}


def make_spec(s3: S3Settings, base: dict, datasets: list[dict], method: str = "lora", *,
              registry_addr: str = "", **overrides: Any) -> dict[str, Any]:
    # the service's own defaults (Hyperparameters.resolve), with a small, fast run on top
    hp = Hyperparameters.resolve({"learning_rate": 1e-3, "warmup_ratio": 0.0, "max_steps": 6, "batch_size": 2,
                                  "gradient_accumulation_steps": 1, "max_length": 64, "lora_rank": 4, "lora_alpha": 8,
                                  **overrides.pop("hyperparameters", {})},
                                 method=method, use_lora=True, precision="fp32").model_dump()
    spec = {"method": method, "use_lora": True, "base_model": base, "datasets": datasets,
            "validation_dataset": None, "validation_split": 0.0, "hyperparameters": hp,
            "launcher": {"kind": "local", "num_processes": 1, "zero_stage": 2, "offload": False},
            "log_every_steps": 1, "eval_every_steps": 0, "checkpoint_every_steps": 0,
            "output": {"model": "models/tiny-tuned", "merge": False, "description": "test"},
            "s3": {"endpoint": s3.endpoint, "bucket": s3.bucket, "secure": False},
            "registry_addr": registry_addr, "omp_num_threads": 1}
    spec.update(overrides)
    return spec


def job_env(s3: S3Settings) -> dict[str, str]:
    return {"YARD_JOB_S3_ACCESS_KEY": s3.access_key, "YARD_JOB_S3_SECRET_KEY": s3.secret_key.get_secret_value()}


async def until(predicate, timeout: float = 120.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = await asyncio.to_thread(predicate)
        if value:
            return value
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def events_of(jobs: JobStore, name: str, kind: str) -> list:
    return [e for e in jobs.events(name) if e.type.value == kind]


def trainable_tensors(store: S3ArtifactStore, prefix: str, dest: Path) -> dict[str, torch.Tensor]:
    store.download_dir(prefix, dest)
    return load_file(str(dest / "adapter_model.safetensors"))


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture
def store(s3_settings) -> S3ArtifactStore:
    return S3ArtifactStore.connect(s3_settings)


@pytest.fixture
def jobs(tmp_path):
    db = Database(f"sqlite:///{tmp_path / 'jobs.db'}")
    yield JobStore(db)
    db.dispose()


@pytest.fixture
def worker(jobs, tmp_path, s3_settings) -> Worker:
    return Worker(jobs, KINDS, "w1", tmp_path / "work", child_env=job_env(s3_settings), **FAST)


@pytest.fixture
def tiny_inputs(store, tiny_model) -> tuple[dict, list[dict]]:
    return upload_model(store, tiny_model), [upload_dataset(store, DATA / "shout_train.jsonl", "messages")]


@pytest.fixture
async def registry(tmp_path, s3_settings):
    """A running registry and an SDK client of it (``.target`` is its address)."""
    settings = RegistrySettings(data_dir=tmp_path / "registry", s3=s3_settings, grpc=GrpcServerSettings(port=0),
                                import_workers=1, hf_endpoint="http://127.0.0.1:9", hf_token=None)
    app = build_app(settings, metrics=False, default_port=0)
    await app.start()
    client = RegistryClient(f"127.0.0.1:{app.server.port}", timeout=120)
    yield client
    await client.close()
    await app.stop(grace=1)


async def run_job(jobs: JobStore, worker: Worker, spec: dict, name: str) -> JobRecord:
    jobs.create("train", spec, name=name)
    done = await worker.run_once()
    assert done is not None
    if done.state != JobState.SUCCEEDED:
        logs = "\n".join(e.message for e in jobs.events(name) if e.type.value == "log")[-4000:]
        raise AssertionError(f"{name} ended {done.state}: {done.error}\n{logs}")
    return done


# ----------------------------------------------------------------------------- SFT


async def test_lora_sft_job_reports_metrics_uploads_adapter_and_registers_it(jobs, worker, store, s3_settings,
                                                                              tiny_model, registry, tmp_path):
    base_v = await registry.create_model_version(
        parent="models/tiny", version_id="base",
        model_version=pb.ModelVersion(artifact_prefix=upload_model(store, tiny_model)["artifact_prefix"]))
    ds_v = await registry.upload_dataset(DATA / "shout_train.jsonl", parent="datasets/shout")
    base = {"name": base_v.name, "artifact_prefix": base_v.artifact_prefix, "files": []}
    dataset = {"name": ds_v.name, "key": ds_v.artifact_key, "sha256": ds_v.sha256, "format": "messages",
               "file_type": "jsonl"}
    spec = make_spec(s3_settings, base, [dataset], registry_addr=registry.target, validation_split=0.1,
                     eval_every_steps=3, output={"model": "models/tiny-shout", "merge": True, "description": "t"})

    done = await run_job(jobs, worker, spec, "trainingJobs/lora-1")

    out = done.outputs
    assert out["adapter_version"] == "models/tiny-shout/versions/v1"
    assert out["merged_version"] == "models/tiny-shout/versions/v2"
    assert [c["step"] for c in out["checkpoints"]] == [6]  # checkpoint_every_steps 0: one at the end
    assert store.exists("training/lora-1/outputs/adapter/manifest.json")
    assert store.exists("training/lora-1/outputs/merged/manifest.json")
    metrics = [e.data for e in events_of(jobs, done.name, "metrics") if "loss" in e.data]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4, 5, 6]
    assert all(m["tokens_per_s"] > 0 and m["learning_rate"] > 0 and "grad_norm" in m for m in metrics)
    assert any("eval_loss" in e.data for e in events_of(jobs, done.name, "metrics"))
    assert "eval_loss" in out["final_metrics"] and out["final_metrics"]["global_step"] == 6
    assert done.progress["fraction"] == 1.0 and done.progress["total_steps"] == 6
    adapter = await registry.get_model_version(out["adapter_version"])
    assert adapter.kind == pb.MODEL_KIND_ADAPTER and adapter.lineage.job == done.name
    assert adapter.lineage.base_model_version == base_v.name and list(adapter.lineage.dataset_versions) == [ds_v.name]
    assert adapter.lineage.parameters["method"] == "lora"
    merged = await registry.get_model_version(out["merged_version"])
    assert merged.kind == pb.MODEL_KIND_MERGED and merged.lineage.base_model_version == adapter.name


# ----------------------------------------------------------------------------- checkpoints, resume, cancel


async def test_job_killed_after_a_checkpoint_resumes_to_the_same_weights_as_an_uninterrupted_run(
        jobs, store, s3_settings, tiny_inputs, tmp_path):
    base, datasets = tiny_inputs
    spec = make_spec(s3_settings, base, datasets, checkpoint_every_steps=4, hyperparameters={"max_steps": 24})
    worker = Worker(jobs, KINDS, "w1", tmp_path / "work", slots=2, child_env=job_env(s3_settings), **FAST)
    jobs.create("train", spec, name="trainingJobs/straight")
    jobs.create("train", spec, name="trainingJobs/killed")
    await worker.start()
    try:
        saved = await until(lambda: (jobs.get("trainingJobs/killed").resume_state or {}).get("step", 0) >= 4,
                            what="first checkpoint of the job to kill")
        assert saved
        os.kill(jobs.get("trainingJobs/killed").child_pid, signal.SIGKILL)
        await until(lambda: jobs.get("trainingJobs/killed").attempt == 2, timeout=30, what="requeue")
        finals = await until(lambda: all(j.state.value in ("SUCCEEDED", "FAILED", "CANCELLED") for j in
                                         (jobs.get("trainingJobs/straight"), jobs.get("trainingJobs/killed")))
                             and [jobs.get("trainingJobs/straight"), jobs.get("trainingJobs/killed")],
                             timeout=240, what="both jobs done")
    finally:
        await worker.stop()
    straight, killed = finals
    assert (straight.state, killed.state, killed.attempt) == (JobState.SUCCEEDED, JobState.SUCCEEDED, 2)
    resumed_at = [e.data for e in jobs.events(killed.name) if e.message == "checkpoint downloaded"]
    assert len(resumed_at) == 1 and 4 <= resumed_at[0]["step"] < 24
    # the second attempt continues the step count (no step before the checkpoint is trained twice)
    second_steps = [e.data["step"] for e in events_of(jobs, killed.name, "metrics")
                    if "loss" in e.data and e.seq > jobs.events(killed.name)[0].seq and e.data["step"] > resumed_at[0]["step"]]
    assert second_steps and second_steps[-1] == 24
    a = trainable_tensors(store, straight.outputs["adapter_prefix"], tmp_path / "a")
    b = trainable_tensors(store, killed.outputs["adapter_prefix"], tmp_path / "b")
    assert a.keys() == b.keys() and len(a) > 0
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-5, rtol=0), key
    assert straight.outputs["final_metrics"]["global_step"] == killed.outputs["final_metrics"]["global_step"] == 24
    assert [c["step"] for c in killed.outputs["checkpoints"]] == [4, 8, 12, 16, 20, 24]


async def test_cancelled_job_keeps_the_checkpoints_already_written(jobs, worker, store, s3_settings, tiny_inputs):
    base, datasets = tiny_inputs
    spec = make_spec(s3_settings, base, datasets, checkpoint_every_steps=2, hyperparameters={"max_steps": 2000})
    jobs.create("train", spec, name="trainingJobs/cancel-me")
    run = asyncio.create_task(worker.run_once())
    await until(lambda: (jobs.get("trainingJobs/cancel-me").resume_state or {}).get("step", 0) >= 2,
                what="first checkpoint")
    jobs.request_cancel("trainingJobs/cancel-me")
    done = await asyncio.wait_for(run, 60)
    assert done.state == JobState.CANCELLED
    kept = complete_checkpoints(store, done.name)
    assert kept and kept[0][0] == 2
    assert [c["prefix"] for c in done.outputs["checkpoints"]] == [p for _, p in kept]
    assert not store.exists("training/cancel-me/outputs/adapter/manifest.json")
    states = [e.data["state"] for e in jobs.events(done.name) if e.type.value == "state"]
    assert states[-1] == "CANCELLED" and "SUCCEEDED" not in states
    assert 2 <= done.progress["step"] < 2000  # stopped by the cancel, not by running out of steps


# ----------------------------------------------------------------------------- other methods


def preference_margins(model_dir: Path, adapter_dir: Path | None, pairs_file: Path) -> list[float]:
    """Per pair: the policy's log-probability of the chosen answer minus that of the rejected one (summed over the
    answer tokens, each after the chat-templated prompt, as trl scores them)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, adapter_dir)
    model.eval()

    def logp(prompt: list[dict], answer: str) -> float:
        head = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=False)
        full = tokenizer.apply_chat_template(prompt + [{"role": "assistant", "content": answer}], tokenize=True,
                                             return_dict=False)
        assert full[:len(head)] == head
        ids = torch.tensor([full])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, :-1].float()
        per_token = torch.log_softmax(logits, -1).gather(1, ids[0, 1:, None])[:, 0]
        return float(per_token[len(head) - 1:].sum())

    margins = []
    for line in pairs_file.read_text().splitlines():
        row = json.loads(line)
        prompt = [{"role": "user", "content": row["prompt"]}]
        margins.append(logp(prompt, row["chosen"]) - logp(prompt, row["rejected"]))
    return margins


@pytest.mark.parametrize("method,fmt,file", [("dpo", "preference", "shout_preference.jsonl"),
                                             ("orpo", "preference", "shout_preference.jsonl"),
                                             ("kto", "kto", "shout_kto.jsonl"),
                                             ("simpo", "preference", "shout_preference.jsonl"),
                                             ("cpo", "preference", "shout_preference.jsonl")])
async def test_preference_method_widens_the_margin_of_chosen_over_rejected(method, fmt, file, jobs, worker, store,
                                                                           s3_settings, tiny_model, tmp_path):
    """Each preference method, run for real on the tiny model, moves the policy towards the chosen answers: the
    log-probability margin of chosen over rejected grows on the training pairs (fixed seed, a clear learning rate)."""
    base = upload_model(store, tiny_model)
    spec = make_spec(s3_settings, base, [upload_dataset(store, DATA / file, fmt)], method,
                     hyperparameters=PREFERENCE_HP)
    done = await run_job(jobs, worker, spec, f"trainingJobs/{method}-1")
    assert done.outputs["adapter_prefix"] == f"training/{method}-1/outputs/adapter"
    assert done.outputs["adapter_version"] is None  # no registry_addr: registration skipped
    losses = [e.data["loss"] for e in events_of(jobs, done.name, "metrics") if "loss" in e.data]
    assert len(losses) == PREFERENCE_HP["max_steps"] and all(math.isfinite(x) for x in losses)
    store.download_dir(done.outputs["adapter_prefix"], tmp_path / "adapter")
    pairs = DATA / "shout_preference.jsonl"  # the pairs behind the KTO rows too
    before = preference_margins(tiny_model, None, pairs)
    after = preference_margins(tiny_model, tmp_path / "adapter", pairs)
    gains = [a - b for a, b in zip(after, before, strict=True)]
    # every pair moves towards its chosen answer (by 0.2 to 5 nats after 8 steps here), not a mean lifted by one
    assert all(g > 0 for g in gains), (method, gains)
    assert sum(gains) / len(gains) > 0.5, (method, before, after)


async def test_qlora_on_a_cpu_node_fails_with_the_capability_message(jobs, worker, s3_settings):
    base = {"name": "models/none/versions/v1", "artifact_prefix": "uploads/never-downloaded", "files": []}
    ds = {"name": "datasets/none/versions/v1", "key": "uploads/never.jsonl", "sha256": "0" * 64, "format": "messages"}
    jobs.create("train", make_spec(s3_settings, base, [ds], "qlora"), name="trainingJobs/qlora-1")
    done = await worker.run_once()
    assert done.state == JobState.FAILED and done.attempt == 1
    assert done.error["code"] == "FAILED_PRECONDITION" and done.error["reason"] == "HARDWARE_UNSUPPORTED"
    assert done.error["message"].startswith("qlora needs a CUDA GPU with bitsandbytes; this node has: cpu")


@pytest.mark.parametrize("zero_stage,offload", [(2, False), (3, True)])
async def test_two_process_run_over_gloo_completes_and_only_rank0_reports(zero_stage, offload, jobs, worker, store,
                                                                         s3_settings, tiny_inputs):
    base, datasets = tiny_inputs
    spec = make_spec(s3_settings, base, datasets, hyperparameters={"max_steps": 4},
                     launcher={"kind": "deepspeed", "num_processes": 2, "zero_stage": zero_stage, "offload": offload,
                               "offload_parameters": offload and zero_stage == 3})
    name = f"zero{zero_stage}-1"
    done = await run_job(jobs, worker, spec, f"trainingJobs/{name}")
    assert done.outputs["final_metrics"]["global_step"] == 4
    assert store.exists(f"training/{name}/outputs/adapter/manifest.json")
    metrics = [e.data for e in events_of(jobs, done.name, "metrics") if "loss" in e.data]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]  # rank 0 only, relayed once per step
    assert all(m["loss"] == m["loss"] for m in metrics)
    logs = {e.message: e.data for e in jobs.events(done.name) if e.type.value == "log"}
    assert logs["ranks launched"]["processes"] == 2
    # CPU node: DeepSpeed's own engine over gloo, not a DDP fallback
    assert logs["training engine"] == {"engine": f"deepspeed zero-{zero_stage} over gloo, 2 ranks"}
    used = logs["deepspeed engine used"]
    assert (used["zero_stage"], used["world_size"], used["offload"]) == (zero_stage, 2, offload)
    # ZeRO shards the optimizer: rank 0's fp32 partition is half of the trainable (LoRA) weights, up to padding
    assert used["trainable_params"] > 0
    assert used["trainable_params"] / 2 <= used["optimizer_partition_params"] <= used["trainable_params"] / 2 + 64
